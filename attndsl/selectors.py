"""The selectors of LANGUAGE.md sections 4 and 5, computed exactly in NumPy (float64).

Input: the call's sizes, this batch element's query/key arrays (``[heads, q_len, D]`` and
``[kv_heads, kv_len, D]``), the scale, tensor inputs and parameter values. Output: per selector
node, a table looked up at grid points — ``[heads, query blocks, key blocks]`` for the block
selectors, ``[query blocks, key blocks]`` for ``random_blocks``, and per-row / per-key cluster
ids for ``route``. Tables are built on first use and memoised per node.
"""

from __future__ import annotations

import numpy as np

from .errors import AttnCallError
from .interp import evaluate_scalar
from .ir import DATA_SELECTOR_OPS, Expr, Op

_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s splitmix64 finaliser on uint64 arrays (arithmetic mod 2**64)."""
    return _splitmix64_inplace(np.array(x, dtype=np.uint64))


def _splitmix64_inplace(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def random_block_table(r: int, b: int, seed: int, first_block: int, last_block: int,
                       kv_len: int) -> np.ndarray:
    """bool [query blocks first..last, nkb]: the r key blocks with the smallest key(I, J)."""
    nkb = -(-kv_len // b)
    n_rows = max(0, last_block - first_block + 1)
    if r >= nkb:
        return np.ones((n_rows, nkb), dtype=bool)
    if r == 0:
        return np.zeros((n_rows, nkb), dtype=bool)
    out = np.empty((n_rows, nkb), dtype=bool)
    step = max(1, (1 << 16) // max(nkb, 1))              # rows per chunk: stays in cache
    cols = np.arange(nkb, dtype=np.uint64)
    base = np.uint64((seed << 40) & _MASK64)
    for start in range(0, n_rows, step):
        blocks = np.arange(first_block + start, first_block + min(n_rows, start + step),
                           dtype=np.int64)
        rows = blocks.astype(np.uint64) << np.uint64(20)      # two's complement == mod 2**64
        with np.errstate(over="ignore"):
            keys = rows[:, None] + cols[None, :]
            keys += base
        _splitmix64_inplace(keys)
        out[start:start + len(blocks)] = _smallest(keys, r)
    return out


def _smallest(keys: np.ndarray, r: int) -> np.ndarray:
    """bool mask of the r smallest keys per row (ties: the smaller column first)."""
    kth = np.partition(keys, r - 1, axis=1)[:, r - 1:r]
    below = keys < kth
    tied = keys == kth
    room = r - below.sum(axis=1, keepdims=True)
    if np.array_equal(tied.sum(axis=1, keepdims=True), room):     # no tie crosses the cut
        return below | tied
    return below | (tied & (np.cumsum(tied, axis=1) <= room))


def _pooled(x: np.ndarray, block_of: np.ndarray, n_blocks: int) -> np.ndarray:
    """Mean of the vectors of x [G, L, D] per block id in [0, n_blocks) -> [G, n_blocks, D]."""
    g, _, d = x.shape
    sums = np.zeros((g, n_blocks, d))
    if block_of.size and np.all(block_of[1:] >= block_of[:-1]):     # runs of one block each
        starts = np.flatnonzero(np.r_[True, block_of[1:] != block_of[:-1]])
        sums[:, block_of[starts]] = np.add.reduceat(x, starts, axis=1)
    else:
        np.add.at(sums, (slice(None), block_of), x)
    counts = np.bincount(block_of, minlength=n_blocks).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[None, :, None]


class SelectorTables:
    """Lazily built selector tables for one batch element of one call."""

    def __init__(self, params: dict, q_len: int, kv_len: int, heads: int, kv_heads: int,
                 query=None, key=None, scale: float | None = None, tensors: dict | None = None):
        self.params = params
        self.q_len, self.kv_len = q_len, kv_len
        self.heads, self.kv_heads = heads, kv_heads
        self.offset = kv_len - q_len
        self.query, self.key = query, key
        self.scale = scale
        self.tensors = tensors or {}
        self._tables: dict[int, object] = {}

    def kv_head(self) -> np.ndarray:
        return np.arange(self.heads) // (self.heads // self.kv_heads)

    def _need_qk(self, node: Expr) -> None:
        if self.query is None or self.key is None:
            raise AttnCallError(f"{node.op.value} depends on the query and key vectors: pass "
                                "query= and key= arrays")

    def _block_scores(self, b: int):
        """Pooled block scores S [heads, query blocks, nkb] and the first query block."""
        qpos = np.arange(self.q_len) + self.offset
        qblock = qpos // b
        first = int(qblock.min()) if self.q_len else self.offset // b
        nqb = int(qblock.max()) - first + 1 if self.q_len else 0
        nkb = -(-self.kv_len // b)
        pq = _pooled(np.asarray(self.query, np.float64), qblock - first, nqb)
        pk = _pooled(np.asarray(self.key, np.float64), np.arange(self.kv_len) // b, nkb)
        s = np.einsum("hid,hjd->hij", pq, pk[self.kv_head()])
        return s, first

    def _candidates(self, b: int, causal: bool, first: int, nqb: int) -> np.ndarray:
        nkb = -(-self.kv_len // b)
        blocks_i = np.arange(first, first + nqb)[:, None]
        blocks_j = np.arange(nkb)[None, :]
        return (blocks_j < blocks_i) if causal else np.ones((nqb, nkb), dtype=bool)

    def _ranked(self, s: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Candidate key blocks in selection order: descending S, ties smaller J first."""
        keyed = np.where(cand[None], s, -np.inf)
        return np.argsort(-keyed, axis=-1, kind="stable")

    def _topk(self, n: int, b: int, causal: bool) -> tuple[np.ndarray, int]:
        s, first = self._block_scores(b)
        cand = self._candidates(b, causal, first, s.shape[1])
        order = self._ranked(s, cand)
        table = np.zeros(s.shape, dtype=bool)
        np.put_along_axis(table, order[..., :n], True, axis=-1)
        return table & cand[None], first

    def _topp(self, p: float, b: int, causal: bool) -> tuple[np.ndarray, int]:
        s, first = self._block_scores(b)
        cand = self._candidates(b, causal, first, s.shape[1])
        scale = self.scale if self.scale is not None else 1.0 / np.sqrt(self.query.shape[-1])
        logits = np.where(cand[None], scale * s, -np.inf)
        if logits.size == 0:            # no query row or no key block: nothing to select
            return np.zeros(s.shape, dtype=bool), first
        top = np.max(logits, axis=-1, keepdims=True)
        with np.errstate(invalid="ignore"):
            w = np.where(cand[None], np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
        prob = w / np.maximum(w.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
        order = self._ranked(s, cand)
        sorted_p = np.take_along_axis(prob, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p    # mass strictly before each position
        keep_sorted = (before < p) | (np.arange(order.shape[-1]) == 0)
        table = np.zeros(s.shape, dtype=bool)
        np.put_along_axis(table, order, keep_sorted, axis=-1)
        return table & cand[None], first

    def _route(self, node: Expr):
        c = np.asarray(self.tensors[node.value], np.float64)
        d = self.query.shape[-1]
        if c.ndim != 3 or c.shape[0] != self.heads or c.shape[2] != d or c.shape[1] == 0:
            raise AttnCallError(f"route: tensor input '{node.value}' must have shape [heads="
                                f"{self.heads}, C >= 1, head_dim={d}], got {list(c.shape)}")
        cq = np.argmax(np.einsum("hid,hmd->him", np.asarray(self.query, np.float64), c), axis=-1)
        keys = np.asarray(self.key, np.float64)[self.kv_head()]
        ck = np.argmax(np.einsum("hjd,hmd->hjm", keys, c), axis=-1)
        return cq, ck

    def table(self, node: Expr):
        got = self._tables.get(id(node))
        if got is not None:
            return got
        if node.op in DATA_SELECTOR_OPS:
            self._need_qk(node)
        args = [evaluate_scalar(a, self.params) for a in node.args]
        if node.op is Op.TOPK_BLOCKS:
            got = self._topk(int(args[0]), int(args[1]), bool(args[2]))
        elif node.op is Op.TOPP_BLOCKS:
            got = self._topp(float(args[0]), int(args[1]), bool(args[2]))
        elif node.op is Op.ROUTE:
            got = self._route(node)
        else:
            r, b, seed = (int(a) for a in args)
            qpos = np.arange(self.q_len) + self.offset
            first, last = (int(qpos.min() // b), int(qpos.max() // b)) if self.q_len else (0, -1)
            got = (random_block_table(r, b, seed, first, last, self.kv_len), first)
        self._tables[id(node)] = got
        return got

    def lookup(self, node: Expr, env) -> np.ndarray:
        """The selector's bool value on env's grid (h [H,1,1], q [1,Nq,1], k [1,1,Nk])."""
        if node.op is Op.ROUTE:
            cq, ck = self.table(node)
            return cq[env.h, env.q - self.offset] == ck[env.h, env.k]
        table, first = self.table(node)
        b = int(evaluate_scalar(node.args[1], self.params))
        if node.op is Op.RANDOM_BLOCKS:
            return table[env.q // b - first, env.k // b]
        return table[env.h, env.q // b - first, env.k // b]
