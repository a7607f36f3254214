"""Faults injected into real launch/train.py jobs (2 CPU ranks under torchrun): SIGKILL and resume,
kills at random points, a half-written checkpoint, a rank that dies, and zero_to_fp32 on the result."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from launch_helpers import ENV, REPO, make_assets, train_args

STEPS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory)


def torchrun(assets, out, port, extra=(), steps=STEPS):
    args = train_args(assets, out, ["--save_every", "2", "--epochs", "1000", *extra])
    args[args.index("--max_steps") + 1] = str(steps)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(port), *args]


def start(cmd, log):
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_job(proc):
    """SIGKILL the whole job, as a pre-emption does. torchrun starts each worker in a session of its
    own (torch.distributed.elastic's subprocess handler), so killing the launcher's process group
    alone left the ranks training on, racing the resumed job for the same checkpoint directory."""
    import psutil
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
    subprocess.run("rm -f /dev/shm/deepspeed_allreduce_buffer_*", shell=True)


def finish(cmd, log_path, timeout=600):
    with open(log_path, "a") as log:
        proc = start(cmd, log)
        try:
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                kill_job(proc)
    text = open(log_path).read()
    assert proc.returncode == 0, text[-4000:]
    return text


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def read_latest(out):
    path = out / "checkpoints" / "latest"
    return open(path).read().strip() if path.exists() else None


def load_weights(out):
    from safetensors.torch import load_file
    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    finish(torchrun(assets, out, 29531), out / "log.txt")
    return out


def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(assets, uninterrupted, tmp_path):
    cmd = torchrun(assets, tmp_path, 29532)
    with open(tmp_path / "log.txt", "w") as log:
        proc = start(cmd, log)
        try:
            reached = wait_for(lambda: read_latest(tmp_path) == "step2", proc)
        finally:
            kill_job(proc)                 # pre-empted right after the step-2 checkpoint
    assert reached, open(tmp_path / "log.txt").read()[-3000:]
    assert not (tmp_path / "model").exists(), "the job finished before it was killed"
    text = finish(cmd + ["--resume"], tmp_path / "log.txt")
    assert "resumed from" in text
    straight, resumed = load_weights(uninterrupted), load_weights(tmp_path)
    assert straight.keys() == resumed.keys()
    diffs = {k: (straight[k] - resumed[k]).abs().max().item() for k in straight}
    assert max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}


def test_kills_at_random_points_leave_a_loadable_latest_checkpoint(assets, tmp_path):
    rng = random.Random(7)
    outcomes = []
    for trial in range(3):
        out = tmp_path / f"trial{trial}"
        cmd = torchrun(assets, out, 29540 + trial, extra=["--save_every", "1"], steps=40)
        with open(tmp_path / f"log{trial}.txt", "w") as log:
            proc = start(cmd, log)
            try:
                # once training runs, kill after a random delay: mid-step or mid-checkpoint-write
                wait_for(lambda: (out / "checkpoints").exists(), proc)
                time.sleep(rng.uniform(0.0, 4.0))
            finally:
                kill_job(proc)
        tag = read_latest(out)
        if tag is not None:
            assert (out / "checkpoints" / tag).is_dir()
        resume = torchrun(assets, out, 29550 + trial, extra=["--save_every", "1", "--resume"], steps=41)
        text = finish(resume, tmp_path / f"log{trial}.txt")
        outcomes.append((tag, "resumed from" in text))
    print("kill trials (latest tag at kill, resumed):", outcomes)
    assert any(tag is not None for tag, _ in outcomes), "no trial was killed after a checkpoint"
    assert all(resumed == (tag is not None) for tag, resumed in outcomes)


def test_a_half_written_checkpoint_is_never_latest(assets, uninterrupted, tmp_path):
    """What a kill during a write leaves behind: a new tag directory with truncated files. The
    `latest` pointer still names the previous, complete checkpoint, and resuming uses it."""
    import shutil
    out = tmp_path
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    assert read_latest(out) == f"step{STEPS}"
    partial = out / "checkpoints" / f"step{STEPS + 2}"
    shutil.copytree(out / "checkpoints" / f"step{STEPS}", partial)
    for f in partial.rglob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])          # torn writes
    cmd = torchrun(assets, out, 29560, steps=STEPS + 2) + ["--resume"]
    text = finish(cmd, out / "log.txt")
    assert f"resumed from {out}/checkpoints/step{STEPS} at step {STEPS}" in text


def test_a_dead_rank_fails_the_job_in_bounded_time_naming_the_rank(assets, tmp_path):
    cmd = torchrun(assets, tmp_path, 29570, steps=100000, extra=["--timeout_minutes", "1"])
    with open(tmp_path / "log.txt", "w") as log:
        proc = start(cmd, log)
        try:
            assert wait_for(lambda: (tmp_path / "checkpoints").exists(), proc)
            rank1 = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_rank(int(p), 1, proc.pid)]
            assert rank1, "rank 1's process not found"
            killed_at = time.time()
            os.kill(rank1[0], signal.SIGKILL)
            proc.wait(timeout=150)
        finally:
            if proc.poll() is None:
                kill_job(proc)
    elapsed = time.time() - killed_at
    text = open(tmp_path / "log.txt").read()
    subprocess.run("rm -f /dev/shm/deepspeed_allreduce_buffer_*", shell=True)
    assert proc.returncode not in (0, None)
    assert elapsed < 150
    assert "rank: 1" in text and "exitcode: -9" in text, text[-3000:]


def _is_rank(pid, rank, launcher_pid):
    """pid is a train.py process descended from the launcher, with RANK=rank."""
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        ancestor = pid
        while ancestor > 1 and ancestor != launcher_pid:
            ancestor = int(open(f"/proc/{ancestor}/stat").read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return False
    return ancestor == launcher_pid and b"launch/train.py" in cmdline and f"RANK={rank}".encode() in environ


def test_zero_to_fp32_gives_a_loadable_fp32_model_from_an_fsam_run(uninterrupted):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForSequenceClassification
    state = get_fp32_state_dict_from_zero_checkpoint(str(uninterrupted / "checkpoints"), tag=f"step{STEPS}")
    model = AutoModelForSequenceClassification.from_pretrained(uninterrupted / "model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    saved = load_weights(uninterrupted)
    for name, value in state.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, saved[name]), name
    metrics = json.load(open(uninterrupted / "metrics.json"))
    assert metrics["steps"] == STEPS
