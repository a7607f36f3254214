"""The only module that reads DeepSpeed's private attributes.

It answers, for whichever optimizer wrapper DeepSpeed put around the FSAM client optimizer:
  1. which fp32 tensors does the client see on this rank, and which of their elements belong to
     which parameter (or are partition padding)?  -> slots: a stable key and a `ShardLayout` each
  2. how do modified fp32 master weights reach the model?  -> `publish_master_weights()`
  3. where are the first pass's reduced, unscaled, clipped gradients, without the wrapper's
     step where possible, and how does the engine stay consistent, with one loss-scale update per
     FSAM step?  -> `first_pass_gradients()`, `end_first_pass()`, `LossScaleSnapshot`
  4. which set-ups would FSAM drive silently wrong?  -> `check_supported_engine()`, and the guard
     that makes a plain engine.step() on an FSAM engine fail before ZeRO changes anything

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

import functools
import math
import warnings
from dataclasses import dataclass, field

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
    """What this rank owns, and how to push modified fp32 masters to the model.
    slots: (key, fp32 tensor the client sees, its ShardLayout), in a fixed order; keys are
    (group, index) pairs that name the same tensor in every run of the same set-up."""
    kind: str                  # "fp32", "unfused", "zero12", "bf16", "zero3"
    engine: object
    slots: list
    process_group: object      # group the shards are spread over; None when replicated
    optimizer_state_linked: bool = False
    _by_id: dict = field(default_factory=dict, repr=False)
    _pending_lean: object = field(default=None, repr=False)

    def __post_init__(self):
        self._by_id = {id(t): (key, t, layout) for key, t, layout in self.slots}

    def _entry(self, tensor):
        entry = self._by_id.get(id(tensor))
        if entry is None or entry[1] is not tensor:
            raise UnsupportedDeepSpeedSetup(
                f"DeepSpeed's {type(self.engine.optimizer).__name__} handed FSAM a tensor of shape "
                f"{tuple(tensor.shape)} that fsam_ds has no layout for (which elements are "
                "parameters and which are padding); FSAM will not guess. This DeepSpeed feature "
                "is not supported with FSAM.")
        return entry

    def slot_key(self, tensor) -> tuple:
        return self._entry(tensor)[0]

    def layout(self, tensor) -> ShardLayout:
        return self._entry(tensor)[2]

    def layouts_by_key(self) -> dict:
        return {key: layout for key, _, layout in self.slots}

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

    def loss_scale_snapshot(self) -> "LossScaleSnapshot":
        return LossScaleSnapshot.of(self.engine.optimizer)

    def first_pass_gradients(self, wrapper_step) -> "FirstPass":
        """The first pass's gradients, reduced, unscaled and clipped, as FSAM slots, and the
        global norm before clipping; or overflow=True (the step is skipped).

        ZeRO-1/2 and ZeRO-3 without offload take the lean path: from DeepSpeed only the reduced
        gradient partitions it holds after the boundary backward, one fused norm with one
        all-reduce, and DeepSpeed's clip coefficient, without the wrapper's step (its per-tensor
        overflow check and norm were 50 of the 67 ms of a 355M ZeRO-2 step on an H200, and its
        bf16 copy and all-gather are redone by the publish anyway). Under ZeRO-3 each sub-group's
        fp32 gradient is derived when FSAM reads it and dropped after: nothing is held.
        Every other wrapper runs `wrapper_step()` (its step, with the client capturing) and
        returns what the client captured."""
        lean = self._lean_gradient_source()
        if lean is not None:
            scaled_norm = lean.scaled_norm()
            if math.isfinite(scaled_norm):
                opt = self.engine.optimizer
                opt._global_grad_norm = scaled_norm / opt.loss_scale
                self._pending_lean = lean
                return FirstPass(False, lean.slots(), scaled_norm / opt.loss_scale)
            # inf/NaN: the wrapper's own step decides (skip and loss-scale update) as it would
        captured = wrapper_step()
        if captured is None:
            return FirstPass(True, [], float("inf"))
        return FirstPass(False, captured, self.first_pass_grad_norm())

    def end_first_pass(self) -> None:
        """The engine bookkeeping of a step except counting it, once FSAM has read the first
        pass's gradients: drop them, and advance micro_steps so that the gradient-accumulation
        boundaries of the second pass fall where they would for a plain step."""
        engine, opt = self.engine, self.engine.optimizer
        lean, self._pending_lean = self._pending_lean, None
        if lean is not None:
            lean.release()
        if self.kind == "fp32":
            engine.zero_grad()
        else:
            opt.zero_grad()
        if self.kind == "unfused":
            engine.zero_grad()  # the unfused wrapper clears only its fp32 copies' gradients
        engine.micro_steps += 1

    def discard_first_pass(self) -> None:
        """After an exception mid-step: drop gradients a lean first pass still holds."""
        lean, self._pending_lean = self._pending_lean, None
        if lean is not None:
            lean.release()

    def _lean_gradient_source(self):
        opt = self.engine.optimizer
        if self.kind == "zero12" and _LeanZero12.applies(opt):
            return _LeanZero12(self)
        if self.kind == "zero3" and _LeanZero3.applies(opt):
            return _LeanZero3(self)
        return None

    def first_pass_grad_norm(self):
        """The first pass's global gradient norm before clipping, as the wrapper computed it (the
        client sees clipped gradients); None at stage 0 fp32, where FSAM sees them unclipped."""
        if self.kind == "fp32":
            return None
        norm = getattr(self.engine.optimizer, "_global_grad_norm", None)
        if norm is None:
            return None
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

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

    def data_parallel_group(self):
        """The group whose ranks see different data (for averaging losses); None: one rank."""
        import torch.distributed as dist
        if not dist.is_initialized():
            return None
        return getattr(self.engine, "data_parallel_group", None) or dist.group.WORLD


@dataclass
class FirstPass:
    overflow: bool
    slots: list            # fsam_core.Slot per tensor the client steps on this rank
    grad_norm: object      # the global norm before clipping (None where DeepSpeed gives none)


class _LeanGradients:
    """The first pass's gradients read straight from the partitions a ZeRO wrapper holds after the
    boundary backward (`averaged_gradients`: one list of tensors per group / sub-group), turned
    into the fp32 gradients the wrapper's step would hand its client (flatten, to fp32, times
    1/combined scale, DeepSpeed's own clip coefficient)."""

    def __init__(self, view):
        self.view, self.opt = view, view.engine.optimizer
        # whether this path applies is decided from the configuration alone (equal on every
        # rank); a missing partition here is an unknown state, not a reason to branch
        self.groups = [self.opt.averaged_gradients.get(i) for i in range(len(view.slots))]
        if any(g is None for g in self.groups):
            raise UnsupportedDeepSpeedSetup(
                f"{type(self.opt).__name__} holds no reduced gradients after the first pass's "
                "boundary backward (averaged_gradients); an unknown DeepSpeed state for fsam_ds. "
                f"Use a tested DeepSpeed version ({', '.join(TESTED_DEEPSPEED_VERSIONS)}).")
        self._inverse_scale = None

    def scaled_norm(self) -> float:
        """||g|| of the loss-scaled gradients over the data-parallel group (padding excluded),
        by one fused norm per rank and one all-reduce; inf/NaN if any gradient is."""
        from fsam_ds import collectives
        grads = [g for group in self.groups for g in group
                 if g is not None and g.numel() and not getattr(g, "_zero_padding", False)]
        device = self.view.slots[0][1].device
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            local = torch.stack(norms).double().pow(2).sum().reshape(1).to(device)
        else:
            local = torch.zeros(1, dtype=torch.float64, device=device)
        total = collectives.all_reduce_sum_(local, self.view.process_group).item()
        norm = math.sqrt(total) if math.isfinite(total) else float("nan")
        self._inverse_scale = self._inverse_combined_scale(norm)
        return norm

    def _inverse_combined_scale(self, scaled_norm: float) -> float:
        # DeepSpeed's unscale_and_clip_grads: clip = ((norm / scale) + 1e-6) / clip_grad, at
        # least 1; the gradients are multiplied by 1 / (clip * loss_scale)
        opt = self.opt
        combined = float(opt.loss_scale)
        if opt.clip_grad > 0.0 and math.isfinite(scaled_norm):
            clip = ((scaled_norm / opt.loss_scale) + 1e-6) / opt.clip_grad
            combined = max(clip, 1.0) * opt.loss_scale
        return 1.0 / combined

    def _derive(self, i: int) -> torch.Tensor:
        # a fresh tensor: flatten returns a view of DeepSpeed's buffer for a one-tensor group,
        # and .to(float32) of an fp32 one is that view, which the in-place scale would change
        source = self._flatten(i)
        flat = torch.empty(source.shape, dtype=torch.float32, device=source.device).copy_(source)
        if self._inverse_scale != 1.0:
            flat.mul_(self._inverse_scale)
        return flat

    def slots(self) -> list:
        from fsam_ds.fsam_core import Slot
        return [Slot(key, weight, self._grad_of(i), layout)
                for i, (key, weight, layout) in enumerate(self.view.slots)]


class _LeanZero12(_LeanGradients):
    """DeepSpeedZeroOptimizer (ZeRO-1/2) without offload. The fp32 gradient of each group is
    derived once and held until the end of the first pass, as the wrapper's step would."""

    @staticmethod
    def applies(opt) -> bool:
        return (not getattr(opt, "cpu_offload", True) and not getattr(opt, "has_moe_layers", True)
                and getattr(opt, "torch_autocast_gradscaler", None) is None
                and not getattr(opt, "zenflow", False) and not getattr(opt, "use_muon", False)
                and all(hasattr(opt, n) for n in (
                    "averaged_gradients", "partition_size", "flatten", "flatten_dense_tensors_aligned",
                    "free_grad_in_param_list", "params_in_partition", "params_not_in_partition",
                    "_release_preflattened_grad_buffers", "all_grad_tensors", "clip_grad", "loss_scale")))

    def __init__(self, view):
        super().__init__(view)
        self._held = {}

    def _flatten(self, i):
        import torch.distributed as dist
        opt, grads = self.opt, self.groups[i]
        flat = getattr(grads, "flat_partition", None)
        if flat is not None:
            return flat.view(-1)
        group = opt.real_dp_process_group[i]
        if dist.get_rank(group=group) == dist.get_world_size(group=group) - 1:
            return opt.flatten_dense_tensors_aligned(grads, int(opt.partition_size[i]))
        return opt.flatten(grads)

    def _grad_of(self, i):
        def grad():
            if i not in self._held:
                self._held[i] = self._derive(i)
            return self._held[i]
        return grad

    def release(self) -> None:
        """What the wrapper's step does with the gradients after using them."""
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID
        opt = self.opt
        self._held = {}
        for i in range(len(self.groups)):
            opt.free_grad_in_param_list(opt.params_not_in_partition[i])
            opt.free_grad_in_param_list(opt.params_in_partition[i])
            opt._release_preflattened_grad_buffers(i)
            opt.averaged_gradients[i] = None
            opt.all_grad_tensors[i] = None
        opt.micro_step_id = INITIAL_MICRO_STEP_ID


class _LeanZero3(_LeanGradients):
    """DeepSpeedZeroOptimizer_Stage3 without offload. A sub-group's fp32 gradient is derived from
    DeepSpeed's 16-bit gradient partition (which it holds until the next backward anyway) each
    time FSAM reads it, and dropped after: no first-pass gradient is held."""

    @staticmethod
    def applies(opt) -> bool:
        return (not getattr(opt, "offload_optimizer", True) and not getattr(opt, "swap_optimizer", True)
                and not getattr(opt, "use_muon", False)
                and getattr(opt, "torch_autocast_gradscaler", None) is None
                and all(hasattr(opt, n) for n in ("averaged_gradients", "flatten", "_pre_step",
                                                  "clip_grad", "loss_scale", "check_overflow")))

    def __init__(self, view):
        view.engine.optimizer._pre_step()   # what the wrapper's step does first
        super().__init__(view)

    def scaled_norm(self) -> float:
        opt = self.opt
        if opt.dtype == torch.float16:
            opt.check_overflow()   # DeepSpeed's own check (one fused pass over the buffer)
            if opt.overflow:
                return float("inf")
        return super().scaled_norm()

    def _flatten(self, i):
        return self.opt.flatten(self.groups[i])

    def _grad_of(self, i):
        return lambda: self._derive(i)

    def release(self) -> None:
        opt = self.opt
        for i in range(len(self.groups)):
            opt.averaged_gradients[i] = None
        opt.zero_grad(set_to_none=True)


@dataclass
class LossScaleSnapshot:
    """The dynamic loss scaler's counters (scale, iteration, last overflow, hysteresis). FSAM's
    first pass runs the wrapper's step, which updates the scaler; restoring this snapshot after a
    first pass without overflow leaves the second pass's step as the step's one update, so an
    FSAM step moves the scale exactly as a plain DeepSpeed step would."""
    scalers: list

    @classmethod
    def of(cls, opt) -> "LossScaleSnapshot":
        found = []
        for name in ("loss_scaler", "loss_scale_config"):
            scaler = getattr(opt, name, None)
            if scaler is not None:
                found.append((scaler, {k: v for k, v in vars(scaler).items()
                                       if isinstance(v, (bool, int, float))}))
        return cls(found)

    def restore(self) -> None:
        for scaler, values in self.scalers:
            for k, v in values.items():
                setattr(scaler, k, v)


def attach(engine, client) -> EngineView:
    """Find where `client` (the FSAM client optimizer) sits inside `engine`; describe its shards."""
    _require(engine, ["optimizer", "module", "micro_steps", "zero_grad"], "The DeepSpeed engine")
    check_supported_engine(engine)
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    names = {id(p): n for n, p in engine.module.named_parameters()}
    always = client.config.is_always_perturbed
    if client.config.always_perturb and not any(always(n) for n in names.values()):
        warnings.warn(f"FSAM: no parameter name matches always_perturb {list(client.config.always_perturb)} "
                      f"(e.g. {next(iter(names.values()), '')!r}); every element is ranked. Set "
                      'always_perturb in the "fsam" block for this model\'s names.')

    if opt is client:
        slots = [((gi, pi), p, ShardLayout.whole(p.numel(), always(names.get(id(p)))))
                 for gi, g in enumerate(client.param_groups) for pi, p in enumerate(g["params"])]
        return EngineView("fp32", engine, slots, None)

    cls = type(opt).__name__
    if getattr(opt, "optimizer", None) is not client:
        raise UnsupportedDeepSpeedSetup(
            f"DeepSpeed wrapped the FSAM optimizer in {cls}, whose client optimizer is not FSAM. "
            "Pass FSAM as the client optimizer (fsam_ds.initialize does this).")

    if cls == "FP16_UnfusedOptimizer":
        _require(opt, ["fp32_groups", "fp16_groups"], cls)
        slots = [((gi, pi), fp32, ShardLayout.whole(fp32.numel(), always(names.get(id(lp)))))
                 for gi, (fp32_group, lp_group) in enumerate(zip(opt.fp32_groups, opt.fp16_groups))
                 for pi, (fp32, lp) in enumerate(zip(fp32_group, lp_group))]
        return EngineView("unfused", engine, slots, None)

    if cls in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
        if cls == "DeepSpeedZeroOptimizer":
            _require(opt, ["single_partition_of_fp32_groups", "bit16_groups", "update_lp_params",
                           "real_dp_process_group"], cls)
            flats, lp_groups = opt.single_partition_of_fp32_groups, opt.bit16_groups
            if any(getattr(opt, "is_moe_param_group", [])):
                raise UnsupportedDeepSpeedSetup("fsam_ds does not support MoE parameter groups "
                                                "(expert-parallel groups need their own threshold)")
        else:
            _require(opt, ["fp32_groups_flat_partition", "bf16_groups", "update_lp_params",
                           "real_dp_process_group"], cls)
            flats, lp_groups = opt.fp32_groups_flat_partition, opt.bf16_groups
        slots = []
        for gi, (flat, lp_group) in enumerate(zip(flats, lp_groups)):
            pieces = []
            for p in lp_group:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue  # no element of this parameter lives on this rank
                address = mapping.get_hp_fragment_address()
                pieces.append((address.start, address.start + address.numel,
                               always(names.get(id(p)))))
            slots.append(((gi, 0), flat, ShardLayout.from_pieces(flat.numel(), pieces)))
        return EngineView("zero12" if cls == "DeepSpeedZeroOptimizer" else "bf16", engine,
                          slots, _single_group(opt.real_dp_process_group))

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
        group_ranks = dist.get_process_group_ranks(group)
        slots = []
        for gi, (flat, params) in enumerate(zip(opt.fp32_partitioned_groups_flat, opt.fp16_groups)):
            pieces, offset = [], 0
            for p in params:
                own = getattr(p, "ds_process_group", group)
                if own is not group and dist.get_process_group_ranks(own) != group_ranks:
                    raise UnsupportedDeepSpeedSetup(
                        f"ZeRO-3 parameter {names.get(id(p), '?')!r} is partitioned over its own "
                        "process group (zero.Init(data_parallel_group=...), hpZ or MiCS), not the "
                        "optimizer's data-parallel group: FSAM's layout would be wrong. Partition "
                        "every parameter over the data-parallel group.")
                shard = p.ds_tensor.ds_numel           # elements of p this rank holds, padded
                valid = max(0, min(shard, p.ds_numel - rank * shard))
                pieces.append((offset, offset + valid, always(names.get(id(p)))))
                offset += shard
            if offset != flat.numel():
                raise UnsupportedDeepSpeedSetup(
                    f"ZeRO-3 sub-group {gi} holds {flat.numel()} elements but its parameters' "
                    f"shards add up to {offset}: an unknown partition layout (DeepSpeed version?)")
            slots.append(((gi, 0), flat, ShardLayout.from_pieces(flat.numel(), pieces)))
        return EngineView("zero3", engine, slots, group)

    raise UnsupportedDeepSpeedSetup(
        f"fsam_ds does not know DeepSpeed's {cls} optimizer wrapper (stage {stage}). Supported: "
        "ZeRO stages 0-3 with fp32/bf16/fp16 and CPU optimizer offload.")


def check_supported_engine(engine) -> None:
    """Refuse set-ups that FSAM would drive silently wrong, naming the setting and the fix."""
    if getattr(engine, "pipeline_parallelism", False) or type(engine).__name__ == "PipelineEngine":
        raise UnsupportedDeepSpeedSetup("fsam_ds does not support pipeline parallelism "
                                        "(PipelineEngine); use ZeRO data parallelism")
    autotp = getattr(engine, "autotp_size", None)
    if getattr(engine, "mpu", None) is not None or (callable(autotp) and autotp() > 1):
        raise UnsupportedDeepSpeedSetup(
            "fsam_ds does not support tensor parallelism (an mpu passed to deepspeed.initialize, "
            'or "tensor_parallel": {"autotp_size": > 1}): the Fisher threshold and the gradient '
            "norm would count each rank's slice as the whole. Use ZeRO data parallelism only.")
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if callable(managed) and not managed():
        raise UnsupportedDeepSpeedSetup(
            '"managed_gradient_accumulation": false makes every engine.step() a boundary, which '
            "FSAM's two passes over one global batch cannot follow; remove the setting (FSAM's "
            "train_step runs gradient_accumulation_steps micro-batches per pass itself).")


def guard_steps(engine, allowed, message: str) -> None:
    """Make engine.step() at an accumulation boundary, and the wrapper's own step(), raise
    `message` unless allowed(). The engine's check runs first thing, before ZeRO updates the loss
    scale, swaps param_groups or touches weights; it discards the misused step's gradients and
    completes its micro-step, so the engine is as if that step had been skipped: weights,
    optimizer state, loss scale and step counters unchanged, the next FSAM step unaffected."""
    if getattr(engine, "_fsam_guarded", False):
        return
    engine_step = engine.step

    @functools.wraps(engine_step)
    def guarded_engine_step(*args, **kwargs):
        if not allowed() and engine.is_gradient_accumulation_boundary():
            engine.optimizer.zero_grad()
            engine.zero_grad()
            engine.micro_steps += 1
            raise RuntimeError(message)
        return engine_step(*args, **kwargs)

    engine.step = guarded_engine_step
    engine._fsam_guarded = True
    opt = engine.optimizer
    if getattr(opt, "optimizer", None) is None:
        return   # stage 0 fp32: the wrapper is the client itself, whose step() checks the same
    wrapper_step = opt.step

    @functools.wraps(wrapper_step)
    def guarded_wrapper_step(*args, **kwargs):
        if not allowed():
            raise RuntimeError(message)
        return wrapper_step(*args, **kwargs)

    opt.step = guarded_wrapper_step


def install_engine_hook(before, after) -> None:
    """Wrap DeepSpeedEngine._configure_optimizer (every deepspeed.initialize goes through it, also
    Hugging Face Trainer's and Accelerate's): before(engine, client_optimizer) may refuse a client;
    after(engine) runs once the optimizer (and its wrapper) exists."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    original = DeepSpeedEngine._configure_optimizer
    if getattr(original, "_fsam_hook", False):
        return

    @functools.wraps(original)
    def _configure_optimizer(engine, client_optimizer, model_parameters):
        before(engine, client_optimizer)
        result = original(engine, client_optimizer, model_parameters)
        after(engine)
        return result

    _configure_optimizer._fsam_hook = True
    DeepSpeedEngine._configure_optimizer = _configure_optimizer


def _single_group(groups):
    """All ZeRO param groups must share one data-parallel group: the threshold is global."""
    unique = {id(g): g for g in groups}
    if len(unique) != 1:
        raise UnsupportedDeepSpeedSetup("fsam_ds needs every param group on the same "
                                        "data-parallel group (no MoE/expert groups)")
    return next(iter(unique.values()))


def engine_config_dict(engine) -> dict:
    """The config dict the engine was built from (DeepSpeedConfig keeps it as _param_dict)."""
    config = getattr(getattr(engine, "_config", None), "_param_dict", None)
    return config if isinstance(config, dict) else {}


def engine_client_optimizer(engine):
    """The client optimizer DeepSpeed wraps (or the engine's optimizer itself at stage 0 fp32)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def share_zero3_fp32_master(engine) -> int:
    """ZeRO-3 with fp32 parameters: let each sub-group's fp32 master partition use the storage of
    the parameter partition it mirrors, so that the two identical fp32 copies DeepSpeed keeps on
    every rank become one (4 bytes per parameter / world size saved). Returns the number of
    elements now shared on this rank (0 where nothing applies: another stage, 16-bit parameters,
    offload, NVMe swap).

    DeepSpeed 0.19.8, stage3.py `_create_fp32_partitions`: without offload the master is
    `fp16_partitioned_groups_flat[i].to(device, dtype).clone()` - for fp32 parameters a copy of the
    partition (its own aliasing branch compares `tensor.device == "cpu"/"cuda:0"`, a str, which is
    never equal). Everything DeepSpeed then does between the two is `lp.data.copy_(master.data)`
    after its step and at checkpoint load (a no-op between aliases, as stage3.py's own comment
    says for autocast) and `master.data.copy_(...)` when loading, which keeps the storage shared.
    The master keeps its tensor identity (the optimizer state and FSAM's slots are keyed by it);
    only its `.data` moves onto the partition's storage, after checking the two are equal."""
    opt = engine.optimizer
    if type(opt).__name__ != "DeepSpeedZeroOptimizer_Stage3":
        return 0
    _require(opt, ["fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat", "offload_optimizer",
                   "offload_param", "swap_optimizer"], type(opt).__name__)
    if opt.offload_optimizer or opt.offload_param or opt.swap_optimizer:
        return 0
    shared = 0
    with torch.no_grad():
        for master, partition in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat):
            if (partition is None or master is None or master.dtype != partition.dtype
                    or master.device != partition.device or master.shape != partition.shape):
                continue
            if master.data_ptr() == partition.data_ptr():
                shared += master.numel()
                continue
            # bitwise: the last rank's padding is uninitialised memory (NaN != NaN for torch.equal)
            if not torch.equal(master.view(torch.uint8), partition.view(torch.uint8)):
                raise UnsupportedDeepSpeedSetup(
                    "ZeRO-3's fp32 master partition differs from the parameter partition it was "
                    "copied from before the first step: an unknown DeepSpeed state; fsam_ds will "
                    f"not share them (tested with DeepSpeed {', '.join(TESTED_DEEPSPEED_VERSIONS)}).")
            master.data = partition.data
            shared += master.numel()
    return shared
