"""DeepSpeed paths beyond fp32 ZeRO: every optimizer wrapper FSAM drives (bf16 at stages 0-3,
BF16_Optimizer, FP16_UnfusedOptimizer, fp16 loss scaling, CPU offload), a real transformers model,
the "FSAM" optimizer type in a plain DeepSpeed config, overflow handling, misuse, ties, per-rank
disagreement and rho = 0 with dropout. One 2-rank job runs every check; the tests read its results."""
import functools
import math

import pytest
import torch

import zero_cases as zc
from dist_harness import run_ranks

STEPS = 10
FSAM = {"rho": 0.05, "sparsity": 0.9, "mask_interval": 1}
# bf16 runs use a larger rho, so that FSAM's effect on the weights (vs AdamW) is well above bf16's
# own noise and the tests can tell FSAM from its base optimizer
FSAM_BF16 = {"rho": 0.5, "sparsity": 0.8, "mask_interval": 1}
BF16_CASES = {"bf16_s0": {"stage": 0}, "bf16_s1": {"stage": 1}, "bf16_s2": {"stage": 2},
              "bf16_s3": {"stage": 3}, "bf16_s2_offload": {"stage": 2, "offload": True},
              "bf16_fp32acc_s1": {"stage": 1, "dtype": "bf16_fp32acc"}}
FP16_STAGES = (1, 2, 3)
FP16_STEPS = 8
FP16_OVERFLOWS = {2: 1, 5: 2}      # step -> the FSAM pass whose loss is made infinite


def _loss_scale(engine):
    opt = engine.optimizer
    return float(getattr(opt, "loss_scale", None) or opt.cur_scale)


def _poisoned_loss_fn(plan):
    """loss_fn that makes the loss infinite in one pass of some steps (plan["step"] is set by the
    caller before each step; calls 1..GAS are the first pass)."""
    def loss_fn(engine, mb):
        plan["calls"] += 1
        in_pass = 1 if plan["calls"] <= zc.GAS else 2
        loss = zc.loss_fn(engine, mb)
        return loss * float("inf") if plan["overflows"].get(plan["step"]) == in_pass else loss
    return loss_fn


def allow_fp16_on_this_cpu():
    """DeepSpeed's CPU accelerator admits fp16 only where oneDNN has fp16 kernels (AVX512-FP16);
    torch computes fp16 on any CPU, slowly, which is all these loss-scale tests need."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True
        accelerator.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]


def fp16_trajectories(rank, world_size, stage):
    """FSAM and plain DeepSpeed under fp16 with the same steps overflowing: loss scale after each
    step, skipped steps."""
    import fsam_ds
    allow_fp16_on_this_cpu()
    out = {}
    for name in ("fsam", "plain"):
        model = zc.make_model()
        config = zc.ds_config(stage, world_size, FSAM if name == "fsam" else None, "fp16")
        del config["scheduler"]
        engine = zc.build_engine(model, config, fsam=name == "fsam")
        plan = {"overflows": FP16_OVERFLOWS if name == "fsam" else {s: 1 for s in FP16_OVERFLOWS}}
        loss_fn = _poisoned_loss_fn(plan)
        scales, weights = [_loss_scale(engine)], []
        for step, batch in enumerate(zc.global_batches(FP16_STEPS)):
            plan.update(step=step, calls=0)
            mbs = zc.micro_batches(batch, rank, world_size)
            if name == "fsam":
                fsam_ds.train_step(engine, loss_fn, mbs)
            else:
                for mb in mbs:
                    engine.backward(loss_fn(engine, mb))
                    engine.step()
            scales.append(_loss_scale(engine))
            weights.append(zc.full_weights(engine))
        out[name] = {"scales": scales, "skipped": engine.skipped_steps, "weights": weights,
                     "global_steps": engine.global_steps, "wrapper": type(engine.optimizer).__name__}
        if name == "fsam":
            out[name]["num_steps"] = engine._fsam.num_steps
    return out


class TiedGrads(torch.nn.Module):
    """loss = sum(c * W x) with x = 1: dL/dW[i, j] = c[i] exactly, so each row's 6 scores tie. The
    top row (c = 9, elements 18..23 of 42) straddles the two ranks' halves at ZeRO-2/3."""
    C = torch.tensor([1.0, 2.0, 3.0, 9.0, 4.0, 5.0, 6.0])

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(6, 7, bias=False)

    def forward(self, x):
        return (self.w(x) * self.C.to(x.dtype)).sum(1).mean()


def tied_mask_positions(rank, world_size, stage):
    """The kept positions of each rank's slots after one FSAM step with tied scores."""
    import fsam_ds
    torch.manual_seed(0)
    model = TiedGrads()
    config = zc.ds_config(stage, world_size, {"rho": 0.05, "sparsity": 0.9, "mask_interval": 1,
                                              "always_perturb": []})
    if stage == 3:
        config["zero_optimization"]["sub_group_size"] = 10 ** 6
    engine, *_ = fsam_ds.initialize(model=model, config=config)
    x = torch.ones(2, 6)   # every rank, every micro-batch the same: exact averages
    fsam_ds.train_step(engine, lambda eng, mb: eng(mb), [x] * zc.GAS)
    client = engine._fsam
    out = []
    for key, tensor, layout in client.view.slots:
        mask = client.core.masks[key]
        out.append({"numel": layout.numel, "ranked": layout.ranked,
                    "positions": mask.positions.tolist(), "dense": list(mask.dense)})
    return {"slots": out, "k": client.last_stats["num_kept"]}


def shared_master_checks(rank, world_size):
    """ZeRO-3 fp32 with and without the master/partition sharing: aliasing, weights after FSAM
    steps, a checkpoint save/load and the steps after it."""
    import fsam_ds
    shared = {}
    for share in (True, False):
        model = zc.make_model()
        config = zc.ds_config(3, world_size, FSAM)   # sub_group_size 100: several sub-groups
        engine, *_ = fsam_ds.initialize(model=model, config=config, model_parameters=zc.param_groups(model),
                                        share_fp32_master=share)
        opt = engine.optimizer
        aliased = lambda: [m.data_ptr() == lp.data_ptr() for m, lp in zip(
            opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat)]
        record = {"aliased_before": aliased(), "sub_groups": len(opt.fp16_groups)}
        for batch in zc.global_batches(4):
            fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batch, rank, world_size))
        record.update(weights=zc.full_weights(engine), aliased_after=aliased())
        if share:
            import tempfile
            ckpt = tempfile.mkdtemp(prefix="fsam_shared_") if rank == 0 else None
            holder = [ckpt]
            torch.distributed.broadcast_object_list(holder, src=0)
            engine.save_checkpoint(holder[0], tag="t")
            model = zc.make_model()
            loaded, *_ = fsam_ds.initialize(model=model, config=config, model_parameters=zc.param_groups(model))
            loaded.load_checkpoint(holder[0], tag="t")
            opt = loaded.optimizer
            record.update(loaded_weights=zc.full_weights(loaded), aliased_loaded=aliased())
            for batch in zc.global_batches(2):
                fsam_ds.train_step(loaded, zc.loss_fn, zc.micro_batches(batch, rank, world_size))
                fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batch, rank, world_size))
            record.update(resumed=zc.full_weights(loaded), continued=zc.full_weights(engine))
            torch.distributed.barrier()
            if rank == 0:
                import shutil
                shutil.rmtree(holder[0], ignore_errors=True)
        shared[share] = record
    return shared


def rank_checks(rank, world_size, only=None):
    import deepspeed
    import fsam_ds
    allow_fp16_on_this_cpu()
    out = {}
    run = (lambda section: only is None or section in only)
    for key, case in {} if not run("fp32") else {
        "fp32_s2": {"stage": 2}, "offload_s2": {"stage": 2, "offload": True},
        "fp32_s2_clip": {"stage": 2, "clip": 0.01, "steps": 1},
        "offload_s3": {"stage": 3, "offload": True},
        "bert_s2": {"stage": 2, "model": "bert"}, "bert_s3": {"stage": 3, "model": "bert"},
    }.items():
        out[key] = zc.run_fsam_case(rank, world_size, {"steps": STEPS, **case, "fsam": FSAM})
    for key, case in BF16_CASES.items() if run("bf16") else ():
        case = {"dtype": "bf16", **case, "steps": STEPS}
        out[key] = zc.run_fsam_case(rank, world_size, {**case, "fsam": FSAM_BF16})
        out[key + "_adamw"] = zc.run_fsam_case(rank, world_size, {**case, "fsam": None})
    # exp_avg_sq at stage 0 bf16: FP16_UnfusedOptimizer's set-up step leaves Adam state of zeros
    if not run("rest"):
        out["fp16"] = {stage: fp16_trajectories(rank, world_size, stage) for stage in FP16_STAGES} \
            if run("fp16") else {}
        return out
    out["exp_avg_sq_s0_bf16"] = zc.run_fsam_case(rank, world_size, {
        "stage": 0, "dtype": "bf16", "steps": 2,
        "fsam": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 100, "fisher": "exp_avg_sq"}})
    out["fp16"] = {stage: fp16_trajectories(rank, world_size, stage) for stage in FP16_STAGES}
    out["ties"] = {stage: tied_mask_positions(rank, world_size, stage) for stage in (0, 2, 3)}

    # {"optimizer": {"type": "FSAM", ...}} in a plain deepspeed.initialize call
    model = zc.make_model()
    config = zc.ds_config(2, world_size)
    config["optimizer"] = {"type": "FSAM", "params": {"base_optimizer": "AdamW", **FSAM, **zc.ADAMW}}
    config["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=zc.param_groups(model))
    for batch in zc.global_batches(STEPS):
        fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batch, rank, world_size))
    out["ds_type"] = {"weights": zc.full_weights(engine), "global_steps": engine.global_steps}

    # misuse: the "FSAM" type driven by plain engine.backward()/engine.step(), as Hugging Face
    # Trainer and Accelerate do; under fp16 so that a loss-scale update would show
    errors, misuse = {}, {}
    batches = zc.global_batches(3)
    for run in ("misused", "clean"):
        model = zc.make_model()
        config = zc.ds_config(2, world_size, dtype="fp16")
        config["optimizer"] = {"type": "FSAM", "params": {"base_optimizer": "AdamW", **FSAM, **zc.ADAMW}}
        config["zero_allow_untested_optimizer"] = True
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=zc.param_groups(model))
        if run == "misused":
            before = {"scale": _loss_scale(engine), "iter": engine.optimizer.loss_scaler.cur_iter,
                      "groups": len(engine.optimizer.optimizer.param_groups),
                      "weights": zc.full_weights(engine), "global_steps": engine.global_steps}
            try:
                for mb in zc.micro_batches(batches[0], rank, world_size):
                    engine.backward(zc.loss_fn(engine, mb))
                    engine.step()
            except RuntimeError as err:
                errors["engine_step"] = str(err)
            after = {"scale": _loss_scale(engine), "iter": engine.optimizer.loss_scaler.cur_iter,
                     "groups": len(engine.optimizer.optimizer.param_groups),
                     "weights": zc.full_weights(engine), "global_steps": engine.global_steps}
            misuse = {"before": before, "after": after}
            try:
                fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batches[0], rank, world_size)[:1])
            except ValueError as err:
                errors["micro_batches"] = str(err)
        for batch in batches:
            fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batch, rank, world_size))
        misuse[run] = zc.full_weights(engine)
    out["errors"], out["misuse"] = errors, misuse

    # one rank loses its masks (as after a load that did not fit there): every rank refreshes
    model = zc.make_model()
    engine, *_ = fsam_ds.initialize(model=model, config=zc.ds_config(2, world_size, {
        "rho": 0.05, "sparsity": 0.9, "mask_interval": 100}), model_parameters=zc.param_groups(model))
    refreshed = []
    for step, batch in enumerate(zc.global_batches(3)):
        if step == 2 and rank == 1:
            engine._fsam.core.masks = {}
        fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batch, rank, world_size))
        refreshed.append(engine._fsam.last_stats["refreshed"])
    out["unfit_masks"] = {"refreshed": refreshed, "kept": engine._fsam.local_kept_ranked(),
                          "num_ranked": engine._fsam.last_stats["num_ranked"]}

    # rho = 0 with dropout is the base optimizer bit for bit: one pass, the same random numbers
    dropout = {}
    for name in ("rho0", "plain"):
        torch.manual_seed(0)
        model = zc.make_model("bert_dropout")
        config = zc.ds_config(2, world_size, {"rho": 0.0} if name == "rho0" else None)
        calls = [0]

        def counted(engine, mb):
            calls[0] += 1
            return zc.loss_fn(engine, mb)
        engine = zc.build_engine(model, config, fsam=name == "rho0")
        torch.manual_seed(1 + rank)
        for batch in zc.global_batches(4):
            mbs = zc.micro_batches(batch, rank, world_size)
            if name == "rho0":
                fsam_ds.train_step(engine, counted, mbs)
            else:
                for mb in mbs:
                    engine.backward(counted(engine, mb))
                    engine.step()
        dropout[name] = {"weights": zc.full_weights(engine), "calls": calls[0]}
    out["dropout"] = dropout

    # the lean first pass: at ZeRO-2/3 without offload the wrapper's step runs once per FSAM step
    # (the second pass's); ZeRO-3 hands FSAM gradients derived when read, none held. Offload keeps
    # the wrapper's step in the first pass too.
    lean = {}
    for key, stage, offload in (("z2", 2, False), ("z3", 3, False), ("z2_offload", 2, True)):
        model = zc.make_model()
        engine, *_ = fsam_ds.initialize(model=model, config=zc.ds_config(stage, world_size, FSAM, offload=offload),
                                        model_parameters=zc.param_groups(model))
        opt, record = engine.optimizer, {"wrapper_steps": 0, "held": []}
        wrapper_step, perturb = opt.step, engine._fsam.core.perturb

        def counted_step(*a, _step=wrapper_step, _rec=record, **k):
            _rec["wrapper_steps"] += 1
            return _step(*a, **k)

        def recorded_perturb(slots, *a, _perturb=perturb, _rec=record, **k):
            _rec["held"].append([not callable(s.grad) for s in slots])
            return _perturb(slots, *a, **k)
        opt.step, engine._fsam.core.perturb = counted_step, recorded_perturb
        for batch in zc.global_batches(2):
            fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batch, rank, world_size))
        lean[key] = record
    out["lean"] = lean

    out["shared_master"] = shared_master_checks(rank, world_size)

    # non-finite gradients: in the first pass of step 1 and the second pass of step 2. ZeRO finds
    # the non-finite norm and skips; FSAM must skip the whole step and leave w exactly as it was.
    model = zc.make_model()
    config = zc.ds_config(2, world_size, FSAM)
    del config["scheduler"]   # its warm-up starts at lr 0: every step here must move the weights
    engine, *_ = fsam_ds.initialize(model=model, config=config, model_parameters=zc.param_groups(model))
    plan = {"overflows": {1: 1, 2: 2}}
    poisoned = _poisoned_loss_fn(plan)
    snapshots = []
    for step, batch in enumerate(zc.global_batches(5)):
        plan.update(step=step, calls=0)
        fsam_ds.train_step(engine, poisoned, zc.micro_batches(batch, rank, world_size))
        snapshots.append(zc.full_weights(engine))
    out["overflow"] = {"snapshots": snapshots, "num_steps": engine._fsam.num_steps,
                       "global_steps": engine.global_steps, "skipped": engine.skipped_steps,
                       "lr": engine.get_lr()[0]}
    return out


@functools.lru_cache(maxsize=None)
def results():
    return run_ranks(rank_checks, 2, deepspeed=True)


def reference(model="padded", fsam=FSAM):
    return zc.reference_run({"steps": STEPS, "fsam": fsam, "model": model})


@pytest.mark.parametrize("key", list(BF16_CASES))
def test_bf16_wrappers_follow_fp32_fsam_not_adamw(key):
    """bf16 at stages 0-3, with offload, and BF16_Optimizer (stage 1, fp32 gradient accumulation):
    nearer the fp32 FSAM reference than bf16 AdamW is by a wide margin, so a bf16 path that
    silently dropped the perturbation fails."""
    res, adamw = results()[0][key], results()[0][key + "_adamw"]
    ref_weights, _ = reference(fsam=FSAM_BF16)
    to_ref = zc.max_abs_diff(res["weights"], ref_weights)
    adamw_to_ref = zc.max_abs_diff(adamw["weights"], ref_weights)
    print(f"{key} ({res['wrapper']}): bf16 FSAM to fp32 FSAM {to_ref:.3g}, bf16 AdamW to fp32 FSAM {adamw_to_ref:.3g}")
    assert to_ref < 0.25 * adamw_to_ref
    assert all(math.isfinite(v) for v in res["losses"])


def test_bf16_cases_cover_every_wrapper():
    wrappers = {results()[0][key]["wrapper"] for key in BF16_CASES}
    assert {"FP16_UnfusedOptimizer", "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3",
            "BF16_Optimizer"} <= wrappers


def test_exp_avg_sq_waits_for_fsams_own_base_step():
    """At stage 0 bf16 the wrapper's set-up step leaves Adam state with exp_avg_sq == 0; the first
    mask must come from g*g (a zero-score mask would be the first k elements in index order)."""
    stats = results()[0]["exp_avg_sq_s0_bf16"]["stats"]
    assert stats[0]["fisher_source"] == "grad_sq" and stats[0]["threshold"] > 0


@pytest.mark.parametrize("stage", FP16_STAGES)
def test_fp16_one_loss_scale_update_per_fsam_step(stage):
    """Overflows in FSAM's first pass (step 2) and second pass (step 5) move the loss scale and
    skipped_steps exactly as plain DeepSpeed with those steps overflowing."""
    res = results()[0]["fp16"][stage]
    fsam, plain = res["fsam"], res["plain"]
    print(f"stage {stage} {fsam['wrapper']}: FSAM scales {fsam['scales']}, plain {plain['scales']}")
    assert fsam["scales"] == plain["scales"]
    assert fsam["skipped"] == plain["skipped"] == 2 and fsam["global_steps"] == FP16_STEPS
    assert fsam["num_steps"] == FP16_STEPS - 2
    steps = list(zip(fsam["scales"], fsam["scales"][1:]))
    assert any(b > a for a, b in steps) and any(b < a for a, b in steps)   # moved up and down
    w = fsam["weights"]
    assert zc.max_abs_diff(w[2], w[1]) == 0.0 and zc.max_abs_diff(w[5], w[4]) == 0.0
    assert zc.max_abs_diff(w[3], w[2]) > 0.0


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_tied_scores_keep_exactly_the_first_k_in_global_order(stage):
    """42 scores in rows of 6 equal values; k = 5 cuts the top row (elements 18..23), which the
    two ranks share at ZeRO-2/3: exactly elements 18..22 are kept, in global index order."""
    per_rank = [r["ties"][stage] for r in results()]
    assert per_rank[0]["k"] == 5
    kept = set()
    ranks = per_rank[:1] if stage == 0 else per_rank
    for rank, res in enumerate(ranks):
        (slot,) = res["slots"]
        offset = rank * slot["numel"]   # each rank holds one equal-sized part of the flat weight
        kept |= {offset + p for p in slot["positions"]}
        assert slot["dense"] == []
    assert kept == {18, 19, 20, 21, 22}


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


def test_plain_engine_step_on_an_fsam_engine_fails_before_changing_anything():
    errors, misuse = results()[0]["errors"], results()[0]["misuse"]
    assert "gradient_accumulation_steps is 2" in errors["micro_batches"]
    assert "fsam_ds.train_step" in errors["engine_step"] and "silently" in errors["engine_step"]
    before, after = misuse["before"], misuse["after"]
    assert (before["scale"], before["iter"], before["groups"], before["global_steps"]) == \
        (after["scale"], after["iter"], after["groups"], after["global_steps"])
    assert zc.max_abs_diff(before["weights"], after["weights"]) == 0.0
    # and the engine was left consistent: the FSAM steps after the error equal a clean run's
    assert zc.max_abs_diff(misuse["misused"], misuse["clean"]) == 0.0


def test_one_rank_with_unfit_masks_makes_every_rank_refresh():
    per_rank = [r["unfit_masks"] for r in results()]
    for res in per_rank:
        assert res["refreshed"] == [True, False, True]
    assert sum(r["kept"] for r in per_rank) == -(-per_rank[0]["num_ranked"] // 10)


def test_rho_zero_with_dropout_is_the_base_optimizer_in_one_pass():
    dropout = results()[0]["dropout"]
    assert dropout["rho0"]["calls"] == dropout["plain"]["calls"] == 4 * zc.GAS
    assert zc.max_abs_diff(dropout["rho0"]["weights"], dropout["plain"]["weights"]) == 0.0


def test_reported_signals_are_equal_on_every_rank_and_the_norm_is_unclipped():
    r0, r1 = (r["fp32_s2"]["stats"] for r in results())
    for a, b in zip(r0, r1):
        for key in ("loss", "perturbed_loss", "sharpness", "grad_norm", "threshold"):
            assert a[key] == b[key], key
    # the first step's norm before clipping (here clipping at 0.01), as a single process computes
    # it on the global batch; and the mean first-pass loss over the whole global batch
    model = zc.make_model()
    tokens, labels = zc.global_batches(1)[0]
    loss = torch.nn.functional.cross_entropy(zc.logits_of(model, tokens), labels)
    loss.backward()
    norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    clipped = results()[0]["fp32_s2_clip"]["stats"][0]
    assert norm > 0.01
    assert abs(clipped["grad_norm"] - norm) < 1e-5 * norm
    assert abs(clipped["loss"] - loss.item()) < 1e-6


def test_lean_first_pass_skips_the_wrappers_step_and_holds_no_zero3_gradient():
    lean = results()[0]["lean"]
    assert lean["z2"]["wrapper_steps"] == 2 and lean["z3"]["wrapper_steps"] == 2
    assert lean["z2_offload"]["wrapper_steps"] == 4          # no lean path with offload
    # every ZeRO-3 sub-group (several: sub_group_size 100) derived when read
    assert len(lean["z3"]["held"]) == 2 and all(len(h) > 1 and not any(h) for h in lean["z3"]["held"])
    assert all(h and all(h) for h in lean["z2_offload"]["held"])


def test_nonfinite_gradients_in_either_pass_skip_the_step_and_leave_the_weights():
    res = results()[0]["overflow"]
    snaps = res["snapshots"]
    assert zc.max_abs_diff(snaps[1], snaps[0]) == 0.0      # first-pass inf at step 1: skipped
    assert zc.max_abs_diff(snaps[2], snaps[1]) == 0.0      # second-pass inf at step 2: e undone
    assert zc.max_abs_diff(snaps[0], zc.full_weights_of(zc.make_model())) > 0.0
    assert zc.max_abs_diff(snaps[3], snaps[2]) > 0.0       # and training goes on
    assert res["skipped"] == 2 and res["global_steps"] == 5
    assert res["num_steps"] == 3                           # FSAM counts only steps it took


def test_zero3_fp32_master_shares_the_parameter_partition_and_trains_bit_identically():
    """fsam_ds.initialize points each ZeRO-3 fp32 master partition at the parameter partition's
    storage (DeepSpeed keeps two equal fp32 copies: 4 B per parameter / world size); FSAM steps,
    a checkpoint save/load and the steps after it are bit-identical to the unshared run."""
    for rank, res in enumerate(results()):
        shared, unshared = res["shared_master"][True], res["shared_master"][False]
        assert shared["sub_groups"] > 1
        assert all(shared["aliased_before"]) and all(shared["aliased_after"]), shared
        assert not any(unshared["aliased_before"]), "DeepSpeed now aliases by itself: drop the sharing"
        assert zc.max_abs_diff(shared["weights"], unshared["weights"]) == 0.0
        assert all(shared["aliased_loaded"])
        assert zc.max_abs_diff(shared["loaded_weights"], shared["weights"]) == 0.0
        assert zc.max_abs_diff(shared["resumed"], shared["continued"]) == 0.0
        assert zc.max_abs_diff(shared["continued"], shared["weights"]) > 0.0
