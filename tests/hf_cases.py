"""What each rank runs for tests/test_hf.py: tiny Hugging Face models, Trainer / TRL / Accelerate runs
with FSAM, and the plain fsam_ds.train_step loops they must equal. One `run_all` per rank set."""
from __future__ import annotations

import copy
import os
import signal

import torch

LR = 1e-2
WEIGHT_DECAY = 0.01
PER_DEVICE = 2
FSAM = {"rho": 0.05, "sparsity": 0.5, "mask_interval": 3}
STEPS = 4


# ----------------------------------------------------------------------------- models and data
def tiny_bert():
    """A 754-parameter BERT classifier (no dropout, so runs are deterministic)."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, max_position_embeddings=8, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def classification_data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 11, (6,), generator=g),
             "labels": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(n)]


def tiny_tokenizer():
    """A word-level tokenizer over 14 words, built offline (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<eos>", "<unk>", "the", "cat", "dog", "sat", "ran", "on", "mat", "a", "big",
             "small", "red"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=14, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def sft_data(n, seed=2):
    """Pre-tokenized causal-LM rows of different lengths (so num_items_in_batch matters)."""
    from datasets import Dataset
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(3, 14, (int(torch.randint(3, 9, (1,), generator=g)),),
                                        generator=g).tolist() + [1]} for _ in range(n)]
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------- configs
def trainer_ds_config(stage, fsam_style="block", bf16=False, scheduler=True):
    """What a user writes for the Trainer: HF's "auto" everywhere it is allowed."""
    config = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto"},
        "steps_per_print": 10 ** 9,
    }
    adamw = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    if fsam_style == "block":
        config["optimizer"] = {"type": "AdamW", "params": adamw}
        config["fsam"] = dict(FSAM)
    elif fsam_style == "type":
        config["optimizer"] = {"type": "FSAM", "params": {"base_optimizer": "AdamW", **adamw, **FSAM}}
    if scheduler:
        config["scheduler"] = {"type": "WarmupDecayLR",
                               "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                          "warmup_num_steps": "auto", "total_num_steps": "auto"}}
    if stage == 3:
        config["zero_optimization"].update(stage3_param_persistence_threshold=0, sub_group_size=100)
    return config


def reference_ds_config(stage, gas, world_size, bf16=False):
    """The same settings written out, for fsam_ds.initialize."""
    config = {
        "train_micro_batch_size_per_gpu": PER_DEVICE, "gradient_accumulation_steps": gas,
        "train_batch_size": PER_DEVICE * gas * world_size, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 64},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": WEIGHT_DECAY}},
        "scheduler": {"type": "WarmupDecayLR",
                      "params": {"warmup_min_lr": 0, "warmup_max_lr": LR, "warmup_num_steps": 1,
                                 "total_num_steps": STEPS}},
        "fsam": dict(FSAM), "steps_per_print": 10 ** 9,
    }
    if stage == 3:
        config["zero_optimization"].update(stage3_param_persistence_threshold=0, sub_group_size=100)
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def training_args(out, gas, ds_config, **overrides):
    from transformers import TrainingArguments
    kwargs = dict(output_dir=out, per_device_train_batch_size=PER_DEVICE,
                  gradient_accumulation_steps=gas, max_steps=STEPS, learning_rate=LR,
                  weight_decay=WEIGHT_DECAY, deepspeed=ds_config, report_to=[], logging_steps=1,
                  save_strategy="no", seed=0, disable_tqdm=True, dataloader_pin_memory=False,
                  average_tokens_across_devices=False)
    kwargs.update(overrides)
    return cpu_ready(TrainingArguments(**kwargs))


def cpu_ready(args):
    """What a GPU run gets without help: a DeepSpeed state over all ranks (FSAMTrainer does this
    itself; the plain Trainer / SFTTrainer baselines need it on CPU)."""
    from fsam_ds.hf import repair_cpu_deepspeed_state
    repair_cpu_deepspeed_state(args)
    return args


# ----------------------------------------------------------------------------- helpers
def gathered(engine_or_model):
    import deepspeed
    module = getattr(engine_or_model, "module", engine_or_model)
    params = list(module.named_parameters())
    stage3 = hasattr(engine_or_model, "zero_optimization_stage") and engine_or_model.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage3):
        return {n: p.detach().float().clone() for n, p in params}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class LogRecorder:
    """A TrainerCallback seeing what report_to backends see (on_log)."""

    def __init__(self):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_log(cb, args, state, control, logs=None, **kwargs):
                self.logs.append(dict(logs or {}))
        self.logs = []
        self.callback = _CB()


def recording(trainer_cls):
    """trainer_cls whose training_step also records the micro-batches it is given."""

    class Recording(trainer_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.recorded.append({k: v.detach().clone() if torch.is_tensor(v) else v
                                  for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    Recording.recorded = None
    return Recording


def fsam_trainer(out, stage, gas, fsam_style="block", train_n=None, bf16=False, scheduler=True,
                 recorder=None, **arg_overrides):
    from fsam_ds.hf import FSAMTrainer
    model = tiny_bert()
    args = training_args(out, gas, trainer_ds_config(stage, fsam_style, bf16, scheduler), **arg_overrides)
    if bf16:
        # TrainingArguments refuses bf16=True on a machine without GPUs (it wants use_cpu, which
        # turns DeepSpeed off): enable DeepSpeed's bf16 as bf16=True would on a GPU.
        args.hf_deepspeed_config.config["bf16"] = {"enabled": True}
    cls = recording(FSAMTrainer)
    trainer = cls(model=model, args=args, train_dataset=classification_data(train_n or 64),
                  callbacks=[recorder.callback] if recorder else None)
    trainer.recorded = []
    trainer.model_accepts_loss_kwargs = False   # BERT classification: per-micro-batch mean losses
    return trainer


def reference_weights(stage, gas, world_size, recorded, bf16=False):
    """A plain fsam_ds.train_step loop over the micro-batches the Trainer was given."""
    import fsam_ds
    from fsam_ds.hf import decay_parameter_groups
    model = tiny_bert()
    engine, *_ = fsam_ds.initialize(model=model, config=reference_ds_config(stage, gas, world_size, bf16),
                                    model_parameters=decay_parameter_groups(model, WEIGHT_DECAY))
    for step in range(len(recorded) // gas):
        mbs = recorded[step * gas:(step + 1) * gas]
        fsam_ds.train_step(engine, lambda eng, mb: eng(**mb).loss, mbs)
    return gathered(engine), engine._fsam.num_steps


# ----------------------------------------------------------------------------- per-rank jobs
def run_equality_cases(rank, world_size, root):
    """FSAMTrainer at ZeRO-2/3 x accumulation 1/2 (plus bf16) against a plain train_step loop;
    checkpoints every 2 steps (mask_interval 3: checkpoint-2 lies between refreshes), then a
    resume from checkpoint-2 against the uninterrupted run."""
    out = {}
    cases = [(2, 1, "block", False), (2, 2, "block", False), (3, 1, "type", False),
             (3, 2, "block", False), (2, 2, "type", True)]
    for stage, gas, style, bf16 in cases:
        name = f"z{stage}_gas{gas}_{style}{'_bf16' if bf16 else ''}"
        recorder = LogRecorder()
        save = dict(save_strategy="steps", save_steps=2) if gas == 2 and not bf16 else {}
        trainer = fsam_trainer(os.path.join(root, name), stage, gas, style, bf16=bf16,
                               recorder=recorder, **save)
        trainer.train()
        weights = gathered(trainer.deepspeed)
        ref, ref_steps = reference_weights(stage, gas, world_size, trainer.recorded, bf16)
        engine = trainer.deepspeed
        case = {"diff": max_diff(weights, ref), "num_steps": trainer.fsam_optimizer.num_steps,
                "ref_num_steps": ref_steps, "global_step": trainer.state.global_step,
                "engine_global_steps": engine.global_steps,
                "scheduler_steps": engine.lr_scheduler.last_batch_iteration + 1,
                "logs": [l for l in recorder.logs if "loss" in l],
                "masks": len(trainer.fsam_optimizer.core.masks), "weights": weights}
        if save:
            resumed = fsam_trainer(os.path.join(root, name), stage, gas, style, **save)
            resumed.train(resume_from_checkpoint=os.path.join(root, name, "checkpoint-2"))
            case["resume_diff"] = max_diff(gathered(resumed.deepspeed), weights)
            case["resume_num_steps"] = resumed.fsam_optimizer.num_steps
            case["checkpoints"] = sorted(os.listdir(os.path.join(root, name)))
        out[name] = case
    return out


def run_adamw_comparison(rank, world_size, root):
    """Short last accumulation groups (3 micro-batches per epoch, accumulation 2) and an HF LR
    scheduler: FSAMTrainer with rho=0 equals the plain AdamW Trainer; with rho>0 it differs."""
    from transformers import Trainer
    from fsam_ds.hf import FSAMTrainer
    data = classification_data(PER_DEVICE * world_size * 3)
    plain_config = trainer_ds_config(2, fsam_style=None, scheduler=False)
    results = {}
    for name, cls, fsam in [("adamw", Trainer, None), ("rho0", FSAMTrainer, {"rho": 0.0}),
                            ("fsam", FSAMTrainer, FSAM)]:
        config = copy.deepcopy(plain_config)
        kwargs = {}
        if fsam is not None:
            kwargs["fsam"] = fsam
        args = training_args(os.path.join(root, name), 2, config, optim="adamw_torch",
                             lr_scheduler_type="linear", warmup_steps=2)
        trainer = cls(model=tiny_bert(), args=args, train_dataset=data, **kwargs)
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
        results[name] = {"weights": gathered(trainer.deepspeed),
                         "lr_scheduler_steps": trainer.lr_scheduler.scheduler.last_epoch
                         if hasattr(trainer.lr_scheduler, "scheduler") else trainer.lr_scheduler.last_epoch,
                         "global_step": trainer.state.global_step,
                         "lrs": [l["learning_rate"] for l in trainer.state.log_history if "loss" in l],
                         "num_steps": getattr(trainer, "fsam_optimizer", None) and trainer.fsam_optimizer.num_steps}
    w = {k: v.pop("weights") for k, v in results.items()}
    results["rho0_vs_adamw"] = max_diff(w["rho0"], w["adamw"])
    results["fsam_vs_adamw"] = max_diff(w["fsam"], w["adamw"])
    return results


def run_sft(rank, world_size, root):
    """TRL's SFTTrainer with the mixin (tiny Llama, num_items_in_batch loss normalization):
    rho=0 equals the plain SFTTrainer; rho>0 takes FSAM steps."""
    import trl
    from fsam_ds.hf import FSAMTrainerMixin

    class FSAMSFTTrainer(FSAMTrainerMixin, trl.SFTTrainer):
        pass

    results, weights = {}, {}
    for name, cls, fsam in [("sft", trl.SFTTrainer, None), ("sft_rho0", FSAMSFTTrainer, {"rho": 0.0}),
                            ("sft_fsam", FSAMSFTTrainer, {**FSAM, "always_perturb": ["norm", "embed"]})]:
        config = trainer_ds_config(2, fsam_style=None, scheduler=False)
        args = trl.SFTConfig(output_dir=os.path.join(root, name), per_device_train_batch_size=PER_DEVICE,
                             gradient_accumulation_steps=2, max_steps=3, learning_rate=LR,
                             deepspeed=config, report_to=[], logging_steps=1, save_strategy="no",
                             seed=0, disable_tqdm=True, dataloader_pin_memory=False, optim="adamw_torch",
                             lr_scheduler_type="constant", max_length=16, bf16=False)
        cpu_ready(args)
        kwargs = {"fsam": fsam} if fsam is not None else {}
        trainer = cls(model=tiny_llama(), args=args, train_dataset=sft_data(24),
                      processing_class=tiny_tokenizer(), **kwargs)
        trainer.train()
        weights[name] = gathered(trainer.deepspeed)
        results[name] = {"num_steps": fsam and trainer.fsam_optimizer.num_steps,
                         "logs": [l for l in trainer.state.log_history if "loss" in l]}
    results["rho0_vs_sft"] = max_diff(weights["sft_rho0"], weights["sft"])
    results["fsam_vs_sft"] = max_diff(weights["sft_fsam"], weights["sft"])
    return results


def run_accelerate(rank, world_size, root):
    """A custom Accelerate loop with a DeepSpeed plugin: fsam_ds.hf.prepare_with_fsam, then
    fsam_ds.train_step on the engine Accelerate built, equals fsam_ds.initialize + train_step."""
    import fsam_ds
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin
    from fsam_ds.hf import prepare_with_fsam
    results = {}
    for stage in (2, 3):
        gas = 2
        AcceleratorState._reset_state(reset_partial_state=True)
        config = reference_ds_config(stage, gas, world_size)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            # CPU only: Accelerate finds no GPU backend for DeepSpeed; name gloo (README, CPU note)
            PartialState(backend="gloo")
            accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=copy.deepcopy(config)))
        finally:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED")
        model, optimizer = prepare_with_fsam(accelerator, tiny_bert())
        data = classification_data(PER_DEVICE * world_size * gas * 3)
        micro = [data[i:i + PER_DEVICE] for i in range(0, len(data), PER_DEVICE)][rank::world_size]
        micro = [{"input_ids": torch.stack([r["input_ids"] for r in mb]),
                  "labels": torch.tensor([r["labels"] for r in mb])} for mb in micro]
        for step in range(len(micro) // gas):
            fsam_ds.train_step(model, lambda eng, mb: eng(**mb).loss, micro[step * gas:(step + 1) * gas])
        ref, ref_steps = reference_weights(stage, gas, world_size, micro)
        try:   # the guard: Accelerate's own backward + step must not take a plain AdamW step
            accelerator.backward(model(**micro[0]).loss)
            accelerator.backward(model(**micro[1]).loss)
            guard = None
        except Exception as err:   # noqa: BLE001
            guard = f"{type(err).__name__}: {err}"
        results[f"z{stage}"] = {"diff": max_diff(gathered(model), ref), "num_steps": model._fsam.num_steps,
                                "ref_num_steps": ref_steps, "guard": guard,
                                "num_steps_after_guard": model._fsam.num_steps}
    AcceleratorState._reset_state(reset_partial_state=True)
    return results


def run_errors(rank, world_size, root):
    """Settings FSAM cannot honour: a ValueError naming the setting, never a silent AdamW."""
    from fsam_ds.hf import FSAMTrainer
    errors = {}

    def attempt(name, build):
        try:
            trainer = build()
            trainer.train()
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)

    data = classification_data(16)
    no_fsam = trainer_ds_config(2, fsam_style=None)
    no_fsam["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    attempt("no_fsam_block", lambda: FSAMTrainer(model=tiny_bert(), args=training_args(
        os.path.join(root, "e1"), 1, no_fsam), train_dataset=data))
    attempt("twice", lambda: FSAMTrainer(model=tiny_bert(), args=training_args(
        os.path.join(root, "e2"), 1, trainer_ds_config(2)), train_dataset=data, fsam=FSAM))
    bad = trainer_ds_config(2)
    bad["fsam"]["sparsity"] = 1.5
    attempt("bad_sparsity", lambda: FSAMTrainer(model=tiny_bert(), args=training_args(
        os.path.join(root, "e3"), 1, bad), train_dataset=data))
    nvme = trainer_ds_config(2)
    nvme["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": "/tmp"}
    attempt("nvme_offload", lambda: FSAMTrainer(model=tiny_bert(), args=training_args(
        os.path.join(root, "e4"), 1, nvme), train_dataset=data))
    model = tiny_bert()
    attempt("client_optimizer", lambda: FSAMTrainer(model=model, args=training_args(
        os.path.join(root, "e5"), 1, trainer_ds_config(2)), train_dataset=data,
        optimizers=(torch.optim.AdamW(model.parameters()), None)))
    typo = trainer_ds_config(2)
    typo["fsam"]["sparsty"] = 0.5
    attempt("unknown_key", lambda: FSAMTrainer(model=tiny_bert(), args=training_args(
        os.path.join(root, "e6"), 1, typo), train_dataset=data))
    return errors


def run_plain_trainer_fsam_type(rank, world_size, root):
    """A plain transformers.Trainer given {"optimizer": {"type": "FSAM"}} (nothing drives FSAM):
    must fail at its first step, not train AdamW."""
    import fsam_ds  # noqa: F401  (registers torch.optim.FSAM, as a user's script would)
    from transformers import Trainer
    config = trainer_ds_config(2, fsam_style="type")
    config["zero_allow_untested_optimizer"] = True   # what DeepSpeed asks for a torch.optim type
    args = training_args(os.path.join(root, "plain"), 1, config, max_steps=2)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=classification_data(16))
    try:
        trainer.train()
    except Exception as err:   # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def run_plain_trainer_fsam_block(rank, world_size, root):
    """A plain transformers.Trainer given an AdamW block plus an "fsam" block: DeepSpeed itself
    would ignore the block; fsam_ds refuses the engine instead of training AdamW."""
    import fsam_ds  # noqa: F401
    from transformers import Trainer
    args = training_args(os.path.join(root, "plain_block"), 1, trainer_ds_config(2), max_steps=2)
    try:
        Trainer(model=tiny_bert(), args=args, train_dataset=classification_data(16)).train()
    except Exception as err:   # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def run_all(rank, world_size, root, killed_dir):
    return {"resume_after_kill": run_resume_latest(rank, world_size, killed_dir),
            "equality": run_equality_cases(rank, world_size, os.path.join(root, "eq")),
            "adamw": run_adamw_comparison(rank, world_size, os.path.join(root, "adamw")),
            "sft": run_sft(rank, world_size, os.path.join(root, "sft")),
            "accelerate": run_accelerate(rank, world_size, os.path.join(root, "acc")),
            "errors": run_errors(rank, world_size, os.path.join(root, "err")),
            "plain_fsam_type": run_plain_trainer_fsam_type(rank, world_size, os.path.join(root, "plain")),
            "plain_fsam_block": run_plain_trainer_fsam_block(rank, world_size, os.path.join(root, "plain"))}


# ----------------------------------------------------------------------------- kill mid-checkpoint
def run_killed_during_checkpoint(rank, world_size, out):
    """Checkpoints every 2 steps; every rank SIGKILLs itself in the middle of writing checkpoint-4
    (the last step)
    (after DeepSpeed wrote the optimizer shards, before the Trainer state and RNG files)."""
    from fsam_ds.hf import FSAMTrainer

    class Killed(FSAMTrainer):
        def _save_rng_state(self, output_dir):
            if self.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return super()._save_rng_state(output_dir)

    args = training_args(out, 2, trainer_ds_config(2), save_strategy="steps", save_steps=2)
    trainer = Killed(model=tiny_bert(), args=args, train_dataset=classification_data(64))
    trainer.model_accepts_loss_kwargs = False
    trainer.train()


def run_resume_latest(rank, world_size, out):
    """resume_from_checkpoint=True after the kill: picks checkpoint-2, trains to the end."""
    from transformers.trainer_utils import get_last_checkpoint
    last = get_last_checkpoint(out)
    trainer = fsam_trainer(out, 2, 2, save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=True)
    return {"last": os.path.basename(last), "weights": gathered(trainer.deepspeed),
            "num_steps": trainer.fsam_optimizer.num_steps}
