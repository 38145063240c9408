"""The meaning of a pattern (LANGUAGE.md section 1), computed with NumPy in chunks.

:class:`CallGrid` evaluates a pattern's mask and score on any tile of one batch element of one
call; :func:`dense_mask` and :func:`reference_attention` sweep it over row chunks so that no
int64 grid of the full ``[q_len, kv_len]`` size is ever built (the dense mask itself is the
only full-size array, and only where asked for).
"""

from __future__ import annotations

import numpy as np

from .interp import Env, Evaluator
from .ir import Op, PatternIR
from .selectors import SelectorTables

CHUNK_ELEMENTS = 1 << 21          # grid points evaluated at once



def head_dependent(expr) -> bool:
    return expr.uses(Op.H, Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.ROUTE)


class CallGrid:
    """One batch element of one call: sizes, parameter values, tensor inputs, selector tables."""

    def __init__(self, ir: PatternIR, params: dict, q_len: int, kv_len: int, heads: int,
                 kv_heads: int, tensors: dict, query=None, key=None, scale=None):
        self.ir = ir
        self.params = params
        self.q_len, self.kv_len, self.heads, self.kv_heads = q_len, kv_len, heads, kv_heads
        self.offset = kv_len - q_len
        self.tensors = tensors
        self.selectors = SelectorTables(params, q_len, kv_len, heads, kv_heads, query, key, scale,
                                        tensors)
        self.mask_per_head = head_dependent(ir.mask)
        self.score_per_head = ir.score is not None and head_dependent(ir.score)

    def env(self, heads, rows, cols, score=None) -> Env:
        """The Env of a tile: heads, query rows i and key columns j given as index arrays."""
        env = Env(
            h=np.asarray(heads, np.int64)[:, None, None],
            q=(np.asarray(rows, np.int64) + self.offset)[None, :, None],
            k=np.asarray(cols, np.int64)[None, None, :],
            q_len=self.q_len, kv_len=self.kv_len, heads=self.heads, kv_heads=self.kv_heads,
            params=self.params, tensors=self.tensors, selectors=self.selectors, score=score)
        return env

    def mask(self, heads, rows, cols) -> np.ndarray:
        """bool [len(heads), len(rows), len(cols)] (a broadcast view when head-independent)."""
        heads = np.asarray(heads, np.int64)
        shape = (len(heads), len(rows), len(cols))
        use = heads if self.mask_per_head else heads[:1]
        with np.errstate(all="ignore"):
            value = Evaluator(self.env(use, rows, cols)).sub(self.ir.mask)
        value = np.broadcast_to(np.asarray(value, dtype=bool), (len(use),) + shape[1:])
        return np.broadcast_to(value, shape)

    def score(self, heads, rows, cols, score0: np.ndarray) -> np.ndarray:
        """The score clause on a tile, with ``score`` = score0 [len(heads), rows, cols]."""
        if self.ir.score is None:
            return score0
        with np.errstate(all="ignore"):
            value = Evaluator(self.env(heads, rows, cols, score=score0)).sub(self.ir.score)
        return np.broadcast_to(np.asarray(value, dtype=np.float64), score0.shape)


def row_chunks(n_rows: int, n_cols: int, n_heads: int = 1):
    step = max(1, CHUNK_ELEMENTS // max(1, n_cols * n_heads))
    for start in range(0, n_rows, step):
        yield np.arange(start, min(n_rows, start + step))


def dense_mask(grid: CallGrid, row0: int = 0, row1: int | None = None, col0: int = 0,
               col1: int | None = None) -> np.ndarray:
    """bool [heads, row1 - row0, col1 - col0]: the mask on query rows [row0, row1) and key
    columns [col0, col1) (by default the whole call)."""
    row1 = grid.q_len if row1 is None else row1
    col1 = grid.kv_len if col1 is None else col1
    out = np.empty((grid.heads, row1 - row0, col1 - col0), dtype=bool)
    heads = np.arange(grid.heads)
    cols = np.arange(col0, col1)
    if col1 == col0:
        return out
    use = heads if grid.mask_per_head else heads[:1]
    for rows in row_chunks(row1 - row0, col1 - col0, len(use)):
        out[:, rows[0]:rows[-1] + 1] = grid.mask(heads, rows + row0, cols)
    return out


def reference_attention(grids: list[CallGrid], q: np.ndarray, k: np.ndarray, v: np.ndarray,
                        scale: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 (out [B, H, Lq, Dv], lse [B, H, Lq]); rows with no allowed key: 0 and -inf."""
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = np.zeros((batch, heads, q_len, v.shape[-1]))
    lse = np.full((batch, heads, q_len), -np.inf)
    cols = np.arange(kv_len)
    if kv_len == 0:
        return out, lse
    for b, grid in enumerate(grids):
        for h in range(heads):
            kh = h // group
            for rows in row_chunks(q_len, kv_len):
                with np.errstate(all="ignore"):
                    s0 = scale * (q[b, h, rows] @ k[b, kh].T)[None]
                allowed = grid.mask([h], rows, cols)
                s = grid.score([h], rows, cols, s0)
                out[b, h, rows], lse[b, h, rows] = attend(allowed[0], s[0], v[b, kh])
    return out, lse


def attend(allowed: np.ndarray, s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One head's rows: (out [R, Dv], lse [R]) from the mask [R, Lkv], the scores [R, Lkv] and V
    [Lkv, Dv], with the non-finite rules of docs/language.md.

    A pair is allowed when the mask holds and its score is not -inf. A NaN or +inf score at an
    allowed pair makes the row's output NaN and its lse NaN (any NaN) or +inf; otherwise the
    softmax runs over the allowed pairs. V is read at allowed keys only: a non-finite V entry
    at an allowed key makes that output entry NaN (a NaN, or both infinities) or that
    infinity, as in exact arithmetic, where every allowed key's weight is positive.
    """
    allowed = allowed & (s != -np.inf)
    with np.errstate(all="ignore"):
        nan_row = (allowed & np.isnan(s)).any(-1)
        inf_row = (allowed & (s == np.inf)).any(-1)
        finite = allowed & np.isfinite(s)
        top = np.max(np.where(finite, s, -np.inf), axis=-1, keepdims=True)
        safe_top = np.where(np.isfinite(top), top, 0.0)
        w = np.where(finite, np.exp(s - safe_top), 0.0)
        total = w.sum(axis=-1)
        row_has = finite.any(axis=-1)
        p = w / np.where(row_has, total, 1.0)[..., None]
        lse = np.where(row_has, np.log(np.where(row_has, total, 1.0)) + safe_top[..., 0], -np.inf)
        bad_keys = np.flatnonzero(~np.isfinite(v).all(axis=-1))
        out = p @ (np.where(np.isfinite(v), v, 0.0) if len(bad_keys) else v)
        if len(bad_keys):
            out = _poison(out, allowed[:, bad_keys].astype(np.float64), v[bad_keys])
    lse = np.where(nan_row, np.nan, np.where(inf_row, np.inf, lse))
    out = np.where((nan_row | inf_row)[:, None], np.nan, out)
    return out, lse


def _poison(out: np.ndarray, allowed: np.ndarray, v_bad: np.ndarray) -> np.ndarray:
    """``out`` with the entries whose allowed keys (``allowed`` [R, n] over the keys of V rows
    ``v_bad`` [n, Dv] that hold a non-finite value) hold a non-finite value made NaN or inf."""
    pos = allowed @ (v_bad == np.inf) > 0
    neg = allowed @ (v_bad == -np.inf) > 0
    nan = (allowed @ np.isnan(v_bad) > 0) | (pos & neg)
    return np.where(nan, np.nan, np.where(pos, np.inf, np.where(neg, -np.inf, out)))


def check_indices(grids: list[CallGrid]) -> None:
    """Raise the interpreter's AttnCallError if a tensor index of the mask or the score clause is
    out of range anywhere it is evaluated; computes nothing else (O(pairs) on the CPU)."""
    for grid in grids:
        heads = np.arange(grid.heads)
        cols = np.arange(grid.kv_len)
        for rows in row_chunks(grid.q_len, grid.kv_len, grid.heads):
            grid.mask(heads, rows, cols)
            if grid.ir.score is not None:
                grid.score(heads, rows, cols, np.zeros((grid.heads, len(rows), grid.kv_len)))
