"""Per-rank memory FSAM adds under DeepSpeed ZeRO, per local parameter, and the paper's approach.

    torchrun --nproc_per_node 4 bench/fsam_memory.py --model 1.3b --zero_stage 3 --out mem.json
    DS_ACCELERATOR=cpu python bench/fsam_memory.py --model tiny --zero_stage 2 --out /tmp/mem.json

Three engines are built one after the other in one process (same model, config and batches):
adamw (fsam_ds.engine.initialize_base), sam (sparsity 0) and fsam (sparsity 0.9), both with
mask_interval 2, so that step 0 is a warm-up (it also allocates AdamW's state), step 1 reuses the
mask and step 2 refreshes it. What is measured on each rank ("local" = this rank's fp32 shard,
padding excluded: the elements FSAM sees):

  persistent_bytes         engine._fsam.state_bytes() after a step: the masks kept between steps
  captured_grad_bytes      the first-pass gradient copies FSAM holds from the first-pass optimizer
                           step until the perturbation is applied (0 where fsam_ds keeps
                           references, or derives each gradient from DeepSpeed's partitions when
                           it reads it: the lean first pass at ZeRO-1/2/3 without offload)
  saved_bytes              original values kept while perturbed (the masked elements only)
  perturb_phase_peak       max_memory_allocated during FSAM's perturb_captured() minus what was
                           allocated when it began: the norm, and on refresh steps the scores,
                           threshold and mask (the transient a refresh adds), CUDA only
  step_peak                max_memory_allocated over a whole step, minus what was allocated
                           before the variant's engine was built; the differences fsam - adamw
                           (what a user sees, activations included) and fsam refresh - fsam
                           reuse (the refresh's share) are reported, CUDA only

The comparison is the paper's public code: an fp32 mask of every parameter on every rank
(4 bytes/parameter, unsharded) and, to refresh it, the Fisher scores of every parameter
concatenated (4 bytes) and fully sorted. The sort's extra memory per element is measured with
torch.sort on an fp32 tensor of min(parameters, --sort_numel) elements (on CPU the outputs alone,
4 + 8 bytes, are used as a lower bound) and the per-rank total extrapolated to the whole model.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import benchlib
from benchlib import fmt_bytes

# mask_interval 2: step 0 warm-up (refresh), step 1 reuse, step 2 refresh.
VARIANTS = {
    "adamw": None,
    "sam": {"rho": 0.05, "sparsity": 0.0, "mask_interval": 2},
    "fsam": {"rho": 0.05, "sparsity": 0.9, "mask_interval": 2},
}
NUM_STEPS = 3
PAPER_MASK_BYTES = 4     # fp32 mask per parameter
PAPER_SCORE_BYTES = 4    # the concatenated fp32 Fisher scores that are sorted
SORT_OUTPUT_BYTES = 4 + 8  # sorted fp32 values + int64 indices: a lower bound of the sort's extra


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=sorted(benchlib.PRESETS))
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=1)
    p.add_argument("--zero_stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--zero3_buffers", default="deepspeed", choices=sorted(benchlib.ZERO3_BUFFER_SOURCES),
                   help="ZeRO-3 buffer sizes: DeepSpeed's defaults or a shipped config's (see step_time.py)")
    p.add_argument("--sort_numel", type=benchlib.parse_count, default=2 * 10 ** 8,
                   help="largest tensor torch.sort is measured on (per-element cost extrapolated)")
    p.add_argument("--out", required=True, help="JSON result file (written by rank 0)")
    return p


class PerturbPhaseProbe:
    """Wraps engine._fsam.core.perturb (which fsam_ds.train_step calls between the passes) to
    record the memory of that phase; the step's overall peak is kept across the reset it needs."""

    def __init__(self, fsam, rt: benchlib.Runtime):
        self.fsam, self.rt, self.record = fsam, rt, None
        self._original = fsam.core.perturb
        fsam.core.perturb = self

    def __call__(self, slots, *args, **kwargs):
        fsam, rt = self.fsam, self.rt
        # the gradients step() captured in the first pass cost memory only where fsam_ds copies
        # them (BF16_Optimizer reuses its buffer)
        copied = not fsam.view.grads_outlive_step
        record = {"refresh": fsam.num_steps % fsam.config.mask_interval == 0,
                  "captured_grads_copied": copied,
                  # a callable gradient is derived from DeepSpeed's own partitions when read (the
                  # lean first pass): its transient shows in perturb_phase_peak instead
                  "captured_grad_bytes": sum(s.grad.numel() * s.grad.element_size() for s in slots
                                             if not callable(s.grad)) if copied else 0}
        benchlib.sync(rt)
        record["peak_before_phase"] = benchlib.peak_bytes(rt)
        start = benchlib.allocated_bytes(rt)
        benchlib.reset_peak(rt)
        out = self._original(slots, *args, **kwargs)
        benchlib.sync(rt)
        if rt.on_cuda:
            record["perturb_phase_peak_bytes"] = benchlib.peak_bytes(rt) - start
            record["perturb_phase_alloc_change_bytes"] = benchlib.allocated_bytes(rt) - start
        held = fsam.state_bytes()   # masks + saved values while perturbed
        record["held_while_perturbed_bytes"] = held
        self.record = record
        return out


def local_counts(engine) -> dict:
    """This rank's shard sizes from the layouts fsam_ds built when it attached to the engine."""
    layouts = engine._fsam.view.layouts_by_key().values()
    return {"valid_numel": sum(l.num_ranked + l.num_always for l in layouts),
            "padded_numel": sum(l.numel for l in layouts),
            "ranked_numel": sum(l.num_ranked for l in layouts)}


def run_variant(name: str, args, rt: benchlib.Runtime, batches) -> dict:
    fsam_block = VARIANTS[name]
    benchlib.collect_memory(rt)
    # what earlier variants left allocated; subtracted before variants are compared
    memory_before_build = benchlib.allocated_bytes(rt)
    engine, num_params, step = benchlib.build_variant(fsam_block, args, rt)
    probe, steps = None, []
    for input_ids in batches:
        benchlib.collect_memory(rt)
        record = {"allocated_before_bytes": benchlib.allocated_bytes(rt)}
        benchlib.reset_peak(rt)
        step(engine, input_ids)
        benchlib.sync(rt)
        peak = benchlib.peak_bytes(rt)
        if probe is not None:
            phase, probe.record = probe.record, None
            peak_before_phase = phase.pop("peak_before_phase")
            if peak is not None:
                peak = max(peak, peak_before_phase)
            record.update(phase, persistent_bytes=engine._fsam.state_bytes())
        elif fsam_block is not None:
            # engine._fsam exists once train_step has run; step 0 is the warm-up anyway
            probe = PerturbPhaseProbe(engine._fsam, rt)
        record["step_peak_bytes"] = peak
        steps.append(record)
    result = {"num_params": num_params, "fsam_config": fsam_block, "steps": steps,
              "memory_before_build_bytes": memory_before_build}
    if probe is not None:
        result["local"] = local_counts(engine)
    benchlib.release_engine(engine)
    del engine, probe
    benchlib.collect_memory(rt)
    return result


def sort_extra_bytes_per_element(numel: int, rt: benchlib.Runtime):
    """Peak extra memory of torch.sort(fp32) per element (input excluded); None on CPU."""
    if not rt.on_cuda:
        return None
    benchlib.collect_memory(rt)
    scores = torch.rand(numel, device=rt.device)
    benchlib.sync(rt)
    before = benchlib.allocated_bytes(rt)
    benchlib.reset_peak(rt)
    out = torch.sort(scores, descending=True)
    benchlib.sync(rt)
    extra = benchlib.peak_bytes(rt) - before
    del out, scores
    benchlib.collect_memory(rt)
    return extra / numel


def per_param(value, count):
    return None if value is None or not count else value / count


def summarize(variants: dict, sort_extra, rt: benchlib.Runtime) -> dict:
    """This rank's numbers, in bytes and in bytes per local (valid) parameter."""
    fsam, sam, adamw = variants["fsam"], variants["sam"], variants["adamw"]
    local = fsam["local"]["valid_numel"]
    total = fsam["num_params"]
    reuse, refresh = fsam["steps"][1], fsam["steps"][2]
    assert not reuse["refresh"] and refresh["refresh"], "mask_interval 2: step 1 reuses, 2 refreshes"

    def own(variant, step, key):
        """A step's allocator figure minus what was allocated before the variant's engine was
        built (release_engine frees earlier engines; this keeps any leftover out)."""
        value, before = variant["steps"][step][key], variant["memory_before_build_bytes"]
        return None if value is None or before is None else value - before

    def diff(a, b):
        return None if a is None or b is None else a - b

    fsam_ds = {
        "persistent_bytes": refresh["persistent_bytes"],
        "captured_grad_bytes": refresh["captured_grad_bytes"],
        "saved_bytes": refresh["held_while_perturbed_bytes"] - refresh["persistent_bytes"],
        "sam_saved_bytes": sam["steps"][2]["held_while_perturbed_bytes"]
        - sam["steps"][2]["persistent_bytes"],
        "perturb_phase_peak_refresh_bytes": refresh.get("perturb_phase_peak_bytes"),
        "perturb_phase_peak_reuse_bytes": reuse.get("perturb_phase_peak_bytes"),
        "step_peak_fsam_refresh_minus_adamw_bytes": diff(own(fsam, 2, "step_peak_bytes"),
                                                         own(adamw, 2, "step_peak_bytes")),
        "step_peak_fsam_refresh_minus_sam_bytes": diff(own(fsam, 2, "step_peak_bytes"),
                                                       own(sam, 2, "step_peak_bytes")),
        "step_peak_fsam_refresh_minus_reuse_bytes": diff(own(fsam, 2, "step_peak_bytes"),
                                                         own(fsam, 1, "step_peak_bytes")),
        "allocated_between_steps_fsam_minus_adamw_bytes": diff(
            own(fsam, 2, "allocated_before_bytes"), own(adamw, 2, "allocated_before_bytes")),
    }
    fsam_ds_per_param = {k.replace("_bytes", "_per_local_param"): per_param(v, local)
                         for k, v in fsam_ds.items()}
    sort_bytes = sort_extra if sort_extra is not None else SORT_OUTPUT_BYTES
    paper_peak_per_param = PAPER_MASK_BYTES + PAPER_SCORE_BYTES + sort_bytes
    paper = {
        "persistent_bytes_per_model_param": PAPER_MASK_BYTES,
        "sort_extra_bytes_per_element": sort_bytes,
        "sort_extra_measured": sort_extra is not None,
        "refresh_peak_bytes_per_model_param": paper_peak_per_param,
        "persistent_bytes_per_rank": PAPER_MASK_BYTES * total,
        "refresh_peak_bytes_per_rank": paper_peak_per_param * total,
        "refresh_peak_per_local_param": paper_peak_per_param * total / local,
    }
    # fsam_ds's own peak on a refresh step, comparable with the paper's: what it holds across the
    # perturb phase (masks, first-pass gradient copies) plus that phase's transient
    refresh_peak = None
    if fsam_ds["perturb_phase_peak_refresh_bytes"] is not None:
        refresh_peak = (fsam_ds["persistent_bytes"] + fsam_ds["captured_grad_bytes"]
                        + fsam_ds["perturb_phase_peak_refresh_bytes"])
    return {"rank": rt.rank, "local": fsam["local"], "model_params": total,
            "fsam_ds": fsam_ds, "fsam_ds_per_local_param": fsam_ds_per_param,
            "fsam_ds_refresh_peak_bytes": refresh_peak, "paper_public_code": paper}


def fullest_rank(per_rank: list, section: str) -> dict:
    """Each figure of one summary section at its largest over the ranks (None if unmeasured)."""
    keys = per_rank[0][section]
    return {k: max((r[section][k] for r in per_rank if r[section][k] is not None), default=None)
            for k in keys}


def summary_row(result: dict) -> tuple:
    """The table row: every figure at the rank where it is largest (ranks differ a little)."""
    cfg, per_rank = result["config"], result["per_rank"]
    per = fullest_rank(per_rank, "fsam_ds_per_local_param")
    paper = fullest_rank(per_rank, "paper_public_code")
    peaks = [r["fsam_ds_refresh_peak_bytes"] for r in per_rank if r["fsam_ds_refresh_peak_bytes"]]
    fsam_peak = max(peaks, default=None)
    fsam_peak_per_param = max((per_param(r["fsam_ds_refresh_peak_bytes"], r["local"]["valid_numel"])
                               for r in per_rank if r["fsam_ds_refresh_peak_bytes"]), default=None)

    def b(v):
        return "n/a" if v is None else f"{v:.2f}"
    header = ["model", "ZeRO", "ranks", "local params (max)", "persistent B/param",
              "grad copies B/param", "saved B/param", "refresh phase peak B/param",
              "step peak fsam-adamw B/param", "fsam_ds refresh peak B/param",
              "paper refresh peak B/param", "fsam_ds refresh peak/rank", "paper refresh peak/rank"]
    row = [cfg["model"], cfg["zero_stage"], cfg["world_size"],
           max(r["local"]["valid_numel"] for r in per_rank),
           b(per["persistent_per_local_param"]), b(per["captured_grad_per_local_param"]),
           b(per["saved_per_local_param"]), b(per["perturb_phase_peak_refresh_per_local_param"]),
           b(per["step_peak_fsam_refresh_minus_adamw_per_local_param"]), b(fsam_peak_per_param),
           b(paper["refresh_peak_per_local_param"]), fmt_bytes(fsam_peak),
           fmt_bytes(paper["refresh_peak_bytes_per_rank"])]
    return header, row


def run(args) -> dict:
    rt = benchlib.start(use_deepspeed=True)
    vocab = benchlib.PRESETS[args.model]["vocab_size"]
    batches = benchlib.random_token_batches(NUM_STEPS, args.micro_batch, args.seq_len, vocab, rt)
    variants = {name: run_variant(name, args, rt, batches) for name in VARIANTS}
    sort_numel = min(variants["fsam"]["num_params"], args.sort_numel)
    sort_extra = sort_extra_bytes_per_element(sort_numel, rt)
    summary = summarize(variants, sort_extra, rt)
    per_rank = [summary]
    if rt.world_size > 1:
        per_rank = [None] * rt.world_size
        dist.all_gather_object(per_rank, summary)
    result = {
        "benchmark": "fsam_memory",
        "config": {**benchlib.model_config(args, rt), "sort_numel": sort_numel,
                   "always_perturb": benchlib.GPT2_ALWAYS_PERTURB},
        "environment": benchlib.environment(rt),
        "per_rank": per_rank,
        "variants_rank0": variants,
        "notes": ["per local param = divided by this rank's valid (unpadded) fp32 shard size",
                  "paper_public_code: fp32 mask of all parameters + full torch.sort of all "
                  "scores, on every rank (not sharded); per-rank bytes extrapolated from "
                  "sort_numel elements",
                  "peaks are CUDA allocator statistics; null on CPU",
                  "the markdown row shows each figure at the rank where it is largest"],
    }
    header, row = summary_row(result)
    return benchlib.publish_and_finish(args.out, result, header, [row], rt, one_row=True)


if __name__ == "__main__":
    run(build_parser().parse_args())
