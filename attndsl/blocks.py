"""Tile classification by brute force: every pair of every tile evaluated, then reduced.

Input: a :class:`~attndsl.reference.CallGrid` and a tile shape (BQ, BK). Output: int8
``[heads, ceil(q_len/BQ), ceil(kv_len/BK)]`` with 0 empty, 1 partial, 2 full (every in-bounds
pair allowed). A pair is allowed when the mask holds and the score clause, evaluated at a
finite score (0), is not -inf. Cost O(heads x q_len x kv_len): the oracle that the symbolic
analysis (attndsl.analysis) is tested against, not what block_map uses.
"""

from __future__ import annotations

import numpy as np

from .errors import AttnCallError
from .inputs import check_max_length, short_repr
from .reference import CallGrid

EMPTY, PARTIAL, FULL = 0, 1, 2


def tile_shape(block) -> tuple[int, int]:
    """The ``block`` argument (BQ, BK) as two Python ints: a tuple, list or 1-D array of two
    Python or NumPy integers (not bools, floats or strings), each in [1, MAX_LENGTH]."""
    pair = isinstance(block, (tuple, list)) or (isinstance(block, np.ndarray) and block.ndim == 1)
    if not pair or len(block) != 2 or \
            any(isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)) for b in block):
        raise AttnCallError(f"argument 'block' must be a pair of positive ints, got "
                            f"{short_repr(block)}")
    bq, bk = (int(b) for b in block)
    if bq < 1 or bk < 1:
        raise AttnCallError(f"argument 'block' must be a pair of positive ints, got {(bq, bk)}")
    check_max_length("block", max(bq, bk))
    return bq, bk


def block_map_by_tiles(grid: CallGrid, block) -> np.ndarray:
    bq, bk = tile_shape(block)
    nqb, nkb = -(-grid.q_len // bq), -(-grid.kv_len // bk)
    out = np.zeros((grid.heads, nqb, nkb), dtype=np.int8)
    if nqb == 0 or nkb == 0:
        return out
    heads = np.arange(grid.heads)
    cols = np.arange(grid.kv_len)
    pad = nkb * bk - grid.kv_len
    for i in range(nqb):
        rows = np.arange(i * bq, min(grid.q_len, (i + 1) * bq))
        m = np.asarray(grid.mask(heads, rows, cols))
        if grid.ir.score is not None:       # allowed: the score clause is not -inf either
            zero = np.zeros(m.shape)
            m = m & (grid.score(heads, rows, cols, zero) != -np.inf)
        any_ = np.pad(m, ((0, 0), (0, 0), (0, pad)), constant_values=False)
        all_ = np.pad(m, ((0, 0), (0, 0), (0, pad)), constant_values=True)
        shape = (grid.heads, len(rows), nkb, bk)
        has = any_.reshape(shape).any(axis=(1, 3))
        every = all_.reshape(shape).all(axis=(1, 3))
        out[:, i] = np.where(every, FULL, np.where(has, PARTIAL, EMPTY))
    return out
