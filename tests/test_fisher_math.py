"""The math module against hand-computed values."""
import pytest
import torch

from fsam_ds import fisher_math
from fsam_ds.shard_layout import ShardLayout


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


def test_perturb_and_restore_by_hand():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.tensor([3.0, 0.0, -4.0, 1.0])
    mask = torch.tensor([True, False, True, False])
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
    mask = torch.tensor([True, True])
    fisher_math.perturb_(w, g, mask, scale=0.1, adaptive=True)
    # e = scale * w*w*g = 0.1 * [4, 3]
    torch.testing.assert_close(w, torch.tensor([2.4, -0.7]))


def test_mask_from_threshold_keeps_exactly_the_requested_ties():
    s = torch.tensor([5.0, 3.0, 3.0, 1.0, 3.0, 7.0])
    assert fisher_math.mask_from_threshold(s, 3.0, 2).tolist() == [True, True, True, False, False, True]
    assert fisher_math.mask_from_threshold(s, 3.0, 0).tolist() == [True, False, False, False, False, True]
    assert fisher_math.mask_from_threshold(s, 3.0, 9).sum() == 5


def test_shard_layout_merges_pieces_and_masks_padding():
    layout = ShardLayout.from_pieces(10, [(0, 3, False), (3, 5, False), (5, 6, True), (6, 8, False)])
    assert layout.ranked == ((0, 5), (6, 8)) and layout.always == ((5, 6),)
    assert layout.num_ranked == 7 and layout.num_always == 1
    flat = torch.arange(10.0)
    assert layout.take_ranked(flat).tolist() == [0, 1, 2, 3, 4, 6, 7]
    keep = torch.tensor([True, False, False, False, True, False, True])
    mask = layout.build_mask(keep, "cpu")
    assert mask.tolist() == [True, False, False, False, True, True, False, True, False, False]


def test_dense_all_mask_perturbs_everything_and_restores_exactly():
    w = torch.tensor([1.0, -2.0, 0.0, 0.0])       # last two: partition padding (grad 0)
    g = torch.tensor([0.5, 1.0, 0.0, 0.0])
    original = w.clone()
    saved = fisher_math.perturb_(w, g, fisher_math.ALL, scale=2.0, adaptive=False)
    assert w.tolist() == [2.0, 0.0, 0.0, 0.0]
    sums = fisher_math.norm_sq_terms(w, g, fisher_math.ALL, adaptive=False)
    assert sums.tolist() == [1.25, 1.25]
    fisher_math.restore_(w, fisher_math.ALL, saved)
    assert torch.equal(w, original)


def test_positions_and_bool_masks_perturb_and_restore_identically():
    g = torch.Generator().manual_seed(3)
    for keep_fraction, expect_positions in ((0.1, True), (0.25, True), (0.6, False)):
        w = torch.randn(400, generator=g)
        grad = torch.randn(400, generator=g)
        mask = torch.zeros(400, dtype=torch.bool)
        mask[torch.randperm(400, generator=g)[:int(400 * keep_fraction)]] = True
        builder = fisher_math.MaskBuilder(mask.numel(), "cpu")
        builder.keep_chunk(0, mask)
        compact = builder.finish()
        assert (compact.dtype == torch.int32) == expect_positions
        if expect_positions:
            assert torch.equal(compact.long(), mask.nonzero().view(-1))
        for adaptive in (False, True):
            by_mask, by_compact = w.clone(), w.clone()
            saved_a = fisher_math.perturb_(by_mask, grad, mask, 0.3, adaptive)
            saved_b = fisher_math.perturb_(by_compact, grad, compact, 0.3, adaptive)
            assert torch.equal(by_mask, by_compact) and torch.equal(saved_a, saved_b)
            assert not torch.equal(by_mask, w)
            assert torch.equal(by_mask[~mask], w[~mask])      # untouched outside the mask
            assert torch.equal(fisher_math.norm_sq_terms(w, grad, mask, adaptive),
                               fisher_math.norm_sq_terms(w, grad, compact, adaptive))
            fisher_math.restore_(by_compact, compact, saved_b)
            assert torch.equal(by_compact, w)                  # bit-exact restore


@pytest.mark.parametrize("keep_fraction", [0.05, 0.2, 0.5, 0.9])
def test_mask_builder_matches_the_bool_mask_in_any_chunk_order(keep_fraction):
    """Chunks arrive out of order and an always-kept range comes first; sparse masks stay int32
    positions (sorted), dense ones switch to a bool mask part way through."""
    g = torch.Generator().manual_seed(int(keep_fraction * 100))
    numel, always = 1000, (111, 148)   # exactly the 37-element chunk starting at 111
    expected = torch.rand(numel, generator=g) < keep_fraction
    expected[always[0]:always[1]] = True
    builder = fisher_math.MaskBuilder(numel, "cpu")
    builder.keep_range(*always)
    starts = list(range(0, numel, 37))
    for i in torch.randperm(len(starts), generator=g).tolist():
        start = starts[i]
        end = min(start + 37, numel)
        if start == always[0]:
            continue   # always-kept elements come from keep_range only, never from a chunk
        builder.keep_chunk(start, expected[start:end].clone())
    result = builder.finish()
    got = torch.zeros(numel, dtype=torch.bool)
    if result.dtype == torch.bool:
        got = result
    else:
        assert result.dtype == torch.int32 and torch.equal(result, result.sort().values)
        got[result.long()] = True
    assert torch.equal(got, expected)
    assert (result.dtype == torch.bool) == (4 * int(expected.sum()) > numel)


def test_mask_builder_maps_a_chunk_of_several_pieces_back_to_tensor_positions():
    """One score chunk concatenates ranked ranges around an always-kept range and padding."""
    pieces, always = [(0, 5), (8, 12), (20, 23)], (5, 8)
    keep = torch.tensor([1, 0, 0, 1, 0,  0, 1, 1, 0,  1, 0, 1], dtype=torch.bool)
    expected = torch.zeros(30, dtype=torch.bool)
    expected[[0, 3, 9, 10, 20, 22]] = True
    expected[always[0]:always[1]] = True
    for positions_allowed, numel in ((True, 64), (False, 30)):
        builder = fisher_math.MaskBuilder(numel, "cpu", positions_allowed=positions_allowed)
        builder.keep_range(*always)
        builder.keep_pieces(pieces, keep)
        result = builder.finish()
        got = torch.zeros(numel, dtype=torch.bool)
        if result.dtype == torch.bool:
            got = result
        else:
            got[result.long()] = True
        assert torch.equal(got[:30], expected) and not got[30:].any()
