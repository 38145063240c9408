"""Row sets made numeric: each query row's allowed keys as merged intervals, and the tiles they
touch and cover.

Input: the :class:`~attndsl.analysis.solve.Piece` unions of a :class:`RowSets`, a
:class:`~attndsl.reference.CallGrid` (sizes, parameters, tensor inputs) and a tile shape.
Output: per (head, query tile, key tile) whether some row of the tile touches the key tile and
whether every row covers it entirely. Work is O(heads x q_len x pieces) for the rows plus
O(tiles) for two cumulative sums; no per-pair evaluation.

Residue pieces are not expanded here: in an upper set a residue piece counts as its whole
interval (a superset), in a lower set it counts as nothing (a subset). Rows where a tensor index
falls outside its tensor (possible only where the pattern would not read it) are made unknown.
"""

from __future__ import annotations

import numpy as np

from ..interp import Evaluator
from ..ir import Op
from ..reference import CallGrid
from .pieces import SMALL, Piece


def eval_rows(grid: CallGrid, expr, heads, rows, live=None):
    env = grid.env(heads, rows, np.zeros(1, dtype=np.int64))
    env.out_of_range = []
    with np.errstate(all="ignore"):
        value = Evaluator(env).sub(expr, live)
    bad = None
    for b in env.out_of_range:
        b = np.asarray(b)
        b = b.any(axis=2, keepdims=True) if b.ndim == 3 else b
        bad = b if bad is None else (bad | b)
    return np.asarray(value), bad


MAX_SHRINK = 16


def _reads_large_values(grid: CallGrid, p: Piece) -> bool:
    """Whether the piece's bounds read a tensor holding values beyond +-SMALL.

    The bounds add to and multiply what they read (k > t[q] is k >= t[q] + 1), in int64 that
    wraps, unlike the mask itself; with values up to SMALL (positions) nothing wraps.
    """
    exprs = (p.lo, p.hi) + ((p.residue.offset,) if p.residue is not None else ())
    names = {n.value for e in exprs for n in e.walk() if n.op is Op.INDEX}
    for name in names:
        t = np.asarray(grid.tensors[name])
        if t.size and t.dtype.kind in "iu" and (t.max() > SMALL or t.min() < -SMALL):
            return True
    return False


def _shrink_to_live(grid: CallGrid, p: Piece, heads, rows, guard, lo, hi):
    """The first and last keys of [lo, hi] whose residue is live (lo > hi when there is none)."""
    shape = guard.shape
    off, bad = eval_rows(grid, p.residue.offset, heads, rows, guard[..., None])
    off = np.broadcast_to(off, shape + (1,))[..., 0]
    m = p.residue.modulus
    # distance from residue x up (down) to the nearest live residue: two lookups per row
    # instead of a pass per live residue
    live = np.fromiter(sorted(p.residue.live), dtype=np.int64)
    x = np.arange(m, dtype=np.int64)[:, None]
    up = ((live[None, :] - x) % m).min(axis=1)
    down = ((x - live[None, :]) % m).min(axis=1)
    first = lo + up[(lo - off) % m]
    last = hi - down[(hi - off) % m]
    return first, last, bad


def piece_slots(pieces: tuple[Piece, ...], grid: CallGrid, heads: np.ndarray, rows: np.ndarray,
                keep_residues: bool):
    """Like :func:`piece_bounds`, one slot at a time: lists of lo, hi [H', R] (contiguous, int32
    where the lengths allow) and rows made unknown [H', R] (bool)."""
    shape = (len(heads), len(rows))
    los, his = [], []
    unknown = np.zeros(shape, dtype=bool)
    last = grid.kv_len - 1
    # bounds are clipped to [0, kv_len - 1] (empty slots hold 1 > 0): int32 holds them all and
    # halves the memory traffic of the passes below
    kind = np.int32 if grid.kv_len < 2 ** 31 - 1 else np.int64
    for p in pieces:
        if p.residue is not None and not keep_residues:
            continue
        guard, bad_g = eval_rows(grid, p.guard, heads, rows)
        guard = np.broadcast_to(guard, shape + (1,))[..., 0].astype(bool)
        always = bool(guard.all())
        live = None if always else guard[..., None]
        lo, bad_lo = eval_rows(grid, p.lo, heads, rows, live)
        hi, bad_hi = eval_rows(grid, p.hi, heads, rows, live)
        lo = np.maximum(np.broadcast_to(lo, shape + (1,))[..., 0], 0)
        hi = np.minimum(np.broadcast_to(hi, shape + (1,))[..., 0], last)
        bads = [bad_g, bad_lo, bad_hi]
        if _reads_large_values(grid, p):
            bads.append(guard[..., None])
        if p.residue is not None and len(p.residue.live) <= MAX_SHRINK:
            lo, hi, bad_off = _shrink_to_live(grid, p, heads, rows, guard, lo, hi)
            bads.append(bad_off)
        for bad in bads:
            if bad is not None:
                unknown |= np.broadcast_to(bad, shape + (1,))[..., 0]
        if always:
            los.append(np.ascontiguousarray(np.broadcast_to(lo, shape), dtype=kind))
            his.append(np.ascontiguousarray(np.broadcast_to(hi, shape), dtype=kind))
        else:
            los.append(np.where(guard, lo, 1).astype(kind))
            his.append(np.where(guard, hi, 0).astype(kind))
    return los, his, unknown


def piece_bounds(pieces: tuple[Piece, ...], grid: CallGrid, heads: np.ndarray, rows: np.ndarray,
                 keep_residues: bool):
    """lo, hi [H', R, P] (empty slots have lo > hi) and rows made unknown [H', R] (bool).

    With ``keep_residues`` a residue piece contributes the span from its first to its last live
    key (a superset of its keys); without, it contributes nothing (a subset).
    """
    los, his, unknown = piece_slots(pieces, grid, heads, rows, keep_residues)
    kind = np.int32 if grid.kv_len < 2 ** 31 - 1 else np.int64
    if not los:
        return np.ones(unknown.shape + (0,), kind), np.zeros(unknown.shape + (0,), kind), unknown
    return np.stack(los, -1), np.stack(his, -1), unknown


def merge_slots(los: list, his: list):
    """:func:`merge` on lists of slots [H', R] (ascending, disjoint, non-adjacent; same count)."""
    if len(los) <= 1:
        return los, his
    if len(los) > 2:
        lo, hi = merge(np.stack(los, -1), np.stack(his, -1))
        return ([np.ascontiguousarray(lo[..., j]) for j in range(lo.shape[-1])],
                [np.ascontiguousarray(hi[..., j]) for j in range(hi.shape[-1])])
    (lo0, lo1), (hi0, hi1) = los, his
    # a: the non-empty slot with the smaller lo (first when both are empty), b: the other one
    swap = (lo0 > hi0) | ((lo1 < lo0) & (lo1 <= hi1))
    a_lo, b_lo = np.where(swap, lo1, lo0), np.where(swap, lo0, lo1)
    a_hi, b_hi = np.where(swap, hi1, hi0), np.where(swap, hi0, hi1)
    join = (b_lo <= a_hi + 1) & (b_lo <= b_hi)          # b is non-empty and meets a
    return ([a_lo, np.where(join, 1, b_lo).astype(a_lo.dtype)],
            [np.where(join, np.maximum(a_hi, b_hi), a_hi), np.where(join, 0, b_hi).astype(a_hi.dtype)])


def merge(lo: np.ndarray, hi: np.ndarray):
    """Merge each row's intervals into disjoint, non-adjacent ones (same slot count)."""
    n = lo.shape[-1]
    if n <= 1:
        return lo, hi
    big = np.iinfo(lo.dtype).max
    empty = lo > hi
    lo = np.where(empty, big, lo)
    hi = np.where(empty, -1, hi)
    if n == 2:
        swap = lo[..., 1] < lo[..., 0]
        lo = np.where(swap[..., None], lo[..., ::-1], lo)
        hi = np.where(swap[..., None], hi[..., ::-1], hi)
    else:
        order = np.argsort(lo, axis=-1, kind="stable")
        lo = np.take_along_axis(lo, order, -1)
        hi = np.take_along_axis(hi, order, -1)
    out_lo = np.ones_like(lo)
    out_hi = np.zeros_like(hi)
    cur_lo, cur_hi = lo[..., 0], hi[..., 0]
    for j in range(1, n):
        new = (lo[..., j] > cur_hi + 1) & (lo[..., j] != big)
        out_lo[..., j - 1] = np.where(new, cur_lo, 1)
        out_hi[..., j - 1] = np.where(new, cur_hi, 0)
        cur_lo = np.where(new, lo[..., j], cur_lo)
        cur_hi = np.where(new, hi[..., j], np.maximum(cur_hi, hi[..., j]))
    valid = cur_lo != big
    out_lo[..., n - 1] = np.where(valid, cur_lo, 1)
    out_hi[..., n - 1] = np.where(valid, cur_hi, 0)
    return out_lo, out_hi


def _tile_sums(base, idx, weight, first, last, size: int, shape):
    """Per (head, row tile, key tile): the weights of the entries idx whose range holds it."""
    fi, li = first.ravel()[idx], last.ravel()[idx]
    ok = fi <= li
    b = base[ok]
    w = weight[ok]
    # int32 throughout: NumPy's cumsum along the last axis is ~20x faster on it than on int64
    # or float64, and float64 temporaries of every tile cost page faults
    diff = np.zeros(size, dtype=np.int32)
    np.add.at(diff, b + fi[ok], w)
    np.subtract.at(diff, b + li[ok] + 1, w)
    return np.cumsum(diff.reshape(shape), axis=-1, dtype=np.int32)[..., :-1]


def _runs(tile_rows, arrays):
    """Entries (flat indices) where some array of [S, R] changes along R or a row tile starts,
    and the number of rows each one stands for."""
    first = arrays[0]
    change = np.empty(first.shape, dtype=bool)
    change[:, 0] = True
    np.not_equal(tile_rows[1:], tile_rows[:-1], out=change[:, 1:])
    for a in arrays:
        change[:, 1:] |= a[:, 1:] != a[:, :-1]
    idx = np.flatnonzero(change)
    weight = np.diff(np.append(idx, change.size)).astype(np.int32)
    return idx, weight


def range_counts(tile_rows, first, last, n_qt: int, n_kt: int):
    """How many rows of each (head, row tile) have key tile J in their range [first, last].

    first, last: [H, R, P]. Consecutive rows of one row tile with the same range are counted
    as one weighted entry, so the work is the number of distinct ranges, not of rows.
    """
    n_heads, n_rows, n_slots = first.shape
    f = np.ascontiguousarray(first.transpose(0, 2, 1)).reshape(-1, n_rows)
    la = np.ascontiguousarray(last.transpose(0, 2, 1)).reshape(-1, n_rows)
    idx, weight = _runs(tile_rows, (f, la))
    h = (idx // n_rows) // n_slots
    base = (h * n_qt + tile_rows[idx % n_rows]) * (n_kt + 1)
    return _tile_sums(base, idx, weight, f, la, n_heads * n_qt * (n_kt + 1), (n_heads, n_qt, n_kt + 1))


def _div(x, bk: int):
    """x // bk for x >= 0 (a shift when bk is a power of two)."""
    return x >> (bk.bit_length() - 1) if bk & (bk - 1) == 0 else x // bk


def touch_and_cover(lo, hi, grid: CallGrid, rows: np.ndarray, block, first_tile: int = 0,
                    n_tiles: int | None = None):
    """touched, covered [H', n_tiles, nKT] from merged per-row intervals lo/hi [H', R, P] of
    ``rows``, for the row tiles ``first_tile ..`` (by default every row tile of the call)."""
    n = lo.shape[-1]
    return touch_and_cover_slots([lo[..., j] for j in range(n)], [hi[..., j] for j in range(n)],
                                 grid, rows, block, first_tile, n_tiles, lo.shape[:-1])


def touch_and_cover_slots(los: list, his: list, grid: CallGrid, rows: np.ndarray, block,
                          first_tile: int = 0, n_tiles: int | None = None, shape=None):
    """:func:`touch_and_cover` on lists of merged slots lo/hi [H', R] (one change detection
    and two weighted sums over the distinct per-row tile ranges, not over the rows)."""
    bq, bk = block
    n_qt = -(-grid.q_len // bq) if n_tiles is None else n_tiles
    n_kt = -(-grid.kv_len // bk)
    tile_rows = rows // bq - first_tile
    n_heads, n_rows = los[0].shape if los else shape
    if not los:
        z = np.zeros((n_heads, n_qt, n_kt), dtype=bool)
        return z, z.copy()
    last_key = grid.kv_len - 1
    ft, lt, fc, lc = [], [], [], []
    for lo, hi in zip(los, his):
        empty = lo > hi
        ft.append(np.where(empty, 1, _div(lo, bk)))
        lt.append(np.where(empty, 0, _div(hi, bk)))
        fc.append(np.where(empty, 1, _div(lo + (bk - 1), bk)))
        end = _div(hi + 1, bk) - 1
        if grid.kv_len % bk:
            end = np.where(hi == last_key, n_kt - 1, end)
        lc.append(np.where(empty, 0, end))
    arrays = [np.stack(x).reshape(-1, n_rows) for x in (ft, lt, fc, lc)]      # [S*H', R]
    idx, weight = _runs(tile_rows, arrays)
    h = (idx // n_rows) % n_heads
    width = n_kt + 1
    base = (h * n_qt + tile_rows[idx % n_rows]) * width
    size, shape3 = n_heads * n_qt * width, (n_heads, n_qt, width)
    touched = _tile_sums(base, idx, weight, arrays[0], arrays[1], size, shape3) > 0
    cover_rows = _tile_sums(base, idx, weight, arrays[2], arrays[3], size, shape3)
    rows_per_tile = np.bincount(tile_rows, minlength=n_qt)
    covered = cover_rows == rows_per_tile[None, :, None]
    return touched, covered


def uses_head(pieces) -> bool:
    return any(e.uses(Op.H) for p in pieces for e in (p.guard, p.lo, p.hi))
