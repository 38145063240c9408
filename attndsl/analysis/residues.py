"""Exact tile classes for exact row sets with residue pieces, without pair-by-pair refinement.

Input: an exact :class:`~attndsl.analysis.pieces.RowSets` (lower is upper) some of whose pieces
carry a residue, a tile shape. Output: a :class:`ResidueBounds` that tells
:func:`~attndsl.analysis.blockmap.row_classes` two things the interval passes alone cannot:

* **touched is exact** when every residue piece is shrunk to its first and last live key
  (:data:`~attndsl.analysis.rows.MAX_SHRINK`) and the largest distance between consecutive live
  residues (cyclically) is at most the tile width ``BK``: then a tile that meets a piece's span
  holds one of its live keys (an end of the span, or ``BK`` consecutive keys inside it);
* **killed tiles are not full**: with the residue pieces' offsets one expression and ``R`` the
  longest run of consecutive live residues of the union of their classes (``R < M``), any
  ``R + 1`` consecutive keys that lie in no band (residue-free) piece hold a key in no piece.
  A tile that holds ``R + 1`` such keys of one of its rows is therefore not covered.

Invariant: both facts are proved from the pieces alone, for every row; they make tiles partial
(touched and not covered) only where that is certain, and never decide a tile empty or full,
so the block map stays sound, and exact wherever the row sets say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import lcm

import numpy as np

from .pieces import Piece
from .rows import MAX_SHRINK, range_counts

MAX_UNION_MODULUS = 1 << 16      # classes combined modulo the lcm of their moduli up to this


@dataclass(frozen=True)
class ResidueBounds:
    touch_exact: bool            # touched tiles from the shrunk spans are exactly the touched ones
    run: int | None              # R: longest run of live keys of the residue union (None: no bound)


def _max_gap(live, m: int) -> int:
    """Largest distance between consecutive live residues of modulus m, cyclically."""
    r = sorted(live)
    return max([b - a for a, b in zip(r, r[1:])] + [r[0] + m - r[-1]])


def _max_run(live: set, m: int) -> int | None:
    """Longest run of consecutive live residues, cyclically; None when every residue is live."""
    if len(live) >= m:
        return None
    best = run = 0
    for r in range(2 * m):                   # twice round the circle: wrapped runs count
        run = run + 1 if r % m in live else 0
        best = max(best, run)
    return best


def residue_bounds(pieces: tuple[Piece, ...], block) -> ResidueBounds:
    """What the residue pieces of an exact union prove about tiles of ``block``."""
    res = [p.residue for p in pieces if p.residue is not None]
    if not res:
        return ResidueBounds(True, None)
    bk = block[1]
    touch = all(len(r.live) <= MAX_SHRINK and _max_gap(r.live, r.modulus) <= bk for r in res)
    run = None
    if len({r.offset for r in res}) == 1:
        m = 1
        for r in res:
            m = lcm(m, r.modulus)
        if m <= MAX_UNION_MODULUS:
            live = {x + j * r.modulus for r in res for x in r.live for j in range(m // r.modulus)}
            run = _max_run(live, m)
    if run is not None and run + 1 > bk:
        run = None                          # no tile-wide run to find
    return ResidueBounds(touch, run)


def _gaps(lo, hi, kv_len: int):
    """The keys outside merged intervals lo/hi [H, R, P]: gaps [H, R, P + 1] (lo > hi: none)."""
    valid = lo <= hi
    start = np.full(lo.shape[:-1] + (1,), -1, lo.dtype)
    top = np.maximum.accumulate(np.concatenate([start, np.where(valid, hi, -1)], -1), axis=-1)
    g_lo = np.concatenate([np.where(valid, top[..., :-1] + 1, 1), top[..., -1:] + 1], -1)
    g_hi = np.concatenate([np.where(valid, lo - 1, 0), np.full(start.shape, kv_len - 1, lo.dtype)], -1)
    return g_lo, g_hi


def killed_tiles(lo, hi, grid, rows: np.ndarray, block, run: int, first_tile: int,
                 n_tiles: int) -> np.ndarray:
    """bool [H, n_tiles, nKT]: tiles where some row has ``run + 1`` consecutive keys outside the
    merged band intervals lo/hi [H, R, P] of ``rows`` (so, by :func:`residue_bounds`, not full).
    """
    bq, bk = block
    n_kt = -(-grid.kv_len // bk)
    a, b = _gaps(lo.astype(np.int64), hi.astype(np.int64), grid.kv_len)
    need = run + 1
    ok = b - a + 1 >= need
    ja, jb = a // bk, b // bk
    ja = np.where(np.minimum((ja + 1) * bk - 1, b) - a + 1 < need, ja + 1, ja)
    jb = np.where(b - np.maximum(jb * bk, a) + 1 < need, jb - 1, jb)
    ok &= ja <= jb
    first = np.where(ok, ja, 1)
    last = np.where(ok, jb, 0)
    tile_rows = rows // bq - first_tile
    return range_counts(tile_rows, first, last, n_tiles, n_kt) > 0
