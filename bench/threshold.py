"""Time and extra memory of fsam_ds.exact_topk_threshold against single-device selection.

    torchrun --nproc_per_node 4 bench/threshold.py --numel 1e9 --out threshold.json
    DS_ACCELERATOR=cpu python bench/threshold.py --numel 1e6 --out /tmp/threshold.json

Every rank holds --numel fp32 scores (squared Gaussians, Fisher-like: many tiny values); k is
--keep (10%) of the global count, numel x ranks. Methods, each timed between device syncs, the
median of --repeats runs after one warm-up (a run's time is the slowest rank's):

  exact_topk_threshold[bits=B]   the sharded radix select over the world (NCCL or gloo
                                 all-reduces of 2^B-bin histograms; one rank: no group, no
                                 communication), B in --bits_per_round
  exact_topk_threshold+mask      the threshold and fsam_ds's mask from it, built chunk by chunk
                                 into int32 positions as a refresh does (its extra memory
                                 includes the 0.4 B/score mask itself)
  torch.topk                     torch.topk(scores, k_local, sorted=False) on one device, k_local =
                                 --keep of this rank's count: the same selection over the same
                                 count without a distributed algorithm (an OOM is recorded)
  torch.kthvalue                 the k_local-th largest on one device
  read_twice                     scores.sum() twice: two passes over the scores, the bandwidth
                                 floor of a two-round select; its GB/s is reported

Extra memory = torch.cuda.max_memory_allocated during the call minus memory_allocated just before
it (the scores are already allocated then), the fullest rank's; null on CPU.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.distributed as dist

import benchlib
from benchlib import fmt_bytes, fmt_seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=benchlib.parse_count, default=10 ** 6,
                   help="fp32 scores per rank, e.g. 1e8 (accepts 1e9 notation)")
    p.add_argument("--keep", type=float, default=0.1, help="fraction kept: k = ceil(keep * count)")
    p.add_argument("--bits_per_round", default="16,8",
                   help="comma-separated radix widths to time (each must divide 32, <= 16)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip_single_device", action="store_true",
                   help="time only the sharded threshold and the read reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON result file (written by rank 0)")
    return p


def make_scores(numel: int, rt: benchlib.Runtime, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=rt.device).manual_seed(seed + 1000 * rt.rank)
    scores = torch.randn(numel, generator=gen, device=rt.device, dtype=torch.float32)
    return scores.square_()


def measure(fn, rt: benchlib.Runtime, repeats: int, collective: bool = True) -> dict:
    """Median time over `repeats` runs after one warm-up, and the extra memory of one run.

    collective: fn communicates, so the ranks start each run together (a barrier) and any error
    ends the job. Otherwise (single-device baselines) an out-of-memory error is recorded instead:
    such a fn issues no collective, so a failing rank cannot hang the others, and every rank then
    reaches the reductions below."""
    times, extra, error = [], None, None
    try:
        group_barrier(rt)
        fn()   # warm-up: allocator growth, NCCL set-up, caches
        benchlib.collect_memory(rt)
        before = benchlib.allocated_bytes(rt)
        benchlib.reset_peak(rt)
        for _ in range(repeats):
            if collective:
                group_barrier(rt)
            benchlib.sync(rt)
            start = time.perf_counter()
            out = fn()
            benchlib.sync(rt)
            times.append(time.perf_counter() - start)
            del out
        peak = benchlib.peak_bytes(rt)
        extra = None if peak is None else peak - before
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if collective or not (isinstance(err, (torch.OutOfMemoryError, MemoryError))
                              or "out of memory" in str(err)):
            raise
        benchlib.collect_memory(rt)
        times, error = [None] * repeats, f"rank {rt.rank}: {type(err).__name__}: {str(err)[:300]}"
    errors = [error]
    if rt.world_size > 1:
        errors = [None] * rt.world_size
        dist.all_gather_object(errors, error)
    times = benchlib.max_over_ranks(times, rt)
    (extra,) = benchlib.max_over_ranks([extra], rt)
    if any(errors):
        return {"error": "; ".join(e for e in errors if e)}
    return {**benchlib.summarize_times(times), "times_s": times, "extra_memory_bytes": extra}


def group_barrier(rt: benchlib.Runtime) -> None:
    if rt.world_size > 1:
        dist.barrier()


def run(args) -> dict:
    rt = benchlib.start(use_deepspeed=False)
    from fsam_ds import exact_topk_threshold
    from fsam_ds.fisher_math import mask_chunk_from_threshold
    from fsam_ds.shard_mask import MaskBuilder
    from fsam_ds.topk_threshold import score_chunks

    bits_options = [int(b) for b in args.bits_per_round.split(",") if b]
    if not 0 < args.keep <= 1:
        raise SystemExit(f"--keep must be in (0, 1], got {args.keep}")
    group = dist.group.WORLD if rt.world_size > 1 else None
    global_count = args.numel * rt.world_size
    k = math.ceil(args.keep * global_count)
    k_local = math.ceil(args.keep * args.numel)
    scores = make_scores(args.numel, rt, args.seed)
    benchlib.sync(rt)

    methods = {}
    for bits in bits_options:
        methods[f"exact_topk_threshold[bits={bits}]"] = measure(
            lambda bits=bits: exact_topk_threshold(scores, k, group, bits_per_round=bits),
            rt, args.repeats)

    def threshold_and_mask():
        """As an FSAM refresh does it: chunk by chunk into sorted positions (a ShardMask)."""
        found = exact_topk_threshold(scores, k, group)
        builder, start, ties_left = MaskBuilder(scores.numel(), scores.device), 0, found.num_ties_kept
        for chunk in score_chunks(scores):
            keep, taken = mask_chunk_from_threshold(chunk, found.value, ties_left)
            builder.keep_pieces([(start, start + chunk.numel())], keep)
            start, ties_left = start + chunk.numel(), ties_left - taken
        return builder.finish()
    methods["exact_topk_threshold+mask"] = measure(threshold_and_mask, rt, args.repeats)

    # a second pass over the scores is what separates a two-round select from one read
    methods["read_twice"] = measure(lambda: (scores.sum(), scores.sum()), rt, args.repeats)
    read_bytes = 2 * scores.numel() * scores.element_size()
    methods["read_twice"]["read_gb_per_s"] = read_bytes / methods["read_twice"]["median_s"] / 1e9

    found = exact_topk_threshold(scores, k, group)
    checks = {"threshold": found.value, "num_greater": found.num_greater}
    # cheap global cross-check at any world size: the counts around the threshold bracket k
    counts = torch.stack([(scores > found.value).sum(), (scores >= found.value).sum()])
    if group is not None:
        dist.all_reduce(counts, group=group)
    above, at_or_above = counts.tolist()
    checks["counts_bracket_k"] = above == found.num_greater and above < k <= at_or_above
    if not args.skip_single_device:
        methods["torch.topk"] = measure(lambda: torch.topk(scores, k_local, sorted=False),
                                        rt, args.repeats, collective=False)
        methods["torch.kthvalue"] = measure(lambda: torch.kthvalue(scores, args.numel - k_local + 1),
                                            rt, args.repeats, collective=False)
        if rt.world_size == 1 and "error" not in methods["torch.kthvalue"]:
            # one rank: the sharded threshold must be exactly the k-th largest
            kth = float(torch.kthvalue(scores, args.numel - k + 1).values)
            checks["kthvalue"] = kth
            checks["threshold_equals_kthvalue"] = kth == found.value

    result = {
        "benchmark": "threshold",
        "config": {"numel_per_rank": args.numel, "world_size": rt.world_size,
                   "global_count": global_count, "k": k, "k_local": k_local, "keep": args.keep,
                   "repeats": args.repeats, "scores_bytes_per_rank": args.numel * 4},
        "environment": benchlib.environment(rt),
        "methods": methods,
        "checks": checks,
        "notes": ["time = slowest rank's, median over repeats",
                  "extra memory = max_memory_allocated during the call - memory_allocated "
                  "before (scores excluded), fullest rank; null on CPU",
                  "torch.topk and torch.kthvalue select over this rank's scores only "
                  "(k_local), on one device"],
    }
    header = ["ranks", "numel/rank", "method", "median", "extra memory", "extra B/score"]
    rows = []
    for name, m in methods.items():
        extra = m.get("extra_memory_bytes")
        rows.append([rt.world_size, f"{args.numel:.0e}", name,
                     fmt_seconds(m.get("median_s")) if "error" not in m else "error",
                     fmt_bytes(extra), "n/a" if extra is None else f"{extra / args.numel:.2f}"])
    return benchlib.publish_and_finish(args.out, result, header, rows, rt)


if __name__ == "__main__":
    run(build_parser().parse_args())
