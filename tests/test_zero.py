"""The central test: sharded FSAM under DeepSpeed ZeRO stages 0-3 at world sizes 1, 2 and 4 against
a single-process reference FSAM (exact torch.topk) on the same global batches.

Every run: 10 FSAM steps, AdamW with two param groups (weight decay 0.01 / 0.0), a warm-up/decay
LR schedule, gradient clipping 1.0, gradient accumulation 2, fp32, a 277-parameter model (every
world size > 1 pads the partitions). Ranks start once per (stage, world size) and run every case.
"""
import functools
import math
from fractions import Fraction

import pytest

import zero_cases as zc
from dist_harness import run_ranks

STEPS = 10
CASES = {
    "grad_sq": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 1},
    "exp_avg_sq": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 2, "fisher": "exp_avg_sq"},
    "adaptive": {"rho": 0.5, "sparsity": 0.8, "mask_interval": 1, "adaptive": True},
    "interval_3": {"rho": 0.05, "sparsity": 0.7, "mask_interval": 3},
    "sam": {"rho": 0.05, "sparsity": 0.0, "mask_interval": 1},
    "sam_interval_2": {"rho": 0.05, "sparsity": 0.8, "mask_interval": 3, "sam_interval": 2},
    "rho_0": {"rho": 0.0, "sparsity": 0.9, "mask_interval": 1},
    "plain_adamw": None,   # deepspeed.initialize with the base optimizer alone
}
TOLERANCE = 1e-5


@functools.lru_cache(maxsize=None)
def ranks_result(stage, world_size):
    cases = [{"stage": stage, "steps": STEPS, "fsam": fsam} for fsam in CASES.values()]
    per_rank = run_ranks(zc.run_cases, world_size, cases, deepspeed=True)
    return {name: [per_rank[r][i] for r in range(world_size)] for i, name in enumerate(CASES)}


@functools.lru_cache(maxsize=None)
def reference(name):
    return zc.reference_run({"steps": STEPS, "fsam": CASES[name]})


STAGE_WORLD = [(s, w) for s in (0, 1, 2, 3) for w in (1, 2, 4)]


@pytest.mark.parametrize("stage, world_size", STAGE_WORLD)
def test_zero_matches_single_process_reference(stage, world_size):
    results = ranks_result(stage, world_size)
    untrained = {n: p.detach() for n, p in zc.make_model().named_parameters()}
    diffs = {}
    for name, fsam in CASES.items():
        if fsam is None:
            continue
        rank0 = results[name][0]
        ref_weights, ref_losses = reference(name)
        diffs[name] = zc.max_abs_diff(rank0["weights"], ref_weights)
        assert diffs[name] < TOLERANCE, f"{name}: max abs diff {diffs[name]:.3g} vs the reference"
        # every rank holds the same full weights after the step
        for r, res in enumerate(results[name][1:], 1):
            assert zc.max_abs_diff(res["weights"], rank0["weights"]) == 0.0, f"{name}: rank {r} differs"
        # one FSAM step is one DeepSpeed step: counters and the schedule advanced STEPS times
        assert rank0["global_steps"] == STEPS
        # the mask keeps exactly k ranked elements (stage 0 replicates it: count one rank)
        counted = results[name][:1] if stage == 0 else results[name]
        kept = sum(r["kept"] for r in counted)
        num_ranked = rank0["num_ranked"]
        if fsam["rho"] > 0:
            expected_k = math.ceil((1 - Fraction(str(fsam["sparsity"]))) * num_ranked)
            assert kept == expected_k, f"{name}: kept {kept}, expected {expected_k} of {num_ranked}"
        # the run trained: far from the untrained weights, so the 1e-5 agreement is meaningful
        assert zc.max_abs_diff(rank0["weights"], untrained) > 1e-2
    print(f"stage {stage} world {world_size} max abs diffs: "
          + ", ".join(f"{k}={v:.2g}" for k, v in diffs.items()))


@pytest.mark.parametrize("stage, world_size", STAGE_WORLD)
def test_degenerate_settings_pin_to_known_optimizers(stage, world_size):
    results = ranks_result(stage, world_size)
    plain = results["plain_adamw"][0]["weights"]
    # rho = 0 is plain DeepSpeed training with the base optimizer, bit for bit
    assert zc.max_abs_diff(results["rho_0"][0]["weights"], plain) == 0.0
    # SAM and FSAM really perturb: both differ from plain AdamW by far more than the tolerance
    assert zc.max_abs_diff(results["sam"][0]["weights"], plain) > 100 * TOLERANCE
    assert zc.max_abs_diff(results["grad_sq"][0]["weights"], plain) > 100 * TOLERANCE
    assert results["sam"][0]["stats"][-1]["mask_density"] == 1.0


def test_mask_interval_reuses_the_mask_between_refreshes():
    results = ranks_result(2, 2)
    thresholds = [s["threshold"] for s in results["interval_3"][0]["stats"]]
    # refreshes at t = 0, 3, 6, 9; the steps in between report the last refresh's threshold
    assert thresholds[0] == thresholds[1] == thresholds[2]
    assert thresholds[3] == thresholds[4] == thresholds[5]
    assert thresholds[0] != thresholds[3]


def test_sam_interval_stats_say_which_steps_perturbed():
    stats = ranks_result(2, 2)["sam_interval_2"][0]["stats"]
    # t % 2 == 0 perturbs; a perturbed step that reuses the mask (t = 2: window 0) still reports the
    # mask's density, not the stats of the plain step before it
    assert [s["perturbed"] for s in stats] == [t % 2 == 0 for t in range(STEPS)]
    assert all(0 < s["mask_density"] < 1 for s in stats if s["perturbed"])
    assert [s["refreshed"] for s in stats if s["perturbed"]] == [True, False, True, True, False]   # t // 3


def test_fsam_memory_per_rank_shrinks_as_one_over_world_size():
    for stage in (2, 3):
        per_world = {w: max(r["state_bytes"] for r in ranks_result(stage, w)["grad_sq"]) for w in (1, 2, 4)}
        print(f"stage {stage} FSAM bytes per rank by world size: {per_world}")
        for w in (2, 4):
            # 1/N of the single-rank bytes, plus at most one partition's padding per tensor
            assert per_world[w] <= per_world[1] / w + 64, (stage, per_world)
            assert per_world[w] >= per_world[1] / w
