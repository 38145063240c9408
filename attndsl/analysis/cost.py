"""Cost model of one attention call: kept pairs, FLOPs, block-sparse waste and closed forms.

Input: a :class:`~attndsl.bound.BoundPattern` without data-dependent selectors (``topk_blocks``,
``topp_blocks``, ``route``: an ``AttnCallError`` as for ``block_map``), the call's sizes, a tile
shape, the head dimension and the pattern's tensor inputs. Output: a frozen :class:`CostReport`.

Invariants of a report:

* ``kept_pairs`` counts the (h, q, k) pairs the mask clause allows, summed over heads (what
  ``dense_mask(...).sum()`` gives; a score of ``-inf`` is not seen). With ``exact`` it is exact;
  without, it is an upper bound (full-tile area plus the whole in-bounds area of partial tiles).
* ``total_pairs = heads * q_len * kv_len``, ``flops = 4 * head_dim * kept_pairs`` (2 for QK^T and
  2 for PV per pair), ``dense_flops = 4 * head_dim * total_pairs``.
* ``computed_pairs`` is the in-bounds area of the non-empty tiles of the (sound) block map, so
  ``kept_pairs <= computed_pairs``; ``wasted_fraction = 1 - kept/computed`` (0 when nothing is
  computed) is the share of computed pairs that are masked out.
* ``closed_form`` (with ``closed_form_expr``) is the kept count with q_len = kv_len = N, the int
  parameters as integer symbols (positive if so bound) and ``heads`` numeric. It is valid wherever
  ``closed_form_condition`` holds (None: for every N >= 1), the bound parameter values satisfy
  it, and it is checked here against the exact count at three lengths >= ``closed_form_min_n``;
  anything this module cannot derive or verify is None, never a guess.
* ``asymptotic`` is the leading term in N of the closed form; without one it is estimated from
  the exact counts at N and 2N (N = max(q_len, kv_len)) and ``asymptotic_estimated`` is True.

Counting: for a head class whose key set is exact (:mod:`.solve`, :mod:`.descriptors`) the
pieces are evaluated per row, vectorised over rows; non-residue intervals are merged and summed,
a residue piece (at most one per class) is counted arithmetically minus its keys already inside
the merged intervals. Work is O(q_len x pieces) per class, never O(q_len x kv_len). Other classes
count full tiles by area and evaluate partial tiles pair by pair with the mask, as long as those
hold at most ``PAIR_BUDGET`` pairs in all; beyond that the report is inexact (see above).

Closed forms: the per-row count of a band class (no residues, no floor division, no tensors) is
written by inclusion-exclusion over its pieces, ``[guards] * max(min(his) - max(los) + 1, 0)``,
and summed over q in [0, N) after splitting the range at every breakpoint of min/max and of the
comparisons. Breakpoints are ordered by the bound parameter values (nudged by distinct tiny
amounts, so that ties order generically) with N larger than all of them; each ordering used
becomes a non-strict condition, which the bound values satisfy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
import sympy as sp

from ..bound import as_bound
from ..caches import LRUCache
from ..errors import AttnCallError
from ..expand import has_reductions
from ..inputs import tensor_inputs
from ..ir import SELECTOR_OPS, Expr, Op, Type, const
from ..ops import EXPANDED_OPS, MAX_SHIFT, REDUCE_OPS
from . import api
from .allowed import allowed_bounds
from .fold import fold
from .intervals import needs_expansion
from .pieces import b_and, i_add, i_max, i_min, i_sub
from .rows import eval_rows, merge, piece_bounds
from .solve import solve

PAIR_BUDGET = 1 << 25        # partial-tile pairs evaluated one by one, over all head classes
ROW_CHUNK = 1 << 18
MAX_PIECES = 5               # inclusion-exclusion terms: 2**pieces - 1
MAX_GROUPS = 8               # distinct per-head masks summed symbolically
MAX_VERIFY_N = 1 << 21
_ZERO, _ONE, _Z = const(0), const(1), sp.Integer(0)
CLOSED_FORMS = LRUCache("analysis.closed_forms", 64)     # (pattern, heads, kv_heads) -> form
_KV_LAST = Expr(Op.SUB, Type.INT, (Expr(Op.KV_LEN, Type.INT), _ONE))


@dataclass(frozen=True)
class CostReport:
    kept_pairs: int
    total_pairs: int
    density: float
    flops: int
    dense_flops: int
    computed_pairs: int
    wasted_fraction: float
    closed_form: str | None
    closed_form_expr: object          # sympy expression or None
    closed_form_condition: str | None
    closed_form_min_n: int | None     # smallest N meeting the condition at the bound values
    asymptotic: str | None
    asymptotic_estimated: bool
    exact: bool
    params: tuple = ()                # (name, value) of the int parameters, for closed_form_at

    def closed_form_at(self, n: int) -> int:
        """The closed form at N = n with the bound parameter values (n >= closed_form_min_n)."""
        if self.closed_form_expr is None or n < self.closed_form_min_n:
            raise ValueError(f"no closed form valid at N = {n}")
        env = dict(self.params) | {"N": n}
        e = self.closed_form_expr
        return int(e.xreplace({s: env[s.name] for s in e.free_symbols}))

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "closed_form_expr"}
        out["params"] = dict(self.params)
        return out


# ----------------------------------------------------------------------------- exact counts


def _column(grid, expr, h, rows, live=None):
    """An expression's value per row [R] and the rows where it indexed out of range (or None)."""
    value, bad = eval_rows(grid, expr, np.array([h]), rows, None if live is None else live[None, :, None])
    value = np.broadcast_to(value, (1, len(rows), 1))[0, :, 0]
    return value, (None if bad is None else np.broadcast_to(bad, (1, len(rows), 1))[0, :, 0])


def _residue_counter(modulus: int, live, offset):
    """count(a, b): keys k in [a, b] with (k - offset) mod modulus in live, elementwise."""
    prefix = np.cumsum(np.bincount(np.fromiter(live, np.int64) + 1, minlength=modulus + 1))

    def below(t):                       # #{j < t : j mod m live} up to a constant
        return (t // modulus) * prefix[-1] + prefix[t % modulus]

    def count(a, b):
        return np.where(a <= b, below(b - offset + 1) - below(a - offset), 0)
    return count


def _exact_rows(pieces, grid, h: int) -> int | None:
    """Allowed keys summed over all rows of one head, from the pieces; None where it cannot.

    Rows where a bound indexes a tensor out of range (the mask does not read it there) are
    evaluated key by key with the mask, if they hold at most ``PAIR_BUDGET`` pairs.
    """
    plain = tuple(p for p in pieces if p.residue is None)
    residues = [p for p in pieces if p.residue is not None]
    if len(residues) > 1:
        return None
    total, last = 0, grid.kv_len - 1
    for start in range(0, grid.q_len, ROW_CHUNK):
        rows = np.arange(start, min(grid.q_len, start + ROW_CHUNK))
        lo, hi, unknown = piece_bounds(plain, grid, np.array([h]), rows, keep_residues=False)
        bad = unknown[0].copy()
        lo, hi = (x[0] for x in merge(lo, hi))                        # [R, slots], disjoint
        kept = np.maximum(hi - lo + 1, 0).sum(axis=1)
        for p in residues:
            guard, b0 = _column(grid, p.guard, h, rows)
            guard = guard.astype(bool)
            plo, b1 = _column(grid, p.lo, h, rows, guard)
            phi, b2 = _column(grid, p.hi, h, rows, guard)
            off, b3 = _column(grid, p.residue.offset, h, rows, guard)
            for b in (b0, b1, b2, b3):
                bad |= False if b is None else b
            plo = np.where(guard, np.maximum(plo, 0), 1)
            phi = np.where(guard, np.minimum(phi, last), 0)
            count = _residue_counter(p.residue.modulus, p.residue.live, off)
            kept = kept + count(plo, phi)
            for j in range(lo.shape[1]):                                # minus keys already kept
                kept = kept - count(np.maximum(lo[:, j], plo), np.minimum(hi[:, j], phi))
        total += int(kept[~bad].sum())
        if bad.any():
            if int(bad.sum()) * grid.kv_len > PAIR_BUDGET:
                return None
            step = max(1, (1 << 22) // grid.kv_len)
            rb = rows[bad]
            for i in range(0, len(rb), step):
                m = grid.mask(np.array([h]), rb[i:i + step], np.arange(grid.kv_len))
                total += int(np.count_nonzero(m))
    return total


def _tile_sizes(n: int, b: int) -> np.ndarray:
    return np.diff(np.minimum(np.arange(0, n + b, b, dtype=np.int64), n))


def _tile_count(bm, grid, h: int, block, budget: int):
    """(count, exact, pairs evaluated) of one head from its block map [nQT, nKT]."""
    bq, bk = block
    rs, cs = _tile_sizes(grid.q_len, bq), _tile_sizes(grid.kv_len, bk)
    full = int(rs @ (bm == 2).astype(np.int64) @ cs)
    partial = int(rs @ (bm == 1).astype(np.int64) @ cs)
    if partial > budget:
        return full + partial, False, 0
    count = full
    for i in np.flatnonzero((bm == 1).any(axis=1)):
        rows = np.arange(i * bq, i * bq + rs[i])
        cols = np.concatenate([np.arange(j * bk, j * bk + cs[j]) for j in np.flatnonzero(bm[i] == 1)])
        count += int(np.count_nonzero(grid.mask(np.array([h]), rows, cols)))
    return count, True, partial


def _count(pattern, q_len, kv_len, heads, kv_heads, given, desc=None):
    """(kept pairs, exact) of a call; ``desc`` (its Description) is made only when needed."""
    call = api.call_classes(pattern, q_len, kv_len, heads, (128, 128), kv_heads, given)
    if q_len == 0 or kv_len == 0:
        return 0, True
    total, exact, budget = 0, True, PAIR_BUDGET
    for n, cls in enumerate(call.classes):
        hs, sets, sub = cls.heads, cls.sets, cls.grid
        if desc is not None:
            pieces = desc.keys[n].pieces if desc.keys[n] is not None else None
        else:
            pieces = sets.lower if sets.exact else None
        got = _exact_rows(pieces, sub, hs[0]) if pieces is not None else None
        if got is None:
            if desc is None:
                desc = api.describe(pattern, q_len, kv_len, heads, (128, 128), kv_heads, given)
            got, ok, used = _tile_count(desc.block_map[hs[0]], sub, hs[0], desc.block, budget)
            exact, budget = exact and ok, budget - used
        total += got * len(hs)
    # when the score clause may reach -inf in ways the analysis cannot place, the pairs counted
    # are those of an upper bound of the allowed pairs
    return total, exact and call.exact


# ----------------------------------------------------------------------------- closed forms


class _NoForm(Exception):
    """The count has no closed form this module derives."""


class _Summer:
    """Sums an int IR expression of q over q in [0, N) by splitting at its breakpoints (one
    rule per op in :data:`SYMPY_RULES`).

    A segment list is [(lo, hi, value)] over consecutive [lo, hi) (sympy bounds); values are
    sympy polynomials in q or Python bools. ``conds`` collects d with ``d <= 0`` required.
    """

    def __init__(self, ints: dict):
        self.N = sp.Symbol("N", integer=True, positive=True)
        self.q = sp.Dummy("q", integer=True)
        sign = {1: {"positive": True}, 0: {"nonnegative": True}, -1: {}}
        self.syms = {n: sp.Symbol(n, integer=True, **sign[(v > 0) - (v < 0)]) for n, v in ints.items()}
        big = sp.Integer(10 ** 9 * (1 + max([abs(v) for v in ints.values()], default=0)))
        self.exact = {s: sp.Integer(ints[n]) for n, s in self.syms.items()} | {self.N: big}
        self.pert = {s: sp.Integer(ints[n]) + sp.Rational(1, 10 ** (3 * i + 3))
                     for i, (n, s) in enumerate(self.syms.items())} | {self.N: big}
        self.conds: set = set()
        self.memo: dict = {}

    def pv(self, e, q=None):
        env = self.pert if q is None else {**self.pert, self.q: q}
        return sp.Rational(sp.sympify(e).xreplace(env))

    def le(self, x, y) -> None:
        d = sp.expand(x - y)
        if d.free_symbols:
            self.conds.add(d)
        elif d > 0:
            raise _NoForm                                    # pragma: no cover - a bug guard

    def linear(self, d):
        """(slope, rest) of d = slope*q + rest with slope in {-1, 0, 1}."""
        d = sp.expand(d)
        c, rest = d.coeff(self.q, 1), d.coeff(self.q, 0)
        if c not in (-1, 0, 1) or sp.expand(d - c * self.q - rest) != 0:
            raise _NoForm
        return int(c), rest

    def chain(self, points, a, b) -> list:
        """a, the distinct points strictly inside (a, b) in order, b; orderings recorded."""
        inside = {sp.expand(p): p for p in points}
        for key in (sp.expand(a), sp.expand(b)):
            inside.pop(key, None)
        out = [a]
        for p in sorted(inside.values(), key=self.pv):
            if self.pv(p) <= self.pv(a):
                self.le(p, a)
            elif self.pv(p) >= self.pv(b):
                self.le(b, p)
            else:
                if self.pv(p) == self.pv(out[-1]):
                    raise _NoForm                            # a non-generic tie
                out.append(p)
        out.append(b)
        for x, y in itertools.pairwise(out):
            self.le(x, y)
        return out

    def seg(self, e: Expr, a, b) -> list:
        key = (e, a, b)
        if key not in self.memo:
            out = []
            for lo, hi, v in SYMPY_RULES[e.op](self, e, a, b):      # merge equal neighbours
                if out and (v is out[-1][2] if isinstance(v, bool) else
                            not isinstance(out[-1][2], bool) and sp.expand(v - out[-1][2]) == 0):
                    lo = out.pop()[0]
                out.append((lo, hi, v))
            self.memo[key] = out
        return self.memo[key]

    def extreme(self, args, is_min: bool, lo, hi) -> list:
        roots = []
        for x, y in itertools.combinations(args, 2):
            c, rest = self.linear(x - y)
            if c:
                roots.append(-rest / c)
        out = []
        for a, b in itertools.pairwise(self.chain(roots, lo, hi)):
            mid = (self.pv(a) + self.pv(b)) / 2
            best = (min if is_min else max)(args, key=lambda x, mid=mid: self.pv(x, mid))
            for x in args:
                if not sp.expand(best - x).has(self.q):
                    self.le(best, x) if is_min else self.le(x, best)
            out.append((a, b, best))
        return out

    def compare(self, op: Op, x, y, lo, hi) -> list:
        if isinstance(x, bool):
            return [(lo, hi, (x == y) is (op is Op.EQ))]
        atoms = {Op.LT: [x - y + 1], Op.LE: [x - y], Op.GT: [y - x + 1], Op.GE: [y - x],
                 Op.EQ: [x - y, y - x], Op.NE: [x - y, y - x]}[op]          # each: d <= 0
        tests, cuts = [], []
        for d in atoms:
            c, rest = self.linear(d)
            if c == 0:                                    # decided by the exact bound values
                ok = bool(rest.xreplace(self.exact) <= 0)
                self.le(rest, 0) if ok else self.le(1, rest)
                tests.append(lambda mid, ok=ok: ok)
            else:                                         # q < -rest + 1, or q >= rest
                bound = -rest + 1 if c == 1 else rest
                cuts.append(bound)
                tests.append(lambda mid, b=bound, c=c: (mid < self.pv(b)) == (c == 1))
        out = []
        for a, b in itertools.pairwise(self.chain(cuts, lo, hi)):
            mid = (self.pv(a) + self.pv(b)) / 2
            truth = all(t(mid) for t in tests)
            out.append((a, b, (not truth) if op is Op.NE else truth))
        return out

    def rows_total(self, pieces):
        """Sum over q in [0, N) of the size of the union of the pieces' key sets."""
        total = sp.Integer(0)
        for size in range(1, len(pieces) + 1):
            for subset in itertools.combinations(pieces, size):
                guard = reduce(b_and, [p.guard for p in subset])
                lo = reduce(i_max, [i_max(p.lo, _ZERO) for p in subset])
                hi = reduce(i_min, [i_min(p.hi, _KV_LAST) for p in subset])
                length = i_max(i_add(i_sub(hi, lo), _ONE), _ZERO)
                term = Expr(Op.IF, Type.INT, (guard, length, _ZERO))
                s = sum((sp.summation(v, (self.q, a, b - 1)) for a, b, v in self.seg(term, _Z, self.N)), _Z)
                total += (-1) ** (size + 1) * s
        return sp.expand(total)

    def condition(self):
        """(condition text or None, lower bounds on N, other conditions d <= 0)."""
        lows, others = [], []
        for d in self.conds:
            if d.is_nonpositive:
                continue
            c = d.coeff(self.N, 1)
            if c == 0:
                others.append(d)
            elif c == -1 and not (d + self.N).has(self.N):
                lows.append(d + self.N)                    # N >= d + N
            else:
                raise _NoForm
        lows = [r for r in set(lows) if not any(r != s and (r - s).is_nonpositive for s in lows)]
        others = [d for d in others if not any(d != x and (d - x).is_nonpositive for x in others)]
        texts = [f"N >= {r}" for r in sorted(lows, key=str)]
        for d in sorted(others, key=str):
            pos = sp.Add(*[t for t in sp.Add.make_args(d) if t.could_extract_minus_sign() is False])
            texts.append(f"{pos} <= {pos - d}")
        return (" and ".join(texts) or None), lows, others


# ----------------------------------------------------------------------------- sympy rules
# One rule per op: (summer, e, a, b) -> the segments of e over q in [a, b). An op without a
# closed form here raises _NoForm (//, %, floats, tensors, selectors, k, h and the head counts,
# the bit operators but ~ and << by a constant, ilog2, floor/ceil/round); reductions are
# expanded before analysis (a refusal).


def _sym_const(s: _Summer, e: Expr, a, b) -> list:
    return [(a, b, e.value if isinstance(e.value, bool) else sp.Integer(e.value))]


def _sym_leaf(name: str):
    """q, or N (q_len and kv_len are both N)."""
    def rule(s: _Summer, e: Expr, a, b) -> list:
        return [(a, b, getattr(s, name))]
    return rule


def _sym_param(s: _Summer, e: Expr, a, b) -> list:
    if e.value not in s.syms:
        raise _NoForm
    return [(a, b, s.syms[e.value])]


def _sym_no_leaf(s: _Summer, e: Expr, a, b) -> list:
    raise _NoForm


def _sym_decide(s: _Summer, e: Expr, a, b) -> list:
    """and / or / if: per segment of the first operand, only the operand that decides."""
    op, out = e.op, []
    for lo, hi, c in s.seg(e.args[0], a, b):
        if op is Op.IF:
            out += s.seg(e.args[1] if c else e.args[2], lo, hi)
        else:
            out += [(lo, hi, c)] if c is (op is Op.OR) else s.seg(e.args[1], lo, hi)
    return out


def _pointwise(combine):
    """An op applied to its operands' values, segment by segment after splitting [a, b) at
    every breakpoint of the operands: combine(summer, op, values, lo, hi) -> segments."""
    def rule(s: _Summer, e: Expr, a, b) -> list:
        children = [s.seg(x, a, b) for x in e.args]
        points = s.chain([lo for c in children for lo, _hi, _v in c[1:]], a, b)
        out = []
        for lo, hi in itertools.pairwise(points):
            mid = (s.pv(lo) + s.pv(hi)) / 2
            vals = [next(v for x, y, v in c if s.pv(x) <= mid < s.pv(y)) for c in children]
            out += combine(s, e.op, vals, lo, hi)
        return out
    return rule


def _value(fn):
    return _pointwise(lambda s, op, v, lo, hi: [(lo, hi, fn(v))])


def _no_form(s: _Summer, op: Op, v: list, lo, hi) -> list:
    raise _NoForm


def _shifted(v: list):
    """x << c with a constant count: x * 2**c (a count outside 0..62 is a call error)."""
    if not (v[1].is_Integer and 0 <= v[1] <= MAX_SHIFT):
        raise _NoForm
    return v[0] * 2 ** int(v[1])


_EXTREME = _pointwise(lambda s, op, v, lo, hi: s.extreme([v[0], -v[0]] if op is Op.ABS else v,
                                                          op is Op.MIN, lo, hi))
_COMPARE = _pointwise(lambda s, op, v, lo, hi: s.compare(op, v[0], v[1], lo, hi))
_NONE = _pointwise(_no_form)
SYMPY_RULES = {
    Op.CONST: _sym_const, Op.PARAM: _sym_param, Op.Q: _sym_leaf("q"),
    Op.Q_LEN: _sym_leaf("N"), Op.KV_LEN: _sym_leaf("N"),
    **dict.fromkeys((Op.K, Op.H, Op.HEADS, Op.KV_HEADS, Op.SCORE, Op.ROUTE), _sym_no_leaf),
    Op.IF: _sym_decide, Op.AND: _sym_decide, Op.OR: _sym_decide,
    Op.ADD: _value(lambda v: v[0] + v[1]), Op.SUB: _value(lambda v: v[0] - v[1]),
    Op.MUL: _value(lambda v: v[0] * v[1]), Op.NEG: _value(lambda v: -v[0]),
    Op.NOT: _value(lambda v: not v[0]),
    Op.INVERT: _value(lambda v: -v[0] - 1), Op.LSHIFT: _value(_shifted),
    Op.MIN: _EXTREME, Op.MAX: _EXTREME, Op.ABS: _EXTREME,
    **dict.fromkeys((Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE), _COMPARE),
    **dict.fromkeys((Op.DIV, Op.FLOORDIV, Op.MOD, Op.POW, Op.FLOAT, Op.EXP, Op.LOG, Op.SQRT,
                     Op.TANH, Op.SIGMOID, Op.INDEX, Op.TOPK_BLOCKS, Op.TOPP_BLOCKS,
                     Op.RANDOM_BLOCKS, Op.ERF, Op.EXP2, Op.LOG2, Op.FLOOR, Op.CEIL, Op.ROUND,
                     Op.ILOG2, Op.BIT_AND, Op.BIT_OR, Op.BIT_XOR, Op.RSHIFT), _NONE),
    **dict.fromkeys(EXPANDED_OPS, needs_expansion),
}


def _readable(expr, n):
    """Collected by powers of N with factored coefficients, or factored where that is shorter."""
    poly = sp.Poly(expr, n)
    collected = sp.Add(*[sp.factor(c) * n ** m[0] for m, c in zip(poly.monoms(), poly.coeffs())])
    factored = sp.factor(expr)
    better = factored.is_Mul and len(str(factored)) < len(str(collected)) and str(factored)[0] != "-"
    return factored if better else collected


def _asymptotic(expr, n, syms) -> str:
    poly = sp.Poly(expr, n)
    if poly.is_zero:
        return "O(1)"
    deg, lead = poly.degree(), sp.expand(poly.LC())
    npart = "1" if deg == 0 else "N" if deg == 1 else f"N**{deg}"
    free = [s for s in syms if lead.has(s)]
    if not free:
        return f"O({npart})"
    monoms = sp.Poly(lead, *free).monoms()
    top = max(sum(m) for m in monoms)
    terms = sp.Add(*[sp.Mul(*[s ** k for s, k in zip(free, m)]) for m in monoms if sum(m) == top])
    inner = str(terms) if len(sp.Add.make_args(terms)) == 1 else f"({terms})"
    return f"O({inner})" if deg == 0 else f"O({npart}*{inner})"


def _closed_form(pattern, heads, kv_heads, given):
    """(expr, condition, min N, asymptotic, params) or None; verified against exact counts."""
    values = dict(pattern.values)
    ints = {k: v for k, v in values.items() if type(v) is int}
    kvh = heads if kv_heads is None else kv_heads
    expanded = _expanded(pattern, heads, kvh)
    mask = None if expanded is None else _allowed_upper(expanded, values, heads, kvh, given)
    if mask is None or "N" in ints or mask.uses(Op.INDEX, *SELECTOR_OPS):
        return None
    rest = {k: v for k, v in values.items() if k not in ints}
    groups: dict = {}
    for h in range(heads if mask.uses(Op.H) else 1):
        e = fold(mask, {"h": h, "heads": heads, "kv_heads": kvh}, rest)
        groups[e] = groups.get(e, 0) + (1 if mask.uses(Op.H) else heads)
    if len(groups) > MAX_GROUPS:
        return None
    summer = _Summer(ints)
    try:
        total = sp.Integer(0)
        for e, count in groups.items():
            sets = solve(e, values)
            if not sets.exact or any(p.residue for p in sets.lower) or len(sets.lower) > MAX_PIECES:
                return None
            for name, v in ints.items():               # a parameter's value baked into a bound
                if solve(e, {**values, name: v + 1}).lower != sets.lower:
                    return None
            total += count * summer.rows_total(sets.lower)
        text, lows, others = summer.condition()
    except (_NoForm, ZeroDivisionError, TypeError, ValueError):
        return None
    bound = {s: ints[n] for n, s in summer.syms.items()}
    if any(d.xreplace(bound) > 0 for d in others):
        return None                                     # pragma: no cover - a bug guard
    n0 = max([1] + [int(math.ceil(r.xreplace(bound))) for r in lows])
    if 2 * n0 + 33 > MAX_VERIFY_N:
        return None
    for n in (n0, n0 + 17, 2 * n0 + 33):
        kept, ok = _count(pattern, n, n, heads, kv_heads, given)
        if not ok or total.xreplace({**bound, summer.N: n}) != kept:
            return None
    return (_readable(total, summer.N), text, n0, _asymptotic(total, summer.N, summer.syms.values()),
            tuple(sorted(ints.items())))


def _expanded(pattern, heads, kv_heads):
    """The pattern with its reductions expanded, when no bound of theirs reads the lengths (a
    closed form is in N = q_len = kv_len; the counts it is verified against expand at their own
    lengths), else None."""
    if not has_reductions(pattern.ir):
        return pattern
    if any(n.args[0].uses(Op.Q_LEN, Op.KV_LEN) for r in pattern.ir.roots() for n in r.walk()
           if n.op in REDUCE_OPS):
        return None
    try:
        return pattern.for_sizes(1, 1, heads, kv_heads)
    except AttnCallError:
        return None


def _allowed_upper(pattern, values, heads, kv_heads, given):
    """The mask of the allowed pairs (see allowed.py), or None when only bounds are known."""
    if pattern.ir.score is None:
        return pattern.ir.mask
    tensors = tensor_inputs(pattern.ir, given, None)[0]
    sizes = {"heads": heads, "kv_heads": kv_heads}
    lower, upper = (fold(e, sizes, {}) for e in allowed_bounds(pattern.ir, values, tensors))
    return upper if lower == upper else None


def _estimate(pattern, n, heads, kv_heads, given):
    """The growth exponent of the kept count between N = n and 2n, as 'O(...)', or None."""
    if n == 0 or pattern.ir.mask.uses(Op.INDEX):
        return None
    (a, ok_a), (b, ok_b) = (_count(pattern, m, m, heads, kv_heads, given) for m in (n, 2 * n))
    if not (ok_a and ok_b) or a == 0:
        return "O(1)" if ok_a and ok_b and b == 0 else None
    e = math.log2(b / a)
    if abs(e - round(e)) < 0.2:
        return {0: "O(1)", 1: "O(N)"}.get(round(e), f"O(N**{round(e)})")
    return f"O(N**{e:.2f})"


def cost_report(pattern, q_len: int, kv_len: int, heads: int = 1, block=(128, 128), head_dim: int = 128,
                kv_heads: int | None = None, **tensor_inputs) -> CostReport:
    """The cost of one call of ``pattern`` (a BoundPattern or an ``attndsl.Pattern``); see the
    module docstring for the invariants."""
    pattern = as_bound(pattern)
    desc = api.describe(pattern, q_len, kv_len, heads, block, kv_heads, tensor_inputs)
    kept, exact = _count(pattern, q_len, kv_len, heads, kv_heads, tensor_inputs, desc)
    bq, bk = desc.block
    rs, cs = _tile_sizes(q_len, bq), _tile_sizes(kv_len, bk)
    computed = int(np.einsum("i,hij,j->", rs, (desc.block_map != 0).astype(np.int64), cs))
    total = heads * q_len * kv_len
    form = CLOSED_FORMS.get((pattern.key, heads, kv_heads),
                            lambda: _closed_form(pattern, heads, kv_heads, tensor_inputs))
    expr, cond, n0, asym, params = form or (None, None, None, None, ())
    estimated = expr is None
    if estimated:
        asym = _estimate(pattern, max(q_len, kv_len), heads, kv_heads, tensor_inputs)
    return CostReport(
        kept_pairs=kept, total_pairs=total, density=kept / total if total else 0.0,
        flops=4 * head_dim * kept, dense_flops=4 * head_dim * total, computed_pairs=computed,
        wasted_fraction=1.0 - kept / computed if computed else 0.0,
        closed_form=None if expr is None else str(expr), closed_form_expr=expr,
        closed_form_condition=cond, closed_form_min_n=n0, asymptotic=asym,
        asymptotic_estimated=estimated and asym is not None, exact=exact, params=params)
