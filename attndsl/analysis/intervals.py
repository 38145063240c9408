"""Tile interval analysis: a sound three-valued classification of every (head, query tile,
key tile) by abstract interpretation of the mask IR.

Input: a checked mask expression, the call's sizes and parameter values, a tile shape and
(optionally) tensor inputs. Output: per tile a pair of bool arrays ``may`` (some pair of the
tile may be allowed) and ``must`` (every in-bounds pair of the tile is allowed), shaped
``[heads | 1, query tiles, key tiles]``.

Numbers are abstracted by intervals ``[lo, hi]`` (plus, for floats, a may-be-NaN flag), bools
by ``(may, must)``; one rule per op in :data:`INTERVAL_RULES`. ``%`` by a constant uses
congruence reasoning (an interval shorter than the modulus keeps its residues), tensor indices
use range minimum/maximum queries (a bool tensor's reads are a Truth: some / every entry of
the range true), ``random_blocks`` uses prefix sums over its block table. The bit operators,
shifts, ``ilog2`` and ``floor``/``ceil``/``round`` have exact hulls (:mod:`.bitwise`).
Every rule over-approximates, so ``not may`` proves a tile empty and ``must`` proves it full.
Integer overflow (the interpreter wraps at 64 bits) widens the interval to everything. A value
that is a call error wherever it is evaluated (a NaN reaching ``floor``, a shift count past 62)
produces no value: the rules bound only the values a successful call computes. Reductions are
expanded before analysis (attndsl/expand.py): their rules refuse them (:func:`needs_expansion`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..interp import evaluate_scalar
from ..ir import Expr, Op
from ..ops import EXPANDED_OPS
from ..selectors import random_block_table
from .bitwise import bit_bounds, float_to_int_bounds, ilog2, shift_bounds

_BIG = float(2 ** 62)
INT_MIN, INT_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max


@dataclass
class Num:
    """An interval of ints or floats; ``nan`` (floats only) marks tiles where NaN is possible."""

    lo: np.ndarray
    hi: np.ndarray
    nan: np.ndarray | bool = False


@dataclass
class Truth:
    """A three-valued bool: ``must`` implies ``may``."""

    may: np.ndarray
    must: np.ndarray


@dataclass
class TileGrid:
    """The tiles of one call: bounds of q (absolute) and k per tile, heads, values."""

    q_lo: np.ndarray          # [1, nQT, 1]
    q_hi: np.ndarray
    k_lo: np.ndarray          # [1, 1, nKT]
    k_hi: np.ndarray
    heads: np.ndarray         # [H, 1, 1]
    sizes: dict               # q_len, kv_len, heads, kv_heads
    params: dict
    tensors: dict
    block: tuple[int, int]


def make_grid(q_len: int, kv_len: int, heads: int, kv_heads: int, block, params: dict,
              tensors: dict, per_head: bool = True) -> TileGrid:
    bq, bk = block
    nqt, nkt = -(-q_len // bq), -(-kv_len // bk)
    i = np.arange(nqt, dtype=np.int64)
    j = np.arange(nkt, dtype=np.int64)
    off = kv_len - q_len
    return TileGrid(
        q_lo=(i * bq + off)[None, :, None], q_hi=(np.minimum((i + 1) * bq, q_len) - 1 + off)[None, :, None],
        k_lo=(j * bk)[None, None, :], k_hi=(np.minimum((j + 1) * bk, kv_len) - 1)[None, None, :],
        heads=np.arange(heads if per_head else 1, dtype=np.int64)[:, None, None],
        sizes={"q_len": q_len, "kv_len": kv_len, "heads": heads, "kv_heads": kv_heads},
        params=params, tensors=tensors, block=(bq, bk))


def _exact(v) -> Num:
    a = np.asarray(v)
    return Num(a, a)


def _wrap_check(lo, hi, flo, fhi) -> Num:
    """int64 results, widened to everything where the exact result may have wrapped."""
    over = (np.abs(flo) >= _BIG) | (np.abs(fhi) >= _BIG)
    if np.any(over):
        lo = np.where(over, INT_MIN, lo)
        hi = np.where(over, INT_MAX, hi)
    return Num(lo, hi)


def _is_float(node: Expr) -> bool:
    return node.type.value == "float"


def _nan(*xs: Num):
    out = False
    for x in xs:
        out = out | x.nan
    return out


def _fix_nan(lo, hi):
    """Float bounds that came out NaN (inf - inf, 0 * inf) widen to infinity."""
    return np.where(np.isnan(lo), -np.inf, lo), np.where(np.isnan(hi), np.inf, hi)


class Analyzer:
    """Abstract interpretation of an IR tree over a TileGrid, memoised per node."""

    def __init__(self, grid: TileGrid):
        self.grid = grid
        self._memo: dict[int, object] = {}

    def value(self, node: Expr):
        key = id(node)
        if key not in self._memo:
            with np.errstate(all="ignore"):
                self._memo[key] = INTERVAL_RULES[node.op](self, node)
        return self._memo[key]

    def const(self, node: Expr):
        """The value of a call constant (a divisor) at this call."""
        return evaluate_scalar(node, self.grid.params, self.grid.sizes)


# ----------------------------------------------------------------------------- number rules


def _const(an, node):
    v = node.value if node.op is Op.CONST else an.grid.params[node.value]
    if isinstance(v, bool):
        return Truth(np.bool_(v), np.bool_(v))
    return _exact(np.float64(v) if isinstance(v, float) else np.int64(v))


def _q(an, node):
    return Num(an.grid.q_lo, an.grid.q_hi)


def _k(an, node):
    return Num(an.grid.k_lo, an.grid.k_hi)


def _h(an, node):
    return _exact(an.grid.heads)


def _size(name):
    def rule(an, node):
        return _exact(np.int64(an.grid.sizes[name]))
    return rule


def _unknown_float(an, node):
    return Num(np.float64(-np.inf), np.float64(np.inf), True)


def _neg(an, node):
    a = an.value(node.args[0])
    if _is_float(node):
        return Num(-a.hi, -a.lo, a.nan)
    return _wrap_check(-a.hi, -a.lo, -a.hi.astype(float), -a.lo.astype(float))


def _add(an, node):
    a, b = (an.value(x) for x in node.args)
    if _is_float(node):
        lo, hi = a.lo + b.lo, a.hi + b.hi
        cross = np.isnan(a.lo + b.hi) | np.isnan(a.hi + b.lo)    # inf + -inf is possible
        return Num(*_fix_nan(lo, hi), _nan(a, b) | np.isnan(lo) | np.isnan(hi) | cross)
    return _wrap_check(a.lo + b.lo, a.hi + b.hi, np.float64(a.lo) + b.lo, np.float64(a.hi) + b.hi)


def _sub(an, node):
    a, b = (an.value(x) for x in node.args)
    if _is_float(node):
        lo, hi = a.lo - b.hi, a.hi - b.lo
        cross = np.isnan(a.lo - b.lo) | np.isnan(a.hi - b.hi)    # inf - inf is possible
        return Num(*_fix_nan(lo, hi), _nan(a, b) | np.isnan(lo) | np.isnan(hi) | cross)
    return _wrap_check(a.lo - b.hi, a.hi - b.lo, np.float64(a.lo) - b.hi, np.float64(a.hi) - b.lo)


def _corners(a: Num, b: Num, fn):
    vals = [fn(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return vals


def _zero_times_inf(a: Num, b: Num):
    """Where ``a`` may be 0 strictly inside its interval while ``b`` may be infinite: 0 * inf is NaN
    though no corner product is."""
    return (a.lo <= 0) & (a.hi >= 0) & (np.isinf(b.lo) | np.isinf(b.hi))


def _mul(an, node):
    a, b = (an.value(x) for x in node.args)
    if _is_float(node):
        vals = _corners(a, b, lambda x, y: x * y)
        bad = np.any([np.isnan(v) for v in vals], axis=0) | _zero_times_inf(a, b) | _zero_times_inf(b, a)
        lo, hi = np.minimum.reduce(vals), np.maximum.reduce(vals)
        return Num(np.where(bad, -np.inf, lo), np.where(bad, np.inf, hi), _nan(a, b) | bad)
    vals = _corners(a, b, lambda x, y: x * y)
    fvals = _corners(a, b, lambda x, y: np.float64(x) * y)
    return _wrap_check(np.minimum.reduce(vals), np.maximum.reduce(vals),
                       np.maximum.reduce(np.abs(fvals)), np.float64(0.0))


def _div(an, node):
    a, b = (an.value(x) for x in node.args)
    safe = (b.lo > 0) | (b.hi < 0)
    vals = _corners(a, b, lambda x, y: x / np.where(safe, y, 1.0))
    lo, hi = np.minimum.reduce(vals), np.maximum.reduce(vals)
    bad = ~safe | np.any([np.isnan(v) for v in vals], axis=0)
    return Num(np.where(bad, -np.inf, lo), np.where(bad, np.inf, hi), _nan(a, b) | bad)


def _floordiv(an, node):
    a = an.value(node.args[0])
    c = int(an.const(node.args[1]))
    return Num(a.lo // c, a.hi // c)


def _mod(an, node):
    """Congruence: an interval shorter than the modulus maps to its residues unless it wraps."""
    a = an.value(node.args[0])
    m = int(an.const(node.args[1]))
    rl, rh = a.lo % m, a.hi % m
    keep = (a.hi - a.lo < m) & (rl <= rh) & (a.lo > INT_MIN) & (a.hi < INT_MAX)
    return Num(np.where(keep, rl, 0), np.where(keep, rh, m - 1))


def _abs(an, node):
    a = an.value(node.args[0])
    lo = np.where(a.lo >= 0, a.lo, np.where(a.hi <= 0, -a.hi, 0))
    hi = np.maximum(np.abs(a.lo), np.abs(a.hi))
    if _is_float(node):
        return Num(lo, hi, a.nan)
    return _wrap_check(lo, hi, np.float64(0), np.maximum(np.abs(np.float64(a.lo)), np.abs(np.float64(a.hi))))


def _minmax(fn):
    def rule(an, node):
        vals = [an.value(x) for x in node.args]
        lo = reduce(fn, [v.lo for v in vals])       # pairwise: the bounds broadcast
        hi = reduce(fn, [v.hi for v in vals])
        return Num(lo, hi, _nan(*vals))
    return rule


def _monotone(fn):
    def rule(an, node):
        a = an.value(node.args[0])
        return Num(fn(a.lo), fn(a.hi), a.nan)
    return rule


def _domain_monotone(fn, low):
    """log/sqrt: monotone on [low, inf); NaN possible below it."""
    def rule(an, node):
        a = an.value(node.args[0])
        lo = fn(np.maximum(a.lo, low))
        return Num(np.where(a.hi < low, np.nan, lo), fn(np.maximum(a.hi, low)), a.nan | (a.lo < low))
    def guarded(an, node):
        v = rule(an, node)
        lo, hi = _fix_nan(v.lo, v.hi)
        return Num(lo, hi, v.nan)
    return guarded


def _to_float(an, node):
    a = an.value(node.args[0])
    return Num(np.float64(a.lo) * 1.0, np.float64(a.hi) * 1.0, False)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _erf_rule(an, node):
    """erf is monotone; its bounds are widened by two ulps (the backends' erf need not round
    like math.erf) and kept within [-1, 1]."""
    a = an.value(node.args[0])
    lo = np.maximum(np.nextafter(np.nextafter(_erf(a.lo), -np.inf), -np.inf), -1.0)
    hi = np.minimum(np.nextafter(np.nextafter(_erf(a.hi), np.inf), np.inf), 1.0)
    return Num(lo, hi, a.nan)


def _float_to_int(fn):
    """floor / ceil / round (half to even: np.rint): monotone; NaN, infinities and values
    beyond int64 are call errors, so they add nothing (the NaN flag is dropped)."""
    def rule(an, node):
        a = an.value(node.args[0])
        return Num(*float_to_int_bounds(fn, a.lo, a.hi))
    return rule


def _ilog2(an, node):
    a = an.value(node.args[0])
    return Num(ilog2(a.lo), ilog2(a.hi))


def _bitwise(an, node):
    """& | ^: the exact hull (bitwise.bit_bounds); x & (2**m - 1) keeps the residues of x % 2**m."""
    a, b = (an.value(x) for x in node.args)
    return Num(*bit_bounds(node.op.value, a.lo, a.hi, b.lo, b.hi))


def _shift(an, node):
    """<< and >> (bitwise.shift_bounds): counts outside 0..62 are call errors."""
    a, c = (an.value(x) for x in node.args)
    return Num(*shift_bounds(node.op.value, a.lo, a.hi, c.lo, c.hi))


def _invert(an, node):
    """~x == -x - 1: decreasing, and never wraps."""
    a = an.value(node.args[0])
    return Num(-a.hi - 1, -a.lo - 1)


class NeedsExpansion(RuntimeError):
    """A reduction (or its loop variable) reached a pass that runs after the call's expansion."""


def needs_expansion(*args):
    """The rule of the reductions and their loop variable in the analysis tables (intervals,
    solver, closed forms): attndsl/expand.py replaces them by and/or/+/max/min chains once a
    call's sizes are known, before any analysis."""
    node = next(a for a in args if isinstance(a, Expr))
    raise NeedsExpansion(f"'{node.op.value}' must be expanded (attndsl/expand.py) before analysis")


def _if(an, node):
    c = an.value(node.args[0])
    a, b = an.value(node.args[1]), an.value(node.args[2])
    if isinstance(a, Truth):
        must = np.where(c.must, a.must, np.where(~c.may, b.must, a.must & b.must))
        may = np.where(c.must, a.may, np.where(~c.may, b.may, a.may | b.may))
        return Truth(may, must)
    lo = np.where(c.must, a.lo, np.where(~c.may, b.lo, np.minimum(a.lo, b.lo)))
    hi = np.where(c.must, a.hi, np.where(~c.may, b.hi, np.maximum(a.hi, b.hi)))
    nan = np.where(c.must, a.nan, np.where(~c.may, b.nan, np.asarray(a.nan) | b.nan))
    return Num(lo, hi, nan)


MAX_BOX = 64           # index boxes of a multi-dimensional tensor read entry by entry


def _box_extremes(t: np.ndarray, args):
    """(min, max) of ``t`` over each tile's box of indices (the product of the arguments'
    clipped intervals), when every box holds at most :data:`MAX_BOX` entries: each offset of the
    largest box is read at once for every tile (an offset past a smaller box is clamped to its
    last index, which it holds). None when a box is larger: the caller bounds by the whole
    tensor. A block table read at tile-constant indices (a selector's ``T[h, q // b, k // b]``
    with tiles inside its blocks) is then exact per tile."""
    lo = [np.clip(a.lo, 0, n - 1) for a, n in zip(args, t.shape)]
    hi = [np.clip(a.hi, 0, n - 1) for a, n in zip(args, t.shape)]
    spans = [int(np.max(b - a, initial=0)) + 1 for a, b in zip(lo, hi)]
    if int(np.prod(spans)) > MAX_BOX:
        return None
    mn = mx = None
    for offsets in np.ndindex(*spans):
        values = t[tuple(np.minimum(a + o, b) for a, b, o in zip(lo, hi, offsets))]
        mn = values if mn is None else np.minimum(mn, values)
        mx = values if mx is None else np.maximum(mx, values)
    return mn, mx


def _range_extremes(arr: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """min and max of arr[lo..hi] (inclusive, 0 <= lo <= hi < len) by a sparse table."""
    n = len(arr)
    mins, maxs = [arr], [arr]
    width = 1
    while 2 * width <= n:
        mins.append(np.minimum(mins[-1][:-width], mins[-1][width:]))
        maxs.append(np.maximum(maxs[-1][:-width], maxs[-1][width:]))
        width *= 2
    length = hi - lo + 1
    level = np.floor(np.log2(np.maximum(length, 1))).astype(np.int64)
    lo_b, hi_b, level_b = np.broadcast_arrays(lo, hi, level)
    out_min = np.empty(lo_b.shape, dtype=arr.dtype)
    out_max = np.empty(lo_b.shape, dtype=arr.dtype)
    # levels present (not np.unique: it imports numpy.ma on first use)
    for lv in np.flatnonzero(np.bincount(level_b.ravel(), minlength=1)):
        sel = level_b == lv
        a = lo_b[sel]
        b = hi_b[sel] - (1 << int(lv)) + 1
        out_min[sel] = np.minimum(mins[lv][a], mins[lv][b])
        out_max[sel] = np.maximum(maxs[lv][a], maxs[lv][b])
    return out_min, out_max


def _index(an, node):
    """A tensor read: the extremes of the tensor over the read range of each tile. A bool
    tensor's read is a Truth: may where some entry of the range is true, must where every one is
    (its entries read as 0/1)."""
    t = np.asarray(an.grid.tensors[node.value])
    if t.dtype == np.bool_:
        num = _read(an, node, t.astype(np.int8))
        return Truth(np.asarray(num.hi > 0), np.asarray(num.lo > 0))
    return _read(an, node, t)


def _read(an, node, t: np.ndarray) -> Num:
    is_float = t.dtype.kind == "f"
    if t.size == 0:
        z = np.float64(0) if is_float else np.int64(0)
        return Num(z, z, False)
    if t.ndim == 1:
        a = an.value(node.args[0])
        lo = np.clip(a.lo, 0, len(t) - 1)
        hi = np.clip(a.hi, 0, len(t) - 1)
        if not (is_float and np.isnan(t).any()):
            return Num(*_range_extremes(t, lo, hi), False)
        # NaN entries would make the bounds NaN (and every comparison false): bound the other
        # values, flag the NaN; a range of NaN only is (-inf, inf)
        mn = _range_extremes(np.where(np.isnan(t), np.inf, t), lo, hi)[0]
        mx = _range_extremes(np.where(np.isnan(t), -np.inf, t), lo, hi)[1]
        none = mn > mx
        return Num(np.where(none, -np.inf, mn), np.where(none, np.inf, mx), True)
    args = [an.value(arg) for arg in node.args]
    box = None if is_float and np.isnan(t).any() else _box_extremes(t, args)
    if box is not None:
        return Num(*box, False)
    if is_float and np.isnan(t).all():
        return Num(np.float64(-np.inf), np.float64(np.inf), True)
    if is_float:
        return Num(np.float64(np.nanmin(t)), np.float64(np.nanmax(t)), bool(np.isnan(t).any()))
    return Num(t.min(), t.max())


# ----------------------------------------------------------------------------- bool rules


def _compare(op):
    def rule(an, node):
        a, b = (an.value(x) for x in node.args)
        if isinstance(a, Truth):          # == and != on bools
            same_must = (a.must & b.must) | (~a.may & ~b.may)
            same_may = ~((a.must & ~b.may) | (~a.may & b.must))
            return Truth(same_may, same_must) if op is Op.EQ else Truth(~same_must, ~same_may)
        nan = np.asarray(_nan(a, b))
        if op is Op.LT:
            must, may = a.hi < b.lo, a.lo < b.hi
        elif op is Op.LE:
            must, may = a.hi <= b.lo, a.lo <= b.hi
        elif op is Op.GT:
            must, may = a.lo > b.hi, a.hi > b.lo
        elif op is Op.GE:
            must, may = a.lo >= b.hi, a.hi >= b.lo
        else:
            single = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
            overlap = (a.lo <= b.hi) & (b.lo <= a.hi)
            if op is Op.EQ:
                must, may = single, overlap
            else:
                return Truth(~single | nan, ~overlap)
        return Truth(may, must & ~nan)
    return rule


def _not(an, node):
    a = an.value(node.args[0])
    return Truth(~a.must, ~a.may)


def _and(an, node):
    a, b = (an.value(x) for x in node.args)
    return Truth(a.may & b.may, a.must & b.must)


def _or(an, node):
    a, b = (an.value(x) for x in node.args)
    return Truth(a.may | b.may, a.must | b.must)


def _unknown_bool(an, node):
    return Truth(np.bool_(True), np.bool_(False))


def _random_blocks(an, node):
    """Exact per b-block table, reduced over the b-blocks each tile overlaps by prefix sums."""
    r, b, seed = (int(an.const(a)) for a in node.args)
    g = an.grid
    first = int(g.q_lo.min()) // b
    last = int(g.q_hi.max()) // b
    table = random_block_table(r, b, seed, first, last, g.sizes["kv_len"])
    pref = np.zeros((table.shape[0] + 1, table.shape[1] + 1), dtype=np.int32)
    np.cumsum(table, axis=0, dtype=np.int32, out=pref[1:, 1:])
    np.cumsum(pref[1:, 1:], axis=1, out=pref[1:, 1:])
    i0, i1 = g.q_lo // b - first, g.q_hi // b - first + 1
    j0, j1 = g.k_lo // b, g.k_hi // b + 1
    count = pref[i1, j1] - pref[i0, j1] - pref[i1, j0] + pref[i0, j0]
    return Truth(count > 0, count == (i1 - i0) * (j1 - j0))


INTERVAL_RULES = {
    Op.CONST: _const, Op.PARAM: _const,
    Op.Q: _q, Op.K: _k, Op.H: _h,
    Op.Q_LEN: _size("q_len"), Op.KV_LEN: _size("kv_len"), Op.HEADS: _size("heads"),
    Op.KV_HEADS: _size("kv_heads"),
    Op.SCORE: _unknown_float,
    Op.NEG: _neg, Op.ADD: _add, Op.SUB: _sub, Op.MUL: _mul, Op.DIV: _div,
    Op.FLOORDIV: _floordiv, Op.MOD: _mod, Op.POW: _unknown_float,
    Op.LT: _compare(Op.LT), Op.LE: _compare(Op.LE), Op.GT: _compare(Op.GT),
    Op.GE: _compare(Op.GE), Op.EQ: _compare(Op.EQ), Op.NE: _compare(Op.NE),
    Op.NOT: _not, Op.AND: _and, Op.OR: _or, Op.IF: _if,
    Op.ABS: _abs, Op.MIN: _minmax(np.minimum), Op.MAX: _minmax(np.maximum),
    Op.FLOAT: _to_float, Op.EXP: _monotone(np.exp), Op.LOG: _domain_monotone(np.log, 0.0),
    Op.SQRT: _domain_monotone(np.sqrt, 0.0), Op.TANH: _monotone(np.tanh),
    Op.SIGMOID: _monotone(lambda x: 0.5 * (1.0 + np.tanh(0.5 * x))),
    Op.ERF: _erf_rule, Op.EXP2: _monotone(np.exp2), Op.LOG2: _domain_monotone(np.log2, 0.0),
    Op.FLOOR: _float_to_int(np.floor), Op.CEIL: _float_to_int(np.ceil),
    Op.ROUND: _float_to_int(np.rint), Op.ILOG2: _ilog2,
    Op.BIT_AND: _bitwise, Op.BIT_OR: _bitwise, Op.BIT_XOR: _bitwise,
    Op.LSHIFT: _shift, Op.RSHIFT: _shift, Op.INVERT: _invert,
    Op.INDEX: _index,
    Op.TOPK_BLOCKS: _unknown_bool, Op.TOPP_BLOCKS: _unknown_bool, Op.ROUTE: _unknown_bool,
    Op.RANDOM_BLOCKS: _random_blocks,
    **dict.fromkeys(EXPANDED_OPS, needs_expansion),
}


def classify_tiles(mask: Expr, grid: TileGrid) -> Truth:
    """(may, must) per tile, broadcast to [heads, nQT, nKT]."""
    t = Analyzer(grid).value(mask)
    shape = (len(grid.heads), grid.q_lo.shape[1], grid.k_lo.shape[2])
    return Truth(np.broadcast_to(t.may, shape), np.broadcast_to(t.must, shape))


def whole_call(q_len: int, kv_len: int, heads: int, kv_heads: int, params: dict,
               tensors: dict) -> Analyzer:
    """An Analyzer over one tile spanning the whole call (every head, query and key): its
    intervals bound a value at every pair."""
    return Analyzer(make_grid(q_len, kv_len, heads, kv_heads, (q_len, kv_len), params, tensors))


def within(num: Num, lo, hi) -> bool:
    """Whether every interval of ``num`` lies inside [lo, hi]."""
    return bool(np.all(num.lo >= lo) and np.all(num.hi <= hi))
