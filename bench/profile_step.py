"""Where an FSAM step's time goes: torch.profiler over a few steps of each variant.

    torchrun --nproc_per_node 1 bench/profile_step.py --model 350m --zero_stage 2 --out prof.json
    DS_ACCELERATOR=cpu python bench/profile_step.py --model tiny --zero_stage 2 --out /tmp/prof.json

Each variant (as in step_time.py) is built fresh, warmed up, then --steps steps run under
torch.profiler (CPU and CUDA activities). Reported per variant, per step, rank 0:
  - the named ranges fsam_ds marks (fsam.first_pass, fsam.first_pass_gradients,
    fsam.perturb with fsam.norm / fsam.refresh_threshold / fsam.refresh_mask /
    fsam.apply_perturbation inside it, fsam.publish, fsam.second_pass with fsam.restore and
    fsam.base_step inside it), and for the AdamW baseline the same split of its one pass
    (adamw.forward_backward, adamw.optimizer_step): host wall time of the range, and the GPU
    time of the kernels it launched;
  - the kernels with the most GPU time.
The ranges' host times include waiting for the GPU where the code syncs, so they add up to the
step; GPU times show what the device did. The profiler adds overhead: compare within one file.
"""
from __future__ import annotations

import argparse

import torch

import benchlib
from benchlib import fmt_seconds

DEFAULT_VARIANTS = "adamw,sam,fsam_every_step,fsam_every_100"
TOP_KERNELS = 15


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=sorted(benchlib.PRESETS))
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--zero_stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=int, default=TOP_KERNELS, help="kernels listed per variant")
    p.add_argument("--trace_dir", default=None,
                   help="also write each variant's profile as a gzipped Chrome trace here")
    return p


def adamw_step(engine, input_ids):
    with torch.profiler.record_function("adamw.forward_backward"):
        loss = benchlib.lm_loss(engine, input_ids)
        engine.backward(loss)
    with torch.profiler.record_function("adamw.optimizer_step"):
        engine.step()


def _first_attribute(event, names) -> float:
    """torch renamed cuda_* event times to device_* (2.4); read whichever this torch has."""
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def device_time_us(event) -> float:
    return _first_attribute(event, ("device_time_total", "cuda_time_total"))


def self_device_time_us(event) -> float:
    return _first_attribute(event, ("self_device_time_total", "self_cuda_time_total"))


def profile_variant(name, args, rt, batches) -> dict:
    fsam_block = benchlib.STEP_VARIANTS[name]
    engine, _, step = benchlib.build_variant(fsam_block, args, rt)
    if fsam_block is None:
        step = adamw_step   # the plain step, split into named ranges
    for input_ids in batches[:args.warmup]:
        step(engine, input_ids)
    benchlib.sync(rt)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if rt.on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for input_ids in batches[args.warmup:]:
            step(engine, input_ids)
        benchlib.sync(rt)
    events = prof.key_averages()
    ranges = {e.key: {"host_ms_per_step": e.cpu_time_total / 1e3 / args.steps,
                      "device_ms_per_step": device_time_us(e) / 1e3 / args.steps,
                      "calls_per_step": e.count / args.steps}
              for e in events if e.key.startswith(("fsam.", "adamw."))}
    if args.trace_dir and rt.is_main:
        import gzip
        import os
        import shutil
        os.makedirs(args.trace_dir, exist_ok=True)
        raw = os.path.join(args.trace_dir, f"trace_{name}.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
    kernels = sorted((e for e in events if self_device_time_us(e) > 0),
                     key=self_device_time_us, reverse=True)[:args.top]
    top = [{"name": e.key[:120], "device_ms_per_step": self_device_time_us(e) / 1e3 / args.steps,
            "calls_per_step": e.count / args.steps} for e in kernels]
    benchlib.release_engine(engine)
    del engine
    benchlib.collect_memory(rt)
    return {"fsam_config": fsam_block, "ranges": ranges, "top_kernels": top}


def run(args) -> dict:
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in benchlib.STEP_VARIANTS]
    if unknown or not variants or args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--variants {args.variants!r} (unknown: {unknown}; choose from "
                         f"{list(benchlib.STEP_VARIANTS)}), --steps >= 1, --warmup >= 0")
    rt = benchlib.start(use_deepspeed=True)
    vocab = benchlib.PRESETS[args.model]["vocab_size"]
    batches = benchlib.random_token_batches(args.warmup + args.steps, args.micro_batch,
                                            args.seq_len, vocab, rt)
    result = {"benchmark": "profile_step",
              "config": {**benchlib.model_config(args, rt), "steps": args.steps},
              "environment": benchlib.environment(rt), "variants": {}}
    for name in variants:
        result["variants"][name] = profile_variant(name, args, rt, batches)
        benchlib.write_result(args.out, result, rt)
    header = ["variant", "range", "host per step", "GPU per step", "calls per step"]
    rows = []
    for name, v in result["variants"].items():
        for key, r in sorted(v["ranges"].items()):
            rows.append([name, key, fmt_seconds(r["host_ms_per_step"] / 1e3),
                         fmt_seconds(r["device_ms_per_step"] / 1e3), f"{r['calls_per_step']:g}"])
    return benchlib.publish_and_finish(args.out, result, header, rows, rt)


if __name__ == "__main__":
    run(build_parser().parse_args())
