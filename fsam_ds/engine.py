"""DeepSpeed entry points: `initialize` (config -> engine with an FSAM client optimizer) and
`train_step` (one FSAM step = two passes over one global batch = one DeepSpeed optimizer step).

One FSAM step under DeepSpeed, on every rank:
  1. first pass: forward/backward over the micro-batches; the wrapper's step() reduces, unscales and
     clips the gradients and hands each fp32 shard to FSAM, which only captures it; the loss
     scaler's update of that step is undone (the second pass's step makes the step's one update);
  2. FSAMCore: one all-reduce of the step plan (norm, refresh, counts), the mask if the plan says
     so (exact sharded threshold), the perturbation of the local shards, which DeepSpeed's own
     machinery publishes to the model (copy + all-gather / re-partition);
  3. second pass: forward/backward again, then engine.step(): the wrapper calls FSAM's step(), which
     restores the shard bit-exactly and steps the base optimizer; clipping, the LR schedule, the
     loss scale and global_steps advance once, as for a plain optimizer.
Steps that do not perturb (rho == 0, the plain steps of "sam_interval") are one plain DeepSpeed
step: one pass, engine.step().
"""
from __future__ import annotations

import copy
import json
import os

import torch

from fsam_ds import collectives, deepspeed_adapter
from fsam_ds.config import FSAMConfig
from fsam_ds.deepspeed_client import (CAPTURE, PLAIN, RESTORE, FSAMDeepSpeedClient,
                                      resolve_optimizer_class)

_FSAM_KEYS = FSAMConfig.field_names()
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


def _auto_values(node, path=""):
    """Paths of the values still "auto" (Hugging Face's placeholder) in a config."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_values(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


def refuse_unsupported_config(config: dict, deepspeed_kwargs: dict) -> None:
    """Settings FSAM would follow silently wrong, refused before DeepSpeed builds anything (the
    engine hook refuses them again for engines built by plain deepspeed.initialize)."""
    auto = _auto_values(config)
    if auto:
        raise ValueError(f'DeepSpeed config values {auto} are "auto", which only a launcher that '
                         "knows the run can fill in (launch/train.py, fsam_ds.hf.FSAMTrainer, "
                         "transformers' Trainer); give numbers when calling fsam_ds.initialize, "
                         "e.g. warmup_num_steps = 10% of the run's optimizer steps.")
    if deepspeed_kwargs.get("mpu") is not None:
        raise ValueError("fsam_ds does not support tensor/pipeline model parallelism (mpu=...): the "
                         "Fisher threshold and gradient norm would count each rank's slice as the "
                         "whole model. Use ZeRO data parallelism only.")
    autotp = (config.get("tensor_parallel") or {}).get("autotp_size", 1)
    if isinstance(autotp, int) and autotp > 1:
        raise ValueError(f'"tensor_parallel": {{"autotp_size": {autotp}}} is not supported by '
                         "fsam_ds (the threshold and norm would count each slice as the whole); "
                         "remove it and use ZeRO data parallelism.")
    if config.get("managed_gradient_accumulation", True) is False:
        raise ValueError('"managed_gradient_accumulation": false is not supported by fsam_ds: '
                         "train_step runs both passes over gradient_accumulation_steps micro-batches "
                         "itself; remove the setting.")


def _build_client(params, base_cls, base_kwargs, fsam_config):
    try:
        return FSAMDeepSpeedClient(params, base_cls, config=fsam_config, **base_kwargs)
    except TypeError as err:
        raise ValueError(f'Invalid "optimizer" params {sorted(base_kwargs)} for '
                         f"{base_cls.__name__}: {err}") from None


def initialize(model, config, model_parameters=None, share_fp32_master=True, **deepspeed_kwargs):
    """Like deepspeed.initialize, with FSAM (from the config's "fsam" and "optimizer" blocks) as
    the client optimizer. Returns (engine, optimizer, training_dataloader, lr_scheduler).
    share_fp32_master: under ZeRO-3 with fp32 parameters, the fp32 master partition and the
    parameter partition share one storage (DeepSpeed keeps two equal copies; the same training,
    bit for bit, with 4 bytes per parameter / world size less). Any FSAM engine gets it, also
    one built by plain deepspeed.initialize or Hugging Face Trainer."""
    import deepspeed

    config = load_config(config)
    base_cls, base_kwargs, fsam_config = split_optimizer_config(config)
    if "optimizer" in deepspeed_kwargs:
        raise ValueError("fsam_ds.initialize builds the optimizer from the config; do not pass optimizer=")
    refuse_unsupported_config(config, deepspeed_kwargs)
    ds_config = _deepspeed_config_for_client_optimizer(config)
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    model_parameters = list(model_parameters)
    client = _build_client(model_parameters, base_cls, base_kwargs, fsam_config)
    client.share_fp32_master = share_fp32_master
    result = deepspeed.initialize(model=model, optimizer=client, config=ds_config,
                                  model_parameters=model_parameters, **deepspeed_kwargs)
    _attach(result[0])
    return result


def initialize_base(model, config, model_parameters=None, share_fp32_master=True, **deepspeed_kwargs):
    """Plain DeepSpeed training with the torch base optimizer that fsam_ds.initialize would wrap
    (the config's "optimizer" block; any "fsam" block is ignored): a like-for-like AdamW baseline,
    with the same ZeRO-3 fp32 master sharing as fsam_ds.initialize."""
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
    result = deepspeed.initialize(model=model, optimizer=base, config=ds_config,
                                  model_parameters=params, **deepspeed_kwargs)
    if share_fp32_master:
        deepspeed_adapter.share_zero3_fp32_master(result[0])
    return result


def _attach(engine) -> FSAMDeepSpeedClient:
    client = deepspeed_adapter.engine_client_optimizer(engine)
    if not isinstance(client, FSAMDeepSpeedClient):
        raise ValueError("fsam_ds.train_step needs an engine whose optimizer is FSAM; build it "
                         'with fsam_ds.initialize or {"optimizer": {"type": "FSAM", ...}}')
    if client.view is None or client.view.engine is not engine:
        client.view = deepspeed_adapter.attach(engine, client)
        client.core.process_group = client.view.process_group
        engine._fsam = client
    return client


# Named ranges for torch.profiler (bench/profile_step.py); near free when no profiler runs.
_region = torch.profiler.record_function


def _group_mean(losses, group) -> list:
    """Each list's mean loss over this rank's micro-batches, then over the data-parallel group (one
    all-reduce), so that every rank reports the same values."""
    local = torch.stack([torch.stack([l.detach().float() for l in ls]).mean() if ls else
                         torch.zeros(()) for ls in losses]).double()
    size = collectives.group_size(group)
    return [v / size for v in collectives.all_reduce_sum_(local, group).tolist()]


def train_step(engine, loss_fn, micro_batches) -> float:
    """One FSAM step over the micro-batches of one global batch (len == gradient_accumulation_steps).
    loss_fn(engine, micro_batch) -> scalar loss. Returns the mean first-pass loss over the
    data-parallel group. After the call `engine._fsam.last_stats` holds the threshold, mask
    density, first-pass gradient norm (before clipping), perturbation norm, the second-pass loss
    and the sharpness L(w+e) - L(w), equal on every rank, and "perturbed": whether this step took
    the two-pass FSAM step (False on the plain steps of sam_interval > 1 and on skipped steps)."""
    client = _attach(engine)
    view, core = client.view, client.core
    micro_batches = list(micro_batches)
    gas = engine.gradient_accumulation_steps()
    if len(micro_batches) != gas:
        raise ValueError(f"train_step got {len(micro_batches)} micro-batches but the config's "
                         f"gradient_accumulation_steps is {gas}; pass one global batch's micro-batches")
    loss_group = view.data_parallel_group()
    micro_steps_after = engine.micro_steps + gas   # where a completed (or abandoned) step ends
    if not core.perturbs_this_step():
        return _plain_step(engine, client, loss_fn, micro_batches, loss_group, micro_steps_after)

    # 1. first pass at w: the wrapper reduces, clips and hands FSAM the gradients (captured only)
    first_losses = []
    with _region("fsam.first_pass"):
        for i, batch in enumerate(micro_batches):
            loss = loss_fn(engine, batch)
            engine.backward(loss)
            first_losses.append(loss)
            if i < gas - 1:
                engine.step()   # not a boundary: only advances DeepSpeed's micro-step counter
    scale_before = view.loss_scale_snapshot()

    def captured_by_wrapper_step():
        # the wrapper's whole step, the client capturing its (reduced, clipped) gradients
        with client.in_mode(CAPTURE):
            engine.optimizer.step()
        captured = client.take_captured()
        return None if getattr(engine.optimizer, "overflow", False) else captured

    try:
        with _region("fsam.first_pass_gradients"):
            first = view.first_pass_gradients(captured_by_wrapper_step)
        if first.overflow:
            # inf/NaN in the first-pass gradients (fp16 overflow, or non-finite in bf16/fp32): the
            # wrapper skipped and lowered the loss scale once. The whole FSAM step is skipped, as
            # DeepSpeed skips a plain step: w untouched, the step counted as skipped.
            view.end_first_pass()
            view.record_skipped_step()
            first_loss, = _group_mean([first_losses], loss_group)
            core.last_stats = {**core.last_stats, "loss": first_loss, "skipped": True,
                               "perturbed": False, "grad_norm": float("inf")}
            return first_loss
        scale_before.restore()   # the second pass's engine.step() makes this step's one update
        # 2. the step plan, the mask if due, e on the local shards; DeepSpeed publishes them
        with _region("fsam.perturb"):
            core.perturb(first.slots, adam_state=lambda w: client.state.get(w, {}),
                         reported_grad_norm=first.grad_norm)
        del first
        with _region("fsam.publish"):
            view.publish_master_weights()
        view.end_first_pass()
        # 3. second pass at w + e; the engine's step restores w and takes the base step
        with client.in_mode(RESTORE), _region("fsam.second_pass"):
            second_losses = _pass_with_steps(engine, loss_fn, micro_batches)
    except BaseException:
        _abandon_step(engine, view, client, micro_steps_after)
        raise
    # an overflow in the second pass makes the wrapper skip our step(): undo e here
    if core.restore_all():
        view.publish_master_weights()
    skipped = bool(getattr(engine.optimizer, "overflow", False))
    core.finish_step(base_stepped=not skipped)
    view.link_optimizer_state()
    first_loss, second = _group_mean([first_losses, second_losses], loss_group)
    core.last_stats.update(loss=first_loss, perturbed_loss=second, sharpness=second - first_loss,
                           skipped=skipped)
    return first_loss


def _pass_with_steps(engine, loss_fn, micro_batches) -> list:
    """forward, backward and engine.step() per micro-batch (the last one is the boundary)."""
    losses = []
    for batch in micro_batches:
        loss = loss_fn(engine, batch)
        engine.backward(loss)
        losses.append(loss)
        engine.step()
    return losses


def _plain_step(engine, client, loss_fn, micro_batches, loss_group, micro_steps_after) -> float:
    """One pass and one base-optimizer step through the engine, as plain DeepSpeed training."""
    try:
        with client.in_mode(PLAIN), _region("fsam.plain_step"):
            losses = _pass_with_steps(engine, loss_fn, micro_batches)
    except BaseException:
        engine.optimizer.zero_grad()
        engine.micro_steps = micro_steps_after
        raise
    skipped = bool(getattr(engine.optimizer, "overflow", False))
    client.core.finish_step(base_stepped=not skipped)
    client.view.link_optimizer_state()
    first, = _group_mean([losses], loss_group)
    norm = engine.get_global_grad_norm()
    client.core.last_stats = {"loss": first, "skipped": skipped, "perturbed": False,
                              "grad_norm": None if norm is None else float(norm)}
    return first


def _abandon_step(engine, view, client, micro_steps_after: int) -> None:
    """An exception mid-step: put the unperturbed weights back so no training state is lost, drop
    the step's gradients, and end its micro-steps where a skipped step would, so that the next
    step's accumulation boundaries fall where they should."""
    try:
        if client.core.restore_all():
            view.publish_master_weights()
        view.discard_first_pass()
        engine.optimizer.zero_grad()
        engine.micro_steps = micro_steps_after
    finally:
        client.take_captured()
        client.core.abort_step()
