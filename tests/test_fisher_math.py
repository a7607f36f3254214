"""The math module against hand-computed values."""
import pytest
import torch

from fsam_ds import fisher_math
from fsam_ds.shard_layout import ShardLayout
from fsam_ds.shard_mask import MaskBuilder, ShardMask, full_mask, position_dtype


def test_num_kept_uses_the_decimal_sparsity():
    assert fisher_math.num_kept(10, 0.7) == 3           # 1 - 0.7 is 0.30000000000000004 in binary
    assert fisher_math.num_kept(10, 0.9) == 1
    assert fisher_math.num_kept(11, 0.9) == 2           # ceil(1.1)
    assert fisher_math.num_kept(5, 0.0) == 5
    assert fisher_math.num_kept(0, 0.5) == 0


def test_fisher_scores():
    g = torch.tensor([1.0, -2.0, 0.5])
    assert fisher_math.fisher_scores(g).tolist() == [1.0, 4.0, 0.25]
    v = torch.tensor([0.1, 0.2, 0.3])
    assert torch.equal(fisher_math.fisher_scores(g, v), v)


def positions_mask(numel, positions, dense=(), dtype=torch.int32):
    return ShardMask(numel, tuple(dense), torch.tensor(positions, dtype=dtype))


def as_bool(mask: ShardMask) -> torch.Tensor:
    out = torch.zeros(mask.numel, dtype=torch.bool)
    for s, e in mask.dense:
        out[s:e] = True
    out[mask.positions.long()] = True
    return out


def test_perturb_and_restore_by_hand():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.tensor([3.0, 0.0, -4.0, 1.0])
    mask = positions_mask(4, [0, 2])
    original = w.clone()
    # ||g|| = sqrt(9 + 16 + 1) = sqrt(26); rho = 0.5 -> e = 0.5 * m*g / sqrt(26)
    scale = 0.5 / (26 ** 0.5 + fisher_math.NORM_EPS)
    saved = fisher_math.perturb_(w, g, mask, scale, adaptive=False)
    expected = torch.tensor([1.0 + 1.5 / 26 ** 0.5, 2.0, 3.0 - 2.0 / 26 ** 0.5, 4.0])
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)
    assert saved.tolist() == [1.0, 3.0]
    fisher_math.restore_(w, mask, saved)
    assert torch.equal(w, original)


def test_adaptive_perturbation_by_hand():
    w = torch.tensor([2.0, -1.0])
    g = torch.tensor([1.0, 3.0])
    fisher_math.perturb_(w, g, ShardMask(2, ((0, 2),), torch.zeros(0, dtype=torch.int32)),
                         scale=0.1, adaptive=True)
    # e = scale * w*w*g = 0.1 * [4, 3]
    torch.testing.assert_close(w, torch.tensor([2.4, -0.7]))


def test_mask_from_threshold_keeps_exactly_the_requested_ties():
    s = torch.tensor([5.0, 3.0, 3.0, 1.0, 3.0, 7.0])
    assert fisher_math.mask_from_threshold(s, 3.0, 2).tolist() == [True, True, True, False, False, True]
    assert fisher_math.mask_from_threshold(s, 3.0, 0).tolist() == [True, False, False, False, False, True]
    assert fisher_math.mask_from_threshold(s, 3.0, 9).sum() == 5


def test_shard_layout_merges_pieces_and_finds_the_real_elements():
    layout = ShardLayout.from_pieces(10, [(0, 3, False), (3, 5, False), (5, 6, True), (6, 8, False)])
    assert layout.ranked == ((0, 5), (6, 8)) and layout.always == ((5, 6),)
    assert layout.num_ranked == 7 and layout.num_always == 1
    assert layout.valid == ((0, 8),)          # 8 and 9 are padding


def test_full_mask_perturbs_every_real_element_and_never_reads_padding():
    """ZeRO-3 padding is uninitialised memory: an inf/NaN there must not reach any sum or write."""
    layout = ShardLayout.from_pieces(6, [(0, 2, False), (3, 5, True)])   # 2 and 5 are padding
    w = torch.tensor([1.0, -2.0, float("nan"), 3.0, 4.0, float("inf")])
    g = torch.tensor([0.5, 1.0, float("inf"), 2.0, 0.0, float("nan")])
    mask = full_mask(layout, "cpu")
    assert mask.dense == ((0, 2), (3, 5)) and mask.count == 4 and mask.nbytes == 0
    for adaptive in (False, True):
        sums = fisher_math.norm_sq_terms(w, g, layout.valid, mask, adaptive)
        assert torch.isfinite(sums).all()
        x = torch.tensor([0.5, 1.0, 2.0, 0.0]) * (torch.tensor([1.0, -2.0, 3.0, 4.0]) if adaptive else 1)
        torch.testing.assert_close(sums[0], (x * x).sum())
        before = w.clone()
        saved = fisher_math.perturb_(w, g, mask, scale=2.0, adaptive=adaptive)
        assert w[2].isnan() and w[5].isinf()          # padding untouched
        fisher_math.restore_(w, mask, saved)
        assert torch.equal(w[[0, 1, 3, 4]], before[[0, 1, 3, 4]])


def test_dense_ranges_and_positions_perturb_and_restore_like_a_bool_mask():
    g = torch.Generator().manual_seed(3)
    for keep_fraction in (0.1, 0.25, 0.6, 0.9):
        w = torch.randn(400, generator=g)
        grad = torch.randn(400, generator=g)
        keep = torch.zeros(400, dtype=torch.bool)
        keep[torch.randperm(400, generator=g)[:int(400 * keep_fraction)]] = True
        keep[50:80] = False
        builder = MaskBuilder(400, "cpu")
        builder.keep_range(50, 80)                       # an always-perturbed parameter
        builder.keep_pieces([(0, 50), (80, 400)], torch.cat([keep[:50], keep[80:]]))
        mask = builder.finish()
        assert mask.dense == ((50, 80),) and mask.positions.dtype == torch.int32
        expected = keep.clone()
        expected[50:80] = True
        assert torch.equal(as_bool(mask), expected)
        for adaptive in (False, True):
            perturbed = w.clone()
            saved = fisher_math.perturb_(perturbed, grad, mask, 0.3, adaptive)
            d = grad * (w * w if adaptive else 1)
            reference = torch.where(expected, w + 0.3 * d, w)
            torch.testing.assert_close(perturbed, reference, rtol=1e-6, atol=1e-7)
            assert torch.equal(perturbed[~expected], w[~expected])      # untouched outside
            sums = fisher_math.norm_sq_terms(w, grad, ((0, 400),), mask, adaptive)
            torch.testing.assert_close(sums[1], (d[expected] ** 2).sum())
            fisher_math.restore_(perturbed, mask, saved)
            assert torch.equal(perturbed, w)                  # bit-exact restore


def test_int64_positions_beyond_2_to_the_31():
    """A flat partition of 2^31 elements or more (70B at ZeRO-1/2 on <= 32 ranks) gets int64
    positions; checked on the layout and with int64 positions on a small tensor (no 8 GB tensor)."""
    assert position_dtype(2 ** 31 - 1) == torch.int32 and position_dtype(2 ** 31) == torch.int64
    big = 2 ** 31 + 100
    builder = MaskBuilder(big, "cpu")
    builder.keep_range(0, 10)
    builder.keep_pieces([(big - 8, big)], torch.tensor([1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool))
    mask = builder.finish()
    assert mask.positions.dtype == torch.int64
    assert mask.positions.tolist() == [big - 8, big - 5, big - 1]
    assert mask.fits(ShardLayout.from_pieces(big, [(0, 10, True), (10, big, False)]))
    # the same arithmetic with int64 positions on a tensor that fits in memory
    w, g = torch.arange(20.0), torch.ones(20)
    small = positions_mask(20, [3, 17], dtype=torch.int64)
    saved = fisher_math.perturb_(w, g, small, 1.0, adaptive=False)
    assert w[3] == 4.0 and w[17] == 18.0 and w[4] == 4.0
    fisher_math.restore_(w, small, saved)
    assert torch.equal(w, torch.arange(20.0))


@pytest.mark.parametrize("keep_fraction", [0.05, 0.2, 0.5, 0.9])
def test_mask_builder_in_any_chunk_order(keep_fraction):
    """Chunks arrive out of order around an always-kept range; positions come out sorted."""
    g = torch.Generator().manual_seed(int(keep_fraction * 100))
    numel, always = 1000, (111, 148)
    expected = torch.rand(numel, generator=g) < keep_fraction
    expected[always[0]:always[1]] = True
    builder = MaskBuilder(numel, "cpu")
    builder.keep_range(*always)
    starts = list(range(0, numel, 37))
    for i in torch.randperm(len(starts), generator=g).tolist():
        start = starts[i]
        end = min(start + 37, numel)
        if start == always[0]:
            continue   # always-kept elements come from keep_range only, never from a chunk
        builder.keep_pieces([(start, end)], expected[start:end].clone())
    mask = builder.finish()
    assert torch.equal(mask.positions, mask.positions.sort().values)
    assert torch.equal(as_bool(mask), expected)


def test_mask_builder_maps_a_chunk_of_several_pieces_back_to_tensor_positions():
    """One score chunk concatenates ranked ranges around an always-kept range and padding."""
    pieces, always = [(0, 5), (8, 12), (20, 23)], (5, 8)
    keep = torch.tensor([1, 0, 0, 1, 0,  0, 1, 1, 0,  1, 0, 1], dtype=torch.bool)
    expected = torch.zeros(30, dtype=torch.bool)
    expected[[0, 3, 9, 10, 20, 22]] = True
    expected[always[0]:always[1]] = True
    builder = MaskBuilder(30, "cpu")
    builder.keep_range(*always)
    builder.keep_pieces(pieces, keep)
    assert torch.equal(as_bool(builder.finish()), expected)


def test_mask_state_round_trip_and_fit_checks():
    layout = ShardLayout.from_pieces(12, [(0, 4, True), (4, 10, False)])
    mask = positions_mask(12, [5, 9], dense=[(0, 4)])
    restored = ShardMask.from_state(mask.to_state(), "cpu")
    assert restored.dense == mask.dense and torch.equal(restored.positions, mask.positions)
    assert restored.fits(layout)
    assert not positions_mask(12, [5, 12]).fits(layout)                 # out of range
    assert not positions_mask(12, [5], dense=[(8, 12)]).fits(layout)    # dense over padding
    assert not mask.fits(ShardLayout.from_pieces(14, [(0, 4, True), (4, 10, False)]))  # other size
    with pytest.raises(ValueError):
        ShardMask.from_state("all", "cpu")


# ---- the batched (many-tensor) versions equal the per-tensor ones -------------------------------
def _many_case(seed=0):
    """Tensors with dense ranges only, positions only, both, nothing, padding and -0.0 values."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for numel, dense, valid in [(7, ((0, 7),), ((0, 7),)), (12, ((2, 5),), ((0, 10),)),
                                (9, (), ((0, 9),)), (5, (), ((0, 5),)), (1, ((0, 1),), ((0, 1),))]:
        w = torch.randn(numel, generator=gen)
        w[0] = -0.0
        g = torch.randn(numel, generator=gen)
        free = [i for i in range(numel) if not any(s <= i < e for s, e in dense)
                and any(s <= i < e for s, e in valid)]
        chosen = sorted(torch.randperm(len(free), generator=gen)[: len(free) // 2].tolist())
        positions = torch.tensor([free[i] for i in chosen], dtype=torch.int32)
        cases.append((w, g, ShardMask(numel, dense, positions), valid))
    return cases


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("batch_numel", [None, 3])   # 3: rows cut and many batches
def test_many_versions_equal_the_per_tensor_ones(adaptive, batch_numel, monkeypatch):
    if batch_numel:
        monkeypatch.setattr(fisher_math, "BATCH_NUMEL", batch_numel)
    cases = _many_case()
    weights = [w.clone() for w, *_ in cases]
    grads = [g for _, g, _, _ in cases]
    masks = [m for _, _, m, _ in cases]
    valids = [v for *_, v in cases]
    # norms: the sums over tensors of the per-tensor terms
    one_by_one = sum(fisher_math.norm_sq_terms(w, g, v, m, adaptive) for w, g, m, v in cases)
    many = fisher_math.norm_sq_terms_many(weights, grads, valids, masks, adaptive)
    torch.testing.assert_close(many, one_by_one, rtol=1e-6, atol=0)
    no_mask = fisher_math.norm_sq_terms_many(weights, grads, valids, None, adaptive)
    assert no_mask[1] == 0 and torch.isclose(no_mask[0], one_by_one[0], rtol=1e-6)
    # perturb: bit-identical weights and saved values
    expected_w = [w.clone() for w, *_ in cases]
    expected_saved = [fisher_math.perturb_(w, g, m, 0.37, adaptive)
                      for w, (_, g, m, _) in zip(expected_w, cases)]
    saved = fisher_math.perturb_many_(weights, grads, masks, 0.37, adaptive)
    for w, ew, s, es in zip(weights, expected_w, saved, expected_saved):
        assert torch.equal(w.view(torch.int32), ew.view(torch.int32))
        assert torch.equal(s.view(torch.int32), es.view(torch.int32))
    fisher_math.restore_many_(weights, masks, saved)
    for w, (orig, *_) in zip(weights, cases):
        assert torch.equal(w.view(torch.int32), orig.view(torch.int32))   # -0.0 kept


def test_mask_from_threshold_tensor_equals_the_host_version():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 2.0, 5.0])
    for kept in range(4):
        expected = fisher_math.mask_from_threshold(scores, 2.0, kept)
        got = fisher_math.mask_from_threshold_tensor(scores, torch.tensor(2.0), kept, 3)
        assert torch.equal(got, expected), kept
