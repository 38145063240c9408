"""The statically allowed pairs: the mask and a condition under which the score is not -inf.

LANGUAGE.md section 1: a pair is allowed when the mask holds *and* the score clause is not
``-inf``. A score clause may remove pairs by position (``score if abs(q - k) <= 8 else -inf``),
so tile classes must account for it to be sound. Input: a checked pattern, its parameter values
and the call's tensor inputs. Output: two bool IR expressions free of ``score``: ``lower``
implies "allowed" (``mask and finite(score clause)``) and ``upper`` is implied by it (``mask``
and the branch conditions that avoid a literal ``-inf``). Empty tiles are proved on ``upper``,
full tiles on ``lower``; the two are equal for position-dependent ``score if c else -inf``.

``finite(e)`` is a sufficient condition for ``e`` not to be +-inf, given a finite ``score``:
arithmetic on finite values is taken not to overflow (documented in docs/language.md); ``erf`` is
always finite; ``log``, ``log2``, ``/`` and ``**`` add the conditions that keep them finite when
those are free of ``score``, otherwise the pair is not claimed; a float tensor is finite when
all its elements are. With ``tensors=None`` (values unknown, as for tile lists built on the
device) each element read is tested where it is read instead: ``abs(t[i]) < inf``, an
expression of the pair.
"""

from __future__ import annotations

import math

import numpy as np

from ..constants import is_constant
from ..interp import evaluate_scalar
from ..ir import Expr, Op, PatternIR, Type, const
from .fold import fold
from .pieces import FALSE, TRUE, b_and, b_not, b_or

_PASS = {Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.ABS, Op.MIN, Op.MAX, Op.FLOAT, Op.EXP, Op.SQRT,
         Op.TANH, Op.SIGMOID, Op.EXP2}
_ZERO = const(0.0)


def _cmp(op: Op, a: Expr, b: Expr) -> Expr:
    return Expr(op, Type.BOOL, (a, b))


def finite(e: Expr, values: dict, tensors: dict | None) -> Expr:
    """A score-free bool expression implying that the float expression e is not +-inf
    (``tensors`` None: tensor reads are tested at the pair, see the module docstring)."""
    if e.type is not Type.FLOAT or e.op is Op.SCORE:
        return TRUE
    if e.op is Op.CONST:
        return const(math.isfinite(e.value))
    if e.op is Op.PARAM:
        return const(math.isfinite(values[e.value]))
    if e.op is Op.INDEX:
        if tensors is None:
            return Expr(Op.LT, Type.BOOL, (Expr(Op.ABS, Type.FLOAT, (e,)), const(math.inf)))
        t = tensors.get(e.value)
        return const(t is not None and bool(np.isfinite(np.asarray(t, np.float64)).all()))
    if e.op is Op.ERF:                              # within [-1, 1] (or NaN), whatever its operand
        return TRUE
    args = [finite(a, values, tensors) for a in e.args]
    if e.op in _PASS:
        out = TRUE
        for a in args:
            out = b_and(out, a)
        return out
    if e.op is Op.IF:
        c, a, b = e.args
        if c.uses(Op.SCORE):
            return b_and(args[1], args[2])
        return b_or(b_and(c, args[1]), b_and(b_not(c), args[2]))
    if e.op in (Op.LOG, Op.LOG2, Op.DIV, Op.POW):
        guarded = e.args[0] if e.op is not Op.DIV else e.args[1]
        if guarded.uses(Op.SCORE):
            return FALSE
        keep = _cmp(Op.GT if e.op in (Op.LOG, Op.LOG2) else Op.NE, guarded, _ZERO)
        if is_constant(keep):           # decided by the parameters alone: 1.0 / cap
            keep = const(bool(evaluate_scalar(keep, values)))
        out = keep
        for a in args:
            out = b_and(out, a)
        return out
    return FALSE                                     # pragma: no cover - every float op above


def not_minus_inf(e: Expr) -> Expr:
    """A score-free bool expression implied by ``e != -inf`` (given a finite score)."""
    if e.type is not Type.FLOAT:
        return TRUE
    if e.op is Op.CONST:
        return const(e.value != -math.inf)
    if e.op is Op.IF and not e.args[0].uses(Op.SCORE):
        c, a, b = e.args
        return b_or(b_and(c, not_minus_inf(a)), b_and(b_not(c), not_minus_inf(b)))
    if e.op is Op.MIN:                       # min is -inf when any argument is
        out = TRUE
        for a in e.args:
            out = b_and(out, not_minus_inf(a))
        return out
    return TRUE


def allowed_bounds(ir: PatternIR, values: dict, tensors: dict | None) -> tuple[Expr, Expr]:
    """(lower, upper): bool expressions with lower => allowed => upper at every pair
    (``tensors`` None: float tensor reads of the score are tested at each pair, see finite).

    Both are the mask when there is no score clause; they are equal whenever the score clause
    reaches -inf only through position-dependent branches (``score if c else -inf``).
    """
    if ir.score is None:
        return ir.mask, ir.mask
    score = fold(ir.score, {}, {})                  # -inf is NEG(inf) until folded
    return (b_and(ir.mask, finite(score, values, tensors)),
            b_and(ir.mask, not_minus_inf(score)))
