"""A tiny, deterministic FSAM training job for the multi-node tests, runnable from any launcher.

Every launcher path in tests/test_multinode.py runs this same script: sbatch launch/slurm_cpu.sbatch
(srun sets RANK/WORLD_SIZE/LOCAL_RANK from SLURM_*), torchrun per node (c10d rendezvous), the
deepspeed launcher with --launcher slurm (DeepSpeed's MPI discovery over PMIx), or plain torchrun on
one node for the single-node reference. It trains PaddedNet (277 parameters, partitions padded at
every world size > 1) with FSAM + AdamW on the same global batches whatever the world size, so runs
of one world size give the same weights however they were launched and wherever the ranks live.

  python tests/multinode_job.py --out DIR --stages 2,3 --steps 4
  ... --save_every 2 --step_sleep 1          checkpoints in DIR/z2/checkpoints, state dumps per save
  ... --resume [--load_tag step2_universal]  load (universal: another world size), then continue

Rank 0 writes DIR/z{stage}/final.pt (fp32 weights gathered, losses, FSAM stats), DIR/ranks.json
(what every rank saw: host, rank, local rank, MASTER_ADDR/PORT) and, at every save and right after
a resume, a state_*.pt with the full fp32 weights and AdamW state of every parameter.
"""
import argparse
import datetime
import json
import os
import re
import socket
import sys
import time
import traceback
import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)   # torch's deprecation notes, per collective

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zero_cases as zc  # noqa: E402

FSAM = {"rho": 0.05, "sparsity": 0.5, "mask_interval": 4}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="2", help="ZeRO stages to train one after the other, e.g. 2,3")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--save_every", type=int, default=0)
    p.add_argument("--step_sleep", type=float, default=0.0, help="seconds to sleep after each step")
    p.add_argument("--resume", action="store_true", help="load DIR/z*/checkpoints (latest or --load_tag)")
    p.add_argument("--load_tag", default=None)
    p.add_argument("--timeout_s", type=float, default=600.0, help="torch.distributed collective timeout")
    return p.parse_args()


def trace(msg):
    if os.environ.get("FSAM_JOB_TRACE"):
        print(f"[trace rank {os.environ.get('RANK')}] {msg}", file=sys.stderr, flush=True)


def describe_peer(text):
    """Name the node behind every IPv4 address in an error message (the private hosts file knows)."""
    names = {}
    for addr in set(re.findall(r"\b(\d+\.\d+\.\d+\.\d+)\b", text)):
        try:
            names[addr] = socket.gethostbyaddr(addr)[0]
        except OSError:
            pass
    return ", ".join(f"{a} is {n}" for a, n in sorted(names.items()))


def full_state(engine):
    """fp32 weights and AdamW state of every parameter, gathered (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    weights, optim = {}, {}
    for name, p in engine.module.named_parameters():
        weights[name] = safe_get_full_fp32_param(p).clone()
        optim[name] = {key: safe_get_full_optimizer_state(p, key).clone() for key in ("exp_avg", "exp_avg_sq")}
    return {"weights": weights, "optim": optim, "global_steps": engine.global_steps,
            "fsam_num_steps": engine._fsam.num_steps, "lr": engine.get_lr()[0]}


def train(stage, args, rank, world_size):
    import fsam_ds
    import torch.distributed as dist
    out = os.path.join(args.out, f"z{stage}")
    ckpt = os.path.join(out, "checkpoints")
    os.makedirs(out, exist_ok=True)
    config = zc.ds_config(stage, world_size, FSAM)
    if args.load_tag and args.load_tag.endswith("_universal"):
        config["checkpoint"] = {"load_universal": True}
    model = zc.make_model()
    engine, *_ = fsam_ds.initialize(model=model, config=config, model_parameters=zc.param_groups(model))
    start, resumed_from = 0, None
    if args.resume:
        tag, client_state, _ = fsam_ds.checkpoint.load_checkpoint(engine, ckpt, tag=args.load_tag)
        if tag is not None:
            start, resumed_from = int(client_state["step"]), tag
            state = full_state(engine)
            if rank == 0:
                torch.save(state, os.path.join(out, f"state_resumed_{tag}.pt"))
                print(f"resumed from {ckpt}/{tag} at step {start} (world size {world_size})", flush=True)
    batches = zc.global_batches(args.steps)
    losses, stats, refreshed = [], [], []
    for step in range(start, args.steps):
        losses.append(fsam_ds.train_step(engine, zc.loss_fn, zc.micro_batches(batches[step], rank, world_size)))
        stats.append(dict(engine._fsam.last_stats))
        # was the mask recomputed in this step?
        refreshed.append(bool(engine._fsam.last_stats.get("refreshed")))
        if rank == 0:
            print(f"z{stage} step {step + 1}/{args.steps} loss {losses[-1]:.6f}", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            state = full_state(engine)
            fsam_ds.checkpoint.save_checkpoint(engine, ckpt, f"step{step + 1}", client_state={"step": step + 1})
            if rank == 0:
                torch.save(state, os.path.join(out, f"state_step{step + 1}.pt"))
                print(f"saved {ckpt}/step{step + 1}", flush=True)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    result = {"weights": zc.full_weights(engine), "losses": losses, "stats": stats, "refreshed": refreshed,
              "start": start, "resumed_from": resumed_from, "world_size": world_size,
              "global_steps": engine.global_steps, "fsam_num_steps": engine._fsam.num_steps}
    if rank == 0:
        torch.save(result, os.path.join(out, "final.pt"))
    trace(f"z{stage} saved final")
    dist.barrier()
    if hasattr(engine, "destroy"):
        engine.destroy()
    trace(f"z{stage} destroyed engine")


def main():
    args = parse_args()
    import deepspeed
    import torch.distributed as dist
    # without RANK etc. (deepspeed --launcher slurm) DeepSpeed discovers them through MPI, with
    # MASTER_PORT = distributed_port
    deepspeed.init_distributed(dist_backend="gloo", verbose=False,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
                               timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    seen = {"rank": rank, "world_size": world_size, "local_rank": int(os.environ["LOCAL_RANK"]),
            "host": socket.gethostname(), "pid": os.getpid(),
            **{k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_NODEID", "SLURM_PROCID",
                                              "GROUP_RANK", "SLURM_JOB_NODELIST", "SLURM_GPUS_ON_NODE",
                                              "SLURM_LOCALID")}}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, seen)
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        with open(os.path.join(args.out, "ranks.json"), "w") as f:
            json.dump(everyone, f, indent=1)
    try:
        for stage in (int(s) for s in args.stages.split(",")):
            train(stage, args, rank, world_size)
    except Exception as err:   # a lost peer: say which rank and node saw it, and who the peer is
        text = f"{type(err).__name__}: {err}"
        peers = describe_peer(text)
        print(f"FAILED: rank {rank} on {socket.gethostname()}: {text.splitlines()[0][:500]}"
              + (f" [{peers}]" if peers else ""), file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.exit(1)
    trace("destroying process group")
    dist.destroy_process_group()
    trace("exiting")
    # Everything is written and the group is gone. Skip the interpreter's teardown: on this machine
    # it sometimes aborts ("terminate called without an active exception", a C++ thread of torch's
    # or DeepSpeed's CPU comm op destroyed while joinable; seen in about 1 run in 5), which would
    # turn a finished job into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
