"""The benchmark scripts in bench/ run end to end on the CPU and write their JSON results.

They are meant for GPUs; CI runs each once with the smallest sizes (tiny GPT-2, one or two steps,
1e5 scores) so a change in fsam_ds or its dependencies cannot silently break them. No timing or
memory figure is checked here: those belong to the benchmark runs themselves.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO_ROOT, "bench")
SCRIPT_TIMEOUT_S = 300
STEP_VARIANTS = ["adamw", "sam", "fsam_every_step", "fsam_every_100", "fsam_interval_2", "fsam_interval_4"]
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="module", autouse=True)
def remove_new_shm_buffers():
    """DeepSpeed's CPU all-reduce can leave 66 MB /dev/shm files; remove the ones made here
    (only those: other jobs on the machine may be using theirs)."""
    before = set(glob.glob(SHM_BUFFERS))
    yield
    for path in set(glob.glob(SHM_BUFFERS)) - before:
        try:
            os.remove(path)
        except OSError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bench(script: str, args: list, out_path, **env_overrides) -> tuple:
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", **env_overrides)
    env.pop("LOCAL_SIZE", None)   # would switch DeepSpeed to the /dev/shm all-reduce
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, script), *args,
                           "--out", str(out_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    assert proc.returncode == 0, (f"{script} exited {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    with open(out_path) as f:
        return json.load(f), proc.stdout


def check_step_variants(result: dict, timed_steps: int):
    assert list(result["variants"]) == STEP_VARIANTS
    for name, variant in result["variants"].items():
        assert variant["timed"]["count"] == timed_steps and variant["timed"]["median_s"] > 0, name
    # every variant trained: the FSAM ones counted their optimizer steps
    total_steps = result["config"]["warmup"] + result["config"]["steps"]
    for name in STEP_VARIANTS[1:]:
        assert result["variants"][name]["fsam_num_steps"] == total_steps, name
    assert result["variants"]["fsam_every_100"]["refresh_steps"] == [0]
    assert result["variants"]["fsam_every_step"]["refresh_steps"] == list(range(total_steps))
    assert 0 < result["variants"]["fsam_every_step"]["fsam_last_stats"]["mask_density"] < 1
    assert {"sam/adamw", "fsam_every_step/sam", "fsam_every_100/sam", "fsam_interval_2/adamw",
            "fsam_interval_4/adamw"} <= set(result["ratios"])
    assert all(r > 0 for r in result["ratios"].values())


@pytest.mark.parametrize("interleave", [False, True])
def test_step_time_one_rank(tmp_path, interleave):
    result, stdout = run_bench(
        "step_time.py", ["--model", "tiny", "--zero_stage", "2", "--warmup", "0", "--steps", "1"]
        + (["--interleave"] if interleave else []),
        tmp_path / "step_time.json", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert result["benchmark"] == "step_time" and result["config"]["world_size"] == 1
    assert result["config"]["interleaved"] == interleave
    check_step_variants(result, timed_steps=1)
    assert "| tiny | 2 | 1 |" in stdout   # the markdown summary row


def test_threshold(tmp_path):
    result, _ = run_bench("threshold.py", ["--numel", "1e5", "--repeats", "1"],
                          tmp_path / "threshold.json")
    assert set(result["methods"]) == {"exact_topk_threshold[bits=16]",
                                      "exact_topk_threshold[bits=8]", "exact_topk_threshold+mask",
                                      "read_twice", "torch.topk", "torch.kthvalue"}
    for name, method in result["methods"].items():
        assert "error" not in method and method["median_s"] > 0, name
    assert result["config"]["k"] == 10 ** 4
    assert result["checks"]["threshold_equals_kthvalue"] and result["checks"]["counts_bracket_k"]


def test_fsam_memory(tmp_path):
    result, _ = run_bench("fsam_memory.py", ["--model", "tiny", "--zero_stage", "2"],
                          tmp_path / "fsam_memory.json")
    summary = result["per_rank"][0]
    per_param = summary["fsam_ds_per_local_param"]
    assert summary["local"]["valid_numel"] == summary["model_params"]   # one rank holds all
    # the mask kept between steps: packed bits to one bool per element
    assert 0 < per_param["persistent_per_local_param"] <= 1
    # first-pass gradients: one fp32 copy per element, or none where fsam_ds keeps references
    assert per_param["captured_grad_per_local_param"] in (0.0, 4.0)
    # FSAM (sparsity 0.9) saves fewer original values than SAM, which saves every element
    assert 0 < per_param["saved_per_local_param"] < per_param["sam_saved_per_local_param"]
    assert summary["paper_public_code"]["refresh_peak_bytes_per_model_param"] >= 20


def test_cpu_ratio_two_ranks(tmp_path):
    result, stdout = run_bench("cpu_ratio.py", ["--steps", "1", "--warmup", "0"],
                               tmp_path / "cpu_ratio.json")
    assert result["benchmark"] == "cpu_ratio" and result["config"]["world_size"] == 2
    check_step_variants(result, timed_steps=1)
    assert "| 2 | tiny | 2 | fsam_every_100 |" in stdout


def test_profile_step_names_the_fsam_ranges(tmp_path):
    result, _ = run_bench("profile_step.py", ["--model", "tiny", "--steps", "1", "--warmup", "1",
                                               "--variants", "adamw,fsam_every_step"],
                          tmp_path / "profile.json")
    ranges = result["variants"]["fsam_every_step"]["ranges"]
    for name in ("fsam.first_pass", "fsam.perturb", "fsam.refresh_threshold", "fsam.refresh_mask",
                 "fsam.publish", "fsam.second_pass", "fsam.restore", "fsam.base_step"):
        assert ranges[name]["calls_per_step"] == 1, name
    assert ranges["fsam.refresh_threshold"]["host_ms_per_step"] > 0
    assert set(result["variants"]["adamw"]["ranges"]) == {"adamw.forward_backward",
                                                          "adamw.optimizer_step"}


def test_small_overhead_counts_stay_low(tmp_path):
    """bench/small_overhead.py runs, and guards issue 14's small-model fix: before it, a SAM step
    at stage 0 launched ~14 kernels per parameter tensor inside fsam_ds (1,472 at MiniLM size) and
    a mask refresh synced with the host 29 times (tiny BERT, ZeRO-2; 79 at MiniLM size)."""
    result, stdout = run_bench(
        "small_overhead.py", ["--model", "tiny", "--warmup", "1", "--count_steps", "1",
                              "--steps", "1", "--variants", "adamw,sam,fsam_every_step"],
        tmp_path / "small_overhead.json")
    assert result["benchmark"] == "small_overhead"
    by = {(v["zero_stage"], v["variant"]): v for v in result["variants"]}
    assert set(by) == {(s, n) for s in (0, 2) for n in ("adamw", "sam", "fsam_every_step")}
    for (stage, name), v in by.items():
        counted = v["counted"][0]
        assert v["median_step_s"] > 0 and counted["step_ops"] > 0, (stage, name)
        if name == "adamw":
            assert counted["fsam_ops"] == 0
            continue
        assert counted["refreshed"] == (name == "fsam_every_step"), (stage, name)
        # one host read for the step plan; a refresh adds at most 4 (threshold, kept positions,
        # their split over the tensors, the masked norm)
        assert counted["fsam_syncs"] <= (5 if counted["refreshed"] else 1), (stage, name, counted)
    # SAM: a few batched kernels per step, not a few per tensor
    assert by[0, "sam"]["counted"][0]["fsam_kernels"] <= 2 * by[0, "sam"]["num_param_tensors"]
    assert "| 0 | sam |" in stdout
