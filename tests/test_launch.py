"""launch/train.py really launched on CPU: the deepspeed CLI, torchrun, mpirun (DeepSpeed's MPI
discovery through mpi4py) and a real one-node Slurm cluster; the offline default model and data;
and the errors for bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from dist_harness import free_port
from slurm_cluster import slurm_cluster, why_unavailable

from launch_helpers import ENV, REPO, check_run, make_assets, prepare_data, run, train_args  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory)


def test_deepspeed_cli_two_cpu_ranks(assets, tmp_path):
    proc = run(["deepspeed", "--num_gpus", "2", "--master_port", "29521", *train_args(assets, tmp_path)])
    metrics = check_run(proc, tmp_path)
    assert metrics["zero_stage"] == 2
    # the DeepSpeed monitor wrote FSAM's signals
    monitor_files = [f for _, _, fs in os.walk(tmp_path / "monitor") for f in fs]
    assert any("fsam_threshold" in f for f in monitor_files), monitor_files


def test_torchrun_two_ranks(assets, tmp_path):
    proc = run(["torchrun", "--nproc_per_node", "2", "--master_port", "29522", *train_args(assets, tmp_path)])
    check_run(proc, tmp_path)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed (tests/run.sh installs it as root)")
def test_mpirun_two_ranks_through_mpi4py_discovery(assets, tmp_path):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--mca", "btl", "self,vader",
           "--mca", "oob_tcp_if_include", "lo", "-x", "DS_ACCELERATOR", "-x", "HF_HUB_OFFLINE",
           "-x", "PATH", "-x", "MASTER_PORT", sys.executable, *train_args(assets, tmp_path)]
    # a port of its own: DeepSpeed's MPI discovery would otherwise take the fixed 29500 (flaky when a
    # run before this one still holds it); the rank, world size and address still come from MPI
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["MASTER_PORT"] = str(free_port())
    check_run(run(cmd, env=env), tmp_path)


@pytest.mark.skipif(why_unavailable() is not None, reason=str(why_unavailable()))
def test_slurm_cpu_batch_script_runs_to_completion(assets, tmp_path):
    out = tmp_path / "out"
    with slurm_cluster(tmp_path / "slurm") as env:
        env = dict(env, **{k: ENV[k] for k in ("DS_ACCELERATOR", "HF_HUB_OFFLINE")},
                   FSAM_VENV=os.path.dirname(os.path.dirname(sys.executable)),
                   CONFIG=str(assets / "ds.json"), MODEL=str(assets / "tiny_bert"),
                   DATA=str(assets / "data"), OUT=str(out), STEPS="3", MASTER_PORT="29523",
                   EXTRA_ARGS="--max_seq_length 32")
        proc = run(["sbatch", "--wait", "-o", str(tmp_path / "slurm-%j.out"), "launch/slurm_cpu.sbatch"],
                   env=env)
        logs = "".join(open(tmp_path / f).read() for f in os.listdir(tmp_path) if f.startswith("slurm-"))
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs[-5000:]}"
    check_run(proc, out)


def single_rank_env():
    return dict(ENV, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29524")


def test_offline_default_model_and_data_improve_over_the_untrained_head(tmp_path):
    """The README's main job in miniature: real all-MiniLM-L6-v2, real movie-review sentences,
    loaded with the hub switched off; 50 FSAM steps beat the untrained classifier head."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "launch/prepare_data.py", "movie_reviews", str(data)], cwd=REPO, check=True)
    cfg = json.load(open(os.path.join(REPO, "ds_configs", "default_cpu_zero2_fsam.json")))
    cfg["optimizer"]["params"]["lr"] = 2e-4   # a short run: a larger step than the default job's
    cfg["scheduler"]["params"].update(warmup_max_lr=2e-4, warmup_num_steps=5)
    with open(tmp_path / "ds.json", "w") as f:
        json.dump(cfg, f)
    proc = run([sys.executable, "launch/train.py", "--deepspeed_config", str(tmp_path / "ds.json"),
                "--model_name_or_path", prepare_data.model_dir(),
                "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"),
                "--max_steps", "50", "--max_seq_length", "48", "--max_eval_samples", "300",
                "--eval_before", "--output_dir", str(tmp_path / "out")], env=single_rank_env())
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    before, after = metrics["validation_before"]["accuracy"], metrics["validation"]["accuracy"]
    print(f"offline MiniLM movie reviews: accuracy {before:.3f} -> {after:.3f}")
    assert after > before + 0.1 and after > 0.65


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_bad_inputs_get_clear_errors(assets, tmp_path):
    good = {a: v for a, v in zip(train_args(assets, tmp_path)[1::2], train_args(assets, tmp_path)[2::2])}
    wrong_column = write(tmp_path / "wrong.jsonl", '{"sentence": "fine", "label": "positive"}\n')
    mismatch = write(tmp_path / "mismatch.jsonl", '{"text": "fine", "label": "neutral"}\n')
    bad_json = write(tmp_path / "bad.json", '{"train_micro_batch_size_per_gpu": 4,,}')
    not_a_model = tmp_path / "empty_model"
    not_a_model.mkdir()
    bad_fsam = tmp_path / "bad_fsam.json"
    cfg = json.load(open(assets / "ds.json"))
    cfg["fsam"]["sparsity"] = 1.5
    write(bad_fsam, json.dumps(cfg))
    bad_interval = tmp_path / "bad_interval.json"
    cfg["fsam"].update(sparsity=0.9, sam_interval=0)
    write(bad_interval, json.dumps(cfg))
    cases = {
        "--train_file": (str(tmp_path / "missing.jsonl"), "missing.jsonl: no such file"),
        "--validation_file": (wrong_column, "has columns ['label', 'sentence']; expected `text`,`label`"),
        "--model_name_or_path": (str(not_a_model), "is not a Hugging Face model directory"),
        "--deepspeed_config": (bad_json, "is not valid JSON"),
    }
    outcomes = {}
    for flag, (value, expected) in cases.items():
        outcomes[flag] = (run([sys.executable, "launch/train.py", *sum(([k, value if k == flag else v] for k, v in good.items()), [])],
                              env=single_rank_env(), timeout=300), expected)
    outcomes["labels"] = (run([sys.executable, "launch/train.py", *sum(([k, mismatch if k == "--validation_file" else v] for k, v in good.items()), [])],
                              env=single_rank_env(), timeout=300), "label set mismatch")
    outcomes["fsam"] = (run([sys.executable, "launch/train.py", *sum(([k, str(bad_fsam) if k == "--deepspeed_config" else v] for k, v in good.items()), [])],
                            env=single_rank_env(), timeout=300), "Invalid sparsity: 1.5")
    outcomes["sam_interval"] = (run([sys.executable, "launch/train.py", *sum(([k, str(bad_interval) if k == "--deepspeed_config" else v] for k, v in good.items()), [])],
                                    env=single_rank_env(), timeout=300), "Invalid sam_interval: 0")
    for what, (proc, expected) in outcomes.items():
        assert proc.returncode == 2, f"{what}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert expected in proc.stderr, f"{what}: {proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr, f"{what}: a traceback instead of a clear error"
