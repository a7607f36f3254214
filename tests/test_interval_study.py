"""experiments/ interval phase without training: the plan and its per-run DeepSpeed JSON
(study.py --phase interval), and report.py's "Interval mode" section from synthetic records.
The end-to-end CPU smoke is in experiments/README.md (minutes; not run here)."""
from __future__ import annotations

import json
import os
import sys
import types

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
import report  # noqa: E402
import study  # noqa: E402

from fsam_ds import FSAMConfig  # noqa: E402


def _args(assets, **kw):
    base = dict(assets=str(assets), batch_size=32, target_steps=150, max_steps=0, lr=5e-5, mask_refreshes=10,
                warmup_fraction=0.1, interval_tasks=["movie_reviews"], interval_settings=["full", "500"],
                interval_seeds=[0, 1, 2], sam_intervals=[1, 2, 4], interval_sam_rho=0.01, default_rho=0.05,
                default_sparsity=0.9, base_config=os.path.join(REPO_ROOT, "ds_configs", "zero2_fsam.json"),
                zero_stage=2, precision="fp32")
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.fixture
def assets(tmp_path):
    task = tmp_path / "movie_reviews"
    task.mkdir()
    for name, n in (("train.jsonl", 8454), ("train_500.jsonl", 500)):
        (task / name).write_text("".join(json.dumps({"text": "x", "label": i % 2}) + "\n" for i in range(n)))
    return tmp_path


def test_interval_plan_and_configs(assets):
    args = _args(assets)
    plan = study.build_interval_plan(args)
    assert len(plan) == 30 and len({r["run_id"] for r in plan}) == 30
    assert [r["seed"] for r in plan] == sorted(r["seed"] for r in plan)     # seed-major
    by = {(r["setting"], r["optimizer"], r.get("sam_interval")) for r in plan}
    assert by == {(s, o, n) for s in ("full", "500") for o, n in
                  [("adamw", None), ("sam", 1), ("fsam", 1), ("fsam", 2), ("fsam", 4)]}
    steps = {r["setting"]: r["steps"] for r in plan}
    assert steps == {"full": 264, "500": 150}                             # the 150-target-steps rule
    for run in plan:
        cfg = study.ds_config_for(args, run)
        if run["optimizer"] == "adamw":
            assert "fsam" not in cfg
            continue
        fsam = FSAMConfig.from_dict(cfg["fsam"])                          # what the engine will build
        assert fsam.sam_interval == run["sam_interval"]
        assert (fsam.rho, fsam.sparsity) == ((0.01, 0.0) if run["optimizer"] == "sam" else (0.05, 0.9))
        assert fsam.mask_interval == {"full": 26, "500": 15}[run["setting"]]
        assert f"-int{run['sam_interval']}-" in run["run_id"] or run["optimizer"] == "sam"
    with pytest.raises(SystemExit, match="sam_intervals"):
        study.build_interval_plan(_args(assets, sam_intervals=[0]))
    with pytest.raises(ValueError, match="sam_interval"):
        FSAMConfig.from_dict({"sam_interval": 0})


def test_interval_prior_counts_plain_steps(assets):
    args = types.SimpleNamespace(prior_step_s={"adamw": 0.03, "sam": 0.065, "fsam": 0.07}, prior_overhead_s=0.0)
    est = study.Estimator(args)
    run = {"optimizer": "fsam", "steps": 100}
    assert est.prior(dict(run, sam_interval=1)) == pytest.approx(7.0)
    assert est.prior(dict(run, sam_interval=4)) == pytest.approx(100 * (0.07 / 4 + 0.03 * 0.75))


def _records():
    recs, t0 = [], 1000.0
    acc = {("adamw", None): 0.83, ("sam", None): 0.84, ("fsam", 1): 0.835, ("fsam", 2): 0.834, ("fsam", 4): 0.832}
    step = {("adamw", None): 0.05, ("sam", None): 0.10, ("fsam", 1): 0.11, ("fsam", 2): 0.08, ("fsam", 4): 0.065}
    for seed in range(3):
        for setting, n_steps in (("full", 264), ("500", 150)):
            for (opt, n), a in acc.items():
                perturbed = 0 if opt == "adamw" else -(-n_steps // (n or 1))
                run = {"phase": "interval", "task": "movie_reviews", "setting": setting, "n_train": 8454,
                       "optimizer": opt, "rho": None if opt == "adamw" else (0.01 if opt == "sam" else 0.05),
                       "sparsity": None if opt == "adamw" else (0.0 if opt == "sam" else 0.9), "seed": seed,
                       "lr": 5e-5, "batch_size": 32, "steps": n_steps, "steps_done": n_steps, "mask_interval": 26,
                       "status": "ok", "gpu": 0, "started_at": t0, "wall_seconds": 20.0,
                       "test": {"accuracy": a + 0.001 * seed}, "validation": {"accuracy": a - 0.01},
                       "step_seconds_mean": step[(opt, n)] * (1 + 0.01 * seed), "perturbed_steps": perturbed}
                if opt != "adamw":
                    run["sam_interval"] = n or 1
                run["run_id"] = study.run_id(run)
                recs.append(run)
                t0 += 5.0
    return recs


def test_interval_section(tmp_path):
    recs = _records()
    lines = report.interval_section(recs + [{"phase": "seeds", "status": "ok"}], plots_dir=None)
    text = "\n".join(lines)
    assert lines[0].startswith("## Interval mode")
    rows = [line for line in lines if line.startswith("| movie_reviews |")]
    assert len(rows) == 10
    n2_full = next(r for r in rows if "| full |" in r and "FSAM N=2" in r).split(" | ")
    assert n2_full[10] == "1.60"                                  # 0.08 / 0.05: the ratio to AdamW
    assert n2_full[11] == "50%"                                   # 132 of 264 steps perturbed
    assert "−" not in n2_full[8] and n2_full[8].startswith("-0.10 ± 0.00")   # Δ vs N=1, pp, paired
    assert "**Reading.**" in text and "N=2 1.60×" in text and "N=4 1.30×" in text
    assert "1.60× if its plain steps cost what AdamW's do" in text          # 1 + (2.2 - 1) / 2
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n\n## Cost\n\nx\n\n## Notes\n\n- n\n")
    report.insert_section(str(results), lines)
    report.insert_section(str(results), lines)                    # replaced, not duplicated
    body = results.read_text()
    assert body.count("## Interval mode") == 1 and body.index("## Interval mode") < body.index("## Notes")
