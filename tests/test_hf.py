"""fsam_ds.hf: Hugging Face Trainer, TRL's SFTTrainer and Accelerate taking real FSAM steps, on 2 CPU
ranks (gloo) with DeepSpeed ZeRO-2/3, compared with plain fsam_ds.train_step loops and with the
plain AdamW Trainer. Ranks start three times: the main job (every comparison), a job killed while
writing a checkpoint, and its resume."""
import math
import os

import pytest
import torch

import hf_cases
from dist_harness import run_ranks

TOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """First a job whose ranks are SIGKILLed while writing checkpoint-4, then the main job (every
    comparison, and the resume of the killed job with resume_from_checkpoint=True)."""
    root = tmp_path_factory.mktemp("hf")
    killed = root / "killed"
    with pytest.raises(AssertionError, match="no result") as failure:
        run_ranks(hf_cases.run_killed_during_checkpoint, 2, str(killed), deepspeed=True, timeout=300)
    after_kill = sorted(os.listdir(killed))
    results = run_ranks(hf_cases.run_all, 2, str(root), str(killed), deepspeed=True, timeout=900)
    return results, {"after_kill": after_kill, "failure": str(failure.value)}


@pytest.fixture(scope="module")
def equality(runs):
    return runs[0][0]["equality"]


@pytest.mark.parametrize("case", ["z2_gas1_block", "z2_gas2_block", "z3_gas1_type", "z3_gas2_block"])
def test_trainer_equals_plain_train_step_loop(equality, case):
    """FSAMTrainer at ZeRO-2/3, accumulation 1/2, "fsam" block or "FSAM" type, all-"auto" config:
    weights equal a plain fsam_ds.train_step loop on the same micro-batches."""
    r = equality[case]
    print(f"{case}: max |w_trainer - w_loop| = {r['diff']:.2e}")
    assert r["diff"] <= TOL
    assert r["num_steps"] == r["ref_num_steps"] == hf_cases.STEPS   # FSAM's step counter advanced
    assert r["masks"] > 0                                             # and it holds masks


def test_bf16_trainer_equals_plain_loop(equality):
    r = equality["z2_gas2_type_bf16"]
    print(f"bf16 ZeRO-2: max diff {r['diff']:.2e}")
    assert r["diff"] <= TOL and r["num_steps"] == hf_cases.STEPS


def test_scheduler_and_counters_step_once_per_fsam_step(equality):
    for case, r in equality.items():
        assert r["global_step"] == r["engine_global_steps"] == r["scheduler_steps"] == hf_cases.STEPS, case


def test_logs_carry_fsam_signals(equality):
    """What report_to backends receive (on_log): FSAM's signals, reduced over ranks."""
    logs = equality["z2_gas2_block"]["logs"]
    assert len(logs) == hf_cases.STEPS
    for log in logs:
        for key in ("fsam_threshold", "fsam_mask_density", "fsam_grad_norm", "fsam_perturbation_norm",
                    "fsam_sharpness", "fsam_perturbed_loss", "fsam_num_steps"):
            assert key in log and math.isfinite(log[key]), (key, log)
        assert 0 < log["fsam_mask_density"] < 1
        assert abs(log["fsam_perturbation_norm"] - hf_cases.FSAM["rho"]) < 1e-4
        assert log["grad_norm"] == log["fsam_grad_norm"]   # the first-pass norm, at w
    assert [l["fsam_num_steps"] for l in logs] == list(range(1, hf_cases.STEPS + 1))


def test_ranks_agree(runs):
    r0, r1 = runs[0]
    for case in r0["equality"]:
        assert hf_cases.max_diff(r0["equality"][case]["weights"], r1["equality"][case]["weights"]) == 0
        assert r0["equality"][case]["logs"] == r1["equality"][case]["logs"]


@pytest.mark.parametrize("case", ["z2_gas2_block", "z3_gas2_block"])
def test_resume_from_trainer_checkpoint_between_refreshes(equality, case):
    """checkpoint-2 (mask refreshed at steps 0 and 3): resume equals the uninterrupted run."""
    r = equality[case]
    print(f"{case}: resume diff {r['resume_diff']:.2e}")
    assert r["resume_diff"] == 0.0
    assert r["resume_num_steps"] == hf_cases.STEPS
    assert [c for c in r["checkpoints"] if c.startswith("checkpoint-")] == \
        ["checkpoint-2", "checkpoint-4"]
    assert ".fsam_staging" not in r["checkpoints"]


def test_rho0_equals_adamw_trainer_with_short_groups_and_hf_scheduler(runs):
    """3 micro-batches per epoch with accumulation 2 (every other step is a short group) and an HF
    linear warmup schedule: FSAMTrainer(rho=0) equals the AdamW Trainer; FSAM (rho 0.05) differs
    far above the tolerance (a Trainer that silently trained AdamW would fail here)."""
    r = runs[0][0]["adamw"]
    print(f"rho=0 vs AdamW Trainer: {r['rho0_vs_adamw']:.2e}; FSAM vs AdamW: {r['fsam_vs_adamw']:.2e}")
    assert r["rho0_vs_adamw"] <= TOL
    assert r["fsam_vs_adamw"] > 1e-3
    for name in ("adamw", "rho0", "fsam"):
        assert r[name]["global_step"] == r[name]["lr_scheduler_steps"] == hf_cases.STEPS, name
    assert r["fsam"]["lrs"] == r["adamw"]["lrs"]
    assert r["fsam"]["num_steps"] == hf_cases.STEPS


def test_trl_sft_trainer_mixin(runs):
    r = runs[0][0]["sft"]
    print(f"SFT rho=0 vs SFTTrainer: {r['rho0_vs_sft']:.2e}; FSAM vs SFTTrainer: {r['fsam_vs_sft']:.2e}")
    assert r["rho0_vs_sft"] <= TOL       # num_items_in_batch normalization as TRL/Trainer do it
    assert r["fsam_vs_sft"] > 1e-4
    assert r["sft_fsam"]["num_steps"] == 3
    assert all("fsam_sharpness" in l for l in r["sft_fsam"]["logs"])
    # what SFTTrainer records in compute_loss comes from the first pass only
    plain, rho0, fsam = (r[k]["logs"] for k in ("sft", "sft_rho0", "sft_fsam"))
    assert [l["num_tokens"] for l in fsam] == [l["num_tokens"] for l in plain]
    for a, b in zip(rho0, plain):
        assert abs(a["mean_token_accuracy"] - b["mean_token_accuracy"]) < 1e-6
        assert abs(a["entropy"] - b["entropy"]) < 1e-5


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_loop(runs, stage):
    r = runs[0][0]["accelerate"][f"z{stage}"]
    print(f"Accelerate ZeRO-{stage}: diff {r['diff']:.2e}")
    assert r["diff"] <= TOL and r["num_steps"] == r["ref_num_steps"] == 3
    # accelerator.backward() (engine.step() inside) is refused, not a silent AdamW step
    assert r["guard"] is not None and "train_step" in r["guard"], r["guard"]
    assert r["num_steps_after_guard"] == r["num_steps"]


@pytest.mark.parametrize("name, expected", [
    ("no_fsam_block", 'has no "fsam" block'),
    ("twice", "Give the FSAM settings once"),
    ("bad_sparsity", "Invalid sparsity: 1.5"),
    ("nvme_offload", 'offload_optimizer.device "nvme"'),
    ("client_optimizer", "optimizers=(AdamW"),
    ("unknown_key", "Unknown key(s) ['sparsty']"),
])
def test_errors_name_the_setting(runs, name, expected):
    message = runs[0][0]["errors"][name]
    assert message is not None, f"{name}: no ValueError"
    assert expected in message, message


def test_plain_trainer_given_fsam_type_fails_at_first_step(runs):
    message = runs[0][0]["plain_fsam_type"]
    assert message is not None, "a plain Trainer with the FSAM type trained without an error"
    assert "train_step" in message, message


def test_plain_trainer_given_an_fsam_block_is_refused(runs):
    message = runs[0][0]["plain_fsam_block"]
    assert message is not None, "a plain Trainer with an fsam block trained AdamW silently"
    assert '"fsam" block' in message and "fsam_ds.initialize" in message, message


def test_sigkill_during_checkpoint_write_leaves_no_torn_checkpoint(runs):
    """Both ranks killed (SIGKILL) in the middle of writing checkpoint-4: only checkpoint-2 is
    visible; resume_from_checkpoint=True picks it and ends bit-identical to the uninterrupted run."""
    names = runs[1]["after_kill"]
    assert "killed after timeout" not in runs[1]["failure"]
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-2"], names
    resumed = runs[0][0]["resume_after_kill"]
    assert resumed["last"] == "checkpoint-2"
    uninterrupted = runs[0][0]["equality"]["z2_gas2_block"]["weights"]
    assert hf_cases.max_diff(resumed["weights"], uninterrupted) == 0.0
    assert resumed["num_steps"] == hf_cases.STEPS


def test_without_deepspeed_uses_fsam_optimizer(tmp_path):
    """One process, no DeepSpeed: the Trainer's step is FSAM.first_step / second_step, with the
    Trainer's clipping of g' and its scheduler; equals a hand-written FSAM loop."""
    import fsam_ds
    from fsam_ds.hf import FSAMTrainer, decay_parameter_groups
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=4, learning_rate=hf_cases.LR,
                             weight_decay=hf_cases.WEIGHT_DECAY, optim="adamw_torch",
                             lr_scheduler_type="constant", report_to=[], logging_steps=1,
                             save_strategy="no", seed=0, disable_tqdm=True, use_cpu=True,
                             dataloader_pin_memory=False)
    trainer = hf_cases.recording(FSAMTrainer)(model=hf_cases.tiny_bert(), args=args,
                                              train_dataset=hf_cases.classification_data(64),
                                              fsam=hf_cases.FSAM)
    trainer.recorded = []
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    assert isinstance(trainer.fsam_optimizer, fsam_ds.FSAM) and trainer.fsam_optimizer.num_steps == 4

    model = hf_cases.tiny_bert()
    opt = fsam_ds.FSAM(decay_parameter_groups(model, hf_cases.WEIGHT_DECAY, named=True),
                       torch.optim.AdamW, **hf_cases.FSAM, lr=hf_cases.LR)
    for step in range(4):
        group = trainer.recorded[2 * step:2 * step + 2]
        for mb in group:
            (model(**mb).loss / 2).backward()
        opt.first_step(zero_grad=True)
        for mb in group:
            (model(**mb).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.second_step(zero_grad=True)
    diff = hf_cases.max_diff(hf_cases.gathered(trainer.model), hf_cases.gathered(model))
    print(f"no DeepSpeed: max diff {diff:.2e}")
    assert diff <= TOL
    assert all("fsam_sharpness" in l for l in trainer.state.log_history if "loss" in l)


@pytest.mark.parametrize("config, port", [("hf_zero2_fsam.json", 29541), ("hf_zero3_fsam.json", 29542)])
def test_example_script_under_the_deepspeed_cli(tmp_path_factory, tmp_path, config, port):
    """launch/run_hf_finetune.py really launched by `deepspeed --num_gpus 2` (CPU ranks) with
    the shipped ds_configs/hf_zero{2,3}_fsam.json ("auto" values, ZeRO-3's buffer sizes among them,
    filled by the Trainer): trains, checkpoints, evaluates, logs FSAM."""
    import json
    from launch_helpers import make_assets, run
    assets = make_assets(tmp_path_factory)
    out = tmp_path / "out"
    proc = run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/run_hf_finetune.py",
                "--deepspeed", f"ds_configs/{config}",
                "--model_name_or_path", str(assets / "tiny_bert"),
                "--train_file", str(assets / "data" / "train.jsonl"),
                "--validation_file", str(assets / "data" / "validation.jsonl"),
                "--output_dir", str(out), "--do_train", "--do_eval",
                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                "--learning_rate", "1e-3", "--max_steps", "3", "--logging_steps", "1",
                "--save_steps", "2", "--max_seq_length", "32", "--report_to", "none"])
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    state = json.load(open(out / "trainer_state.json"))
    train_logs = [l for l in state["log_history"] if "loss" in l]
    assert [l["fsam_num_steps"] for l in train_logs] == [1, 2, 3]
    assert all(0 < l["fsam_mask_density"] < 1 for l in train_logs)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and (out / "eval_results.json").is_file()
