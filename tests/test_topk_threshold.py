"""The exact sharded top-k threshold against torch.topk on the concatenation of all shards."""
import pytest
import torch

from dist_harness import run_ranks
from fsam_ds import fisher_math
from fsam_ds.topk_threshold import exact_topk_threshold, exact_topk_threshold_on_device


def make_cases(world_size):
    """(name, shards, k) with shards[r] the scores rank r holds; identical on every rank."""
    g = torch.Generator().manual_seed(1234 + world_size)

    def split(scores, cuts=None):
        n = scores.numel()
        if cuts is None:
            cuts = sorted(torch.randint(0, n + 1, (world_size - 1,), generator=g).tolist())
        bounds = [0] + list(cuts) + [n]
        return [scores[bounds[r]:bounds[r + 1]].contiguous() for r in range(world_size)]

    cases = []
    rand = torch.rand(1000, generator=g) * 10.0 ** torch.randint(-30, 30, (1000,), generator=g)
    for k in (1, 7, 100, 999, 1000):
        cases.append((f"random k={k}", split(rand), k))
    ties = torch.randint(0, 4, (997,), generator=g).float()
    for k in (1, 250, 500, 800, 997):
        cases.append((f"heavy ties k={k}", split(ties), k))
    # rank 0's shard all zeros, the others positive: zeros are only kept once positives run out
    zero_first = torch.cat([torch.zeros(300), torch.rand(200, generator=g) + 0.5])
    for k in (150, 200, 250):
        cases.append((f"all-zero shard k={k}", split(zero_first, [300] * (world_size - 1)), k))
    # the last rank empty; one rank almost empty (a shard that is mostly padding holds few scores)
    lopsided = torch.rand(401, generator=g)
    cuts = [3] + [400] * (world_size - 2) if world_size > 1 else []
    for k in (1, 3, 200, 401):
        cases.append((f"empty and tiny shards k={k}", split(lopsided, cuts), k))
    cases.append(("all empty but one k=2", split(torch.tensor([2.0, 1.0, 2.0]), [0] * (world_size - 1)), 2))
    cases.append(("k=0", split(rand), 0))
    same = torch.full((50,), 3.0)
    for k in (1, 25, 50):
        cases.append((f"all equal k={k}", split(same), k))
    cases.append(("subnormals and inf", split(torch.tensor(
        [0.0, 1e-45, 3e-45, 1e-40, float("inf"), 1.0, 1e-38, 1e38] * 5)), 9))
    return cases


def random_pieces(shard, generator):
    """The shard cut at random points (empty pieces included), as FSAM's chunk producer yields it."""
    cuts = sorted(torch.randint(0, shard.numel() + 1, (4,), generator=generator).tolist())
    bounds = [0] + cuts + [shard.numel()]
    return [shard[a:b] for a, b in zip(bounds, bounds[1:])]


def threshold_on_ranks(rank, world_size, bits_per_round):
    """Per case: the threshold from the whole shard, and whether the two chunked forms (a
    producer of random pieces; the tensor cut into 3-element chunks) agree with it exactly."""
    import torch.distributed as dist
    from fsam_ds import topk_threshold
    g = torch.Generator().manual_seed(rank)
    out = []
    for name, shards, k in make_cases(world_size):
        shard = shards[rank]
        found = exact_topk_threshold(shard, k, dist.group.WORLD, bits_per_round=bits_per_round,
                                     sample_stride=1)
        keep = fisher_math.mask_from_threshold(shard, found.value, found.num_ties_kept)
        # Floyd-Rivest narrowing forced on these small inputs (any sample size), at two strides:
        # whether the bracket holds or misses, the answer must be the plain radix select's
        default_min_sample, topk_threshold.MIN_SAMPLE = topk_threshold.MIN_SAMPLE, 1
        try:
            narrowed = [exact_topk_threshold(shard, k, dist.group.WORLD, bits_per_round, stride)
                        for stride in (2, 3)]
        finally:
            topk_threshold.MIN_SAMPLE = default_min_sample
        pieces = random_pieces(shard, g)
        from_pieces = exact_topk_threshold(lambda: iter(pieces), k, dist.group.WORLD, bits_per_round)
        ties_left, kept_pieces = from_pieces.num_ties_kept, []
        for piece in pieces:
            piece_keep, taken = fisher_math.mask_chunk_from_threshold(piece, from_pieces.value, ties_left)
            ties_left -= taken
            kept_pieces.append(piece_keep)
        default_chunk, topk_threshold.CHUNK_NUMEL = topk_threshold.CHUNK_NUMEL, 3
        try:
            small_chunks = exact_topk_threshold(shard, k, dist.group.WORLD, bits_per_round)
        finally:
            topk_threshold.CHUNK_NUMEL = default_chunk
        # the sync-free on-device select (FSAM's path for small models), with its own mask
        total = sum(s.numel() for s in shards)
        default_slice, topk_threshold.ON_DEVICE_SLICE = topk_threshold.ON_DEVICE_SLICE, 7
        try:   # 7: several slices per shard
            on_device = exact_topk_threshold_on_device(shard, k, dist.group.WORLD, total=total,
                                                       bits_per_round=bits_per_round)
        finally:
            topk_threshold.ON_DEVICE_SLICE = default_slice
        device_keep = fisher_math.mask_from_threshold_tensor(
            shard, on_device.value, on_device.num_ties_kept, on_device.num_ties_local)
        chunked_agree = (from_pieces == found == small_chunks == narrowed[0] == narrowed[1]
                         == on_device and torch.equal(torch.cat(kept_pieces), keep)
                         and torch.equal(device_keep, keep))
        out.append((name, found.value, shard[keep].tolist(), chunked_agree))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_threshold_matches_topk(world_size):
    results = {bits: run_ranks(threshold_on_ranks, world_size, bits) for bits in (16, 8)}
    for bits, per_rank in results.items():
        for case_index, (name, shards, k) in enumerate(make_cases(world_size)):
            everything = torch.cat(shards)
            kept = sorted(v for r in range(world_size) for v in per_rank[r][case_index][2])
            assert len(kept) == k, f"{name} ({bits}-bit rounds): kept {len(kept)} != k={k}"
            expected = sorted(torch.topk(everything, k).values.tolist()) if k else []
            assert kept == expected, f"{name} ({bits}-bit rounds): kept values differ from topk"
            assert all(per_rank[r][case_index][3] for r in range(world_size)), \
                f"{name} ({bits}-bit rounds): chunked or narrowed selection gave another answer"
            values = {per_rank[r][case_index][1] for r in range(world_size)}
            assert len(values) == 1, f"{name}: ranks disagree on the threshold: {values}"
            if k:
                assert values.pop() == expected[0]


def test_no_group_is_local_and_exact():
    scores = torch.rand(10_000)
    found = exact_topk_threshold(scores, 1000)
    assert found.value == torch.topk(scores, 1000).values[-1].item()
    assert found.num_greater == 999 and found.num_ties_kept == 1


def test_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or negative"):
        exact_topk_threshold(torch.tensor([1.0, -2.0, 3.0]), 1)
    with pytest.raises(ValueError, match="NaN or negative"):
        exact_topk_threshold(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="exceeds"):
        exact_topk_threshold(torch.rand(5), 6)
    with pytest.raises(ValueError, match="float32"):
        exact_topk_threshold(torch.rand(5, dtype=torch.float64), 2)


def test_on_device_select_alone_and_its_input_checks():
    scores = torch.rand(10_000)
    for k in (1, 999, 10_000):
        found = exact_topk_threshold_on_device(scores, k, total=10_000)
        assert found == exact_topk_threshold(scores, k)
        assert found.value == torch.topk(scores, k).values[-1].item()
        assert found.num_ties_local == 1
    assert exact_topk_threshold_on_device(scores, 0, total=10_000).value == float("inf")
    with pytest.raises(ValueError, match="NaN or negative"):
        exact_topk_threshold_on_device(torch.tensor([1.0, -2.0, 3.0]), 1, total=3)
    with pytest.raises(ValueError, match="NaN or negative"):
        exact_topk_threshold_on_device(torch.tensor([1.0, float("nan")]), 1, total=2)
    with pytest.raises(ValueError, match="total"):
        exact_topk_threshold_on_device(torch.rand(5), 6, total=5)
    with pytest.raises(ValueError, match="differs"):
        exact_topk_threshold_on_device(torch.rand(5), 2, total=6)


def test_both_histogram_kernels_count_alike():
    """The on-device select histograms with scatter_add_ on GPUs and bincount on the CPU, over
    all digits or only those whose higher bits match the prefix found so far."""
    from fsam_ds.topk_threshold import _add_histogram_
    digits = torch.randint(0, 256, (10_000,), dtype=torch.int32)
    match = torch.rand(10_000) < 0.3
    ones = torch.ones(1, dtype=torch.int64)
    for where in (None, match):
        by_scatter, by_bincount = torch.zeros(257, dtype=torch.int64), torch.zeros(257, dtype=torch.int64)
        _add_histogram_(by_scatter, digits, ones, where, use_bincount=False)
        _add_histogram_(by_bincount, digits, ones, where, use_bincount=True)
        counted = digits if where is None else digits[where]
        expected = torch.bincount(counted.long(), minlength=256)
        assert torch.equal(by_scatter[:256], expected) and torch.equal(by_bincount[:256], expected)


def test_on_device_select_with_the_gpu_histogram_kernel_equals_topk(monkeypatch):
    """The GPU's kernel (scatter_add_, non-matching digits adding 0) in the whole select: the
    CPU tests otherwise run bincount. Ties at the threshold, clustered exponents, k = 1 and all."""
    from fsam_ds import topk_threshold
    monkeypatch.setattr(topk_threshold, "BINCOUNT_ON_CPU", False)
    g = torch.Generator().manual_seed(3)
    cases = [torch.randn(50_000, generator=g) ** 2,
             torch.randint(0, 5, (20_000,), generator=g).float() / 4,     # heavy ties
             torch.full((1000,), 0.25)]
    for scores in cases:
        for k in (1, 7, scores.numel() // 10, scores.numel()):
            for bits in (16, 8):
                found = exact_topk_threshold_on_device(scores, k, total=scores.numel(),
                                                       bits_per_round=bits)
                assert found.value == torch.topk(scores, k).values[-1].item()
                assert found.num_greater + found.num_ties_kept == k


def nan_on_one_rank(rank, world_size):
    """Both selects (chunked and on-device) with a NaN on rank 1: each rank's error, or None."""
    import torch.distributed as dist
    shard = torch.rand(100)
    if rank == 1:
        shard[7] = float("nan")
    messages = []
    for select in (lambda: exact_topk_threshold(shard, 10, dist.group.WORLD),
                   lambda: exact_topk_threshold_on_device(shard, 10, dist.group.WORLD,
                                                          total=100 * world_size)):
        try:
            select()
            messages.append(None)
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_a_nan_on_one_rank_makes_every_rank_raise_instead_of_hanging():
    per_rank = run_ranks(nan_on_one_rank, 3, timeout=120)
    for path, messages in zip(("chunked", "on-device"), zip(*per_rank)):
        assert all(m is not None and "1 rank(s) are NaN or negative" in m for m in messages), \
            (path, messages)


def test_narrowing_brackets_random_scores_and_falls_back_when_the_sample_misleads(monkeypatch):
    from fsam_ds import topk_threshold
    monkeypatch.setattr(topk_threshold, "MIN_SAMPLE", 1)
    scores = torch.rand(100_000, generator=torch.Generator().manual_seed(5))
    k = 10_000
    narrowed = topk_threshold._narrowed_select(scores, k, None, 8, sample_stride=16)
    assert narrowed is not None and narrowed.narrowed   # the bracket held: a select on the band
    assert narrowed == exact_topk_threshold(scores, k, sample_stride=1)
    assert narrowed.value == torch.topk(scores, k).values[-1].item()
    # every sampled (even) position is 0: the sample says the top 10 % are zeros; they are not
    blind = torch.zeros(100_000)
    blind[1::2] = torch.rand(50_000, generator=torch.Generator().manual_seed(6)) + 1.0
    assert topk_threshold._narrowed_select(blind, k, None, 8, sample_stride=2) is None
    found = exact_topk_threshold(blind, k, sample_stride=2)
    assert found.value == torch.topk(blind, k).values[-1].item() and found.num_greater == k - 1


def test_prime_sample_stride_sees_every_column_of_a_weight_gradient(monkeypatch):
    """Gradient magnitudes differ by column (input feature); hidden sizes are multiples of 256, so
    a stride of 256 samples one column only and its bracket misses. The prime default does not."""
    from fsam_ds import topk_threshold
    monkeypatch.setattr(topk_threshold, "MIN_SAMPLE", 1)
    g = torch.Generator().manual_seed(7)
    column_scale = 10.0 ** ((torch.arange(1024) % 256) / 64.0)   # column 0 mod 256: the smallest
    scores = (torch.rand(512, 1024, generator=g) * column_scale).flatten() ** 2
    k = scores.numel() // 10
    assert topk_threshold._narrowed_select(scores, k, None, 8, sample_stride=256) is None
    found = topk_threshold._narrowed_select(scores, k, None, 8, topk_threshold.SAMPLE_STRIDE)
    assert found is not None and found.narrowed
    assert found.value == torch.topk(scores, k).values[-1].item()


def rank0_decision_on_ranks(rank, world_size):
    from fsam_ds.collectives import rank0_decides

    def fails_on_rank_0():
        if rank == 0:
            raise ValueError("latest names a missing tag")
        return "fine"

    seen = rank0_decides(lambda: f"step{10 + rank}")   # what each rank alone would read
    try:
        rank0_decides(fails_on_rank_0)
        error = None
    except ValueError as err:
        error = str(err)
    return seen, error


def test_a_decision_read_from_shared_storage_is_rank_0s_on_every_rank():
    """fsam_ds.checkpoint.load_checkpoint reads `latest` through collectives.rank0_decides: every
    rank loads rank 0's tag (ranks reading it apart during a write could diverge and hang), and a
    failure on rank 0 is raised on every rank."""
    per_rank = run_ranks(rank0_decision_on_ranks, 3, timeout=120)
    assert [seen for seen, _ in per_rank] == ["step10"] * 3
    assert [error for _, error in per_rank] == ["latest names a missing tag"] * 3
