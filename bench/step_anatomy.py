"""Where DeepSpeed's optimizer step spends its time: each sub-method of the ZeRO wrapper's step,
timed with a device sync on entry and exit (inclusive: a part called inside another counts in
both, e.g. engine.step holds the rest), for a plain AdamW step and for FSAM's two passes.

    torchrun --nproc_per_node 1 bench/step_anatomy.py --model 350m --zero_stage 2 --out a.json
    DS_ACCELERATOR=cpu python bench/step_anatomy.py --model tiny --zero_stage 3 --out /tmp/a.json

The syncs make every figure include the kernels the part launched (and serialise them, so a
synced step is a little slower than an unsynced one). Use it to see which of DeepSpeed's pieces a first pass needs, not as a speed
figure (bench/step_time.py is that).
"""
from __future__ import annotations

import collections
import functools
import time

import torch

import benchlib
import profile_step

# sub-methods of the ZeRO wrappers' step(), in the order step() calls them (DeepSpeed 0.19.8)
PARTS = {
    2: ["check_overflow", "scaled_global_norm", "_update_scale", "free_grad_in_param_list",
        "flatten_dense_tensors_aligned", "flatten", "_release_preflattened_grad_buffers",
        "unscale_and_clip_grads", "_optimizer_step", "update_lp_params",
        "_update_model_bit16_weights", "zero_grad"],
    3: ["_pre_step", "_partition_all_parameters", "_overflow_check_and_loss_scale_update",
        "_get_norm_groups", "_loss_scale_update_and_overflow_cleanup", "zero_grad",
        "_prepare_sub_group", "unscale_and_clip_grads", "_optimizer_step",
        "_reassign_or_swap_out_partitioned_parameters", "_release_sub_group", "_post_step",
        "invalidate_secondary_tensor"],
}
MODULE_FUNCTIONS = {2: [("deepspeed.runtime.zero.stage_1_and_2", "all_gather_dp_groups")], 3: []}


class Timer:
    def __init__(self, rt):
        self.rt, self.depth, self.totals, self.calls = rt, 0, collections.Counter(), collections.Counter()
        self.pass_calls = collections.Counter()

    def new_step(self):
        self.pass_calls = collections.Counter()

    def wrap(self, name, fn, per_pass=False):
        """per_pass: name each call of a step apart ("engine.forward [pass 2]")."""
        base = name

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = base
            if per_pass:
                self.pass_calls[base] += 1
                name = f"{base} [pass {self.pass_calls[base]}]"
            benchlib.sync(self.rt)
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                benchlib.sync(self.rt)
                self.totals[name] += time.perf_counter() - start
                self.calls[name] += 1
                self.depth -= 1
        return timed


def instrument(engine, stage, timer):
    opt = engine.optimizer
    for name in PARTS[stage]:
        if hasattr(opt, name):
            setattr(opt, name, timer.wrap(name, getattr(opt, name)))
    import importlib
    for module_name, fn_name in MODULE_FUNCTIONS[stage]:
        module = importlib.import_module(module_name)
        setattr(module, fn_name, timer.wrap(fn_name, getattr(module, fn_name)))
    engine.step = timer.wrap("engine.step (rest)", engine.step)


def main():
    # the same options as profile_step.py (one model, one stage, a few steps per variant)
    p = profile_step.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(steps=4, variants="adamw,sam,fsam_every_100")
    args = p.parse_args()
    rt = benchlib.start(use_deepspeed=True)
    results = {}
    for variant in args.variants.split(","):
        engine, num_params, step = benchlib.build_variant(benchlib.STEP_VARIANTS[variant], args, rt)
        batches = benchlib.random_token_batches(args.warmup + args.steps, args.micro_batch,
                                                args.seq_len, engine.module.config.vocab_size, rt)
        for b in batches[:args.warmup]:
            step(engine, b)
        timer = Timer(rt)
        # FSAM's own ranges, timed the same way (train_step's pieces)
        view = getattr(getattr(engine, "_fsam", None), "view", None)
        instrument(engine, args.zero_stage, timer)
        if view is not None:
            for name in ("first_pass_gradients", "publish_master_weights", "end_first_pass"):
                if hasattr(view, name):
                    setattr(view, name, timer.wrap("fsam." + name, getattr(view, name)))
            core = engine._fsam.core
            core.perturb = timer.wrap("fsam.perturb", core.perturb)
            core.restore_all = timer.wrap("fsam.restore_all", core.restore_all)
        # the passes themselves: forward (loss included) and backward, per call
        engine.forward = timer.wrap("engine.forward", engine.forward, per_pass=True)
        engine.backward = timer.wrap("engine.backward", engine.backward, per_pass=True)
        total = 0.0
        for b in batches[args.warmup:]:
            benchlib.sync(rt)
            timer.new_step()
            start = time.perf_counter()
            step(engine, b)
            benchlib.sync(rt)
            total += time.perf_counter() - start
        n = args.steps
        parts = {k: {"ms_per_step": 1e3 * v / n, "calls_per_step": timer.calls[k] / n}
                 for k, v in sorted(timer.totals.items(), key=lambda kv: -kv[1])}
        results[variant] = {"step_ms": 1e3 * total / n, "parts": parts,
                            "timed_parts_ms": 1e3 * sum(timer.totals.values()) / n}
        if rt.rank == 0:
            print(f"== {variant}: {1e3 * total / n:.1f} ms/step (synced parts)")
            for k, v in parts.items():
                print(f"   {k:48s} {v['ms_per_step']:8.2f} ms  x{v['calls_per_step']:.0f}")
        benchlib.release_engine(engine)
        del engine
        benchlib.collect_memory(rt)
    if rt.rank == 0:
        import json
        with open(args.out, "w") as f:
            json.dump({"benchmark": "step_anatomy", "config": vars(args),
                       "environment": benchlib.environment(rt),
                       "variants": results}, f, indent=1)
    benchlib.finish(rt)


if __name__ == "__main__":
    main()
