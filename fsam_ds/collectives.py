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


def exclusive_prefix_sum_tensor(value: torch.Tensor, group) -> torch.Tensor:
    """exclusive_prefix_sum for a 0-d int64 tensor, staying on its device (no host sync)."""
    size = group_size(group)
    if size == 1:
        return torch.zeros_like(value)
    rank = group_rank(group)
    counts = torch.zeros(size, dtype=value.dtype, device=value.device)
    counts[rank:rank + 1].copy_(value.reshape(1))
    all_reduce_sum_(counts, group)
    return counts[:rank].sum()


_pinned: dict = {}   # (dtype, device) -> a pinned host staging buffer


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """Copy a small host tensor to `device` without making the host wait: through a pinned
    staging buffer with non_blocking=True on CUDA (a copy from pageable memory is synchronous).
    The buffer is reused: a later call waits, through a CUDA event, for the previous copy out of it
    to finish before overwriting it. On the CPU (or when `host` is already there) it is `host`."""
    device = torch.device(device)
    if device.type != "cuda" or host.device == device:
        return host if host.device == device else host.to(device)
    key = (host.dtype, device)
    buffer, event = _pinned.get(key, (None, None))
    if buffer is None or buffer.numel() < host.numel():
        buffer = torch.empty(max(64, host.numel()), dtype=host.dtype, pin_memory=True)
        event = None
    if event is not None:
        event.synchronize()   # the previous copy out of the buffer has long finished
    staged = buffer[:host.numel()].view(host.shape)
    staged.copy_(host)
    out = staged.to(device, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pinned[key] = (buffer, event)
    return out


def rank0_decides(decide, group=None):
    """Run `decide()` on rank 0 of the default group only and return its result on every rank
    (one broadcast of a small picklable value). For decisions read from shared storage, such as
    which checkpoint `latest` names: each rank reading it alone could see different files while a
    writer is still at work, and then take different branches before the next collective.
    An exception raised on rank 0 is raised on every rank, so all of them fail alike."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as err:   # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0, group=group)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
