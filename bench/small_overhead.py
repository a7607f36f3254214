"""Per-step overhead of FSAM at small-model size: aten ops, host syncs and step time.

    DS_ACCELERATOR=cpu python bench/small_overhead.py --out /tmp/small_overhead.json
    DS_ACCELERATOR=cpu python bench/small_overhead.py --model tiny --steps 1 --out /tmp/so.json
    python bench/small_overhead.py --out small_overhead_gpu.json          # one GPU: step times

A small model's FSAM step is bound by kernel launches and host syncs, not by arithmetic, so the
counts measured on the CPU say what costs time on a GPU. For each variant (adamw, sam,
fsam_every_step, fsam_every_100) at each ZeRO stage (0 and 2, world size 1, fp32), a BERT of
MiniLM-L6's shape (6 layers, hidden 384, ~100 parameter tensors; `--model tiny` for a test) is
trained a few steps; per optimizer step it counts, under a TorchDispatchMode:
  fsam_ops     aten ops dispatched inside fsam_ds's own code (FSAMCore.perturb / restore and
               the DeepSpeed client's capture/restore; DeepSpeed's and the base optimizer's
               work excluded: that is the same for SAM and AdamW)
  fsam_kernels  the same without views and metadata ops (what launches a kernel on a GPU)
  fsam_syncs   host syncs inside fsam_ds's code: Tensor -> Python conversions (item, tolist,
               bool/int/float: aten._local_scalar_dense), data-dependent shapes (nonzero,
               masked_select, boolean indexing), and bincount, which reads the maximum back on GPUs
  step_ops     every aten op of the step (forward, backward, DeepSpeed, optimizer)
  step_syncs   every host sync of the step, as fsam_syncs counts them (the loss's read-back, the
               lean first pass's norm read, DeepSpeed's own)
and the median step time without the counter. Prints a table; --out writes the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

VARIANTS = {
    "adamw": None,
    "sam": {"rho": 0.05, "sparsity": 0.0, "mask_interval": 100},
    "fsam_every_step": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 1},
    "fsam_every_100": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 100},
}
BERT_SHAPES = {
    # all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, 22.7M parameters, 101 parameter tensors
    "minilm": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12,
                   intermediate_size=1536, vocab_size=30522, max_position_embeddings=512),
    "tiny": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                 intermediate_size=64, vocab_size=128, max_position_embeddings=64),
}
BERT_ALWAYS_PERTURB = ["bias", "LayerNorm", "norm", "embed"]

# aten ops that launch no kernel (views, metadata, profiler marks): counted apart
_NO_KERNEL_OPS = {"view", "slice", "detach", "select", "split", "split_with_sizes", "as_strided",
                  "_reshape_alias", "reshape", "expand", "t", "unsqueeze", "squeeze", "alias",
                  "_unsafe_view", "lift_fresh", "unbind", "narrow", "empty", "empty_strided",
                  "_record_function_enter_new", "_record_function_exit", "is_nonzero",
                  "_local_scalar_dense", "set_", "resize_", "flatten"}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique",
             "_unique2", "nonzero_static_not"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops, in all and inside fsam_ds's code (depth > 0), and host syncs there."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.active = False   # inside `with COUNTER:` (tolist is counted only then)
        self.reset()

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def reset(self):
        self.step_ops = self.step_syncs = self.fsam_ops = self.fsam_kernels = self.fsam_syncs = 0
        self.fsam_sync_names: dict = {}
        self.fsam_op_names: dict = {}

    def note_sync(self, name: str):
        self.step_syncs += 1
        if self.depth > 0:
            self.fsam_syncs += 1
            self.fsam_sync_names[name] = self.fsam_sync_names.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.step_ops += 1
        if self.depth > 0:
            self.fsam_ops += 1
            self.fsam_kernels += name not in _NO_KERNEL_OPS
            self.fsam_op_names[name] = self.fsam_op_names.get(name, 0) + 1
        kind = _sync_kind(name, args)
        if kind:
            self.note_sync(kind)
        return func(*args, **kwargs)


def _sync_kind(name: str, args):
    """Which host sync an aten op makes on a GPU (None: none)."""
    if name in _SYNC_OPS:
        return name
    if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                               for i in (args[1] if len(args) > 1 else ()) if i is not None):
        return "index[bool]"
    return None


COUNTER = OpCounter()


def _inside_fsam(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        COUNTER.depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            COUNTER.depth -= 1
    return wrapper


def _outside_fsam(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth, COUNTER.depth = COUNTER.depth, 0
        try:
            return fn(*args, **kwargs)
        finally:
            COUNTER.depth = depth
    return wrapper


def instrument_fsam() -> None:
    """Mark fsam_ds's own code for the counter: the core's perturb/restore and the client's
    step() (capture and restore), with the base optimizer's step excluded. tolist() does not
    dispatch an aten op, so it is counted here too."""
    from fsam_ds import deepspeed_client, fsam_core, topk_threshold
    topk_threshold.BINCOUNT_ON_CPU = False   # count the GPU's histogram kernel (no host sync)
    from fsam_ds.optimizer import BaseOptimizerFacade
    for name in ("perturb", "restore", "restore_all", "restore_many"):
        if hasattr(fsam_core.FSAMCore, name):
            setattr(fsam_core.FSAMCore, name, _inside_fsam(getattr(fsam_core.FSAMCore, name)))
    client = deepspeed_client.FSAMDeepSpeedClient
    client.step = _inside_fsam(client.step)
    # the base optimizer's step inside the client's step is not fsam_ds's cost
    original_init = BaseOptimizerFacade._build_base

    def build_base(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.base_optimizer.step = _outside_fsam(self.base_optimizer.step)
    BaseOptimizerFacade._build_base = build_base
    original_tolist = torch.Tensor.tolist

    def tolist(self):
        if COUNTER.active:
            COUNTER.note_sync("tolist")
        return original_tolist(self)
    torch.Tensor.tolist = tolist


def build_bert(shape: str, rt, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(**BERT_SHAPES[shape], num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    with torch.device(rt.device):
        model = BertForSequenceClassification(config)
    model.train()
    return model


def ds_config(stage: int, micro_batch: int, fsam_block) -> dict:
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "train_batch_size": micro_batch, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
              "wall_clock_breakdown": False}
    if fsam_block is not None:
        config["fsam"] = dict(fsam_block, always_perturb=BERT_ALWAYS_PERTURB)
    return config


def loss_fn(engine, batch):
    input_ids, labels = batch
    return engine(input_ids=input_ids, labels=labels).loss


def one_step(engine, batch, fsam: bool):
    if fsam:
        import fsam_ds
        return fsam_ds.train_step(engine, loss_fn, [batch])
    loss = loss_fn(engine, batch)
    engine.backward(loss)
    engine.step()
    return loss


def build_case(name, stage, args, rt):
    """A fresh MiniLM-shaped engine for one variant, its batch, and its warm-up steps taken."""
    fsam_block = VARIANTS[name]
    model = build_bert(args.model, rt)
    info = {"variant": name, "zero_stage": stage, "num_params": benchlib.count_parameters(model),
            "num_param_tensors": len(list(model.parameters()))}
    engine = benchlib.build_engine(model, ds_config(stage, args.micro_batch, fsam_block))
    del model
    gen = torch.Generator().manual_seed(1234)
    vocab = BERT_SHAPES[args.model]["vocab_size"]
    batch = (torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen).to(rt.device),
             torch.randint(0, 2, (args.micro_batch,), generator=gen).to(rt.device))
    for _ in range(args.warmup):
        one_step(engine, batch, fsam_block is not None)
    return {"info": info, "engine": engine, "batch": batch, "fsam": fsam_block is not None}


def count_case(case, args) -> list:
    """Per-step op and sync counts (step 0 of fsam_every_100 was taken in the warm-up unless
    warmup == 0)."""
    counts = []
    for _ in range(args.count_steps):
        COUNTER.reset()
        with COUNTER:
            one_step(case["engine"], case["batch"], case["fsam"])
        counts.append({"step_ops": COUNTER.step_ops, "fsam_ops": COUNTER.fsam_ops,
                       "fsam_kernels": COUNTER.fsam_kernels,
                       "fsam_syncs": COUNTER.fsam_syncs, "step_syncs": COUNTER.step_syncs,
                       "sync_kinds": dict(COUNTER.fsam_sync_names),
                       "top_fsam_ops": dict(sorted(COUNTER.fsam_op_names.items(),
                                                   key=lambda kv: -kv[1])[:12]),
                       "refreshed": _refreshed(case["engine"])})
    return counts


def timed_step(case, rt) -> float:
    benchlib.sync(rt)
    start = time.perf_counter()
    one_step(case["engine"], case["batch"], case["fsam"])
    benchlib.sync(rt)
    return time.perf_counter() - start


def trace_case(case, args, rt) -> None:
    """--trace_dir: three more steps under torch.profiler, written as a gzipped Chrome trace
    (bench/trace_busy.py reads it: wall and GPU-busy time of each fsam.* range)."""
    if not args.trace_dir:
        return
    import gzip
    import shutil
    activities = [torch.profiler.ProfilerActivity.CPU]
    if rt.on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            timed_step(case, rt)
    if rt.is_main:
        os.makedirs(args.trace_dir, exist_ok=True)
        info = case["info"]
        raw = os.path.join(args.trace_dir, f"trace_z{info['zero_stage']}_{info['variant']}.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)


def release_case(case, rt) -> None:
    benchlib.release_engine(case.pop("engine"))
    benchlib.collect_memory(rt)


def run_stage(stage, names, args, rt) -> list:
    """Every variant at one stage. --interleave builds all engines first and times one step of
    each in turn, so drift in the machine's speed hits every variant alike; otherwise one
    variant after the other on a fresh engine."""
    results = []
    if args.interleave:
        cases = [build_case(name, stage, args, rt) for name in names]
        for case in cases:
            case["counted"], case["times"] = count_case(case, args), []
        for _ in range(args.steps):
            for case in cases:
                case["times"].append(timed_step(case, rt))
        for case in cases:
            trace_case(case, args, rt)
            release_case(case, rt)
    else:
        cases = []
        for name in names:
            case = build_case(name, stage, args, rt)
            case["counted"] = count_case(case, args)
            case["times"] = [timed_step(case, rt) for _ in range(args.steps)]
            trace_case(case, args, rt)
            release_case(case, rt)
            cases.append(case)
    for case in cases:
        times = case["times"]
        results.append({**case["info"], "counted": case["counted"],
                        "median_step_s": statistics.median(times) if times else None,
                        "mean_step_s": statistics.fmean(times) if times else None,
                        "step_s": times, "interleaved": bool(args.interleave)})
    return results


def _refreshed(engine):
    """Whether the last FSAM step rebuilt the mask (None for the AdamW baseline)."""
    from fsam_ds import deepspeed_adapter
    core = getattr(deepspeed_adapter.engine_client_optimizer(engine), "core", None)
    return None if core is None else bool(core.last_stats.get("refreshed"))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=sorted(BERT_SHAPES))
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--stages", default="0,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--count_steps", type=int, default=1,
                   help="steps counted under the op counter (after the warm-up)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (without the counter)")
    p.add_argument("--interleave", action="store_true",
                   help="build every variant's engine of a stage first, then time one step of "
                        "each in turn (drift hits all variants alike)")
    p.add_argument("--trace_dir", default=None,
                   help="also profile 3 steps of each variant into gzipped Chrome traces here")
    p.add_argument("--out", required=True)
    return p


def main():
    args = build_parser().parse_args()
    rt = benchlib.start(use_deepspeed=True)
    instrument_fsam()
    rows, results = [], []
    for stage in (int(s) for s in args.stages.split(",")):
        for r in run_stage(stage, args.variants.split(","), args, rt):
            results.append(r)
            c = r["counted"][-1] if r["counted"] else {}
            rows.append([str(stage), r["variant"], str(r["num_param_tensors"]), str(c.get("fsam_ops")), str(c.get("fsam_kernels")),
                         str(c.get("fsam_syncs")), str(c.get("step_ops")), str(c.get("step_syncs")),
                         benchlib.fmt_seconds(r["median_step_s"])])
    ratios = {}
    for stage in {r["zero_stage"] for r in results}:
        by_name = {r["variant"]: r["median_step_s"] for r in results if r["zero_stage"] == stage}
        for a, b in (("sam", "adamw"), ("fsam_every_step", "sam"), ("fsam_every_100", "sam")):
            if a in by_name and b in by_name:
                ratios[f"zero{stage}:{a}/{b}"] = benchlib.ratio(by_name[a], by_name[b])
    result = {"benchmark": "small_overhead",
              "config": {"model": args.model, **BERT_SHAPES[args.model], "seq_len": args.seq_len,
                         "micro_batch": args.micro_batch, "warmup": args.warmup,
                         "count_steps": args.count_steps, "steps": args.steps,
                         "interleave": bool(args.interleave),
                         "world_size": rt.world_size, "dtype": "float32"},
              "variants": results, "ratios": ratios, "environment": benchlib.environment(rt)}
    header = ["ZeRO", "variant", "tensors", "fsam ops/step", "fsam kernel ops/step",
              "fsam syncs/step", "all ops/step", "all syncs/step",
              "step (median)"]
    benchlib.publish_and_finish(args.out, result, header, rows, rt)


if __name__ == "__main__":
    main()
