"""`ShardMask`: which elements of one flat tensor FSAM perturbs, and `MaskBuilder`, which makes one.

A mask has two parts:
  dense      (start, end) ranges perturbed whole: always-perturbed parameters, and the whole ranked
             part when every ranked element is kept (SAM). No positions, no scan: views of the tensor.
  positions  sorted positions of the kept ranked elements, int32 while the tensor has fewer than 2^31
             elements, int64 beyond (a 70B model's flat ZeRO-1/2 partition on <= 32 ranks).
Gathers and scatters cost O(kept) plus one view per dense range; nothing is full-length. Masks are
stored per slot key (see fsam_core), never by id(tensor), and serialize to plain tensors and lists.
No torch.distributed here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fsam_ds.shard_layout import ShardLayout

INT32_LIMIT = 2 ** 31
# index_put_ widens int32 positions to int64 internally: scatter in slices of this many so that
# the widened copy stays small (8 B per kept element otherwise).
SCATTER_SLICE = 1 << 24


def position_dtype(numel: int) -> torch.dtype:
    """The narrowest index type that addresses every element of a tensor of `numel` elements."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def index_put_slices(flat: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """flat[positions] = values, SCATTER_SLICE positions at a time (bounds index_put_'s int64
    copy of int32 positions)."""
    for start in range(0, positions.numel(), SCATTER_SLICE):
        flat.index_put_((positions[start:start + SCATTER_SLICE],), values[start:start + SCATTER_SLICE])


@dataclass
class ShardMask:
    numel: int
    dense: tuple              # ((start, end), ...), sorted, non-overlapping
    positions: torch.Tensor   # 1-D int32/int64, ascending, outside the dense ranges

    @property
    def count(self) -> int:
        return sum(e - s for s, e in self.dense) + self.positions.numel()

    @property
    def nbytes(self) -> int:
        return self.positions.numel() * self.positions.element_size()

    # ---- element access on a flat view (contiguous tensors only) -------------------------------
    def dense_views(self, flat: torch.Tensor) -> list:
        return [flat[s:e] for s, e in self.dense]

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """The masked elements of `flat` as one new 1-D tensor: dense ranges first, then positions."""
        parts = self.dense_views(flat)
        if self.positions.numel():
            parts.append(flat.index_select(0, self.positions))
        if not parts:
            return flat.new_empty(0)
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def scatter_(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        """Write `values` (laid out as gather() returns them) back at the masked elements."""
        num_dense = sum(e - s for s, e in self.dense)
        if self.dense:
            views = self.dense_views(flat)
            torch._foreach_copy_(views, list(values[:num_dense].split([v.numel() for v in views])))
        index_put_slices(flat, self.positions, values[num_dense:])

    def fits(self, layout: ShardLayout) -> bool:
        """Whether this mask can be reused for a tensor laid out as `layout` (after a load: another
        world size, model or DeepSpeed version gives other layouts)."""
        if self.numel != layout.numel or self.positions.dtype != position_dtype(layout.numel):
            return False
        if self.positions.dim() != 1:
            return False
        if self.positions.numel() and (int(self.positions.min()) < 0
                                       or int(self.positions.max()) >= layout.numel):
            return False
        valid = layout.valid
        return all(any(vs <= s and e <= ve for vs, ve in valid) for s, e in self.dense)

    # ---- serialization ------------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"numel": self.numel, "dense": [list(r) for r in self.dense],
                "positions": self.positions.detach().cpu().clone()}

    @classmethod
    def from_state(cls, state: dict, device) -> "ShardMask":
        if not isinstance(state, dict) or set(state) != {"numel", "dense", "positions"}:
            raise ValueError("not an fsam_ds ShardMask state")
        positions = state["positions"]
        if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
            raise ValueError("ShardMask positions must be an int32/int64 tensor")
        return cls(int(state["numel"]), tuple((int(s), int(e)) for s, e in state["dense"]),
                   positions.to(device))


class MaskBuilder:
    """Builds one tensor's ShardMask chunk by chunk: dense ranges via keep_range, kept ranked
    elements via keep_pieces (a chunk of scores covering several ranges). Chunks may arrive in any
    order; positions are sorted once at finish(). No full-length temporary is made."""

    def __init__(self, numel: int, device, index_dtype: torch.dtype | None = None):
        self.numel, self.device = numel, device
        self.index_dtype = index_dtype or position_dtype(numel)
        self.dense = []
        self.pieces = []          # (first position, positions tensor)

    def keep_range(self, start: int, end: int) -> None:
        if end > start:
            if self.dense and self.dense[-1][1] == start:
                self.dense[-1] = (self.dense[-1][0], end)
            else:
                self.dense.append((start, end))

    def keep_pieces(self, pieces, keep: torch.Tensor) -> None:
        """keep: bool over the concatenation of the elements in `pieces` ((start, end) ranges in
        increasing order), as one chunk of FSAM's scores covers several ranges."""
        positions = keep.nonzero().view(-1)
        if positions.numel() == 0:
            return
        if len(pieces) == 1:
            positions = positions.to(self.index_dtype).add_(pieces[0][0])
        else:
            # positions in the concatenation -> positions in the tensor: add the start of the piece
            # each falls in, minus where that piece begins in the concatenation
            lengths = torch.tensor([end - start for start, end in pieces], dtype=torch.int64)
            chunk_starts = torch.cumsum(lengths, 0) - lengths
            shifts = torch.tensor([start for start, _ in pieces], dtype=torch.int64) - chunk_starts
            piece = torch.searchsorted(chunk_starts.to(positions.device), positions, right=True) - 1
            positions = (positions + shifts.to(positions.device)[piece]).to(self.index_dtype)
        self.pieces.append((pieces[0][0], positions))

    def finish(self) -> ShardMask:
        ordered = [p for _, p in sorted(self.pieces, key=lambda item: item[0])]
        positions = torch.cat(ordered) if ordered else \
            torch.zeros(0, dtype=self.index_dtype, device=self.device)
        self.dense.sort()
        return ShardMask(self.numel, tuple(self.dense), positions)


def full_mask(layout: ShardLayout, device) -> ShardMask:
    """Every real element perturbed (SAM, or a tensor with nothing ranked): dense ranges only."""
    return ShardMask(layout.numel, layout.valid,
                     torch.zeros(0, dtype=position_dtype(layout.numel), device=device))
