"""`FSAM`: a torch.optim.Optimizer that wraps any base optimizer with the Fisher-masked SAM step.

Pure PyTorch (one process, or DDP with replicated parameters):

    loss_fn().backward(); opt.first_step(zero_grad=True)    # climb to w + e on the masked elements
    loss_fn().backward(); opt.second_step(zero_grad=True)   # restore w exactly, base step with g'

Under DeepSpeed, the engine owns the parameters and calls `step()` itself (once per ZeRO param
group or sub-group); `fsam_ds.train_step` drives the two phases through `begin_capture`,
`perturb_captured`, `restore_remaining` and `end_step`, and the tensors this optimizer sees are the
rank's fp32 partitions, described by `set_shard_layouts`.
"""
from __future__ import annotations

import math
import warnings

import torch

from fsam_ds import collectives, fisher_math
from fsam_ds.config import DEFAULT_ALWAYS_PERTURB, FSAMConfig
from fsam_ds.shard_layout import ShardLayout
from fsam_ds.topk_threshold import CHUNK_NUMEL, exact_topk_threshold

_READY, _CAPTURING, _PERTURBED = "ready", "capturing", "perturbed"
_region = torch.profiler.record_function   # named ranges for bench/profile_step.py


class FSAM(torch.optim.Optimizer):
    """Fisher SAM (Zhong et al., 2022) around `base_optimizer`, sharing its param_groups and state
    (so LR schedulers and DeepSpeed see the base optimizer's groups).

    params: parameters or `model.named_parameters()` (names are needed for `always_perturb`).
    base_optimizer: a torch.optim.Optimizer class; `**base_kwargs` go to it (lr, weight_decay...).
    rho, sparsity, mask_interval, fisher, adaptive, always_perturb: see `fsam_ds.config.FSAMConfig`.
    """

    def __init__(self, params, base_optimizer=torch.optim.AdamW, rho=0.05, sparsity=0.9,
                 mask_interval=100, fisher="grad_sq", adaptive=False,
                 always_perturb=DEFAULT_ALWAYS_PERTURB, **base_kwargs):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(f"Invalid base_optimizer: {base_optimizer!r} (must be a "
                             "torch.optim.Optimizer class such as torch.optim.AdamW, not an instance)")
        if issubclass(base_optimizer, FSAM):
            raise ValueError("Invalid base_optimizer: FSAM cannot wrap itself")
        self.config = FSAMConfig(rho=rho, sparsity=sparsity, mask_interval=mask_interval,
                                 fisher=fisher, adaptive=adaptive, always_perturb=always_perturb)
        super().__init__(params, {})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.defaults.update(self.base_optimizer.defaults)

        self.process_group = None      # the group the shards are spread over; None = replicated
        self.engine_driven = False     # True under DeepSpeed: step() is called by the engine
        self.allow_base_steps = False  # step() outside an FSAM step = base step (DeepSpeed set-up)
        self.clone_captured_grads = True  # False when the wrapper leaves its grad tensors intact
        self.num_steps = 0             # t: completed FSAM steps
        self.last_stats: dict = {}     # threshold, mask density, norms of the latest step
        self._phase = _READY
        self._base_stepped = False     # the base optimizer stepped in the current FSAM step
        self._layouts: dict = {}       # id(tensor) -> ShardLayout for tensors that are not params
        self._masks: dict = {}         # id(tensor) -> (tensor, bool mask)
        self._saved: dict = {}         # id(tensor) -> (tensor, original values at the mask)
        self._captured: list = []      # (tensor, grad) pairs seen by step() while capturing
        self._masks_valid = False
        self._global_counts = None     # (|R|, always-perturbed count) over the group
        self._param_names = {id(p): name for g in self.param_groups
                             for p, name in zip(g["params"], g.get("param_names", [None] * len(g["params"])))}
        if self.config.always_perturb and all(n is None for n in self._param_names.values()):
            warnings.warn("FSAM got parameters without names, so always_perturb patterns "
                          f"{list(self.config.always_perturb)} match nothing and every element is "
                          "ranked; pass model.named_parameters() to use them.", stacklevel=2)

    # The base optimizer owns param_groups and state. DeepSpeed reassigns `param_groups` (one ZeRO
    # group at a time); forwarding the setter makes the base optimizer step exactly that group.
    @property
    def param_groups(self):
        base = self.__dict__.get("base_optimizer")
        return base.param_groups if base is not None else self.__dict__["_own_param_groups"]

    @param_groups.setter
    def param_groups(self, value):
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.param_groups = value
        else:
            self.__dict__["_own_param_groups"] = value

    @property
    def state(self):
        base = self.__dict__.get("base_optimizer")
        return base.state if base is not None else self.__dict__["_own_state"]

    @state.setter
    def state(self, value):
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.state = value
        else:
            self.__dict__["_own_state"] = value

    # ---- pure PyTorch API -------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False):
        """Perturb the masked parameters to w + e using the gradients now in `.grad`."""
        if self._phase != _READY:
            raise RuntimeError(f"FSAM.first_step() called in phase '{self._phase}': call "
                               "second_step() to finish the previous step first")
        self._check_not_engine_driven("first_step")
        self._perturb(self._current_grads(clone=False))
        self._phase = _PERTURBED
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False):
        """Restore w exactly and take the base optimizer's step with the gradients at w + e."""
        if self._phase != _PERTURBED:
            raise RuntimeError(f"FSAM.second_step() called in phase '{self._phase}': call "
                               "first_step() (after the first backward) before second_step()")
        self._check_not_engine_driven("second_step")
        self.restore_remaining()
        self.base_optimizer.step()
        self._base_stepped = True
        self._opt_called = True  # torch LR schedulers look for this; second_step bypasses step()
        self.end_step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """Under DeepSpeed: called by the engine (capture the gradients, or restore and take the
        base step). Otherwise: `closure` zeroes nothing itself, runs forward + backward and returns
        the loss; it is called twice (at w, then at w + e) and the first loss is returned."""
        if self._phase == _CAPTURING:
            self._captured.extend(self._current_grads(clone=self.clone_captured_grads))
            return None
        if self._phase == _PERTURBED and self.engine_driven:
            with torch.no_grad(), _region("fsam.restore"):
                for group in self.param_groups:   # under ZeRO-1/2: the one group being stepped
                    for p in group["params"]:
                        self._restore(p)
            self._base_stepped = True
            with _region("fsam.base_step"):
                return self.base_optimizer.step()
        if self.allow_base_steps:
            return self.base_optimizer.step(closure)
        if self.engine_driven:
            raise RuntimeError("FSAM under DeepSpeed must be driven by fsam_ds.train_step(); "
                               "engine.step() was called outside an FSAM step")
        if closure is None:
            raise RuntimeError("FSAM.step() needs a closure that runs forward + backward and "
                               "returns the loss; or call first_step() and second_step()")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step(zero_grad=True)
        return loss

    # ---- engine-driven API (used by fsam_ds.train_step) ---------------------------------------
    def set_shard_layouts(self, layouts: dict, process_group, clone_captured_grads: bool = True) -> None:
        """layouts: id(tensor) -> ShardLayout for the fp32 partitions DeepSpeed will show us.
        clone_captured_grads=False keeps references to the gradients the wrapper hands step()
        (saving a 4-byte-per-element copy) where the wrapper neither reuses nor zeroes them before
        FSAM perturbs, which happens before the next backward."""
        self.clone_captured_grads = clone_captured_grads
        self._layouts = dict(layouts)
        self.process_group = process_group
        self.engine_driven = True
        self._global_counts = None

    def begin_capture(self) -> None:
        if self._phase != _READY:
            raise RuntimeError(f"FSAM.begin_capture() called in phase '{self._phase}'")
        self._captured = []
        self._phase = _CAPTURING

    @torch.no_grad()
    def perturb_captured(self) -> bool:
        """Perturb the tensors whose gradients step() captured. Returns False when nothing was
        perturbed: no gradients reached us (the wrapper skipped the step on an fp16 overflow, so
        this step's second pass runs at w) or rho == 0."""
        if self._phase != _CAPTURING:
            raise RuntimeError(f"FSAM.perturb_captured() called in phase '{self._phase}'")
        captured, self._captured = self._captured, []
        self._phase = _PERTURBED
        if captured:
            self._perturb(captured)
        return bool(self._saved)

    @torch.no_grad()
    def restore_remaining(self) -> bool:
        """Restore every tensor still perturbed; True if any was (the caller republishes them)."""
        restored = bool(self._saved)
        for tensor, _ in list(self._saved.values()):
            self._restore(tensor)
        return restored

    def end_step(self) -> None:
        """Close the FSAM step; it counts (for mask refreshes) only if the base optimizer stepped."""
        assert not self._saved, "FSAM.end_step() with weights still perturbed"
        if self._base_stepped:
            self.num_steps += 1
        self._base_stepped = False
        self._phase = _READY

    def abort_step(self) -> None:
        """After an exception mid-step (weights already restored by the caller)."""
        self._captured, self._saved = [], {}
        self._base_stepped = False
        self._phase = _READY

    # ---- the step's math over this rank's tensors ---------------------------------------------
    def _current_grads(self, clone: bool):
        return [(p, p.grad.detach().clone() if clone else p.grad.detach())
                for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _layout(self, tensor) -> ShardLayout:
        layout = self._layouts.get(id(tensor))
        if layout is None:
            name = self._param_names.get(id(tensor))
            layout = ShardLayout.whole(tensor.numel(), self.config.is_always_perturbed(name))
        return layout

    def _perturb(self, entries) -> None:
        cfg = self.config
        self._saved = {}
        if cfg.rho == 0 or not entries:
            self.last_stats = {}
            return  # exactly the base optimizer: nothing to perturb, nothing to restore
        # 1. the global gradient norm (adaptive: of w*g) and ||m*d||, in one all-reduce; on refresh
        #    steps the mask comes later, so ||m*d|| takes a second one. Checked before any write.
        refresh = (self.num_steps % cfg.mask_interval == 0 or not self._masks_valid
                   or any(id(w) not in self._masks for w, _ in entries))
        with _region("fsam.norm"):
            sums = self._sum_norm_terms(entries, use_mask=not refresh)
        grad_norm = math.sqrt(float(sums[0]))
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"FSAM: the first-pass gradient norm is {grad_norm}; the weights were not "
                "perturbed. Lower the learning rate, or use fp16 loss scaling, which skips such steps.")
        # 2. the mask, on refresh steps (collective: the exact top-k threshold)
        if refresh:
            self._refresh_masks(entries)
            sums[1] = self._sum_norm_terms(entries, use_mask=True, with_norm=False)[1]
        # 3. e on the masked elements of each local tensor, original values saved for restore
        scale = cfg.rho / (grad_norm + fisher_math.NORM_EPS)
        with _region("fsam.apply_perturbation"):
            for w, g in entries:
                mask = self._masks[id(w)][1]
                self._saved[id(w)] = (w, fisher_math.perturb_(w, g, mask, scale, cfg.adaptive))
        self.last_stats.update(grad_norm=grad_norm, perturb_scale=scale,
                               perturbation_norm=scale * math.sqrt(float(sums[1])))

    def _sum_norm_terms(self, entries, use_mask: bool, with_norm: bool = True) -> torch.Tensor:
        """[||x||^2, ||m*d||^2] summed over this rank's tensors, then over the group."""
        sums = torch.zeros(2, dtype=torch.float32, device=entries[0][1].device)
        for w, g in entries:
            mask = self._masks[id(w)][1] if use_mask else None
            sums += fisher_math.norm_sq_terms(w, g, mask, self.config.adaptive, with_norm)
        return collectives.all_reduce_sum_(sums, self.process_group)

    def _refresh_masks(self, entries) -> None:
        cfg, group = self.config, self.process_group
        layouts = [self._layout(w) for w, _ in entries]
        device = entries[0][0].device
        if self._global_counts is None:   # static: the shard layouts never change
            counts = torch.tensor([sum(l.num_ranked for l in layouts),
                                   sum(l.num_always for l in layouts)], dtype=torch.int64,
                                  device=device)
            self._global_counts = tuple(collectives.all_reduce_sum_(counts, group).tolist())
        num_ranked, num_always = self._global_counts
        k = fisher_math.num_kept(num_ranked, cfg.sparsity)
        threshold = None
        self._masks, self._masks_valid = {}, False   # the old masks go before the new ones come
        if k < num_ranked:
            chunks = self._score_chunks(entries, layouts)
            with _region("fsam.refresh_threshold"):
                found = exact_topk_threshold(lambda: (scores for _, _, scores in chunks()), k, group)
            threshold = found.value
            with _region("fsam.refresh_mask"):
                masks = self._masks_from_threshold(entries, layouts, chunks, found)
        else:   # every ranked element is kept (SAM): the dense ALL mask, no gathers
            masks = [fisher_math.ALL if layout.num_ranked or layout.num_always
                     else layout.build_mask(None, device).view_as(w)
                     for (w, _), layout in zip(entries, layouts)]
        self._masks = {id(w): (w, m) for (w, _), m in zip(entries, masks)}
        self._masks_valid = True
        self.last_stats = {"threshold": threshold, "num_kept": k,
                           "threshold_narrowed": found.narrowed if threshold is not None else None,
                           "mask_density": (k + num_always) / max(1, num_ranked + num_always)}

    def _score_chunks(self, entries, layouts):
        """A generator function over this rank's ranked Fisher scores, chunk by chunk in entry and
        range order, as (entry index, pieces, scores): `pieces` are the (start, end) ranges of the
        tensor whose scores are concatenated in `scores`. Recomputed on every call (the threshold
        reads them up to four times, the mask once more): squaring a gradient chunk again is
        cheaper than holding a 4-byte score per element. A chunk gathers many ranked ranges (a
        ZeRO partition has ~4 per transformer layer) up to CHUNK_NUMEL elements, because the
        per-chunk work is many small kernels and a host sync: per-range chunks made the refresh
        launch-bound (~100 chunks for a 355M model on an H200)."""
        use_adam_state = self.config.fisher == "exp_avg_sq" and all(
            "exp_avg_sq" in self.state.get(w, {}) for w, _ in entries)
        sources = [(self.state[w]["exp_avg_sq"] if use_adam_state else g).detach().reshape(-1)
                   for w, g in entries]
        windows = [(i, pieces) for i, layout in enumerate(layouts)
                   for pieces in _windows(layout.ranked, CHUNK_NUMEL)]

        def chunks():
            for i, pieces in windows:
                parts = [sources[i][start:end] for start, end in pieces]
                values = parts[0] if len(parts) == 1 else torch.cat(parts)
                yield i, pieces, (values.float() if use_adam_state else
                                  fisher_math.fisher_scores(values))
        return chunks

    @staticmethod
    def _masks_from_threshold(entries, layouts, chunks, found):
        """Each tensor's mask: ranked elements above the threshold (ties shared out in order),
        always-perturbed ranges, padding never; as positions where that is cheaper (MaskBuilder),
        built chunk by chunk so that no full-length temporary exists."""
        builders = []
        for (w, _), layout in zip(entries, layouts):
            builder = fisher_math.MaskBuilder(w.numel(), w.device, positions_allowed=w.is_contiguous())
            for start, end in layout.always:
                builder.keep_range(start, end)
            builders.append(builder)
        ties_left = found.num_ties_kept
        for i, pieces, scores in chunks():
            keep, ties_taken = fisher_math.mask_chunk_from_threshold(scores, found.value, ties_left)
            builders[i].keep_pieces(pieces, keep)
            ties_left -= ties_taken
        masks = [builder.finish() for builder in builders]
        return [m.view_as(w) if m.dtype == torch.bool else m for (w, _), m in zip(entries, masks)]

    def _restore(self, tensor) -> None:
        entry = self._saved.pop(id(tensor), None)
        if entry is not None:
            fisher_math.restore_(tensor, self._masks[id(tensor)][1], entry[1])

    def _check_not_engine_driven(self, method):
        if self.engine_driven:
            raise RuntimeError(f"FSAM.{method}() is the pure-PyTorch API; under DeepSpeed use "
                               "fsam_ds.train_step(engine, loss_fn, micro_batches)")

    def invalidate_masks(self, reason: str) -> None:
        """Forget the masks; the next step recomputes them (a collective: call on all ranks)."""
        warnings.warn(f"FSAM: {reason}; the mask is recomputed at the next step.")
        self._masks, self._masks_valid = {}, False

    def local_kept_ranked(self) -> int:
        """How many ranked elements of this rank's tensors the current mask keeps."""
        kept = 0
        for tensor, mask in self._masks.values():
            layout = self._layout(tensor)
            if mask is fisher_math.ALL:
                kept += layout.num_ranked
            elif mask.dtype == torch.bool:
                kept += int(layout.take_ranked(mask.reshape(-1)).sum())
            else:   # positions
                kept += sum(int(((mask >= s) & (mask < e)).sum()) for s, e in layout.ranked)
        return kept

    def state_bytes(self) -> int:
        """Bytes FSAM itself holds on this rank between steps (masks; saved values while
        perturbed), excluding the base optimizer's state."""
        held = [mask for _, mask in self._masks.values() if mask is not fisher_math.ALL] + \
            [v for _, v in self._saved.values()]
        return sum(t.numel() * t.element_size() for t in held)

    # ---- checkpoints --------------------------------------------------------------------------
    def _indexed_tensors(self):
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self):
        """The base optimizer's state_dict plus an "fsam" entry: step counter and masks (bool, or
        int32 positions, or "all"; keyed by the parameter's index in param_groups order, as torch keys state)."""
        state = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(self._indexed_tensors())}
        state["fsam"] = {
            "num_steps": self.num_steps,
            "config": self.config.to_dict(),
            "masks": {index[key]: mask if mask is fisher_math.ALL else mask.clone()
                      for key, (_, mask) in self._masks.items() if key in index}
            if self._masks_valid else {},
        }
        return state

    def load_state_dict(self, state_dict):
        if self._phase != _READY:
            raise RuntimeError(f"FSAM.load_state_dict() called in phase '{self._phase}'")
        state_dict = dict(state_dict)
        fsam_state = state_dict.pop("fsam", None)
        self.base_optimizer.load_state_dict(state_dict)
        if fsam_state is None:
            self._masks, self._masks_valid = {}, False
            return
        self.num_steps = int(fsam_state["num_steps"])
        tensors = self._indexed_tensors()
        saved_masks = fsam_state.get("masks", {})
        masks = {}
        for i, mask in saved_masks.items():
            i = int(i)
            if i >= len(tensors) or not _mask_fits(mask, tensors[i]):
                masks = None
                break
            masks[id(tensors[i])] = (tensors[i], mask if mask is fisher_math.ALL else
                                     mask.to(device=tensors[i].device))
        if masks and len(masks) == len(tensors):
            self._masks, self._masks_valid = masks, True
        else:
            if saved_masks:
                warnings.warn("FSAM: the saved masks do not fit these parameters (different "
                              "world size or model); the mask is recomputed at the next step.")
            self._masks, self._masks_valid = {}, False


def _mask_fits(mask, tensor) -> bool:
    """A saved mask can be reused for `tensor`: "all", a bool mask of its shape, or int32
    positions inside it (of a contiguous tensor)."""
    if mask is fisher_math.ALL:
        return True
    if mask.dtype == torch.bool:
        return mask.shape == tensor.shape
    return (mask.dtype == torch.int32 and mask.dim() == 1 and tensor.is_contiguous()
            and (mask.numel() == 0 or int(mask.max()) < tensor.numel()))


def _windows(ranges, limit: int):
    """Group sorted (start, end) ranges, in order, into lists holding at most `limit` elements in
    all, splitting ranges longer than that."""
    window, size = [], 0
    for start, end in ranges:
        while start < end:
            take = min(end - start, limit - size)
            window.append((start, start + take))
            size += take
            start += take
            if size == limit:
                yield window
                window, size = [], 0
    if window:
        yield window
