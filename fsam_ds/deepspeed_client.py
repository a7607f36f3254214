"""`FSAMDeepSpeedClient`: the client optimizer DeepSpeed wraps for FSAM.

DeepSpeed's wrappers (ZeRO-1/2/3, BF16_Optimizer, FP16_UnfusedOptimizer) call the client's step()
themselves, once per param group or sub-group, with reduced, unscaled, clipped fp32 gradients. The
client's step() therefore only does what `fsam_ds.train_step` has put it in the mode for:

  setup     during DeepSpeed's construction (wrappers take a zero-gradient step): base step
  capture   first pass, where the adapter has no lean path (stage 0, BF16_Optimizer, offload):
            keep the (tensor, gradient) pairs; FSAMCore perturbs after all groups. ZeRO-1/2/3
            without offload skip the wrapper's step in the first pass altogether
            (deepspeed_adapter.EngineView.first_pass_gradients)
  restore   second pass: restore this group's tensors bit-exactly, then the base step
  plain     a step without perturbation (rho 0, interval mode): base step
  idle      anything else: an error, never a silent base step. The adapter also guards the
            wrapper's own step(), so the error comes before ZeRO touches the loss scale or swaps
            param_groups.

Importing fsam_ds registers this class as torch.optim.FSAM, so that
{"optimizer": {"type": "FSAM", "params": {"base_optimizer": "AdamW", ...}}} works in a plain
deepspeed.initialize (DeepSpeed looks optimizer types up on torch.optim).
"""
from __future__ import annotations

import contextlib

import torch

from fsam_ds import deepspeed_adapter
from fsam_ds.config import FSAMConfig
from fsam_ds.fsam_core import FSAMCore, Slot
from fsam_ds.optimizer import FSAM, BaseOptimizerFacade, check_base_optimizer

SETUP, IDLE, CAPTURE, RESTORE, PLAIN = "setup", "idle", "capture", "restore", "plain"

MISUSE = ("This DeepSpeed engine's optimizer is FSAM, and engine.step() / optimizer.step() was "
          "called outside an FSAM step, which would silently train the base optimizer alone. "
          "Drive the engine with fsam_ds.train_step(engine, loss_fn, micro_batches) (both passes "
          "of one optimizer step), or with fsam_ds.hf.FSAMTrainer under Hugging Face Trainer; "
          "for plain training use the base optimizer's type in the config.")


def resolve_optimizer_class(name: str):
    """A torch.optim class from a DeepSpeed optimizer "type" (case-insensitive)."""
    if not isinstance(name, str):
        raise ValueError(f'Invalid optimizer "type": {name!r} (must be a string such as "AdamW")')
    candidates = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
                  if isinstance(getattr(torch.optim, n), type)
                  and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                  and not getattr(getattr(torch.optim, n), "_is_fsam", False)}
    cls = candidates.get(name.lower())
    if cls is None:
        raise ValueError(f'Unknown base optimizer "type": {name!r}; use a torch.optim optimizer, '
                         f"e.g. one of {sorted(c.__name__ for c in candidates.values())[:12]}")
    return cls


class FSAMDeepSpeedClient(BaseOptimizerFacade):
    """FSAM as DeepSpeed's client optimizer. Built by fsam_ds.initialize, or by DeepSpeed itself for
    {"optimizer": {"type": "FSAM", "params": {...}}} (then base_optimizer arrives as a name)."""

    def __init__(self, params, base_optimizer="AdamW", config: FSAMConfig | None = None,
                 **kwargs):
        if isinstance(base_optimizer, str):
            base_optimizer = resolve_optimizer_class(base_optimizer)
        check_base_optimizer(base_optimizer)
        fsam_keys = {k: kwargs.pop(k) for k in list(kwargs) if k in FSAMConfig.field_names()}
        if config is not None and fsam_keys:
            raise ValueError(f"Give the FSAM settings once: config= or {sorted(fsam_keys)}")
        self.config = config or FSAMConfig(**fsam_keys)
        self._build_base(params, base_optimizer, kwargs)
        self.core = FSAMCore(self.config)
        self.mode = SETUP
        self.view = None             # deepspeed_adapter.EngineView, once attached
        self._captured = []
        # ZeRO-3 fp32: master partition and parameter partition in one storage (set-up only)
        self.share_fp32_master = True

    # ---- what DeepSpeed calls ---------------------------------------------------------------------
    def step(self, closure=None):
        if self.mode == CAPTURE:
            # Keep a reference (or a copy where the wrapper reuses the buffer before FSAM perturbs)
            clone = not self.view.grads_outlive_step
            self._captured.extend((p, p.grad.detach().clone() if clone else p.grad.detach())
                                  for group in self.param_groups for p in group["params"]
                                  if p.grad is not None)
            return None
        if self.mode == RESTORE:
            with torch.no_grad(), torch.profiler.record_function("fsam.restore"):
                # under ZeRO-1/2/3: the group being stepped; one batch for all its tensors
                self.core.restore_many([self.view.slot_key(p) for group in self.param_groups
                                        for p in group["params"]])
            with torch.profiler.record_function("fsam.base_step"):
                return self.base_optimizer.step()
        if self.mode in (SETUP, PLAIN):
            return self.base_optimizer.step(closure)
        raise RuntimeError(MISUSE)

    def allows_wrapper_step(self) -> bool:
        return self.mode != IDLE

    def end_setup(self) -> None:
        """DeepSpeed finished building the engine: from now on only train_step may step."""
        self.mode = IDLE

    # ---- what train_step calls --------------------------------------------------------------------
    @contextlib.contextmanager
    def in_mode(self, mode: str):
        assert self.mode == IDLE, f"FSAM step started in mode {self.mode}"
        self.mode = mode
        try:
            yield
        finally:
            self.mode = IDLE

    def take_captured(self) -> list:
        """The first pass's gradients as slots (all groups), in the order the wrapper gave them."""
        captured, self._captured = self._captured, []
        return [Slot(self.view.slot_key(w), w, g, self.view.layout(w)) for w, g in captured]

    def local_kept_ranked(self) -> int:
        return self.core.local_kept_ranked(self.view.layouts_by_key())


def register_with_deepspeed() -> None:
    """torch.optim.FSAM for DeepSpeed's optimizer-type lookup, and the engine hook that ends the
    set-up phase and guards misuse (installed only if DeepSpeed is importable)."""
    FSAMDeepSpeedClient.__name__ = "FSAM"
    torch.optim.FSAM = FSAMDeepSpeedClient
    with contextlib.suppress(ImportError):
        deepspeed_adapter.install_engine_hook(_before_optimizer_built, _after_optimizer_built)


def _before_optimizer_built(engine, client_optimizer) -> None:
    raw = deepspeed_adapter.engine_config_dict(engine)
    if "fsam" in raw and not isinstance(client_optimizer, FSAMDeepSpeedClient):
        raise deepspeed_adapter.UnsupportedDeepSpeedSetup(
            'The DeepSpeed config has an "fsam" block, which plain deepspeed.initialize ignores (it '
            "would train the base optimizer alone). Build the engine with fsam_ds.initialize(model, "
            'config), use fsam_ds.hf.FSAMTrainer, or name the optimizer {"type": "FSAM", ...}.')
    if isinstance(client_optimizer, FSAM):
        raise deepspeed_adapter.UnsupportedDeepSpeedSetup(
            "fsam_ds.FSAM is the pure-PyTorch optimizer and cannot be DeepSpeed's client "
            "optimizer; build the engine with fsam_ds.initialize(model, config) (an \"fsam\" block "
            'in the config) or use {"optimizer": {"type": "FSAM", "params": {...}}}.')


def _after_optimizer_built(engine) -> None:
    client = deepspeed_adapter.engine_client_optimizer(engine)
    if not isinstance(client, FSAMDeepSpeedClient):
        return
    deepspeed_adapter.check_supported_engine(engine)
    if client.share_fp32_master:
        deepspeed_adapter.share_zero3_fp32_master(engine)
    client.end_setup()
    deepspeed_adapter.guard_steps(engine, client.allows_wrapper_step, MISUSE)
