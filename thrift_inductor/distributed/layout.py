"""Sequence layouts for context parallelism: which global token ranges each rank holds.

A layout is a partition of the tokens ``0 .. L-1`` into *pieces*; rank r holds its pieces concatenated
in the order listed (its local q/k/v are ``[B, H, sum of its piece lengths, D]``). Q and K/V are sharded
alike (self-attention), so two pieces are either the same or disjoint.

Interior piece boundaries must be multiples of ``alignment(config)``: the oracle's per-block numerics
(the P scale ``B_rj`` of a 64-key block, V scale groups along tokens, the selection's block means) are
functions of whole blocks, so a block split over two ranks would be quantised differently from the
single-device call (docs/numerics.md §4c). Only the sequence's last piece may be ragged, and it comes
last on its rank, so every piece starts on a block boundary of the rank's local tensor too (runs of
local pieces can then be attended in one call).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..config import ThriftConfig
from ..reference.quant import FORMAT_BLOCK

CONTIGUOUS = "contiguous"          # rank r holds one piece, the r-th of W in sequence order
LOAD_BALANCED = "load_balanced"    # rank r holds pieces r and 2W-1-r of 2W (torch's causal head-tail)
LAYOUTS = (CONTIGUOUS, LOAD_BALANCED)


def alignment(config: ThriftConfig) -> int:
    """Tokens every interior piece boundary must be a multiple of: the selection / P block, and the V
    scale group along tokens (FP4 microblocks of 16 / 32; fp8 V is scaled per selection block). All
    are powers of two, so the larger one is a multiple of the smaller."""
    return max(config.block_size, FORMAT_BLOCK.get(config.format, config.block_size))


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """``pieces[r]``: the global ``(start, end)`` token ranges rank r holds, in local order."""

    seq_len: int
    pieces: tuple

    @property
    def world(self) -> int:
        return len(self.pieces)

    def local_len(self, rank: int) -> int:
        return sum(end - start for start, end in self.pieces[rank])

    def local_pieces(self, rank: int):
        """``(local_offset, start, end)`` for each non-empty piece of ``rank``."""
        offset, out = 0, []
        for start, end in self.pieces[rank]:
            if end > start:
                out.append((offset, start, end))
            offset += end - start
        return out

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 ``[local_len]``: the global token index of each local token."""
        ranges = [torch.arange(s, e, device=device) for s, e in self.pieces[rank]]
        return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.int64, device=device)

    def validate(self, align: int) -> None:
        """Raise ``ValueError`` unless the pieces partition ``0 .. seq_len`` with interior boundaries on
        multiples of ``align``."""
        spans = sorted((s, e) for rank in self.pieces for s, e in rank if e > s)
        covered = 0
        for start, end in spans:
            if start != covered:
                raise ValueError(f"layout pieces must partition 0..{self.seq_len}: gap or overlap at {covered}")
            if end != self.seq_len and end % align:
                raise ValueError(f"layout boundary {end} is not a multiple of {align} tokens: a block would "
                                 f"be split over ranks and quantised differently (docs/numerics.md §4c)")
            covered = end
        if covered != self.seq_len:
            raise ValueError(f"layout pieces cover 0..{covered}, not 0..{self.seq_len}")
        for rank in range(self.world):
            for offset, start, end in self.local_pieces(rank):
                if offset % align:
                    raise ValueError(f"rank {rank}: a piece starts at local token {offset}, not a multiple of "
                                     f"{align}; put the ragged last piece of the sequence last on its rank")


def _split_units(units: int, parts: int) -> list[int]:
    """``parts`` counts summing to ``units``, as even as possible (the larger ones first)."""
    base, extra = divmod(units, parts)
    return [base + (1 if p < extra else 0) for p in range(parts)]


def _pieces_from_units(seq_len: int, counts: Sequence[int], align: int) -> list[tuple[int, int]]:
    bounds, edge = [], 0
    for c in counts:
        start = min(edge, seq_len)
        edge += c * align
        bounds.append((start, min(edge, seq_len)))
    return bounds


def contiguous_layout(seq_len: int, world: int, align: int) -> SequenceLayout:
    """Rank r holds the r-th of ``world`` consecutive pieces, split in whole ``align`` units (uneven
    when the units do not divide; the last piece is ragged when ``seq_len`` is not a multiple)."""
    units = -(-seq_len // align)
    pieces = _pieces_from_units(seq_len, _split_units(units, world), align)
    return SequenceLayout(seq_len, tuple((p,) for p in pieces))


def layout_from_lengths(lengths: Sequence[int]) -> SequenceLayout:
    """Contiguous layout with the given per-rank lengths, in rank order (validate before use)."""
    pieces, start = [], 0
    for n in lengths:
        pieces.append(((start, start + int(n)),))
        start += int(n)
    return SequenceLayout(start, tuple(pieces))


def load_balanced_layout(seq_len: int, world: int, align: int) -> SequenceLayout:
    """torch's causal load balancing (``context_parallel`` head-tail): the sequence is cut into ``2W``
    pieces and rank r holds pieces ``r`` and ``2W-1-r``, so every rank gets an early (cheap) and a late
    (expensive) share of the causal triangle. Pieces are whole ``align`` units; some may be empty when
    the sequence has fewer than ``2W`` units."""
    units = -(-seq_len // align)
    pieces = _pieces_from_units(seq_len, _split_units(units, 2 * world), align)
    return SequenceLayout(seq_len, tuple((pieces[r], pieces[2 * world - 1 - r]) for r in range(world)))


def make_layout(kind: str, seq_len: int, world: int, align: int) -> SequenceLayout:
    if kind == CONTIGUOUS:
        return contiguous_layout(seq_len, world, align)
    if kind == LOAD_BALANCED:
        return load_balanced_layout(seq_len, world, align)
    raise ValueError(f"layout must be one of {LAYOUTS} or a SequenceLayout, got {kind!r}")


def shard(x: torch.Tensor, layout: SequenceLayout, rank: int, dim: int = 2) -> torch.Tensor:
    """Rank ``rank``'s local part of the whole-sequence tensor ``x`` (sequence along ``dim``)."""
    return x.index_select(dim, layout.positions(rank, x.device))


def unshard(chunks: Sequence[torch.Tensor], layout: SequenceLayout, dim: int = 2) -> torch.Tensor:
    """Inverse of ``shard``: the whole-sequence tensor from every rank's local part."""
    pos = torch.cat([layout.positions(r, chunks[0].device) for r in range(layout.world)])
    return torch.cat(list(chunks), dim).index_select(dim, torch.argsort(pos))
