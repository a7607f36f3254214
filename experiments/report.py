"""RESULTS.md (and two PNG plots) from the results JSONL that experiments/study.py writes.

  python experiments/report.py --results outputs/study/results.jsonl            # -> experiments/RESULTS.md
  python experiments/report.py --results $OUT/results.jsonl --out $OUT/RESULTS.md --plots_dir $OUT/plots
  python experiments/report.py --results R.jsonl --section interval --out INTERVAL.md \
      [--reference experiments/study_2026-11-28/results.jsonl] [--insert_into RESULTS.md]

Sections: run status; the grid (validation only) and the chosen hyper-parameters; test accuracy and
macro-F1, mean +- sample std over seeds, per task, setting and optimizer; paired differences
FSAM-SAM, SAM-AdamW and FSAM-AdamW over seeds (same seed = same classifier-head init, data order and
dropout) with a two-sided paired t-test and an exact sign test (Holm-adjusted t-test p over the
cells of each comparison); cost per optimizer (wall seconds per run, train ms per step); the
interval-mode section (study.py --phase interval: FSAM with "sam_interval" N next to AdamW and SAM,
test accuracy with its cost per step), alone with --section interval. Plots:
plots/seed_spread.png (test accuracy of every seed) and plots/loss_curves.png (training loss of one
seed per optimizer). scipy is used when importable; otherwise the t distribution comes from the
regularised incomplete beta function below (checked against scipy).
"""
import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study import choose  # noqa: E402  - the same choice rule as the scheduler

OPT_ORDER = ("adamw", "sam", "fsam")
OPT_LABEL = {"adamw": "AdamW", "sam": "SAM", "fsam": "FSAM"}
SETTING_ORDER = ("full", "1000", "500")
TASK_ORDER = ("movie_reviews", "sms_spam", "bbc_news")
COMPARISONS = (("fsam", "sam"), ("sam", "adamw"), ("fsam", "adamw"))


# ------------------------------------------------------------------------------------------ statistics
def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a, b, x):
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    try:
        from scipy import stats
        return float(2 * stats.t.sf(abs(t), df))
    except ImportError:
        return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t(diffs):
    """(t, two-sided p) of the paired t-test on the differences; None when undefined."""
    n = len(diffs)
    if n < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:
        return (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return t, t_two_sided_p(t, n - 1)


def sign_test(diffs):
    """(wins, losses, ties, exact two-sided p); ties are dropped."""
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n, k = wins + losses, min(wins, losses)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return wins, losses, len(diffs) - n, p


def holm(pvalues):
    """Holm-Bonferroni adjusted p-values (None stays None)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out, running = [None] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * pvalues[i]))
        out[i] = running
    return out


# ------------------------------------------------------------------------------------------ helpers
def mean_std(xs):
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * statistics.fmean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def fmt_p(p):
    return "n/a" if p is None else ("<0.001" if p < 1e-3 else f"{p:.3f}")


def ordered(values, order):
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), v))


def hp(rec):
    if rec["optimizer"] == "adamw":
        return f"lr {rec['lr']:g}"
    if rec["optimizer"] == "sam":
        return f"rho {rec['rho']:g}"
    return f"rho {rec['rho']:g}, sparsity {rec['sparsity']:g}"


def load(path):
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    latest = {}
    for r in records:   # a resumed study may record a run twice: keep "ok", else the last
        key = r.get("run_id")
        if key not in latest or r.get("status") == "ok" or latest[key].get("status") != "ok":
            latest[key] = r
    return list(latest.values())


# ------------------------------------------------------------------------------------------ plots
OPT_COLOR = {"adamw": "tab:gray", "sam": "tab:blue", "fsam": "tab:red"}


def _task_by_setting_grid(tasks, settings, panel_width):
    """A figure with one panel per (task, setting); matplotlib is imported only when plotting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(tasks), len(settings), squeeze=False,
                             figsize=(panel_width * len(settings), 2.6 * len(tasks)))
    return plt, fig, axes


def plot_seed_spread(seeds, tasks, settings, path):
    plt, fig, axes = _task_by_setting_grid(tasks, settings, panel_width=3.2)
    for i, task in enumerate(tasks):
        for j, setting in enumerate(settings):
            ax = axes[i][j]
            for x, opt in enumerate(OPT_ORDER):
                accs = [100 * r["test"]["accuracy"] for r in seeds.get((task, setting, opt), [])]
                if not accs:
                    continue
                jitter = [x + 0.08 * (k - (len(accs) - 1) / 2) for k in range(len(accs))]
                ax.scatter(jitter, accs, s=14, color=OPT_COLOR[opt], alpha=0.8)
                m = statistics.fmean(accs)
                s = statistics.stdev(accs) if len(accs) > 1 else 0.0
                ax.errorbar([x + 0.3], [m], yerr=[s], fmt="_", color="black", capsize=3, markersize=10)
            ax.set_xticks(range(len(OPT_ORDER)), [OPT_LABEL[o] for o in OPT_ORDER])
            ax.set_title(f"{task} / {setting}", fontsize=9)
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Test accuracy per seed (dots) and mean ± std (bars)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curves(seeds, tasks, settings, path):
    plt, fig, axes = _task_by_setting_grid(tasks, settings, panel_width=3.4)
    for i, task in enumerate(tasks):
        for j, setting in enumerate(settings):
            ax = axes[i][j]
            for opt in OPT_ORDER:
                runs = sorted(seeds.get((task, setting, opt), []), key=lambda r: r["seed"])
                if not runs or not runs[0].get("loss"):
                    continue
                loss = [x for x in runs[0]["loss"] if x is not None]
                w = max(1, len(loss) // 20)
                smooth = [statistics.fmean(loss[max(0, k - w + 1):k + 1]) for k in range(len(loss))]
                ax.plot(range(1, len(loss) + 1), smooth, color=OPT_COLOR[opt], lw=1.2,
                        label=f"{OPT_LABEL[opt]} (seed {runs[0]['seed']})")
            ax.set_title(f"{task} / {setting}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if j == 0:
                ax.set_ylabel("train loss (first pass)")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Training loss (moving mean over 5% of the run), one seed per optimizer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ interval mode
def variant_key(rec):
    """("adamw", None) | ("sam", None) | ("fsam", N)."""
    return rec["optimizer"], (rec.get("sam_interval") or 1) if rec["optimizer"] == "fsam" else None


def variant_label(key):
    opt, n = key
    return OPT_LABEL[opt] if n is None else f"FSAM N={n}"


def concurrency(rec, all_records):
    """Mean number of runs (this one included) that were running during this run's wall interval,
    from the scheduler's start times and wall seconds: the sharing each timing was measured under."""
    start, wall = rec.get("started_at"), rec.get("wall_seconds")
    if start is None or not wall:
        return None
    end, overlap = start + wall, 0.0
    for other in all_records:
        s0, w0 = other.get("started_at"), other.get("wall_seconds")
        if s0 is None or not w0 or other.get("gpu") != rec.get("gpu"):
            continue
        overlap += max(0.0, min(end, s0 + w0) - max(start, s0))
    return overlap / wall


def _pp(x):
    return f"{100 * x:+.2f}"


def _diff_cell(diffs):
    """Mean ± sd of paired differences in pp, and the paired t-test p."""
    if not diffs:
        return "n/a", None
    t = paired_t(diffs)
    cell = f"{100 * statistics.fmean(diffs):+.2f}" + (f" ± {100 * statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "")
    return cell, (t[1] if t else None)


def _paired(a_runs, b_runs, metric="test"):
    A = {r["seed"]: r[metric]["accuracy"] for r in a_runs}
    B = {r["seed"]: r[metric]["accuracy"] for r in b_runs}
    return [A[s] - B[s] for s in sorted(set(A) & set(B))]


def _verdict(diffs, what):
    """One clause on a paired difference: its size and whether 3-ish seeds separate it from 0."""
    if not diffs:
        return f"{what}: no paired seeds"
    mean = 100 * statistics.fmean(diffs)
    t = paired_t(diffs)
    p = t[1] if t else None
    wins, losses, ties = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), sum(d == 0 for d in diffs)
    seeds = f"{wins} of {len(diffs)} seed{'s' if len(diffs) != 1 else ''} higher, {losses} lower" + (f", {ties} equal" if ties else "")
    if p is not None and p < 0.05:
        return f"{what} {mean:+.2f} pp ({seeds}; paired t p = {fmt_p(p)}, a difference at this seed count)"
    return (f"{what} {mean:+.2f} pp ({seeds}; paired t p = {fmt_p(p)}: not distinguishable from 0 with "
            f"{len(diffs)} seed{'s' if len(diffs) != 1 else ''})")


def plot_interval(cells, settings, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(settings), squeeze=False, figsize=(4.2 * len(settings), 3.4))
    colors = {"adamw": "tab:gray", "sam": "tab:blue", "fsam": "tab:red"}
    for j, setting in enumerate(settings):
        ax = axes[0][j]
        base = cells.get((setting, ("adamw", None)))
        base_step = statistics.fmean(r["step_seconds_mean"] for r in base) if base else None
        for key, runs in sorted(((k[1], v) for k, v in cells.items() if k[0] == setting),
                                key=lambda kv: (OPT_ORDER.index(kv[0][0]), kv[0][1] or 0)):
            steps = [r["step_seconds_mean"] for r in runs if r.get("step_seconds_mean")]
            if not steps:
                continue
            x = statistics.fmean(steps) / base_step if base_step else statistics.fmean(steps)
            accs = [100 * r["test"]["accuracy"] for r in runs]
            ax.scatter([x] * len(accs), accs, s=12, alpha=0.5, color=colors[key[0]])
            ax.errorbar([x], [statistics.fmean(accs)], yerr=[statistics.stdev(accs) if len(accs) > 1 else 0],
                        fmt="o", color=colors[key[0]], capsize=3, markersize=5)
            ax.annotate(variant_label(key), (x, statistics.fmean(accs)), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
        ax.set_xlabel("mean step time / AdamW's" if base_step else "mean step time (s)", fontsize=8)
        ax.set_title(f"{setting}", fontsize=9)
        if j == 0:
            ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Interval mode: test accuracy (seeds and mean ± std) against the cost per step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def interval_section(records, meta=None, reference=None, plots_dir=None, out_dir="."):
    """The "Interval mode" section (markdown lines) from the interval-phase records; [] when none."""
    runs_all = [r for r in records if r.get("phase") == "interval"]
    if not runs_all:
        return []
    n_fill = sum(1 for r in records if r.get("phase") == "filler" and r.get("started_at"))
    ok = [r for r in runs_all if r.get("status") == "ok"]
    tasks = ordered({r["task"] for r in runs_all}, TASK_ORDER)
    settings = ordered({r["setting"] for r in runs_all}, SETTING_ORDER)
    variants = sorted({variant_key(r) for r in runs_all}, key=lambda k: (OPT_ORDER.index(k[0]), k[1] or 0))
    L = ["## Interval mode: cost and accuracy side by side", ""]
    status = defaultdict(int)
    for r in runs_all:
        status[r.get("status")] += 1
    a = (meta or {}).get("args", {})
    fsam_hp = next((r for r in ok if r["optimizer"] == "fsam"), None)
    sam_hp = next((r for r in ok if r["optimizer"] == "sam"), None)
    any_run = ok[0] if ok else runs_all[0]
    L.append(
        f"`study.py --phase interval`: {', '.join(tasks)}, all-MiniLM-L6-v2, AdamW, SAM"
        + (f" (rho {sam_hp['rho']:g}, sparsity 0)" if sam_hp else "")
        + " and FSAM" + (f" (rho {fsam_hp['rho']:g}, sparsity {fsam_hp['sparsity']:g}, mask_interval "
                         f"{', '.join(sorted({str(r['mask_interval']) for r in ok if r['optimizer'] == 'fsam'}))})"
                         if fsam_hp else "")
        + " with `\"sam_interval\": N`: the two-pass FSAM step on every N-th optimizer step, one plain AdamW "
        f"step otherwise (N=1 is plain FSAM). lr {any_run['lr']:g}, batch {any_run['batch_size']}, "
        "the 150-target-steps rule and the earlier study's hyper-parameters for movie_reviews. "
        f"Runs: {status['ok']} ok" + "".join(f", {v} {k}" for k, v in sorted(status.items()) if k != "ok") + "."
        + (f" {n_fill} filler run(s) (copies under other seeds, not results) kept the free slots busy while the "
           "last runs finished, and were stopped when the last one ended." if n_fill else "")
        + (f" Measured on {a.get('gpus')} GPU with {a.get('procs_per_gpu')} runs sharing it "
           f"(mode {a.get('mode')}, {a.get('precision')}, ZeRO-{a.get('zero_stage')}); study wall "
           f"{meta.get('elapsed_s', 0):.0f} s." if meta and a.get("gpus") else
           (" Measured on the CPU (a smoke run: the numbers say nothing about the method)." if meta else "")))
    L += ["", "Test and validation accuracy in %, mean ± sample std over seeds. Δ: paired by seed, in "
          "percentage points (p: two-sided paired t-test). Step time: train.py's wall seconds per optimizer "
          "step (batch, forward/backward passes, optimizer step, loss gather; evaluations excluded), averaged "
          "over the run and then over seeds; × AdamW divides by AdamW's mean step time in the same study and "
          "setting. Perturbed: two-pass steps / all steps. Sharing: mean number of runs on the same GPU "
          "during the run (itself included), the load each timing was measured under.", ""]
    cells = defaultdict(list)
    for r in ok:
        cells[(r["task"], r["setting"], variant_key(r))].append(r)
    summary = {}
    L += ["| task | setting | n train | variant | seeds | test acc | val acc | Δ test vs AdamW | Δ test vs FSAM N=1 "
          "| step ms | × AdamW | perturbed | sharing |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for setting in settings:
            base = cells.get((task, setting, ("adamw", None)), [])
            fsam1 = cells.get((task, setting, ("fsam", 1)), [])
            base_step = statistics.fmean(r["step_seconds_mean"] for r in base) if base else None
            for key in variants:
                runs = sorted(cells.get((task, setting, key), []), key=lambda r: r["seed"])
                if not runs:
                    L.append(f"| {task} | {setting} | | {variant_label(key)} | 0 | n/a | n/a | | | | | | |")
                    continue
                steps = [r["step_seconds_mean"] for r in runs if r.get("step_seconds_mean") is not None]
                step = statistics.fmean(steps) if steps else None
                ratio = step / base_step if step and base_step else None
                frac = statistics.fmean((r.get("perturbed_steps") or 0) / max(1, r.get("steps_done") or r["steps"])
                                        for r in runs)
                share = [c for c in (concurrency(r, records) for r in runs) if c is not None]
                d_base = _paired(runs, base) if key != ("adamw", None) else []
                d_f1 = _paired(runs, fsam1) if key != ("fsam", 1) else []
                c_base, p_base = _diff_cell(d_base)
                c_f1, p_f1 = _diff_cell(d_f1)
                summary[(task, setting, key)] = {"runs": runs, "step": step, "ratio": ratio, "frac": frac,
                                                 "d_base": d_base, "d_f1": d_f1, "share": share}
                L.append(f"| {task} | {setting} | {runs[0]['n_train']} | {variant_label(key)} | {len(runs)} | "
                         f"{mean_std([r['test']['accuracy'] for r in runs])} | "
                         f"{mean_std([r['validation']['accuracy'] for r in runs])} | "
                         + (f"{c_base} (p {fmt_p(p_base)})" if d_base else "") + " | "
                         + (f"{c_f1} (p {fmt_p(p_f1)})" if d_f1 else "") + " | "
                         + (f"{1000 * step:.1f}" if step else "n/a") + " | "
                         + (f"{ratio:.2f}" if ratio else "n/a") + f" | {100 * frac:.0f}% | "
                         + (f"{statistics.fmean(share):.1f}" if share else "n/a") + " |")
    L.append("")

    # -- the reading: sentences built from the numbers above, nothing decided in advance
    L += ["**Reading.** " + interval_reading(summary, tasks, settings, variants), ""]

    if reference:
        L += reference_check(cells, reference, tasks, settings)
    if plots_dir and ok:
        path = os.path.join(plots_dir, "interval_tradeoff.png")
        try:
            os.makedirs(plots_dir, exist_ok=True)
            plot_interval({(k[1], k[2]): v for k, v in cells.items() if k[0] == tasks[0]}, settings, path)
            L += [f"![interval mode: accuracy against cost]({os.path.relpath(path, out_dir)})", ""]
        except Exception as err:  # noqa: BLE001 - a plot must not cost the section
            L += [f"(plot skipped: {type(err).__name__}: {err})", ""]
    return L


def interval_reading(summary, tasks, settings, variants):
    """One paragraph that states what the interval table says: per setting, the cost of each N
    against AdamW and against the 1 + (r1 - 1)/N that plain steps at AdamW's cost would give, and
    each N's test accuracy against N=1 and AdamW with the paired evidence; then what that amounts to."""
    parts = []
    intervals = sorted(n for opt, n in variants if opt == "fsam" and n and n > 1)
    seed_counts = set()
    for task in tasks:
        for setting in settings:
            one = summary.get((task, setting, ("fsam", 1)))
            base = summary.get((task, setting, ("adamw", None)))
            sam = summary.get((task, setting, ("sam", None)))
            if not one or not base:
                parts.append(f"{task}/{setting}: AdamW or FSAM N=1 has no finished runs, so no comparison.")
                continue
            seed_counts.update(len(v["runs"]) for k, v in summary.items() if k[:2] == (task, setting))
            acc = lambda v: 100 * statistics.fmean(r["test"]["accuracy"] for r in v["runs"])  # noqa: E731
            sd1 = 100 * statistics.stdev([r["test"]["accuracy"] for r in one["runs"]]) if len(one["runs"]) > 1 else None
            s = [f"*{task} / {setting}* (test acc: AdamW {acc(base):.2f}"
                 + (f", SAM {acc(sam):.2f}" if sam else "") + f", FSAM N=1 {acc(one):.2f}"
                 + (f" ± {sd1:.2f}" if sd1 is not None else "") + "):"]
            r1 = one["ratio"]
            cost = []
            if r1:
                cost.append(f"FSAM N=1 costs {r1:.2f}× AdamW per step")
            if sam and sam["ratio"]:
                cost.append(f"SAM {sam['ratio']:.2f}×")
            for n in intervals:
                v = summary.get((task, setting, ("fsam", n)))
                if not v:
                    cost.append(f"N={n} has no finished runs")
                    continue
                if v["ratio"] and r1:
                    expected = 1 + (r1 - 1) / n
                    saved = (r1 - v["ratio"]) / (r1 - 1) if r1 > 1 else None
                    cost.append(f"N={n} {v['ratio']:.2f}× ({100 * v['frac']:.0f}% of steps perturbed; "
                                f"{expected:.2f}× if its plain steps cost what AdamW's do"
                                + (f"; it removes {100 * saved:.0f}% of N=1's extra cost over AdamW" if saved is not None else "")
                                + ")")
            s.append("; ".join(cost) + ".")
            acc_parts = []
            for n in intervals:
                v = summary.get((task, setting, ("fsam", n)))
                if not v:
                    continue
                acc_parts.append(f"N={n} reaches {acc(v):.2f}: " + _verdict(v["d_f1"], "vs N=1") + "; "
                                 + _verdict(v["d_base"], "vs AdamW"))
            if sam:
                acc_parts.append("FSAM N=1 " + _verdict(one["d_base"], "vs AdamW") + "; SAM " + _verdict(sam["d_base"], "vs AdamW"))
            s.append(" ".join(p + "." for p in acc_parts))
            parts.append(" ".join(s))
    # what it amounts to, from the same numbers: does an N keep N=1's accuracy (no paired difference
    # at p < 0.05 and a mean within N=1's seed std) while costing less?
    verdicts = []
    for n in intervals:
        kept, cheaper, cells_n = 0, 0, 0
        for task in tasks:
            for setting in settings:
                one = summary.get((task, setting, ("fsam", 1)))
                v = summary.get((task, setting, ("fsam", n)))
                if not one or not v or not v["d_f1"]:
                    continue
                cells_n += 1
                t = paired_t(v["d_f1"])
                sd1 = statistics.stdev([r["test"]["accuracy"] for r in one["runs"]]) if len(one["runs"]) > 1 else 0.0
                if (t is None or t[1] >= 0.05) and abs(statistics.fmean(v["d_f1"])) <= sd1:
                    kept += 1
                if v["ratio"] and one["ratio"] and v["ratio"] < one["ratio"]:
                    cheaper += 1
        if cells_n:
            verdicts.append(f"N={n} is cheaper per step than N=1 in {cheaper} of {cells_n} settings and its test "
                            f"accuracy stays within N=1's seed spread (no paired difference at p < 0.05, mean Δ no "
                            f"larger than N=1's seed std) in {kept} of {cells_n}")
    if verdicts:
        n_seeds = ", ".join(str(k) for k in sorted(seed_counts)) or "?"
        parts.append("Taken together: " + "; ".join(verdicts) + f". With {n_seeds} seed(s) per cell only differences "
                     "of roughly a seed standard deviation or more can show up at all; a difference not detected "
                     "here is not shown to be absent.")
    return " ".join(parts)


def reference_check(cells, reference, tasks, settings):
    """The runs that repeat cells of an earlier study (its seeds phase: AdamW, SAM, FSAM at the same
    seeds and hyper-parameters; FSAM N=1 is its FSAM): test accuracy then and now, and how many
    seeds reproduced it exactly."""
    ref = defaultdict(dict)
    for r in reference:
        if r.get("phase") == "seeds" and r.get("status") == "ok":
            ref[(r["task"], r["setting"], r["optimizer"], r.get("rho"), r.get("sparsity"))][r["seed"]] = r
    rows = []
    for task in tasks:
        for setting in settings:
            for key in (("adamw", None), ("sam", None), ("fsam", 1)):
                runs = cells.get((task, setting, key), [])
                if not runs:
                    continue
                old = ref.get((task, setting, key[0], runs[0].get("rho"), runs[0].get("sparsity")), {})
                pairs = [(r, old[r["seed"]]) for r in runs if r["seed"] in old]
                # only a run of the same length repeats the cell (a smoke run's few steps do not)
                pairs = [(r, o) for r, o in pairs if (r.get("steps_done") or r["steps"]) == (o.get("steps_done") or o["steps"])
                         and r.get("n_train") == o.get("n_train")]
                if not pairs:
                    continue
                same = sum(abs(a["test"]["accuracy"] - b["test"]["accuracy"]) < 1e-12 for a, b in pairs)
                d = [a["test"]["accuracy"] - b["test"]["accuracy"] for a, b in pairs]
                rows.append(f"| {task} | {setting} | {variant_label(key)} | {len(pairs)} | "
                            f"{mean_std([b['test']['accuracy'] for _, b in pairs])} | "
                            f"{mean_std([a['test']['accuracy'] for a, _ in pairs])} | {_diff_cell(d)[0]} | {same} |")
    if not rows:
        return []
    return ["Repeat check: these cells were also run by the earlier study (seeds phase, same seeds and "
            "hyper-parameters, 4 GPUs with 4 runs each). Test accuracy then and now over the common seeds:", "",
            "| task | setting | variant | seeds | then | now | Δ now − then (pp) | identical seeds |",
            "|---|---|---|---|---|---|---|---|"] + rows + [""]


def insert_section(path, section_lines):
    """Put the section into an existing RESULTS.md: replace an earlier "## Interval mode" section
    (up to the next "## " heading), else insert it before "## Notes", else append it."""
    with open(path) as f:
        lines = f.read().split("\n")
    heading = section_lines[0]
    start = next((i for i, line in enumerate(lines) if line.startswith("## Interval mode")), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section_lines
    else:
        at = next((i for i, line in enumerate(lines) if line.strip() == "## Notes"), len(lines))
        lines[at:at] = section_lines
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return heading


# ------------------------------------------------------------------------------------------ report
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    parser.add_argument("--plots_dir", default=None, help="default: plots/ next to --out")
    parser.add_argument("--meta", default=None, help="study_meta.json (default: next to --results, if any)")
    parser.add_argument("--title", default="Does FSAM generalize better? AdamW vs SAM vs FSAM on all-MiniLM-L6-v2")
    parser.add_argument("--section", choices=["all", "interval"], default="all",
                        help="interval: write only the interval-mode section to --out")
    parser.add_argument("--reference", default=None,
                        help="an earlier study's results JSONL: the interval section compares the cells both ran")
    parser.add_argument("--insert_into", default=None,
                        help="also put the interval section into this RESULTS.md (replacing an earlier one)")
    args = parser.parse_args()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    plots_dir = args.plots_dir or os.path.join(out_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    meta_path = args.meta or os.path.join(os.path.dirname(os.path.abspath(args.results)), "study_meta.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else None

    all_records = load(args.results)
    reference = load(args.reference) if args.reference else None
    section = interval_section(all_records, meta, reference, plots_dir,
                               os.path.dirname(os.path.abspath(args.insert_into or args.out)))
    if args.insert_into:
        if not section:
            sys.exit(f"error: {args.results} has no interval-phase records to insert")
        insert_section(args.insert_into, section)
        print(f"[report] put the interval section into {args.insert_into}")
    if args.section == "interval":
        if not section:
            sys.exit(f"error: {args.results} has no interval-phase records (study.py --phase interval)")
        with open(args.out, "w") as f:
            f.write("\n".join(section))
        print(f"[report] wrote {args.out}")
        return
    records = [r for r in all_records if r.get("phase") in ("grid", "seeds")]   # the sections below
    ok = [r for r in records if r.get("status") == "ok"]
    grid = [r for r in ok if r["phase"] == "grid"]
    seed_runs = [r for r in ok if r["phase"] == "seeds"]
    tasks = ordered({r["task"] for r in records}, TASK_ORDER)
    settings = ordered({r["setting"] for r in seed_runs} or {"full"}, SETTING_ORDER)
    seeds = defaultdict(list)
    for r in seed_runs:
        seeds[(r["task"], r["setting"], r["optimizer"])].append(r)

    L = [f"# {args.title}", ""]
    L.append("Generated by `experiments/report.py` from `" + os.path.basename(args.results) + "`. Accuracy and "
             "macro-F1 in %, mean ± sample std over seeds. Hyper-parameters were chosen on the validation split "
             "(grid phase); the test split was evaluated once per run and never used for a choice.")
    L.append("")

    # -- status
    L += ["## Runs", "", "| phase | ok | failed | timeout | skipped (budget) |", "|---|---|---|---|---|"]
    for phase in ("grid", "seeds"):
        c = defaultdict(int)
        for r in records:
            if r.get("phase") == phase:
                c[r.get("status")] += 1
        L.append(f"| {phase} | {c['ok']} | {c['failed']} | {c['timeout']} | {c['skipped_budget']} |")
    dtypes = sorted({str(r.get("param_dtype")) for r in ok})
    L.append("")
    L.append(f"Parameter dtype during training (checked in each worker run): {', '.join(dtypes)}.")
    if meta:
        a = meta.get("args", {})
        L.append(f"Study wall time {meta.get('elapsed_s', 0):.0f} s on {len(meta.get('slots', []))} slots "
                 f"({a.get('gpus')} GPU x {a.get('procs_per_gpu')} processes, mode {a.get('mode')}, "
                 f"ZeRO-{a.get('zero_stage')}, {a.get('precision')}, batch {a.get('batch_size')}, "
                 f"max_seq_length {a.get('max_seq_length')}, lr {a.get('lr')}).")
    bad = [r for r in records if r.get("status") not in ("ok", None)]
    if bad:
        L.append("")
        L.append("Not finished: " + "; ".join(f"`{r['run_id']}` {r['status']}" + (f" ({r['error']})" if r.get('error') else "")
                                              for r in bad[:20]) + (" ..." if len(bad) > 20 else ""))
    L.append("")

    # -- grid and choice
    L += ["## Grid (full training set, one seed) and the chosen settings", "",
          "Validation accuracy / macro-F1 of every grid run; ** marks the setting chosen for the seed runs "
          "(highest validation accuracy; ties: macro-F1, smaller rho, larger sparsity). The low-data settings "
          "use the full-data choice.", ""]
    chosen_ids = {}   # the study's own rule (study.choose) on the grid records; else what the seed runs used
    for task in tasks:
        for opt, r in choose(records, task).items():
            chosen_ids[(task, opt)] = (r["rho"], r["sparsity"],
                                       f"grid validation accuracy {r['validation']['accuracy']:.4f}")
    for r in seed_runs:
        chosen_ids.setdefault((r["task"], r["optimizer"]), (r.get("rho"), r.get("sparsity"), r.get("chosen_by")))
    if grid:
        L += ["| task | optimizer | setting | val acc | val macro-F1 | steps | wall s |", "|---|---|---|---|---|---|---|"]
        for task in tasks:
            for r in sorted((g for g in grid if g["task"] == task),
                            key=lambda g: (OPT_ORDER.index(g["optimizer"]), g["rho"] or 0, -(g["sparsity"] or 0))):
                pick = chosen_ids.get((task, r["optimizer"]))
                mark = "**" if pick and pick[0] == r["rho"] and pick[1] == r["sparsity"] else ""
                L.append(f"| {task} | {OPT_LABEL[r['optimizer']]} | {mark}{hp(r)}{mark} | "
                         f"{100 * r['validation']['accuracy']:.2f} | {100 * r['validation']['macro_f1']:.2f} | "
                         f"{r.get('steps_done', r['steps'])} | {r['wall_seconds']:.0f} |")
    else:
        L.append("(no grid records)")
    L += ["", "| task | SAM | FSAM | chosen by |", "|---|---|---|---|"]
    for task in tasks:
        s, f = chosen_ids.get((task, "sam")), chosen_ids.get((task, "fsam"))
        L.append(f"| {task} | {'rho %g' % s[0] if s else 'n/a'} | "
                 f"{'rho %g, sparsity %g' % (f[0], f[1]) if f else 'n/a'} | {(f or s or (None, None, 'n/a'))[2]} |")
    L.append("")

    # -- main table
    L += ["## Test results over seeds", "",
          "| task | setting | n train | optimizer | seeds | test acc | test macro-F1 | val acc | steps |",
          "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for setting in settings:
            for opt in OPT_ORDER:
                runs = seeds.get((task, setting, opt), [])
                if not runs:
                    continue
                L.append(f"| {task} | {setting} | {runs[0]['n_train']} | {OPT_LABEL[opt]} | {len(runs)} | "
                         f"{mean_std([r['test']['accuracy'] for r in runs])} | "
                         f"{mean_std([r['test']['macro_f1'] for r in runs])} | "
                         f"{mean_std([r['validation']['accuracy'] for r in runs])} | {runs[0].get('steps_done', runs[0]['steps'])} |")
    L.append("")

    # -- paired differences
    L += ["## Paired differences over seeds (test split)", "",
          "Δ = first − second, in percentage points, paired by seed. p(t): two-sided paired t-test; "
          "p(Holm): Holm-adjusted over the task × setting cells of that comparison; sign test: wins/losses/ties "
          "and its exact two-sided p.", ""]
    summary = []
    for a_opt, b_opt in COMPARISONS:
        rows, pvals = [], []
        for task in tasks:
            for setting in settings:
                A = {r["seed"]: r for r in seeds.get((task, setting, a_opt), [])}
                B = {r["seed"]: r for r in seeds.get((task, setting, b_opt), [])}
                common = sorted(set(A) & set(B))
                if not common:
                    continue
                d_acc = [A[s]["test"]["accuracy"] - B[s]["test"]["accuracy"] for s in common]
                d_f1 = [A[s]["test"]["macro_f1"] - B[s]["test"]["macro_f1"] for s in common]
                t_acc, t_f1 = paired_t(d_acc), paired_t(d_f1)
                pvals.append(t_acc[1] if t_acc else None)
                rows.append((task, setting, common, d_acc, d_f1, t_acc, t_f1, sign_test(d_acc)))
        if not rows:
            continue
        adj = holm(pvals)
        name = f"{OPT_LABEL[a_opt]} − {OPT_LABEL[b_opt]}"
        L += [f"### {name}", "",
              "| task | setting | pairs | Δ acc | p(t) | p(Holm) | sign test W/L/T, p | Δ macro-F1 | p(t) F1 |",
              "|---|---|---|---|---|---|---|---|---|"]
        cell_means = []
        for (task, setting, common, d_acc, d_f1, t_acc, t_f1, sg), p_adj in zip(rows, adj):
            cell_means.append(statistics.fmean(d_acc))
            L.append(f"| {task} | {setting} | {len(common)} | {mean_std(d_acc)} | {fmt_p(t_acc[1] if t_acc else None)} | "
                     f"{fmt_p(p_adj)} | {sg[0]}/{sg[1]}/{sg[2]}, {fmt_p(sg[3])} | {mean_std(d_f1)} | "
                     f"{fmt_p(t_f1[1] if t_f1 else None)} |")
        sg = sign_test(cell_means)
        summary.append((name, cell_means, sg))
        L += ["", f"Across the {len(cell_means)} cells: mean Δ acc {100 * statistics.fmean(cell_means):+.2f} pp; "
              f"{sg[0]} cells up, {sg[1]} down, {sg[2]} tied; sign test over cells p = {fmt_p(sg[3])}.", ""]

    # -- cost
    L += ["## Cost", "", "Wall seconds per run: from dispatch to the run's end as the scheduler saw it (model load, "
          "DeepSpeed set-up, training, evaluations, saving; worker processes already started). Train ms/step: "
          "train.py's training-loop time / steps (includes the per-epoch validation passes).", "",
          "| optimizer | runs | mean wall s / run | mean train s / run | train ms / step | × AdamW (ms/step) |",
          "|---|---|---|---|---|---|"]
    per_step = {}
    for opt in OPT_ORDER:
        runs = [r for r in ok if r["optimizer"] == opt]
        if not runs:
            continue
        ms = [1000 * r["train_seconds"] / max(1, r.get("steps_done") or r["steps"]) for r in runs if r.get("train_seconds")]
        per_step[opt] = statistics.fmean(ms) if ms else None
    for opt in OPT_ORDER:
        runs = [r for r in ok if r["optimizer"] == opt]
        if not runs:
            continue
        ratio = (per_step[opt] / per_step["adamw"]) if per_step.get("adamw") and per_step.get(opt) else None
        L.append(f"| {OPT_LABEL[opt]} | {len(runs)} | {statistics.fmean(r['wall_seconds'] for r in runs):.1f} | "
                 f"{statistics.fmean(r['train_seconds'] for r in runs):.1f} | {per_step[opt]:.1f} | "
                 f"{'%.2f' % ratio if ratio else 'n/a'} |")
    total = sum(r["wall_seconds"] for r in ok)
    L += ["", f"Sum of run wall times: {total:.0f} s over {len(ok)} runs.", ""]

    # -- plots
    spread = os.path.join(plots_dir, "seed_spread.png")
    curves = os.path.join(plots_dir, "loss_curves.png")
    made = []
    try:
        if seed_runs:
            plot_seed_spread(seeds, tasks, settings, spread)
            plot_loss_curves(seeds, tasks, settings, curves)
            made = [spread, curves]
    except ImportError as err:
        L += [f"(plots skipped: {err}; pip install matplotlib)", ""]
    if made:
        rel = os.path.relpath(plots_dir, out_dir)
        L += ["## Plots", "", f"![seed spread]({rel}/seed_spread.png)", "", f"![loss curves]({rel}/loss_curves.png)", ""]

    if section:
        L += section
    # -- notes
    L += ["## Notes", "",
          "- Splits: launch/prepare_data.py's (random.Random(0), 80/10/10); low-data settings are stratified, "
          "nested, seeded subsets of the train split (validation/test unchanged). bbc_news keeps all five topics "
          "(the package's `sports` folder mapped to `sport`).",
          "- max_seq_length 128: BBC articles are truncated to their first 128 WordPiece tokens (headline and lead).",
          "- One grid seed per configuration: the choice itself is noisy; the seed phase uses seeds the grid did not use.",
          "- FSAM's `always_perturb` (bias, norm, embed) keeps the embeddings (about half of MiniLM's 22.7M "
          "parameters) always perturbed; the sparsity applies to the remaining ranked parameters.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(L))
    print(f"[report] wrote {args.out}" + (f" and {', '.join(made)}" if made else ""))
    for name, cell_means, sg in summary:
        print(f"[report] {name}: mean Δ test acc over cells {100 * statistics.fmean(cell_means):+.2f} pp, "
              f"{sg[0]} up / {sg[1]} down, sign p {fmt_p(sg[3])}")


if __name__ == "__main__":
    main()
