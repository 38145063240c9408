"""The derivative of a score clause with respect to ``score``, as IR.

Input: the checked IR of a score clause (an :class:`~attndsl.ir.Expr` whose ``Op.SCORE`` leaf is
the scaled dot product) and optionally the pattern's parameter values. Output
(:func:`score_derivative`): an IR expression of type FLOAT, built from the same node classes and
ops, that computes d(score clause)/d(score) at every (h, q, k) pair. It is printable by
:mod:`attndsl.printer` (negative constants are written ``-c``, as the checker builds them, so the
text parses and checks back to the same IR), evaluated by :mod:`attndsl.interp`, and lowered by
the same passes as the clause itself (codegen/lower.py ``score_grad_hook``, codegen/torch_lower.py
``score_grad``). Every node it creates carries the source span of the node whose rule created it.
:func:`is_identity_derivative` says whether the derivative is the constant 1.0 (``score + bias``,
ALiBi), so that a backward kernel can skip the hook.

Rules (one per op in :data:`DERIVATIVE_RULES`, the op registry's derivative table). ``SCORE`` has
derivative 1; every other leaf (literals, parameters, positions, sizes), every int- or
bool-typed node, tensor reads (``INDEX``: the clause's tensor inputs are constants here) and
selectors have derivative 0, and so has ``float(...)``, whose operand is an int. The float ops
follow calculus: sum, difference, product and quotient rules; ``a ** b`` gives
``b * a ** (b - 1) * da + a ** b * log(a) * db``, emitting only the terms whose factor ``da``
or ``db`` is not zero; ``exp``, ``log``, ``sqrt``, ``tanh``, ``sigmoid``, ``exp2`` and
``log2`` their usual derivatives written with the node itself (``tanh``: ``(1 - t * t) * da``,
``exp2``: ``e * 0.693... * da``), ``erf(a)`` gives ``1.128... * exp(-(a * a)) * da``
(2 / sqrt(pi)); the float -> int functions, ``ilog2`` and the bit operators are int-valued
(derivative 0, their operands never read the score: the checker refuses it); ``abs(a)`` gives
``-da if a < 0.0 else da``; ``if`` the derivative of the branch it takes (the condition is not
differentiated: the clause is piecewise, each piece differentiated), and where one branch is
the constant ``-inf`` simply the other branch's (the dropped pairs never read it) unless that
reads a tensor input (the condition may guard its index); n-ary
``min``/``max`` the derivative of the operand the value selects, folded left like the value
(``min(a, b, c) = min(min(a, b), c)``) with ties going to the earlier operand. Nodes are
simplified as they are built (``0 + x -> x``, ``1 * x -> x``, ``0 * x -> 0``, ``x ** 1.0 -> x``,
``if`` with equal branches -> the branch) and constant sub-expressions are folded with the
interpreter (parameters too when their values are given), so ``score + rel[h, q - k]`` and
``score - slope * float(q - k)`` have the derivative ``1.0`` exactly.

Semantics at non-finite and non-smooth points: the derivative is only *read* at allowed pairs
(the mask holds and the clause's value is not ``-inf``); the backward kernels zero dS at every
other pair, so the derivative's value there (of a ``-inf`` branch, or at masked pairs) does not
matter. Evaluating it never raises: it reads only the sub-expressions the clause itself reads,
under the same ``if``/``and``/``or`` conditions, and float exceptions give inf/NaN as IEEE
arithmetic does. At a kink (``abs`` at 0, ``min``/``max`` at a tie, an ``if`` on the score at its
boundary) it is the one-sided derivative of the selected piece.

Reductions (``any``, ``sum``, ... and their loop variable) have no rule: a call expands them
(attndsl/expand.py) before anything is differentiated, and their entry raises ValueError.
"""

from __future__ import annotations

import math

from .errors import Span
from .interp import evaluate_scalar
from .ir import Expr, Op, Type
from .ops import CONSTANT_OPS

F, B = Type.FLOAT, Type.BOOL


def _value(e: Expr) -> float | None:
    """The value of a float literal, or of a negated one (how the checker writes ``-c``)."""
    if e.op is Op.CONST and e.type is F:
        return float(e.value)
    if e.op is Op.NEG and e.args[0].op is Op.CONST and e.args[0].type is F:
        return -float(e.args[0].value)
    return None


def _literal(v: float, span: Span) -> Expr:
    """A float literal node, negative values as ``-(c)``; -0.0 is written 0.0 (a derivative)."""
    if v == 0.0:
        v = 0.0
    if v < 0.0:
        return Expr(Op.NEG, F, (Expr(Op.CONST, F, (), -v, span),), None, span)
    return Expr(Op.CONST, F, (), v, span)


def _is(e: Expr, v: float) -> bool:
    return _value(e) == v


class _Builder:
    """Builds simplified, folded float nodes. ``values``: parameter values (None: parameters are
    not folded). ``constant`` remembers, per node id, whether a node is a foldable constant."""

    def __init__(self, values: dict | None):
        self.values = values
        self.constant: dict[int, bool] = {}
        self.tensor: dict[int, bool] = {}   # id -> the node reads a tensor input (INDEX)
        self.keep: list[Expr] = []          # keeps nodes alive so their ids stay unique

    def reads_tensor(self, e: Expr) -> bool:
        """Whether ``e`` reads a tensor input (memoised: operands are met before their users)."""
        got = self.tensor.get(id(e))
        if got is None:
            got = e.op is Op.INDEX or any(self.reads_tensor(a) for a in e.args)
            self.tensor[id(e)] = got
            self.keep.append(e)
        return got

    def is_constant(self, e: Expr) -> bool:
        got = self.constant.get(id(e))
        if got is None:                     # a node made here: its operands are known
            got = self._constant_of(e)
        return got

    def _constant_of(self, e: Expr) -> bool:
        if e.op is Op.PARAM:
            got = self.values is not None
        else:
            got = e.op in CONSTANT_OPS and all(self.is_constant(a) for a in e.args)
        self.constant[id(e)] = got
        self.keep.append(e)
        return got

    def folded(self, e: Expr) -> Expr:
        """``e``, or its value as a literal when it is a float constant expression (NaN and
        values the interpreter cannot give as a float are left unfolded)."""
        if e.type is not F or not e.args and e.op is not Op.PARAM or not self.is_constant(e):
            return e
        if _value(e) is not None:
            return e
        try:
            v = float(evaluate_scalar(e, self.values or {}))
        except (ArithmeticError, TypeError, ValueError, KeyError):   # pragma: no cover
            return e
        return e if math.isnan(v) else _literal(v, e.span)

    def node(self, op: Op, args: tuple, span: Span, kind: Type = F) -> Expr:
        return self.folded(Expr(op, kind, args, None, span))

    # simplifying constructors of float nodes
    def zero(self, span: Span) -> Expr:
        return _literal(0.0, span)

    def one(self, span: Span) -> Expr:
        return _literal(1.0, span)

    def neg(self, a: Expr, span: Span) -> Expr:
        v = _value(a)
        if v is not None:
            return _literal(-v, span)
        if a.op is Op.NEG:
            return a.args[0]
        return Expr(Op.NEG, F, (a,), None, span)

    def add(self, a: Expr, b: Expr, span: Span) -> Expr:
        if _is(a, 0.0):
            return b
        if _is(b, 0.0):
            return a
        return self.node(Op.ADD, (a, b), span)

    def sub(self, a: Expr, b: Expr, span: Span) -> Expr:
        if _is(b, 0.0):
            return a
        if _is(a, 0.0):
            return self.neg(b, span)
        return self.node(Op.SUB, (a, b), span)

    def mul(self, a: Expr, b: Expr, span: Span) -> Expr:
        if _is(a, 0.0) or _is(b, 0.0):
            return self.zero(span)
        if _is(a, 1.0):
            return b
        if _is(b, 1.0):
            return a
        if _is(a, -1.0):
            return self.neg(b, span)
        if _is(b, -1.0):
            return self.neg(a, span)
        return self.node(Op.MUL, (a, b), span)

    def div(self, a: Expr, b: Expr, span: Span) -> Expr:
        if _is(a, 0.0):
            return self.zero(span)
        if _is(b, 1.0):
            return a
        return self.node(Op.DIV, (a, b), span)

    def pow(self, a: Expr, b: Expr, span: Span) -> Expr:
        if _is(b, 1.0):
            return a
        return self.node(Op.POW, (a, b), span)

    def call(self, op: Op, a: Expr, span: Span) -> Expr:
        return self.node(op, (a,), span)

    def where(self, cond: Expr, a: Expr, b: Expr, span: Span) -> Expr:
        if a == b:
            return a
        if cond.op is Op.CONST:
            return a if cond.value else b
        return Expr(Op.IF, F, (cond, a, b), None, span)


# ----------------------------------------------------------------------------- rules
#
# A rule is ``rule(b, node, args, d) -> Expr``: ``b`` the builder, ``node`` the float node being
# differentiated (it depends on the score), ``args`` its operands (constant ones folded), ``d``
# their derivatives (zero for operands that are not float). It is only called for FLOAT nodes
# that depend on the score; every other node has derivative 0.


def _zero(b, node, args, d):
    return b.zero(node.span)


def _one(b, node, args, d):
    return b.one(node.span)


def _neg(b, node, args, d):
    return b.neg(d[0], node.span)


def _add(b, node, args, d):
    return b.add(d[0], d[1], node.span)


def _sub(b, node, args, d):
    return b.sub(d[0], d[1], node.span)


def _mul(b, node, args, d):
    s = node.span
    return b.add(b.mul(d[0], args[1], s), b.mul(args[0], d[1], s), s)


def _div(b, node, args, d):
    # (da * y - x * dy) / y**2 written da / y - (x / y) * dy / y: no y * y overflow
    s = node.span
    x, y = args
    first = b.div(d[0], y, s)
    if _is(d[1], 0.0):
        return first
    return b.sub(first, b.div(b.mul(b.div(x, y, s), d[1], s), y, s), s)


def _pow(b, node, args, d):
    s = node.span
    x, y = args
    base = b.mul(b.mul(y, b.pow(x, b.sub(y, b.one(s), s), s), s), d[0], s) if not _is(d[0], 0.0) \
        else b.zero(s)
    expo = b.mul(b.mul(node, b.call(Op.LOG, x, s), s), d[1], s) if not _is(d[1], 0.0) \
        else b.zero(s)
    return b.add(base, expo, s)


def _if(b, node, args, d):
    # a branch whose value is -inf drops its pairs: its derivative is never read there, so the
    # other branch's serves everywhere (``score + bias if near else -inf`` gives 1.0) -- unless
    # that one reads a tensor, whose index the condition may guard
    for dropped, kept in ((1, 2), (2, 1)):
        if _is(args[dropped], -math.inf) and not b.reads_tensor(d[kept]):
            return d[kept]
    return b.where(args[0], d[1], d[2], node.span)


def _abs(b, node, args, d):
    s = node.span
    negative = Expr(Op.LT, B, (args[0], b.zero(s)), None, s)
    return b.where(negative, b.neg(d[0], s), d[0], s)


def _extremum(compare: Op):
    """min (``compare`` <=) or max (>=): the derivative of the operand the fold selects."""
    def rule(b, node, args, d):
        s = node.span
        value, grad = args[0], d[0]
        for x, dx in zip(args[1:], d[1:]):
            grad = b.where(Expr(compare, B, (value, x), None, s), grad, dx, s)
            value = Expr(node.op, F, (value, x), None, s)
        return grad
    return rule


def _exp(b, node, args, d):
    return b.mul(node, d[0], node.span)


def _log(b, node, args, d):
    return b.div(d[0], args[0], node.span)


def _sqrt(b, node, args, d):
    s = node.span
    return b.div(d[0], b.mul(_literal(2.0, s), node, s), s)


def _tanh(b, node, args, d):
    s = node.span
    return b.mul(b.sub(b.one(s), b.mul(node, node, s), s), d[0], s)


def _sigmoid(b, node, args, d):
    s = node.span
    return b.mul(b.mul(node, b.sub(b.one(s), node, s), s), d[0], s)


def _erf(b, node, args, d):
    # 2 / sqrt(pi) * exp(-(a * a)) * da
    s = node.span
    a = args[0]
    bell = b.call(Op.EXP, b.neg(b.mul(a, a, s), s), s)
    return b.mul(b.mul(_literal(2.0 / math.sqrt(math.pi), s), bell, s), d[0], s)


def _exp2(b, node, args, d):
    s = node.span
    return b.mul(b.mul(node, _literal(math.log(2.0), s), s), d[0], s)


def _log2(b, node, args, d):
    s = node.span
    return b.div(d[0], b.mul(args[0], _literal(math.log(2.0), s), s), s)


def _expanded(b, node, args, d):
    """A reduction or its loop variable: expanded before anything is differentiated."""
    raise ValueError(f"'{node.op.value}' must be expanded (attndsl/expand.py) before the score "
                     "clause is differentiated")


DERIVATIVE_RULES = {
    Op.CONST: _zero,
    Op.PARAM: _zero,
    Op.Q: _zero,
    Op.K: _zero,
    Op.H: _zero,
    Op.Q_LEN: _zero,
    Op.KV_LEN: _zero,
    Op.HEADS: _zero,
    Op.KV_HEADS: _zero,
    Op.SCORE: _one,
    Op.NEG: _neg,
    Op.ADD: _add,
    Op.SUB: _sub,
    Op.MUL: _mul,
    Op.DIV: _div,
    Op.FLOORDIV: _zero,             # int
    Op.MOD: _zero,                  # int
    Op.POW: _pow,
    Op.LT: _zero,                   # bool
    Op.LE: _zero,
    Op.GT: _zero,
    Op.GE: _zero,
    Op.EQ: _zero,
    Op.NE: _zero,
    Op.NOT: _zero,
    Op.AND: _zero,
    Op.OR: _zero,
    Op.IF: _if,
    Op.ABS: _abs,
    Op.MIN: _extremum(Op.LE),
    Op.MAX: _extremum(Op.GE),
    Op.FLOAT: _zero,                # its operand is an int
    Op.EXP: _exp,
    Op.LOG: _log,
    Op.SQRT: _sqrt,
    Op.TANH: _tanh,
    Op.SIGMOID: _sigmoid,
    Op.ERF: _erf,
    Op.EXP2: _exp2,
    Op.LOG2: _log2,
    Op.FLOOR: _zero,                # int
    Op.CEIL: _zero,                 # int
    Op.ROUND: _zero,                # int
    Op.ILOG2: _zero,                # int
    Op.BIT_AND: _zero,              # int
    Op.BIT_OR: _zero,
    Op.BIT_XOR: _zero,
    Op.LSHIFT: _zero,
    Op.RSHIFT: _zero,
    Op.INVERT: _zero,
    Op.ANY: _expanded,              # reductions: expanded per call before differentiation
    Op.ALL: _expanded,
    Op.SUM: _expanded,
    Op.REDUCE_MAX: _expanded,
    Op.REDUCE_MIN: _expanded,
    Op.VAR: _expanded,
    Op.INDEX: _zero,                # tensor inputs are constants of the clause
    Op.TOPK_BLOCKS: _zero,          # selectors are not differentiated
    Op.TOPP_BLOCKS: _zero,
    Op.ROUTE: _zero,
    Op.RANDOM_BLOCKS: _zero,
}


def score_derivative(score_ir: Expr, values: dict | None = None) -> Expr:
    """d(score_ir)/d(score) as a FLOAT IR expression (see the module docstring).

    ``values``: the parameters' values; when given, constant expressions over parameters are
    folded too (the lowerings fold them anyway). The walk is iterative and visits each distinct
    node once (a shared sub-tree is differentiated once), so the result has O(nodes) nodes.
    Only meaningful at allowed pairs: the kernels zero dS elsewhere.
    """
    b = _Builder(values)
    depends: dict[int, bool] = {}           # id -> the node reads the score
    grads: dict[int, Expr] = {}             # id -> derivative (float nodes reading the score)
    folded: dict[int, Expr] = {}            # id -> an operand, a constant float one folded
    stack = [(score_ir, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in depends:
            continue
        if not ready:
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(node.args) if id(c) not in depends)
            continue
        depends[id(node)] = node.op is Op.SCORE or any(depends[id(c)] for c in node.args)
        b.is_constant(node)                 # children first: known for every operand
        b.reads_tensor(node)
        if node.type is F and depends[id(node)]:
            for c in node.args:             # each operand folded once (a walk of its own)
                if id(c) not in folded:
                    folded[id(c)] = b.folded(c)
            args = tuple(folded[id(c)] for c in node.args)
            d = tuple(grads.get(id(c)) or b.zero(node.span) for c in node.args)
            grads[id(node)] = DERIVATIVE_RULES[node.op](b, node, args, d)
    return grads.get(id(score_ir)) or b.zero(score_ir.span)


def is_identity_derivative(expr: Expr) -> bool:
    """Whether a derivative (from :func:`score_derivative`) is the constant 1.0: the score clause
    adds a score-independent term to ``score``, and dS passes through unchanged."""
    return expr.op is Op.CONST and expr.type is F and expr.value == 1.0
