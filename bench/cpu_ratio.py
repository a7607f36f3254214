"""step_time.py's ratios (AdamW, SAM, FSAM every step, FSAM every 100 steps) on the CPU, with
N gloo ranks that this script spawns itself: a check of the ratios on a machine without a GPU.

    python bench/cpu_ratio.py --out /tmp/cpu_ratio.json            # 2 ranks, tiny GPT-2, ZeRO-2
    python bench/cpu_ratio.py --ranks 2 --zero_stage 3 --steps 20 --out /tmp/cpu_ratio.json

Each rank runs step_time.run() (same variants, data and timing); rank 0 writes the JSON and this
process prints a table of the medians and ratios. CPU timings are noisy on a shared machine:
compare ratios, and run more --steps when they matter.
"""
from __future__ import annotations

import argparse
import json
import os

import torch.multiprocessing as mp

import benchlib
import step_time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--model", default="tiny", choices=sorted(benchlib.PRESETS))
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--zero_stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", required=True, help="JSON result file")
    return p


def rank_main(rank: int, world_size: int, port: int, step_args: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    # Not LOCAL_SIZE: with it DeepSpeed's CPU backend switches to a shared-memory all-reduce that
    # leaves a /dev/shm/deepspeed_allreduce_buffer_* file behind per rank.
    os.environ.pop("LOCAL_SIZE", None)
    step_time.run(step_time.build_parser().parse_args(step_args))


def main(args) -> dict:
    if args.ranks < 1:
        raise SystemExit(f"--ranks must be >= 1, got {args.ranks}")
    step_args = ["--model", args.model, "--seq_len", str(args.seq_len),
                 "--micro_batch", str(args.micro_batch), "--zero_stage", str(args.zero_stage),
                 "--warmup", str(args.warmup), "--steps", str(args.steps), "--out", args.out]
    # spawn: fresh interpreters, so no CUDA or thread state leaks in from this process;
    # a rank's exception is re-raised here with its traceback
    mp.start_processes(rank_main, args=(args.ranks, benchlib.free_port(), step_args),
                       nprocs=args.ranks, join=True, start_method="spawn")
    with open(args.out) as f:
        result = json.load(f)
    result["benchmark"] = "cpu_ratio"
    header = ["ranks", "model", "ZeRO", "variant", "median step", "vs adamw", "vs sam"]
    rows = []
    adamw = result["variants"]["adamw"]["timed"]["median_s"]
    sam = result["variants"]["sam"]["timed"]["median_s"]
    for name, v in result["variants"].items():
        median = v["timed"]["median_s"]
        rows.append([args.ranks, args.model, args.zero_stage, name, benchlib.fmt_seconds(median),
                     benchlib.fmt_ratio(benchlib.ratio(median, adamw)),
                     benchlib.fmt_ratio(benchlib.ratio(median, sam))])
    result["markdown"] = {"header": header, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(benchlib.markdown_table(header, rows), flush=True)
    return result


if __name__ == "__main__":
    main(build_parser().parse_args())
