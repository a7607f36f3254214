"""Large-model paths on CPU: ZeRO-3 loading under zero.Init, the 16-bit consolidated save, a
Llama-architecture decoder (tiny random config; the real SmolLM2-135M-Instruct in the slow tests),
instruction data, LoRA and activation checkpointing with FSAM, and launch/train.py's defects.

Three kinds of tests: single-process checks of the data code; one 2-rank job (tests/dist_harness,
ranks started once) that loads, trains and saves with the library calls train.py uses; two real
launches of launch/train.py through the deepspeed CLI, and one real SmolLM2-135M-Instruct run
(about 2.5 min on 2 cores; FSAM_SKIP_SMOLLM2=1 leaves it out of a quick local run).
"""
import functools
import json
import math
import os
import sys

import pytest
import torch

from dist_harness import run_ranks
from launch_helpers import ENV, REPO, prepare_data, run

sys.path.insert(0, os.path.join(REPO, "launch"))
import lm_data  # noqa: E402
import model_io  # noqa: E402

SKIP_SMOLLM2 = os.environ.get("FSAM_SKIP_SMOLLM2") == "1"


# ---------------------------------------------------------------------------------- assets
def tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig
    cfg = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
               tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def ds_config(stage, **extra):
    """A shipped config, made tiny: micro batch 2, persistence threshold 0 (every parameter is
    partitioned under ZeRO-3, so a whole one on a rank is a failure), a larger lr."""
    name = {2: "zero2_fsam.json", 3: "zero3_fsam.json"}[stage]
    cfg = json.load(open(os.path.join(REPO, "ds_configs", name)))
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    cfg["optimizer"]["params"]["lr"] = 1e-3
    cfg["scheduler"]["params"]["warmup_max_lr"] = 1e-3
    cfg["fsam"]["mask_interval"] = 2
    cfg.pop("csv_monitor", None)
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Llama (tied embeddings) with SmolLM2's tokenizer and chat template, the movie
    reviews as chat instructions and as prompt/response rows."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    root = tmp_path_factory.mktemp("llm")
    tokenizer = AutoTokenizer.from_pretrained(prepare_data.smollm2_dir())
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(root / "tiny_llama")
    tokenizer.save_pretrained(root / "tiny_llama")
    import random
    order = list(range(len(prepare_data.movie_reviews())))
    random.Random(0).shuffle(order)            # the file's first rows are 94% positive
    chat_all = prepare_data.movie_reviews_chat()
    chat = [chat_all[i] for i in order[:160]]
    write_jsonl(root / "chat_train.jsonl", chat[:96])
    write_jsonl(root / "chat_val.jsonl", chat[96:128])
    # 91M parameters (350 MB in fp32) in many small modules (vocab 1024, 32 layers): a rank that
    # built the whole model would show it, while zero.Init's per-module transients stay small
    LlamaForCausalLM(tiny_llama_config(tokenizer, vocab_size=1024, hidden_size=512, intermediate_size=1376,
                                       num_hidden_layers=32, num_attention_heads=4,
                                       num_key_value_heads=2)).save_pretrained(root / "mid_llama")
    reviews_all = prepare_data.movie_reviews()
    reviews = [reviews_all[i] for i in order[:160]]
    write_jsonl(root / "cls_train.jsonl", reviews[:64])
    write_jsonl(root / "cls_val.jsonl", reviews[64:96])
    return root


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(assets / "tiny_llama")


# ---------------------------------------------------------------------------------- data, one process
def test_prompt_tokens_get_label_minus_100_and_responses_end_with_eos(tokenizer):
    eos = tokenizer.eos_token_id
    chat = {"messages": [{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "yes"},
                         {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "very"}]}
    ids, labels = lm_data.encode_example(tokenizer, chat, "messages", 512)
    assert len(ids) == len(labels)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(chat["messages"], tokenize=False)
    learned = [i for i, label in zip(ids, labels) if label != lm_data.IGNORE]
    assert all(label in (lm_data.IGNORE, i) for i, label in zip(ids, labels))
    # exactly the two assistant turns, each with its end-of-turn token (= EOS for SmolLM2)
    assert tokenizer.decode(learned) == "yes<|im_end|>\nvery<|im_end|>\n"
    assert learned.count(eos) == 2
    prompt_part = tokenizer.decode([i for i, label in zip(ids, labels) if label == lm_data.IGNORE])
    assert "Is it good?" in prompt_part and "Sure?" in prompt_part and "yes" not in prompt_part

    ids, labels = lm_data.encode_example(tokenizer, {"prompt": "Review: great.\nSentiment:", "response": " positive"},
                                         "prompt_response", 512)
    n_prompt = len(tokenizer("Review: great.\nSentiment:", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [lm_data.IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == eos     # EOS appended and learned
    # a response truncated away entirely leaves nothing to learn: the row is dropped
    assert lm_data.encode_example(tokenizer, {"prompt": "word " * 50, "response": "x"}, "prompt_response", 16) is None


def test_packing_keeps_labels_aligned_and_fills_blocks():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [-100, -100, 8, 9])]
    blocks = lm_data.pack(examples, 4)
    assert [len(b[0]) for b in blocks] == [4, 4] and all(len(i) == len(l) for i, l in blocks)
    assert sum((b[0] for b in blocks), []) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert sum((b[1] for b in blocks), []) == [-100, 2, 3, -100, 5, -100, -100, 8]


def test_eval_loss_is_token_weighted_and_independent_of_the_batch_size(assets, tokenizer):
    """train.py's evaluation sums (NLL, tokens) over batches. The old mean of batch means moved with
    the eval batch size (3.27929 at 32 vs 3.27888 at 16 on SmolLM2); this one must not."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(assets / "tiny_llama").eval()
    with torch.no_grad():   # a random model predicts near-uniformly; make token losses differ
        model.model.embed_tokens.weight.mul_(30)
    rows = [{"prompt": "Review:", "response": r["text"]} for r in prepare_data.movie_reviews()[:13]]
    examples = [lm_data.encode_example(tokenizer, r, "prompt_response", 64) for r in rows]

    def token_weighted(bs):
        nll, count = torch.zeros((), dtype=torch.float64), 0
        for i in range(0, len(examples), bs):
            batch = lm_data.collate(examples[i:i + bs], tokenizer.pad_token_id, "cpu")
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, c = lm_data.token_loss_sum(logits, batch["labels"])
            nll, count = nll + s, count + c
        return float(nll / count)

    def mean_of_batch_means(bs):
        losses = []
        for i in range(0, len(examples), bs):
            batch = lm_data.collate(examples[i:i + bs], tokenizer.pad_token_id, "cpu")
            with torch.no_grad():
                losses.append((float(model(**batch).loss), len(examples[i:i + bs])))
        return sum(l * n for l, n in losses) / sum(n for _, n in losses)

    weighted = [token_weighted(bs) for bs in (1, 4, 13)]
    assert max(weighted) - min(weighted) < 1e-5 * weighted[0], weighted
    old = [mean_of_batch_means(bs) for bs in (1, 4, 13)]
    assert max(old) - min(old) > 1e-4, old    # the test can tell the two estimators apart


def test_auto_zero_buffer_sizes_follow_the_hidden_size_as_hugging_face_fills_them(assets):
    """A config with Hugging Face's "auto" ZeRO-3 buffer sizes (HF-style configs): train.py fills
    them from the model's hidden size H with Hugging Face Trainer's rule (H^2, 0.9 H^2, 10 H),
    nothing else changes, and a model config without a hidden size is an error naming the keys."""
    from transformers import GPT2Config, PretrainedConfig
    cfg = json.load(open(os.path.join(REPO, "ds_configs", "zero3_bf16_fsam.json")))
    cfg["zero_optimization"].update(reduce_bucket_size="auto", stage3_prefetch_bucket_size="auto",
                                    stage3_param_persistence_threshold="auto")
    before = dict(cfg["zero_optimization"])
    filled = model_io.fill_auto_zero_buffers(cfg, str(assets / "tiny_llama"))   # hidden_size 16
    assert filled == {"reduce_bucket_size": 256, "stage3_prefetch_bucket_size": 230,
                      "stage3_param_persistence_threshold": 160}
    assert cfg["zero_optimization"] == dict(before, **filled)
    # GPT-2 names it n_embd; a filled config is left alone
    gpt2 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "sub_group_size": 7}}
    assert model_io.fill_auto_zero_buffers(gpt2, GPT2Config(n_embd=1024)) == {"reduce_bucket_size": 1024 ** 2}
    assert model_io.fill_auto_zero_buffers(gpt2, GPT2Config(n_embd=8)) == {}
    assert gpt2["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1024 ** 2, "sub_group_size": 7}
    with pytest.raises(ValueError, match="stage3_prefetch_bucket_size.*no hidden_size"):
        model_io.fill_auto_zero_buffers({"zero_optimization": {"stage3_prefetch_bucket_size": "auto"}},
                                         PretrainedConfig())


def test_always_perturb_defaults_name_embeddings_and_norms_of_each_family():
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, T5Config, T5ForConditionalGeneration)
    from fsam_ds.config import FSAMConfig
    models = {
        "bert": BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8, max_position_embeddings=16)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=16)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                              num_attention_heads=2, tie_word_embeddings=False)),
        "t5": T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)),
    }
    for family, model in models.items():
        coverage, warnings = model_io.perturb_coverage(model, FSAMConfig(), 0.9)
        assert warnings == [], f"{family}: {warnings}"
        always = {n for n, _ in model.named_parameters() if FSAMConfig().is_always_perturbed(n)}
        for n, _ in model.named_parameters():
            if any(k in n for k in ("wte", "wpe", "ln_", "shared", "embed", "norm", "LayerNorm")):
                assert n in always, f"{family}: {n} is ranked"
        # the big matrices stay ranked (an untied Llama lm_head too)
        assert coverage["ranked"] > 0.3, (family, coverage)
    assert "lm_head.weight" not in {n for n, _ in models["llama"].named_parameters()
                                    if FSAMConfig().is_always_perturbed(n)}
    # the paper's three patterns miss GPT-2's names: the start-up check says so loudly
    _, warnings = model_io.perturb_coverage(models["gpt2"], FSAMConfig(always_perturb=("bias", "norm", "embed")), 0.9)
    assert any("transformer.wte.weight" in w for w in warnings) and any("ln_f" in w for w in warnings)


# ---------------------------------------------------------------------------------- 2 ranks, library calls
def lib_config(stage, **extra):
    """ds_config with the "auto" schedule values filled as train.py fills them."""
    cfg = ds_config(stage, **extra)
    cfg["scheduler"]["params"].update(warmup_num_steps=1, total_num_steps=10)
    return cfg


def _batches(tokenizer, chat_file, n, rank, micro=2):
    rows = [json.loads(line) for line in open(chat_file)]
    examples = [e for e in (lm_data.encode_example(tokenizer, r, "messages", 128) for r in rows) if e]
    out = []
    for step in range(n):
        mine = examples[(2 * step + rank) * micro:(2 * step + rank + 1) * micro]
        out.append(lm_data.collate(mine, tokenizer.pad_token_id, "cpu"))
    return out


def _loss(engine, batch):
    return engine(**batch).loss


def library_checks(rank, world_size, root):
    """On each of 2 ranks: ZeRO-3 load -> FSAM steps -> 16-bit save (fp32 and bf16); LoRA at
    ZeRO-2 and 3; activation checkpointing vs none at ZeRO-3."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import unset_hf_deepspeed_config
    import fsam_ds
    tokenizer = AutoTokenizer.from_pretrained(f"{root}/tiny_llama")
    batches = _batches(tokenizer, f"{root}/chat_train.jsonl", 4, rank)
    out = {}

    # 1. ZeRO-3 loading: every parameter partitioned from the start, none whole on any rank
    for precision in ("fp32", "bf16"):
        extra = {"bf16": {"enabled": True}} if precision == "bf16" else {}
        cfg = lib_config(3, **extra)
        model, keep = model_io.load_model(AutoModelForCausalLM, f"{root}/tiny_llama", cfg)
        params = list(model.parameters())
        out[f"load_{precision}"] = {
            "all_partitioned": all(hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                                   and p.numel() == 0 for p in params),
            "largest_local_fraction": model_io.partition_report(model)[2],
            "local": model_io.partition_report(model)[0], "total": model_io.partition_report(model)[1],
            "tied": model.lm_head.weight is model.model.embed_tokens.weight}
        engine, *_ = fsam_ds.initialize(model=model, config=cfg)
        engine.train()
        stats = []
        for batch in batches[:3]:
            fsam_ds.train_step(engine, _loss, [batch])
            stats.append(dict(engine._fsam.last_stats))
        save_dir = f"{root}/saved_{precision}"
        model_io.save_model(engine, save_dir, tokenizer, stage=3)
        # the streamed save in several safetensors shards (an index, as save_pretrained writes)
        model_io.save_zero3_streamed(engine.module, f"{save_dir}_sharded", shard_bytes=300_000)
        gathered = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
        res = {"stats": stats}
        engine.destroy()
        del keep
        unset_hf_deepspeed_config()   # rank 0's reloads below must not run under zero.Init
        if rank == 0:
            from safetensors import safe_open
            reloaded = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            res["max_diff"] = max(float((reloaded.state_dict()[n].float() - w.to(dtype).float()).abs().max())
                                  for n, w in gathered.items())
            res["moved"] = max(float((reloaded.state_dict()[n].float() - p.float()).abs().max())
                               for n, p in AutoModelForCausalLM.from_pretrained(f"{root}/tiny_llama").state_dict().items()
                               if n in gathered)
            with safe_open(f"{save_dir}/model.safetensors", "pt") as f:
                res["keys"] = sorted(f.keys())
                res["dtypes"] = sorted({str(f.get_tensor(k).dtype) for k in f.keys()})
            res["file_bytes"] = os.path.getsize(f"{save_dir}/model.safetensors")
            res["numel"] = sum(w.numel() for w in gathered.values())
            res["reloaded_tied"] = reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
            sharded = AutoModelForCausalLM.from_pretrained(f"{save_dir}_sharded", dtype=dtype)
            res["sharded_files"] = sorted(os.listdir(f"{save_dir}_sharded"))
            res["sharded_max_diff"] = max(float((sharded.state_dict()[n].float() - w.to(dtype).float()).abs().max())
                                          for n, w in gathered.items())
            res["sharded_tied"] = sharded.lm_head.weight is sharded.model.embed_tokens.weight
        out[f"save_{precision}"] = res

    # 1b. host memory while loading a 91M model under ZeRO-3 (after the loads above, which paid
    #    the first-use costs): anonymous memory (RssAnon, sampled every 2 ms; VmHWM also counts
    #    the checkpoint's mapped file pages and earlier garbage) may grow by this rank's half of the
    #    fp32 model and per-module transients, not by the whole model. The control gathers the
    #    whole model on the rank, as a loader that built it first would hold it: the same
    #    measurement must see that.
    import memtrace
    memtrace.set_mmap_threshold()      # as train.py does: freed buffers leave the process
    cfg = lib_config(3)
    import gc
    gc.collect()
    memtrace.trim()                    # resident free heap would hide growth
    before = memtrace.status_mb("RssAnon")
    with memtrace.PeakSampler(interval_ms=2) as loading:
        model, keep = model_io.load_model(AutoModelForCausalLM, f"{root}/mid_llama", cfg)
    local, total, _ = model_io.partition_report(model)
    params = list(model.parameters())
    memtrace.trim()
    settled = memtrace.status_mb("RssAnon")
    with memtrace.PeakSampler(interval_ms=2) as whole:
        with deepspeed.zero.GatheredParameters(params):
            gathered_numel = sum(p.numel() for p in params)
    out["mid_load"] = {"growth_mb": loading.peak - before, "control_growth_mb": whole.peak - settled,
                       "full_fp32_mb": total * 4 / 2**20, "local_fp32_mb": local * 4 / 2**20,
                       "gathered_fp32_mb": gathered_numel * 4 / 2**20}
    del model, keep, params
    unset_hf_deepspeed_config()

    # 2. LoRA with FSAM: only the adapters are trainable, ranked and moved, frozen weights stay
    #    bit-identical. Keep ratio 0.5 > lora_B's share (43%): the first mask is all of lora_B
    #    plus lora_A elements picked by tie-breaking among exactly-0 scores (lora_B = 0 makes every
    #    lora_A gradient 0); LoRAMaskRefresh has it recomputed once lora_B has moved.
    for stage in (2, 3):
        cfg = lib_config(stage)
        cfg["fsam"].update(mask_interval=100, sparsity=0.5)
        model, keep = model_io.load_model(AutoModelForCausalLM, f"{root}/tiny_llama", cfg)
        model = model_io.add_lora(model, "causal_lm", r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = fsam_ds.initialize(model=model, config=cfg, model_parameters=trainable)
        engine.train()
        refresh = model_io.LoRAMaskRefresh(engine.module)
        lora_a = [p for n, p in engine.module.named_parameters() if "lora_A" in n]
        seen = []

        def loss_fn(eng, batch):
            with deepspeed.zero.GatheredParameters(lora_a, enabled=stage == 3):
                seen.append(torch.cat([p.detach().reshape(-1).clone() for p in lora_a]))
            return _loss(eng, batch)

        steps = []
        for batch in batches[:4]:
            seen.clear()
            fsam_ds.train_step(engine, loss_fn, [batch])
            stats = engine._fsam.last_stats
            e = seen[1] - seen[0]                     # the perturbation of lora_A (2nd pass at w+e)
            implied = (e[e != 0] / stats["perturb_scale"]) ** 2   # = g^2, the Fisher score, where kept
            steps.append({"threshold": stats["threshold"], "num_kept": stats["num_kept"],
                          "lora_A_perturbed": int((e != 0).sum()),
                          "lora_A_min_score": float(implied.min()) if implied.numel() else None,
                          "lora_B_nonzero_after": float(max(model_io.local_shard(p).abs().max() for p in refresh.lora_b)) > 0})
            refresh.after_step(engine._fsam)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            frozen_diff = max(float((p - frozen_before[n]).abs().max())
                              for n, p in engine.module.named_parameters() if not p.requires_grad)
            lora_b = max(float(p.abs().max()) for n, p in engine.module.named_parameters() if "lora_B" in n)
        out[f"lora_{stage}"] = {"frozen_diff": frozen_diff, "lora_B_max": lora_b, "steps": steps,
                                "num_adapter": sum(model_io.numel(p) for p in trainable)}
        engine.destroy()
        del keep

    # 3. activation checkpointing: the two passes recompute the same activations
    finals = {}
    for checkpointing in (False, True):
        cfg = lib_config(3)
        model, keep = model_io.load_model(AutoModelForCausalLM, f"{root}/tiny_llama", cfg)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine, *_ = fsam_ds.initialize(model=model, config=cfg)
        engine.train()
        for batch in batches[:2]:
            fsam_ds.train_step(engine, _loss, [batch])
        finals[checkpointing] = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
        finals[f"{checkpointing}_sharpness"] = engine._fsam.last_stats["sharpness"]
        engine.destroy()
        del keep
    out["checkpointing_diff"] = max(float((finals[True][n] - finals[False][n]).abs().max()) for n in finals[False])
    out["checkpointing_sharpness"] = (finals["False_sharpness"], finals["True_sharpness"])
    return out


@functools.lru_cache(maxsize=None)
def _library_results(root):
    return run_ranks(library_checks, 2, root, deepspeed=True, timeout=900)


@pytest.fixture(scope="module")
def library(assets):
    return _library_results(str(assets))


def test_zero3_loading_does_not_build_the_whole_model_on_a_rank(library):
    """Anonymous memory sampled while each rank loads the 91M Llama (350 MB in fp32) under
    zero.Init grows by its half plus transients; the same sampler sees a whole-model gather."""
    for rank, res in enumerate(library):
        mid = res["mid_load"]
        print(f"rank {rank} loading the 91M Llama under zero.Init: {mid}")
        assert mid["local_fp32_mb"] <= 0.51 * mid["full_fp32_mb"]
        # the control: the whole model on the rank registers as growth of about its full size
        assert mid["gathered_fp32_mb"] == pytest.approx(mid["full_fp32_mb"])
        assert mid["control_growth_mb"] >= 0.8 * mid["full_fp32_mb"], f"the sampler missed a whole model: {mid}"
        # a rank that built the whole fp32 model first would grow as the control does. Measured:
        # +224 MB (rank 0, which reads the checkpoint) and +209 MB (rank 1) for a 178 MB half;
        # the control +363 / +365 MB of 356
        assert mid["growth_mb"] < 0.8 * mid["full_fp32_mb"], mid


def test_zero3_loading_never_holds_a_whole_parameter_on_a_rank(library):
    for rank, res in enumerate(library):
        for precision in ("fp32", "bf16"):
            load = res[f"load_{precision}"]
            assert load["all_partitioned"], f"rank {rank} {precision}: a parameter was whole after loading"
            assert load["largest_local_fraction"] <= 0.5 + 1e-3, load
            assert load["local"] <= math.ceil(load["total"] / 2) + 64, load
            assert load["tied"], "zero.Init loading untied lm_head from embed_tokens"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_16bit_save_reloads_with_from_pretrained_equal_and_tied_once(library, precision):
    res = library[0][f"save_{precision}"]
    assert res["max_diff"] == 0.0, f"reloaded != gathered fp32 weights in {precision}: {res['max_diff']}"
    assert res["moved"] > 1e-4, "training did not move the weights"
    assert "lm_head.weight" not in res["keys"] and "model.embed_tokens.weight" in res["keys"]
    assert res["reloaded_tied"]
    bytes_per = 4 if precision == "fp32" else 2
    numel_once = res["numel"]    # named_parameters lists the tied weight once
    assert numel_once * bytes_per <= res["file_bytes"] < numel_once * bytes_per + 100_000, res["file_bytes"]
    assert res["dtypes"] == (["torch.float32"] if precision == "fp32" else ["torch.bfloat16"])
    # streamed in shards of 300 kB: several files and an index, the same weights, still tied
    assert "model.safetensors.index.json" in res["sharded_files"], res["sharded_files"]
    assert sum(f.endswith(".safetensors") for f in res["sharded_files"]) > 1, res["sharded_files"]
    assert res["sharded_max_diff"] == 0.0 and res["sharded_tied"]
    # FSAM really perturbed (a silent base-optimizer step has no perturbation and no sharpness)
    for stats in res["stats"]:
        assert 0.01 < stats["perturbation_norm"] <= 0.05 + 1e-6, stats
        assert stats["sharpness"] != 0.0 and 0 < stats["mask_density"] < 1


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_with_fsam_moves_only_adapters_and_remasks_once_lora_a_has_gradients(library, stage):
    for rank, r in enumerate(library):
        res = r[f"lora_{stage}"]
        steps = res["steps"]
        assert res["frozen_diff"] == 0.0, f"rank {rank}: a frozen weight moved by {res['frozen_diff']}"
        assert res["lora_B_max"] > 0, "the adapters did not train"
        # FSAM ranks exactly the adapter elements: k = ceil(0.5 * adapter elements)
        assert steps[0]["num_kept"] == math.ceil(0.5 * res["num_adapter"]), res
        # DeepSpeed's linear warm-up runs the first two steps at lr 0, so lora_B is still 0 after
        # them; until it moves, every lora_A gradient is 0: threshold 0 (ties among lora_A's zero
        # scores, the mask takes arbitrary lora_A elements) and no lora_A element moves
        first = next(i for i, s in enumerate(steps) if s["lora_B_nonzero_after"]) + 1
        assert 2 <= first < len(steps), steps
        for s in steps[:first]:
            assert s["threshold"] == 0.0 and s["lora_A_perturbed"] == 0, steps
        # the next step recomputes the mask from real lora_A gradients (without LoRAMaskRefresh
        # the first mask and its threshold 0 stay for mask_interval = 100 steps), and every
        # perturbed lora_A element is in it on its Fisher score
        s = steps[first]
        assert s["threshold"] > 0 and s["lora_A_perturbed"] > 0, steps
        assert s["lora_A_min_score"] >= 0.99 * s["threshold"], steps


def test_activation_checkpointing_gives_the_same_fsam_steps(library):
    res = library[0]
    assert res["checkpointing_diff"] < 1e-6, res["checkpointing_diff"]
    a, b = res["checkpointing_sharpness"]
    assert a != 0.0 and abs(a - b) < 1e-5


# ---------------------------------------------------------------------------------- train.py, launched
def launch(assets, out, config, extra, port, model=None):
    cfg_path = out.parent / f"{out.name}_ds.json"
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    return run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/train.py",
                "--deepspeed_config", str(cfg_path), "--model_name_or_path", str(model or assets / "tiny_llama"),
                "--output_dir", str(out), "--log_every", "1", *extra], timeout=900)


@pytest.fixture(scope="module")
def zero3_sft_run(assets):
    """ZeRO-3, chat data, train_batch_size 8 in the config (so accumulation 2), warm-up "auto",
    --save_every 0, no --eval_before (the first epoch must still train in train mode)."""
    out = assets / "sft3"
    cfg = ds_config(3, train_batch_size=8)
    cfg.pop("gradient_accumulation_steps")
    # Hugging Face's "auto" buffer sizes (the persistence threshold stays 0: every parameter partitioned)
    cfg["zero_optimization"].update(reduce_bucket_size="auto", stage3_prefetch_bucket_size="auto")
    proc = launch(assets, out, cfg, ["--task", "causal_lm", "--train_file", str(assets / "chat_train.jsonl"),
                                     "--validation_file", str(assets / "chat_val.jsonl"), "--max_steps", "4",
                                     "--max_seq_length", "128", "--save_every", "0"], 29551)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, proc, json.load(open(out / "metrics.json"))


def test_train_py_zero3_instruction_run(zero3_sft_run):
    out, proc, m = zero3_sft_run
    assert m["zero_stage"] == 3 and m["data_format"] == "messages"
    # the config's train_batch_size is kept: accumulation follows from it
    assert m["global_batch_size"] == 8 and m["gradient_accumulation_steps"] == 2
    # warm-up "auto" is a fraction of this run, not 100 steps
    assert m["scheduler"]["params"]["warmup_num_steps"] == math.ceil(0.1 * 4)
    assert m["scheduler"]["params"]["total_num_steps"] == 4
    assert max(h["lr"] for h in m["history"]) == pytest.approx(1e-3)
    # the start-up line counts partitioned parameters (was "0.0M params")
    assert f"{m['num_params'] / 1e6:.1f}M params" in proc.stdout and m["num_params"] > 700_000
    assert ("ZeRO buffer sizes from the model's hidden size: "
            "{'reduce_bucket_size': 256, 'stage3_prefetch_bucket_size': 230}") in proc.stdout
    assert "fsam perturbs" in proc.stdout and "tied input/output embedding" in proc.stdout
    # train mode from the first step (from_pretrained returns eval mode)
    assert all(h["train_mode"] for h in m["history"])
    # Train/loss is the mean over ranks, not rank 0's (train_step already averages over the
    # data-parallel group, so every rank reports that same mean)
    for h in m["history"]:
        assert h["loss"] == pytest.approx(sum(h["rank_losses"]) / 2, rel=1e-12)
        assert h["rank_losses"][0] == h["rank_losses"][1]
    assert all(h["fsam_perturbation_norm"] > 0 and h["fsam_sharpness"] != 0 for h in m["history"])
    # partitioned from loading on: each rank holds half of every parameter
    for load in m["load_per_rank"]:
        assert load["local_numel"] <= m["load"]["model_numel"] // 2 + 64
    assert m["load"]["largest_local_fraction"] <= 0.5 + 1e-3
    assert m["validation"]["tokens"] > 0 and math.isfinite(m["validation"]["loss"])


def test_train_py_save_every_0_checkpoints_at_the_end_and_16bit_model_equals_zero_to_fp32(zero3_sft_run):
    out, _, m = zero3_sft_run
    assert open(out / "checkpoints" / "latest").read().strip() == "step4"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM
    from safetensors import safe_open
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step4")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    state = model.state_dict()
    assert set(fp32) <= set(state)
    assert max(float((state[k] - v.float()).abs().max()) for k, v in fp32.items()) == 0.0
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


@pytest.fixture(scope="module")
def zero2_lora_classification_run(assets, tokenizer):
    """ZeRO-2, a Llama decoder as a classifier (pad id), LoRA, activation checkpointing, and a
    first step that DeepSpeed skips: the rows of train.py's first global batch start with token 0,
    whose (frozen) embedding is inf in this copy of the model, so that step's gradients are NaN."""
    import random
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(assets / "tiny_llama", num_labels=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = float("inf")
    model.save_pretrained(assets / "tiny_llama_inf")
    tokenizer.save_pretrained(assets / "tiny_llama_inf")
    rows = [json.loads(line) for line in open(assets / "cls_train.jsonl")]
    order = list(range(len(rows)))
    random.Random(42).shuffle(order)            # train.py's epoch-0 order (seed 42)
    global_batch = 2 * 1 * 2                    # micro 2 x accumulation 1 x 2 ranks
    for i in order[:global_batch]:
        rows[i]["text"] = tokenizer.convert_ids_to_tokens(0) + " " + rows[i]["text"]
    train = write_jsonl(assets / "cls_train_inf.jsonl", rows)
    out = assets / "cls2"
    cfg = ds_config(2)
    proc = launch(assets, out, cfg, ["--task", "classification", "--train_file", train,
                                     "--validation_file", str(assets / "cls_val.jsonl"), "--max_steps", "4",
                                     "--max_seq_length", "48", "--lora_r", "4", "--gradient_checkpointing"],
                  29552, model=assets / "tiny_llama_inf")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, proc, json.load(open(out / "metrics.json"))


def test_train_py_decoder_classification_lora_checkpointing_and_a_skipped_first_step(zero2_lora_classification_run, assets):
    out, proc, m = zero2_lora_classification_run
    assert m["history"][0]["skipped"], "the first step's NaN gradients should make DeepSpeed skip it"
    assert "step 1/4" in proc.stdout and "skipped" in proc.stdout   # the log line (was a KeyError)
    assert not any(h["skipped"] for h in m["history"][1:]), m["history"]
    assert all(h["train_mode"] for h in m["history"])
    assert 0 <= m["validation"]["accuracy"] <= 1
    assert m["num_trainable"] < 0.2 * m["num_params"]
    assert os.path.isfile(out / "model" / "adapter_model.safetensors")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    base = AutoModelForSequenceClassification.from_pretrained(assets / "tiny_llama", num_labels=2)
    model = PeftModel.from_pretrained(base, out / "model")
    assert any("lora_B" in n and float(p.abs().max()) > 0 for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def rss_per_param_runs(assets, tokenizer):
    """launch/train.py, ZeRO-3 FSAM causal LM at 2 ranks with the shipped zero3_fsam.json (micro
    batch 2), on a random 81.5M Llama (a 25M-element tied embedding) and on the tiny one: each
    rank's peak RSS as train.py reports it (the kernel's VmHWM, loading to final save)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=512, intermediate_size=1408, num_hidden_layers=20,
                                       num_attention_heads=8, num_key_value_heads=2)).save_pretrained(assets / "llama80m")
    tokenizer.save_pretrained(assets / "llama80m")
    cfg = json.load(open(os.path.join(REPO, "ds_configs", "zero3_fsam.json")))
    cfg["train_micro_batch_size_per_gpu"] = 2
    cfg.pop("csv_monitor", None)
    runs = {}
    for port, name in ((29554, "tiny_llama"), (29555, "llama80m")):
        out = assets / f"rss_{name}"
        proc = launch(assets, out, cfg, ["--task", "causal_lm", "--train_file", str(assets / "chat_train.jsonl"),
                                         "--validation_file", str(assets / "chat_val.jsonl"), "--max_steps", "2",
                                         "--max_seq_length", "64", "--max_eval_samples", "4"], port, model=assets / name)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        runs[name] = json.load(open(out / "metrics.json"))
    return runs


def test_train_py_zero3_fsam_peak_rss_per_parameter(rss_per_param_runs):
    """Fully partitioned fp32 AdamW + FSAM at 2 ranks needs about 10.5 B/param (parameter = master
    2, Adam 4, gradient 2, FSAM's saved values and scores about 2.5); the whole fp32 model on a
    rank at the peak would add 4 B/param, DeepSpeed's duplicate fp32 master 2, and the loading test
    above catches a whole model at load directly. Measured 2026-12-02 on 2 CPU cores: 15.86 and
    15.80 (rank 0, 1), about 130 s for the two launches; 25.9 on main at 220M (issue 13)."""
    tiny, big = rss_per_param_runs["tiny_llama"], rss_per_param_runs["llama80m"]
    extra = big["num_params"] - tiny["num_params"]
    assert big["num_params"] > 80e6 and big["zero_stage"] == 3 and big["optimizer"] == "fsam"
    assert all(m["mmap_threshold"] == 1 << 20 for m in big["memory_per_rank"])
    per_param = [(b["peak_rss_mb"] - t["peak_rss_mb"]) * 2**20 / extra
                 for b, t in zip(big["memory_per_rank"], tiny["memory_per_rank"])]
    print(f"peak RSS growth per parameter, per rank: {per_param}")
    assert max(per_param) < 16.5, per_param
    assert min(per_param) > 6, f"implausibly low (fp32 Adam state alone is 4 B/param at 2 ranks): {per_param}"


# ---------------------------------------------------------------------------------- SmolLM2 (real weights)
@pytest.mark.skipif(SKIP_SMOLLM2, reason="FSAM_SKIP_SMOLLM2=1: the real SmolLM2-135M run takes ~2.5 min on 2 CPU cores")
def test_smollm2_instruction_tuning_lowers_the_response_loss(assets, tmp_path):
    out = tmp_path / "smollm2"
    cfg = ds_config(3)
    cfg["optimizer"]["params"]["lr"] = cfg["scheduler"]["params"]["warmup_max_lr"] = 1e-4
    with open(tmp_path / "ds.json", "w") as f:
        json.dump(cfg, f)
    proc = run(["deepspeed", "--num_gpus", "2", "--master_port", "29553", "launch/train.py",
                "--deepspeed_config", str(tmp_path / "ds.json"), "--model_name_or_path", prepare_data.smollm2_dir(),
                "--task", "causal_lm", "--train_file", str(assets / "chat_train.jsonl"),
                "--validation_file", str(assets / "chat_val.jsonl"), "--max_steps", "8", "--max_seq_length", "128",
                "--max_eval_samples", "16", "--eval_before", "--output_dir", str(out)], timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    m = json.load(open(out / "metrics.json"))
    print(f"SmolLM2 response loss {m['validation_before']['loss']:.4f} -> {m['validation']['loss']:.4f}"
          f" ({m['validation']['tokens']} response tokens, {m['train_seconds']:.0f} s training)")
    assert m["validation"]["loss"] < m["validation_before"]["loss"] - 0.1
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.tie_word_embeddings
    assert os.path.getsize(out / "model" / "model.safetensors") < 540_000_000   # tied head once
