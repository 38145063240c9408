"""Kernel-facing descriptions of a pattern at one call's sizes.

Input: a Pattern, lengths, heads, tile shape and tensor inputs. Output: :class:`Description`:

* ``tiles`` — :class:`TileLists`: per (head, query tile) the non-empty key tiles, split into
  full (no mask needed) and partial, padded index lists as FlexAttention's block masks have
  them, plus the transpose (query tiles per key tile) for a backward pass;
* ``keys`` — per class of heads, the exact key set of every row as guarded intervals whose
  bounds are IR expressions of ``q`` (a *band* descriptor: kernels compute loop bounds
  arithmetically) and, where the pattern is periodic in ``k`` or ``q - k``, a modulus with
  its live residues (a *residue* descriptor: kernels gather only live keys). ``None`` for a
  head class whose mask has no exact interval form.

Tensor-input patterns (documents) are described from the tensors at call time, in work
proportional to the length plus the number of tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..ir import Expr
from ..reference import CallGrid
from .pieces import Piece, RowSets
from .rows import eval_rows


@dataclass(frozen=True)
class TileLists:
    """Padded per-row-tile lists of key tiles (int32), like FlexAttention's BlockMask."""

    block: tuple[int, int]
    partial_num: np.ndarray     # [H, nQT]
    partial_idx: np.ndarray     # [H, nQT, max]
    full_num: np.ndarray
    full_idx: np.ndarray
    q_partial_num: np.ndarray   # [H, nKT]: query tiles per key tile
    q_partial_idx: np.ndarray
    q_full_num: np.ndarray
    q_full_idx: np.ndarray


def _lists(sel: np.ndarray):
    """Counts [H, N] and padded ascending column indices [H, N, max] of a bool [H, N, M]."""
    num = sel.sum(axis=-1, dtype=np.int32)
    width = max(1, int(num.max()) if num.size else 1)
    idx = np.zeros(sel.shape[:2] + (width,), dtype=np.int32)
    h, n, m = np.nonzero(sel)
    pos = np.zeros(len(m), dtype=np.int64)
    if len(m):
        starts = np.r_[0, np.cumsum(num.ravel())[:-1]]
        pos = np.arange(len(m)) - np.repeat(starts, num.ravel())
    idx[h, n, pos] = m
    return num, idx


def tile_lists(block_map: np.ndarray, block) -> TileLists:
    partial, full = block_map == 1, block_map == 2
    pn, pi = _lists(partial)
    fn, fi = _lists(full)
    qpn, qpi = _lists(partial.transpose(0, 2, 1))
    qfn, qfi = _lists(full.transpose(0, 2, 1))
    return TileLists(tuple(block), pn, pi, fn, fi, qpn, qpi, qfn, qfi)


@dataclass(frozen=True)
class KeyIntervals:
    """The exact allowed keys of every row of some heads: a union of guarded pieces."""

    heads: tuple[int, ...]
    mask: Expr                  # the mask specialised to these heads
    pieces: tuple[Piece, ...]
    grid: CallGrid | None = field(default=None, compare=False, repr=False)   # with derived tensors

    @property
    def kind(self) -> str:
        return "residue" if any(p.residue for p in self.pieces) else "band"

    @property
    def moduli(self) -> tuple[int, ...]:
        return tuple(sorted({p.residue.modulus for p in self.pieces if p.residue}))

    def row_mask(self, grid: CallGrid | None, rows: np.ndarray) -> np.ndarray:
        """bool [len(rows), kv_len]: the key set of the rows, rebuilt from the pieces alone.

        ``grid`` None: the call these intervals were made for (it holds the derived tensors
        that document and random-block pieces read).
        """
        grid = self.grid if grid is None else grid
        k = np.arange(grid.kv_len)[None, :]
        out = np.zeros((len(rows), grid.kv_len), dtype=bool)
        h = np.array(self.heads[:1])
        for p in self.pieces:
            guard = np.broadcast_to(eval_rows(grid, p.guard, h, rows)[0], (1, len(rows), 1))[0]
            live = guard.astype(bool)
            lo = np.broadcast_to(eval_rows(grid, p.lo, h, rows, live[None])[0], (1, len(rows), 1))[0]
            hi = np.broadcast_to(eval_rows(grid, p.hi, h, rows, live[None])[0], (1, len(rows), 1))[0]
            sel = live & (k >= lo) & (k <= hi)
            if p.residue is not None:
                off = np.broadcast_to(eval_rows(grid, p.residue.offset, h, rows, live[None])[0],
                                      (1, len(rows), 1))[0]
                res = (k - off) % p.residue.modulus
                sel &= np.isin(res, np.fromiter(p.residue.live, dtype=np.int64))
            out |= sel
        return out


@dataclass(frozen=True)
class Description:
    q_len: int
    kv_len: int
    heads: int
    block: tuple[int, int]
    block_map: np.ndarray
    keys: tuple[KeyIntervals | None, ...]      # one per head class
    head_classes: tuple[tuple[int, ...], ...] = ()     # the heads of each class

    @cached_property
    def tiles(self) -> TileLists:
        """The tile lists, built on first use (O(tiles))."""
        return tile_lists(self.block_map, self.block)

    def keys_of_head(self, h: int) -> KeyIntervals | None:
        for k in self.keys:
            if k is not None and h in k.heads:
                return k
        return None


def key_intervals(sets: RowSets, expr: Expr, heads, grid: CallGrid | None = None):
    """KeyIntervals of a head class, or None when its row sets are not exact."""
    return KeyIntervals(tuple(heads), expr, sets.lower, grid) if sets.exact else None
