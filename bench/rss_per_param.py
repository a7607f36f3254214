"""Host memory per parameter as a user sees it: each rank's peak RSS while launch/train.py
fine-tunes a random Llama under ZeRO-3 (causal LM, 2 ranks, the deepspeed CLI), minus the same
run on a tiny Llama, divided by the difference in parameters. Fully partitioned fp32 AdamW needs
about (4 param + 8 Adam + 4 gradient) / 2 ranks = 8 B/param, FSAM adds its saved values, mask
and scores (about 12.5 in all).

    python bench/rss_per_param.py --hidden 1024 --layers 15 --out /tmp/rss.json     # 218M
    python bench/rss_per_param.py --hidden 512 --layers 20 --optimizers fsam         # 80M

Each run's peak is train.py's metrics.json "memory_per_rank" (the kernel's VmHWM of each rank:
loading, training, evaluation and the final save). Environment: FSAM_MMAP_THRESHOLD (train.py's
glibc setting; 0 leaves glibc's default) and FSAM_MEM_SAMPLE_MS pass through to the ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))


def llama_config(tokenizer, hidden, layers, intermediate=None, heads=None):
    from transformers import LlamaConfig
    heads = heads or max(2, hidden // 64)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                       intermediate_size=intermediate or int(hidden * 2.75) // 16 * 16,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 4), max_position_embeddings=256,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def make_model(root, name, tokenizer, **shape):
    import torch
    from transformers import LlamaForCausalLM
    path = os.path.join(root, name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tokenizer, **shape))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def write_data(root, rows=64):
    import prepare_data
    reviews = prepare_data.movie_reviews()[:rows + 16]
    paths = []
    for name, part in (("train", reviews[:rows]), ("val", reviews[rows:])):
        path = os.path.join(root, f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": r["text"]}) + "\n" for r in part)
        paths.append(path)
    return paths


def ds_config(root, config_name, micro_batch):
    with open(os.path.join(REPO, "ds_configs", config_name)) as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg.pop("csv_monitor", None)
    path = os.path.join(root, "ds.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def train(model, optimizer, config, data, out, args, port):
    """One launch/train.py run at 2 ranks; its metrics.json."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    cmd = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(port), "launch/train.py",
           "--deepspeed_config", config, "--optimizer", optimizer, "--model_name_or_path", model,
           "--task", "causal_lm", "--train_file", data[0], "--validation_file", data[1],
           "--max_steps", str(args.steps), "--max_seq_length", str(args.seq_len),
           "--max_eval_samples", "8", "--output_dir", out]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    # the deepspeed CLI sets LOCAL_SIZE, so DeepSpeed leaves a shared-memory buffer per rank: ours only
    for name in (set(os.listdir("/dev/shm")) - shm_before) if os.path.isdir("/dev/shm") else ():
        if name.startswith("deepspeed_allreduce_buffer"):
            os.remove(os.path.join("/dev/shm", name))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--optimizers", default="adamw,fsam")
    parser.add_argument("--config", default="zero3_fsam.json", help="a shipped ZeRO-3 config")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--micro_batch", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--port", type=int, default=29571)
    parser.add_argument("--workdir", default=None, help="keep models and runs here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="JSON result")
    args = parser.parse_args()

    import prepare_data
    from transformers import AutoTokenizer
    root = args.workdir or tempfile.mkdtemp(prefix="rss_per_param_")
    os.makedirs(root, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(prepare_data.smollm2_dir())
    tiny, tiny_n = make_model(root, "tiny", tokenizer, hidden=16, layers=2, intermediate=32, heads=2)
    big, big_n = make_model(root, "big", tokenizer, hidden=args.hidden, layers=args.layers)
    data = write_data(root)
    config = ds_config(root, args.config, args.micro_batch)
    result = {"hidden": args.hidden, "layers": args.layers, "num_params": big_n, "tiny_params": tiny_n,
              "ranks": args.ranks, "steps": args.steps, "config": args.config, "runs": {}}
    port = args.port
    for optimizer in args.optimizers.split(","):
        runs = {}
        for name, model in (("tiny", tiny), ("big", big)):
            runs[name] = train(model, optimizer, config, data, os.path.join(root, f"{optimizer}_{name}"), args, port)
            port += 1
        peaks = {name: [m["peak_rss_mb"] for m in r["memory_per_rank"]] for name, r in runs.items()}
        per_param = [(b - t) * 2**20 / (big_n - tiny_n) for b, t in zip(peaks["big"], peaks["tiny"])]
        result["runs"][optimizer] = {"peak_rss_mb": peaks, "bytes_per_param": per_param,
                                     "memory_per_rank": runs["big"]["memory_per_rank"]}
        print(f"{optimizer}: {big_n / 1e6:.1f}M params, peak RSS per rank {peaks['big']} MB (tiny "
              f"{peaks['tiny']} MB): {', '.join(f'{v:.2f}' for v in per_param)} B/param", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
