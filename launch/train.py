"""Fine-tune a Hugging Face model with FSAM, SAM or AdamW on DeepSpeed (sequence classification, or
causal LM with --task causal_lm). The DeepSpeed JSON is the single source of truth for batch sizes,
precision, ZeRO stage, optimizer, schedule and the "fsam" block; this script only names the file.

  # 2 local ranks (CPU: DS_ACCELERATOR=cpu; GPU: one rank per GPU)
  deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zero2_fsam.json \
      --model_name_or_path MODEL_DIR --train_file train.jsonl --validation_file val.jsonl \
      --output_dir outputs/run1
  torchrun --nproc_per_node 2 launch/train.py ...          # same arguments
  mpirun -np 2 python launch/train.py ...                   # DeepSpeed's MPI discovery (mpi4py)
  sbatch launch/slurm_gpu.sbatch                            # multi-node, see README

Data: JSONL or CSV with `text`,`label` or `sentence1`,`sentence2`,`label` columns (as run_glue.py).
"""
import argparse
import csv
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model_name_or_path", required=True, help="local Hugging Face model directory")
parser.add_argument("--train_file", required=True)
parser.add_argument("--validation_file", required=True)
parser.add_argument("--test_file", default=None, help="evaluated once at the end (never for choices)")
parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (with an \"fsam\" block for FSAM)")
parser.add_argument("--optimizer", choices=["fsam", "sam", "adamw"], default=None,
                    help="override the config: fsam (its fsam block), sam (sparsity 0), adamw (no perturbation)")
parser.add_argument("--task", choices=["classification", "causal_lm"], default="classification")
parser.add_argument("--epochs", type=float, default=1.0)
parser.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
parser.add_argument("--max_train_samples", type=int, default=0, help="use the first N training rows (0: all)")
parser.add_argument("--max_eval_samples", type=int, default=0)
parser.add_argument("--max_seq_length", type=int, default=128)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output_dir", required=True)
parser.add_argument("--eval_before", action="store_true", help="also evaluate before training")
parser.add_argument("--log_every", type=int, default=10)
parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir/checkpoints")
parser.add_argument("--save_every", type=int, default=0, help="checkpoint every N optimizer steps (0: only at the end)")
parser.add_argument("--timeout_minutes", type=float, default=10.0,
                    help="a collective that waits this long (e.g. a dead rank) fails the job")
parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
args = parser.parse_args()


def fail(message):
    """A user error: one clear line on every rank, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# -------------------------------------------------------------------------------- set-up, checks
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import deepspeed  # noqa: E402
import fsam_ds  # noqa: E402
import fsam_ds.engine  # noqa: E402
from fsam_ds.engine import load_config  # noqa: E402

try:
    ds_config = load_config(args.deepspeed_config)
except ValueError as err:
    fail(str(err))
for path, flag in [(args.train_file, "--train_file"), (args.validation_file, "--validation_file"),
                   (args.test_file, "--test_file")]:
    if path is not None and not os.path.isfile(path):
        fail(f"{flag} {path}: no such file")
if not os.path.isfile(os.path.join(args.model_name_or_path, "config.json")):
    fail(f"--model_name_or_path {args.model_name_or_path} is not a Hugging Face model directory "
         "(no config.json); pass a directory saved with save_pretrained()")

# -------------------------------------------------------------------------------- data
def read_rows(path):
    """Rows of a JSONL (.jsonl/.json, one object per line) or CSV/TSV file as dicts."""
    if path.endswith((".jsonl", ".json")):
        rows = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        fail(f"{path} line {lineno} is not valid JSON: {err.msg}")
        return rows
    if path.endswith((".csv", ".tsv")):
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
    fail(f"{path}: unknown data format; use .jsonl or .csv (or .tsv)")


def text_columns(rows, path):
    if not rows:
        fail(f"{path} has no rows")
    columns = set(rows[0])
    need_label = args.task == "classification"
    for cols in (["sentence1", "sentence2"], ["text"]):
        if set(cols) <= columns and (not need_label or "label" in columns):
            return cols
    expected = "`text`,`label` or `sentence1`,`sentence2`,`label`" if need_label else "`text`"
    fail(f"{path} has columns {sorted(columns)}; expected {expected}")


train_rows = read_rows(args.train_file)
columns = text_columns(train_rows, args.train_file)
val_rows = read_rows(args.validation_file)
if text_columns(val_rows, args.validation_file) != columns:
    fail(f"{args.validation_file} uses columns {text_columns(val_rows, args.validation_file)} but "
         f"{args.train_file} uses {columns}")
test_rows = read_rows(args.test_file) if args.test_file else []
if args.max_train_samples:
    train_rows = train_rows[:args.max_train_samples]
if args.max_eval_samples:
    val_rows, test_rows = val_rows[:args.max_eval_samples], test_rows[:args.max_eval_samples]

label_names = []
if args.task == "classification":
    label_names = sorted({str(r["label"]) for r in train_rows})
    for rows, path in [(val_rows, args.validation_file), (test_rows, args.test_file)]:
        unknown = sorted({str(r["label"]) for r in rows} - set(label_names))
        if unknown:
            fail(f"label set mismatch: {path} has labels {unknown} that {args.train_file} lacks "
                 f"(train labels: {label_names})")
    if len(label_names) < 2:
        fail(f"{args.train_file} has a single label {label_names}; classification needs two or more")
label_to_id = {name: i for i, name in enumerate(label_names)}

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

try:
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
except (OSError, ValueError) as err:
    fail(f"--model_name_or_path {args.model_name_or_path}: cannot load a tokenizer ({err})")
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def encode(rows):
    if not rows:
        return []
    texts = [[str(r[c]) for r in rows] for c in columns]
    enc = tokenizer(*texts, truncation=True, max_length=args.max_seq_length)
    labels = [label_to_id[str(r["label"])] for r in rows] if label_names else [0] * len(rows)
    return [(ids, lab) for ids, lab in zip(enc["input_ids"], labels)]


train_set, val_set, test_set = encode(train_rows), encode(val_rows), encode(test_rows)


def collate(examples):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, _) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
    labels = torch.tensor([lab for _, lab in examples])
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


# -------------------------------------------------------------------------------- distributed
on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
from datetime import timedelta  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", auto_mpi_discovery=True,
                           verbose=False, timeout=timedelta(minutes=args.timeout_minutes))
rank, world_size = dist.get_rank(), dist.get_world_size()
master_process = rank == 0
local_rank = int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cpu") if on_cpu else torch.device("cuda", local_rank)
if not on_cpu:
    torch.cuda.set_device(device)
random.seed(args.seed)
torch.manual_seed(args.seed)


def log(message):
    if master_process:
        print(message, flush=True)


# -------------------------------------------------------------------------------- optimizer choice
choice = args.optimizer or ("fsam" if "fsam" in ds_config or str(ds_config.get("optimizer", {}).get("type", "")).lower() == "fsam" else "adamw")
if choice in ("fsam", "sam"):
    if "fsam" not in ds_config and str(ds_config.get("optimizer", {}).get("type", "")).lower() != "fsam":
        fail(f"--optimizer {choice} needs an \"fsam\" block in {args.deepspeed_config}, e.g. "
             '"fsam": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 100}')
    if choice == "sam":
        if "fsam" in ds_config:
            ds_config["fsam"]["sparsity"] = 0.0
        else:
            ds_config["optimizer"]["params"]["sparsity"] = 0.0
else:
    ds_config.pop("fsam", None)
    if str(ds_config.get("optimizer", {}).get("type", "")).lower() == "fsam":
        params = ds_config["optimizer"]["params"]
        ds_config["optimizer"] = {"type": params.get("base_optimizer", "AdamW"),
                                  "params": {k: v for k, v in params.items() if k not in (
                                      "base_optimizer", "rho", "sparsity", "mask_interval", "fisher",
                                      "adaptive", "always_perturb")}}

micro_bs = int(ds_config.get("train_micro_batch_size_per_gpu", 0) or 0)
gas = int(ds_config.get("gradient_accumulation_steps", 1) or 1)
if micro_bs <= 0:
    fail(f"{args.deepspeed_config} must set train_micro_batch_size_per_gpu (> 0)")
ds_config["train_batch_size"] = micro_bs * gas * world_size   # follows the world size we run on
global_bs = micro_bs * gas * world_size
steps_per_epoch = len(train_set) // global_bs
if steps_per_epoch == 0:
    fail(f"{len(train_set)} training examples are fewer than one global batch of {global_bs} "
         f"(micro batch {micro_bs} x accumulation {gas} x {world_size} ranks)")
total_steps = math.ceil(args.epochs * steps_per_epoch)
if args.max_steps:
    total_steps = min(total_steps, args.max_steps)
# a scheduler that needs the run length gets it from the data when the config leaves it out
sched_params = ds_config.get("scheduler", {}).get("params", {})
if ds_config.get("scheduler", {}).get("type") in ("WarmupDecayLR", "WarmupCosineLR") and "total_num_steps" not in sched_params:
    sched_params["total_num_steps"] = total_steps

for monitor_key in ("csv_monitor", "tensorboard"):
    if ds_config.get(monitor_key, {}).get("enabled") and not ds_config[monitor_key].get("output_path"):
        ds_config[monitor_key]["output_path"] = os.path.join(args.output_dir, "monitor")

# -------------------------------------------------------------------------------- model, engine
auto_cls = AutoModelForSequenceClassification if args.task == "classification" else AutoModelForCausalLM
try:
    kwargs = {"num_labels": len(label_names)} if label_names else {}
    # DeepSpeed's bf16/fp16 settings decide the training precision; load the weights in fp32 (a
    # half-precision checkpoint would otherwise train in half precision under transformers 5's
    # dtype="auto" default).
    model = auto_cls.from_pretrained(args.model_name_or_path, dtype=torch.float32, **kwargs)
except (OSError, ValueError) as err:
    fail(f"--model_name_or_path {args.model_name_or_path}: cannot load a {auto_cls.__name__} ({err})")
if label_names:
    model.config.id2label = dict(enumerate(label_names))
    model.config.label2id = label_to_id
decay = [p for n, p in model.named_parameters() if p.requires_grad and not any(k in n.lower() for k in ("bias", "norm"))]
no_decay = [p for n, p in model.named_parameters() if p.requires_grad and any(k in n.lower() for k in ("bias", "norm"))]
groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
try:
    if choice == "adamw":
        engine, _, _, _ = fsam_ds.engine.initialize_base(model=model, config=ds_config, model_parameters=groups)
    else:
        engine, _, _, _ = fsam_ds.initialize(model=model, config=ds_config, model_parameters=groups)
except ValueError as err:
    fail(f"{args.deepspeed_config}: {err}")
fsam = getattr(engine, "_fsam", None)
log(f"[train] {choice} | world {world_size} | ZeRO-{engine.zero_optimization_stage()} | "
    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | {len(train_set)} train / "
    f"{len(val_set)} validation examples | {total_steps} steps of {global_bs}"
    + (f" | fsam {fsam.config.to_dict()}" if fsam else ""))


def forward_loss(engine, batch):
    if args.task == "causal_lm":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    return engine(**batch).loss


@torch.no_grad()
def evaluate(examples):
    """Accuracy and macro-F1 (classification) or loss/perplexity (causal LM) over all ranks. Every
    rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)."""
    engine.eval()
    per_rank = math.ceil(len(examples) / world_size)
    mine = list(range(rank * per_rank, min(len(examples), (rank + 1) * per_rank)))
    n_labels = max(1, len(label_names))
    confusion = torch.zeros(n_labels, n_labels, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    eval_bs = micro_bs * 2
    for start in range(0, per_rank, eval_bs):
        idx = mine[start:start + eval_bs]
        real = len(idx)
        idx = idx + [0] * (min(eval_bs, per_rank - start) - real)   # pad to keep ranks in step
        batch = collate([examples[i] for i in idx])
        if args.task == "causal_lm":
            loss = forward_loss(engine, batch)
            loss_sum += torch.tensor([float(loss) * real, real], dtype=torch.float64, device=device)
            continue
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        pred = logits.argmax(-1)[:real]
        for t, p in zip(batch["labels"][:real].tolist(), pred.tolist()):
            confusion[t, p] += 1
    dist.all_reduce(confusion)
    dist.all_reduce(loss_sum)
    engine.train()
    if args.task == "causal_lm":
        mean = float(loss_sum[0] / max(1.0, float(loss_sum[1])))
        return {"loss": mean, "perplexity": math.exp(min(mean, 50))}
    tp = confusion.diag()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"accuracy": float(tp.sum() / confusion.sum()), "macro_f1": float(f1.mean())}


def monitor(events):
    """Write (tag, value) pairs at the current sample count through DeepSpeed's monitor."""
    if engine.monitor.enabled and master_process:
        engine.monitor.write_events([(tag, value, engine.global_samples) for tag, value in events
                                     if value is not None])


# -------------------------------------------------------------------------------- resume
ckpt_dir = os.path.join(args.output_dir, "checkpoints")
start_step = 0


def save(step):
    """A crash-safe checkpoint: `latest` names it only once every rank has written it. The RNG
    states ride along so that dropout after a resume is the dropout of the uninterrupted run."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and not on_cpu:
        rng["cuda"] = torch.cuda.get_rng_state()
    fsam_ds.checkpoint.save_checkpoint(engine, ckpt_dir, tag=f"step{step}",
                                       client_state={"step": step}, rank_state={"rng": rng})


if args.resume:
    try:
        tag, client_state, rank_state = fsam_ds.checkpoint.load_checkpoint(engine, ckpt_dir)
    except ValueError as err:
        fail(f"--resume: {err}")
    if tag is None:
        log(f"[train] --resume: no checkpoint in {ckpt_dir}; starting from scratch")
    else:
        start_step = int(client_state.get("step", 0))
        rng = (rank_state or {}).get("rng")
        if rng is None:
            log("[train] warning: the checkpoint has no RNG state for this rank (another world "
                "size?); dropout after the resume differs from an uninterrupted run")
        else:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and not on_cpu:
                torch.cuda.set_rng_state(rng["cuda"])
        log(f"[train] resumed from {ckpt_dir}/{tag} at step {start_step}")

# -------------------------------------------------------------------------------- train
metrics = {"optimizer": choice, "world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
           "global_batch_size": global_bs, "steps": total_steps, "labels": label_names,
           "fsam": fsam.config.to_dict() if fsam else None}
if args.eval_before:
    metrics["validation_before"] = evaluate(val_set)
    log(f"[eval] before training: {metrics['validation_before']}")
    monitor([(f"Eval/before_{k}", v) for k, v in metrics["validation_before"].items()])

progress = None
if master_process:
    from tqdm import tqdm
    progress = tqdm(total=total_steps, initial=start_step, desc=choice, dynamic_ncols=True,
                    disable=not sys.stderr.isatty() and os.environ.get("FSAM_PROGRESS") != "1")
started = time.time()
step = start_step
history = []
while step < total_steps:
    epoch = step // steps_per_epoch
    order = list(range(len(train_set)))
    random.Random(args.seed + epoch).shuffle(order)          # the same permutation on every rank
    for batch_index in range(step % steps_per_epoch, steps_per_epoch):
        if step >= total_steps:
            break
        global_idx = order[batch_index * global_bs:(batch_index + 1) * global_bs]
        mine = global_idx[rank * micro_bs * gas:(rank + 1) * micro_bs * gas]
        micro = [collate([train_set[i] for i in mine[j * micro_bs:(j + 1) * micro_bs]]) for j in range(gas)]
        if fsam is not None:
            loss = fsam_ds.train_step(engine, forward_loss, micro)
            stats = fsam.last_stats
        else:
            total = 0.0
            for mb in micro:
                loss_t = forward_loss(engine, mb)
                engine.backward(loss_t)
                engine.step()
                total += float(loss_t)
            loss, stats = total / gas, {}
        step += 1
        events = [("Train/loss", loss), ("Train/lr", engine.get_lr()[0])]
        if fsam is not None:
            events += [("Train/fsam_threshold", stats.get("threshold")),
                       ("Train/fsam_mask_density", stats.get("mask_density")),
                       ("Train/fsam_perturbation_norm", stats.get("perturbation_norm")),
                       ("Train/fsam_grad_norm", stats.get("grad_norm")),
                       ("Train/fsam_sharpness", stats.get("sharpness"))]
        monitor(events)
        history.append({"step": step, **{k.split("/")[-1]: v for k, v in events}})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
        if master_process and (step % args.log_every == 0 or step == total_steps):
            extra = f" sharpness {stats['sharpness']:+.4f} density {stats.get('mask_density', 0):.3f}" if fsam else ""
            print(f"[train] step {step}/{total_steps} loss {loss:.4f} lr {engine.get_lr()[0]:.3g}{extra}", flush=True)
        if args.save_every and step % args.save_every == 0:
            save(step)
    if step < total_steps and (step % steps_per_epoch == 0):
        result = evaluate(val_set)
        log(f"[eval] epoch {epoch + 1}: {result}")
        monitor([(f"Eval/{k}", v) for k, v in result.items()])
        metrics.setdefault("validation_per_epoch", []).append(result)
if progress is not None:
    progress.close()
metrics["train_seconds"] = time.time() - started
metrics["validation"] = evaluate(val_set)
log(f"[eval] after training: {metrics['validation']}")
monitor([(f"Eval/{k}", v) for k, v in metrics["validation"].items()])
if test_set:
    metrics["test"] = evaluate(test_set)
    log(f"[eval] test: {metrics['test']}")
metrics["history"] = history

# -------------------------------------------------------------------------------- save
if args.save_every and step % args.save_every != 0:
    save(step)
model_dir = os.path.join(args.output_dir, "model")
with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=engine.zero_optimization_stage() == 3):
    if master_process:
        os.makedirs(model_dir, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        model.save_pretrained(model_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
if master_process:
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"[train] saved {model_dir} and {args.output_dir}/metrics.json", flush=True)
dist.barrier()
if hasattr(engine, "destroy"):
    engine.destroy()
dist.destroy_process_group()
