"""Reduction expansion: a pattern's bounded reductions -> plain and/or/+/max/min chains.

Input: a checked :class:`~attndsl.ir.PatternIR`, its parameter values and one call's sizes
(``q_len``, ``kv_len``, ``heads``, ``kv_heads``). Output: a PatternIR meaning the same at those
sizes with no :data:`~attndsl.ops.EXPANDED_OPS` node left: every ``any/all/sum/max/min(E for i
in range(N))`` is replaced by its items ``E[i := 0] .. E[i := N-1]`` (the loop variable
becomes an int literal) joined as the interpreter defines them (attndsl/interp.py, the
meaning, which evaluates reductions with real loops):

* ``any`` / ``all``: an ``or`` / ``and`` chain (false / true when empty) as a balanced tree
  (an expansion adds at most log2(MAX_RANGE) = 8 levels per reduction to the IR's height); a
  later item is evaluated only where the earlier ones did not decide, as in the interpreter;
* ``sum``: ``0 + (items added as a balanced tree)`` (0 or 0.0 by type; the leading zero makes a
  sum of ``-0.0`` items ``0.0``, as Python's ``sum``); float items may be added in another
  order than the interpreter's left-to-right loop, a difference of rounding only;
* ``max`` / ``min``: one variadic max / min (an empty range is an AttnCallError at the
  reduction).

Bounds are evaluated outside in (``range(i)`` nests), each checked 0 <= N <= MAX_RANGE at its
location; every divisor and bound that reads a loop variable is checked at this call once it
is a literal (attndsl/constants.py). An expansion of more than MAX_TREE_SIZE nodes is an
AttnCallError at the outermost reduction. Sub-trees without reductions are kept as they are
(shared), so analysis and lowering of the result cost what its distinct nodes do.

Later stages (analysis, planning, the Triton and torch lowerings, derivatives) only ever see
expanded IR: :meth:`attndsl.bound.BoundPattern.for_sizes` applies this per call.
"""

from __future__ import annotations

from dataclasses import replace

from .constants import is_call_constant, range_sites
from .errors import AttnCallError, source_for
from .interp import call_sizes_text, checked_bound, empty_range_error, evaluate_scalar
from .ir import Expr, Op, PatternIR, Type, const
from .limits import balanced
from .ops import EXPANDED_OPS

MAX_EXPANDED_NODES = 200_000         # as the checker's MAX_TREE_SIZE for one pattern
_SIZES = ("q_len", "kv_len", "heads", "kv_heads")


def has_reductions(ir: PatternIR) -> bool:
    """Whether the pattern has a reduction (its IR differs per call's sizes once expanded)."""
    return any(r.uses(*EXPANDED_OPS) for r in ir.roots())


def expand_reductions(ir: PatternIR, values: dict, sizes: dict) -> PatternIR:
    """``ir`` with every reduction expanded at these sizes (see the module docstring)."""
    if not has_reductions(ir):
        return ir
    run = _Expansion(dict(values), {n: int(sizes[n]) for n in _SIZES})
    mask = run.expand(ir.mask, {}, {})
    score = None if ir.score is None else run.expand(ir.score, {}, {})
    out = replace(ir, mask=mask, score=score)
    if any(arg.uses(Op.VAR) for arg, _ok, _message in range_sites(ir)):
        run.check_sites(out)    # (the other sites are checked per call: BoundPattern.check_sizes)
    return out


def _error(message: str, node: Expr) -> AttnCallError:
    return AttnCallError(message, node.span, source_for(node.span.filename))


class _Expansion:
    """One expansion: the values the bounds read, the count of nodes built so far."""

    def __init__(self, values: dict, sizes: dict):
        self.values = values
        self.sizes = sizes
        self.built = 0
        self.outermost: Expr | None = None
        self._reads: dict[int, bool] = {}   # id(node) -> whether a reduction or VAR is under it
        self._keep: list[Expr] = []         # keeps those nodes alive (their ids stay unique)

    def _has(self, node: Expr) -> bool:
        got = self._reads.get(id(node))
        if got is None:
            got = node.uses(*EXPANDED_OPS)
            self._reads[id(node)] = got
            self._keep.append(node)
        return got

    def _count(self, node: Expr) -> None:
        self.built += 1
        if self.built > MAX_EXPANDED_NODES:
            where = self.outermost or node
            raise _error(f"this reduction expands to more than {MAX_EXPANDED_NODES} nodes at "
                         f"this call ({self._shown()}); use smaller ranges", where)

    def _shown(self) -> str:
        return call_sizes_text(self.sizes)

    def expand(self, node: Expr, env: dict[int, int], memo: dict[int, Expr]) -> Expr:
        """``node`` with the loop variables of ``env`` (depth -> value) replaced and its
        reductions expanded; ``memo`` (by node identity) belongs to this ``env``."""
        if not self._has(node):
            return node
        got = memo.get(id(node))
        if got is not None:
            return got
        if node.op is Op.VAR:
            out = const(env[node.value], node.span)
        elif node.op in EXPANDED_OPS:
            top = self.outermost is None
            if top:
                self.outermost = node
            try:
                out = self._reduction(node, env, memo)
            finally:
                if top:
                    self.outermost = None
        else:
            args = tuple(self.expand(a, env, memo) for a in node.args)
            out = Expr(node.op, node.type, args, node.value, node.span)
        self._count(out)
        memo[id(node)] = out
        return out

    def _reduction(self, node: Expr, env: dict, memo: dict) -> Expr:
        bound, body = node.args
        n = self._bound(self.expand(bound, env, memo), bound)
        # a fresh memo per iteration: the body's nodes read this iteration's variable
        items = [self.expand(body, {**env, node.value: i}, {}) for i in range(n)]
        return _join(node, items)

    def _bound(self, expr: Expr, at: Expr) -> int:
        return checked_bound(evaluate_scalar(expr, self.values, self.sizes), at, self.sizes)

    def check_sites(self, ir: PatternIR) -> None:
        """Every divisor and selector argument of the expanded pattern that is known at this
        call holds (run when some of them read a loop variable: not checkable before)."""
        for expr, ok, message in range_sites(ir):
            if is_call_constant(expr):
                value = evaluate_scalar(expr, self.values, self.sizes)
                if not ok(value):
                    raise _error(f"{message}, got {value} at this call ({self._shown()})", expr)


def _join(node: Expr, items: list[Expr]) -> Expr:
    """The items of reduction ``node`` joined by its operator (see the module docstring)."""
    op, span, kind = node.op, node.span, node.type
    if op in (Op.ANY, Op.ALL):
        if not items:
            return const(op is Op.ALL, span)
        return balanced(Op.OR if op is Op.ANY else Op.AND, items, span)
    if op is Op.SUM:
        zero = const(0.0 if kind is Type.FLOAT else 0, span)
        if not items:
            return zero
        total = _balanced_sum(items, kind, span)
        return Expr(Op.ADD, kind, (zero, total), None, span) if kind is Type.FLOAT else total
    if not items:
        raise empty_range_error(node)
    if len(items) == 1:
        return items[0]
    return Expr(Op.MAX if op is Op.REDUCE_MAX else Op.MIN, kind, tuple(items), None, span)


def _balanced_sum(items: list[Expr], kind: Type, span) -> Expr:
    if len(items) == 1:
        return items[0]
    mid = len(items) // 2
    return Expr(Op.ADD, kind, (_balanced_sum(items[:mid], kind, span),
                               _balanced_sum(items[mid:], kind, span)), None, span)
