"""A persistent worker that runs launch/train.py several times in ONE process, so that the imports
(torch, transformers, DeepSpeed, fsam_ds: 10-20 s) are paid once per worker, not once per run.

Each run executes the unmodified launch/train.py with runpy (as `python launch/train.py ARGS`
would), so it goes through deepspeed.init_distributed, fsam_ds.initialize / initialize_base and
fsam_ds.train_step exactly like a separate process. train.py seeds `random` and torch (CPU and all
CUDA devices) from --seed at its start, so a run's result does not depend on the runs before it
in the same worker (checked on CPU: see experiments/README.md). Between runs the worker releases
DeepSpeed's cached process-group references (train.py destroys the process group with torch's call,
which does not clear DeepSpeed's caches), collects garbage and empties the CUDA cache.

Protocol (used by experiments/study.py): the environment carries RANK=0 WORLD_SIZE=1 LOCAL_RANK=0
MASTER_ADDR and CUDA_VISIBLE_DEVICES; stdin carries one JSON object per line,
  {"run_id": str, "argv": [train.py arguments], "log": path, "master_port": int}
and for each the worker appends one JSON line to the status file descriptor (--status_fd):
  {"run_id", "rc", "wall_s", "param_dtype", "error"}.
The first status line is {"ready": true, "import_s": ...}. A run that fails (rc != 0) ends the
worker (its state is suspect); study.py starts a fresh one. Run by hand:
  echo '{"run_id": "a", "argv": [...], "log": "/tmp/a.log", "master_port": 29700}' | \
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 python experiments/multi_run.py --status_fd 1
"""
import argparse
import gc
import json
import os
import runpy
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, "launch", "train.py")


def release_distributed():
    """After train.py's dist.destroy_process_group(): forget DeepSpeed's cached groups; if a run
    died before destroying its group, destroy it here so the next run starts clean."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort on an already broken run
            pass
    try:
        from deepspeed.utils import groups
        release = getattr(groups, "_release_process_group_references", None)
        if release is not None:
            release(group=None)
    except Exception:  # noqa: BLE001
        pass


def run_once(job):
    """Run train.py with job["argv"], stdout/stderr (fd level) into job["log"]."""
    os.environ["MASTER_PORT"] = str(job["master_port"])
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    rc, error, param_dtype = 0, None, None
    started = time.time()
    try:
        sys.argv = [TRAIN_PY] + [str(a) for a in job["argv"]]
        scope = runpy.run_path(TRAIN_PY, run_name="__main__")
        model = scope.get("model")
        if model is not None:
            param_dtype = str(next(model.parameters()).dtype)
        del scope, model
    except SystemExit as err:
        rc = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        error = None if rc == 0 else f"SystemExit({err.code})"
    except BaseException as err:  # noqa: BLE001 - report every failure, keep the protocol alive
        traceback.print_exc()
        rc, error = 1, f"{type(err).__name__}: {err}"
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    wall = time.time() - started
    release_distributed()
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
    return {"run_id": job["run_id"], "rc": rc, "wall_s": wall, "param_dtype": param_dtype, "error": error}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--status_fd", type=int, required=True)
    args = parser.parse_args()
    status = os.fdopen(args.status_fd, "w", buffering=1)
    started = time.time()
    sys.path.insert(0, REPO)
    import torch  # noqa: F401  - the expensive imports, once
    import transformers  # noqa: F401
    import deepspeed  # noqa: F401
    import fsam_ds  # noqa: F401
    import fsam_ds.engine  # noqa: F401
    status.write(json.dumps({"ready": True, "import_s": time.time() - started, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        result = run_once(json.loads(line))
        status.write(json.dumps(result) + "\n")
        if result["rc"] != 0:
            break


if __name__ == "__main__":
    main()
