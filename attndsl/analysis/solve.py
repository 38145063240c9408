"""Solving a mask for k: the allowed keys of each query row as a union of guarded intervals.

Input: a checked mask expression and the pattern's parameter values. Output: a
:class:`RowSets` with two unions of :class:`Piece` — ``lower`` (a subset of the allowed keys of
every row) and ``upper`` (a superset) — whose guards and bounds are IR expressions free of
``k``. Each piece means: where ``guard`` holds, the keys ``lo <= k <= hi`` (and, with a
residue, only those with ``(k - offset) mod m`` in ``live``) are in the set.

Atoms that are linear in ``k`` (or in ``k // c``) with a constant coefficient are solved
exactly; ``abs``/``min``/``max``/``if`` inside comparisons are rewritten into and/or first;
``(linear in k) % m`` compared with a constant becomes a residue piece. Anything else
(tensors indexed by ``k``, selectors, non-linear terms) is unknown: the empty set in ``lower``
and every key in ``upper``. So ``exact`` (lower is upper) holds for the band family — causal,
windows, bands, sinks, globals, chunks, prefixes, dilation and strides and their and/or/not/if
combinations — and the row sets are then exactly the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..interp import evaluate_scalar
from ..ir import Expr, Op, Type, const

MAX_PIECES = 24
SMALL = 1 << 31          # larger constants may wrap int64 arithmetic: see Solver.small
_K_OPS = (Op.K, Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.ROUTE, Op.RANDOM_BLOCKS)


@dataclass(frozen=True, slots=True)
class Residue:
    modulus: int
    offset: Expr                 # k-free int expression
    live: frozenset              # residues of (k - offset) mod modulus that are in the set


@dataclass(frozen=True, slots=True)
class Piece:
    guard: Expr
    lo: Expr
    hi: Expr
    residue: Residue | None = None


@dataclass(frozen=True, slots=True)
class RowSets:
    lower: tuple[Piece, ...]
    upper: tuple[Piece, ...]
    tables: tuple = ()       # (derived tensor name, (r, b, seed, j)) read by random-block pieces

    @property
    def exact(self) -> bool:
        return self.lower == self.upper


# ----------------------------------------------------------------------------- IR builders

TRUE, FALSE = const(True), const(False)
ZERO, ONE = const(0), const(1)
_KV_LAST = Expr(Op.SUB, Type.INT, (Expr(Op.KV_LEN, Type.INT), ONE))


def _is_const(e: Expr, v) -> bool:
    return e.op is Op.CONST and e.value == v and type(e.value) is type(v)


def conjuncts(e: Expr) -> tuple:
    return conjuncts(e.args[0]) + conjuncts(e.args[1]) if e.op is Op.AND else (e,)


def b_and(a: Expr, b: Expr) -> Expr:
    """a and b; conjuncts already in a are dropped, ``x and not x`` is false."""
    if _is_const(a, True) or _is_const(b, False):
        return b
    if _is_const(b, True) or _is_const(a, False):
        return a
    if a == b:
        return a
    have = list(conjuncts(a))
    out = a
    for x in conjuncts(b):
        if x in have:
            continue
        if b_not(x) in have:
            return FALSE
        have.append(x)
        out = Expr(Op.AND, Type.BOOL, (out, x))
    return out


def b_or(a: Expr, b: Expr) -> Expr:
    if _is_const(a, False) or _is_const(b, True):
        return b
    if _is_const(b, False) or _is_const(a, True):
        return a
    return a if a == b else Expr(Op.OR, Type.BOOL, (a, b))


def b_not(a: Expr) -> Expr:
    if a.op is Op.CONST:
        return const(not a.value)
    return a.args[0] if a.op is Op.NOT else Expr(Op.NOT, Type.BOOL, (a,))


# Integer builders keep ``x + c`` (c a constant) in one form, so that bounds that differ by a
# constant show it (see _split and _empty): constants are folded into one trailing term,
# ``0 - x`` is ``-x`` and ``-(x - y)`` is ``y - x``.


def i_add(a: Expr, b: Expr) -> Expr:
    if a.op is Op.CONST and b.op is Op.CONST:
        return const(a.value + b.value)
    if _is_const(b, 0):
        return a
    if _is_const(a, 0):
        return b
    if a.op is Op.CONST:
        a, b = b, a
    if b.op is Op.CONST:
        base, c = _split(a)
        if c:
            return i_add(base, const(c + b.value))
    return Expr(Op.ADD, Type.INT, (a, b))


def i_neg(a: Expr) -> Expr:
    if a.op is Op.CONST:
        return const(-a.value)
    if a.op is Op.SUB:
        return i_sub(a.args[1], a.args[0])
    if a.op is Op.ADD and a.args[1].op is Op.CONST:
        return i_sub(const(-a.args[1].value), a.args[0])
    return a.args[0] if a.op is Op.NEG else Expr(Op.NEG, Type.INT, (a,))


def i_sub(a: Expr, b: Expr) -> Expr:
    if a.op is Op.CONST and b.op is Op.CONST:
        return const(a.value - b.value)
    if b.op is Op.CONST:
        return i_add(a, const(-b.value))
    if _is_const(a, 0):
        return i_neg(b)
    return Expr(Op.SUB, Type.INT, (a, b))


def i_mul(a: Expr, c: int) -> Expr:
    if c == 1:
        return a
    if a.op is Op.CONST:
        return const(a.value * c)
    return Expr(Op.MUL, Type.INT, (a, const(c)))


def i_floordiv(a: Expr, c: int) -> Expr:
    if c == 1:
        return a
    if a.op is Op.CONST:
        return const(a.value // c)
    return Expr(Op.FLOORDIV, Type.INT, (a, const(c)))


def i_ceildiv(a: Expr, c: int) -> Expr:
    return i_neg(i_floordiv(i_neg(a), c))


def args_of(e: Expr, op: Op) -> tuple:
    return e.args if e.op is op else (e,)


def _extreme(op: Op, pick, a: Expr, b: Expr) -> Expr:
    """min/max as one flat n-ary node: nested ones merged, and of the arguments ``x + c`` with
    one base x (constants: base 0) only the extreme one kept (so that equal bounds compare
    equal and subsumption shows)."""
    best: dict = {}                   # base -> the argument base + c with the extreme c
    for x in args_of(a, op) + args_of(b, op):
        base, c = (ZERO, x.value) if x.op is Op.CONST else _split(x)
        if base not in best or pick(c, best[base][1]) != best[base][1]:
            best[base] = (x, c)
    args = [x for x, _c in best.values()]
    return args[0] if len(args) == 1 else Expr(op, Type.INT, tuple(args))


def i_max(a: Expr, b: Expr) -> Expr:
    return _extreme(Op.MAX, max, a, b)


def i_min(a: Expr, b: Expr) -> Expr:
    return _extreme(Op.MIN, min, a, b)


ALL = (Piece(TRUE, ZERO, _KV_LAST),)
NONE: tuple = ()


def depends_on_k(e: Expr) -> bool:
    return e.uses(*_K_OPS)


# ----------------------------------------------------------------------------- set algebra


def _residue_meet(a: Residue | None, b: Residue | None):
    """The residue of the intersection, or False when it cannot be represented exactly."""
    if a is None or b is None:
        return a or b
    if a.modulus == b.modulus and a.offset == b.offset:
        return Residue(a.modulus, a.offset, a.live & b.live)
    return False


# Syntactic bound reasoning. A piece holds the keys max(lo, 0) <= k <= min(hi, kv_len - 1), so
# lo may be taken as max(0, lo) and hi as min(hi, kv_len - 1). These tests only say "yes"
# when the relation holds for every row; "no" means "not shown".


def _lo_ge(lo: Expr, e: Expr) -> bool:
    """max(0, lo) >= e for every row."""
    args = args_of(lo, Op.MAX)
    if e in args or _is_const(e, 0):
        return True
    if e.op is Op.MAX:
        return all(_lo_ge(lo, a) for a in e.args)
    if e.op is Op.CONST:
        return e.value <= 0 or any(a.op is Op.CONST and a.value >= e.value for a in args)
    return False


def _hi_le(hi: Expr, e: Expr) -> bool:
    """min(hi, kv_len - 1) <= e for every row."""
    args = args_of(hi, Op.MIN)
    if e in args or e == _KV_LAST:
        return True
    if e.op is Op.MIN:
        return all(_hi_le(hi, a) for a in e.args)
    if e.op is Op.CONST:
        return any(a.op is Op.CONST and a.value <= e.value for a in args)
    return False


def _split(e: Expr) -> tuple:
    """(base, c) with e == base + c (c a constant, possibly 0)."""
    if e.op in (Op.ADD, Op.SUB) and e.args[1].op is Op.CONST:
        c = e.args[1].value
        return e.args[0], (c if e.op is Op.ADD else -c)
    return e, 0


def _empty(p: Piece) -> bool:
    """A piece that holds no key whatever the row."""
    if _is_const(p.guard, False):
        return True
    los, his = args_of(p.lo, Op.MAX), args_of(p.hi, Op.MIN)
    if any(x.op is Op.CONST and x.value < 0 for x in his):
        return True
    for y in los:
        by, cy = _split(y)
        if cy > 0 and _hi_le(p.hi, by):                # lo >= by + cy > by >= hi
            return True
        for x in his:
            bx, cx = _split(x)
            if cy > cx and by == bx:                   # lo >= b + cy > b + cx >= hi
                return True
            if x.op is Op.CONST and y.op is Op.CONST and y.value > x.value:
                return True
            if cx < 0 and y == bx:                     # lo >= bx > bx + cx >= hi
                return True
    return any(_split(x)[1] < 0 and _lo_ge(p.lo, _split(x)[0]) for x in his)


def _within(a: Piece, b: Piece) -> bool:
    """Every key of piece a is in piece b, whatever the row."""
    if b.residue is not None and (a.residue is None or a.residue.modulus != b.residue.modulus
                                  or a.residue.offset != b.residue.offset
                                  or not a.residue.live <= b.residue.live):
        return False
    if not (_is_const(b.guard, True) or set(conjuncts(b.guard)) <= set(conjuncts(a.guard))):
        return False
    return _lo_ge(a.lo, b.lo) and _hi_le(a.hi, b.hi)


def _prune(pieces) -> tuple:
    """The pieces without empty ones and those inside another one (same union)."""
    out: list = []
    for p in pieces:
        if _empty(p) or any(_within(p, o) for o in out):
            continue
        out = [o for o in out if not _within(o, p)] + [p]
    return tuple(out)


def intersect(xs: tuple, ys: tuple):
    out = []
    for x in xs:
        for y in ys:
            res = _residue_meet(x.residue, y.residue)
            if res is False:
                return None
            if res is not None and not res.live:
                continue
            out.append(Piece(b_and(x.guard, y.guard), i_max(x.lo, y.lo), i_min(x.hi, y.hi), res))
    out = _prune(out)
    return out if len(out) <= MAX_PIECES else None


def union(xs: tuple, ys: tuple):
    out = _prune(xs + ys)
    return out if len(out) <= MAX_PIECES else None


def complement(xs: tuple):
    """Keys not in the union: the intersection of each piece's complement."""
    result = ALL
    for p in xs:
        outside = (Piece(p.guard, ZERO, i_sub(p.lo, ONE)), Piece(b_not(p.guard), ZERO, _KV_LAST))
        if p.hi != _KV_LAST:             # else nothing lies above the piece
            outside += (Piece(p.guard, i_add(p.hi, ONE), _KV_LAST),)
        if p.residue is not None:
            m = p.residue.modulus
            other = frozenset(range(m)) - p.residue.live
            if other:
                outside += (Piece(p.guard, p.lo, p.hi, Residue(m, p.residue.offset, other)),)
        result = intersect(result, outside)
        if result is None:
            return None
    return result


# ----------------------------------------------------------------------------- atoms


RUN_START, RUN_END = "#start", "#end"     # suffixes of derived tensors (no user name has '#')


def run_tensors(name: str, t) -> dict:
    """For a 1-D int tensor whose equal values form single runs: each position's run bounds.

    Returns {} when some value occurs in two separate runs (then ``t[k] == t[y]`` is no
    interval and stays unknown).
    """
    t = np.asarray(t)
    if t.ndim != 1 or t.size == 0:
        return {}
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
    if len(np.unique(t[starts])) != len(starts):
        return {}
    ends = np.r_[starts[1:], len(t)] - 1
    run = np.cumsum(np.r_[True, t[1:] != t[:-1]]) - 1
    return {name + RUN_START: starts[run].astype(np.int64), name + RUN_END: ends[run].astype(np.int64)}


class Solver:
    def __init__(self, params: dict, runs: frozenset = frozenset()):
        self.params = params
        self.runs = runs            # 1-D tensors known to be run-contiguous at this call

    def runs_atom(self, op: Op, a: Expr, b: Expr):
        """``t[k] == t[y]`` (y free of k) for a run-contiguous t: k in t's run at y."""
        for x, y in ((a, b), (b, a)):
            if (x.op is Op.INDEX and y.op is Op.INDEX and x.value == y.value and x.value in self.runs
                    and len(x.args) == 1 and x.args[0].op is Op.K and not depends_on_k(y)):
                pos = y.args[0]
                lo = Expr(Op.INDEX, Type.INT, (pos,), x.value + RUN_START)
                hi = Expr(Op.INDEX, Type.INT, (pos,), x.value + RUN_END)
                eq = (Piece(TRUE, lo, hi),)
                return eq if op is Op.EQ else complement(eq)
        return None

    def constant(self, e: Expr):
        if e.uses(Op.Q, Op.K, Op.H, Op.Q_LEN, Op.KV_LEN, Op.HEADS, Op.KV_HEADS, Op.INDEX, Op.SCORE,
                  Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.ROUTE, Op.RANDOM_BLOCKS):
            return None
        return evaluate_scalar(e, self.params)

    def linear(self, e: Expr):
        """e == coef * var + rest with var 'k' or ('kdiv', c) or None; rest is k-free."""
        if not depends_on_k(e):
            # -(1) is the constant -1; parameters stay symbolic (closed forms are in them)
            foldable = e.op is not Op.CONST and e.type is Type.INT and not e.uses(Op.PARAM)
            c = self.constant(e) if foldable else None
            return None, 0, (e if c is None else const(int(c)))
        if e.op is Op.K:
            return "k", 1, ZERO
        if e.op is Op.FLOORDIV and e.args[0].op is Op.K:
            c = int(self.constant(e.args[1]))
            return ("kdiv", c), 1, ZERO
        if e.op in (Op.ADD, Op.SUB):
            a, b = self.linear(e.args[0]), self.linear(e.args[1])
            if a is None or b is None or (a[0] and b[0] and a[0] != b[0]):
                return None
            sign = 1 if e.op is Op.ADD else -1
            rest = i_add(a[2], b[2]) if sign == 1 else i_sub(a[2], b[2])
            return a[0] or b[0], a[1] + sign * b[1], rest
        if e.op is Op.NEG:
            a = self.linear(e.args[0])
            return None if a is None else (a[0], -a[1], i_neg(a[2]))
        if e.op is Op.MUL:
            for x, y in (e.args, e.args[::-1]):
                c = self.constant(y) if not depends_on_k(y) else None
                if c is not None:
                    a = self.linear(x)
                    return None if a is None else (a[0], a[1] * c, i_mul(a[2], c))
        return None

    def small(self, lin) -> bool:
        """Whether a linear form's coefficient and constants are at most SMALL in magnitude.

        The interpreter wraps int64 arithmetic, the solver's algebra does not: with positions
        below 2**31 the two agree when no constant exceeds SMALL. Forms with larger ones are
        left unknown (the tile interval analysis widens on overflow).
        """
        _var, coef, rest = lin
        if abs(coef) > SMALL:
            return False
        for n in rest.walk():
            v = n.value if n.op is Op.CONST else self.params.get(n.value) if n.op is Op.PARAM else None
            if n.type is Type.INT and isinstance(v, int) and abs(v) > SMALL:
                return False
        return True

    def compare(self, op: Op, left: Expr, right: Expr):
        """The exact key set of ``left OP right`` for int operands, or None."""
        a, b = self.linear(left), self.linear(right)
        if a is None or b is None or (a[0] and b[0] and a[0] != b[0]):
            return None
        if not (self.small(a) and self.small(b)):
            return None
        var, coef, rest = a[0] or b[0], a[1] - b[1], i_sub(b[2], a[2])   # coef*var OP rest
        if coef == 0:
            return guard_only(Expr(op, Type.BOOL, (ZERO, rest)))
        if coef < 0:
            coef, rest = -coef, i_neg(rest)
            op = {Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE}.get(op, op)
        bounds = {
            Op.LE: [(None, i_floordiv(rest, coef))],
            Op.LT: [(None, i_floordiv(i_sub(rest, ONE), coef))],
            Op.GE: [(i_ceildiv(rest, coef), None)],
            Op.GT: [(i_add(i_floordiv(rest, coef), ONE), None)],
            Op.EQ: [(i_ceildiv(rest, coef), i_floordiv(rest, coef))],
        }.get(op)
        if op is Op.NE:
            eq = self.compare(Op.EQ, left, right)
            return None if eq is None else complement(eq)
        pieces = []
        for lo, hi in bounds:
            if var != "k":
                c = var[1]
                lo = None if lo is None else i_mul(lo, c)
                hi = None if hi is None else i_add(i_mul(hi, c), const(c - 1))
            pieces.append(Piece(TRUE, ZERO if lo is None else i_max(lo, ZERO),
                                _KV_LAST if hi is None else i_min(hi, _KV_LAST)))
        return tuple(pieces)

    def modular(self, op: Op, left: Expr, right: Expr):
        """``(s*V + rest) % m OP c`` with V = k or k // b and s = +-1: a residue piece.

        c is a constant (any comparison) or a k-free expression (== and != only). The piece
        keeps the keys with ``(k - offset) mod M`` in ``live``, M = m (V = k) or b*m.
        """
        if left.op is not Op.MOD or depends_on_k(right):
            if right.op is Op.MOD and not depends_on_k(left):
                return self.modular(_FLIP[op], right, left)
            return None
        lin = self.linear(left.args[0])
        if lin is None or lin[0] is None or lin[1] not in (1, -1) or not self.small(lin):
            return None
        m = int(self.constant(left.args[1]))
        unit = 1 if lin[0] == "k" else lin[0][1]
        if m * unit > 4096:
            return None
        s, rest = lin[1], lin[2]
        c = self.constant(right)
        if c is None:
            if op not in (Op.EQ, Op.NE):
                return None
            # s*V + rest == c(q) (mod m), c in [0, m)  <=>  V == s*(c - rest) (mod m)
            units = i_mul(i_sub(right, rest), s)
            in_range = b_and(Expr(Op.LE, Type.BOOL, (ZERO, right)),
                             Expr(Op.LT, Type.BOOL, (right, const(m))))
            eq = (Piece(in_range, ZERO, _KV_LAST,
                        Residue(m * unit, i_mul(units, unit), frozenset(range(unit)))),)
            return eq if op is Op.EQ else complement(eq)
        test = {Op.LT: lambda r: r < c, Op.LE: lambda r: r <= c, Op.GT: lambda r: r > c,
                Op.GE: lambda r: r >= c, Op.EQ: lambda r: r == c, Op.NE: lambda r: r != c}[op]
        # s*V + rest == v (mod m)  <=>  (V - o) mod m == s*v mod m, with o = -s*rest
        live_units = {(s * v) % m for v in range(m) if test(v)}
        if not live_units:
            return NONE
        if len(live_units) == m:
            return ALL
        offset = i_mul(i_neg(rest) if s == 1 else rest, unit)
        if offset.op is Op.CONST:               # one canonical offset per residue class
            offset = const(offset.value % (m * unit))
        live = frozenset(r for r in range(m * unit) if r // unit in live_units)
        return (Piece(TRUE, ZERO, _KV_LAST, Residue(m * unit, offset, live)),)


def guard_only(cond: Expr) -> tuple:
    return ((Piece(cond, ZERO, _KV_LAST),) if not _is_const(cond, False) else NONE)


_FLIP = {Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}


def _rewrite_compare(op: Op, a: Expr, b: Expr) -> Expr | None:
    """Push a comparison through abs/min/max/if on its k-dependent side."""
    for x, y, o in ((a, b, op), (b, a, _FLIP[op])):
        if not depends_on_k(x):
            continue
        def cmp(u, v, o=o):
            return Expr(o, Type.BOOL, (u, v))
        if x.op is Op.IF:
            c, t, f = x.args
            return b_or(b_and(c, cmp(t, y)), b_and(b_not(c), cmp(f, y)))
        if x.op in (Op.MIN, Op.MAX) and o in (Op.EQ, Op.NE):
            both = b_and(cmp(x, y, Op.LE), cmp(x, y, Op.GE))
            return both if o is Op.EQ else b_not(both)
        if x.op in (Op.MIN, Op.MAX) and o in (Op.LT, Op.LE, Op.GT, Op.GE):
            parts = [cmp(arg, y) for arg in x.args]
            below = o in (Op.LT, Op.LE)
            join = b_or if (x.op is Op.MIN) == below else b_and
            return reduce(join, parts)
        if x.op is Op.ABS and x.type is Type.INT:
            v = x.args[0]
            neg_y = i_neg(y)
            if o in (Op.LE, Op.LT):
                return b_and(cmp(v, y), Expr(_FLIP[o], Type.BOOL, (v, neg_y)))
            if o in (Op.GE, Op.GT):
                return b_or(cmp(v, y), Expr(_FLIP[o], Type.BOOL, (v, neg_y)))
            if o is Op.EQ:
                eq = b_or(cmp(v, y), cmp(v, neg_y))
                return b_and(Expr(Op.GE, Type.BOOL, (y, ZERO)), eq)
            if o is Op.NE:
                return b_not(_rewrite_compare(Op.EQ, x, y))
    return None


def solve(mask: Expr, params: dict, runs: frozenset = frozenset()) -> RowSets:
    """lower/upper key sets per row for a bool expression.

    ``runs`` names the 1-D int tensors whose equal values are contiguous at this call (see
    :func:`run_tensors`); their pieces read derived tensors named ``t#start`` / ``t#end``.
    """
    solver = Solver(params, runs)
    # id -> (node, result): keeping the node alive keeps its id unique while the memo lives
    # (go() is also called on temporary trees built by the rewrites below).
    memo: dict[int, tuple] = {}

    def go(e: Expr) -> tuple:
        key = id(e)
        if key not in memo:
            memo[key] = (e, _go(e))
        return memo[key][1]

    def unknown():
        return NONE, ALL

    def _go(e: Expr):
        if not depends_on_k(e):
            # 10 <= 5 is false; parameters stay symbolic (closed forms are in them)
            c = solver.constant(e) if e.op is not Op.CONST and not e.uses(Op.PARAM) else None
            s = guard_only(e if c is None else const(bool(c)))
            return s, s
        op = e.op
        if op is Op.AND or op is Op.OR:
            (la, ua), (lb, ub) = go(e.args[0]), go(e.args[1])
            f = intersect if op is Op.AND else union
            lo, up = f(la, lb), f(ua, ub)
            return (lo if lo is not None else NONE), (up if up is not None else ALL)
        if op is Op.NOT:
            la, ua = go(e.args[0])
            lo, up = complement(ua), complement(la)
            return (lo if lo is not None else NONE), (up if up is not None else ALL)
        if op is Op.IF:
            c, t, f = e.args
            return go(b_or(b_and(c, t), b_and(b_not(c), f)))
        if op in _FLIP:
            a, b = e.args
            if a.type is Type.BOOL:          # a == b on bools
                both = b_or(b_and(a, b), b_and(b_not(a), b_not(b)))
                return go(both if op is Op.EQ else b_not(both))
            if a.type is not Type.INT:
                return unknown()
            exact = solver.runs_atom(op, a, b) if op in (Op.EQ, Op.NE) else None
            if exact is None:
                exact = solver.compare(op, a, b)
            if exact is None:
                exact = solver.modular(op, a, b)
            if exact is not None:
                return exact, exact
            rewritten = _rewrite_compare(op, a, b)
            if rewritten is not None:
                return go(rewritten)
            return unknown()
        if op is Op.RANDOM_BLOCKS:
            pieces = random_pieces(solver, e, tables)
            return (pieces, pieces) if pieces is not None else unknown()
        return unknown()

    tables: dict = {}
    lower, upper = go(mask)
    return RowSets(lower, upper, tuple(tables.items()))


MAX_RANDOM = 8
RANDOM_TABLE = "#random"


def random_pieces(solver: Solver, e: Expr, tables: dict):
    """random_blocks(r, b, seed): per row, r key blocks read from derived tables (one per rank)
    of the selected block indices of each query block, computed at call time."""
    r, b, seed = (int(solver.constant(a)) for a in e.args)
    if r > MAX_RANDOM:
        return None
    if r == 0:
        return NONE
    first = i_floordiv(Expr(Op.SUB, Type.INT, (Expr(Op.KV_LEN, Type.INT), Expr(Op.Q_LEN, Type.INT))), b)
    qblock = i_sub(i_floordiv(Expr(Op.Q, Type.INT), b), first)
    pieces = []
    for j in range(r):
        name = f"{RANDOM_TABLE}:{r}:{b}:{seed}:{j}"
        tables[name] = (r, b, seed, j)
        lo = i_mul(Expr(Op.INDEX, Type.INT, (qblock,), name), b)
        pieces.append(Piece(TRUE, lo, i_min(i_add(lo, const(b - 1)), _KV_LAST)))
    return tuple(pieces)


def random_tables(tables, q_len: int, kv_len: int) -> dict:
    """The derived tensors of random-block pieces: for rank j, the j-th selected key block of
    each query block (repeating the last one when fewer than r blocks exist)."""
    from ..selectors import random_block_table

    out, chosen = {}, {}
    for name, (r, b, seed, j) in tables:
        if (r, b, seed) not in chosen:
            off = kv_len - q_len
            first, last = (off // b, (kv_len - 1) // b) if q_len else (0, -1)
            sel = random_block_table(r, b, seed, first, last, kv_len)
            rows, cols = np.nonzero(sel)                         # ascending J in each row
            n = sel.sum(axis=1)
            starts = np.r_[0, np.cumsum(n)[:-1]]
            chosen[(r, b, seed)] = (cols, starts, n)
        cols, starts, n = chosen[(r, b, seed)]
        if len(cols) == 0:
            out[name] = np.zeros(max(len(n), 1), dtype=np.int64)
            continue
        out[name] = cols[starts + np.minimum(j, np.maximum(n - 1, 0))].astype(np.int64)
    return out
