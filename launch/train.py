"""Fine-tune a Hugging Face model with FSAM, SAM or AdamW on DeepSpeed (sequence classification, or
causal LM with --task causal_lm: plain text, prompt/response or chat instruction data). The
DeepSpeed JSON is the single source of truth for batch sizes, precision, ZeRO stage, optimizer,
schedule and the "fsam" block; this script only names the file.

  # 2 local ranks (CPU: DS_ACCELERATOR=cpu; GPU: one rank per GPU)
  deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zero2_fsam.json \
      --model_name_or_path MODEL_DIR --train_file train.jsonl --validation_file val.jsonl \
      --output_dir outputs/run1
  torchrun --nproc_per_node 2 launch/train.py ...          # same arguments
  mpirun -np 2 python launch/train.py ...                   # DeepSpeed's MPI discovery (mpi4py)
  sbatch launch/slurm_gpu.sbatch                            # multi-node, see README
  # a Llama-family model, ZeRO-3 (partitioned loading), chat data, loss on the responses only
  deepspeed --num_gpus 2 launch/train.py --task causal_lm --deepspeed_config ds_configs/zero3_fsam.json \
      --model_name_or_path $(python launch/prepare_data.py --smollm2_dir) \
      --train_file data/mr_chat/train.jsonl --validation_file data/mr_chat/validation.jsonl \
      --output_dir outputs/smollm2 [--lora_r 8] [--gradient_checkpointing] [--packing]

Data: JSONL or CSV. Classification: `text`,`label` or `sentence1`,`sentence2`,`label` columns (as
run_glue.py). Causal LM: `text`, or `prompt`,`response`, or `messages` (chat; see lm_data.py).
"""
import argparse
import csv
import json
import math
import os
import random
import sys
import time

import memtrace  # launch/memtrace.py (the script's directory is on sys.path)

# before torch allocates anything: freed large buffers go back to the kernel (FSAM_MMAP_THRESHOLD)
MMAP_THRESHOLD = memtrace.set_mmap_threshold()
MEMORY = memtrace.PeakSampler().start()   # peak RssAnon, every FSAM_MEM_SAMPLE_MS ms (off by default)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

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
parser.add_argument("--eval_batch_size", type=int, default=0, help="per rank (0: twice the micro batch)")
parser.add_argument("--packing", action="store_true",
                    help="causal LM: pack training examples into blocks of --max_seq_length tokens")
parser.add_argument("--warmup_ratio", type=float, default=0.1,
                    help='warm-up steps = ceil(ratio x total steps) where the config says "auto"')
parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank (peft); 0 trains every weight")
parser.add_argument("--lora_alpha", type=int, default=16)
parser.add_argument("--lora_dropout", type=float, default=0.05)
parser.add_argument("--lora_target_modules", default="all-linear",
                    help='comma-separated module names (e.g. "q_proj,v_proj") or "all-linear"')
parser.add_argument("--gradient_checkpointing", action="store_true", help="activation checkpointing")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output_dir", required=True)
parser.add_argument("--eval_before", action="store_true", help="also evaluate before training")
parser.add_argument("--log_every", type=int, default=10)
parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir/checkpoints")
parser.add_argument("--save_every", type=int, default=-1,
                    help="checkpoint every N optimizer steps and at the end (0: only at the end; -1: never)")
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepspeed  # noqa: E402
import fsam_ds  # noqa: E402
import fsam_ds.engine  # noqa: E402
import lm_data  # noqa: E402
import model_io  # noqa: E402
from fsam_ds.engine import load_config  # noqa: E402

try:
    ds_config = load_config(args.deepspeed_config)
except ValueError as err:
    fail(str(err))
if isinstance(ds_config.get("fsam"), dict):   # a bad "fsam" block fails before the data and the model load
    try:
        fsam_ds.FSAMConfig.from_dict(ds_config["fsam"])
    except ValueError as err:
        fail(f"{args.deepspeed_config}: {err}")
for path, flag in [(args.train_file, "--train_file"), (args.validation_file, "--validation_file"),
                   (args.test_file, "--test_file")]:
    if path is not None and not os.path.isfile(path):
        fail(f"{flag} {path}: no such file")
if not os.path.isfile(os.path.join(args.model_name_or_path, "config.json")):
    fail(f"--model_name_or_path {args.model_name_or_path} is not a Hugging Face model directory "
         "(no config.json); pass a directory saved with save_pretrained()")
if args.packing and args.task != "causal_lm":
    fail("--packing is for --task causal_lm")
if not 0 <= args.warmup_ratio <= 1:
    fail(f"--warmup_ratio {args.warmup_ratio} must be in [0, 1]")


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
    """The text columns (classification) or the row format (causal LM) of a data file."""
    if not rows:
        fail(f"{path} has no rows")
    columns = set(rows[0])
    if args.task == "causal_lm":
        fmt = lm_data.detect_format(rows)
        if fmt is None:
            fail(f"{path} has columns {sorted(columns)}; expected `text`, `prompt`,`response` or `messages`")
        return fmt
    for cols in (["sentence1", "sentence2"], ["text"]):
        if set(cols) <= columns and "label" in columns:
            return cols
    fail(f"{path} has columns {sorted(columns)}; expected `text`,`label` or `sentence1`,`sentence2`,`label`")


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
if columns == "messages" and not tokenizer.chat_template:
    fail(f"{args.train_file} has chat `messages` but the tokenizer of {args.model_name_or_path} has "
         "no chat template; use prompt/response rows or a tokenizer with a template")


def encode(rows, train=False):
    """Classification: (input_ids, class id). Causal LM: (input_ids, labels), labels -100 where
    no loss is taken; packed into full blocks for training with --packing."""
    if not rows:
        return []
    if args.task == "causal_lm":
        try:
            examples = [lm_data.encode_example(tokenizer, r, columns, args.max_seq_length) for r in rows]
        except (ValueError, KeyError, TypeError) as err:
            fail(f"cannot encode the {columns} rows: {err}")
        kept = [e for e in examples if e is not None]
        if len(kept) < len(examples) and os.environ.get("RANK", "0") == "0":
            print(f"[train] warning: {len(examples) - len(kept)} of {len(examples)} rows have no "
                  f"response token within --max_seq_length {args.max_seq_length}; dropped", flush=True)
        return lm_data.pack(kept, args.max_seq_length) if train and args.packing else kept
    texts = [[str(r[c]) for r in rows] for c in columns]
    enc = tokenizer(*texts, truncation=True, max_length=args.max_seq_length)
    return [(ids, label_to_id[str(r["label"])]) for ids, r in zip(enc["input_ids"], rows)]


train_set, val_set, test_set = encode(train_rows, train=True), encode(val_rows), encode(test_rows)


def collate(examples):
    if args.task == "causal_lm":
        return lm_data.collate(examples, tokenizer.pad_token_id, device)
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

# Under mpirun DeepSpeed's MPI discovery sets MASTER_PORT from distributed_port (29500 by default);
# passing the environment's MASTER_PORT lets two mpirun jobs share a host (mpirun -x MASTER_PORT).
deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", auto_mpi_discovery=True,
                           distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
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
                                  "params": {k: v for k, v in params.items() if k != "base_optimizer"
                                             and k not in fsam_ds.FSAMConfig.field_names()}}

# batch sizes: the config's; train_batch_size, when set, fixes the gradient accumulation
micro_bs = int(ds_config.get("train_micro_batch_size_per_gpu", 0) or 0)
if micro_bs <= 0:
    fail(f"{args.deepspeed_config} must set train_micro_batch_size_per_gpu (> 0)")
config_global_bs = ds_config.get("train_batch_size", "auto")
config_gas = ds_config.get("gradient_accumulation_steps", "auto")
if config_global_bs != "auto":
    if int(config_global_bs) % (micro_bs * world_size):
        fail(f"{args.deepspeed_config}: train_batch_size {config_global_bs} is not a multiple of "
             f"micro batch {micro_bs} x {world_size} ranks; change it or leave it out (\"auto\")")
    gas = int(config_global_bs) // (micro_bs * world_size)
    if config_gas != "auto" and int(config_gas) != gas:
        fail(f"{args.deepspeed_config}: train_batch_size {config_global_bs} != micro batch {micro_bs} x "
             f"gradient_accumulation_steps {config_gas} x {world_size} ranks; set two of the three")
else:
    gas = 1 if config_gas == "auto" else int(config_gas)
ds_config["gradient_accumulation_steps"] = gas
global_bs = micro_bs * gas * world_size
ds_config["train_batch_size"] = global_bs      # equal to the config's whenever it set one
steps_per_epoch = len(train_set) // global_bs
if steps_per_epoch == 0:
    fail(f"{len(train_set)} training examples are fewer than one global batch of {global_bs} "
         f"(micro batch {micro_bs} x accumulation {gas} x {world_size} ranks)")
total_steps = math.ceil(args.epochs * steps_per_epoch)
if args.max_steps:
    total_steps = min(total_steps, args.max_steps)
# "auto" in the scheduler block comes from the run length: warm-up is a fraction of the run
sched_params = model_io.fill_auto_schedule(ds_config, total_steps, args.warmup_ratio)
if int(sched_params.get("warmup_num_steps", 0)) >= total_steps > 1:
    log(f"[train] warning: the scheduler warms up for {sched_params['warmup_num_steps']} steps, the "
        f"whole run of {total_steps}; use \"warmup_num_steps\": \"auto\" (--warmup_ratio)")

for monitor_key in ("csv_monitor", "tensorboard"):
    if ds_config.get(monitor_key, {}).get("enabled") and not ds_config[monitor_key].get("output_path"):
        ds_config[monitor_key]["output_path"] = os.path.join(args.output_dir, "monitor")
stage = model_io.zero_stage(ds_config)
if stage == 3:   # the final save gathers one module at a time instead of the whole model
    ds_config["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
# "auto" ZeRO buffer sizes (Hugging Face-style configs) from the model's hidden size, before the model is
# built: zero.Init reads them
try:
    zero_filled = model_io.fill_auto_zero_buffers(ds_config, args.model_name_or_path)
except (OSError, ValueError) as err:
    fail(f"--deepspeed_config {args.deepspeed_config}: {err}")
if zero_filled:
    log(f"[train] ZeRO buffer sizes from the model's hidden size: {zero_filled}")

# -------------------------------------------------------------------------------- model, engine
auto_cls = AutoModelForSequenceClassification if args.task == "classification" else AutoModelForCausalLM
rss_before_load = memtrace.status_mb("VmHWM")
try:
    kwargs = {"num_labels": len(label_names)} if label_names else {}
    # ZeRO-3: built under deepspeed.zero.Init, each rank holds only its partition from the start
    model, hf_ds_config = model_io.load_model(auto_cls, args.model_name_or_path, ds_config, **kwargs)
except (OSError, ValueError) as err:
    fail(f"--model_name_or_path {args.model_name_or_path}: cannot load a {auto_cls.__name__} ({err})")
local_numel, model_numel, largest_local_fraction = model_io.partition_report(model)
load_stats = {"rss_before_load_mb": rss_before_load, "peak_rss_after_load_mb": memtrace.status_mb("VmHWM"),
              "local_numel": local_numel, "model_numel": model_numel,
              "largest_local_fraction": largest_local_fraction}
if label_names:
    model.config.id2label = dict(enumerate(label_names))
    model.config.label2id = label_to_id
    # decoder classifiers find the last real token through the pad id
    model.config.pad_token_id = tokenizer.pad_token_id
if args.gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
if args.lora_r:
    model = model_io.add_lora(model, args.task, args.lora_r, args.lora_alpha, args.lora_dropout,
                              args.lora_target_modules)
trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
decay = [p for n, p in trainable if not any(k in n.lower() for k in ("bias", "norm"))]
no_decay = [p for n, p in trainable if any(k in n.lower() for k in ("bias", "norm"))]
groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
try:
    if choice == "adamw":
        engine, _, _, _ = fsam_ds.engine.initialize_base(model=model, config=ds_config, model_parameters=groups)
    else:
        engine, _, _, _ = fsam_ds.initialize(model=model, config=ds_config, model_parameters=groups)
except ValueError as err:
    fail(f"{args.deepspeed_config}: {err}")
engine.train()   # from_pretrained returns the model in eval mode (dropout off)
fsam = getattr(engine, "_fsam", None)
lora_refresh = model_io.LoRAMaskRefresh(model)
num_params = sum(model_io.numel(p) for p in model.parameters())
num_trainable = sum(model_io.numel(p) for _, p in trainable)
log(f"[train] {choice} | world {world_size} | ZeRO-{engine.zero_optimization_stage()} | "
    f"{num_params / 1e6:.1f}M params ({num_trainable / 1e6:.2f}M trainable) | {len(train_set)} train / "
    f"{len(val_set)} validation examples | {total_steps} steps of {global_bs}"
    + (f" | fsam {fsam.config.to_dict()}" if fsam else ""))
coverage = None
if fsam is not None:
    coverage, warnings_ = model_io.perturb_coverage(engine.module, fsam.config, fsam.config.sparsity)
    log(f"[train] fsam perturbs {100 * coverage['perturbed']:.1f}% of the trainable elements: "
        f"always {100 * coverage['always']:.1f}% (always_perturb), ranked {100 * coverage['ranked']:.1f}% "
        f"of which the top {100 * coverage['kept_of_ranked']:.1f}% by Fisher score"
        + (f"; the tied input/output embedding ({100 * coverage['tied_embedding']:.1f}%) is always perturbed"
           if coverage["tied_embedding"] else ""))
    for line in warnings_[:10]:
        log(f"[train] WARNING: {line}")
    if len(warnings_) > 10:
        log(f"[train] WARNING: ... and {len(warnings_) - 10} more embedding/norm parameters ranked")
log(f"[train] after loading: rank 0 holds {local_numel / 1e6:.2f}M of {model_numel / 1e6:.2f}M elements; "
    f"peak RSS {load_stats['peak_rss_after_load_mb']:.0f} MB")


def forward_loss(engine, batch):
    return engine(**batch).loss


@torch.no_grad()
def evaluate(examples):
    """Accuracy and macro-F1 (classification), or the token-weighted mean loss on the loss tokens
    (the responses of instruction data) and its perplexity (causal LM), over all ranks: sums, not
    means of batch means, so the result does not depend on the eval batch size. Every rank runs
    the same number of forwards (ZeRO-3 gathers parameters collectively)."""
    engine.eval()
    per_rank = math.ceil(len(examples) / world_size)
    mine = list(range(rank * per_rank, min(len(examples), (rank + 1) * per_rank)))
    n_labels = max(1, len(label_names))
    confusion = torch.zeros(n_labels, n_labels, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    eval_bs = args.eval_batch_size or micro_bs * 2
    for start in range(0, per_rank, eval_bs):
        idx = mine[start:start + eval_bs]
        real = len(idx)
        idx = idx + [0] * (min(eval_bs, per_rank - start) - real)   # pad to keep ranks in step
        batch = collate([examples[i] for i in idx])
        if args.task == "causal_lm":
            batch["labels"][real:] = lm_data.IGNORE               # the padding rows count nothing
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, count = lm_data.token_loss_sum(logits, batch["labels"])
            loss_sum += torch.stack([nll.to(device), torch.tensor(float(count), dtype=torch.float64, device=device)])
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
        return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": int(loss_sum[1])}
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
        lora_refresh.pending = False   # the checkpoint's mask already saw lora_A gradients
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
           "global_batch_size": global_bs, "gradient_accumulation_steps": gas, "steps": total_steps,
           "labels": label_names, "data_format": columns if args.task == "causal_lm" else "classification",
           "num_params": num_params, "num_trainable": num_trainable, "scheduler": ds_config.get("scheduler"),
           "fsam": fsam.config.to_dict() if fsam else None, "fsam_coverage": coverage,
           "load": load_stats}
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
        step_started = time.perf_counter()   # the step's wall time: batch, passes, loss gather (no eval)
        global_idx = order[batch_index * global_bs:(batch_index + 1) * global_bs]
        mine = global_idx[rank * micro_bs * gas:(rank + 1) * micro_bs * gas]
        micro = [collate([train_set[i] for i in mine[j * micro_bs:(j + 1) * micro_bs]]) for j in range(gas)]
        training_mode = engine.module.training
        if fsam is not None:
            local_loss = fsam_ds.train_step(engine, forward_loss, micro)
            stats = dict(fsam.last_stats)
            lora_refresh.after_step(fsam)
        else:
            total = 0.0
            for mb in micro:
                loss_t = forward_loss(engine, mb)
                engine.backward(loss_t)
                engine.step()
                total += float(loss_t)
            local_loss, stats = total / gas, {}
        # Train/loss is the mean over all ranks' micro-batches, not rank 0's share
        rank_losses = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world_size)]
        dist.all_gather(rank_losses, torch.tensor([local_loss], dtype=torch.float64, device=device))
        rank_losses = [float(t) for t in rank_losses]
        loss = sum(rank_losses) / world_size
        step += 1
        events = [("Train/loss", loss), ("Train/lr", engine.get_lr()[0])]
        if fsam is not None:
            events += [("Train/fsam_threshold", stats.get("threshold")),
                       ("Train/fsam_mask_density", stats.get("mask_density")),
                       ("Train/fsam_perturbation_norm", stats.get("perturbation_norm")),
                       ("Train/fsam_grad_norm", stats.get("grad_norm")),
                       ("Train/fsam_sharpness", stats.get("sharpness"))]
        monitor(events)
        history.append({"step": step, **{k.split("/")[-1]: v for k, v in events},
                        "rank_losses": rank_losses, "train_mode": training_mode,
                        "skipped": bool(stats.get("skipped", False)),
                        "perturbed": bool(stats.get("perturbed", False)),   # the two-pass step was taken
                        "step_seconds": time.perf_counter() - step_started})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
        if master_process and (step % args.log_every == 0 or step == total_steps):
            extra = ""
            if stats.get("skipped"):
                extra = " (skipped: non-finite gradients)"
            elif fsam is not None:
                extra = (f" sharpness {stats.get('sharpness', float('nan')):+.4f}"
                         f" density {stats.get('mask_density') or 0:.3f}")
            print(f"[train] step {step}/{total_steps} loss {loss:.4f} lr {engine.get_lr()[0]:.3g}{extra}", flush=True)
        if args.save_every > 0 and step % args.save_every == 0:
            save(step)
    if step < total_steps and (step % steps_per_epoch == 0):
        result = evaluate(val_set)
        log(f"[eval] epoch {epoch + 1}: {result}")
        monitor([(f"Eval/{k}", v) for k, v in result.items()])
        metrics.setdefault("validation_per_epoch", []).append(result)
if progress is not None:
    progress.close()
metrics["train_seconds"] = time.time() - started
timed = [h["step_seconds"] for h in history]
metrics["step_seconds_mean"] = sum(timed) / len(timed) if timed else None   # excludes evaluations
metrics["perturbed_steps"] = sum(h["perturbed"] for h in history)
metrics["validation"] = evaluate(val_set)
log(f"[eval] after training: {metrics['validation']}")
monitor([(f"Eval/{k}", v) for k, v in metrics["validation"].items()])
if test_set:
    metrics["test"] = evaluate(test_set)
    log(f"[eval] test: {metrics['test']}")
metrics["history"] = history

# -------------------------------------------------------------------------------- save
if args.save_every == 0 or (args.save_every > 0 and step % args.save_every != 0):
    save(step)   # fp32 weights from it: python CHECKPOINT_DIR/zero_to_fp32.py CHECKPOINT_DIR OUT_DIR
model_dir = os.path.join(args.output_dir, "model")
model_io.save_model(engine, model_dir, tokenizer, stage)
# per rank, in one all-gather: the kernel's peak RSS (VmHWM, also file pages), the sampled peak of
# anonymous memory (-1: FSAM_MEM_SAMPLE_MS unset), glibc's mmap threshold (0: glibc's dynamic
# default) and the loading figures
sampled = MEMORY.stop()
mine = torch.tensor([memtrace.status_mb("VmHWM"), -1.0 if sampled is None else sampled, MMAP_THRESHOLD,
                     load_stats["rss_before_load_mb"], load_stats["peak_rss_after_load_mb"],
                     load_stats["local_numel"]], dtype=torch.float64, device=device)
mems = [torch.zeros_like(mine) for _ in range(world_size)]
dist.all_gather(mems, mine)
metrics["peak_rss_mb_per_rank"] = [float(t[0]) for t in mems]
metrics["memory_per_rank"] = [{"peak_rss_mb": float(t[0]), "peak_rss_anon_mb": None if t[1] < 0 else float(t[1]),
                               "mmap_threshold": int(t[2])} for t in mems]
metrics["load_per_rank"] = [{"rss_before_load_mb": float(t[3]), "peak_rss_after_load_mb": float(t[4]),
                             "local_numel": int(t[5])} for t in mems]
if master_process:
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"[train] saved {model_dir} and {args.output_dir}/metrics.json", flush=True)
dist.barrier()
if hasattr(engine, "destroy"):
    engine.destroy()
dist.destroy_process_group()
