"""`FSAMCore`: the FSAM step over one rank's tensors, shared by the pure-PyTorch `FSAM` optimizer and
the DeepSpeed client. It owns the masks, the values saved for restore and the refresh schedule; it
owns no parameters and no base optimizer.

One perturbation, on every rank of `process_group` (None: this rank holds everything):
  1. local sums      ||g||^2 (adaptive ||w*g||^2) and ||m*d||^2 over the real elements, the counts
                     |R| and |always|, how many slots lack a usable mask or Adam state
  2. one all-reduce  of those sums: the step plan. Every rank reads the same plan, so every rank
                     takes the same branch below (the rule: no rank-local decision before a
                     collective; all such decisions are fields of the plan)
  3. refresh         if the plan says so: exact sharded top-k threshold, masks rebuilt
  4. perturb         w[m] += e[m], original values saved per slot
and later `restore` puts the saved values back bit for bit.

Slots are keyed by a stable key (a (group, index) pair the caller chooses), never by id(tensor):
masks survive torch.save/torch.load and are checked against the slot's layout before reuse.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fsam_ds import collectives, fisher_math
from fsam_ds.config import FSAMConfig
from fsam_ds.shard_layout import ShardLayout
from fsam_ds.shard_mask import MaskBuilder, ShardMask, full_mask, position_dtype
from fsam_ds.topk_threshold import (CHUNK_NUMEL, ON_DEVICE_MAX_TOTAL, exact_topk_threshold,
                                    exact_topk_threshold_on_device)

STATE_VERSION = 2
_region = torch.profiler.record_function   # named ranges for bench/profile_step.py


@dataclass(frozen=True)
class Slot:
    """One tensor the base optimizer updates on this rank, with its first-pass gradient: a tensor,
    or a function that derives it afresh at each use (the DeepSpeed adapter's ZeRO-3 gradients,
    which are not held between uses: holding every sub-group's fp32 gradient until the
    perturbation cost 4 bytes per local parameter)."""
    key: tuple
    weight: torch.Tensor
    grad: object          # torch.Tensor, or a zero-argument callable returning one
    layout: ShardLayout

    def gradient(self) -> torch.Tensor:
        return self.grad() if callable(self.grad) else self.grad


@dataclass(frozen=True)
class StepPlan:
    """The all-reduced facts every rank acts on."""
    grad_norm: float          # ||g|| (adaptive: ||w*g||) over the group, padding excluded
    masked_norm_sq: float     # ||m*d||^2 with the stored masks (meaningless when refresh)
    refresh: bool
    num_ranked: int
    num_always: int
    use_adam_state: bool


def _key_str(key) -> str:
    return ".".join(str(k) for k in key)


class FSAMCore:
    def __init__(self, config: FSAMConfig, process_group=None):
        self.config = config
        self.process_group = process_group
        self.num_steps = 0                 # t: completed optimizer steps (the base optimizer stepped)
        self.last_refresh_window = -1      # t // mask_interval at the last refresh
        self.masks: dict = {}              # key -> ShardMask
        self.mask_layouts: dict = {}       # key -> the ShardLayout its mask was built for
        self.saved: dict = {}              # key -> (weight, original values at the mask)
        self.last_stats: dict = {}
        self.mask_stats: dict = {}         # the current mask's refresh stats (threshold, density, ...)
        self._loaded_masks: dict = {}      # key str -> ShardMask from a checkpoint, checked at use

    # ---- the schedule ---------------------------------------------------------------------------
    def perturbs_this_step(self) -> bool:
        """False: this step is one plain pass and a base step (rho == 0, or an interval-mode step
        between perturbed ones). Equal on all ranks: it reads only num_steps and the config."""
        return self.config.rho > 0 and self.num_steps % self.config.sam_interval == 0

    def _refresh_due(self) -> bool:
        return self.num_steps // self.config.mask_interval > self.last_refresh_window

    # ---- one perturbation -----------------------------------------------------------------------
    @torch.no_grad()
    def perturb(self, slots: list, adam_state: Optional[Callable] = None,
                reported_grad_norm: Optional[float] = None) -> StepPlan:
        """Steps 1-4 above. adam_state(weight) -> the base optimizer's state dict for it (for
        fisher="exp_avg_sq"). reported_grad_norm: the norm to report as grad_norm when the
        gradients reached us clipped (DeepSpeed clips before its client sees them)."""
        assert not self.saved, "FSAMCore.perturb() with weights still perturbed"
        cfg = self.config
        if not slots:
            raise RuntimeError("FSAM: no gradients reached the optimizer in the first pass")
        for slot in slots:
            self._adopt_loaded_mask(slot)
        # 1. local sums
        device = slots[0].weight.device
        missing = [s for s in slots if not self._mask_usable(s)]
        with _region("fsam.norm"):
            norm_terms = _norm_terms(slots, None if missing else self.masks, cfg.adaptive)
        wants_state = cfg.fisher == "exp_avg_sq"
        lacking_state = sum(1 for s in slots if not wants_state or adam_state is None
                            or "exp_avg_sq" not in adam_state(s.weight))
        counts = collectives.to_device(torch.tensor(
            [len(missing), sum(s.layout.num_ranked for s in slots),
             sum(s.layout.num_always for s in slots), lacking_state], dtype=torch.float64), device)
        local = torch.cat([norm_terms.to(device=device, dtype=torch.float64), counts])
        # 2. the step plan: one all-reduce
        total = collectives.all_reduce_sum_(local, self.process_group).tolist()
        grad_norm = math.sqrt(total[0])
        plan = StepPlan(grad_norm=grad_norm, masked_norm_sq=total[1],
                        refresh=self._refresh_due() or total[2] > 0,
                        num_ranked=int(total[3]), num_always=int(total[4]),
                        # Adam's second moment only once FSAM itself has taken a base step: state
                        # made by a wrapper's zero-gradient set-up step is all zeros (spec: t = 0)
                        use_adam_state=wants_state and self.num_steps > 0 and total[5] == 0)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"FSAM: the first-pass gradient norm is {grad_norm}; the weights were not "
                "perturbed. Lower the learning rate, or use fp16/bf16 with DeepSpeed's overflow "
                "check, which skips such steps.")
        # 3. refresh
        # the mask's stats come from its refresh, not from last_stats: a plain interval-mode step
        # in between replaces last_stats (and must not leave its "perturbed": False behind)
        masked_norm_sq = plan.masked_norm_sq
        if plan.refresh:
            self.mask_stats = self._refresh(slots, plan, adam_state)
            self.last_refresh_window = self.num_steps // cfg.mask_interval
            sums = _norm_terms(slots, self.masks, cfg.adaptive, valid=False)[1:].to(
                device=device, dtype=torch.float64)
            masked_norm_sq = float(collectives.all_reduce_sum_(sums, self.process_group)[0])
        # 4. perturb the masked elements, originals saved for restore
        scale = cfg.rho / (grad_norm + fisher_math.NORM_EPS)
        with _region("fsam.apply_perturbation"):
            for batch in _gradient_batches(slots):
                saved = fisher_math.perturb_many_(
                    [s.weight for s in batch], [s.gradient() for s in batch],
                    [self.masks[s.key] for s in batch], scale, cfg.adaptive)
                self.saved.update((s.key, (s.weight, v)) for s, v in zip(batch, saved))
        stats = dict(self.mask_stats)
        stats.update(perturbed=True, refreshed=plan.refresh, perturb_scale=scale,
                     grad_norm=grad_norm if reported_grad_norm is None else reported_grad_norm,
                     perturbation_norm=scale * math.sqrt(max(0.0, masked_norm_sq)))
        self.last_stats = stats
        return plan

    def _mask_usable(self, slot: Slot) -> bool:
        """A mask fits when it was built (or, after a load, checked) for this very layout: no
        per-step scan of the positions, which would cost a host sync per slot."""
        layout = self.mask_layouts.get(slot.key)
        return slot.key in self.masks and (layout is slot.layout or layout == slot.layout)

    def _adopt_loaded_mask(self, slot: Slot) -> None:
        mask = self._loaded_masks.pop(_key_str(slot.key), None)
        if mask is not None and mask.fits(slot.layout):
            mask.positions = mask.positions.to(slot.weight.device)
            self.masks[slot.key] = mask
            self.mask_layouts[slot.key] = slot.layout

    def _refresh(self, slots, plan: StepPlan, adam_state) -> dict:
        cfg, group = self.config, self.process_group
        k = fisher_math.num_kept(plan.num_ranked, cfg.sparsity)
        self.masks = {}   # the old masks go before the new ones come
        self.mask_layouts = {s.key: s.layout for s in slots}
        threshold = found = None
        if k < plan.num_ranked and plan.num_ranked <= ON_DEVICE_MAX_TOTAL:
            found = self._refresh_on_device(slots, plan, adam_state, k)
            threshold = found.value
        elif k < plan.num_ranked:
            chunks = self._score_chunks(slots, plan.use_adam_state, adam_state)
            with _region("fsam.refresh_threshold"):
                found = exact_topk_threshold(lambda: (scores for _, _, scores in chunks()), k, group)
            threshold = found.value
            with _region("fsam.refresh_mask"):
                builders = []
                for slot in slots:
                    builder = MaskBuilder(slot.layout.numel, slot.weight.device)
                    for start, end in slot.layout.always:
                        builder.keep_range(start, end)
                    builders.append(builder)
                ties_left = found.num_ties_kept
                for i, pieces, scores in chunks():
                    keep, taken = fisher_math.mask_chunk_from_threshold(scores, found.value, ties_left)
                    builders[i].keep_pieces(pieces, keep)
                    ties_left -= taken
                for slot, builder in zip(slots, builders):
                    self.masks[slot.key] = builder.finish()
        else:   # every ranked element is kept (SAM): dense ranges, no positions
            for slot in slots:
                self.masks[slot.key] = full_mask(slot.layout, slot.weight.device)
        return {"threshold": threshold, "num_kept": k, "num_ranked": plan.num_ranked,
                "threshold_narrowed": found.narrowed if found is not None else None,
                "fisher_source": "exp_avg_sq" if plan.use_adam_state else "grad_sq",
                "mask_density": (k + plan.num_always) / max(1, plan.num_ranked + plan.num_always)}

    def _refresh_on_device(self, slots, plan: StepPlan, adam_state, k: int):
        """The refresh for small models (at most ON_DEVICE_MAX_TOTAL ranked elements over the
        group): this rank's scores in one fp32 buffer (built tensor batch by tensor batch, one
        derived ZeRO-3 gradient at a time), the on-device exact threshold (one host read), one
        mask comparison and one nonzero over the whole buffer, and one host read of how many kept
        positions fall in each slot. A few syncs per refresh instead of several per chunk."""
        pieces = [(i, start, end) for i, s in enumerate(slots) for start, end in s.layout.ranked]
        num_local = sum(end - start for _, start, end in pieces)
        device = slots[0].weight.device
        scores = torch.empty(num_local, dtype=torch.float32, device=device)
        offsets, offset = [], 0        # where each piece starts in `scores`
        for _, start, end in pieces:
            offsets.append(offset)
            offset += end - start
        with _region("fsam.refresh_scores"):
            by_slot: dict = {}          # slot index -> [(view of scores, start, end)]
            for view, (i, start, end) in zip(scores.split([e - s for _, s, e in pieces]), pieces):
                by_slot.setdefault(i, []).append((view, start, end))
            index_of = {id(slot): i for i, slot in enumerate(slots)}
            for batch in _gradient_batches(slots):
                targets, sources = [], []
                for slot in batch:
                    src = (adam_state(slot.weight)["exp_avg_sq"] if plan.use_adam_state else
                           slot.gradient()).detach().reshape(-1)
                    for view, start, end in by_slot.get(index_of[id(slot)], ()):
                        targets.append(view)
                        sources.append(src[start:end])
                    del src
                if targets:
                    torch._foreach_copy_(targets, sources)
                    if not plan.use_adam_state:   # F = g*g
                        torch._foreach_mul_(targets, targets)
                del targets, sources
        with _region("fsam.refresh_threshold"):
            found = exact_topk_threshold_on_device(scores, k, self.process_group,
                                                   total=plan.num_ranked)
        with _region("fsam.refresh_mask"):
            keep = fisher_math.mask_from_threshold_tensor(scores, found.value, found.num_ties_kept,
                                                          found.num_ties_local)
            del scores
            positions = keep.nonzero().view(-1)   # a host sync: the kept count sizes it
            del keep
            narrow = all(position_dtype(s.layout.numel) == torch.int32 for s in slots)
            kept_of = {}
            if pieces:
                # positions in `scores` -> the piece each falls in -> position in its tensor
                firsts = [j for j, p in enumerate(pieces) if j == 0 or p[0] != pieces[j - 1][0]]
                num_pieces = len(pieces)
                table = collectives.to_device(torch.tensor(
                    offsets + [start - off for (_, start, _), off in zip(pieces, offsets)]
                    + [offsets[j] for j in firsts], dtype=torch.int64), device)
                piece_starts, shifts = table[:num_pieces], table[num_pieces:2 * num_pieces]
                slot_starts = table[2 * num_pieces:]
                piece = torch.searchsorted(piece_starts, positions, right=True).sub_(1)
                tensor_positions = positions + shifts.index_select(0, piece)
                del piece
                cuts = torch.searchsorted(positions, slot_starts).tolist() + [positions.numel()]
                if narrow:
                    tensor_positions = tensor_positions.to(torch.int32)
                kept_of = {pieces[j][0]: tensor_positions[a:b]
                           for j, a, b in zip(firsts, cuts, cuts[1:])}
            del positions
            nothing = {}   # dtype -> one empty positions tensor shared by the slots keeping none
            for i, slot in enumerate(slots):
                kept = kept_of.get(i)
                if kept is None:
                    dtype = position_dtype(slot.layout.numel)
                    if dtype not in nothing:
                        nothing[dtype] = torch.zeros(0, dtype=dtype, device=device)
                    kept = nothing[dtype]
                self.masks[slot.key] = ShardMask(
                    slot.layout.numel, tuple(slot.layout.always),
                    kept if kept.dtype == position_dtype(slot.layout.numel) else
                    kept.to(position_dtype(slot.layout.numel)))
        return found

    @staticmethod
    def _score_chunks(slots, use_adam_state: bool, adam_state):
        """A generator function over this rank's ranked Fisher scores, chunk by chunk in slot and
        range order, as (slot index, pieces, scores): `pieces` are the (start, end) ranges whose
        scores are concatenated in `scores`. Recomputed on every call (the threshold reads them up
        to four times, the mask once more): squaring a gradient chunk again is cheaper than holding
        a 4-byte score per element. A chunk gathers many ranked ranges (a ZeRO partition has ~4 per
        transformer layer) up to CHUNK_NUMEL elements: per-range chunks made the refresh
        launch-bound."""
        def source(slot):
            return (adam_state(slot.weight)["exp_avg_sq"] if use_adam_state else
                    slot.gradient()).detach().reshape(-1)
        windows = [(i, pieces) for i, s in enumerate(slots)
                   for pieces in _windows(s.layout.ranked, CHUNK_NUMEL)]

        def chunks():
            # one slot's source alive at a time (windows run in slot order): a derived gradient
            # is made once per slot and read, not held for the whole refresh
            current, values_of = None, None
            for i, pieces in windows:
                if i != current:
                    current, values_of = i, None
                    values_of = source(slots[i])
                parts = [values_of[start:end] for start, end in pieces]
                values = parts[0] if len(parts) == 1 else torch.cat(parts)
                yield i, pieces, (values.float() if use_adam_state else
                                  fisher_math.fisher_scores(values))
        return chunks

    # ---- restore and the end of a step ----------------------------------------------------------
    @torch.no_grad()
    def restore(self, key) -> bool:
        """Put slot `key`'s saved values back (bit-exact); False if it was not perturbed."""
        return self.restore_many([key])

    @torch.no_grad()
    def restore_many(self, keys) -> bool:
        """Restore the slots `keys` that are perturbed, in one batch (a few kernels in all, not a
        few per slot); True if any was."""
        entries = [(key, self.saved.pop(key)) for key in keys if key in self.saved]
        if entries:
            fisher_math.restore_many_([w for _, (w, _) in entries],
                                      [self.masks[key] for key, _ in entries],
                                      [v for _, (_, v) in entries])
        return bool(entries)

    @torch.no_grad()
    def restore_all(self) -> bool:
        """Restore every slot still perturbed; True if any was (the caller republishes them)."""
        return self.restore_many(list(self.saved))

    def finish_step(self, base_stepped: bool) -> None:
        """The step counts (for the schedule) only if the base optimizer stepped."""
        assert not self.saved, "FSAM step finished with weights still perturbed"
        if base_stepped:
            self.num_steps += 1

    def abort_step(self) -> None:
        """After an exception mid-step, once the caller restored (or gave up on) the weights."""
        self.saved = {}

    # ---- introspection ----------------------------------------------------------------------------
    def local_kept_ranked(self, layouts: dict) -> int:
        """How many ranked elements of this rank's slots the current masks keep. layouts: key ->
        ShardLayout."""
        kept = 0
        for key, mask in self.masks.items():
            layout = layouts[key]
            kept += sum(min(e, le) - max(s, ls) for s, e in mask.dense for ls, le in layout.ranked
                        if min(e, le) > max(s, ls))
            for s, e in layout.ranked:
                kept += int(((mask.positions >= s) & (mask.positions < e)).sum())
        return kept

    def state_bytes(self) -> int:
        """Bytes held on this rank between steps (mask positions; saved values while perturbed)."""
        return sum(m.nbytes for m in self.masks.values()) + \
            sum(v.numel() * v.element_size() for _, v in self.saved.values())

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        masks = {key: m.to_state() for key, m in self._loaded_masks.items()}   # not used yet
        masks.update({_key_str(k): m.to_state() for k, m in self.masks.items()})
        return {"version": STATE_VERSION, "num_steps": self.num_steps,
                "last_refresh_window": self.last_refresh_window,
                "config": self.config.to_dict(), "masks": masks}

    def load_state_dict(self, state: dict) -> None:
        """Masks are kept aside and checked against each slot's layout at the next step; a slot
        whose mask does not fit (another world size or model) makes every rank refresh."""
        if self.saved:
            raise RuntimeError("FSAM.load_state_dict() called while the weights are perturbed")
        self.num_steps = int(state["num_steps"])
        self.masks, self.mask_layouts = {}, {}
        self._loaded_masks = {}
        if state.get("version") != STATE_VERSION:
            # a checkpoint of fsam_ds 0.1 (masks keyed by position in param_groups, "all"/bool)
            self.last_refresh_window = -1
            if state.get("masks"):
                warnings.warn("FSAM: the checkpoint's masks are in fsam_ds 0.1's format; the mask "
                              "is recomputed at the next step.")
            return
        self.last_refresh_window = int(state["last_refresh_window"])
        for key, mask_state in state.get("masks", {}).items():
            self._loaded_masks[key] = ShardMask.from_state(mask_state, "cpu")

    def forget_masks(self, reason: str) -> None:
        """The next step recomputes the masks (on every rank: the plan carries the decision)."""
        warnings.warn(f"FSAM: {reason}; the mask is recomputed at the next step.")
        self.masks, self.mask_layouts, self._loaded_masks = {}, {}, {}


def _gradient_batches(slots):
    """The slots in order, in lists that the *_many math takes at once: consecutive slots whose
    gradient is a tensor go together; a slot whose gradient is derived on demand (ZeRO-3) goes
    alone, so that at most one derived gradient is alive at a time (the caller derives it inside
    the call that uses it)."""
    batch = []
    for slot in slots:
        if callable(slot.grad):
            if batch:
                yield batch
                batch = []
            yield [slot]
        else:
            batch.append(slot)
    if batch:
        yield batch


def _norm_terms(slots, masks, adaptive: bool, valid: bool = True) -> torch.Tensor:
    """fisher_math.norm_sq_terms summed over the slots in fp64, batch by batch; masks: key ->
    ShardMask, or None. valid=False: only the masked sum (the first is 0)."""
    total = None
    for batch in _gradient_batches(slots):
        terms = fisher_math.norm_sq_terms_many(
            [s.weight for s in batch], [s.gradient() for s in batch],
            [s.layout.valid if valid else () for s in batch],
            None if masks is None else [masks[s.key] for s in batch], adaptive).double()
        total = terms if total is None else total.add_(terms.to(total.device))
    return total


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
