"""The torch backend: blockwise online-softmax attention over the tiles the analysis keeps.

Input: a :class:`~attndsl.bound.BoundPattern`, the call's :class:`~attndsl.reference.CallGrid`
per batch element, q [B, H, Lq, D] and k/v [B, KVH, Lkv, D/Dv] torch tensors, the scale and the
tensor inputs. Output: (out [B, H, Lq, Dv] in q's dtype, lse [B, H, Lq] float32, float64 for
float64 inputs), differentiable through q, k, v and the score clause (autograd over the tile
loop).

* Tiles of ``BLOCK_Q x BLOCK_K`` pairs and their classes come from the analysis
  (:mod:`attndsl.analysis.call_tiles`): empty tiles are never visited, full tiles skip the mask,
  partial tiles evaluate it with the NumPy interpreter. Work and memory follow the kept tiles,
  so a decoding query against 2**31 keys with a window touches only the window's tiles.
* Grouped-query attention reads each key/value head once for its group of query heads, from a
  view: K and V are never copied whole (an expanded, stride-0 K stays unexpanded); only the
  visited tile is converted to the accumulation type (float32, float64 for float64 inputs).
  Memory is O((q_len + kv_len) x block); no dense [q_len, kv_len] matrix is built.
* Non-finite values follow docs/language.md ("Non-finite values"), as the reference
  (:func:`attndsl.reference.attend`): a NaN or +inf score at an allowed pair flags its row, the
  softmax runs over the finite allowed scores, and a non-finite V entry counts only at the
  rows whose allowed keys include it.
"""

from __future__ import annotations

import numpy as np
import torch

from .analysis.call_tiles import block_maps
from .call import acc_dtype
from .dump import dump
from .interp import Env, Evaluator
from .ir import Op

BLOCK_Q = 64
BLOCK_K = 256
FULL = 2


class TorchOps:
    """The interpreter's array namespace on torch tensors (for the score clause)."""

    def __init__(self, device, float_dtype):
        self.device = device
        self.float_dtype = float_dtype

    where = staticmethod(torch.where)
    minimum = staticmethod(torch.minimum)
    maximum = staticmethod(torch.maximum)
    abs = staticmethod(torch.abs)
    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    sqrt = staticmethod(torch.sqrt)
    tanh = staticmethod(torch.tanh)
    sigmoid = staticmethod(torch.sigmoid)
    power = staticmethod(torch.pow)

    def to_float(self, x):
        return x.to(self.float_dtype)

    @staticmethod
    def to_numpy(x):
        return x.detach().cpu().numpy()

    def from_numpy(self, x):
        arr = np.asarray(x)
        t = torch.as_tensor(arr, device=self.device)
        return t.to(self.float_dtype) if t.is_floating_point() else t

    @staticmethod
    def any(x) -> bool:
        return bool(x.any())


# How the score clause computes each op (one entry per op; tests/test_op_registry.py checks
# them): NUMPY, the node cannot depend on 'score' (a leaf other than score, or a selector of
# constant arguments), so the Evaluator's NumPy delegate computes it; otherwise the interpreter's
# rule (interp.EVAL_RULES) runs on torch tensors and calls the TorchOps functions named (none:
# Python operators on tensors; an index that depends on the score is gathered in NumPy).
NUMPY = None
TORCH_RULES: dict[Op, tuple[str, ...] | None] = {
    **dict.fromkeys((Op.CONST, Op.PARAM, Op.Q, Op.K, Op.H, Op.Q_LEN, Op.KV_LEN, Op.HEADS,
                     Op.KV_HEADS, Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.ROUTE, Op.RANDOM_BLOCKS), NUMPY),
    Op.SCORE: (),                               # the score tile itself (Env.score)
    **dict.fromkeys((Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.FLOORDIV, Op.MOD, Op.LT, Op.LE,
                     Op.GT, Op.GE, Op.EQ, Op.NE, Op.NOT, Op.AND, Op.OR), ()),
    Op.POW: ("power",), Op.IF: ("where",), Op.ABS: ("abs",), Op.MIN: ("minimum",),
    Op.MAX: ("maximum",), Op.FLOAT: ("to_float",), Op.EXP: ("exp",), Op.LOG: ("log",),
    Op.SQRT: ("sqrt",), Op.TANH: ("tanh",), Op.SIGMOID: ("sigmoid",),
    Op.INDEX: ("to_numpy", "from_numpy"),
}


def blockwise_attention(pattern, grids, q, k, v, scale: float, given: dict,
                        block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """(out, lse) of one call; see the module docstring."""
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    wide = acc_dtype(q.dtype)
    if batch == 0 or q_len == 0:
        return (q.new_zeros((batch, heads, q_len, dv)),
                q.new_zeros((batch, heads, q_len), dtype=wide))
    maps = dump("analysis", block_maps(pattern, q_len, kv_len, heads, kv_heads, given,
                                       (block_q, block_k)), _describe_maps)
    xp = TorchOps(q.device, wide)
    outs, lses = [], []
    for b, grid in enumerate(grids):
        calls = _Batch(grid, q[b], k[b], v[b], scale, wide, xp)
        bm = maps[min(b, len(maps) - 1)]
        row_outs, row_lses = [], []
        for i, r0 in enumerate(range(0, q_len, block_q)):
            rows = np.arange(r0, min(q_len, r0 + block_q))
            classes = bm[:, i]                                  # [H or 1, nKT]
            row = _Rows(calls, rows)
            for j in np.flatnonzero(classes.any(axis=0)):
                row.tile(int(j) * block_k, min(kv_len, (int(j) + 1) * block_k),
                         full=bool((classes[:, j] == FULL).all()))
            o, lse = row.finish()
            row_outs.append(o)
            row_lses.append(lse)
        outs.append(torch.cat(row_outs, dim=1))
        lses.append(torch.cat(row_lses, dim=1))
    return torch.stack(outs).to(q.dtype), torch.stack(lses)


def _describe_maps(maps) -> str:
    bm = maps[0]
    return (f"torch backend, tile {BLOCK_Q}x{BLOCK_K}: map {list(bm.shape)} per batch row; "
            f"{int((bm > 0).sum())} tiles walked, {int((bm == FULL).sum())} full, "
            f"{int((bm == 1).sum())} partial, {int((bm == 0).sum())} skipped (first batch row)")


class _Batch:
    """One batch element of a call: its grid and operands, read per tile."""

    def __init__(self, grid, q, k, v, scale, wide, xp):
        self.grid, self.q, self.k, self.v = grid, q, k, v
        self.scale, self.wide, self.xp = scale, wide, xp
        self.heads, self.kv_heads = q.shape[0], k.shape[0]
        self.group = self.heads // self.kv_heads
        self.all_heads = np.arange(self.heads)
        self._v_finite: dict[int, bool] = {}        # key tile start -> whether V is finite there

    def grouped(self, a, b):
        """[H, R, X] @ [KVH, X, Y] -> [H, R, Y]: each key/value head serves its query heads."""
        h, r, x = a.shape
        out = a.reshape(self.kv_heads, self.group * r, x) @ b
        return out.reshape(h, r, b.shape[-1])

    def v_tile(self, c0: int, c1: int):
        """(V[c0:c1] in the accumulation type with non-finite entries zeroed, the raw tile when
        it holds a non-finite entry, else None)."""
        vt = self.v[:, c0:c1].to(self.wide)
        finite = self._v_finite.get(c0)
        if finite is None:
            finite = self._v_finite[c0] = bool(torch.isfinite(vt).all())
        if finite:
            return vt, None
        return torch.where(torch.isfinite(vt), vt, torch.zeros_like(vt)), vt


class _Rows:
    """The online-softmax state of one tile of query rows across its key tiles."""

    def __init__(self, batch: _Batch, rows: np.ndarray):
        self.b, self.rows = batch, rows
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        shape = (batch.heads, len(rows))
        self.qt = batch.q[:, r0:r1].to(batch.wide)
        self.m = torch.full(shape, -torch.inf, dtype=batch.wide, device=batch.q.device)
        self.l = torch.zeros_like(self.m)
        self.acc = batch.q.new_zeros(shape + (batch.v.shape[-1],), dtype=batch.wide)
        self.nan_row = torch.zeros(shape, dtype=torch.bool, device=batch.q.device)
        self.inf_row = torch.zeros_like(self.nan_row)
        self.poison = None                  # (+inf, -inf, NaN) counts [H, R, Dv] once needed

    def tile(self, c0: int, c1: int, full: bool) -> None:
        b, cols = self.b, np.arange(c0, c1)
        kt = b.k[:, c0:c1].to(b.wide)
        s = b.scale * b.grouped(self.qt, kt.transpose(-1, -2))
        s = _score(b.grid, b.xp, b.all_heads, self.rows, cols, s)
        allowed = s != -torch.inf
        if not full:
            mask = b.grid.mask(b.all_heads, self.rows, cols)
            allowed = allowed & torch.as_tensor(np.array(mask, dtype=bool), device=s.device)
        self.nan_row |= (allowed & torch.isnan(s)).any(-1)
        self.inf_row |= (allowed & (s == torch.inf)).any(-1)
        finite = allowed & torch.isfinite(s)
        s = torch.where(finite, s, -torch.inf)
        m_new = torch.maximum(self.m, s.amax(dim=-1))
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        alpha = torch.where(torch.isfinite(self.m), torch.exp(self.m - safe), torch.zeros_like(self.m))
        p = torch.where(finite, torch.exp(s - safe[..., None]), torch.zeros_like(s))
        vt, raw = b.v_tile(c0, c1)
        self.l = self.l * alpha + p.sum(dim=-1)
        self.acc = self.acc * alpha[..., None] + b.grouped(p, vt)
        self.m = m_new
        if raw is not None:
            self._count_poison(allowed, raw)

    def _count_poison(self, allowed, raw) -> None:
        a = allowed.to(raw.dtype)
        counts = [self.b.grouped(a, kind.to(raw.dtype)) for kind in
                  (raw == torch.inf, raw == -torch.inf, torch.isnan(raw))]
        self.poison = counts if self.poison is None else \
            [old + new for old, new in zip(self.poison, counts)]

    def finish(self):
        """(out [H, R, Dv], lse [H, R]) of the rows."""
        has = self.l > 0
        denom = torch.where(has, self.l, torch.ones_like(self.l))
        out = torch.where(has[..., None], self.acc / denom[..., None], torch.zeros_like(self.acc))
        lse = torch.where(has, self.m + torch.log(denom), torch.full_like(self.m, -torch.inf))
        if self.poison is not None:
            pos, neg, nan = (c > 0 for c in self.poison)
            out = torch.where(nan | (pos & neg), torch.nan,
                              torch.where(pos, torch.inf, torch.where(neg, -torch.inf, out)))
        lse = torch.where(self.nan_row, torch.nan, torch.where(self.inf_row, torch.inf, lse))
        out = torch.where((self.nan_row | self.inf_row)[..., None], torch.nan, out)
        return out, lse


def _score(grid, xp, heads, rows, cols, s0):
    if grid.ir.score is None:
        return s0
    numpy_env = grid.env(heads, rows, cols)
    env: Env = grid.env(heads, rows, cols, score=s0, xp=xp)
    with np.errstate(all="ignore"):
        value = Evaluator(env, delegate=Evaluator(numpy_env)).sub(grid.ir.score)
    if not isinstance(value, torch.Tensor):
        value = xp.from_numpy(value)
    return torch.broadcast_to(value.to(s0.dtype), s0.shape)
