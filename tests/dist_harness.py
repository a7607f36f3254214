"""Spawn N CPU ranks over gloo, run one function on each, and return every rank's result.

A failing rank's traceback is raised in the test process with its rank; a hung job is killed after
`timeout` seconds and reported, instead of hanging the suite. Start ranks once per test module and
run several checks inside (a DeepSpeed start costs seconds per rank set).
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, fn, args, out_dir, use_deepspeed):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    # LOCAL_SIZE is deliberately not set: with it DeepSpeed picks a shared-memory all-reduce that
    # leaks a 66 MB /dev/shm file per rank (see DEEPSPEED_NOTES.md).
    os.environ.pop("LOCAL_SIZE", None)
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        import torch.distributed as dist
        if use_deepspeed:
            import deepspeed
            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        outcome = ("ok", result)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, to the parent
        outcome = ("error", traceback.format_exc())
    with open(path, "wb") as f:
        pickle.dump(outcome, f)


def run_ranks(fn, world_size: int, *args, timeout: float = 600, deepspeed: bool = False):
    """fn(rank, world_size, *args) on each rank; returns [result of rank 0, rank 1, ...]."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_rank_main,
                             args=(r, world_size, port, fn, args, out_dir, deepspeed))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}"
                              f"{', killed after timeout' if r in hung else ''})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r} raised:\n{value}")
            results.append(value if status == "ok" else None)
        if errors:
            raise AssertionError(f"{world_size}-rank job failed:\n" + "\n".join(errors))
        return results
