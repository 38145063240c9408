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

    def env(self, heads, rows, cols, score=None, xp=None) -> Env:
        """The Env of a tile: heads, query rows i and key columns j given as index arrays."""
        env = Env(
            h=np.asarray(heads, np.int64)[:, None, None],
            q=(np.asarray(rows, np.int64) + self.offset)[None, :, None],
            k=np.asarray(cols, np.int64)[None, None, :],
            q_len=self.q_len, kv_len=self.kv_len, heads=self.heads, kv_heads=self.kv_heads,
            params=self.params, tensors=self.tensors, selectors=self.selectors, score=score)
        if xp is not None:
            env.xp = xp
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


def dense_mask(grid: CallGrid) -> np.ndarray:
    out = np.empty((grid.heads, grid.q_len, grid.kv_len), dtype=bool)
    heads = np.arange(grid.heads)
    cols = np.arange(grid.kv_len)
    if grid.kv_len == 0:
        return out
    use = heads if grid.mask_per_head else heads[:1]
    for rows in row_chunks(grid.q_len, grid.kv_len, len(use)):
        out[:, rows[0]:rows[-1] + 1] = grid.mask(heads, rows, cols)
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
                s0 = scale * (q[b, h, rows] @ k[b, kh].T)[None]
                allowed = grid.mask([h], rows, cols)
                s = grid.score([h], rows, cols, s0)
                allowed = allowed & (s != -np.inf)
                with np.errstate(all="ignore"):
                    top = np.max(np.where(allowed, s, -np.inf), axis=-1, keepdims=True)
                    safe_top = np.where(np.isfinite(top), top, 0.0)
                    w = np.where(allowed, np.exp(s - safe_top), 0.0)
                    total = w.sum(axis=-1)
                    row_has = allowed.any(axis=-1)
                    p = w / np.where(row_has, total, 1.0)[..., None]
                out[b, h, rows] = (p @ v[b, kh])[0]
                lse[b, h, rows] = np.where(row_has, np.log(np.where(row_has, total, 1.0))
                                           + safe_top[..., 0], -np.inf)[0]
    return out, lse


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
