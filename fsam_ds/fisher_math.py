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

from fsam_ds.shard_mask import ShardMask, index_put_slices

NORM_EPS = 1e-12  # as in davda54/sam: keeps rho / ||g|| finite when g == 0
# The *_many functions below work on many tensors with one torch._foreach_* kernel per batch of
# views instead of a few kernels per tensor (a small model's step was launch-bound: ~100 tensors
# at MiniLM size). A batch holds at most this many elements, which bounds the temporaries.
BATCH_NUMEL = 1 << 26


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


# ---- many tensors at once -------------------------------------------------------------------------
def _split_aligned(columns, limit: int):
    """columns: equal-length lists of 1-D tensors, row i of equal numel in every column. Rows
    longer than `limit` are cut into slices of at most `limit` elements (aligned across columns)."""
    out = [[] for _ in columns]
    for row in zip(*columns):
        numel = row[0].numel()
        for start in range(0, numel, limit):
            for col, t in zip(out, row):
                col.append(t[start:start + limit] if numel > limit else t)
    return out


def _batches(columns, limit: int = None):
    """Aligned column slices of at most `limit` elements in all (rows cut where longer)."""
    limit = limit or BATCH_NUMEL
    columns = _split_aligned(columns, limit)
    start, size = 0, 0
    for i, t in enumerate(columns[0]):
        if size + t.numel() > limit and i > start:
            yield [col[start:i] for col in columns]
            start, size = i, 0
        size += t.numel()
    if start < len(columns[0]):
        yield [col[start:] for col in columns]


def _as(views, dtype):
    return [v if v.dtype == dtype else v.to(dtype) for v in views]


def _sum_sq_many(views, weights=None) -> torch.Tensor:
    """sum over the views of ||x||^2 in fp32, x = v (or w*v when `weights` are given), with one
    foreach norm (and one foreach product) per batch."""
    terms = []
    columns = [views] if weights is None else [views, weights]
    for batch in _batches(columns):
        x = _as(batch[0], torch.float32)
        if weights is not None:
            x = torch._foreach_mul(_as(batch[1], torch.float32), x)
        terms.extend(torch._foreach_norm(x))
    if not terms:
        return None
    return torch.stack(terms).square().sum()


def norm_sq_terms_many(weights, grads, valids, masks, adaptive: bool) -> torch.Tensor:
    """norm_sq_terms summed over many tensors: [sum ||x||^2, sum ||m*d||^2] in fp32. masks: a
    list (one ShardMask per tensor), or None (not known yet: the second sum is 0). valids: the
    (start, end) real ranges of each tensor; () skips the first sum for that tensor."""
    g_views, w_views = [], []
    for w, g, valid in zip(weights, grads, valids):
        g, w = g.detach().reshape(-1), w.detach().reshape(-1)
        g_views.extend(g[s:e] for s, e in valid if e > s)
        w_views.extend(w[s:e] for s, e in valid if e > s)
    device = grads[0].device if grads else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float32, device=device)
    norm_sq = _sum_sq_many(g_views, w_views if adaptive else None) if g_views else None
    masked_sq = None
    if masks is not None:
        d_views, dw_views = [], []
        for w, g, mask in zip(weights, grads, masks):
            g, w = g.detach().reshape(-1), w.detach().reshape(-1)
            d_views.extend(mask.dense_views(g))
            dw_views.extend(mask.dense_views(w))
            if mask.positions.numel():
                d_views.append(g.index_select(0, mask.positions))
                dw_views.append(w.index_select(0, mask.positions))
        if d_views:
            if adaptive:   # d = w*w*g: ||d||^2 = sum over the views of ||w*(w*g)||^2
                masked_sq = _sum_sq_many(torch._foreach_mul(_as(dw_views, torch.float32),
                                                            _as(d_views, torch.float32)), dw_views)
            else:
                masked_sq = _sum_sq_many(d_views)
    return torch.stack([zero if norm_sq is None else norm_sq,
                        zero if masked_sq is None else masked_sq])


def _masked_columns(weights, grads, masks):
    """The masked elements of many tensors as aligned lists: (weight views of the dense ranges,
    gradient views of them, one flat saved buffer per tensor and its dense views) plus, per tensor
    with ranked positions, (flat weight, positions, the saved buffer's positions part)."""
    w_dense, g_dense, s_dense, indexed = [], [], [], []
    # one buffer for every tensor's saved values (one allocation, not one per tensor)
    if len({(w.dtype, w.device) for w in weights}) == 1:
        saved_all = list(weights[0].new_empty(sum(m.count for m in masks)).split(
            [m.count for m in masks]))
    else:
        saved_all = [w.new_empty(m.count) for w, m in zip(weights, masks)]
    for weight, grad, mask, saved in zip(weights, grads, masks, saved_all):
        w, g = weight.detach().view(-1), grad.detach().reshape(-1)
        num_dense = 0
        for s, e in mask.dense:
            w_dense.append(w[s:e])
            g_dense.append(g[s:e])
            s_dense.append(saved[num_dense:num_dense + e - s])
            num_dense += e - s
        if mask.positions.numel():
            indexed.append((w, g, mask.positions, saved[num_dense:]))
    return w_dense, g_dense, s_dense, saved_all, indexed


def _climb(w_views, g_views, s_views, scale: float, adaptive: bool):
    """w + e for aligned views (s: the saved original w), with perturb_'s rounding:
    (g*scale) + w, adaptive ((g*(w*w))*scale) + w. Yields (w views, new values) batch by batch,
    so that only one batch's temporaries exist at a time."""
    for w_b, g_b, s_b in _batches([w_views, g_views, s_views]):
        d = _as(g_b, s_b[0].dtype)
        if adaptive:
            d = torch._foreach_mul(d, torch._foreach_mul(s_b, s_b))
            torch._foreach_mul_(d, scale)
        else:
            d = torch._foreach_mul(d, scale)
        torch._foreach_add_(d, s_b)
        yield w_b, d


def perturb_many_(weights, grads, masks, scale: float, adaptive: bool) -> list:
    """perturb_ for many tensors at once; returns each tensor's saved values (as perturb_ does,
    laid out as mask.gather), bit-identical to calling perturb_ on each. Dense ranges: a few
    foreach kernels per batch; ranked positions: one gather of w and g and one scatter per
    tensor that has any (the arithmetic is batched)."""
    w_dense, g_dense, s_dense, saved_all, indexed = _masked_columns(weights, grads, masks)
    if w_dense:
        torch._foreach_copy_(s_dense, w_dense)
        for w_b, new in _climb(w_dense, g_dense, s_dense, scale, adaptive):
            torch._foreach_copy_(w_b, new)
    if indexed:
        g_kept = []
        for w, g, positions, saved in indexed:
            torch.index_select(w, 0, positions, out=saved)
            g_kept.append(g.index_select(0, positions))
        s_views = [saved for _, _, _, saved in indexed]
        # _climb cuts rows longer than BATCH_NUMEL: walk the rows' pieces in order
        pieces = (v for _, new in _climb(s_views, g_kept, s_views, scale, adaptive) for v in new)
        for w, _, positions, saved in indexed:
            start = 0
            while start < positions.numel():
                new = next(pieces)
                index_put_slices(w, positions[start:start + new.numel()], new)
                start += new.numel()
    return saved_all


def restore_many_(weights, masks, saved) -> None:
    """restore_ for many tensors: one foreach copy for every dense range, one scatter per tensor
    with ranked positions."""
    w_dense, s_dense = [], []
    for weight, mask, values in zip(weights, masks, saved):
        w = weight.detach().view(-1)
        num_dense = 0
        for s, e in mask.dense:
            w_dense.append(w[s:e])
            s_dense.append(values[num_dense:num_dense + e - s])
            num_dense += e - s
        if mask.positions.numel():
            index_put_slices(w, mask.positions, values[num_dense:])
    if w_dense:
        torch._foreach_copy_(w_dense, s_dense)


def mask_from_threshold_tensor(scores: torch.Tensor, threshold: torch.Tensor,
                               num_ties_kept: int, num_ties_local: int) -> torch.Tensor:
    """mask_from_threshold with the threshold as a 0-d tensor on the scores' device and the tie
    counts known on the host: no host sync (the tie order needs a cumsum only when some but not
    all of this rank's ties are kept)."""
    keep = scores > threshold
    if num_ties_kept <= 0:
        return keep
    ties = scores == threshold
    if num_ties_kept >= num_ties_local:
        return keep.logical_or_(ties)
    return keep.logical_or_(ties.logical_and_(torch.cumsum(ties, 0, dtype=torch.int32)
                                               <= num_ties_kept))
