"""Every collective fsam_ds issues, in one place.

Each function takes the process group explicitly and is the identity when there is nothing to
reduce: `group=None` means "this rank holds everything" (one process, or replicated parameters
under DDP / ZeRO stage 0). Every function must be called on all ranks of the group.

The rule for callers: no rank-local branch before a collective. Whether a collective runs (a mask
refresh, the Adam-state score source, a skipped step) is decided on values every rank has, i.e.
all-reduced ones: FSAMCore folds every such rank-local fact into its one step-plan all-reduce.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group_size(group) == 1 else dist.get_rank(group)


def _needs_device_copy(tensor: torch.Tensor, group) -> bool:
    """NCCL-only groups (what DeepSpeed creates on GPUs) cannot reduce CPU tensors; FSAM's CPU
    tensors come from ZeRO-Offload's CPU shards and small bookkeeping counts."""
    return tensor.device.type == "cpu" and "gloo" not in str(dist.get_backend(group)) \
        and torch.cuda.is_available()


def all_reduce_sum_(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over the group (the global norm's squares, histogram counts)."""
    if group_size(group) > 1:
        if _needs_device_copy(tensor, group):
            on_device = tensor.to(torch.cuda.current_device())
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group)
            tensor.copy_(on_device)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def exclusive_prefix_sum(value: int, group, device: torch.device | str = "cpu") -> int:
    """sum of `value` over the ranks before this one: settles which rank keeps which tied
    elements. One all-reduce of a world-size vector (counts only, never scores)."""
    size = group_size(group)
    if size == 1:
        return 0
    counts = torch.zeros(size, dtype=torch.int64, device=device)
    rank = group_rank(group)
    counts[rank] = value
    all_reduce_sum_(counts, group)
    return int(counts[:rank].sum())
