"""DeepSpeed entry points: `initialize` (config -> engine with an FSAM client optimizer) and
`train_step` (one FSAM step = two passes over one global batch = one DeepSpeed optimizer step).

One FSAM step under DeepSpeed, on every rank:
  1. first pass: forward/backward over the micro-batches; the wrapper's step() reduces, unscales and
     clips the gradients and hands each fp32 shard to FSAM, which only captures it;
  2. FSAM computes the global norm, the mask (exact sharded threshold) and perturbs its shards,
     which DeepSpeed's own machinery publishes to the model (copy + all-gather / re-partition);
  3. second pass: forward/backward again, then engine.step(): the wrapper calls FSAM's step(), which
     restores the shard bit-exactly and steps the base optimizer; clipping, the LR schedule and
     global_steps advance once, as for a plain optimizer.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import torch

from fsam_ds import deepspeed_adapter
from fsam_ds.config import FSAMConfig
from fsam_ds.optimizer import FSAM

_FSAM_KEYS = {"rho", "sparsity", "mask_interval", "fisher", "adaptive", "always_perturb"}
# DeepSpeed-only optimizer params that have no meaning for torch.optim classes.
_DEEPSPEED_ONLY_PARAMS = {"torch_adam", "adam_w_mode"}


def load_config(config) -> dict:
    """A DeepSpeed config as a dict, from a dict or a JSON file path (errors name the file)."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if not isinstance(config, (str, os.PathLike)):
        raise ValueError(f"config must be a dict or a path to a DeepSpeed JSON file, got {type(config).__name__}")
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed config file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err.msg} at line "
                         f"{err.lineno} column {err.colno}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object, got {type(loaded).__name__}")
    return loaded


def resolve_optimizer_class(name: str):
    """A torch.optim class from a DeepSpeed optimizer "type". DeepSpeed's "Adam" decouples weight
    decay by default (adam_w_mode), so it maps to torch.optim.AdamW unless adam_w_mode is false."""
    if not isinstance(name, str):
        raise ValueError(f'Invalid optimizer "type": {name!r} (must be a string such as "AdamW")')
    candidates = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
                  if isinstance(getattr(torch.optim, n), type)
                  and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                  and not issubclass(getattr(torch.optim, n), FSAM)}
    cls = candidates.get(name.lower())
    if cls is None:
        raise ValueError(f'Unknown base optimizer "type": {name!r}; use a torch.optim optimizer, '
                         f"e.g. one of {sorted(c.__name__ for c in candidates.values())[:12]}")
    return cls


def _base_optimizer_from_block(block) -> tuple:
    if block is None:
        raise ValueError('The config has no "optimizer" block naming the base optimizer, e.g. '
                         '"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}')
    if not isinstance(block, dict) or "type" not in block:
        raise ValueError('The "optimizer" config block must be an object with a "type", e.g. '
                         '{"type": "AdamW", "params": {"lr": 1e-5}}')
    params = dict(block.get("params", {}))
    cls = resolve_optimizer_class(block["type"])
    if block["type"].lower() == "adam" and params.get("adam_w_mode", True):
        cls = torch.optim.AdamW
    for key in _DEEPSPEED_ONLY_PARAMS:
        params.pop(key, None)
    return cls, params


def split_optimizer_config(config: dict):
    """(base optimizer class, its kwargs, FSAMConfig) from either an "fsam" block next to a plain
    "optimizer" block, or an {"optimizer": {"type": "FSAM", "params": {...}}} block."""
    opt_block = config.get("optimizer")
    if opt_block is None:
        raise ValueError('The config has no "optimizer" block naming the base optimizer, e.g. '
                         '"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}')
    if isinstance(opt_block, dict) and str(opt_block.get("type", "")).lower() == "fsam":
        if "fsam" in config:
            raise ValueError('Give the FSAM settings once: either an "fsam" block or '
                             '"optimizer": {"type": "FSAM", "params": {...}}, not both')
        params = dict(opt_block.get("params", {}))
        fsam_block = {k: params.pop(k) for k in list(params) if k in _FSAM_KEYS}
        base_name = params.pop("base_optimizer", "AdamW")
        cls, kwargs = _base_optimizer_from_block({"type": base_name, "params": params})
    else:
        if "fsam" not in config:
            raise ValueError('The config has no "fsam" block; add e.g. "fsam": {"rho": 0.05, '
                             '"sparsity": 0.9, "mask_interval": 100} (sparsity 0 is SAM)')
        fsam_block = config["fsam"]
        cls, kwargs = _base_optimizer_from_block(opt_block)
    return cls, kwargs, FSAMConfig.from_dict(fsam_block)


def _deepspeed_config_for_client_optimizer(config: dict) -> dict:
    ds_config = {k: v for k, v in config.items() if k not in ("fsam", "optimizer")}
    zero = ds_config.get("zero_optimization", {}) or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none", "cpu"):
        raise ValueError(f'zero_optimization.offload_optimizer.device "{offload}" is not supported '
                         'by fsam_ds; use "cpu" (FSAM perturbs the fp32 shards in place)')
    if offload == "cpu" and (zero.get("offload_optimizer") or {}).get("ratio", 1.0) != 1.0:
        raise ValueError("zero_optimization.offload_optimizer.ratio < 1 needs DeepSpeedCPUAdam; "
                         "remove \"ratio\" to offload the whole optimizer with FSAM")
    # FSAM is a client optimizer DeepSpeed does not list; with offload it must not be replaced by
    # DeepSpeedCPUAdam (which would silently drop FSAM).
    ds_config["zero_allow_untested_optimizer"] = True
    if offload == "cpu":
        ds_config["zero_force_ds_cpu_optimizer"] = False
    return ds_config


def initialize(model, config, model_parameters=None, **deepspeed_kwargs):
    """Like deepspeed.initialize, with FSAM (from the config's "fsam" and "optimizer" blocks) as
    the client optimizer. Returns (engine, optimizer, training_dataloader, lr_scheduler)."""
    import deepspeed

    config = load_config(config)
    base_cls, base_kwargs, fsam_config = split_optimizer_config(config)
    if "optimizer" in deepspeed_kwargs:
        raise ValueError("fsam_ds.initialize builds the optimizer from the config; do not pass optimizer=")
    ds_config = _deepspeed_config_for_client_optimizer(config)
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    model_parameters = list(model_parameters)
    with warnings.catch_warnings():
        # names come from the engine's module at attach time, not from the parameter list
        warnings.filterwarnings("ignore", message="FSAM got parameters without names")
        try:
            fsam = FSAM(model_parameters, base_cls, **fsam_config.__dict__, **base_kwargs)
        except TypeError as err:
            raise ValueError(f'Invalid "optimizer" params {sorted(base_kwargs)} for '
                             f"{base_cls.__name__}: {err}") from None
    fsam.allow_base_steps = True  # DeepSpeed's fp16/bf16 wrappers step once at construction
    result = deepspeed.initialize(model=model, optimizer=fsam, config=ds_config,
                                  model_parameters=model_parameters, **deepspeed_kwargs)
    _attach(result[0])
    return result


def initialize_base(model, config, model_parameters=None, **deepspeed_kwargs):
    """Plain DeepSpeed training with the torch base optimizer that fsam_ds.initialize would wrap
    (the config's "optimizer" block; any "fsam" block is ignored): a like-for-like AdamW baseline."""
    import deepspeed

    config = load_config(config)
    base_cls, base_kwargs = _base_optimizer_from_block(config.get("optimizer"))
    ds_config = _deepspeed_config_for_client_optimizer(config)
    params = list(model_parameters) if model_parameters is not None else [
        p for p in model.parameters() if p.requires_grad]
    try:
        base = base_cls(params, **base_kwargs)
    except TypeError as err:
        raise ValueError(f'Invalid "optimizer" params {sorted(base_kwargs)} for '
                         f"{base_cls.__name__}: {err}") from None
    return deepspeed.initialize(model=model, optimizer=base, config=ds_config,
                                model_parameters=params, **deepspeed_kwargs)


def _attach(engine) -> deepspeed_adapter.EngineView:
    view = getattr(engine, "_fsam_view", None)
    if view is None:
        fsam = deepspeed_adapter.engine_client_optimizer(engine)
        if not isinstance(fsam, FSAM):
            raise ValueError("fsam_ds.train_step needs an engine whose optimizer is FSAM; build it "
                             'with fsam_ds.initialize or {"optimizer": {"type": "FSAM", ...}}')
        view = deepspeed_adapter.attach(engine, fsam)
        fsam.set_shard_layouts(view.layouts, view.process_group,
                               clone_captured_grads=not view.grads_outlive_step)
        fsam.allow_base_steps = False
        engine._fsam_view = view
        engine._fsam = fsam
    return view


# Named ranges for torch.profiler (bench/profile_step.py); near free when no profiler runs.
_region = torch.profiler.record_function


def _mean(losses) -> float:
    return float(torch.stack([l.detach().float() for l in losses]).mean())


def train_step(engine, loss_fn, micro_batches) -> float:
    """One FSAM step over the micro-batches of one global batch (len == gradient_accumulation_steps).
    loss_fn(engine, micro_batch) -> scalar loss. Returns this rank's mean first-pass loss.
    After the call `engine._fsam.last_stats` holds the threshold, mask density, gradient norm,
    the second-pass loss and the sharpness L(w+e) - L(w) (this rank's micro-batches)."""
    view = _attach(engine)
    fsam = engine._fsam
    micro_batches = list(micro_batches)
    gas = engine.gradient_accumulation_steps()
    if len(micro_batches) != gas:
        raise ValueError(f"train_step got {len(micro_batches)} micro-batches but the config's "
                         f"gradient_accumulation_steps is {gas}; pass one global batch's micro-batches")

    # 1. first pass at w: the wrapper reduces, clips and hands FSAM the gradients (captured only)
    first_losses = []
    with _region("fsam.first_pass"):
        for i, batch in enumerate(micro_batches):
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            first_losses.append(loss)
            if i < gas - 1:
                engine.step()   # not a boundary: only advances DeepSpeed's micro-step counter
    fsam.begin_capture()
    try:
        with _region("fsam.first_pass_optimizer_step"):
            overflow = view.first_pass_optimizer_step()
        # 2. norm, mask and e on the local shards; DeepSpeed publishes the perturbed shards
        with _region("fsam.perturb"):
            perturbed = fsam.perturb_captured()
        if perturbed:
            with _region("fsam.publish"):
                view.publish_master_weights()
        if overflow:
            # The wrapper found inf/NaN in the first-pass gradients (fp16 overflow, or a non-finite
            # gradient in bf16/fp32) and skipped. The whole FSAM step is skipped, as DeepSpeed skips
            # a plain step: w untouched, loss scale lowered, the step counted as skipped.
            view.record_skipped_step()
            fsam.end_step()
            fsam.last_stats.update(loss=_mean(first_losses), skipped=True)
            return _mean(first_losses)
        # 3. second pass at w + e; the engine's step restores w and takes the base step
        second_losses = []
        with _region("fsam.second_pass"):   # engine.step() restores w and takes the base step
            for batch in micro_batches:
                loss = loss_fn(engine, batch)
                engine.backward(loss)
                second_losses.append(loss)
                engine.step()
    except BaseException:
        _abandon_step(engine, view, fsam)
        raise
    # an overflow in the second pass makes the wrapper skip our step(): undo e here
    if fsam.restore_remaining():
        view.publish_master_weights()
    fsam.end_step()
    view.link_optimizer_state()
    first, second = _mean(first_losses), _mean(second_losses)
    fsam.last_stats.update(loss=first, perturbed_loss=second, sharpness=second - first,
                           skipped=bool(getattr(engine.optimizer, "overflow", False)))
    return first


def _abandon_step(engine, view, fsam) -> None:
    """An exception mid-step: put the unperturbed weights back so no training state is lost."""
    try:
        if fsam.restore_remaining():
            view.publish_master_weights()
        engine.optimizer.zero_grad()
    finally:
        fsam.abort_step()
