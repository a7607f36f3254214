"""Which elements of one tensor FSAM ranks, always perturbs, or ignores (partition padding).

A plain parameter is one range, ranked or always-perturbed by its name. A ZeRO flat partition
holds pieces of many parameters plus padding; the DeepSpeed adapter builds its layout once, at
start-up, from the partition's parameter ranges.
"""
from __future__ import annotations

from dataclasses import dataclass

from functools import cached_property

Ranges = tuple  # of (start, end) pairs, sorted, non-overlapping, end exclusive


@dataclass(frozen=True)
class ShardLayout:
    numel: int
    ranked: Ranges
    always: Ranges

    @classmethod
    def whole(cls, numel: int, always_perturbed: bool) -> "ShardLayout":
        full = ((0, numel),) if numel else ()
        return cls(numel, () if always_perturbed else full, full if always_perturbed else ())

    @classmethod
    def from_pieces(cls, numel: int, pieces) -> "ShardLayout":
        """pieces: (start, end, always_perturbed) for every parameter piece in the tensor; the
        elements not covered are padding. Adjacent pieces of one kind are merged."""
        ranked, always = [], []
        for start, end, is_always in sorted(pieces):
            if end <= start:
                continue
            out = always if is_always else ranked
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        for (s, e), (s2, _) in zip(sorted(ranked + always), sorted(ranked + always)[1:]):
            assert e <= s2, f"overlapping parameter pieces in a shard layout: {pieces}"
        assert not ranked + always or max(e for _, e in ranked + always) <= numel
        return cls(numel, tuple(ranked), tuple(always))

    @property
    def num_ranked(self) -> int:
        return sum(e - s for s, e in self.ranked)

    @property
    def num_always(self) -> int:
        return sum(e - s for s, e in self.always)

    @cached_property
    def valid(self) -> Ranges:
        """Every real (non-padding) element: the ranked and always-perturbed ranges, merged."""
        merged = []
        for start, end in sorted(self.ranked + self.always):
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        return tuple(merged)

    @property
    def num_valid(self) -> int:
        return self.num_ranked + self.num_always
