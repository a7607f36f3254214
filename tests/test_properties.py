"""Property-based tests (hypothesis): the "fsam" config block and the exact top-k selection."""
import math
import random
import re
from fractions import Fraction

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fsam_ds
from dist_harness import run_ranks
from fsam_ds import fisher_math
from fsam_ds.config import FSAMConfig
from fsam_ds.shard_layout import ShardLayout
from fsam_ds.topk_threshold import exact_topk_threshold

KEYS = ["rho", "sparsity", "mask_interval", "fisher", "adaptive", "always_perturb", "sam_interval"]
any_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 200), st.floats(allow_nan=True),
                      st.text(max_size=6), st.lists(st.text(max_size=4), max_size=3),
                      st.sampled_from(["grad_sq", "exp_avg_sq", ["bias"], ["(bad"], 0.05, 0.9]))
blocks = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=8)),
                         any_value, max_size=6)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def bad_keys(block):
    """An oracle written from the documented rules, independent of FSAMConfig."""
    bad = [k for k in block if k not in KEYS]
    checks = {
        "rho": lambda v: is_number(v) and 0 <= v < math.inf,
        "sparsity": lambda v: is_number(v) and 0 <= v < 1,
        "mask_interval": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "sam_interval": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "fisher": lambda v: v in ("grad_sq", "exp_avg_sq"),
        "adaptive": lambda v: isinstance(v, bool),
        "always_perturb": lambda v: isinstance(v, list) and all(isinstance(p, str) and _compiles(p) for p in v),
    }
    return bad + [k for k, ok in checks.items() if k in block and not ok(block[k])]


def _compiles(pattern):
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


@settings(max_examples=400, deadline=None)
@given(blocks)
def test_config_block_is_accepted_or_rejected_naming_the_key(block):
    bad = bad_keys(block)
    try:
        config = FSAMConfig.from_dict(block)
    except ValueError as err:
        assert bad, f"valid block rejected: {block}: {err}"
        assert any(repr(k) in str(err) or f"Invalid {k}" in str(err) or f"{k} pattern" in str(err)
                   for k in bad), f"{err} names none of {bad}"
        return
    assert not bad, f"invalid keys {bad} accepted in {block}"
    # an accepted block builds a working optimizer
    model = torch.nn.Linear(3, 2)
    opt = fsam_ds.FSAM(model.named_parameters(), torch.optim.SGD, lr=0.1, **config.__dict__)
    model(torch.ones(4, 3)).sum().backward()
    opt.first_step(zero_grad=True)
    model(torch.ones(4, 3)).sum().backward()
    opt.second_step(zero_grad=True)


@st.composite
def shard_layouts(draw):
    """Tensors of random sizes, cut into ranked / always-perturbed / padding pieces, with scores
    drawn from a small set (many ties, zeros) or a continuous range."""
    tensors = []
    for _ in range(draw(st.integers(1, 4))):
        numel = draw(st.integers(0, 60))
        cuts = sorted(draw(st.lists(st.integers(0, numel), max_size=4)))
        bounds = [0] + cuts + [numel]
        pieces = [(s, e, draw(st.booleans())) for s, e in zip(bounds, bounds[1:])
                  if draw(st.integers(0, 3)) > 0]   # some pieces left out: padding
        tied = draw(st.booleans())
        values = draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0]) if tied else
                               st.floats(0, 1e6, allow_nan=False, allow_infinity=False, width=32),
                               min_size=numel, max_size=numel))
        tensors.append((ShardLayout.from_pieces(numel, pieces), torch.tensor(values, dtype=torch.float32)))
    return tensors, draw(st.floats(0, 0.999))


def kept_by_the_core(tensors, sparsity, mask_interval=1):
    """Masks built by production code (FSAMCore's refresh: chunked scores, threshold, MaskBuilder)
    for slots laid out as `tensors`, with gradients whose squares are the scores."""
    from fsam_ds.fsam_core import FSAMCore, Slot
    core = FSAMCore(FSAMConfig(rho=0.05, sparsity=sparsity, mask_interval=mask_interval))
    slots = [Slot((i, 0), torch.zeros(layout.numel), scores.sqrt(), layout)
             for i, (layout, scores) in enumerate(tensors)]
    core.perturb(slots)
    core.restore_all()
    return core


@settings(max_examples=300, deadline=None)
@given(shard_layouts())
def test_random_shard_layouts_keep_exactly_the_top_k_with_ties_in_index_order(case):
    tensors, sparsity = case
    scores = [(layout, fisher_math.fisher_scores(values.sqrt())) for layout, values in tensors]
    ranked = torch.cat([values[s:e] for layout, values in scores for s, e in layout.ranked]) \
        if any(layout.ranked for layout, _ in scores) else torch.zeros(0)
    k = fisher_math.num_kept(ranked.numel(), sparsity)
    assert k == min(ranked.numel(), math.ceil((1 - Fraction(repr(sparsity))) * ranked.numel()))
    # which elements: the k largest, ties broken by position (slot, then element) - exactly
    order = torch.sort(ranked, descending=True, stable=True).indices
    expected_ranked = torch.zeros(ranked.numel(), dtype=torch.bool)
    expected_ranked[order[:k]] = True
    core = kept_by_the_core(tensors, sparsity)
    offset = 0
    for i, (layout, _) in enumerate(tensors):
        mask = core.masks[(i, 0)]
        got = torch.zeros(layout.numel, dtype=torch.bool)
        for s, e in mask.dense:
            got[s:e] = True
        got[mask.positions.long()] = True
        expected = torch.zeros(layout.numel, dtype=torch.bool)
        for s, e in layout.always:            # always-perturbed pieces are in
            expected[s:e] = True
        for s, e in layout.ranked:            # ranked: the exact top-k; padding stays out
            if k == ranked.numel():
                expected[s:e] = True
            else:
                expected[s:e] = expected_ranked[offset:offset + e - s]
            offset += e - s
        assert torch.equal(got, expected), (i, layout)


def random_layouts_on_ranks(rank, world_size, n_cases):
    import torch.distributed as dist
    out = []
    for case in range(n_cases):
        rng = random.Random(case * 100 + rank)          # each rank draws its own shard
        n = rng.choice([0, 1, 5, 50, 300])
        values = [float(rng.choice([0, 1, 2])) if case % 2 else rng.random() for _ in range(n)]
        shard = torch.tensor(values, dtype=torch.float32)
        total = torch.tensor([n])
        dist.all_reduce(total)
        k = random.Random(case).randint(0, int(total))
        found = exact_topk_threshold(shard, k, dist.group.WORLD)
        out.append((k, shard[fisher_math.mask_from_threshold(shard, found.value, found.num_ties_kept)].tolist(), values))
    return out


def test_random_shards_over_three_ranks_keep_exactly_k():
    n_cases = 40
    per_rank = run_ranks(random_layouts_on_ranks, 3, n_cases)
    for case in range(n_cases):
        k = per_rank[0][case][0]
        kept = sorted(v for r in per_rank for v in r[case][1])
        everything = torch.tensor([v for r in per_rank for v in r[case][2]])
        assert len(kept) == k
        assert kept == (sorted(torch.topk(everything, k).values.tolist()) if k else [])
