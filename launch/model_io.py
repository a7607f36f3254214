"""Loading, adapting and saving Hugging Face models for launch/train.py (and for users' own
scripts), sized for models that do not fit one rank:

  fill_auto_schedule the "auto" values of the shipped configs' scheduler, from the run length
  fill_auto_zero_buffers  "auto" ZeRO buffer sizes (Hugging Face-style configs), from the model's
                     hidden size (Hugging Face Trainer's rule)
  load_model         ZeRO-3: HfDeepSpeedConfig before from_pretrained, so the model is built under
                     deepspeed.zero.Init and every parameter is partitioned as it is created
  add_lora           PEFT LoRA adapters; only they are trainable, so only they reach FSAM
  perturb_coverage   what FSAM will do with each trainable element (always perturbed / ranked /
                     kept), with loud warnings for embeddings and norms that would be ranked
  LoRAMaskRefresh    recompute the first Fisher mask once lora_A has a gradient
  save_model         Hugging Face folder in the training dtype: ZeRO-3 streams it, one module's
                     parameters gathered at a time and written in safetensors shards by rank 0
                     (never the whole model on a rank), tied weights written once
"""
import math
import os

import torch
import torch.distributed as dist


def numel(p):
    """Elements of a parameter, also when ZeRO-3 holds only this rank's partition of it."""
    return getattr(p, "ds_numel", p.numel())


def local_shard(p):
    """What this rank holds of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach()


def zero_stage(ds_config):
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0) or 0)


def fill_auto_schedule(ds_config, total_steps, warmup_ratio=0.1):
    """Resolve the scheduler block's "auto" values (the shipped configs use them) in place:
    warmup_num_steps = ceil(warmup_ratio * total_steps), total_num_steps = total_steps (also when
    left out), warmup_max_lr = the optimizer's lr. Returns the scheduler params."""
    scheduler = ds_config.get("scheduler") or {}
    params = scheduler.get("params", {})
    if scheduler.get("type") in ("WarmupDecayLR", "WarmupCosineLR") and \
            params.get("total_num_steps", "auto") == "auto":
        params["total_num_steps"] = total_steps
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = math.ceil(warmup_ratio * total_steps)
    for key in ("warmup_max_lr", "lr"):
        if params.get(key) == "auto":
            params[key] = ds_config["optimizer"]["params"]["lr"]
    return params


# The ZeRO keys Hugging Face Trainer fills from the model's hidden size H when they are "auto"
# (transformers.integrations.deepspeed, HfTrainerDeepSpeedConfig.trainer_config_finalize): a
# gradient bucket of one H x H matrix, a prefetch of most of one, and parameters below 10 H elements
# (norms, biases) kept whole on every rank. train.py fills them so that Hugging Face-style configs
# run unchanged; the shipped GPU configs write DeepSpeed's defaults instead, which ran ZeRO-3 steps
# 1.4x faster than this rule at 1.3B on one H200 (BENCHMARKS.md, "ZeRO-3 buffer sizes").
HIDDEN_SIZE_RULES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def hidden_size_of(model_config):
    """The hidden size Hugging Face's rule uses: hidden_size, the largest of hidden_sizes, or the
    same from a multimodal model's text_config; None if the config has none of them."""
    for cfg in (model_config, getattr(model_config, "text_config", None)):
        if cfg is None:
            continue
        if getattr(cfg, "hidden_size", None):
            return int(cfg.hidden_size)
        if getattr(cfg, "hidden_sizes", None):
            return int(max(cfg.hidden_sizes))
    return None


def fill_auto_zero_buffers(ds_config, model):
    """Resolve "auto" in zero_optimization's reduce_bucket_size (any stage), and ZeRO-3's
    stage3_prefetch_bucket_size and stage3_param_persistence_threshold, in place, as Hugging Face
    Trainer does. `model`: a model
    folder (its config.json is read alone, no weights) or a transformers config. Returns
    {key: value} of what was filled."""
    zero = ds_config.get("zero_optimization") or {}
    auto_keys = [k for k in HIDDEN_SIZE_RULES if zero.get(k) == "auto"]
    if not auto_keys:
        return {}
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig
        model = AutoConfig.from_pretrained(model)
    hidden = hidden_size_of(model)
    if hidden is None:
        raise ValueError(f"zero_optimization {auto_keys} are \"auto\", but the model config "
                         f"({type(model).__name__}) has no hidden_size or hidden_sizes to size them "
                         f"from; write numbers instead")
    filled = {k: HIDDEN_SIZE_RULES[k](hidden) for k in auto_keys}
    zero.update(filled)
    return filled


def load_model(auto_cls, path, ds_config, **kwargs):
    """from_pretrained in fp32 (DeepSpeed's bf16/fp16 block decides the training precision).
    Under ZeRO-3 the returned HfDeepSpeedConfig must stay alive until deepspeed.initialize: while
    it does, transformers builds the model under deepspeed.zero.Init (each rank allocates only its
    partition) and rank 0 streams the checkpoint into the partitions one module at a time."""
    keep_alive = None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig
        keep_alive = HfDeepSpeedConfig(ds_config)
    model = auto_cls.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model, keep_alive


def partition_report(model):
    """(elements held locally, elements in the model, largest local fraction of one parameter)."""
    local = total = 0
    worst = 0.0
    for p in model.parameters():
        n_local = local_shard(p).numel()
        local, total = local + n_local, total + numel(p)
        worst = max(worst, n_local / max(1, numel(p)))
    return local, total, worst


def add_lora(model, task, r, alpha, dropout, target_modules):
    """Wrap `model` with LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model
    targets = target_modules if target_modules == "all-linear" else target_modules.split(",")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS")
    return get_peft_model(model, config)


def _is_norm(module):
    return "norm" in type(module).__name__.lower()


def perturb_coverage(module, fsam_config, sparsity):
    """Fractions of the trainable elements that FSAM always perturbs, ranks and keeps, and the
    warnings for embedding/norm parameters that no always_perturb pattern names."""
    names = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    always = sum(numel(p) for n, p in module.named_parameters()
                 if p.requires_grad and fsam_config.is_always_perturbed(n))
    total = sum(numel(p) for n, p in module.named_parameters() if p.requires_grad)
    ranked = total - always
    kept = math.ceil((1 - sparsity) * ranked)
    warnings = []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Embedding) or _is_norm(mod):
            for p in mod.parameters(recurse=False):
                name = names.get(id(p))
                if name is not None and not fsam_config.is_always_perturbed(name):
                    warnings.append(f"{name} ({type(mod).__name__}) is ranked, not always perturbed: "
                                    f"no always_perturb pattern {list(fsam_config.always_perturb)} matches it")
    tied = None
    get_in, get_out = getattr(module, "get_input_embeddings", None), getattr(module, "get_output_embeddings", None)
    if get_in is not None and get_out is not None:
        emb, head = get_in(), get_out()
        if emb is not None and head is not None and head.weight is emb.weight and \
                fsam_config.is_always_perturbed(names.get(id(emb.weight))):
            tied = numel(emb.weight) / max(1, total)   # a tied head is always perturbed with it
    return {"num_trainable": total, "always": always / max(1, total), "ranked": ranked / max(1, total),
            "kept_of_ranked": kept / max(1, ranked), "perturbed": (always + kept) / max(1, total),
            "tied_embedding": tied}, warnings   # tied_embedding: its fraction when always perturbed


class LoRAMaskRefresh:
    """LoRA's lora_B starts at 0, so every lora_A gradient is exactly 0 until lora_B has moved
    (one step with lr > 0: a linear warm-up from 0 takes two), and a mask computed before holds
    only lora_B elements for mask_interval steps. After each step, until lora_B is non-zero on some
    rank, this checks it (one tiny all-reduce) and then has FSAM recompute the mask at the next step,
    from real lora_A gradients. Call after_step on every rank."""

    def __init__(self, model):
        self.lora_b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
        self.pending = bool(self.lora_b)

    def after_step(self, fsam):
        if not self.pending or fsam is None:
            return
        shards = [local_shard(p) for p in self.lora_b]
        moved = torch.tensor([max(float(t.abs().max()) if t.numel() else 0.0 for t in shards)],
                             dtype=torch.float64, device=shards[0].device)
        if dist.is_initialized():
            dist.all_reduce(moved, op=dist.ReduceOp.MAX)
        if float(moved) > 0:
            fsam.invalidate_masks("LoRA: lora_B has left 0, so lora_A now has gradients for the mask")
            self.pending = False


SHARD_BYTES = 1 << 30    # safetensors shard size of the streamed ZeRO-3 save


def save_model(engine, model_dir, tokenizer=None, stage=0, shard_bytes=SHARD_BYTES):
    """The trained model as a Hugging Face folder on rank 0 (collective: call on every rank).
    ZeRO-3 (full models): streamed, see save_zero3_streamed. LoRA models save only the adapter
    (from DeepSpeed's consolidated state dict under ZeRO-3: the adapter filter needs it whole)."""
    module = engine.module
    if stage == 3:
        # On a GPU, DeepSpeed's last forward (the evaluation) prefetches the parameters it expects
        # next; they stay in flight, and gathering one of them for the save then fails with
        # "Cannot partition a param in flight" when it is released. Wait for and release them all
        # first (DeepSpeed's public call for it; CPU ranks never prefetch).
        engine.empty_partition_cache()
    if stage == 3 and not hasattr(module, "peft_config"):
        save_zero3_streamed(module, model_dir, shard_bytes)
        if dist.get_rank() == 0 and tokenizer is not None:
            tokenizer.save_pretrained(model_dir)
        dist.barrier()
        return
    state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else None
    if dist.get_rank() == 0:
        os.makedirs(model_dir, exist_ok=True)
        if state is None:
            state = module.state_dict()
        module.save_pretrained(model_dir, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(model_dir)
    del state
    dist.barrier()


def save_zero3_streamed(module, model_dir, shard_bytes=SHARD_BYTES):
    """A ZeRO-3 model as safetensors in its training dtype (16-bit under bf16/fp16), written
    while it is gathered: one module's own parameters at a time are gathered on every rank
    (deepspeed.zero.GatheredParameters, released right after), rank 0 copies them to CPU and
    writes a shard file whenever shard_bytes have collected. No rank holds more than one module
    gathered plus (rank 0) one shard; DeepSpeed's consolidated state dict holds the whole model on
    rank 0. A tied weight (the same ZeRO parameter under two names, e.g. lm_head and
    embed_tokens) is written once, under its first name, as save_pretrained does. Files as
    save_pretrained names them: model.safetensors, or model-0000i-of-0000n.safetensors and
    model.safetensors.index.json; from_pretrained loads either."""
    import json

    import deepspeed
    from safetensors.torch import save_file
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(model_dir, exist_ok=True)
        for name in os.listdir(model_dir):   # a previous save's shards would mix with these
            if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".index.json")):
                os.remove(os.path.join(model_dir, name))
    shard, shard_size, files, weight_map, seen, total = {}, 0, [], {}, set(), 0

    def flush():
        nonlocal shard, shard_size
        if shard:
            path = os.path.join(model_dir, f"model.part{len(files)}.safetensors")
            save_file(shard, path, metadata={"format": "pt"})
            files.append(path)
            weight_map.update({key: len(files) - 1 for key in shard})
        shard, shard_size = {}, 0

    def visit(mod, prefix):
        nonlocal shard_size, total
        own = [p for p in mod.parameters(recurse=False) if getattr(p, "ds_id", None) not in seen]
        with deepspeed.zero.GatheredParameters(own):
            if rank0:
                for name, p in mod.named_parameters(recurse=False):
                    ds_id = getattr(p, "ds_id", id(p))
                    if ds_id in seen:
                        continue   # tied: written under its first name
                    seen.add(ds_id)
                    shard[prefix + name] = p.detach().to("cpu", copy=True).contiguous()
                    shard_size += p.numel() * p.element_size()
                for name, buf in mod.named_buffers(recurse=False):
                    if buf is not None and name not in mod._non_persistent_buffers_set:
                        shard[prefix + name] = buf.detach().to("cpu", copy=True).contiguous()
                        shard_size += buf.numel() * buf.element_size()
            else:
                seen.update(getattr(p, "ds_id", id(p)) for p in own)
        if rank0 and shard_size >= shard_bytes:
            total += shard_size
            flush()
        for name, child in mod.named_children():
            visit(child, prefix + name + ".")

    visit(module, "")
    if not rank0:
        return
    total += shard_size
    flush()
    if len(files) == 1:
        os.replace(files[0], os.path.join(model_dir, "model.safetensors"))
    else:
        names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        for path, name in zip(files, names):
            os.replace(path, os.path.join(model_dir, name))
        with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}, f, indent=2)
    module.config.architectures = [type(module).__name__]   # as save_pretrained records it
    module.config.save_pretrained(model_dir)
    generation = getattr(module, "generation_config", None)
    if generation is not None and getattr(module, "can_generate", lambda: False)():
        generation.save_pretrained(model_dir)
