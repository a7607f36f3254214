"""FSAM arithmetic on flat tensors. No torch.distributed, no DeepSpeed: every function here works on
one rank's tensors, and the callers add the collectives (see ``collectives.py``).

Symbols (defined once, used only in this module):
  w      parameters (the fp32 master copy the base optimizer updates)
  g      first-pass gradient of the step's whole global batch
  F      Fisher score per element: g*g ("grad_sq") or Adam's exp_avg_sq ("exp_avg_sq")
  R      ranked elements: all but partition padding and always-perturbed parameters
  kappa  keep ratio = 1 - sparsity;  k = ceil(kappa * |R|)
  m      mask: 1 for the k elements of R with the largest F and for always-perturbed elements
  rho    perturbation radius

One FSAM step, t the step counter and T the mask refresh interval:
  if t % T == 0:  F = score(g);  m = top_k(F over R) | always          # refresh the mask
  e = rho * (m * g) / (||g|| + 1e-12)          adaptive: rho * (m*w*w*g) / (||w*g|| + 1e-12)
  w_saved = w[m];  w[m] += e[m]                                        # climb to "w + e"
  g' = grad L(w + e)                                                   # second pass, same batch
  w[m] = w_saved                                                       # bit-exact restore
  base_optimizer.step(g')
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

NORM_EPS = 1e-12  # as in davda54/sam: keeps rho / ||g|| finite when g == 0
# A mask that keeps every element (SAM, or an always-perturbed tensor): dense arithmetic, no
# masked gathers. Partition padding may be included: its gradient is 0, so e is 0 there, and the
# restore copies it back bit for bit anyway.
ALL = "all"


def num_kept(num_ranked: int, sparsity: float) -> int:
    """k = ceil((1 - sparsity) * |R|), computed on the decimal value of `sparsity` so that e.g.
    sparsity 0.7 on 10 elements keeps 3, not 4 (1 - 0.7 is 0.30000000000000004 in binary)."""
    keep_ratio = 1 - Fraction(repr(float(sparsity)))
    return min(num_ranked, math.ceil(keep_ratio * num_ranked))


def fisher_scores(grad: torch.Tensor, exp_avg_sq: torch.Tensor | None = None) -> torch.Tensor:
    """F as fp32: Adam's second moment when given (an EMA of g*g, already stored), else g*g."""
    if exp_avg_sq is not None:
        return exp_avg_sq.detach().float()
    grad = grad.detach().float()
    return grad * grad


def norm_sq_terms(weight: torch.Tensor, grad: torch.Tensor, mask, adaptive: bool,
                  with_norm: bool = True) -> torch.Tensor:
    """Local fp32 sums [||x||^2, ||m*d||^2] with x = g (adaptive: w*g) and d = g (adaptive: w*w*g),
    so that after one all-reduce ||g|| = sqrt(first) and ||e|| = scale * sqrt(second).
    mask: a bool tensor, int32 positions (MaskBuilder), ALL, or None (not known yet: the second
    sum is left 0).
    with_norm=False leaves the first sum 0 (already known: a refresh step's second call)."""
    grad = grad.detach().float().reshape(-1)
    w = weight.detach().float().reshape(-1) if adaptive else None   # only ASAM reads w
    norm_sq = masked_sq = grad.new_zeros(())
    if with_norm:
        x = w * grad if adaptive else grad
        norm_sq = torch.dot(x, x)   # dot: no squared temporary
    if mask is not None:
        # gather first, so that only the masked elements are multiplied
        g_m, w_m = grad, w
        if mask is not ALL:
            selection = mask.reshape(-1) if mask.dtype == torch.bool else mask
            g_m = _gather(grad, selection)
            w_m = _gather(w, selection) if adaptive else None
        d = w_m * (w_m * g_m) if adaptive else g_m
        masked_sq = torch.dot(d, d)
    return torch.stack([norm_sq, masked_sq])


def _gather(tensor: torch.Tensor, selection) -> torch.Tensor:
    if selection.dtype == torch.bool:
        return tensor.detach().masked_select(selection)
    return tensor.detach().reshape(-1).index_select(0, selection)


# index_put_ widens int32 positions to int64 internally: scatter in slices of this many so that
# the widened copy stays small (8 B per kept element otherwise).
SCATTER_SLICE = 1 << 24


def _scatter_(tensor: torch.Tensor, selection, values: torch.Tensor) -> None:
    if selection.dtype == torch.bool:
        tensor.detach().masked_scatter_(selection, values)
        return
    flat = tensor.detach().view(-1)   # int32 positions; the tensor is contiguous (MaskBuilder)
    for start in range(0, selection.numel(), SCATTER_SLICE):
        flat.index_put_((selection[start:start + SCATTER_SLICE],),
                        values[start:start + SCATTER_SLICE])


class MaskBuilder:
    """One tensor's mask, built chunk by chunk in any order of chunks. It is kept as int32
    positions of the kept elements while they are at most a quarter of the tensor (4 bytes each,
    so never more than a 1-byte bool mask; FSAM keeps ~10 %), and becomes a bool mask beyond
    that. Positions ascend within each chunk or range; chunks and ranges are ordered by their
    first element (a chunk spanning an always-kept range comes before it): the order only has
    to be the same at perturb and restore. Positions make the per-step gathers and scatters cost O(kept); masked_select and
    masked_scatter_ scan the whole mask with an int64 prefix sum (8 B per element) every time.
    No full-length temporary is made while positions are kept."""

    def __init__(self, numel: int, device, positions_allowed: bool = True):
        self.numel, self.device = numel, device
        self.pieces = []          # (start, int32 positions), while positions are kept
        self.count = 0
        self.bool_mask = None if positions_allowed and numel < 2 ** 31 else \
            torch.zeros(numel, dtype=torch.bool, device=device)

    def keep_range(self, start: int, end: int) -> None:
        if self.bool_mask is not None:
            self.bool_mask[start:end] = True
        elif end > start:
            self._add(start, torch.arange(start, end, dtype=torch.int32, device=self.device))

    def keep_chunk(self, start: int, keep: torch.Tensor) -> None:
        """keep: bool, for the elements start .. start + len(keep)."""
        if self.bool_mask is not None:
            self.bool_mask[start:start + keep.numel()] = keep
        else:
            self._add(start, keep.nonzero().view(-1).to(torch.int32).add_(start))

    def keep_pieces(self, pieces, keep: torch.Tensor) -> None:
        """keep: bool over the concatenation of the elements in `pieces` ((start, end) ranges,
        in increasing order), as one chunk of FSAM's scores covers several ranges."""
        if len(pieces) == 1:
            self.keep_chunk(pieces[0][0], keep)
            return
        if self.bool_mask is not None:
            offset = 0
            for start, end in pieces:
                self.bool_mask[start:end] = keep[offset:offset + end - start]
                offset += end - start
            return
        # positions in the concatenation -> positions in the tensor: add the start of the piece
        # each falls in, minus where that piece begins in the concatenation
        lengths = torch.tensor([end - start for start, end in pieces])
        chunk_starts = torch.cumsum(lengths, 0) - lengths
        shifts = torch.tensor([start for start, _ in pieces]) - chunk_starts
        positions = keep.nonzero().view(-1)
        piece = torch.searchsorted(chunk_starts.to(positions.device), positions, right=True) - 1
        positions += shifts.to(positions.device)[piece]
        self._add(pieces[0][0], positions.to(torch.int32))

    def _add(self, start: int, positions: torch.Tensor) -> None:
        self.pieces.append((start, positions))
        self.count += positions.numel()
        if 4 * self.count > self.numel:   # denser than a quarter: a bool mask is smaller
            self.bool_mask = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
            for _, piece in self.pieces:
                self.bool_mask[piece.long()] = True
            self.pieces = []

    def finish(self) -> torch.Tensor:
        """A bool mask (flat) or int32 positions."""
        if self.bool_mask is not None:
            return self.bool_mask
        ordered = [piece for _, piece in sorted(self.pieces, key=lambda item: item[0])]
        return torch.cat(ordered) if ordered else torch.zeros(0, dtype=torch.int32, device=self.device)


def perturb_(weight: torch.Tensor, grad: torch.Tensor, mask, scale: float,
             adaptive: bool) -> torch.Tensor:
    """w[m] += e[m] in place with e = scale * g (or scale * w*w*g); returns the original w[m].

    mask: ALL, a bool mask shaped like w, or int32 positions into the flattened (contiguous) w
    (see MaskBuilder). Only the masked elements are read, written and saved, so the backup costs
    (masked count) values and restore_() puts back exactly the bits that were there.
    mask=ALL: dense, a full copy."""
    if mask is ALL:
        w = weight.detach()
        saved = w.clone()
        direction = grad.detach().to(w.dtype)
        if adaptive:
            direction = saved * saved * direction
        w.add_(direction * scale)
        return saved
    saved = _gather(weight, mask)
    direction = _gather(grad, mask).to(saved.dtype)   # a fresh tensor: updated in place below
    if adaptive:
        direction.mul_(saved * saved)   # (w*w)*g, in davda54/sam's order
    direction.mul_(scale).add_(saved)   # w + scale*d, one kept-size temporary in all
    _scatter_(weight, mask, direction)
    return saved


def restore_(weight: torch.Tensor, mask, saved: torch.Tensor) -> None:
    """Undo perturb_(): write the saved original values back at the masked positions."""
    if mask is ALL:
        weight.detach().copy_(saved)
    else:
        _scatter_(weight, mask, saved)


def mask_chunk_from_threshold(scores: torch.Tensor, threshold: float, ties_left: int):
    """One chunk of the mask: keep F > threshold, plus the first `ties_left` elements with
    F == threshold (in index order). Returns (keep, how many ties it kept), so that a caller
    walking the chunks in order keeps exactly the threshold's num_ties_kept in total."""
    keep = scores > threshold
    if ties_left <= 0:
        return keep, 0
    ties = scores == threshold
    num_ties = int(ties.sum())
    if ties_left >= num_ties:
        return keep | ties, num_ties
    # Only here do we need the tie order; cumsum is a transient int64 buffer of one chunk.
    return keep | (ties & (torch.cumsum(ties, 0) <= ties_left)), ties_left


def mask_from_threshold(scores: torch.Tensor, threshold: float, num_ties_kept: int) -> torch.Tensor:
    """Keep F > threshold, plus the first `num_ties_kept` elements with F == threshold (in index
    order), so that the caller keeps exactly k in total."""
    return mask_chunk_from_threshold(scores, threshold, num_ties_kept)[0]
