"""How busy the GPU is inside each named range of a profile_step.py Chrome trace.

    python bench/trace_busy.py TRACE_DIR/trace_adamw.json.gz [more traces]

For every fsam.* / adamw.* range (record_function on the host) it prints the range's wall time
and the union of the GPU kernel/memcpy/memset intervals that started inside it, per step. A
range whose GPU-busy time is far below its wall time is host-bound: the GPU waits for Python
(e.g. ZeRO-3's per-module fetch/release hooks), and a second pass of it costs its whole wall
time again whatever the model's FLOPs. Profiler overhead inflates the wall times: compare
ranges within one trace, not with step_time.py's figures.
"""
import collections
import gzip
import json
import sys


def events(path):
    with gzip.open(path) if path.endswith(".gz") else open(path) as f:
        data = json.load(f)
    trace = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in trace if e.get("ph") == "X"]


def union_length(intervals):
    total, current = 0.0, None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    return total + (current[1] - current[0] if current is not None else 0.0)


def busy_by_range(path):
    ev = events(path)
    ranges = [e for e in ev if e.get("cat") == "user_annotation"
              and e["name"].startswith(("fsam.", "adamw."))]
    device = [(e["ts"], e["ts"] + e["dur"]) for e in ev
              if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    out = collections.defaultdict(lambda: {"wall_us": 0.0, "busy_us": 0.0, "calls": 0, "kernels": 0})
    for r in ranges:
        start, end = r["ts"], r["ts"] + r["dur"]
        inside = [iv for iv in device if start <= iv[0] < end]
        row = out[r["name"]]
        row["wall_us"] += r["dur"]
        row["busy_us"] += union_length(inside)
        row["calls"] += 1
        row["kernels"] += len(inside)
    return dict(out)


def main(paths, steps_per_trace=None):
    for path in paths:
        rows = busy_by_range(path)
        # every range runs once per step, so the commonest call count is the step count
        steps = steps_per_trace or max(collections.Counter(r["calls"] for r in rows.values()).most_common(1)[0][0], 1)
        print(f"== {path} ({steps} steps)")
        for name, r in sorted(rows.items()):
            print(f"{name:32s} wall {r['wall_us'] / 1e3 / steps:8.1f} ms/step   GPU busy "
                  f"{r['busy_us'] / 1e3 / steps:8.1f} ms/step   kernels {r['kernels'] / steps:.0f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
