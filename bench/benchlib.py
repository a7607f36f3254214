"""Shared pieces of the fsam_ds benchmarks: the GPT-2 presets, the DeepSpeed config, process-group
start-up (torchrun / spawned CPU ranks / a plain `python` run), device timing and memory helpers,
and the JSON + markdown result format. Every benchmark script imports this module.

CUDA is used when torch sees a GPU and DS_ACCELERATOR is not "cpu"; otherwise everything runs on
the CPU over gloo (fp32), where allocator statistics do not exist and memory fields are null.
"""
from __future__ import annotations

import datetime
import gc
import glob
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:   # fsam_ds importable without `pip install -e .` (the GPU image)
    sys.path.insert(1, REPO_ROOT)

import torch  # noqa: E402  (after the path set-up above)
import torch.distributed as dist  # noqa: E402

# GPT-2-shaped presets: (layers, width, heads). The real sizes use GPT-2's vocabulary; the CPU
# preset a small one, since a 50k-wide LM head would dominate a 64-wide model's step.
GPT2_VOCAB_SIZE = 50257
PRESETS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512),
    "350m": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=GPT2_VOCAB_SIZE),
    "1.3b": dict(n_layer=24, n_embd=2048, n_head=16, vocab_size=GPT2_VOCAB_SIZE),
    # 5.0B: the largest GPT-2 shape whose FSAM ZeRO-3 step (~22 B/param: bf16 weights and
    # gradients, fp32 masters, AdamW moments, FSAM's first-pass gradients, mask and saved values)
    # fits one 141 GB H200 with activation checkpointing
    "5b": dict(n_layer=24, n_embd=4096, n_head=32, vocab_size=GPT2_VOCAB_SIZE),
    "7b": dict(n_layer=32, n_embd=4096, n_head=32, vocab_size=GPT2_VOCAB_SIZE),
}

# The paper always perturbs biases and embeddings. fsam_ds's default patterns ("bias", "norm",
# "embed") miss GPT-2's names (wte, wpe, ln_1, ln_2, ln_f), so the benchmarks add them.
GPT2_ALWAYS_PERTURB = ["bias", "norm", "embed", "wte", "wpe", r"\.ln_"]

BASE_OPTIMIZER = {"type": "AdamW", "params": {"lr": 1e-5}}
GRADIENT_CLIPPING = 1.0

# (name, "fsam" config block or None for the plain AdamW baseline) in measuring order.
STEP_VARIANTS = {
    "adamw": None,
    "sam": {"rho": 0.05, "sparsity": 0.0, "mask_interval": 100},
    "fsam_every_step": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 1},
    "fsam_every_100": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 100},
    # interval mode: the perturbed two-pass step every 2nd / 4th step, one plain pass otherwise
    "fsam_interval_2": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 100, "sam_interval": 2},
    "fsam_interval_4": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 100, "sam_interval": 4},
}


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    on_cuda: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cuda_wanted() -> bool:
    return os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" and torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """A plain `python script.py` run is world size 1: give DeepSpeed the rendezvous it expects."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def start(use_deepspeed: bool, quiet: bool = True) -> Runtime:
    """Join the process group torchrun (or a spawner) described in the environment.

    use_deepspeed: start through deepspeed.init_distributed (needed before deepspeed.initialize);
    otherwise plain torch.distributed, and only when there is more than one rank."""
    set_single_process_env()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    on_cuda = cuda_wanted()
    if on_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # One thread per rank unless told otherwise: on a machine whose cores other work shares,
        # OpenMP threads waiting for each other made a tiny model's step ~80x slower (1 s vs 13 ms).
        torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", "1")))
        device = torch.device("cpu")
    backend = "nccl" if on_cuda else "gloo"
    # BENCH_DIST_BACKEND (e.g. "cpu:gloo,cuda:nccl") starts the process group with that backend
    # string first; deepspeed.init_distributed then adopts it. This lets a library that issues a
    # collective on a CPU tensor run over an NCCL world (fsam_ds did, at its first mask refresh).
    group_backend = os.environ.get("BENCH_DIST_BACKEND")
    if group_backend and not dist.is_initialized():
        dist.init_process_group(group_backend, rank=rank, world_size=world_size,
                                device_id=device if on_cuda else None)
    if use_deepspeed:
        import deepspeed
        if quiet:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    elif world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=device if on_cuda else None)
    return Runtime(rank, world_size, local_rank, device, on_cuda)


def finish(rt: Runtime) -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- model and config -------------------------------------------------------------------------
def build_gpt2(preset: str, seq_len: int, rt: Runtime, activation_checkpointing: bool = False,
               seed: int = 0):
    """A randomly initialised GPT2LMHeadModel, built on the device (bf16 on GPU, fp32 on CPU)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    if preset not in PRESETS:
        raise ValueError(f"Unknown --model {preset!r}; choose one of {sorted(PRESETS)}")
    # GPT-2's 1024 positions, more if the sequence needs them; no KV cache in training
    config = GPT2Config(**PRESETS[preset], n_positions=max(1024, seq_len), use_cache=False)
    torch.manual_seed(seed)
    # Built and initialised on the device: on the host a 7B model would first take 27 GB of
    # fp32 host memory per rank, and be initialised by the CPU.
    with torch.device(rt.device):
        model = GPT2LMHeadModel(config)
    model = model.to(model_dtype(rt))
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def model_dtype(rt: Runtime) -> torch.dtype:
    return torch.bfloat16 if rt.on_cuda else torch.float32


def ds_config(rt: Runtime, zero_stage: int, micro_batch: int, fsam_block=None,
              always_perturb=GPT2_ALWAYS_PERTURB) -> dict:
    """The DeepSpeed config every variant shares; fsam_block=None gives the AdamW baseline's."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"Invalid --zero_stage {zero_stage}; use 2 or 3 (0 and 1 also run)")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * rt.world_size,
        "gradient_clipping": GRADIENT_CLIPPING,
        "optimizer": json.loads(json.dumps(BASE_OPTIMIZER)),
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if rt.on_cuda:
        config["bf16"] = {"enabled": True}
    if fsam_block is not None:
        config["fsam"] = dict(fsam_block, always_perturb=list(always_perturb))
    return config


def build_engine(model, config: dict):
    """fsam_ds.initialize when the config has an "fsam" block, else the identical torch AdamW
    through fsam_ds.engine.initialize_base. Returns the engine only (no stray references)."""
    import fsam_ds
    from fsam_ds.engine import initialize_base
    init = fsam_ds.initialize if "fsam" in config else initialize_base
    return init(model=model, config=config)[0]


def model_config(args, rt: Runtime) -> dict:
    """The settings every GPT-2 benchmark records: model shape, batch, ZeRO stage, dtype."""
    return {"model": args.model, **PRESETS[args.model], "seq_len": args.seq_len,
            "micro_batch": args.micro_batch, "zero_stage": args.zero_stage,
            "activation_checkpointing": getattr(args, "activation_checkpointing", False),
            "zero3_buffers": getattr(args, "zero3_buffers", "deepspeed"),
            "zero3_buffer_values": zero3_overrides(args),
            "dtype": str(model_dtype(rt)), "world_size": rt.world_size}


# --zero3_buffers: which ZeRO-3 buffer sizes a benchmark runs with. "deepspeed" leaves them to
# DeepSpeed's defaults (every figure before 2026-12-02 evening); "cpu_configs" / "gpu_configs" copy
# them from a shipped config; "hf_auto" is Hugging Face's "auto" rule for the bucket sizes and the
# persistence threshold (from the hidden size, as launch/model_io.fill_auto_zero_buffers fills
# them) with DeepSpeed's 1e9 sub-group and live/reuse sizes.
ZERO3_BUFFER_SOURCES = {"deepspeed": None, "cpu_configs": "zero3_fsam.json",
                        "gpu_configs": "zero3_bf16_fsam.json",
                        "hf_auto": {"zero_optimization": {
                            "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                            "stage3_param_persistence_threshold": "auto", "sub_group_size": 10 ** 9,
                            "stage3_max_live_parameters": 10 ** 9, "stage3_max_reuse_distance": 10 ** 9}}}
ZERO3_BUFFER_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                     "sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance")


def zero3_buffers(source: str, n_embd: int) -> dict:
    """The zero_optimization buffer keys of `source` (ZERO3_BUFFER_SOURCES) for hidden size n_embd."""
    if source not in ZERO3_BUFFER_SOURCES:
        raise ValueError(f"--zero3_buffers {source!r}; choose from {sorted(ZERO3_BUFFER_SOURCES)}")
    spec = ZERO3_BUFFER_SOURCES[source]
    if spec is None:
        return {}
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    sys.path.insert(0, os.path.join(repo, "launch"))
    import model_io
    from transformers import GPT2Config
    if isinstance(spec, dict):
        config = json.loads(json.dumps(spec))
    else:
        with open(os.path.join(repo, "ds_configs", spec)) as f:
            config = json.load(f)
    model_io.fill_auto_zero_buffers(config, GPT2Config(n_embd=n_embd))
    return {k: config["zero_optimization"][k] for k in ZERO3_BUFFER_KEYS if k in config["zero_optimization"]}


def zero3_overrides(args) -> dict:
    """What args.zero3_buffers puts into zero_optimization (nothing below ZeRO-3)."""
    if args.zero_stage != 3:
        return {}
    return zero3_buffers(getattr(args, "zero3_buffers", "deepspeed"), PRESETS[args.model]["n_embd"])


def build_variant(fsam_block, args, rt: Runtime):
    """A fresh GPT-2 (args.model, args.seq_len, args.activation_checkpointing when present) in a
    fresh engine for one variant (fsam_block None: the AdamW baseline). Returns the engine, the
    parameter count and the step function (plain_step or fsam_step); no model reference stays."""
    model = build_gpt2(args.model, args.seq_len, rt, getattr(args, "activation_checkpointing", False))
    num_params = count_parameters(model)
    config = ds_config(rt, args.zero_stage, args.micro_batch, fsam_block)
    config["zero_optimization"].update(zero3_overrides(args))
    engine = build_engine(model, config)
    del model
    return engine, num_params, plain_step if fsam_block is None else fsam_step


def release_engine(engine) -> None:
    """Free an engine before the next variant (the caller then drops its reference and calls
    collect_memory). DeepSpeed 0.19.8's destroy() leaves a ZeRO-3 engine reachable from two
    globals, which kept every earlier variant's model, master weights and optimizer state on the
    GPU (5.4 GiB per 355M-parameter variant, seen on an H200): the module stays on
    parameter_offload.FWD_MODULE_STACK, and an lru_cache on a method of
    PartitionedParameterCoordinator holds every coordinator. Both are dropped here."""
    module = engine.module
    engine.destroy()
    if engine.zero_optimization_stage() != 3:
        return
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    parameter_offload.FWD_MODULE_STACK[:] = [
        m for m in parameter_offload.FWD_MODULE_STACK if m is not module]
    method = getattr(PartitionedParameterCoordinator,
                     "_PartitionedParameterCoordinator__params_to_release", None)
    # the lru_cache wrapper sits inside DeepSpeed's NVTX decorator's closure
    for cell in getattr(method, "__closure__", None) or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def collect_memory(rt: Runtime) -> None:
    gc.collect()
    if rt.on_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def random_token_batches(num_batches: int, micro_batch: int, seq_len: int, vocab_size: int,
                         rt: Runtime, seed: int = 1234):
    """Random token ids (labels = inputs), a different stream per rank, the same per variant."""
    gen = torch.Generator().manual_seed(seed + 1000 * rt.rank)
    return [torch.randint(0, vocab_size, (micro_batch, seq_len), generator=gen).to(rt.device)
            for _ in range(num_batches)]


def lm_loss(engine, input_ids):
    return engine(input_ids=input_ids, labels=input_ids).loss


def plain_step(engine, input_ids):
    """One step of the base optimizer alone (the AdamW baseline)."""
    loss = lm_loss(engine, input_ids)
    engine.backward(loss)
    engine.step()
    return loss


def fsam_step(engine, input_ids):
    import fsam_ds
    return fsam_ds.train_step(engine, lm_loss, [input_ids])


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- timing and memory ------------------------------------------------------------------------
def sync(rt: Runtime) -> None:
    if rt.on_cuda:
        torch.cuda.synchronize()


def reset_peak(rt: Runtime) -> None:
    if rt.on_cuda:
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(rt: Runtime):
    """max_memory_allocated since the last reset; None on the CPU (no allocator statistics)."""
    return torch.cuda.max_memory_allocated() if rt.on_cuda else None


def allocated_bytes(rt: Runtime):
    return torch.cuda.memory_allocated() if rt.on_cuda else None


def max_over_ranks(values, rt: Runtime):
    """Elementwise max over ranks of a list of floats (None stays None): the slowest rank's time,
    the fullest rank's memory."""
    if rt.world_size == 1 or not dist.is_initialized():
        return list(values)
    present = [v is not None for v in values]
    t = torch.tensor([float(v) if v is not None else -math.inf for v in values],
                     dtype=torch.float64, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(x) if ok else None for x, ok in zip(t.tolist(), present)]


def summarize_times(times) -> dict:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times), "count": len(times)}


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


# ---- results ----------------------------------------------------------------------------------
def environment(rt: Runtime) -> dict:
    """What produced the numbers: timings only compare within one run on one card."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "world_size": rt.world_size, "device": "cpu", "command": " ".join(sys.argv),
        "git_commit": _git_commit(),
        # The device tool copies the working tree but not always an up-to-date .git, so
        # git_commit can name an older commit: this digest of the code that ran is what to
        # match against `python bench/benchlib.py --source-digest` at a checkout.
        "source_digest": source_digest(),
        "dist_backend": dist.get_backend() if dist.is_initialized() else None,
        "bench_dist_backend": os.environ.get("BENCH_DIST_BACKEND"),
    }
    for package in ("deepspeed", "transformers"):
        try:   # the installed version, without importing it (threshold.py needs neither)
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if rt.on_cuda:
        info["device"] = torch.cuda.get_device_name(rt.device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(rt.device).total_memory
    else:
        info["cpu_threads_per_rank"] = torch.get_num_threads()
        info["cpu_count"] = os.cpu_count()
    return info


def source_digest() -> str:
    """sha1 over fsam_ds/*.py and bench/*.py (names and contents, sorted by name), 12 hex."""
    digest = hashlib.sha1()
    for folder in ("fsam_ds", "bench"):
        for path in sorted(glob.glob(os.path.join(REPO_ROOT, folder, "*.py"))):
            digest.update(os.path.relpath(path, REPO_ROOT).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 (no git on the machine: not worth failing a benchmark)
        return None
    # a copied working tree without the repository's objects answers "HEAD" or nothing
    return out if len(out) == 40 else None


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_seconds(s):
    if s is None:
        return "n/a"
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.3f} s"


def fmt_bytes(b):
    if b is None:
        return "n/a"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def publish_and_finish(path: str, result: dict, header, rows, rt: Runtime, one_row: bool = False) -> dict:
    """The common end of a benchmark: attach its markdown table (summarize.py reads "row" or
    "rows"), write the JSON from rank 0, print the table, tear the process group down."""
    result["markdown"] = {"header": header, **({"row": rows[0]} if one_row else {"rows": rows})}
    write_result(path, result, rt)
    if rt.is_main:
        print(markdown_table(header, rows), flush=True)
    finish(rt)
    return result


def write_result(path: str, result: dict, rt: Runtime) -> None:
    """Rank 0 writes the JSON (atomically: a crash mid-write never leaves half a file)."""
    if not rt.is_main or not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(tmp, path)


def parse_count(text: str) -> int:
    """'1e8' or '100000000' -> 100000000 (argparse type for element counts)."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole count such as 1e8, got {text!r}")
    return int(value)


if __name__ == "__main__":
    if sys.argv[1:] == ["--source-digest"]:
        print(source_digest())
    else:
        raise SystemExit("usage: python bench/benchlib.py --source-digest")
