"""Interval bounds of the integer functions and bit operators (the interval rules of
:mod:`.intervals` for ``& | ^ << >> ~``, ``ilog2`` and ``floor``/``ceil``/``round``).

Input: NumPy arrays of bounds (int64, or float64 for the float-to-int functions), broadcast
against each other: one interval per tile. Output: int64 arrays ``(lo, hi)`` such that the value
of the operation at every pair of a tile whose operands lie in the operand intervals lies in
``[lo, hi]`` (sound), and is the tightest such interval (the hull: exact) where a docstring says
so.

* ``& | ^`` (:func:`bit_bounds`): the exact hull, for any signs. Each operand interval is split
  into its negative and non-negative parts; on each pair of parts the result's sign is fixed and
  the unsigned 64-bit order is the signed one, so the unsigned bounds of Hacker's Delight
  (H. S. Warren, 2nd ed., section 4-3: minOR, maxOR, minAND, maxAND, minXOR, maxXOR; exact for
  unsigned intervals) give the signed ones. ``x & (2**m - 1)`` is thus ``x % 2**m`` with the
  congruence precision of ``%``, and ``x & c`` of a single value is exact.
* ``<< >>`` (:func:`shift_bounds`): shift counts outside ``0..62`` are call errors wherever they
  are evaluated, so counts are clipped to that range (the pairs outside it never produce a
  value). For a fixed count both shifts are monotone in ``x``, and for a fixed ``x`` monotone in
  the count: the hull is reached at the corners (exact). ``<<`` wraps like int64; where a
  corner may leave int64 the interval widens to everything.
* ``ilog2`` (:func:`ilog2`): exact in integers (no float logarithm), monotone, so exact per tile.
* ``floor``/``ceil``/``round`` (:func:`float_to_int_bounds`): monotone; a NaN, an infinity or a
  value beyond int64 is a call error where it is evaluated, so the bounds are clipped to the
  floats that convert (``[-2**63, 2**63)``).
"""

from __future__ import annotations

import numpy as np

from ..ops import MAX_SHIFT

INT_MIN, INT_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max
FLOAT_INT_LO = -2.0 ** 63           # floats that convert to int64: [-2**63, 2**63)
FLOAT_INT_HI = 2.0 ** 63 - 1024.0   # (the largest float below 2**63)
_U = np.uint64


# ----------------------------------------------------------------------------- ilog2


def ilog2(x) -> np.ndarray:
    """floor(log2(x)) for x >= 1, -1 for x <= 0, elementwise on int64 (exact: the float
    logarithm's estimate is corrected by one step either way with integer shifts)."""
    x = np.asarray(x, dtype=np.int64)
    pos = x >= 1
    xs = np.where(pos, x, 1)
    with np.errstate(all="ignore"):
        e = np.clip(np.floor(np.log2(xs.astype(np.float64))), 0, MAX_SHIFT).astype(np.int64)
    e = np.where(np.left_shift(np.int64(1), e) > xs, e - 1, e)
    up = np.left_shift(np.int64(1), np.minimum(e + 1, MAX_SHIFT))
    e = np.where((e < MAX_SHIFT) & (up <= xs), e + 1, e)
    return np.where(pos, e, -1)


# ----------------------------------------------------------------------------- unsigned hulls
# Hacker's Delight, section 4-3, vectorised: x in [a, b], y in [c, d] (uint64, a <= b, c <= d).
# A loop runs from the highest bit where some interval's ends differ (above it no step of the
# algorithms applies); "break" becomes a per-element done mask.


def _top_bit(*pairs) -> int:
    diff = _U(0)
    for lo, hi in pairs:
        diff = diff | np.bitwise_or.reduce(np.ravel(lo ^ hi), initial=_U(0))
    return int(diff).bit_length()


def _bits(top: int):
    for i in range(top - 1, -1, -1):
        m = _U(1 << i)
        yield m, _U(m - _U(1)), ~_U(m - _U(1))          # m, m - 1, -m


def _min_or(a, b, c, d, top):
    done = np.zeros(np.broadcast_shapes(a.shape, c.shape), dtype=bool)
    for m, _low, neg in _bits(top):
        first = ~done & ((~a & c & m) != 0)
        t = (a | m) & neg
        take = first & (t <= b)
        a = np.where(take, t, a)
        second = ~done & ~first & ((a & ~c & m) != 0)
        t2 = (c | m) & neg
        take2 = second & (t2 <= d)
        c = np.where(take2, t2, c)
        done = done | take | take2
    return a | c


def _max_or(a, b, c, d, top):
    done = np.zeros(np.broadcast_shapes(a.shape, c.shape), dtype=bool)
    for m, low, _neg in _bits(top):
        both = ~done & ((b & d & m) != 0)
        t = (b - m) | low
        take = both & (t >= a)
        b = np.where(take, t, b)
        t2 = (d - m) | low
        take2 = both & ~take & (t2 >= c)
        d = np.where(take2, t2, d)
        done = done | take | take2
    return b | d


def _min_and(a, b, c, d, top):
    done = np.zeros(np.broadcast_shapes(a.shape, c.shape), dtype=bool)
    for m, _low, neg in _bits(top):
        none = ~done & ((~a & ~c & m) != 0)
        t = (a | m) & neg
        take = none & (t <= b)
        a = np.where(take, t, a)
        t2 = (c | m) & neg
        take2 = none & ~take & (t2 <= d)
        c = np.where(take2, t2, c)
        done = done | take | take2
    return a & c


def _max_and(a, b, c, d, top):
    done = np.zeros(np.broadcast_shapes(a.shape, c.shape), dtype=bool)
    for m, low, _neg in _bits(top):
        first = ~done & ((b & ~d & m) != 0)
        t = (b & ~m) | low
        take = first & (t >= a)
        b = np.where(take, t, b)
        second = ~done & ~first & ((~b & d & m) != 0)
        t2 = (d & ~m) | low
        take2 = second & (t2 >= c)
        d = np.where(take2, t2, d)
        done = done | take | take2
    return b & d


def _min_xor(a, b, c, d, top):
    for m, _low, neg in _bits(top):
        first = (~a & c & m) != 0
        t = (a | m) & neg
        a = np.where(first & (t <= b), t, a)
        second = ~first & ((a & ~c & m) != 0)
        t2 = (c | m) & neg
        c = np.where(second & (t2 <= d), t2, c)
    return a ^ c


def _max_xor(a, b, c, d, top):
    for m, low, _neg in _bits(top):
        both = (b & d & m) != 0
        t = (b - m) | low
        take = both & (t >= a)
        b = np.where(take, t, b)
        t2 = (d - m) | low
        d = np.where(both & ~take & (t2 >= c), t2, d)
    return b ^ d


_UNSIGNED = {"&": (_min_and, _max_and), "|": (_min_or, _max_or), "^": (_min_xor, _max_xor)}


def unsigned_bounds(op: str, a, b, c, d):
    """The exact hull of ``x op y`` for uint64 x in [a, b], y in [c, d] (elementwise)."""
    a, b, c, d = (np.asarray(v, dtype=_U) for v in (a, b, c, d))
    top = _top_bit((a, b), (c, d))
    lo_fn, hi_fn = _UNSIGNED[op]
    with np.errstate(over="ignore"):
        return lo_fn(a, b, c, d, top), hi_fn(a, b, c, d, top)


def _parts(lo, hi):
    """The negative and the non-negative part of [lo, hi]: (valid, lo, hi) each."""
    return ((lo < 0, lo, np.minimum(hi, -1)), (hi >= 0, np.maximum(lo, 0), hi))


def bit_bounds(op: str, alo, ahi, blo, bhi):
    """The exact hull (lo, hi) of ``x op y`` (op one of ``& | ^``) for int64 x in [alo, ahi],
    y in [blo, bhi], two's complement (see the module docstring)."""
    alo, ahi, blo, bhi = (np.asarray(v, dtype=np.int64) for v in (alo, ahi, blo, bhi))
    shape = np.broadcast_shapes(alo.shape, ahi.shape, blo.shape, bhi.shape)
    lo = np.full(shape, INT_MAX, dtype=np.int64)
    hi = np.full(shape, INT_MIN, dtype=np.int64)
    for va, a0, a1 in _parts(alo, ahi):
        for vb, b0, b1 in _parts(blo, bhi):
            valid = va & vb
            if not np.any(valid):
                continue
            # the uint64 view (two's complement) keeps each part's order; invalid parts get a
            # placeholder interval
            ua0, ua1 = (np.where(valid, x, 0).astype(_U) for x in (a0, a1))
            ub0, ub1 = (np.where(valid, x, 0).astype(_U) for x in (b0, b1))
            umin, umax = unsigned_bounds(op, ua0, ua1, ub0, ub1)
            lo = np.where(valid, np.minimum(lo, umin.astype(np.int64)), lo)
            hi = np.where(valid, np.maximum(hi, umax.astype(np.int64)), hi)
    return lo, hi


# ----------------------------------------------------------------------------- shifts


def shift_counts(clo, chi):
    """The counts a call can evaluate: [clo, chi] clipped to 0..62, and where none is left
    (the shift is a call error wherever it is evaluated)."""
    c0 = np.clip(clo, 0, MAX_SHIFT).astype(np.int64)
    c1 = np.clip(chi, 0, MAX_SHIFT).astype(np.int64)
    return c0, c1, (chi < 0) | (clo > MAX_SHIFT)


def shift_bounds(op: str, alo, ahi, clo, chi):
    """(lo, hi) of ``x op c`` (op ``<<`` or ``>>``) for int64 x in [alo, ahi], counts in
    [clo, chi] (see the module docstring; ``<<`` widens to everything where it may wrap)."""
    alo, ahi = np.asarray(alo, dtype=np.int64), np.asarray(ahi, dtype=np.int64)
    c0, c1, none = shift_counts(clo, chi)
    corners = [(x, c) for x in (alo, ahi) for c in (c0, c1)]
    if op == ">>":
        vals = [np.right_shift(x, c) for x, c in corners]
        lo, hi = np.minimum.reduce(vals), np.maximum.reduce(vals)
    else:
        with np.errstate(all="ignore"):
            vals = [np.left_shift(x, c) for x, c in corners]
            big = np.maximum.reduce([np.abs(np.ldexp(x.astype(np.float64), c)) for x, c in corners])
        lo, hi = np.minimum.reduce(vals), np.maximum.reduce(vals)
        over = big >= 2.0 ** 62           # (the margin of intervals._wrap_check)
        lo, hi = np.where(over, INT_MIN, lo), np.where(over, INT_MAX, hi)
    return np.where(none, INT_MIN, lo), np.where(none, INT_MAX, hi)


# ----------------------------------------------------------------------------- float to int


def float_to_int_bounds(fn, lo, hi):
    """(lo, hi) int64 of a monotone float-to-int function (np.floor, np.ceil, np.rint) over
    float bounds; values that do not convert are call errors, so the bounds are clipped."""
    lo = fn(np.clip(np.asarray(lo, dtype=np.float64), FLOAT_INT_LO, FLOAT_INT_HI))
    hi = fn(np.clip(np.asarray(hi, dtype=np.float64), FLOAT_INT_LO, FLOAT_INT_HI))
    return lo.astype(np.int64), hi.astype(np.int64)


def float_converts(lo, hi, nan) -> bool:
    """Whether every float of every interval (and no NaN) converts to int64 by floor, ceil and
    round: a proof that those calls raise nowhere."""
    return bool(not np.any(nan) and np.all(np.asarray(lo) >= FLOAT_INT_LO)
                and np.all(np.asarray(hi) <= FLOAT_INT_HI))
