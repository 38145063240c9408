"""Key sets as unions of guarded pieces: the data of the solver, IR builders that keep its
bounds canonical, and the set algebra (intersection, union, complement) with pruning.

A :class:`Piece` means: where ``guard`` holds, the keys ``lo <= k <= hi`` (with a residue, only
those with ``(k - offset) mod modulus`` in ``live``). Bounds and guards are IR expressions free
of ``k``. The builders fold constants and flatten ``min``/``max`` so that equal bounds compare
equal, which lets :func:`_prune` drop empty pieces and pieces inside others: unions stay small
(at most ``MAX_PIECES``; beyond that an operation gives up with ``None``, which the solver
turns into a sound approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import SELECTOR_OPS, Expr, Op, Type, const

MAX_PIECES = 24
SMALL = 1 << 31          # larger constants may wrap int64 arithmetic: see Solver.small
_K_OPS = frozenset({Op.K} | SELECTOR_OPS)        # ops whose value depends on k


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


def guard_only(cond: Expr) -> tuple:
    return ((Piece(cond, ZERO, _KV_LAST),) if not _is_const(cond, False) else NONE)
