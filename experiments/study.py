"""Scheduler of the study "Does FSAM generalize better?": AdamW vs SAM vs FSAM fine-tuning of
all-MiniLM-L6-v2 through launch/train.py + DeepSpeed + fsam_ds, on movie_reviews, sms_spam and
bbc_news, at the full training split and at 1,000 and 500 training examples.

  python experiments/study.py --smoke                                    # CPU, ~2 min here
  python experiments/study.py --phase all --gpus 4 --procs_per_gpu 4 \
      --out_dir /tmp/study --results $OUT/results.jsonl --grid_budget_s 200 --budget_s 480
  python experiments/study.py --phase all --gpus 4 --dry_run             # plan + time estimate

Phases (--phase grid | seeds | all | interval):
  grid   full-data setting, one seed (--grid_seed): AdamW at --lr; SAM rho in --rhos; FSAM rho in
         --rhos x sparsity in --sparsities. Chosen per task and optimizer on VALIDATION accuracy
         (ties: macro-F1, then the smaller rho, then the larger sparsity). Test is recorded, never read.
  seeds  every task x setting (full, 1000, 500) x optimizer at its chosen setting, --seeds seeds.
         The choice is read from the grid records in --results (or, in --phase all, as soon as the
         task's grid runs are done: AdamW seed runs, which need no choice, fill the slots meanwhile).
The low-data settings reuse the full-data choice (no grid of their own: the budget has no room).
  interval  FSAM's interval mode, cost and accuracy side by side: --interval_tasks (movie_reviews) x
         --interval_settings (full, 500) x {AdamW, SAM (rho --interval_sam_rho, sparsity 0), FSAM
         (--default_rho, --default_sparsity) with "sam_interval": N for N in --sam_intervals (1 2 4)}
         x --interval_seeds (0 1 2) = 30 runs; no grid (the hyper-parameters are the 2026-11-28
         study's movie_reviews choices: SAM rho 0.01, FSAM rho 0.05 / sparsity 0.9). N = 1 is plain
         FSAM; with N the two-pass step runs on every N-th step and a plain AdamW step otherwise.
         Every run records its mean step time (train.py: wall s per optimizer step, evaluations
         excluded) and its number of perturbed (two-pass) steps.

  python experiments/study.py --phase interval --gpus 1 --procs_per_gpu 4 --out_dir /tmp/study \
      --results $OUT/results.jsonl --budget_s 330          # experiments/run_interval_gpu.sh

Runs: world size 1, one GPU each, --procs_per_gpu concurrent runs per GPU. --mode worker (default)
keeps one experiments/multi_run.py process per slot that executes the unmodified launch/train.py
once per run (imports paid once); --mode process starts `python launch/train.py` per run. Each run
gets its own DeepSpeed JSON (from --base_config: lr, warm-up 10% of the run, batch size, ZeRO stage,
fsam block with mask_interval ~ run length / 10, csv monitor off) in OUT_DIR/runs/RUN_ID/.

Run length: batch --batch_size (32); epochs = max(1, round(--target_steps / steps per epoch)), so
movie_reviews full trains 1 epoch (264 steps), sms_spam 1 (120), bbc_news 3 (165), the 1,000-
example setting 5 epochs (155) and the 500-example setting 10 epochs (150).

Budget: --grid_budget_s (from the start) bounds the grid, --budget_s / --deadline (unix time) all
runs. A run is started only if its estimated wall time fits before its deadline; otherwise it is
recorded with status "skipped_budget". Estimates: --prior_step_s x steps + --prior_overhead_s,
rescaled online by the ratio observed / predicted of finished runs (per optimizer). Seeds are
queued seed-major, so a cut loses the last seeds of every cell rather than whole cells.

Output: one JSON line per run in --results (status ok | failed | timeout | skipped_budget; task,
setting, optimizer, rho, sparsity, seed, validation/test accuracy and macro-F1, train and wall
seconds, per-step loss, mean and per-step wall s per optimizer step without evaluations, the
number of perturbed two-pass steps), OUT_DIR/chosen.json, OUT_DIR/study_meta.json. --fill_tail:
while the last planned runs finish, free slots run "filler" copies (other seeds, stopped when the
last planned run ends, recorded as phase "filler") so the last runs share the GPU like the rest.
Re-running skips runs already recorded "ok" in --results (so an interrupted study resumes).
"""
import argparse
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, "launch", "train.py")
WORKER_PY = os.path.join(REPO, "experiments", "multi_run.py")
TASKS = ("movie_reviews", "sms_spam", "bbc_news")
SETTINGS = {"full": "train.jsonl", "1000": "train_1000.jsonl", "500": "train_500.jsonl"}
OPTIMIZERS = ("adamw", "sam", "fsam")


# ------------------------------------------------------------------------------------------ plan
def count_rows(path):
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def run_id(run):
    tag = "" if run["optimizer"] == "adamw" else f"-rho{run['rho']:g}" + (
        f"-sp{run['sparsity']:g}" if run["optimizer"] == "fsam" else "")
    if run["optimizer"] == "fsam" and run.get("sam_interval") is not None:
        tag += f"-int{run['sam_interval']}"
    return f"{run['phase']}-{run['task']}-{run['setting']}-{run['optimizer']}{tag}-seed{run['seed']}"


def make_run(args, phase, task, setting, optimizer, seed, rho=None, sparsity=None, sam_interval=None):
    n_train = count_rows(os.path.join(args.assets, task, SETTINGS[setting]))
    steps_per_epoch = n_train // args.batch_size
    epochs = max(1, round(args.target_steps / steps_per_epoch))
    steps = epochs * steps_per_epoch
    if args.max_steps:
        steps = min(steps, args.max_steps)
    run = {"phase": phase, "task": task, "setting": setting, "n_train": n_train, "optimizer": optimizer,
           "rho": None if optimizer == "adamw" else rho, "seed": seed, "lr": args.lr, "epochs": epochs,
           "steps": steps, "batch_size": args.batch_size,
           "sparsity": {"adamw": None, "sam": 0.0, "fsam": sparsity}[optimizer],
           "mask_interval": None if optimizer == "adamw" else max(1, round(steps / args.mask_refreshes)),
           "warmup_steps": max(1, round(args.warmup_fraction * steps))}
    if sam_interval is not None:       # interval phase only: the other phases' run ids stay as they were
        if optimizer == "adamw":
            raise ValueError("sam_interval is for SAM/FSAM runs")
        run["sam_interval"] = sam_interval
    if optimizer != "adamw" and rho is None:
        run["needs_choice"] = True   # rho/sparsity filled from the grid at dispatch time
    else:
        run["run_id"] = run_id(run)
    return run


def build_plan(args):
    """(grid runs, seed runs), each in dispatch order. Grid: by priority level (0: AdamW and the
    default SAM/FSAM settings; 1: the other radii; 2: the other sparsities), longest runs first
    within a level, so a budget cut trims the least informative configurations. Seeds: seed-major,
    longest first within a seed."""
    grid, seeds = [], []
    for task in args.tasks:
        grid.append((0, make_run(args, "grid", task, "full", "adamw", args.grid_seed)))
        for rho in args.rhos:
            level = 0 if rho == args.default_rho else 1
            grid.append((level, make_run(args, "grid", task, "full", "sam", args.grid_seed, rho=rho)))
        for rho in args.rhos:
            for sparsity in args.sparsities:
                level = 2 if sparsity != args.default_sparsity else (0 if rho == args.default_rho else 1)
                grid.append((level, make_run(args, "grid", task, "full", "fsam", args.grid_seed, rho=rho,
                                             sparsity=sparsity)))
    grid = [run for _, run in sorted(grid, key=lambda lr: (lr[0], -lr[1]["steps"]))]
    for seed in args.seeds:                       # seed-major: a budget cut drops the last seeds
        batch = [make_run(args, "seeds", task, setting, optimizer, seed)
                 for task in args.tasks for setting in args.settings for optimizer in OPTIMIZERS]
        seeds += sorted(batch, key=lambda run: -run["steps"] * (1 if run["optimizer"] == "adamw" else 2))
    return grid, seeds


def build_interval_plan(args):
    """The interval phase, seed-major (a budget cut drops the last seeds of every cell), the most
    expensive runs first within a seed (cost ~ steps x passes per step)."""
    bad = [n for n in args.sam_intervals if n < 1]
    if bad:
        raise SystemExit(f"error: --sam_intervals {bad}: each must be an integer >= 1")
    runs = []
    for seed in args.interval_seeds:
        batch = []
        for task in args.interval_tasks:
            for setting in args.interval_settings:
                batch.append(make_run(args, "interval", task, setting, "adamw", seed))
                batch.append(make_run(args, "interval", task, setting, "sam", seed, rho=args.interval_sam_rho,
                                      sparsity=0.0, sam_interval=1))
                for n in args.sam_intervals:
                    batch.append(make_run(args, "interval", task, setting, "fsam", seed, rho=args.default_rho,
                                          sparsity=args.default_sparsity, sam_interval=n))
        runs += sorted(batch, key=lambda run: -run["steps"] * passes_per_step(run))
    return runs


def passes_per_step(run):
    """Forward+backward passes per optimizer step: 1 (AdamW), 2 (SAM/FSAM), 1 + 1/N in interval mode."""
    if run["optimizer"] == "adamw":
        return 1.0
    return 1.0 + 1.0 / (run.get("sam_interval") or 1)


def choose(records, task):
    """{optimizer: grid record} chosen on validation accuracy (then macro-F1, smaller rho, larger
    sparsity) among the task's finished grid runs."""
    best = {}
    for r in records:
        if r.get("phase") != "grid" or r.get("task") != task or r.get("status") != "ok":
            continue
        key = (r["validation"]["accuracy"], r["validation"]["macro_f1"], -(r["rho"] or 0), r["sparsity"] or 0)
        if r["optimizer"] not in best or key > best[r["optimizer"]][0]:
            best[r["optimizer"]] = (key, r)
    return {opt: rec for opt, (_, rec) in best.items()}


def resolve_choice(args, run, records):
    chosen = choose(records, run["task"]).get(run["optimizer"])
    run = dict(run)
    run.pop("needs_choice", None)
    if chosen is not None:
        run["rho"], run["sparsity"] = chosen["rho"], chosen["sparsity"]
        run["chosen_by"] = f"grid validation accuracy {chosen['validation']['accuracy']:.4f} ({chosen['run_id']})"
    else:
        run["rho"] = args.default_rho
        run["sparsity"] = 0.0 if run["optimizer"] == "sam" else args.default_sparsity
        run["chosen_by"] = "default (no finished grid run for this task and optimizer)"
    run["run_id"] = run_id(run)
    return run


# ------------------------------------------------------------------------------------------ one run
def ds_config_for(args, run):
    with open(args.base_config) as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = run["batch_size"]
    cfg["gradient_accumulation_steps"] = 1
    cfg.pop("train_batch_size", None)
    cfg["optimizer"]["params"]["lr"] = run["lr"]
    sched = cfg.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {}})
    sched["params"].update({"warmup_min_lr": 0, "warmup_max_lr": run["lr"],
                            "warmup_num_steps": run["warmup_steps"], "warmup_type": "linear"})
    sched["params"].pop("total_num_steps", None)      # train.py fills it from the data
    cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    cfg["csv_monitor"] = {"enabled": False}
    cfg["steps_per_print"] = 10 ** 9
    if args.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    else:
        cfg.pop("bf16", None)
        cfg.pop("fp16", None)
    if run["optimizer"] == "adamw":
        cfg.pop("fsam", None)
    else:
        block = cfg.setdefault("fsam", {})
        block.update({"rho": run["rho"], "sparsity": run["sparsity"], "mask_interval": run["mask_interval"]})
        if run.get("sam_interval") is not None:
            block["sam_interval"] = run["sam_interval"]
    return cfg


def train_argv(args, run, run_dir, cfg_path):
    data = os.path.join(args.assets, run["task"])
    argv = ["--deepspeed_config", cfg_path, "--optimizer", run["optimizer"],
            "--model_name_or_path", os.path.join(args.assets, "model"),
            "--train_file", os.path.join(data, SETTINGS[run["setting"]]),
            "--validation_file", os.path.join(data, "validation.jsonl"),
            "--test_file", os.path.join(data, "test.jsonl"),
            "--epochs", str(run["epochs"]), "--max_seq_length", str(args.max_seq_length),
            "--seed", str(run["seed"]), "--output_dir", run_dir, "--log_every", str(args.log_every)]
    if args.max_steps:
        argv += ["--max_steps", str(args.max_steps)]
    if args.max_eval_samples:
        argv += ["--max_eval_samples", str(args.max_eval_samples)]
    return argv


def record_from(run, run_dir, outcome, slot):
    rec = {k: v for k, v in run.items() if k != "needs_choice"}
    rec.update({"status": outcome["status"], "rc": outcome.get("rc"), "slot": slot["name"],
                "gpu": slot["gpu"], "wall_seconds": outcome.get("wall_s"),
                "worker_wall_seconds": outcome.get("worker_wall_s"), "param_dtype": outcome.get("param_dtype"),
                "started_at": outcome.get("started_at"), "estimated_seconds": outcome.get("estimated_s"),
                "host": socket.gethostname()})
    metrics_path = os.path.join(run_dir, "metrics.json")
    if outcome["status"] == "ok" and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            m = json.load(f)
        history = m.get("history", [])
        rec.update({"validation": m.get("validation"), "test": m.get("test"),
                    "validation_per_epoch": m.get("validation_per_epoch", []),
                    "train_seconds": m.get("train_seconds"), "steps_done": m.get("steps"),
                    "global_batch_size": m.get("global_batch_size"), "labels": m.get("labels"),
                    "fsam_config": m.get("fsam"), "zero_stage": m.get("zero_stage"),
                    "loss": [h.get("loss") for h in history],
                    # wall s per optimizer step without evaluations, and the two-pass steps taken
                    "step_seconds_mean": m.get("step_seconds_mean"), "perturbed_steps": m.get("perturbed_steps"),
                    "step_seconds": [round(h["step_seconds"], 5) for h in history if "step_seconds" in h]})
        cfg_interval = (m.get("fsam") or {}).get("sam_interval")
        if run.get("sam_interval") is not None and cfg_interval != run["sam_interval"]:
            rec["status"] = "failed"      # the engine must have run with the planned interval
            rec["error"] = (f"planned sam_interval {run['sam_interval']} but the engine's fsam config "
                            f"says {cfg_interval}")
        if run["optimizer"] != "adamw":
            rec["sharpness"] = [h.get("fsam_sharpness") for h in history]
            dens = [h.get("fsam_mask_density") for h in history if h.get("fsam_mask_density") is not None]
            rec["mask_density_mean"] = sum(dens) / len(dens) if dens else None
    elif outcome["status"] == "ok":
        rec["status"] = "failed"
        rec["error"] = "train.py returned 0 but wrote no metrics.json"
    if rec["status"] != "ok":
        rec["error"] = rec.get("error") or outcome.get("error")
        log_path = os.path.join(run_dir, "log.txt")
        if os.path.isfile(log_path):
            with open(log_path, errors="replace") as f:
                rec["log_tail"] = f.read()[-3000:]
    return rec


# ------------------------------------------------------------------------------------------ slots
class Slot:
    """One concurrent run: a GPU (or the CPU) and, in worker mode, a persistent multi_run.py."""

    def __init__(self, args, index, gpu):
        self.args, self.index, self.gpu = args, index, gpu
        self.name = f"{'gpu' + str(gpu) if gpu is not None else 'cpu'}.{index}"
        self.port_base = args.port_base + 100 * index
        self.n_runs = 0
        self.proc = None
        self.status_r = None
        self.import_s = []
        self.child = None

    def env(self):
        env = dict(os.environ)
        env.pop("LOCAL_SIZE", None)   # would switch DeepSpeed's CPU all-reduce to /dev/shm buffers
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(self.port_base), "PYTHONUNBUFFERED": "1",
                    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "OMP_NUM_THREADS": str(self.args.threads_per_run),
                    "PYTHONPATH": os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)})
        if self.gpu is None:
            env.update({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
        else:
            env.update({"DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": str(self.gpu)})
        return env

    def next_port(self):
        self.n_runs += 1
        return self.port_base + self.n_runs % 100

    # worker mode
    def start_worker(self):
        r, w = os.pipe()
        log = open(os.path.join(self.args.out_dir, f"worker_{self.name}.log"), "ab")
        self.proc = subprocess.Popen([sys.executable, WORKER_PY, "--status_fd", str(w)], stdin=subprocess.PIPE,
                                     stdout=log, stderr=subprocess.STDOUT, env=self.env(), pass_fds=(w,),
                                     cwd=REPO, start_new_session=True)
        os.close(w)
        log.close()
        self.status_r = os.fdopen(r, "r")
        msg = self.read_status(self.args.worker_start_timeout_s)
        if not msg or not msg.get("ready"):
            self.stop_worker()
            raise RuntimeError(f"worker {self.name} did not start (see {self.args.out_dir}/worker_{self.name}.log)")
        self.import_s.append(msg["import_s"])

    def ensure_worker(self):
        if self.args.mode == "worker" and (self.proc is None or self.proc.poll() is not None):
            self.stop_worker()
            self.start_worker()

    def read_status(self, timeout):
        ready, _, _ = select.select([self.status_r], [], [], timeout)
        if not ready:
            return None
        line = self.status_r.readline()
        return json.loads(line) if line else None

    def kill_child(self):
        proc = getattr(self, "child", None)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

    def kill_current(self):
        """End the run in progress (from another thread): its slot thread sees the worker or the
        child die, records it and carries on."""
        proc = self.proc if self.args.mode == "worker" else self.child
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stop_worker(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None
        if self.status_r is not None:
            self.status_r.close()
            self.status_r = None

    def run(self, argv, log_path, timeout):
        """Run train.py once; returns {"status", "rc", "worker_wall_s", "param_dtype", "error"}."""
        if self.args.mode == "process":
            env = self.env()
            env["MASTER_PORT"] = str(self.next_port())
            with open(log_path, "ab") as log:
                proc = subprocess.Popen([sys.executable, TRAIN_PY] + argv, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, cwd=REPO, start_new_session=True)
                self.child = proc
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.kill_child()
                    return {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
                finally:
                    self.child = None
            return {"status": "ok" if rc == 0 else "failed", "rc": rc,
                    "error": None if rc == 0 else f"exit code {rc}"}
        self.ensure_worker()
        job = {"run_id": os.path.basename(os.path.dirname(log_path)), "argv": argv, "log": log_path,
               "master_port": self.next_port()}
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.stop_worker()
            return {"status": "failed", "error": "worker died before the run"}
        msg = self.read_status(timeout)
        if msg is None:
            died = self.proc.poll() is not None
            self.stop_worker()
            return ({"status": "failed", "error": "worker died during the run"} if died else
                    {"status": "timeout", "error": f"killed after {timeout:.0f} s"})
        if msg["rc"] != 0:
            self.stop_worker()     # the worker exits after a failed run; a fresh one takes the next
        return {"status": "ok" if msg["rc"] == 0 else "failed", "rc": msg["rc"], "error": msg.get("error"),
                "worker_wall_s": msg["wall_s"], "param_dtype": msg.get("param_dtype")}


# ------------------------------------------------------------------------------------------ estimator
class Estimator:
    """Wall seconds of a run: overhead + steps x seconds per step (SAM/FSAM: two passes), rescaled by
    the mean observed/predicted ratio of this optimizer's finished runs (all runs' until then)."""

    def __init__(self, args):
        self.step_s = dict(args.prior_step_s)
        self.overhead_s = args.prior_overhead_s
        self.ratios = {}

    def prior(self, run):
        n = run.get("sam_interval") or 1       # interval mode: 1/N two-pass steps, the rest plain
        per_step = self.step_s[run["optimizer"]] / n + self.step_s["adamw"] * (1 - 1 / n)
        return self.overhead_s + run["steps"] * per_step

    def ratio(self, optimizer):
        own = self.ratios.get(optimizer, [])
        pool = own if own else [x for v in self.ratios.values() for x in v]
        return sum(pool[-20:]) / len(pool[-20:]) if pool else 1.0

    def predict(self, run):
        return self.prior(run) * self.ratio(run["optimizer"])

    def observe(self, run, wall_s):
        self.ratios.setdefault(run["optimizer"], []).append(wall_s / max(1e-6, self.prior(run)))


# ------------------------------------------------------------------------------------------ scheduler
class Scheduler:
    def __init__(self, args, grid, seeds, records):
        self.args = args
        self.lock = threading.Condition()
        self.records = records                       # every record, old and new (choices read these)
        self.done_ok = {r["run_id"] for r in records if r.get("status") == "ok"}
        self.pending = [r for r in grid + seeds if r.get("run_id") not in self.done_ok]
        self.grid_tasks_open = {}                    # task -> grid runs not yet finished/skipped
        for r in self.pending:
            if r["phase"] == "grid":
                self.grid_tasks_open[r["task"]] = self.grid_tasks_open.get(r["task"], 0) + 1
        self.running = 0
        self.plan = list(self.pending)               # templates of the tail fillers (--fill_tail)
        self.fillers = {}                            # slot -> its running filler
        self.n_fillers = 0
        self.planned_running = 0
        self.fillers_done = False                    # set when the last planned run ended
        self.estimator = Estimator(args)
        self.start = time.time()
        self.grid_deadline = self.start + args.grid_budget_s if args.grid_budget_s else float("inf")
        self.deadline = min(self.start + args.budget_s if args.budget_s else float("inf"),
                            args.deadline or float("inf"))
        self.results_f = open(args.results, "a")
        self.counts = {}
        self.aborted = None

    def deadline_of(self, run):
        return min(self.grid_deadline, self.deadline) if run["phase"] == "grid" else self.deadline

    def ready(self, run):
        return not run.get("needs_choice") or self.grid_tasks_open.get(run["task"], 0) == 0

    def emit(self, rec):
        self.results_f.write(json.dumps(rec) + "\n")
        self.results_f.flush()
        self.records.append(rec)
        self.counts[rec["status"]] = self.counts.get(rec["status"], 0) + 1
        if rec["phase"] == "grid" and rec["task"] in self.grid_tasks_open:
            self.grid_tasks_open[rec["task"]] -= 1
        self.lock.notify_all()
        acc = (rec.get("test") or {}).get("accuracy")
        val = (rec.get("validation") or {}).get("accuracy")
        wall = rec.get("wall_seconds")
        print(f"[study] {time.time() - self.start:6.0f}s {rec['status']:14s} {rec['run_id']:60s} "
              + (f"val {val:.4f} test {acc:.4f} " if acc is not None and val is not None else "")
              + (f"wall {wall:.1f}s" if wall is not None else f"est {rec.get('estimated_seconds', 0):.0f}s")
              + f" [{rec.get('slot') or '-'}]", flush=True)
        if rec["status"] in ("failed", "timeout"):
            n_bad = self.counts.get("failed", 0) + self.counts.get("timeout", 0)
            if n_bad <= 3:
                print(f"[study] {rec['run_id']}: {rec.get('error')}\n--- log tail ---\n"
                      f"{rec.get('log_tail', '')[-2000:]}\n---", flush=True)
            if self.counts.get("ok", 0) == 0 and n_bad >= self.args.abort_after_failures:
                self.aborted = f"{n_bad} runs failed and none succeeded: aborting the study"
                print(f"[study] {self.aborted}", flush=True)
                pending, self.pending = self.pending, []
                for run in pending:
                    if run.get("needs_choice"):
                        run = resolve_choice(self.args, run, self.records)
                    self.emit(dict(run, status="skipped_abort", slot=None, gpu=None, error=self.aborted))

    def filler(self):
        """A run that only keeps the GPU as shared as before while the last planned runs finish
        (--fill_tail): a copy of a planned run under another seed, phase "filler", stopped as soon
        as no planned run is left. Its record is not a result."""
        template = self.plan[self.n_fillers % len(self.plan)]
        self.n_fillers += 1
        run = dict(template, phase="filler", seed=1000 + self.n_fillers)
        run.pop("needs_choice", None)
        if run.get("rho") is None and run["optimizer"] != "adamw":
            run["rho"], run["sparsity"] = self.args.default_rho, (0.0 if run["optimizer"] == "sam" else self.args.default_sparsity)
        run["run_id"] = f"filler{self.n_fillers}-" + run_id(run)
        return run

    def take(self, slot=None):
        """The next run to start (None: nothing left). Skips what cannot finish in time."""
        with self.lock:
            while True:
                if not self.pending:
                    if self.args.fill_tail and self.planned_running > 0 and not self.fillers_done:
                        run = self.filler()
                        self.running += 1
                        self.fillers[slot] = run
                        return run, self.estimator.predict(run)
                    return None
                now = time.time()
                for i, run in enumerate(self.pending):
                    if not self.ready(run):
                        continue
                    self.pending.pop(i)
                    if run.get("needs_choice"):
                        run = resolve_choice(self.args, run, self.records)
                        if run["run_id"] in self.done_ok:     # finished in an earlier invocation
                            break
                    est = self.estimator.predict(run)
                    if now + est > self.deadline_of(run):
                        self.emit(dict(run, status="skipped_budget", estimated_seconds=est, slot=None, gpu=None,
                                       error=f"estimated {est:.0f} s, {self.deadline_of(run) - now:.0f} s left"))
                        break                       # re-scan: emit() may have unblocked runs
                    self.running += 1
                    self.planned_running += 1
                    return run, est
                else:
                    if self.running == 0:          # blocked runs with nothing running: cannot happen
                        for run in self.pending:   # unless grid runs vanished; use the defaults
                            run.pop("needs_choice", None)
                        self.grid_tasks_open.clear()
                        continue
                    self.lock.wait(1.0)

    def execute(self, slot, run, est):
        """Run one planned run on a slot; returns its record (never raises)."""
        run_dir = os.path.join(self.args.out_dir, "runs", run["run_id"])
        started = time.time()
        outcome = {}
        try:
            os.makedirs(run_dir, exist_ok=True)
            cfg_path = os.path.join(run_dir, "ds_config.json")
            with open(cfg_path, "w") as f:
                json.dump(ds_config_for(self.args, run), f, indent=2)
            timeout = max(self.args.min_run_timeout_s, self.args.run_timeout_factor * est)
            try:
                slot.ensure_worker()         # a worker's start (imports) is not part of a run's time
            except Exception as err:  # noqa: BLE001 - slot.run retries once and reports
                print(f"[study] {slot.name}: {err}", flush=True)
            started = time.time()
            outcome = slot.run(train_argv(self.args, run, run_dir, cfg_path), os.path.join(run_dir, "log.txt"), timeout)
        except Exception as err:  # noqa: BLE001 - a slot must not take the study down
            outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        outcome.update(wall_s=time.time() - started, started_at=started, estimated_s=est)
        rec = record_from(run, run_dir, outcome, {"name": slot.name, "gpu": slot.gpu})
        if not self.args.keep_models:
            shutil.rmtree(os.path.join(run_dir, "model"), ignore_errors=True)
        return rec

    def slot_loop(self, slot):
        try:
            while True:
                taken = self.take(slot)
                if taken is None:
                    return
                run, est = taken
                is_filler = run["phase"] == "filler"
                if is_filler and self.fillers_done:
                    rec = dict(run, status="filler_stopped", slot=slot.name, gpu=slot.gpu)
                else:
                    rec = self.execute(slot, run, est)
                with self.lock:
                    self.running -= 1
                    if is_filler:
                        self.fillers.pop(slot, None)
                        if rec["status"] != "ok":
                            rec["status"] = "filler_stopped"
                        self.emit(rec)
                        continue
                    self.planned_running -= 1
                    if rec["status"] == "ok":
                        self.estimator.observe(run, rec["wall_seconds"])
                    self.emit(rec)
                    if not self.pending and self.planned_running == 0 and self.fillers:   # the last planned run ended
                        self.fillers_done = True
                        for other in list(self.fillers):
                            other.kill_current()
        finally:
            slot.stop_worker()


# ------------------------------------------------------------------------------------------ main
def detect_gpus():
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        return 0


def parse_kv(text):
    return {k: float(v) for k, v in (item.split("=") for item in text.split(","))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=["grid", "seeds", "all", "interval"], default="all")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU plan: movie_reviews, settings full+500, 3 steps, 64 eval rows, 2 seeds; with --phase "
                        "interval: 1 seed, 4 steps, max_seq_length 32")
    p.add_argument("--assets", default=os.path.join(REPO, "study_assets"))
    p.add_argument("--out_dir", default=os.path.join(REPO, "outputs", "study"))
    p.add_argument("--results", default=None, help="results JSONL (default OUT_DIR/results.jsonl)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--grid_seed", type=int, default=100, help="a seed outside --seeds")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.5])
    p.add_argument("--interval_tasks", nargs="+", default=["movie_reviews"], choices=TASKS)
    p.add_argument("--interval_settings", nargs="+", default=["full", "500"], choices=list(SETTINGS))
    p.add_argument("--interval_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sam_intervals", type=int, nargs="+", default=[1, 2, 4],
                   help='interval phase: FSAM "sam_interval" values (1 = plain FSAM)')
    p.add_argument("--interval_sam_rho", type=float, default=0.01,
                   help="interval phase: SAM's rho (the 2026-11-28 study's movie_reviews choice)")
    p.add_argument("--default_rho", type=float, default=0.05)
    p.add_argument("--default_sparsity", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--target_steps", type=int, default=150)
    p.add_argument("--max_steps", type=int, default=0, help="cap every run (smoke tests)")
    p.add_argument("--max_eval_samples", type=int, default=0)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--warmup_fraction", type=float, default=0.1)
    p.add_argument("--mask_refreshes", type=float, default=10, help="FSAM mask_interval = steps / this")
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--base_config", default=os.path.join(REPO, "ds_configs", "zero2_fsam.json"))
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--mode", choices=["worker", "process"], default="worker")
    p.add_argument("--gpus", type=int, default=None, help="default: nvidia-smi -L count; 0 = CPU")
    p.add_argument("--procs_per_gpu", type=int, default=4)
    p.add_argument("--cpu_slots", type=int, default=1, help="concurrent runs without GPUs")
    p.add_argument("--threads_per_run", type=int, default=None, help="OMP_NUM_THREADS per run")
    p.add_argument("--port_base", type=int, default=29600)
    p.add_argument("--grid_budget_s", type=float, default=0, help="grid runs must end this long after start (0: no limit)")
    p.add_argument("--budget_s", type=float, default=0, help="all runs must end this long after start (0: no limit)")
    p.add_argument("--deadline", type=float, default=0, help="unix time all runs must end by (0: none)")
    p.add_argument("--prior_step_s", type=parse_kv, default=parse_kv("adamw=0.03,sam=0.065,fsam=0.07"),
                   help="prior seconds per optimizer step of one run among its neighbours on a GPU")
    p.add_argument("--prior_overhead_s", type=float, default=None,
                   help="per run: model load, engine set-up, evaluations, save (default 6 worker, 18 process)")
    p.add_argument("--run_timeout_factor", type=float, default=4.0)
    p.add_argument("--min_run_timeout_s", type=float, default=120.0)
    p.add_argument("--worker_start_timeout_s", type=float, default=300.0)
    p.add_argument("--abort_after_failures", type=int, default=6,
                   help="stop when this many runs failed before any succeeded (a broken environment)")
    p.add_argument("--fill_tail", action="store_true",
                   help="while the last planned runs finish, keep the free slots busy with filler runs (stopped "
                        "when the last planned run ends), so every timed run shares its GPU as the others did")
    p.add_argument("--keep_models", action="store_true")
    p.add_argument("--rerun", action="store_true", help="ignore earlier records in --results")
    p.add_argument("--dry_run", action="store_true", help="print the plan and its estimated time only")
    args = p.parse_args()

    if args.smoke:   # only where the command line left the default
        if args.phase == "interval":   # 1 seed, 4 steps: N = 2 and N = 4 take 2 and 1 two-pass steps
            for key, value in {"interval_seeds": [0], "max_steps": 4, "max_seq_length": 32}.items():
                if getattr(args, key) == p.get_default(key):
                    setattr(args, key, value)
        smoke = {"tasks": ["movie_reviews"], "settings": ["full", "500"], "seeds": [0, 1], "rhos": [0.05, 0.1],
                 "sparsities": [0.9], "max_steps": 3, "max_eval_samples": 64, "gpus": 0, "prior_overhead_s": 8.0}
        for key, value in smoke.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.gpus is None:
        args.gpus = detect_gpus()
    if args.prior_overhead_s is None:
        args.prior_overhead_s = 6.0 if args.mode == "worker" else 18.0
    args.assets = os.path.abspath(args.assets)
    args.out_dir = os.path.abspath(args.out_dir)
    args.results = os.path.abspath(args.results or os.path.join(args.out_dir, "results.jsonl"))
    if not os.path.isfile(os.path.join(args.assets, "model", "config.json")):
        sys.exit(f"error: {args.assets} has no model/; run: python experiments/prepare_assets.py --out {args.assets}")
    n_slots = args.gpus * args.procs_per_gpu if args.gpus else args.cpu_slots
    if args.threads_per_run is None:
        args.threads_per_run = max(1, (os.cpu_count() or 1) // n_slots)
    grid, seeds = build_plan(args)
    if args.phase == "interval":
        grid, seeds = [], build_interval_plan(args)
    records = []
    if os.path.isfile(args.results) and not args.rerun:
        with open(args.results) as f:
            records = [json.loads(line) for line in f if line.strip()]
    if args.phase == "grid":
        seeds = []
    elif args.phase == "seeds":
        grid = []
        for task in args.tasks:
            got = choose(records, task)
            print(f"[study] {task}: chosen on validation: " + (", ".join(
                f"{o} rho {r['rho']} sparsity {r['sparsity']} (val acc {r['validation']['accuracy']:.4f})"
                for o, r in sorted(got.items())) or "no grid records; using the defaults"), flush=True)

    estimator = Estimator(args)
    plan = grid + seeds
    est_total = 0.0
    for run in plan:
        r = run if not run.get("needs_choice") else dict(run, rho=args.default_rho, sparsity=args.default_sparsity)
        est_total += estimator.prior(r)
    by_phase = {ph: sum(1 for r in plan if r["phase"] == ph) for ph in ("grid", "seeds", "interval")}
    where = f"{args.gpus} GPU x {args.procs_per_gpu}" if args.gpus else "CPU"
    print(f"[study] plan: {by_phase['grid']} grid + {by_phase['seeds']} seed + {by_phase['interval']} interval "
          f"runs on {n_slots} slots ({where}, "
          f"mode {args.mode}); prior estimate {est_total:.0f} run-seconds = {est_total / n_slots:.0f} s wall "
          f"({args.prior_step_s} s/step, {args.prior_overhead_s} s/run)", flush=True)
    if args.dry_run:
        for run in plan:
            name = run.get("run_id") or f"{run['phase']}-{run['task']}-{run['setting']}-{run['optimizer']}" \
                f"-seed{run['seed']} (rho/sparsity from the grid)"
            print(f"  {name}: {run['n_train']} examples, {run['epochs']} epochs, {run['steps']} steps")
        return

    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    scheduler = Scheduler(args, grid, seeds, records)
    slots = []
    gpu_ids = list(range(args.gpus)) if args.gpus else [None]
    per = args.procs_per_gpu if args.gpus else args.cpu_slots
    for k in range(per):
        for gpu in gpu_ids:
            slots.append(Slot(args, len(slots), gpu))
    def on_signal(signum, _frame):       # workers run in their own sessions: end them explicitly
        print(f"[study] signal {signum}: stopping {len(slots)} slots", flush=True)
        for s in slots:
            s.stop_worker()
            s.kill_child()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threads = [threading.Thread(target=scheduler.slot_loop, args=(s,), daemon=True) for s in slots]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(1.0)
    finally:
        for s in slots:
            s.stop_worker()
    elapsed = time.time() - scheduler.start
    chosen = {task: {o: {"rho": r["rho"], "sparsity": r["sparsity"], "validation": r["validation"],
                         "run_id": r["run_id"]} for o, r in choose(scheduler.records, task).items()}
              for task in args.tasks}
    with open(os.path.join(args.out_dir, "chosen.json"), "w") as f:
        json.dump(chosen, f, indent=2)
    meta = {"args": {k: v for k, v in vars(args).items()}, "elapsed_s": elapsed, "aborted": scheduler.aborted, "slots": [s.name for s in slots],
            "worker_import_s": {s.name: s.import_s for s in slots}, "counts": scheduler.counts,
            "observed_over_prior": scheduler.estimator.ratios, "chosen": chosen}
    with open(os.path.join(args.out_dir, "study_meta.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    print(f"[study] done in {elapsed:.0f} s: {scheduler.counts}; results in {args.results}", flush=True)
    if scheduler.aborted:
        sys.exit(1)


if __name__ == "__main__":
    main()
