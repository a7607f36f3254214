"""Which elements of one tensor FSAM ranks, always perturbs, or ignores (partition padding).

A plain parameter is one range, ranked or always-perturbed by its name. A ZeRO flat partition
holds pieces of many parameters plus padding; the DeepSpeed adapter builds its layout once, at
start-up, from the partition's parameter ranges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def take_ranked(self, flat: torch.Tensor) -> torch.Tensor:
        """The ranked elements of `flat`, concatenated (a view when there is a single range)."""
        if len(self.ranked) == 1:
            s, e = self.ranked[0]
            return flat[s:e]
        return torch.cat([flat[s:e] for s, e in self.ranked]) if self.ranked else flat[:0]

    def build_mask(self, ranked_mask: torch.Tensor, device) -> torch.Tensor:
        """Full-length bool mask: always-perturbed ranges True, padding False, ranked elements
        from `ranked_mask` (in take_ranked order); ranked_mask=None keeps every ranked element."""
        mask = torch.zeros(self.numel, dtype=torch.bool, device=device)
        for s, e in self.always:
            mask[s:e] = True
        offset = 0
        for s, e in self.ranked:
            mask[s:e] = True if ranked_mask is None else ranked_mask[offset:offset + e - s]
            offset += e - s
        return mask
