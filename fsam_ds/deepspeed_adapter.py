"""The only module that reads DeepSpeed's private attributes.

It answers three questions for `fsam_ds.train_step`, for whichever optimizer wrapper DeepSpeed put
around our client optimizer:
  1. which fp32 tensors does the client see on this rank, and which of their elements belong to
     which parameter (or are partition padding)?  -> `ShardLayout`s keyed by id(tensor)
  2. how do modified fp32 master weights reach the model?  -> `publish_master_weights()`
  3. how does a direct `engine.optimizer.step()` (FSAM's first pass) leave the engine consistent?
     -> `first_pass_optimizer_step()`

Where the client optimizer lives (DeepSpeed 0.19.8):
  stage 0 fp32          the model's own parameters; no wrapper
  stage 0 bf16/fp16     FP16_UnfusedOptimizer: per-parameter fp32 copies (`fp32_groups`)
  stage 1/2             DeepSpeedZeroOptimizer: one flat fp32 partition per param group, the client
                        is stepped once per group with `param_groups` swapped to that group
  stage 1 bf16+fp32acc  BF16_Optimizer: flat fp32 partitions, one client step for all groups
  stage 3               DeepSpeedZeroOptimizer_Stage3: one flat fp32 partition per sub-group,
                        the client is stepped once per sub-group
Everything is checked at start-up (`attach`), so a DeepSpeed upgrade fails loudly there.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fsam_ds.shard_layout import ShardLayout

TESTED_DEEPSPEED_VERSIONS = ("0.19.8",)


class UnsupportedDeepSpeedSetup(ValueError):
    """A DeepSpeed configuration or version fsam_ds cannot drive; the message names the fix."""


def _require(obj, names, what):
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        import deepspeed
        raise UnsupportedDeepSpeedSetup(
            f"{what} lacks {missing}: fsam_ds relies on DeepSpeed internals tested with DeepSpeed "
            f"{', '.join(TESTED_DEEPSPEED_VERSIONS)}, and this is DeepSpeed {deepspeed.__version__}. "
            f"Install a tested version (pip install deepspeed=={TESTED_DEEPSPEED_VERSIONS[-1]}).")


@dataclass
class EngineView:
    """What this rank owns, and how to push modified fp32 masters to the model."""
    kind: str                  # "fp32", "unfused", "zero12", "bf16", "zero3"
    engine: object
    layouts: dict              # id(fp32 tensor the client sees) -> ShardLayout
    process_group: object      # group the shards are spread over; None when replicated
    optimizer_state_linked: bool = False

    @property
    def grads_outlive_step(self) -> bool:
        """Whether the gradient tensors the wrapper hands the client stay intact until the next
        backward. BF16_Optimizer zeroes its flat gradient buffer at the end of its step."""
        return self.kind != "bf16"

    def publish_master_weights(self) -> None:
        """Make the next forward use the current fp32 masters (perturbed or restored)."""
        opt = self.engine.optimizer
        if self.kind == "fp32":
            return  # the client steps the model's parameters themselves
        if self.kind == "unfused":
            with torch.no_grad():
                for fp32_group, lp_group in zip(opt.fp32_groups, opt.fp16_groups):
                    for fp32, lp in zip(fp32_group, lp_group):
                        lp.data.copy_(fp32.data)
        elif self.kind in ("zero12", "bf16"):
            opt.update_lp_params()   # fp32 -> bit16 copy of our partition, then all-gather
        elif self.kind == "zero3":
            # The order DeepSpeed's own step and checkpoint load use. The first call releases the
            # persistent parameters that the previous step gathered; without it the next forward
            # silently keeps the old full copies and FSAM degrades to plain training.
            opt._partition_all_parameters()
            for sub_group in range(len(opt.fp16_groups)):
                opt._reassign_or_swap_out_partitioned_parameters(sub_group)
            if len(opt.persistent_parameters) > 0:
                opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
            opt.invalidate_secondary_tensor()

    def first_pass_optimizer_step(self) -> bool:
        """Run the wrapper's step (it unscales and clips the gradients and hands the client its
        shards, which FSAM captures), then do the engine bookkeeping of a step except counting it:
        zero the gradients, advance micro_steps so the gradient-accumulation boundaries of the
        second pass fall where they would for a plain step. Returns True on overflow."""
        engine, opt = self.engine, self.engine.optimizer
        opt.step()
        overflow = bool(getattr(opt, "overflow", False))
        if self.kind == "fp32":
            engine.zero_grad()
        else:
            opt.zero_grad()
        if self.kind in ("unfused",):
            engine.zero_grad()  # the unfused wrapper clears only its fp32 copies' gradients
        engine.micro_steps += 1
        return overflow

    def link_optimizer_state(self) -> None:
        """ZeRO-1/2 and BF16_Optimizer link each parameter to its slice of the optimizer state
        (used by safe_get_full_optimizer_state and checkpoint tools) lazily, after the client's
        first step() - under FSAM that is the first pass's capture, before the base optimizer has
        any state - and never again. Link once more after the first base step."""
        opt = self.engine.optimizer
        if self.optimizer_state_linked or not hasattr(opt, "_hp_optimizer_states_linked"):
            return
        if len(opt.optimizer.state) == 0:
            return  # the base optimizer has not stepped yet (e.g. a skipped first step)
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
        self.optimizer_state_linked = True

    def record_skipped_step(self) -> None:
        """Count a step skipped after a first-pass overflow the way the engine counts its own
        skipped steps (global step and samples advance, the LR schedule does not)."""
        engine = self.engine
        engine.global_steps += 1
        engine.global_samples += engine.train_batch_size()
        engine.skipped_steps += 1


def attach(engine, fsam) -> EngineView:
    """Find where `fsam` (the client optimizer) sits inside `engine` and describe its shards."""
    _require(engine, ["optimizer", "module", "micro_steps", "zero_grad"], "The DeepSpeed engine")
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    names = {id(p): n for n, p in engine.module.named_parameters()}
    always = fsam.config.is_always_perturbed
    if fsam.config.always_perturb and not any(always(n) for n in names.values()):
        warnings.warn(f"FSAM: no parameter name matches always_perturb {list(fsam.config.always_perturb)} "
                      f"(e.g. {next(iter(names.values()), '')!r}); every element is ranked. Set "
                      'always_perturb in the "fsam" block for this model\'s names (GPT-2: "wte", "wpe", "ln_").')

    if getattr(engine, "pipeline_parallelism", False):
        raise UnsupportedDeepSpeedSetup("fsam_ds does not support pipeline parallelism "
                                        "(PipelineEngine); use ZeRO data parallelism")
    if opt is fsam:
        layouts = {id(p): ShardLayout.whole(p.numel(), always(names.get(id(p))))
                   for g in fsam.param_groups for p in g["params"]}
        return EngineView("fp32", engine, layouts, None)

    cls = type(opt).__name__
    if getattr(opt, "optimizer", None) is not fsam:
        raise UnsupportedDeepSpeedSetup(
            f"DeepSpeed wrapped the FSAM optimizer in {cls}, whose client optimizer is not FSAM. "
            "Pass FSAM as the client optimizer (fsam_ds.initialize does this).")

    if cls == "FP16_UnfusedOptimizer":
        _require(opt, ["fp32_groups", "fp16_groups"], cls)
        layouts = {id(fp32): ShardLayout.whole(fp32.numel(), always(names.get(id(lp))))
                   for fp32_group, lp_group in zip(opt.fp32_groups, opt.fp16_groups)
                   for fp32, lp in zip(fp32_group, lp_group)}
        return EngineView("unfused", engine, layouts, None)

    if cls in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
        if cls == "DeepSpeedZeroOptimizer":
            _require(opt, ["single_partition_of_fp32_groups", "bit16_groups", "update_lp_params",
                           "real_dp_process_group"], cls)
            flats, lp_groups = opt.single_partition_of_fp32_groups, opt.bit16_groups
            groups = opt.real_dp_process_group
            if any(getattr(opt, "is_moe_param_group", [])):
                raise UnsupportedDeepSpeedSetup("fsam_ds does not support MoE parameter groups "
                                                "(expert-parallel groups need their own threshold)")
        else:
            _require(opt, ["fp32_groups_flat_partition", "bf16_groups", "update_lp_params",
                           "real_dp_process_group"], cls)
            flats, lp_groups = opt.fp32_groups_flat_partition, opt.bf16_groups
            groups = opt.real_dp_process_group
        layouts = {}
        for flat, lp_group in zip(flats, lp_groups):
            pieces = []
            for p in lp_group:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue  # no element of this parameter lives on this rank
                address = mapping.get_hp_fragment_address()
                pieces.append((address.start, address.start + address.numel,
                               always(names.get(id(p)))))
            layouts[id(flat)] = ShardLayout.from_pieces(flat.numel(), pieces)
        return EngineView("zero12" if cls == "DeepSpeedZeroOptimizer" else "bf16", engine,
                          layouts, _single_group(groups))

    if cls == "DeepSpeedZeroOptimizer_Stage3":
        _require(opt, ["fp32_partitioned_groups_flat", "fp16_groups", "dp_process_group",
                       "_partition_all_parameters", "_reassign_or_swap_out_partitioned_parameters",
                       "persistent_parameters", "invalidate_secondary_tensor"], cls)
        if any(t is None for t in opt.fp32_partitioned_groups_flat):
            raise UnsupportedDeepSpeedSetup("ZeRO-3 NVMe optimizer offload swaps the fp32 "
                                            "partitions out; FSAM supports offload to cpu only")
        import torch.distributed as dist
        group = opt.dp_process_group
        rank = dist.get_rank(group)
        layouts = {}
        for flat, params in zip(opt.fp32_partitioned_groups_flat, opt.fp16_groups):
            pieces, offset = [], 0
            for p in params:
                shard = p.ds_tensor.ds_numel           # elements of p this rank holds, padded
                valid = max(0, min(shard, p.ds_numel - rank * shard))
                pieces.append((offset, offset + valid, always(names.get(id(p)))))
                offset += shard
            assert offset == flat.numel(), "ZeRO-3 sub-group size differs from its parameters"
            layouts[id(flat)] = ShardLayout.from_pieces(flat.numel(), pieces)
        return EngineView("zero3", engine, layouts, group)

    raise UnsupportedDeepSpeedSetup(
        f"fsam_ds does not know DeepSpeed's {cls} optimizer wrapper (stage {stage}). Supported: "
        "ZeRO stages 0-3 with fp32/bf16/fp16 and CPU optimizer offload.")


def _single_group(groups):
    """All ZeRO param groups must share one data-parallel group: the threshold is global."""
    unique = {id(g): g for g in groups}
    if len(unique) != 1:
        raise UnsupportedDeepSpeedSetup("fsam_ds needs every param group on the same "
                                        "data-parallel group (no MoE/expert groups)")
    return next(iter(unique.values()))


def engine_client_optimizer(engine):
    """The client optimizer DeepSpeed wraps (or the engine's optimizer itself at stage 0 fp32)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)
