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

from fsam_ds.shard_mask import ShardMask

NORM_EPS = 1e-12  # as in davda54/sam: keeps rho / ||g|| finite when g == 0


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


def _sum_sq(views) -> torch.Tensor:
    """sum of x*x over a list of 1-D tensors, in fp32 (one fused kernel for many views)."""
    views = [v for v in views if v.numel()]
    if not views:
        return torch.zeros((), dtype=torch.float32)
    if len(views) == 1:
        v = views[0].float()
        return torch.dot(v, v)   # dot: no squared temporary
    norms = torch._foreach_norm([v.float() for v in views])
    return torch.stack(norms).square().sum()


def norm_sq_terms(weight: torch.Tensor, grad: torch.Tensor, valid, mask: ShardMask | None,
                  adaptive: bool) -> torch.Tensor:
    """Local fp32 sums [||x||^2, ||m*d||^2] with x = g (adaptive: w*g) and d = g (adaptive: w*w*g)
    over the real elements `valid` ((start, end) ranges: partition padding, which ZeRO-3 leaves
    uninitialised, is never read), so that after one all-reduce ||g|| = sqrt(first) and
    ||e|| = scale * sqrt(second). mask=None (not known yet): the second sum is 0."""
    g = grad.detach().reshape(-1)
    w = weight.detach().reshape(-1)
    g_views = [g[s:e] for s, e in valid]
    if adaptive:
        norm_sq = _sum_sq(torch._foreach_mul([w[s:e].float() for s, e in valid],
                                             [v.float() for v in g_views]) if valid else [])
    else:
        norm_sq = _sum_sq(g_views)
    masked_sq = torch.zeros((), dtype=torch.float32)
    if mask is not None:
        d = mask.gather(g).float()
        if adaptive:
            w_m = mask.gather(w).float()
            d = w_m * (w_m * d)
        masked_sq = torch.dot(d, d)
    return torch.stack([norm_sq.to(g.device), masked_sq.to(g.device)])


def perturb_(weight: torch.Tensor, grad: torch.Tensor, mask: ShardMask, scale: float,
             adaptive: bool) -> torch.Tensor:
    """w[m] += e[m] in place with e = scale * g (or scale * w*w*g); returns the original w[m]
    (laid out as mask.gather), so that restore_() puts back exactly the bits that were there.
    Only the masked elements are read, written and saved."""
    w = weight.detach().view(-1)
    g = grad.detach().reshape(-1)
    saved = mask.gather(w)
    # one kept-size temporary: (w*w)*g in davda54/sam's order, then w + scale*d
    direction = mask.gather(g).to(saved.dtype)
    if adaptive:
        direction.mul_(saved * saved)
    direction.mul_(scale).add_(saved)
    mask.scatter_(w, direction)
    return saved


def restore_(weight: torch.Tensor, mask: ShardMask, saved: torch.Tensor) -> None:
    """Undo perturb_(): write the saved original values back at the masked elements."""
    mask.scatter_(weight.detach().view(-1), saved)


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
