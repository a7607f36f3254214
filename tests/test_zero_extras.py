"""DeepSpeed paths beyond fp32 ZeRO: bf16, CPU offload, a real transformers model, the "FSAM"
optimizer type in a plain DeepSpeed config, overflow handling, and misuse. One 2-rank job runs
every check; the test functions read its results."""
import functools

import pytest
import torch

import zero_cases as zc
from dist_harness import run_ranks

STEPS = 10
FSAM = {"rho": 0.05, "sparsity": 0.9, "mask_interval": 1}
BF16_TOLERANCE = 3e-2  # bf16 forward/backward flips some AdamW update signs (~lr each); fp32 agrees to 1e-7


def _weights_now(engine):
    return zc.full_weights(engine)


def rank_checks(rank, world_size):
    import deepspeed
    import fsam_ds
    out = {}
    # bf16 at stages 2 and 3, fp32 offload at stages 2 and 3, tiny BERT at stages 2 and 3
    for key, case in {
        "bf16_s2": {"stage": 2, "dtype": "bf16"}, "bf16_s3": {"stage": 3, "dtype": "bf16"},
        "fp32_s2": {"stage": 2}, "offload_s2": {"stage": 2, "offload": True},
        "offload_s3": {"stage": 3, "offload": True},
        "bert_s2": {"stage": 2, "model": "bert"}, "bert_s3": {"stage": 3, "model": "bert"},
    }.items():
        out[key] = zc.run_fsam_case(rank, world_size, {**case, "steps": STEPS, "fsam": FSAM})

    # {"optimizer": {"type": "FSAM", ...}} in a plain deepspeed.initialize call
    model = zc.make_model()
    config = zc.ds_config(2, world_size)
    config["optimizer"] = {"type": "FSAM", "params": {"base_optimizer": "AdamW", **FSAM, **zc.ADAMW}}
    config["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=zc.param_groups(model))
    for batch in zc.global_batches(STEPS):
        fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batch, rank, world_size))
    out["ds_type"] = {"weights": zc.full_weights(engine), "global_steps": engine.global_steps}

    # misuse: wrong micro-batch count; engine.step() outside train_step
    errors = {}
    batch = zc.micro_batches(zc.global_batches(1)[0], rank, world_size)
    try:
        fsam_ds.train_step(engine, zc.loss_fn, batch[:1])
    except ValueError as err:
        errors["micro_batches"] = str(err)
    try:
        for mb in batch:
            engine.backward(zc.loss_fn(engine, mb))
            engine.step()
    except RuntimeError as err:
        errors["engine_step"] = str(err)
    engine.optimizer.zero_grad()
    out["errors"] = errors

    # non-finite gradients: in the first pass of step 1 and the second pass of step 2. ZeRO finds
    # the non-finite norm and skips; FSAM must skip the whole step and leave w exactly as it was.
    model = zc.make_model()
    config = zc.ds_config(2, world_size, FSAM)
    del config["scheduler"]   # its warm-up starts at lr 0: every step here must move the weights
    engine, *_ = fsam_ds.initialize(model=model, config=config, model_parameters=zc.param_groups(model))
    poison = {}   # step -> pass to poison; the loss_fn sees calls 1..GAS (first pass), then the rest

    def poisoned(engine, mb):
        poison["calls"] += 1
        in_pass = 1 if poison["calls"] <= zc.GAS else 2
        loss = zc.loss_fn(engine, mb)
        return loss * float("inf") if poison.get(poison["step"]) == in_pass else loss

    snapshots = []
    for step, batch in enumerate(zc.global_batches(5)):
        poison.update({"step": step, "calls": 0, 1: 1, 2: 2})
        fsam_ds.train_step(engine, poisoned, zc.micro_batches(batch, rank, world_size))
        snapshots.append(zc.full_weights(engine))
    out["overflow"] = {"snapshots": snapshots, "num_steps": engine._fsam.num_steps,
                       "global_steps": engine.global_steps, "skipped": engine.skipped_steps,
                       "lr": engine.get_lr()[0]}
    return out


@functools.lru_cache(maxsize=None)
def results():
    return run_ranks(rank_checks, 2, deepspeed=True)


def reference(model="padded"):
    return zc.reference_run({"steps": STEPS, "fsam": FSAM, "model": model})


@pytest.mark.parametrize("key", ["bf16_s2", "bf16_s3"])
def test_bf16_runs_learns_and_stays_near_fp32(key):
    res = results()[0][key]
    ref_weights, ref_losses = reference()
    diff = zc.max_abs_diff(res["weights"], ref_weights)
    print(f"{key}: max abs diff to the fp32 reference {diff:.3g}")
    assert diff < BF16_TOLERANCE
    assert all(torch.isfinite(torch.tensor(res["losses"])))
    # the loss falls: the mean of the last 3 steps is below the first step's
    assert sum(res["losses"][-3:]) / 3 < res["losses"][0]


@pytest.mark.parametrize("key", ["offload_s2", "offload_s3"])
def test_cpu_offload_matches_the_non_offloaded_run(key):
    res = results()[0]
    diff = zc.max_abs_diff(res[key]["weights"], res["fp32_s2"]["weights"])
    print(f"{key}: max abs diff to non-offloaded ZeRO-2 {diff:.3g}")
    assert diff < 1e-6
    assert zc.max_abs_diff(res[key]["weights"], reference()[0]) < 1e-5


@pytest.mark.parametrize("key", ["bert_s2", "bert_s3"])
def test_tiny_bert_matches_reference(key):
    res = results()[0][key]
    diff = zc.max_abs_diff(res["weights"], reference("bert")[0])
    print(f"{key}: max abs diff {diff:.3g}")
    assert diff < 1e-5
    assert res["kept"] + results()[1][key]["kept"] == -(-res["num_ranked"] // 10)


def test_fsam_type_in_a_plain_deepspeed_config():
    res = results()[0]["ds_type"]
    assert res["global_steps"] == STEPS
    assert zc.max_abs_diff(res["weights"], reference()[0]) < 1e-5


def test_misuse_gets_clear_errors():
    errors = results()[0]["errors"]
    assert "gradient_accumulation_steps is 2" in errors["micro_batches"]
    assert "fsam_ds.train_step" in errors["engine_step"]


def test_nonfinite_gradients_in_either_pass_skip_the_step_and_leave_the_weights():
    res = results()[0]["overflow"]
    snaps = res["snapshots"]
    assert zc.max_abs_diff(snaps[1], snaps[0]) == 0.0      # first-pass inf at step 1: skipped
    assert zc.max_abs_diff(snaps[2], snaps[1]) == 0.0      # second-pass inf at step 2: e undone
    assert zc.max_abs_diff(snaps[0], zc.full_weights_of(zc.make_model())) > 0.0
    assert zc.max_abs_diff(snaps[3], snaps[2]) > 0.0       # and training goes on
    assert res["skipped"] == 2 and res["global_steps"] == 5
    assert res["num_steps"] == 3                           # FSAM counts only steps it took
