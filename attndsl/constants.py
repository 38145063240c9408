"""Compile-time constants: which expressions are constant, and the checks on their values.

Divisors of ``//``/``%`` must be > 0; selector arguments have ranges. A check that depends on
a required parameter is done when that parameter is bound (``Pattern.bind``); the error then
points at the same source location as it would at compile time.
"""

from __future__ import annotations

from .errors import AttnError, AttnTypeError, ErrorSink
from .ir import Expr, Op, PatternIR

# (CONSTANT_OPS: the pure ops, constant when their operands are)
from .ops import CALL_CONSTANT_OPS, CONSTANT_OPS, MAX_RANGE, REDUCE_OPS

__all__ = ["CALL_CONSTANT_OPS", "CONSTANT_OPS", "call_constant_sites", "check_constants",
           "constant_sites", "is_call_constant", "is_constant"]


def is_constant(expr: Expr) -> bool:
    """True when the value is known at compile time: only literals, parameters and pure ops."""
    return all(n.op in CONSTANT_OPS for n in expr.walk())


def is_call_constant(expr: Expr) -> bool:
    """True when the value is known once a call's sizes are: literals, parameters, ``q_len``,
    ``kv_len``, ``heads``, ``kv_heads`` and pure ops (the divisors of ``//`` and ``%``)."""
    return all(n.op in CALL_CONSTANT_OPS for n in expr.walk())


def _params_of(expr: Expr) -> set[str]:
    return {n.value for n in expr.walk() if n.op is Op.PARAM}


# (op, argument position) -> (predicate on the value, what the value must be)
_RANGES = {
    (Op.FLOORDIV, 1): (lambda v: v > 0, "the divisor of '//' must be greater than 0"),
    (Op.MOD, 1): (lambda v: v > 0, "the divisor of '%' must be greater than 0"),
    (Op.TOPK_BLOCKS, 0): (lambda v: v > 0, "topk_blocks: n must be greater than 0"),
    (Op.TOPK_BLOCKS, 1): (lambda v: v > 0, "topk_blocks: the block size b must be greater than 0"),
    (Op.TOPP_BLOCKS, 0): (lambda v: 0.0 < v <= 1.0, "topp_blocks: p must be in (0, 1]"),
    (Op.TOPP_BLOCKS, 1): (lambda v: v > 0, "topp_blocks: the block size b must be greater than 0"),
    (Op.RANDOM_BLOCKS, 0): (lambda v: v >= 0, "random_blocks: r must not be negative"),
    (Op.RANDOM_BLOCKS, 1): (lambda v: v > 0, "random_blocks: the block size b must be greater than 0"),
    **{(op, 0): (lambda v: 0 <= v <= MAX_RANGE, f"range(N): N must be between 0 and {MAX_RANGE}")
       for op in REDUCE_OPS},
}


def _range_sites(ir: PatternIR):
    """Every (operand, predicate, message) of the pattern that :data:`_RANGES` constrains."""
    seen: set[int] = set()
    for root in ir.roots():
        for node in root.walk():
            if id(node) in seen:
                continue
            seen.add(id(node))
            for pos, arg in enumerate(node.args):
                rule = _RANGES.get((node.op, pos))
                if rule is not None:
                    yield arg, rule[0], rule[1]


def constant_sites(ir: PatternIR):
    """Every (constant expression, predicate, message) the pattern's values must satisfy."""
    return ((arg, ok, msg) for arg, ok, msg in _range_sites(ir) if is_constant(arg))


def call_constant_sites(ir: PatternIR):
    """Every (divisor or range bound, predicate, message) whose value depends on the call's
    sizes: checked for each call (:meth:`attndsl.bound.BoundPattern.check_sizes`). A site
    that reads a loop variable is checked where its reduction is expanded (attndsl/expand.py)."""
    return ((arg, ok, msg) for arg, ok, msg in _range_sites(ir)
            if not is_constant(arg) and not arg.uses(Op.VAR))


def range_sites(ir: PatternIR):
    """Every (operand, predicate, message) of the pattern that must hold at a call."""
    return _range_sites(ir)


def check_constants(ir: PatternIR, values: dict, source: str | None, partial: bool = False) -> None:
    """Raise AttnTypeError (all failures together) for constants out of range.

    With ``partial``, sites that depend on a parameter without a value are skipped.
    """
    from .interp import evaluate_scalar  # local: interp is heavier and imports program helpers

    sink = ErrorSink(source or "")
    for expr, ok, message in constant_sites(ir):
        if partial and not _params_of(expr) <= set(values):
            continue
        try:
            value = evaluate_scalar(expr, values)
        except AttnError as err:  # pragma: no cover - constant expressions cannot fail
            sink.errors.append(err)
            continue
        if not ok(value):
            sink.add(AttnTypeError, f"{message}, got {value}", expr.span)
    if sink.errors and source is None:
        for e in sink.errors:
            e.source = None
    sink.raise_if_any()
