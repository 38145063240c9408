"""Solving a mask for k: the allowed keys of each query row as a union of guarded intervals.

Input: a checked mask expression and the pattern's parameter values. Output: a
:class:`RowSets` with two unions of :class:`Piece` — ``lower`` (a subset of the allowed keys of
every row) and ``upper`` (a superset) — whose guards and bounds are IR expressions free of
``k``. Each piece means: where ``guard`` holds, the keys ``lo <= k <= hi`` (and, with a
residue, only those with ``(k - offset) mod m`` in ``live``) are in the set.

Atoms that are linear in ``k`` (or in ``k // c``) with a constant coefficient are solved
exactly; ``abs``/``min``/``max``/``if`` inside comparisons are rewritten into and/or first;
``(linear in k) % m`` compared with a constant becomes a residue piece. Bit operators that a
constant makes arithmetic (``k >> 6`` is ``k // 64``, ``k & 63`` is ``k % 64``), low-bit masks
(``(k ^ 5) & 3 < 2``), xors with a k-free operand under ``==`` and ``ilog2`` compared with a
constant (bands) are rewritten into those forms first (:mod:`.bitforms`). Anything else
(tensors indexed by ``k``, selectors, non-linear terms) is unknown: the empty set in ``lower``
and every key in ``upper``; so is everything past :data:`MAX_SOLVE_STEPS` visited sub-expressions
(rewrites double per level of nested ``abs``: the solve stays linear in the pattern's size). So
``exact`` (lower is upper) holds for the band family — causal,
windows, bands, sinks, globals, chunks, prefixes, dilation and strides and their and/or/not/if
combinations — and the row sets are then exactly the mask.
"""

from __future__ import annotations

from functools import reduce

import numpy as np

from ..constants import is_constant
from ..errors import AttnCallError
from ..interp import evaluate_scalar
from ..ir import Expr, Op, Type, const
from ..ops import EXPANDED_OPS
from .bitforms import arith_form, mask_form, rewrite_compare
from .intervals import needs_expansion
from .pieces import (
    _KV_LAST,
    ALL,
    NONE,
    ONE,
    SMALL,
    TRUE,
    ZERO,
    Piece,
    Residue,
    RowSets,
    b_and,
    b_not,
    b_or,
    complement,
    conjuncts,
    depends_on_k,
    guard_only,
    i_add,
    i_ceildiv,
    i_floordiv,
    i_max,
    i_min,
    i_mul,
    i_neg,
    i_sub,
    intersect,
    union,
)

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
    change = np.empty(t.size, dtype=bool)
    change[0] = True
    np.not_equal(t[1:], t[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    firsts = np.sort(t[starts])
    # (sorted, not np.unique: NumPy's unique imports numpy.ma on first use, ~20 ms of a call)
    if len(firsts) > 1 and not (firsts[1:] != firsts[:-1]).all():
        return {}
    ends = np.append(starts[1:], len(t)) - 1
    run = np.cumsum(change) - 1
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
        """The value of a compile-time constant expression (attndsl.constants), else None (also
        when evaluating it is a call error: a shift count past 62 under a guard)."""
        if not is_constant(e):
            return None
        try:
            return evaluate_scalar(e, self.params)
        except AttnCallError:
            return None

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
            c = self.constant(e.args[1])        # None: a divisor of the call's sizes, unfolded
            return None if c is None else (("kdiv", int(c)), 1, ZERO)
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
        form = arith_form(e, self.constant)        # k >> 6 is k // 64, ~x is -x - 1, ...
        return None if form is None else self.linear(form)

    def small(self, lin) -> bool:
        """Whether a linear form's coefficient, divisor (``k // c``, ``k >> s``) and constants are
        at most SMALL in magnitude.

        The interpreter wraps int64 arithmetic, the solver's algebra does not: with positions
        below 2**31 the two agree when no constant exceeds SMALL. Forms with larger ones are
        left unknown (the tile interval analysis widens on overflow).
        """
        var, coef, rest = lin
        if abs(coef) > SMALL or (isinstance(var, tuple) and var[1] > SMALL):
            return False                    # (k // c: the bounds are multiplied by c)
        for n in rest.walk():
            v = n.value if n.op is Op.CONST else self.params.get(n.value) if n.op is Op.PARAM else None
            if n.type is Type.INT and isinstance(v, int) and abs(v) > SMALL:
                return False
            if n.op is Op.LSHIFT:               # x << c is x * 2**c
                c = self.constant(n.args[1])
                if not isinstance(c, int) or not 0 <= c <= 31:
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

        The left side may also be a low-bit form, ``f((s*V + rest) mod m)`` with m a power of
        two (``(k ^ 5) & 3``: :func:`~attndsl.analysis.bitforms.mask_form`). c is a constant
        (any comparison) or, for ``%`` itself, a k-free expression (== and != only). The piece
        keeps the keys with ``(k - offset) mod M`` in ``live``, M = m (V = k) or b*m.
        """
        form = mask_form(left, self.constant) if not depends_on_k(right) else None
        if form is None:
            if not depends_on_k(left) and mask_form(right, self.constant) is not None:
                return self.modular(_FLIP[op], right, left)
            return None
        inner, m, value, identity = form         # left == value(inner mod m)
        lin = self.linear(inner)
        if lin is None or lin[0] is None or lin[1] not in (1, -1) or not self.small(lin):
            return None
        unit = 1 if lin[0] == "k" else lin[0][1]
        if m * unit > 4096:
            return None
        s, rest = lin[1], lin[2]
        c = self.constant(right)
        if c is None:
            if op not in (Op.EQ, Op.NE) or not identity:
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
        live_units = {(s * v) % m for v in range(m) if test(value(v))}
        if not live_units:
            return NONE
        if len(live_units) == m:
            return ALL
        offset = i_mul(i_neg(rest) if s == 1 else rest, unit)
        if offset.op is Op.CONST:               # one canonical offset per residue class
            offset = const(offset.value % (m * unit))
        live = frozenset(r for r in range(m * unit) if r // unit in live_units)
        return (Piece(TRUE, ZERO, _KV_LAST, Residue(m * unit, offset, live)),)


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
    run = _Solve(Solver(params, runs))
    lower, upper = run.go(mask)
    return RowSets(lower, upper, tuple(run.tables.items()))


class _Solve:
    """One solve: the (lower, upper) sets of each sub-expression, memoised by node, within a
    budget of MAX_SOLVE_STEPS sub-expressions; one rule per op in :data:`SOLVE_RULES`."""

    def __init__(self, solver: Solver):
        self.solver = solver
        # id -> (node, result): keeping the node alive keeps its id unique while the memo lives
        # (go() is also called on temporary trees built by the rewrites).
        self.memo: dict[int, tuple] = {}
        self.budget = MAX_SOLVE_STEPS
        self.tables: dict = {}          # derived tensors of random-block pieces

    def go(self, e: Expr) -> tuple:
        key = id(e)
        if key not in self.memo:
            self.budget -= 1        # rewrites can double per level (nested abs): past the
            if self.budget < 0:     # budget, unknown
                result = _unknown(self, e)
            elif not depends_on_k(e):
                # 10 <= 5 is false; parameters stay symbolic (closed forms are in them)
                c = self.solver.constant(e) if e.op is not Op.CONST and not e.uses(Op.PARAM) else None
                result = (guard_only(e if c is None else const(bool(c))),) * 2
            else:                   # (the rule is called from here: one frame per level)
                result = SOLVE_RULES[e.op](self, e)
            self.memo[key] = (e, result)
        return self.memo[key][1]


def _unknown(run: _Solve, e: Expr) -> tuple:
    """Nothing known: the empty set below, every key above."""
    return NONE, ALL


def _equal_reads(x: Expr) -> tuple | None:
    """(t[k], t[y]) when x is ``t[k] == t[y]`` (either order) for an int tensor t read at k and a
    k-free index y, else None."""
    if x.op is not Op.EQ:
        return None
    for a, b in (x.args, x.args[::-1]):
        if (a.op is Op.INDEX and b.op is Op.INDEX and a.value == b.value and a.type is Type.INT
                and len(a.args) == 1 and a.args[0].op is Op.K and len(b.args) == 1
                and not depends_on_k(b)):
            return a, b
    return None


def _substitute(e: Expr, old: Expr, new: Expr, memo: dict) -> Expr:
    """e with every sub-expression equal to ``old`` replaced by ``new`` (shared nodes once;
    iterative, children first: trees may be deep). ``memo``: id -> (node, result)."""
    stack = [(e, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in memo:
            continue
        hit = hash(node) == hash(old) and node == old          # (hashes are cached)
        if hit or not node.args:
            memo[id(node)] = (node, new if hit else node)
        elif not ready:
            stack.append((node, True))
            stack.extend((a, False) for a in node.args if id(a) not in memo)
        else:
            args = tuple(memo[id(a)][1] for a in node.args)
            same = all(x is y for x, y in zip(args, node.args))
            memo[id(node)] = (node, node if same else
                              Expr(node.op, node.type, args, node.value, node.span))
    return memo[id(e)][1]


def _with_equal_reads(e: Expr) -> Expr | None:
    """A conjunction that holds ``t[k] == t[y]`` (y free of k), with t[k] replaced by t[y] in
    its other conjuncts (equal where the conjunction can hold), or None when none reads t[k].

    ``t[k] == t[q] and k - start[t[k]] < g`` becomes ``... and k - start[t[q]] < g``: linear
    in k, so solved exactly (document-relative positions of packed sequences)."""
    parts = conjuncts(e)
    for i, x in enumerate(parts):
        eq = _equal_reads(x)
        if eq is None:
            continue
        memo: dict = {}
        new = [p if j == i else _substitute(p, eq[0], eq[1], memo) for j, p in enumerate(parts)]
        if any(a is not b for a, b in zip(new, parts)):
            return reduce(lambda a, b: Expr(Op.AND, Type.BOOL, (a, b)), new)
    return None


def _logic(run: _Solve, e: Expr) -> tuple:
    if e.op is Op.AND:
        rewritten = _with_equal_reads(e)
        if rewritten is not None:
            return run.go(rewritten)
    (la, ua), (lb, ub) = run.go(e.args[0]), run.go(e.args[1])
    f = intersect if e.op is Op.AND else union
    lo, up = f(la, lb), f(ua, ub)
    return (lo if lo is not None else NONE), (up if up is not None else ALL)


def _not(run: _Solve, e: Expr) -> tuple:
    la, ua = run.go(e.args[0])
    lo, up = complement(ua), complement(la)
    return (lo if lo is not None else NONE), (up if up is not None else ALL)


def _if(run: _Solve, e: Expr) -> tuple:
    c, t, f = e.args
    return run.go(b_or(b_and(c, t), b_and(b_not(c), f)))


def _compare(run: _Solve, e: Expr) -> tuple:
    op, (a, b) = e.op, e.args
    if a.type is Type.BOOL:          # a == b on bools
        both = b_or(b_and(a, b), b_and(b_not(a), b_not(b)))
        return run.go(both if op is Op.EQ else b_not(both))
    if a.type is not Type.INT:
        return _unknown(run, e)
    solver = run.solver
    exact = solver.runs_atom(op, a, b) if op in (Op.EQ, Op.NE) else None
    if exact is None:
        exact = solver.compare(op, a, b)
    if exact is None:
        exact = solver.modular(op, a, b)
    if exact is not None:
        return exact, exact
    rewritten = _rewrite_compare(op, a, b)
    if rewritten is None:
        rewritten = rewrite_compare(op, a, b, solver.constant)
    if rewritten is not None:
        return run.go(rewritten)
    return _unknown(run, e)


def _random(run: _Solve, e: Expr) -> tuple:
    pieces = random_pieces(run.solver, e, run.tables)
    return (pieces, pieces) if pieces is not None else _unknown(run, e)


# one rule per op, for the k-dependent nodes (k-free ones are guards: see _Solve.go)
SOLVE_RULES = {
    Op.AND: _logic, Op.OR: _logic, Op.NOT: _not, Op.IF: _if,
    **dict.fromkeys((Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE), _compare),
    Op.RANDOM_BLOCKS: _random,
    # selections read from the call's data: unknown here
    Op.TOPK_BLOCKS: _unknown, Op.TOPP_BLOCKS: _unknown, Op.ROUTE: _unknown,
    # no bools: never solved themselves (only bool operands of the rules above are); unknown
    **dict.fromkeys((Op.CONST, Op.PARAM, Op.Q, Op.K, Op.H, Op.Q_LEN, Op.KV_LEN, Op.HEADS,
                     Op.KV_HEADS, Op.SCORE, Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.FLOORDIV,
                     Op.MOD, Op.POW, Op.ABS, Op.MIN, Op.MAX, Op.FLOAT, Op.EXP, Op.LOG, Op.SQRT,
                     Op.TANH, Op.SIGMOID, Op.ERF, Op.EXP2, Op.LOG2, Op.FLOOR, Op.CEIL, Op.ROUND,
                     Op.ILOG2, Op.BIT_AND, Op.BIT_OR, Op.BIT_XOR, Op.LSHIFT, Op.RSHIFT, Op.INVERT),
                    _unknown),
    # a bool tensor's read depends on the data: unknown (k-free reads are guards)
    Op.INDEX: _unknown,
    # reductions are expanded before analysis (attndsl/expand.py)
    **dict.fromkeys(EXPANDED_OPS, needs_expansion),
}


MAX_RANDOM = 8
MAX_SOLVE_STEPS = 4096      # sub-expressions one solve visits; beyond, the rest is unknown (sound)
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
