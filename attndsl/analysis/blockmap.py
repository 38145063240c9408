"""Tile classification: the three-valued block map of a pattern, sound for every pattern and
exact on the band family.

Input: a :class:`~attndsl.reference.CallGrid` and a tile shape (BQ, BK). Output: int8
``[heads, ceil(q_len/BQ), ceil(kv_len/BK)]``: 0 empty (no allowed pair), 1 partial, 2 full
(every in-bounds pair allowed).

Passes, cheapest first:
1. the row solver (:mod:`.solve`, :mod:`.rows`): exact key intervals per row turned into
   touched/covered tiles — when the solve is exact this is the answer;
2. when the solve is inexact (some atom has no interval form), the tile interval analysis
   (:mod:`.intervals`) narrows what the rows left open. An exact solve with residue pieces
   skips it: :mod:`.residues` proves its touched tiles exact and its tiles with a run of keys
   in no piece not full, so that only a tile between live keys that holds none, or a tile
   filled by residues alone (both rare with tiles at least as wide as the modulus) is left;
3. tiles still undecided (neither proved empty, full, nor partial) are first sampled (a
   ``SAMPLE`` x ``SAMPLE`` sub-grid of each: one holding an allowed and a disallowed pair
   proves its tile partial) if that costs at most ``SAMPLE_PAIRS`` pairs, then the rest are
   evaluated pair by pair if they hold at most ``REFINE_PAIRS`` pairs in all; tiles left
   undecided stay partial (sound).
   :data:`REFINED` counts that work: exact descriptors (band or residue pieces at tiles as
   wide as the residues' gaps) never reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..reference import CallGrid
from .intervals import classify_tiles, make_grid
from .pieces import RowSets
from .residues import killed_tiles, residue_bounds
from .rows import merge_slots, piece_slots, touch_and_cover_slots, uses_head
from .solve import solve

EMPTY, PARTIAL, FULL = 0, 1, 2
REFINE_PAIRS = 1 << 24
SAMPLE = 16                   # rows and columns of a tile sampled before it is refined whole
SAMPLE_PAIRS = 1 << 21        # the sampling step's budget (pairs)
CHUNK_ELEMENTS = 1 << 22      # rows, or tiles, that one chunk of row_classes holds


@dataclass
class RefineCount:
    """Work done pair by pair since the last :meth:`reset`: tiles refined whole (per head) and
    their pairs, and the pairs of the samples that proved tiles partial first."""

    tiles: int = 0
    pairs: int = 0
    sampled: int = 0

    def reset(self) -> None:
        self.tiles = self.pairs = self.sampled = 0


REFINED = RefineCount()


def _sets_bounds(pieces, grid: CallGrid, heads, rows, upper: bool, slots=None):
    """Merged per-row intervals (lists of slots [H', R]), and whether some rows could not be
    evaluated (a tensor index out of range where the pattern would not read it): those rows get
    every key in an upper set and no key in a lower one. ``slots``: the pieces' bounds when
    already evaluated (:func:`~.rows.piece_slots`)."""
    los, his, unknown = slots or piece_slots(pieces, grid, heads, rows, keep_residues=upper)
    some_unknown = bool(unknown.any())
    if some_unknown:
        kind = los[0].dtype if los else np.int64
        if upper:
            los = los + [np.where(unknown, 0, 1).astype(kind)]
            his = his + [np.where(unknown, grid.kv_len - 1, 0).astype(kind)]
        else:
            los = [np.where(unknown, 1, lo).astype(kind) for lo in los]
            his = [np.where(unknown, 0, hi).astype(kind) for hi in his]
    return merge_slots(los, his), some_unknown


def _stacked(slots, n_heads: int, n_rows: int):
    """lo, hi [H', R, P] from lists of slots."""
    los, his = slots
    if not los:
        return np.ones((n_heads, n_rows, 0), np.int64), np.zeros((n_heads, n_rows, 0), np.int64)
    return np.stack(los, -1), np.stack(his, -1)


def row_classes(sets: RowSets, grid: CallGrid, block):
    """(may, must, certainly_partial, exact) per tile from the row solver.

    Rows are taken a chunk of row tiles at a time (:data:`CHUNK_ELEMENTS` per-row or per-tile
    entries), so scratch memory stays within a constant times the tiles returned, however long
    the call."""
    per_head = uses_head(sets.lower) or uses_head(sets.upper)
    heads = np.arange(grid.heads if per_head else 1)
    bq, bk = block
    n_qt, n_kt = -(-grid.q_len // bq), -(-grid.kv_len // bk)
    shape = (len(heads), n_qt, n_kt)
    may, must, partial = (np.zeros(shape, dtype=bool) for _ in range(3))
    step = max(1, min(CHUNK_ELEMENTS // bq, CHUNK_ELEMENTS // (n_kt + 1)))
    exact = sets.exact and not any(p.residue for p in sets.upper)
    residues = residue_bounds(sets.upper, block) if sets.exact and not exact else None
    for t0 in range(0, n_qt, step):
        t1 = min(n_qt, t0 + step)
        rows = np.arange(t0 * bq, min(grid.q_len, t1 * bq))
        slots = piece_slots(sets.upper, grid, heads, rows, keep_residues=True)
        up, unknown = _sets_bounds(sets.upper, grid, heads, rows, True, slots)
        touched_u, covered_u = touch_and_cover_slots(*up, grid, rows, block, t0, t1 - t0,
                                                     (len(heads), len(rows)))
        may[:, t0:t1] = touched_u
        if exact and not unknown:
            must[:, t0:t1] = covered_u
            partial[:, t0:t1] = touched_u & ~covered_u
            continue
        exact = False
        if sets.exact:          # the lower set is the upper one: its band pieces' bounds
            keep = [i for i, p in enumerate(sets.upper) if p.residue is None]
            low_slots, _ = _sets_bounds(sets.lower, grid, heads, rows, False,
                                        ([slots[0][i] for i in keep], [slots[1][i] for i in keep],
                                         slots[2]))
        else:
            low_slots, _ = _sets_bounds(sets.lower, grid, heads, rows, upper=False)
        touched_l, covered_l = touch_and_cover_slots(*low_slots, grid, rows, block, t0, t1 - t0,
                                                     (len(heads), len(rows)))
        must[:, t0:t1] = covered_l
        not_full = ~covered_u
        certain = touched_l                   # tiles that surely hold an allowed pair
        if residues is not None and not unknown:
            # exact sets with residue pieces: low holds their band pieces (residues dropped)
            if residues.touch_exact:
                certain = touched_u
            if residues.run is not None:
                low = _stacked(low_slots, len(heads), len(rows))
                not_full = not_full | killed_tiles(*low, grid, rows, block, residues.run, t0,
                                                   t1 - t0)
        partial[:, t0:t1] = certain & not_full
    return may, must, partial, exact


def _eval_tiles(grid: CallGrid, block, i: int, js, picks=None):
    """(has an allowed pair, all allowed) [H, len(js)] of tiles (i, js), over every pair or,
    with ``picks``, the sub-grid of the tile's rows and columns at those offsets."""
    bq, bk = block
    n_rows = min(grid.q_len, (i + 1) * bq) - i * bq
    rows = i * bq + (np.arange(n_rows) if picks is None else _offsets(picks, n_rows))
    spans = []
    for j in js:
        width = min(grid.kv_len, (j + 1) * bk) - j * bk
        spans.append(j * bk + (np.arange(width) if picks is None else _offsets(picks, width)))
    starts = np.cumsum([0] + [len(c) for c in spans[:-1]])
    m = np.asarray(grid.mask(np.arange(grid.heads), rows, np.concatenate(spans)))
    pairs = len(rows) * int(starts[-1] + len(spans[-1])) * (grid.heads if grid.mask_per_head else 1)
    has = np.logical_or.reduceat(m.any(axis=1), starts, axis=1)
    every = np.logical_and.reduceat(m.all(axis=1), starts, axis=1)
    return has, every, pairs


def _offsets(picks: int, n: int) -> np.ndarray:
    """At most ``picks`` offsets in [0, n), evenly spread, first and last included."""
    o = np.linspace(0, n - 1, min(picks, n)).round().astype(np.int64)     # ascending
    return o[np.append(True, o[1:] != o[:-1])]     # (not np.unique: it imports numpy.ma)


def _sample(grid: CallGrid, block, undecided: np.ndarray, may, must) -> None:
    """Prove undecided tiles partial from a SAMPLE x SAMPLE sub-grid of their pairs: a sample
    holding an allowed and a disallowed pair makes its tile partial (may, not must), and the
    tile is no longer undecided. Other tiles are left as they were (in place)."""
    for i in np.flatnonzero(undecided.any(axis=(0, 2))):
        js = np.flatnonzero(undecided[:, i].any(axis=0))
        has, every, pairs = _eval_tiles(grid, block, i, js, SAMPLE)
        REFINED.sampled += pairs
        mixed = undecided[:, i, js] & has & ~every
        may[:, i, js] |= mixed
        must[:, i, js] &= ~mixed
        undecided[:, i, js] &= ~mixed


def _refine(grid: CallGrid, block, undecided: np.ndarray, may, must) -> None:
    """Evaluate undecided tiles pair by pair; updates may/must [heads, nQT, nKT] in place."""
    for i in np.flatnonzero(undecided.any(axis=(0, 2))):
        js = np.flatnonzero(undecided[:, i].any(axis=0))
        has, every, pairs = _eval_tiles(grid, block, i, js)
        REFINED.tiles += len(js)
        REFINED.pairs += pairs
        sel = undecided[:, i, js]
        may[:, i, js] = np.where(sel, has, may[:, i, js])
        must[:, i, js] = np.where(sel, every, must[:, i, js])


def block_map(grid: CallGrid, block, sets: RowSets | None = None) -> np.ndarray:
    bq, bk = block
    n_qt, n_kt = -(-grid.q_len // bq), -(-grid.kv_len // bk)
    shape = (grid.heads, n_qt, n_kt)
    if n_qt == 0 or n_kt == 0:
        return np.zeros(shape, dtype=np.int8)
    sets = sets if sets is not None else solve(grid.ir.mask, grid.params)
    may, must, partial, exact = row_classes(sets, grid, block)
    if not exact:
        if not sets.exact:
            tiles = make_grid(grid.q_len, grid.kv_len, grid.heads, grid.kv_heads, block,
                              grid.params, grid.tensors, per_head=grid.mask_per_head)
            ai = classify_tiles(grid.ir.mask, tiles)
            heads = max(may.shape[0], ai.may.shape[0])
            may = np.broadcast_to(may, (heads, n_qt, n_kt)) & ai.may
            must = np.broadcast_to(must, (heads, n_qt, n_kt)) | ai.must
        undecided = may & ~must & ~partial
        tiles = int(undecided.sum()) * (grid.heads // undecided.shape[0])
        sample = min(bq, SAMPLE) * min(bk, SAMPLE)
        if tiles and tiles * min(sample, bq * bk) <= min(SAMPLE_PAIRS, REFINE_PAIRS):
            may, must, undecided = (np.broadcast_to(a, shape).copy() for a in (may, must, undecided))
            if 4 * sample <= bq * bk:          # the sample is much cheaper than the tile
                _sample(grid, block, undecided, may, must)
                tiles = int(undecided.sum())
            if 0 < tiles * bq * bk <= REFINE_PAIRS:
                _refine(grid, block, undecided, may, must)
    out = np.broadcast_to(may, shape).astype(np.int8)     # must implies may: 0, 1 or 2
    out += np.broadcast_to(must, shape)
    return out

