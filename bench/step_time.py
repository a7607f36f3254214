"""Step time and peak memory of AdamW, SAM and FSAM under DeepSpeed ZeRO, all in one process.

    torchrun --nproc_per_node 4 bench/step_time.py --model 350m --zero_stage 2 --out step_time.json
    DS_ACCELERATOR=cpu python bench/step_time.py --model tiny --zero_stage 2 --out /tmp/step_time.json

A randomly initialised GPT-2-shaped model (bf16 on GPU, fp32 on CPU) trains on random tokens
(labels = inputs) with torch AdamW (lr 1e-5) and gradient clipping 1.0. The variants run one after
the other in the same process, each on a fresh model and engine (the previous one destroyed and
its memory freed), so their ratios share the machine's state:

  adamw            fsam_ds.engine.initialize_base: plain DeepSpeed around the same torch AdamW
  sam              FSAM with sparsity 0 and rho 0.05: two passes, every element perturbed
  fsam_every_step  sparsity 0.9, mask refreshed every step: the threshold's worst case
  fsam_every_100   sparsity 0.9, mask refreshed every 100 steps. With ~10 steps the only refresh
                   is step 0, which the warm-up absorbs: the timed steps are the steady state
                   between refreshes, as in a real run (the JSON lists the refresh steps).

Each step is timed between torch.cuda.synchronize() calls; a step's time is the slowest rank's.
Peak memory is torch.cuda.max_memory_allocated over the variant's steps (reset after the engine is
built), the fullest rank's. Rank 0 writes the JSON (rewritten after every variant, so a crash
keeps the finished ones) and prints a markdown row.
"""
from __future__ import annotations

import argparse
import time

import benchlib
from benchlib import fmt_bytes, fmt_ratio, fmt_seconds, ratio

RATIOS = [("sam", "adamw"), ("fsam_every_step", "sam"), ("fsam_every_100", "sam"),
          ("fsam_every_step", "adamw"), ("fsam_every_100", "adamw"),
          ("fsam_interval_2", "adamw"), ("fsam_interval_4", "adamw")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=sorted(benchlib.PRESETS))
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--zero_stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--zero3_buffers", default="deepspeed", choices=sorted(benchlib.ZERO3_BUFFER_SOURCES),
                   help="ZeRO-3 buffer sizes: DeepSpeed's defaults, those of the shipped CPU (zero3_fsam.json) "
                        "or GPU (zero3_bf16_fsam.json) configs, or Hugging Face's \"auto\" rule (hf_auto)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--variants", default=",".join(benchlib.STEP_VARIANTS),
                   help="comma-separated subset of " + ",".join(benchlib.STEP_VARIANTS))
    p.add_argument("--interleave", action="store_true",
                   help="build every variant's engine first, then run the steps round-robin "
                        "(one step of each variant per round), so that drift in the machine's "
                        "speed hits all variants alike; needs memory for all engines at once, "
                        "and reports no per-variant peak memory")
    p.add_argument("--out", required=True, help="JSON result file (written by rank 0)")
    return p


def check_args(args) -> list:
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in benchlib.STEP_VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"--variants {args.variants!r}: unknown {unknown}; choose from "
                         f"{list(benchlib.STEP_VARIANTS)}")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    return variants


def refresh_steps(fsam_block, num_steps: int) -> list:
    """Optimizer steps (0-based) on which FSAM recomputes the mask: t % mask_interval == 0."""
    if fsam_block is None:
        return []
    return list(range(0, num_steps, fsam_block["mask_interval"]))


def run_variant(name: str, args, rt: benchlib.Runtime, batches) -> dict:
    fsam_block = benchlib.STEP_VARIANTS[name]
    benchlib.collect_memory(rt)
    memory_before_build = benchlib.allocated_bytes(rt)  # what the previous variant left behind
    engine, num_params, step = benchlib.build_variant(fsam_block, args, rt)
    benchlib.sync(rt)
    memory_after_build = benchlib.allocated_bytes(rt)
    benchlib.reset_peak(rt)

    step_times = []
    for input_ids in batches:
        benchlib.sync(rt)
        start = time.perf_counter()
        step(engine, input_ids)
        benchlib.sync(rt)
        step_times.append(time.perf_counter() - start)
    step_times = benchlib.max_over_ranks(step_times, rt)
    peak, after_build = benchlib.max_over_ranks([benchlib.peak_bytes(rt), memory_after_build], rt)

    result = {
        "fsam_config": fsam_block,
        "num_params": num_params,
        "timed": benchlib.summarize_times(step_times[args.warmup:]),
        "step_times_s": step_times,          # every step, warm-up included, slowest rank
        "peak_memory_bytes": peak,
        "memory_after_build_bytes": after_build,
        "memory_before_build_bytes": memory_before_build,
        "refresh_steps": refresh_steps(fsam_block, len(batches)),
    }
    result["timed_refresh_steps"] = [t for t in result["refresh_steps"] if t >= args.warmup]
    # steps DeepSpeed skipped (inf/NaN gradients): a skipped FSAM step runs only one pass
    result["skipped_steps"] = engine.skipped_steps
    fsam = getattr(engine, "_fsam", None)
    if fsam is not None:
        result["fsam_num_steps"] = fsam.num_steps
        result["fsam_state_bytes_rank0"] = fsam.state_bytes()
        result["fsam_last_stats"] = dict(fsam.last_stats)
    benchlib.release_engine(engine)
    del engine
    benchlib.collect_memory(rt)
    return result


def run_interleaved(names, args, rt: benchlib.Runtime, batches) -> dict:
    """Every variant's engine at once, one step of each per round, in a rotating order."""
    engines, steps, num_params = {}, {}, None
    for name in names:
        engines[name], num_params, steps[name] = benchlib.build_variant(
            benchlib.STEP_VARIANTS[name], args, rt)
    times = {name: [] for name in names}
    for round_index, input_ids in enumerate(batches):
        shift = round_index % len(names)   # no variant always runs first (or right after another)
        for name in names[shift:] + names[:shift]:
            benchlib.sync(rt)
            start = time.perf_counter()
            steps[name](engines[name], input_ids)
            benchlib.sync(rt)
            times[name].append(time.perf_counter() - start)
    results = {}
    for name in names:
        step_times = benchlib.max_over_ranks(times[name], rt)
        fsam_block = benchlib.STEP_VARIANTS[name]
        results[name] = {"fsam_config": fsam_block, "num_params": num_params,
                         "timed": benchlib.summarize_times(step_times[args.warmup:]),
                         "step_times_s": step_times, "peak_memory_bytes": None,
                         "refresh_steps": refresh_steps(fsam_block, len(batches)),
                         "skipped_steps": engines[name].skipped_steps}
        results[name]["timed_refresh_steps"] = [t for t in results[name]["refresh_steps"]
                                                if t >= args.warmup]
        fsam = getattr(engines[name], "_fsam", None)
        if fsam is not None:
            results[name].update(fsam_num_steps=fsam.num_steps, fsam_state_bytes_rank0=fsam.state_bytes(),
                                 fsam_last_stats=dict(fsam.last_stats))
    for name in names:
        benchlib.release_engine(engines.pop(name))
    benchlib.collect_memory(rt)
    return results


def _typical_step_s(variant: dict) -> float:
    """The median step, except in interval mode, whose steps alternate between two passes and one:
    there the mean over the timed steps (a whole number of intervals with the defaults: 8 timed
    steps, intervals 2 and 4) is the cost per optimizer step."""
    if (variant.get("fsam_config") or {}).get("sam_interval", 1) > 1:
        return variant["timed"]["mean_s"]
    return variant["timed"]["median_s"]


def set_ratios(result: dict) -> None:
    variants = result["variants"]
    result["ratios"] = {f"{a}/{b}": ratio(_typical_step_s(variants[a]), _typical_step_s(variants[b]))
                        for a, b in RATIOS if a in variants and b in variants}


def summary_row(result: dict) -> tuple:
    cfg, variants, ratios = result["config"], result["variants"], result["ratios"]
    median = {n: v["timed"]["median_s"] for n, v in variants.items()}
    header = ["model", "ZeRO", "ranks", "seq x mb", "ckpt", "interleaved"] + \
             [f"{n} median" for n in benchlib.STEP_VARIANTS] + \
             [f"{a}/{b}" for a, b in RATIOS[:3]] + ["peak adamw", "peak fsam_every_100"]
    row = [cfg["model"], cfg["zero_stage"], cfg["world_size"],
           f"{cfg['seq_len']}x{cfg['micro_batch']}", "yes" if cfg["activation_checkpointing"] else "no",
           "yes" if cfg.get("interleaved") else "no"]
    row += [fmt_seconds(median.get(n)) for n in benchlib.STEP_VARIANTS]
    row += [fmt_ratio(ratios.get(f"{a}/{b}")) for a, b in RATIOS[:3]]
    row += [fmt_bytes(variants.get(n, {}).get("peak_memory_bytes")) for n in ("adamw", "fsam_every_100")]
    return header, row


def run(args) -> dict:
    """Every rank runs this; rank 0 writes args.out and returns the result (others return it too)."""
    variants = check_args(args)
    rt = benchlib.start(use_deepspeed=True)
    vocab = benchlib.PRESETS[args.model]["vocab_size"]
    batches = benchlib.random_token_batches(args.warmup + args.steps, args.micro_batch,
                                            args.seq_len, vocab, rt)
    result = {
        "benchmark": "step_time",
        "config": {**benchlib.model_config(args, rt), "warmup": args.warmup, "steps": args.steps,
                   "optimizer": benchlib.BASE_OPTIMIZER,
                   "gradient_clipping": benchlib.GRADIENT_CLIPPING,
                   "always_perturb": benchlib.GPT2_ALWAYS_PERTURB},
        "environment": benchlib.environment(rt),
        "variants": {}, "ratios": {},
        "notes": ["step time = slowest rank's, median over the timed steps",
                  "fsam_every_100 refreshes its mask at step 0 only (inside the warm-up); its "
                  "timed steps reuse the mask, see timed_refresh_steps",
                  "peak memory = torch.cuda.max_memory_allocated over the variant's steps, "
                  "fullest rank; null on CPU. memory_before_build_bytes = what earlier variants "
                  "left allocated (included in the peak; should be near 0)"],
    }
    result["config"]["interleaved"] = args.interleave
    if args.interleave:
        result["variants"] = run_interleaved(variants, args, rt, batches)
        set_ratios(result)
        benchlib.write_result(args.out, result, rt)
    for name in [] if args.interleave else variants:
        result["variants"][name] = run_variant(name, args, rt, batches)
        set_ratios(result)
        benchlib.write_result(args.out, result, rt)
        if rt.is_main:
            v = result["variants"][name]
            print(f"[step_time] {name}: median {fmt_seconds(v['timed']['median_s'])}, "
                  f"peak {fmt_bytes(v['peak_memory_bytes'])}, refresh steps "
                  f"{v['refresh_steps']} (timed: {v['timed_refresh_steps']})", flush=True)
    header, row = summary_row(result)
    return benchlib.publish_and_finish(args.out, result, header, [row], rt, one_row=True)


if __name__ == "__main__":
    run(build_parser().parse_args())
