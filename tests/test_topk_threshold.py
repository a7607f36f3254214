"""The exact sharded top-k threshold against torch.topk on the concatenation of all shards."""
import pytest
import torch

from dist_harness import run_ranks
from fsam_ds import fisher_math
from fsam_ds.topk_threshold import exact_topk_threshold


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
    cases.append(("subnormals and inf", split(torch.tensor(
        [0.0, 1e-45, 3e-45, 1e-40, float("inf"), 1.0, 1e-38, 1e38] * 5)), 9))
    return cases


def threshold_on_ranks(rank, world_size, bits_per_round):
    import torch.distributed as dist
    out = []
    for name, shards, k in make_cases(world_size):
        shard = shards[rank]
        found = exact_topk_threshold(shard, k, dist.group.WORLD, bits_per_round=bits_per_round)
        keep = fisher_math.mask_from_threshold(shard, found.value, found.num_ties_kept)
        out.append((name, found.value, shard[keep].tolist()))
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


def nan_on_one_rank(rank, world_size):
    import torch.distributed as dist
    shard = torch.rand(100)
    if rank == 1:
        shard[7] = float("nan")
    try:
        exact_topk_threshold(shard, 10, dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return None


def test_a_nan_on_one_rank_makes_every_rank_raise_instead_of_hanging():
    messages = run_ranks(nan_on_one_rank, 3, timeout=120)
    assert all(m is not None and "1 rank(s) are NaN or negative" in m for m in messages), messages
