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
                         bits_per_round: int = 16) -> TopkThreshold:
    """The exact global k-th largest of the union of every rank's `shard_scores`.

    shard_scores: 1-D, non-negative, finite fp32 scores of this rank (may be empty).
    k: how many to keep over all ranks, 0 <= k <= global count. Must be equal on all ranks.
    group: the process group holding the shards; None means this rank holds all scores.
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
    # NaN and negative scores would break the ordering; they are rejected after round 1 for free.
    candidates = shard_scores.contiguous().view(torch.int32)
    prefix = 0            # bits of the threshold found so far
    num_greater = 0       # global count of scores known to be larger than the threshold
    local_hist = None
    for shift in range(_FP32_BITS - bits_per_round, -1, -bits_per_round):
        digits = (candidates >> shift) & (num_bins - 1)
        local_hist = torch.bincount(digits, minlength=num_bins)
        global_hist = collectives.all_reduce_sum_(local_hist.clone(), group)
        if shift == _FP32_BITS - bits_per_round:
            _check_scores(global_hist, k, bits_per_round)
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


def _check_scores(first_round_hist: torch.Tensor, k: int, bits_per_round: int) -> None:
    """Reject k > count and scores whose bit patterns are not ordered like their values."""
    total = int(first_round_hist.sum())
    if k > total:
        raise ValueError(f"k={k} exceeds the {total} scores held by the group")
    # Digits at or above the one of +inf (0x7F800000) but not +inf itself are NaN or negative.
    inf_digit = 0x7F800000 >> (_FP32_BITS - bits_per_round)
    bad = int(first_round_hist[inf_digit + 1:].sum())
    if bad:
        raise ValueError(f"{bad} Fisher scores are NaN or negative; scores must be >= 0 "
                         "(check the gradients for non-finite values)")
