"""The solver's view of the bit operators and ``ilog2``: the arithmetic forms a constant makes
exact, residue forms of low bits, and ``ilog2`` comparisons as bands.

Input: IR expressions (checked, int operands) and ``constant``, a function giving the value of a
compile-time constant expression or None (``Solver.constant``). Output: equal IR expressions (or
residue forms) that :mod:`.solve` already solves exactly; None where no rewrite applies. Every
rewrite is an identity of int64 two's complement arithmetic, wrap-around included, at every
value (so the solver's answers stay those of the interpreter):

* ``x & (2**m - 1) == x % 2**m`` (m <= 62), ``x >> c == x // 2**c`` and ``x << c == x * 2**c``
  (0 <= c <= 62; the product wraps like the shift), ``~x == -x - 1`` (:func:`arith_form`);
* the low bits of a chain of ``& | ^ ~`` with constants (:func:`mask_form`): for M a power of two,
  ``(x op c) mod M == ((x mod M) op c) mod M``, and ``x & c`` depends on ``x mod 2**bitlen(c)``
  only, so ``(k ^ 5) & 3 < 2`` is a residue test of ``k mod 4``;
* with u depending on k and w, y free of it: ``u ^ w == y`` is ``u == w ^ y``,
  ``(u ^ w) >> s == y`` is ``u >> s == (w >> s) ^ y`` (the arithmetic shift distributes over
  xor) and ``(u ^ w) mod M == y`` (M a power of two) is ``0 <= y < M and u mod M == (w ^ y) mod
  M`` (:func:`rewrite_compare`; ``!=`` is their negation);
* ``ilog2(x) <= t`` is ``x <= 2**(t + 1) - 1`` for -1 <= t < 62 (false below, true above), and
  the other comparisons with a constant are and/or/not of two of those: bands of ``x``.
"""

from __future__ import annotations

from ..ir import Expr, Op, Type, const
from ..ops import MAX_SHIFT
from .pieces import FALSE, ONE, TRUE, b_and, b_not, depends_on_k, i_neg, i_sub

MAX_MASK_BITS = 12          # residue forms of bit masks up to 2**12 residues (as for '%')


def _int_const(constant, e: Expr):
    v = constant(e) if not depends_on_k(e) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _shift_count(constant, e: Expr):
    c = _int_const(constant, e)
    return c if c is not None and 0 <= c <= MAX_SHIFT else None


def _power_of_two(v) -> bool:
    return v is not None and v > 0 and v & (v - 1) == 0


def arith_form(e: Expr, constant) -> Expr | None:
    """The arithmetic form of a bit operation that a constant makes one, else None."""
    if e.op is Op.BIT_AND:
        for x, y in (e.args, e.args[::-1]):
            c = _int_const(constant, y)
            if c is not None and c >= 0 and _power_of_two(c + 1) and c + 1 <= 1 << MAX_SHIFT:
                return Expr(Op.MOD, Type.INT, (x, const(c + 1)))
    if e.op in (Op.RSHIFT, Op.LSHIFT):
        c = _shift_count(constant, e.args[1])
        if c is not None:
            op = Op.FLOORDIV if e.op is Op.RSHIFT else Op.MUL
            return Expr(op, Type.INT, (e.args[0], const(1 << c)))
    if e.op is Op.INVERT:
        return i_sub(i_neg(e.args[0]), ONE)
    return None


_BIT_FNS = {Op.BIT_AND: lambda a, b: a & b, Op.BIT_OR: lambda a, b: a | b,
            Op.BIT_XOR: lambda a, b: a ^ b}


def _identity(v):
    return v


def _low_bits(e: Expr, m: int, constant):
    """(inner, f) with ``e mod m == f(inner mod m)`` for m a power of two: ``& | ^`` with a
    constant and ``~`` are peeled off; inner is what remains (f None: nothing was)."""
    if e.op in _BIT_FNS:
        for x, y in (e.args, e.args[::-1]):
            c = _int_const(constant, y)
            if c is not None:
                inner, f = _low_bits(x, m, constant)
                f, fn = f or _identity, _BIT_FNS[e.op]
                return inner, (lambda v, f=f, c=c, fn=fn: fn(f(v), c) % m)
    if e.op is Op.INVERT:
        inner, f = _low_bits(e.args[0], m, constant)
        f = f or _identity
        return inner, (lambda v, f=f: ~f(v) % m)
    return e, None


def mask_form(e: Expr, constant):
    """(inner, M, f, identity) with ``e == f(inner mod M)`` at every value, for ``e`` a ``%``
    by a constant or an ``&`` with a non-negative constant (M = 2**bitlen(c), at most
    2**MAX_MASK_BITS); ``identity``: f is the identity (``e`` is ``inner % M``); else None."""
    if e.op is Op.MOD:
        m = _int_const(constant, e.args[1])
        if m is None or m <= 0:
            return None
        if not _power_of_two(m):
            return e.args[0], m, _identity, True
        inner, f = _low_bits(e.args[0], m, constant)
        return inner, m, (f or _identity), f is None
    if e.op is Op.BIT_AND:
        for x, y in (e.args, e.args[::-1]):
            c = _int_const(constant, y)
            if c is None or c < 0 or c.bit_length() > MAX_MASK_BITS:
                continue
            m = 1 << c.bit_length()
            inner, f = _low_bits(x, m, constant)
            g = f or _identity
            return inner, m, (lambda v, g=g, c=c: g(v) & c), f is None and c == m - 1
    return None


def _cmp(op: Op, a: Expr, b: Expr) -> Expr:
    return Expr(op, Type.BOOL, (a, b))


def _ilog2_le(x: Expr, t: int) -> Expr:
    """ilog2(x) <= t as a comparison of x."""
    if t < -1:
        return FALSE
    if t >= MAX_SHIFT:
        return TRUE
    return _cmp(Op.LE, x, const((1 << (t + 1)) - 1))


def _ilog2_compare(op: Op, x: Expr, t: int) -> Expr:
    le, below = _ilog2_le(x, t), _ilog2_le(x, t - 1)
    return {Op.LE: le, Op.LT: below, Op.GT: b_not(le), Op.GE: b_not(below),
            Op.EQ: b_and(le, b_not(below)), Op.NE: b_not(b_and(le, b_not(below)))}[op]


def _xor_split(e: Expr):
    """(u, w) when e is ``u ^ w`` with u depending on k and w free of it."""
    if e.op is Op.BIT_XOR:
        for u, w in (e.args, e.args[::-1]):
            if depends_on_k(u) and not depends_on_k(w):
                return u, w
    return None


def _xor_equal(x: Expr, y: Expr, constant) -> Expr | None:
    """``x == y`` (y free of k) without the xor of x: ``u ^ w == y`` is ``u == w ^ y``,
    ``(u ^ w) >> s == y`` is ``u >> s == (w >> s) ^ y``, and ``(u ^ w) mod M == y`` (M a power
    of two) is ``0 <= y < M and u mod M == (w ^ y) mod M``."""
    split = _xor_split(x)
    if split is not None:
        u, w = split
        return _cmp(Op.EQ, u, Expr(Op.BIT_XOR, Type.INT, (w, y)))
    split = _xor_split(x.args[0]) if x.op is Op.RSHIFT else None
    if split is not None:
        (u, w), s = split, x.args[1]
        high = Expr(Op.BIT_XOR, Type.INT, (Expr(Op.RSHIFT, Type.INT, (w, s)), y))
        return _cmp(Op.EQ, Expr(Op.RSHIFT, Type.INT, (u, s)), high)
    form = mask_form(x, constant)
    split = _xor_split(form[0]) if form is not None and form[3] and _power_of_two(form[1]) else None
    if split is None:
        return None
    (u, w), m = split, form[1]
    in_range = b_and(_cmp(Op.LE, const(0), y), _cmp(Op.LT, y, const(m)))
    low = Expr(Op.MOD, Type.INT, (Expr(Op.BIT_XOR, Type.INT, (w, y)), const(m)))
    return b_and(in_range, _cmp(Op.EQ, Expr(Op.MOD, Type.INT, (u, const(m))), low))


_FLIP = {Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}


def rewrite_compare(op: Op, a: Expr, b: Expr, constant) -> Expr | None:
    """An equal bool expression of ``a op b`` in forms the solver solves (see the module
    docstring), or None."""
    for x, y, o in ((a, b, op), (b, a, _FLIP[op])):
        if not depends_on_k(x) or depends_on_k(y):
            continue
        if x.op is Op.ILOG2:
            t = _int_const(constant, y)
            if t is not None:
                return _ilog2_compare(o, x.args[0], t)
        if o not in (Op.EQ, Op.NE):
            continue
        eq = _xor_equal(x, y, constant)
        if eq is not None:
            return eq if o is Op.EQ else b_not(eq)
    return None
