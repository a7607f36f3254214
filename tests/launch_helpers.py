"""Shared by the tests that really launch launch/train.py: tiny assets and subprocess helpers."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
import prepare_data  # noqa: E402

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
ENV.pop("LOCAL_SIZE", None)


def make_assets(tmp_path_factory):
    """A tiny BERT classifier with the real MiniLM tokenizer, tiny data, and a tiny ZeRO-2 config."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    root = tmp_path_factory.mktemp("launch")
    tokenizer = AutoTokenizer.from_pretrained(prepare_data.model_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(root / "tiny_bert")
    tokenizer.save_pretrained(root / "tiny_bert")
    rows = prepare_data.movie_reviews()[:160]
    data = root / "data"
    data.mkdir()
    for name, part in [("train", rows[:96]), ("validation", rows[96:128]), ("test", rows[128:])]:
        with open(data / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    ds = json.load(open(os.path.join(REPO, "ds_configs", "default_cpu_zero2_fsam.json")))
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    ds["fsam"]["mask_interval"] = 2
    with open(root / "ds.json", "w") as f:
        json.dump(ds, f)
    return root


def train_args(assets, out, extra=()):
    return ["launch/train.py", "--deepspeed_config", str(assets / "ds.json"),
            "--model_name_or_path", str(assets / "tiny_bert"),
            "--train_file", str(assets / "data" / "train.jsonl"),
            "--validation_file", str(assets / "data" / "validation.jsonl"),
            "--max_steps", "3", "--max_seq_length", "32", "--output_dir", str(out), *extra]


def run(cmd, env=ENV, timeout=600):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    subprocess.run("rm -f /dev/shm/deepspeed_allreduce_buffer_*", shell=True)
    return proc


def check_run(proc, out):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["steps"] == 3 and metrics["world_size"] == 2
    assert metrics["optimizer"] == "fsam" and len(metrics["history"]) == 3
    assert all(h["fsam_mask_density"] is not None for h in metrics["history"])
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.num_labels == 2
    return metrics


