"""Crash-safe DeepSpeed checkpoints for FSAM runs.

DeepSpeed's save_checkpoint writes `latest` from rank 0 before its final barrier, i.e. possibly
while another rank is still writing its ZeRO shard, and in place (a kill mid-write leaves an empty
`latest`). Here `latest` moves only after every rank has finished writing the new tag, and by an
atomic rename, so a job killed at any point leaves `latest` naming a complete checkpoint. FSAM's own
state (mask, step counter) is part of the optimizer state DeepSpeed saves per rank.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fsam_ds import collectives

LATEST = "latest"


def save_checkpoint(engine, save_dir: str, tag: str, client_state: dict | None = None,
                    rank_state: dict | None = None) -> None:
    """engine.save_checkpoint(tag) on every rank, then an atomic `latest` -> tag. Call on all ranks.
    client_state is saved once (DeepSpeed keeps rank 0's); rank_state per rank (e.g. RNG states)."""
    client_state = dict(client_state or {})
    fsam = _fsam_client(engine)
    if fsam is not None:
        # also kept outside the optimizer state, which a universal (world-size-changing) load drops
        client_state["fsam"] = {"num_steps": fsam.core.num_steps,
                                "last_refresh_window": fsam.core.last_refresh_window}
    # DeepSpeed's ds_to_universal refuses checkpoints without this key; plain data parallelism
    # needs no tensor/pipeline-parallel details in it.
    client_state.setdefault("universal_checkpoint_info", {})
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    if rank_state is not None:
        torch.save(rank_state, _rank_state_path(save_dir, tag))
    dist.barrier()  # every rank's files are written (save_checkpoint's own barrier may precede some)
    if dist.get_rank() == 0:
        tmp = os.path.join(save_dir, f".{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(save_dir, LATEST))
        dir_fd = os.open(save_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    dist.barrier()


def latest_tag(save_dir: str) -> str | None:
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag or not os.path.isdir(os.path.join(save_dir, tag)):
        raise ValueError(f"{path} names checkpoint {tag!r}, which does not exist in {save_dir}")
    return tag


def load_checkpoint(engine, load_dir: str, tag: str | None = None):
    """Load checkpoint `tag` (default: the one `latest` names). Returns (tag, client_state,
    rank_state), or (None, {}, None) when there is none. rank_state is None if this rank saved
    none (e.g. the checkpoint came from another world size).

    Another world size: convert with DeepSpeed's
        python -m deepspeed.checkpoint.ds_to_universal --input_folder DIR/TAG --output_folder DIR/TAG_universal
    and load TAG_universal with "checkpoint": {"load_universal": true} in the config. Weights and
    the base optimizer's state are exact; FSAM's masks are per-shard and cannot follow, so the
    mask is recomputed at the next step (a warning says so) and the step counter is restored."""
    # rank 0 reads `latest` (or checks the tag) and every rank follows it: ranks reading it
    # apart could load different tags and diverge
    if tag is None:
        tag = collectives.rank0_decides(lambda: latest_tag(load_dir))
        if tag is None:
            return None, {}, None
    elif not collectives.rank0_decides(lambda: os.path.isdir(os.path.join(load_dir, tag))):
        raise ValueError(f"checkpoint {tag!r} does not exist in {load_dir}")
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {tag!r} from {load_dir}")
    client_state = client_state or {}
    fsam = _fsam_client(engine)
    saved = client_state.get("fsam")
    if fsam is not None and saved is not None and fsam.core.num_steps != saved["num_steps"]:
        # the optimizer state (with FSAM's masks) was not loaded: a universal checkpoint
        fsam.core.num_steps = int(saved["num_steps"])
        fsam.core.last_refresh_window = int(saved.get("last_refresh_window", -1))
        fsam.core.forget_masks("the checkpoint carries no per-shard FSAM masks for this world size")
    rank_file = _rank_state_path(load_dir, tag)
    rank_state = torch.load(rank_file, weights_only=False) if os.path.isfile(rank_file) else None
    return tag, client_state, rank_state


def _fsam_client(engine):
    from fsam_ds.deepspeed_adapter import engine_client_optimizer
    from fsam_ds.deepspeed_client import FSAMDeepSpeedClient
    client = engine_client_optimizer(engine)
    return client if isinstance(client, FSAMDeepSpeedClient) else None


def _rank_state_path(save_dir, tag):
    return os.path.join(save_dir, tag, f"fsam_rank_state_{dist.get_rank():05d}.pt")
