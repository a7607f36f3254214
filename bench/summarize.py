"""Collect the benchmark JSON files under a folder into markdown tables and one combined JSON.

    python bench/summarize.py RESULTS_DIR [--markdown summary.md] [--combined all_results.json]

Each result file carries its own table header and row(s) ("markdown"); files of one benchmark
with the same header are put in one table, with the device and date they were measured on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import benchlib


def load_results(folder: str) -> list:
    results = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if not name.endswith(".json") or name.startswith("all_results"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path) as f:
                    result = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                print(f"[summarize] skipped {path}: {err}", file=sys.stderr)
                continue
            if isinstance(result, dict) and "benchmark" in result:
                result["file"] = os.path.relpath(path, folder)
                results.append(result)
    return results


def tables(results: list) -> str:
    groups = {}
    for r in results:
        md = r.get("markdown")
        if not md:   # a run that stopped before its summary (the JSON keeps finished parts)
            groups.setdefault((r["benchmark"] + " (incomplete)", ("file",)), []).append([r["file"]])
            continue
        env = r.get("environment", {})
        where = f"{env.get('device', '?')}, {env.get('date_utc', '?')[:10]}"
        rows = md.get("rows") or [md["row"]]
        groups.setdefault((r["benchmark"], tuple(md["header"]) + ("measured on", "file")), []).extend(
            list(row) + [where, r["file"]] for row in rows)
    parts = []
    for (benchmark, header), rows in groups.items():
        parts.append(f"## {benchmark}\n\n" + benchlib.markdown_table(header, rows))
    return "\n\n".join(parts) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--markdown", help="also write the tables here")
    p.add_argument("--combined", help="write every result into this one JSON file")
    args = p.parse_args()
    results = load_results(args.folder)
    text = tables(results) if results else "no results found\n"
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.combined:
        with open(args.combined, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
