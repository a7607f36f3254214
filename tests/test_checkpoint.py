"""FSAM state through DeepSpeed's own save_checkpoint/load_checkpoint: resuming mid-run, between two
mask refreshes, gives weights bit-identical to an uninterrupted run (fp32, CPU) at ZeRO 1, 2, 3."""
import functools

import pytest
import torch

import zero_cases as zc
from dist_harness import run_ranks

FSAM = {"rho": 0.05, "sparsity": 0.9, "mask_interval": 4}
SAM = {"rho": 0.05, "sparsity": 0.0, "mask_interval": 4}
STEPS, SAVE_AT = 7, 3          # refreshes at t = 0 and 4: the checkpoint falls between them
# (stage, settings): ZeRO 0-3 with FSAM, and SAM (whose mask is all dense ranges) at stages 0 and 2
RESUME_CASES = [(0, "fsam"), (1, "fsam"), (2, "fsam"), (3, "fsam"), (0, "sam"), (2, "sam")]


def _engine(stage, world_size, settings="fsam"):
    import fsam_ds
    model = zc.make_model()
    fsam = FSAM if settings == "fsam" else SAM
    engine, *_ = fsam_ds.initialize(model=model, config=zc.ds_config(stage, world_size, fsam),
                                    model_parameters=zc.param_groups(model))
    return engine


def _train(engine, rank, world_size, steps):
    import fsam_ds
    batches = zc.global_batches(STEPS)
    for step in steps:
        fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batches[step], rank, world_size))


def _mask_snapshot(engine):
    """The masks as the optimizer state carries them (through torch.save / torch.load)."""
    return engine._fsam.core.state_dict()["masks"]


def _masks_equal(a, b):
    return a.keys() == b.keys() and len(a) > 0 and all(
        a[k]["dense"] == b[k]["dense"] and torch.equal(a[k]["positions"], b[k]["positions"]) for k in a)


def resume_on_ranks(rank, world_size, cases, ckpt_root):
    out = {}
    for stage, settings in cases:
        ckpt = f"{ckpt_root}/stage{stage}_{settings}"
        straight = _engine(stage, world_size, settings)
        _train(straight, rank, world_size, range(SAVE_AT))
        masks_at_save = _mask_snapshot(straight)
        straight.save_checkpoint(ckpt, tag="mid")
        _train(straight, rank, world_size, range(SAVE_AT, STEPS))
        expected = zc.full_weights(straight)

        resumed = _engine(stage, world_size, settings)
        load_path, _ = resumed.load_checkpoint(ckpt)
        fsam = resumed._fsam
        restored = {"num_steps": fsam.num_steps, "global_steps": resumed.global_steps,
                    "masks_equal": _masks_equal(masks_at_save, _mask_snapshot(resumed)),
                    "loaded": load_path is not None}
        _train(resumed, rank, world_size, range(SAVE_AT, SAVE_AT + 1))
        restored["reused_mask"] = not fsam.last_stats["refreshed"]   # t = 3: no refresh due
        _train(resumed, rank, world_size, range(SAVE_AT + 1, STEPS))
        out[(stage, settings)] = {"diff": zc.max_abs_diff(zc.full_weights(resumed), expected),
                      "moved": zc.max_abs_diff(expected, {n: p.detach() for n, p in zc.make_model().named_parameters()}),
                      **restored}
    return out


@functools.lru_cache(maxsize=None)
def results(tmp_root):
    return run_ranks(resume_on_ranks, 2, RESUME_CASES, tmp_root, deepspeed=True)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    return results(str(tmp_path_factory.mktemp("ckpt")))


@pytest.mark.parametrize("stage, settings", RESUME_CASES)
def test_resume_between_mask_refreshes_is_bit_identical(resumed, stage, settings):
    for rank, per_rank in enumerate(resumed):
        res = per_rank[(stage, settings)]
        assert res["loaded"], f"rank {rank}: load_checkpoint found nothing"
        assert res["num_steps"] == SAVE_AT and res["global_steps"] == SAVE_AT
        assert res["masks_equal"], f"rank {rank}: the mask was not restored"
        assert res["reused_mask"], f"rank {rank}: the restored mask was not used"
        assert res["diff"] == 0.0, f"stage {stage} rank {rank}: resumed run differs by {res['diff']:.3g}"
        assert res["moved"] > 1e-2


# ---- another world size: DeepSpeed's universal checkpoint ------------------------------------
def _full_optimizer_state(engine):
    from deepspeed.utils import safe_get_full_optimizer_state
    return {(n, key): safe_get_full_optimizer_state(p, key).clone()
            for n, p in engine.module.named_parameters() for key in ("exp_avg", "exp_avg_sq")}


def save_on_ranks(rank, world_size, stages, root):
    import fsam_ds
    out = {}
    for stage in stages:
        engine = _engine(stage, world_size)
        _train(engine, rank, world_size, range(SAVE_AT))
        fsam_ds.checkpoint.save_checkpoint(engine, f"{root}/stage{stage}", tag="mid")
        out[stage] = {"weights": zc.full_weights(engine), "optim": _full_optimizer_state(engine)}
    return out


def load_universal_on_ranks(rank, world_size, stages, root):
    import fsam_ds
    out = {}
    for stage in stages:
        model = zc.make_model()
        config = zc.ds_config(stage, world_size, FSAM)
        config["checkpoint"] = {"load_universal": True}
        engine, *_ = fsam_ds.initialize(model=model, config=config, model_parameters=zc.param_groups(model))
        fsam_ds.checkpoint.load_checkpoint(engine, f"{root}/stage{stage}", tag="mid_universal")
        core = engine._fsam.core
        loaded = {"weights": zc.full_weights(engine), "optim": _full_optimizer_state(engine),
                  "num_steps": core.num_steps, "masks_valid": bool(core.masks or core._loaded_masks)}
        _train(engine, rank, world_size, range(SAVE_AT, STEPS))     # training goes on
        fsam = engine._fsam
        kept = fsam.local_kept_ranked()
        out[stage] = {**loaded, "kept": kept, "num_ranked": fsam.last_stats["num_ranked"],
                      "num_steps_after": fsam.num_steps}
    return out


def _convert_to_universal(folder):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", f"{folder}/mid", "--output_folder", f"{folder}/mid_universal"],
                          capture_output=True, text=True, env=dict(__import__("os").environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("saved_on, resumed_on, stages", [(4, 2, (1, 2, 3)), (2, 4, (2,))])
def test_resume_on_another_world_size_through_universal_checkpoints(tmp_path, saved_on, resumed_on, stages):
    saved = run_ranks(save_on_ranks, saved_on, stages, str(tmp_path), deepspeed=True)[0]
    for stage in stages:
        _convert_to_universal(f"{tmp_path}/stage{stage}")
    loaded = run_ranks(load_universal_on_ranks, resumed_on, stages, str(tmp_path), deepspeed=True)
    for stage in stages:
        res = loaded[0][stage]
        assert zc.max_abs_diff(res["weights"], saved[stage]["weights"]) == 0.0
        for key, value in saved[stage]["optim"].items():
            assert torch.equal(res["optim"][key], value), f"stage {stage}: optimizer state {key} differs"
        assert res["num_steps"] == SAVE_AT and not res["masks_valid"]   # mask recomputed next step
        assert res["num_steps_after"] == STEPS
        kept = sum(r[stage]["kept"] for r in loaded)
        assert kept == -(-res["num_ranked"] // 10)
