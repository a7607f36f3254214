"""Exact global top-k threshold over scores sharded across ranks, without gathering them.

Non-negative IEEE floats order like their bit patterns read as integers, so the k-th largest score
can be found digit by digit (radix select): each round histograms the next `bits_per_round` bits of
the remaining candidates on every rank, sums the histograms over the group, and keeps only the
candidates in the bin that holds the k-th largest. After 32 / bits_per_round rounds the threshold
is known exactly. Ties at the threshold are shared out in rank order with an exclusive prefix sum,
so exactly k elements are kept in total. Communication: rounds x 2^bits_per_round counts, plus one
world-size vector for the ties; extra memory: the histogram plus the shrinking candidate set.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fsam_ds import collectives

_FP32_BITS = 32


@dataclass(frozen=True)
class TopkThreshold:
    """value: the k-th largest score over all ranks (+inf when k == 0);
    num_ties_kept: how many of this rank's scores equal to `value` to keep (first in index order);
    num_greater: global count of scores > value."""
    value: float
    num_ties_kept: int
    num_greater: int


def exact_topk_threshold(shard_scores: torch.Tensor, k: int, group=None,
                         bits_per_round: int = 8) -> TopkThreshold:
    """The exact global k-th largest of the union of every rank's `shard_scores`.

    shard_scores: 1-D, non-negative, finite fp32 scores of this rank (may be empty).
    k: how many to keep over all ranks, 0 <= k <= global count. Must be equal on all ranks.
    group: the process group holding the shards; None means this rank holds all scores.
    bits_per_round: 8 (4 rounds of 256 bins) measured faster than 16 (2 rounds of 65,536 bins)
    on an H200 at 1e9 scores (48.6 vs 73.0 ms, BENCHMARKS.md); both are exact.
    """
    if _FP32_BITS % bits_per_round != 0 or not 1 <= bits_per_round <= 16:
        raise ValueError(f"bits_per_round must divide 32 and be at most 16, got {bits_per_round}")
    if shard_scores.dim() != 1 or shard_scores.dtype != torch.float32:
        raise ValueError("shard_scores must be a 1-D float32 tensor, got "
                         f"{shard_scores.dim()}-D {shard_scores.dtype}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return TopkThreshold(float("inf"), 0, 0)

    device = shard_scores.device
    num_bins = 1 << bits_per_round
    # Signed int32 view: non-negative floats (and +inf) are 0..0x7F800000, so every digit is >= 0.
    # NaN and negative scores would break the ordering; round 1's all-reduce carries a flag.
    candidates = shard_scores.contiguous().view(torch.int32)
    prefix = 0            # bits of the threshold found so far
    num_greater = 0       # global count of scores known to be larger than the threshold
    local_hist = None
    first_round = True
    for shift in range(_FP32_BITS - bits_per_round, -1, -bits_per_round):
        digits = (candidates >> shift) & (num_bins - 1)
        local_hist = torch.bincount(digits, minlength=num_bins)
        if first_round:
            # one extra bin counts ranks holding NaN or negative scores, so that every rank sees
            # it in the same all-reduce and raises together (no rank left waiting in a collective)
            local_hist = torch.cat([local_hist, _invalid_flag(candidates)])
        global_hist = collectives.all_reduce_sum_(local_hist.clone(), group)
        if first_round:
            _check_scores(global_hist, k)
            local_hist, global_hist, first_round = local_hist[:num_bins], global_hist[:num_bins], False
        # counts_at_or_above[d] = number of candidates with digit >= d
        counts_at_or_above = torch.flip(torch.cumsum(torch.flip(global_hist, [0]), 0), [0])
        needed = k - num_greater
        # the highest digit d whose "at or above" count reaches `needed` holds the k-th largest
        digit = int(torch.nonzero(counts_at_or_above >= needed)[-1])
        num_greater += int(counts_at_or_above[digit] - global_hist[digit])
        prefix = (prefix << bits_per_round) | digit
        candidates = candidates[digits == digit]
    value_bits = torch.tensor([prefix], dtype=torch.int32)
    value = float(value_bits.view(torch.float32)[0])

    num_ties_global = k - num_greater  # 1 .. global count of ties
    num_ties_local = int(local_hist[prefix & (num_bins - 1)])
    num_ties_before = collectives.exclusive_prefix_sum(num_ties_local, group, device)
    num_ties_kept = max(0, min(num_ties_local, num_ties_global - num_ties_before))
    return TopkThreshold(value, num_ties_kept, num_greater)


_INF_BITS = 0x7F800000


def _invalid_flag(bits: torch.Tensor) -> torch.Tensor:
    """1 if this rank holds a NaN or negative score (negative int32 patterns, or above +inf)."""
    if bits.numel() == 0:
        return torch.zeros(1, dtype=torch.int64, device=bits.device)
    return ((bits.min() < 0) | (bits.max() > _INF_BITS)).to(torch.int64).reshape(1)


def _check_scores(first_round_hist: torch.Tensor, k: int) -> None:
    """Reject k > count and NaN/negative scores (whose bit patterns do not order like values)."""
    bad_ranks = int(first_round_hist[-1])
    if bad_ranks:
        raise ValueError(f"Fisher scores on {bad_ranks} rank(s) are NaN or negative; scores must "
                         "be >= 0 (check the gradients for non-finite values)")
    total = int(first_round_hist[:-1].sum())
    if k > total:
        raise ValueError(f"k={k} exceeds the {total} scores held by the group")
