"""Hugging Face integration: `FSAMTrainer` / `FSAMTrainerMixin` (transformers.Trainer, TRL trainers)
and `prepare_with_fsam` for custom Accelerate loops, all stepping through `fsam_ds.train_step`.

    trainer = FSAMTrainer(model=model, args=TrainingArguments(deepspeed="ds_zero2_fsam.json"), ...)
    class MySFT(FSAMTrainerMixin, trl.SFTTrainer): ...

How one Trainer optimizer step becomes one FSAM step:
  1. Trainer calls `training_step` once per micro-batch; the mixin buffers the micro-batches of the
     optimizer step (Trainer prefetches exactly them: `current_gradient_accumulation_steps`).
  2. On the last one it runs both passes over all of them:
     DeepSpeed: `fsam_ds.train_step(engine, loss_fn, micro_batches)`; the engine's own clipping, LR
       schedule (a config "scheduler") and step counters advance once.
     no DeepSpeed (one process, DDP): first pass + `FSAM.first_step`, second pass; the Trainer's
       own clipping then clips g' and its `optimizer.step()` is `FSAM.second_step`.
  3. Trainer's step bookkeeping follows as for any optimizer: under DeepSpeed Accelerate's
     optimizer/scheduler wrappers are no-ops; a Trainer-made (HF) LR scheduler steps once.

Short last accumulation group of an epoch (n < gradient_accumulation_steps micro-batches): like the
Trainer with a plain optimizer, it is one optimizer step whose gradient is the mean over its n
micro-batches. Under DeepSpeed, where train_step needs exactly gradient_accumulation_steps
micro-batches, the group is padded with copies of its last micro-batch whose loss is multiplied by
0 (exact zero gradients; the padding costs gradient_accumulation_steps - n extra forward/backward
per pass), and the real losses are scaled by gradient_accumulation_steps / n.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil

import torch
import torch.distributed as dist

import fsam_ds
from fsam_ds.config import FSAMConfig
from fsam_ds.deepspeed_client import FSAMDeepSpeedClient
from fsam_ds.optimizer import FSAM

_FSAM_OPTIMIZERS = (FSAM, FSAMDeepSpeedClient)

logger = logging.getLogger(__name__)

STAGING_DIR = ".fsam_staging"   # checkpoints are written here, then renamed into place
# What trainers record inside compute_loss (TRL: token accuracy, entropy, token count): kept from
# the first pass only, so the second pass (at w + e) and padding micro-batches leave no trace.
_COMPUTE_LOSS_RECORDS = ("_metrics", "_total_train_tokens")


# ------------------------------------------------------------------------------------ config
def _fsam_blocks_from_config(ds_config: dict):
    """(base optimizer class, base kwargs, FSAMConfig) from an "fsam" block or an "FSAM" optimizer
    type in a DeepSpeed config; None if the config names no FSAM."""
    from fsam_ds.engine import split_optimizer_config
    opt = ds_config.get("optimizer")
    names_fsam = isinstance(opt, dict) and str(opt.get("type", "")).lower() == "fsam"
    if "fsam" not in ds_config and not names_fsam:
        return None
    if opt is None:   # an "fsam" block, the base optimizer from TrainingArguments (optim=...)
        return None, None, FSAMConfig.from_dict(ds_config["fsam"])
    base_cls, base_kwargs, fsam_config = split_optimizer_config(ds_config)
    autos = sorted(k for k, v in base_kwargs.items() if v == "auto")
    if autos:
        raise ValueError(f'The DeepSpeed config\'s optimizer params {autos} are "auto" and nothing '
                         "filled them in; give numbers (\"auto\" is filled from TrainingArguments "
                         "only for lr, betas, eps and weight_decay)")
    return base_cls, base_kwargs, fsam_config


def _check_client_optimizer_config(ds_config: dict) -> None:
    """FSAM becomes DeepSpeed's client optimizer: DeepSpeed must accept it and keep it."""
    zero = ds_config.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none", "cpu"):
        raise ValueError(f'zero_optimization.offload_optimizer.device "{offload}" is not supported '
                         'by FSAM; use "cpu" or "none"')
    ds_config["zero_allow_untested_optimizer"] = True
    if offload == "cpu":
        # otherwise Accelerate swaps the client optimizer for DeepSpeedCPUAdam: FSAM would be dropped
        ds_config["zero_force_ds_cpu_optimizer"] = False


def decay_parameter_groups(model, weight_decay: float, named: bool = False):
    """Trainer's usual split: weight decay for weights, none for biases and norm parameters."""
    from transformers.trainer_pt_utils import get_parameter_names
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    decay = set(get_parameter_names(model, ALL_LAYERNORM_LAYERS, ["bias", "layernorm", "rmsnorm"]))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [(n, p) for n, p in params if n in decay], "weight_decay": weight_decay},
              {"params": [(n, p) for n, p in params if n not in decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not named:
        for g in groups:
            g["params"] = [p for _, p in g["params"]]
    return groups


def _make_fsam(groups, base_cls, base_kwargs, fsam_config: FSAMConfig, for_deepspeed: bool):
    settings = fsam_config.to_dict()
    try:
        if for_deepspeed:
            # the optimizer class DeepSpeed itself builds for {"type": "FSAM"}: names come from the
            # engine at attach time; DeepSpeed's set-up steps are allowed until the engine exists
            return torch.optim.FSAM(groups, base_optimizer=base_cls, **settings, **base_kwargs)
        return _TrainerFSAM(groups, base_cls, **settings, **base_kwargs)
    except TypeError as err:
        raise ValueError(f"Invalid base optimizer arguments {sorted(base_kwargs)} for "
                         f"{base_cls.__name__}: {err}") from None


class _TrainerFSAM(FSAM):
    """FSAM without DeepSpeed, driven by the Trainer: the mixin calls first_step(); the Trainer's
    own optimizer.step() (after its clipping of g') is the second step."""

    _first_step_done = False

    def first_step(self, zero_grad: bool = False):
        super().first_step(zero_grad)
        self._first_step_done = True

    def step(self, closure=None):
        if closure is None and self._first_step_done:
            self._first_step_done = False
            self.second_step()
            return None
        return super().step(closure)


def _reduce_mean(values: list[float], device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                     device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def repair_cpu_deepspeed_state(args) -> bool:
    """TrainingArguments(deepspeed=...) on CPU-only ranks: transformers 5.23 asks Accelerate 1.15 for
    a DeepSpeed state without a backend, Accelerate finds no GPU and reports one process per rank,
    so the "auto" batch sizes are filled for world size 1 and DeepSpeed's train_batch_size check
    fails. Redo the state with a gloo backend and refill the config, as transformers does for
    hyper-parameter sweeps. Returns True when it repaired something; a no-op on GPUs."""
    want = int(os.environ.get("WORLD_SIZE", "1"))
    if not args.deepspeed or want <= 1 or torch.cuda.is_available() or args.world_size == want:
        return False
    from datetime import timedelta
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    AcceleratorState._reset_state(reset_partial_state=True)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        args.distributed_state = PartialState(backend=args.ddp_backend or "gloo",
                                              timeout=timedelta(seconds=args.ddp_timeout))
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED")
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    if args.world_size != want:
        raise ValueError(f"DeepSpeed on CPU: Accelerate reports {args.world_size} processes but "
                         f"WORLD_SIZE is {want}; initialize torch.distributed (gloo) before "
                         "TrainingArguments")
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)
    return True


# ------------------------------------------------------------------------------------ Trainer
class FSAMTrainerMixin:
    """Makes a transformers.Trainer (or a subclass such as trl.SFTTrainer) take real FSAM steps.
    Put it first: `class MySFT(FSAMTrainerMixin, trl.SFTTrainer)`.

    FSAM's settings: the DeepSpeed config's "fsam" block (with a plain "optimizer" block, or none:
    then the base optimizer is TrainingArguments' `optim`), or {"optimizer": {"type": "FSAM",
    "params": {"base_optimizer": "AdamW", ...}}}; without DeepSpeed, the `fsam=` argument (a dict
    or FSAMConfig; defaults to FSAMConfig()) around the base optimizer TrainingArguments name.
    Anything FSAM cannot honour raises a ValueError naming the setting; never a silent AdamW.
    """

    def __init__(self, *args, fsam: dict | FSAMConfig | None = None, **kwargs):
        self._fsam_arg = FSAMConfig.from_dict(fsam) if isinstance(fsam, dict) else fsam
        self._fsam_spec = None          # (base class or None, base kwargs or None, FSAMConfig)
        self._fsam_buffer: list = []    # micro-batches of the current optimizer step
        self._fsam_window: dict = {}    # signal -> list of per-step values since the last log
        self._fsam_last_grad_norm = None
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers and optimizers[0] is not None and not isinstance(optimizers[0], _FSAM_OPTIMIZERS):
            raise ValueError(f"{type(self).__name__} got optimizers=({type(optimizers[0]).__name__}, "
                             "...): it builds FSAM itself; drop `optimizers` (or pass an fsam_ds.FSAM "
                             "when not using DeepSpeed)")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            repair_cpu_deepspeed_state(training_args)
        super().__init__(*args, **kwargs)

    # ---- set-up ------------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        args = self.args
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError("FSAMTrainer does not support FSDP (--fsdp); use DeepSpeed ZeRO-2/3 "
                             "(TrainingArguments(deepspeed=...)) for sharded training")
        if not self.is_deepspeed_enabled:
            if args.fp16:
                raise ValueError("fp16=True without DeepSpeed is not supported by FSAMTrainer (the "
                                 "GradScaler would skip half of an FSAM step); use bf16=True, or "
                                 "DeepSpeed with an \"fp16\" block")
            self._fsam_spec = (None, None, self._fsam_arg or FSAMConfig())
            return
        hf_config = self.accelerator.state.deepspeed_plugin.hf_ds_config
        ds_config = hf_config.config
        # A second Trainer on the same TrainingArguments finds the blocks already taken out.
        spec = getattr(hf_config, "_fsam_spec", None) or _fsam_blocks_from_config(ds_config)
        if spec is not None and self._fsam_arg is not None:
            raise ValueError('Give the FSAM settings once: the DeepSpeed config names FSAM (an "fsam" '
                             "block or the FSAM optimizer type), so drop the fsam= argument")
        if spec is None:
            if self._fsam_arg is None:
                raise ValueError(
                    f"{type(self).__name__}: the DeepSpeed config {args.deepspeed!r} has no \"fsam\" "
                    'block and its optimizer is not "FSAM"; add e.g. "fsam": {"rho": 0.05, '
                    '"sparsity": 0.9, "mask_interval": 100} (or pass fsam={...})')
            spec = (None, None, self._fsam_arg)
            if "optimizer" in ds_config:
                spec = _fsam_blocks_from_config({**ds_config, "fsam": self._fsam_arg.to_dict()})
        hf_config._fsam_spec = spec
        self._fsam_spec = spec
        # Trainer then builds FSAM with create_optimizer (as for a Trainer-made optimizer) and
        # Accelerate hands it to deepspeed.initialize as the client optimizer.
        ds_config.pop("fsam", None)
        ds_config.pop("optimizer", None)
        _check_client_optimizer_config(ds_config)
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin.deepspeed_config is not ds_config:
            plugin.deepspeed_config.pop("fsam", None)
            plugin.deepspeed_config.pop("optimizer", None)
            _check_client_optimizer_config(plugin.deepspeed_config)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            if not isinstance(self.optimizer, _FSAM_OPTIMIZERS):
                raise ValueError(f"{type(self).__name__} needs an FSAM optimizer, got "
                                 f"{type(self.optimizer).__name__}")
            return self.optimizer
        opt_model = self.model if model is None else model
        base_cls, base_kwargs, fsam_config = self._fsam_spec
        if base_cls is None:
            if self.optimizer_cls_and_kwargs is not None:
                base_cls, base_kwargs = self.optimizer_cls_and_kwargs
            else:
                base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)) \
                    or getattr(base_cls, "_is_fsam", False):
                raise ValueError(f"TrainingArguments optim={self.args.optim!r} gives "
                                 f"{getattr(base_cls, '__name__', base_cls)}, which FSAM cannot wrap; "
                                 'use a torch.optim optimizer such as optim="adamw_torch"')
            base_kwargs = dict(base_kwargs)
            if self.is_deepspeed_enabled:
                base_kwargs.pop("fused", None)   # DeepSpeed steps fp32 shards; keep it portable
        base_kwargs = dict(base_kwargs)
        weight_decay = base_kwargs.pop("weight_decay", self.args.weight_decay)
        groups = decay_parameter_groups(opt_model, weight_decay, named=not self.is_deepspeed_enabled)
        self.optimizer = _make_fsam(groups, base_cls, base_kwargs, fsam_config,
                                    for_deepspeed=self.is_deepspeed_enabled)
        return self.optimizer

    # ---- one optimizer step = one FSAM step -------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        group_size = getattr(self, "current_gradient_accumulation_steps", None) or \
            self.args.gradient_accumulation_steps
        self._fsam_buffer.append(inputs)
        if len(self._fsam_buffer) < group_size:
            return torch.zeros((), device=self.args.device)   # counted in the step's last call
        batches, self._fsam_buffer = self._fsam_buffer, []
        model.train()
        batches = [self._prepare_inputs(b) for b in batches]
        # this replaces the training_step of the Trainer and of subclasses (e.g. TRL's): enter the
        # context TRL's SFT/DPO training_step adds (activation offloading), if any
        offload = getattr(self, "maybe_activation_offload_context", None) or contextlib.nullcontext()
        with offload:
            if self.is_deepspeed_enabled:
                first, second, stats = self._fsam_deepspeed_step(model, batches, num_items_in_batch)
            else:
                first, second, stats = self._fsam_torch_step(model, batches, num_items_in_batch)
        self._record_signals(first, second, stats)
        return first.detach().to(self.args.device)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The Trainer's own rule (training_step): is compute_loss already normalized over the
        whole accumulated batch (num_items_in_batch), or a per-micro-batch mean?"""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            self.compute_loss_func is not None

    def _micro_batch_loss(self, model, batch, num_items_in_batch):
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        return loss

    def _snapshot_records(self) -> dict:
        return {name: copy.deepcopy(getattr(self, name)) for name in _COMPUTE_LOSS_RECORDS
                if hasattr(self, name)}

    def _restore_records(self, saved: dict) -> None:
        for name, value in saved.items():
            setattr(self, name, value)

    def _fsam_deepspeed_step(self, engine, batches, num_items_in_batch):
        gas = engine.gradient_accumulation_steps()
        n = len(batches)
        if n > gas:
            raise ValueError(f"{n} micro-batches for one optimizer step but DeepSpeed's "
                             f"gradient_accumulation_steps is {gas}")
        scaled = self._loss_is_scaled_for_ga(num_items_in_batch)
        # DeepSpeed's backward divides by gas; the Trainer's convention for the loss it would
        # backpropagate is loss / n (per-micro-batch means) or loss (already normalized).
        factor = gas if scaled else gas / n
        reported = []   # the Trainer-convention loss of every call, first pass then second
        first_pass_records = {}

        def loss_fn(eng, item):
            index, batch = item
            if len(reported) == gas:   # the second pass starts
                first_pass_records.update(self._snapshot_records())
            if index >= n:   # padding of a short group: exact zero gradients, no records
                saved = self._snapshot_records()
                loss = self._micro_batch_loss(eng, batch, num_items_in_batch)
                self._restore_records(saved)
                reported.append(None)
                return loss * 0.0
            loss = self._micro_batch_loss(eng, batch, num_items_in_batch)
            reported.append(loss.detach().float() if scaled else loss.detach().float() / n)
            return loss if factor == 1 else loss * factor

        items = [(i, batches[min(i, n - 1)]) for i in range(gas)]
        fsam_ds.train_step(engine, loss_fn, items)
        self._restore_records(first_pass_records)
        stats = dict(engine._fsam.last_stats)
        first = torch.stack([r for r in reported[:gas] if r is not None]).sum()
        second_part = [r for r in reported[gas:] if r is not None]
        second = torch.stack(second_part).sum() if second_part else None
        return first, second, stats

    def _fsam_torch_step(self, model, batches, num_items_in_batch):
        opt = self.optimizer
        while not isinstance(opt, _FSAM_OPTIMIZERS) and hasattr(opt, "optimizer"):
            opt = opt.optimizer   # AcceleratedOptimizer -> FSAM
        scaled = self._loss_is_scaled_for_ga(num_items_in_batch)
        n = len(batches)

        def one_pass():
            total = 0.0
            for j, batch in enumerate(batches):
                sync = contextlib.nullcontext() if j == n - 1 else self.accelerator.no_sync(model)
                with sync:
                    loss = self._micro_batch_loss(model, batch, num_items_in_batch)
                    if not scaled:
                        loss = loss / n
                    self.accelerator.backward(loss)
                total = total + loss.detach().float()
            return total

        first = one_pass()
        opt.first_step(zero_grad=True)      # w -> w + e on the masked elements
        first_pass_records = self._snapshot_records()
        second = one_pass()                 # g' at w + e; the Trainer clips it, then second_step
        self._restore_records(first_pass_records)
        return first, second, dict(opt.last_stats)

    def _record_signals(self, first, second, stats):
        losses = [float(first), float(second) if second is not None else float(first)]
        first_loss, second_loss = _reduce_mean(losses, self.args.device)
        values = {"loss": first_loss, "perturbed_loss": second_loss,
                  "sharpness": second_loss - first_loss}
        for key in ("threshold", "mask_density", "grad_norm", "perturbation_norm"):
            if stats.get(key) is not None:
                values[key] = float(stats[key])
        for key, value in values.items():
            self._fsam_window.setdefault(key, []).append(value)
        self._fsam_last_grad_norm = values.get("grad_norm")

    # the Trainer's clipping and grad-norm report around our step
    def _clip_grad_norm(self, model):
        if self.is_deepspeed_enabled:
            return None   # DeepSpeed clipped inside the FSAM step (both passes)
        return super()._clip_grad_norm(model)   # clips g' before second_step

    def _get_grad_norm(self, model, grad_norm=None):
        if self._fsam_last_grad_norm is not None:
            return self._fsam_last_grad_norm   # the first-pass norm, at w (not at w + e)
        return super()._get_grad_norm(model, grad_norm)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._fsam_window:
            for key, values in self._fsam_window.items():
                if key in ("threshold", "mask_density"):
                    logs[f"fsam_{key}"] = values[-1]   # of the latest mask
                else:
                    logs[f"fsam_{key}"] = sum(values) / len(values)
            logs["fsam_num_steps"] = self.fsam_optimizer.num_steps
            self._fsam_window = {}
        return super().log(logs, *args, **kwargs)

    @property
    def fsam_optimizer(self) -> FSAM:
        """The FSAM instance (DeepSpeed's client optimizer, or the one the Trainer steps)."""
        engine = getattr(self, "deepspeed", None)
        if engine is not None and getattr(engine, "_fsam", None) is not None:
            return engine._fsam
        opt = self.optimizer
        while opt is not None and not isinstance(opt, _FSAM_OPTIMIZERS):
            opt = getattr(opt, "optimizer", None)
        return opt

    # ---- checkpoints: FSAM state in DeepSpeed's files; checkpoint-N appears only when complete --
    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper
        engine = self.model_wrapped
        # atomic `latest`, FSAM's step counter in client_state, universal_checkpoint_info (which
        # ds_to_universal needs); masks and step counter travel in the optimizer state per rank
        fsam_ds.checkpoint.save_checkpoint(engine, output_dir, tag=f"global_step{engine.global_steps}")
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _get_output_dir(self, trial):
        staging = getattr(self, "_fsam_staging_run_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, written to run_dir/.fsam_staging/checkpoint-N by every rank, then
        renamed to run_dir/checkpoint-N by one atomic rename after all ranks finished: a job killed
        at any moment never leaves a torn checkpoint-N for `resume_from_checkpoint=True` (or
        transformers' get_last_checkpoint) to pick."""
        from transformers.trainer_utils import rotate_checkpoints
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)   # left by a job killed mid-write
            os.makedirs(staging_root, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._fsam_staging_run_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._fsam_staging_run_dir = None
        best = self.state.best_model_checkpoint
        if best is not None and os.path.abspath(best).startswith(os.path.abspath(staging_root)):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        self.accelerator.wait_for_everyone()   # every rank's files are written
        if self.args.should_save:
            _fsync_tree(staged)
            if os.path.exists(final):   # re-saving a step (e.g. after a resume): replace it
                old = os.path.join(staging_root, f"{name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(staged, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged, final)
            _fsync_dir(run_dir)
            with contextlib.suppress(OSError):
                os.rmdir(staging_root)   # only when empty
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(dirpath)


def _trainer_class():
    import transformers
    return transformers.Trainer


class FSAMTrainer(FSAMTrainerMixin, _trainer_class()):
    """transformers.Trainer whose optimizer steps are FSAM steps (see FSAMTrainerMixin)."""


# ------------------------------------------------------------------------------------ Accelerate
def prepare_with_fsam(accelerator, model, *objects, fsam: dict | FSAMConfig | None = None):
    """For a custom Accelerate loop with a DeepSpeed plugin whose config names FSAM ("fsam" block
    or the "FSAM" optimizer type): builds FSAM (decay / no-decay groups) as DeepSpeed's client
    optimizer and returns accelerator.prepare(model, optimizer, *objects). Then step with
        loss = fsam_ds.train_step(model, lambda eng, mb: eng(**mb).loss, micro_batches)
    (`model` is the DeepSpeed engine Accelerate built), never accelerator.backward(): Accelerate's
    DeepSpeed backward calls engine.step() itself, which cannot express a two-pass step."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError("prepare_with_fsam is for Accelerate with a DeepSpeed plugin; without "
                         "DeepSpeed use fsam_ds.FSAM with first_step()/second_step() around "
                         "accelerator.backward()")
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    spec = _fsam_blocks_from_config(ds_config)
    if spec is not None and fsam is not None:
        raise ValueError('Give the FSAM settings once: the DeepSpeed config names FSAM, so drop fsam=')
    if spec is None:
        if fsam is None:
            raise ValueError('The DeepSpeed plugin\'s config has no "fsam" block and its optimizer '
                             'is not "FSAM"; add e.g. "fsam": {"rho": 0.05, "sparsity": 0.9}')
        fsam = FSAMConfig.from_dict(fsam) if isinstance(fsam, dict) else fsam
        spec = _fsam_blocks_from_config({**ds_config, "fsam": fsam.to_dict()})
    base_cls, base_kwargs, fsam_config = spec
    if base_cls is None:
        raise ValueError('The DeepSpeed config has no "optimizer" block naming the base optimizer; '
                         'add e.g. "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}')
    if any(v == "auto" for v in base_kwargs.values()):
        raise ValueError('Optimizer params set to "auto" need a Trainer to fill them in; give numbers')
    ds_config.pop("fsam", None)
    ds_config.pop("optimizer", None)
    _check_client_optimizer_config(ds_config)
    base_kwargs = dict(base_kwargs)
    groups = decay_parameter_groups(model, base_kwargs.pop("weight_decay", 0.0))
    optimizer = _make_fsam(groups, base_cls, base_kwargs, fsam_config, for_deepspeed=True)
    # DeepSpeed's engine hook (fsam_ds.deepspeed_client) ends FSAM's set-up phase once the engine
    # exists: a plain accelerator.backward() -> engine.step() then raises instead of taking a
    # base-optimizer step
    return accelerator.prepare(model, optimizer, *objects)
