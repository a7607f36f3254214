"""Host memory of one rank, as a user sees it (peak RSS), and glibc's hold on freed buffers.

  set_mmap_threshold()  glibc malloc serves blocks >= M_MMAP_THRESHOLD with their own mmap, which
                        free() returns to the kernel at once. The threshold is dynamic by default
                        and climbs to 32 MiB after the first large free, after which ZeRO-3's many
                        gathered parameters and gradient buckets (a few MB to tens of MB each) are
                        carved from the heap arenas, and what they free stays in the process: peak
                        RSS then counts garbage. launch/train.py fixes the threshold at 1 MiB at
                        start-up. Env FSAM_MMAP_THRESHOLD: bytes, 0 leaves glibc's default.
  PeakSampler           a daemon thread that reads /proc/self/status every FSAM_MEM_SAMPLE_MS ms
                        (off when unset or 0) and keeps the peak RssAnon: anonymous memory only,
                        where VmHWM also counts file pages (mapped checkpoints, libraries).
  status_mb(key)        one /proc/self/status field (VmRSS, VmHWM, RssAnon, ...) in MiB.
  reset_peak()          reset the kernel's VmHWM to the current RSS.
  trim()                malloc_trim(0): free heap memory back to the kernel, so that what follows
                        shows as growth instead of reusing resident garbage.
No torch import: call set_mmap_threshold before the first large allocation.
"""
import ctypes
import ctypes.util
import os
import threading

M_MMAP_THRESHOLD = -3            # glibc malloc.h
DEFAULT_MMAP_THRESHOLD = 1 << 20


def set_mmap_threshold(value=None):
    """mallopt(M_MMAP_THRESHOLD, value); value None reads FSAM_MMAP_THRESHOLD (default 1 MiB).
    Returns the threshold set, or 0 where none was (disabled, or not glibc)."""
    if value is None:
        value = int(os.environ.get("FSAM_MMAP_THRESHOLD", DEFAULT_MMAP_THRESHOLD))
    if value <= 0:
        return 0
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return 0           # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return value if mallopt(M_MMAP_THRESHOLD, int(value)) == 1 else 0


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim():
    """glibc's malloc_trim(0); False where there is no glibc."""
    trim_fn = getattr(_libc(), "malloc_trim", None)
    if trim_fn is None:
        return False
    trim_fn.argtypes, trim_fn.restype = [ctypes.c_size_t], ctypes.c_int
    trim_fn(0)
    return True


def status_mb(key):
    """A /proc/self/status field in MiB (0.0 where /proc has no such field)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Peak of a /proc/self/status field (default RssAnon), sampled every interval_ms by a daemon
    thread; interval_ms None reads FSAM_MEM_SAMPLE_MS (0 or unset: not started, peak stays None).
    Use as a context manager or start()/stop()."""

    def __init__(self, interval_ms=None, key="RssAnon"):
        if interval_ms is None:
            interval_ms = float(os.environ.get("FSAM_MEM_SAMPLE_MS", 0) or 0)
        self.interval_s, self.key = interval_ms / 1000, key
        self.peak = None
        self._stop = threading.Event()
        self._thread = None

    def sample(self):
        value = status_mb(self.key)
        if self.peak is None or value > self.peak:
            self.peak = value
        return value

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self):
        if self.interval_s > 0 and self._thread is None:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="PeakSampler", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        return self.peak

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
