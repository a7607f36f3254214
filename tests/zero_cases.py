"""Shared pieces of the DeepSpeed tests: a model whose parameter count forces ZeRO partition padding,
deterministic global batches, a DeepSpeed config builder, what each rank runs, and the
single-process reference run on the same global batches."""
from __future__ import annotations

import copy

import torch

GLOBAL_BATCH = 8          # samples per optimizer step, whatever the world size
GAS = 2                   # gradient accumulation steps
ADAMW = {"lr": 1e-2, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}
SCHEDULER = {"type": "WarmupDecayLR",
             "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 3,
                        "total_num_steps": 12, "warmup_type": "linear"}}
CLIP = 1.0


class PaddedNet(torch.nn.Module):
    """277 parameters in 7 tensors (odd sizes: every world size > 1 pads the partitions)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 7)
        self.fc1 = torch.nn.Linear(7, 13)
        self.norm = torch.nn.LayerNorm(13)
        self.fc2 = torch.nn.Linear(13, 5)

    def forward(self, tokens):
        return self.fc2(torch.tanh(self.norm(self.fc1(self.embed(tokens).mean(1)))))


def make_model(kind="padded"):
    torch.manual_seed(0)
    if kind == "padded":
        return PaddedNet()
    from transformers import BertConfig, BertForSequenceClassification
    dropout = 0.1 if kind == "bert_dropout" else 0.0
    config = BertConfig(vocab_size=11, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=8, num_labels=5,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


def param_groups(model):
    """Two groups with different weight decay (the usual no-decay-for-bias-and-norm split)."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n.lower()]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "norm" not in n.lower())]
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def global_batches(n_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 11, (GLOBAL_BATCH, 6), generator=g),
             torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)) for _ in range(n_steps)]


def logits_of(model, tokens):
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def loss_fn(engine, batch):
    tokens, labels = batch
    return torch.nn.functional.cross_entropy(logits_of(engine, tokens).float(), labels)


def micro_batches(batch, rank, world_size):
    """This rank's GAS micro-batches of one global batch."""
    tokens, labels = batch
    per_rank = GLOBAL_BATCH // world_size
    t = tokens[rank * per_rank:(rank + 1) * per_rank].chunk(GAS)
    y = labels[rank * per_rank:(rank + 1) * per_rank].chunk(GAS)
    return list(zip(t, y))


def ds_config(stage, world_size, fsam=None, dtype="fp32", offload=False, optimizer=True, clip=None):
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size // GAS,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": CLIP if clip is None else clip,
        "scheduler": copy.deepcopy(SCHEDULER),
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if optimizer:
        config["optimizer"] = {"type": "AdamW", "params": dict(ADAMW)}
    if fsam is not None:
        config["fsam"] = dict(fsam)
    if stage == 3:
        # partition every parameter (the default keeps small ones whole) and use several sub-groups
        config["zero_optimization"].update(stage3_param_persistence_threshold=0, sub_group_size=100)
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if dtype == "bf16_fp32acc":   # stage 1: DeepSpeed's BF16_Optimizer
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if dtype == "fp16":
        # a small start and a short window, so that the scale moves within a few steps
        config["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1,
                          "hysteresis": 1, "min_loss_scale": 1}
    return config


def full_weights(engine):
    """Every parameter gathered in fp32, by name (ZeRO-3 partitions are gathered)."""
    import deepspeed
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().float().clone() for n, p in params}


def full_weights_of(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def build_engine(model, config, fsam: bool):
    """fsam_ds.initialize, or (fsam=False) plain DeepSpeed with torch AdamW on the same groups."""
    import deepspeed
    import fsam_ds
    if fsam:
        return fsam_ds.initialize(model=model, config=config, model_parameters=param_groups(model))[0]
    opt = torch.optim.AdamW(param_groups(model), **ADAMW)
    config = {k: v for k, v in config.items() if k != "optimizer"}
    config["zero_allow_untested_optimizer"] = True
    config["zero_force_ds_cpu_optimizer"] = False
    return deepspeed.initialize(model=model, optimizer=opt, config=config)[0]


def run_fsam_case(rank, world_size, case):
    """Train one case for case['steps'] FSAM steps; returns weights, losses and mask counts."""
    import fsam_ds
    model = make_model(case.get("model", "padded"))
    config = ds_config(case["stage"], world_size, case.get("fsam"), case.get("dtype", "fp32"),
                       case.get("offload", False), clip=case.get("clip"))
    engine = build_engine(model, config, fsam=case.get("fsam") is not None)
    losses, stats = [], []
    for step, batch in enumerate(global_batches(case["steps"])):
        mbs = micro_batches(batch, rank, world_size)
        if case.get("fsam") is None:
            for mb in mbs:
                loss = loss_fn(engine, mb)
                engine.backward(loss)
                engine.step()
            losses.append(float(loss))
        else:
            losses.append(fsam_ds.train_step(engine, loss_fn, mbs))
            stats.append(dict(engine._fsam.last_stats))
    result = {"weights": full_weights(engine), "losses": losses, "stats": stats,
              "global_steps": engine.global_steps, "lr": engine.get_lr()[0],
              "wrapper": type(engine.optimizer).__name__}
    if case.get("fsam") is not None:
        fsam = engine._fsam
        kept = fsam.local_kept_ranked()   # with the last refresh's mask
        result.update(kept=kept, num_ranked=next((s["num_ranked"] for s in reversed(stats) if "num_ranked" in s), None),
                      state_bytes=fsam.state_bytes())
    engine.destroy() if hasattr(engine, "destroy") else None
    return result


def run_cases(rank, world_size, cases):
    return [run_fsam_case(rank, world_size, case) for case in cases]


def reference_run(case):
    """The same training in one process: ReferenceFSAM (exact topk) + clipping + the same schedule."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR
    from reference_fsam import ReferenceFSAM
    model = make_model(case.get("model", "padded"))
    fsam = dict(case["fsam"])
    ref = ReferenceFSAM(model.named_parameters(), torch.optim.AdamW, param_groups=param_groups(model),
                        rho=fsam.get("rho", 0.05), sparsity=fsam.get("sparsity", 0.9),
                        mask_interval=fsam.get("mask_interval", 100), fisher=fsam.get("fisher", "grad_sq"),
                        adaptive=fsam.get("adaptive", False),
                        always_perturb=fsam.get("always_perturb", ("bias", "norm", "embed")), **ADAMW)
    sched = WarmupDecayLR(ref.base, **SCHEDULER["params"])
    losses = []
    for t, batch in enumerate(global_batches(case["steps"])):
        loss = torch.nn.functional.cross_entropy(logits_of(model, batch[0]), batch[1])
        if fsam.get("rho", 0.05) == 0 or t % fsam.get("sam_interval", 1) != 0:
            loss.backward(); ref.plain_step(clip=CLIP); ref.zero_grad()   # one pass, base step
            sched.step()
            losses.append(float(loss))
            continue
        loss.backward(); ref.first_step(); ref.zero_grad()
        torch.nn.functional.cross_entropy(logits_of(model, batch[0]), batch[1]).backward()
        ref.second_step(clip=CLIP); ref.zero_grad()
        sched.step()
        losses.append(float(loss))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)
