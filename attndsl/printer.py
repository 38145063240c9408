"""The pretty-printer: IR -> .attn text that parses and checks back to the same IR.

Deterministic: the output depends only on the IR (and parameter values), with the fewest
parentheses the precedence levels allow. Lets and defs are already inlined in the IR, so a
printed pattern is a single ``mask`` (and ``score``) clause.

Input: an :class:`~attndsl.ir.Expr` or :class:`~attndsl.ir.PatternIR`; output: text. One rule
per op in :data:`PRINT_RULES`, chosen by the op's printing form in the registry
(:mod:`attndsl.ops`), which also gives its spelling and precedence.
"""

from __future__ import annotations

import math

from .ir import Expr, PatternIR, Type
from .ops import OPS, Prec


def format_value(v) -> str:
    """A Python scalar as .attn literal text (negative numbers with a leading '-')."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    return str(v)


def _wrap(text: str, level: int, min_level: int) -> str:
    return f"({text})" if level < min_level else text


def print_expr(e: Expr, min_level: int = Prec.IF, var: str = "i") -> str:
    """The text of ``e``, parenthesised when its level is below ``min_level``; a reduction's
    loop variable at binder depth ``d`` is written ``{var}{d}`` (:func:`print_pattern` picks a
    ``var`` no parameter name can clash with)."""
    return PRINT_RULES[e.op](e, min_level, var)


# one rule per printing form (attndsl.ops.FORMS); spelling and levels come from the registry


def _literal(e: Expr, min_level: int, var: str) -> str:
    text = format_value(e.value)
    return _wrap(text, Prec.UNARY if text.startswith("-") else Prec.ATOM, min_level)


def _param(e: Expr, min_level: int, var: str) -> str:
    return str(e.value)


def _name(e: Expr, min_level: int, var: str) -> str:
    return OPS[e.op].spelling


def _infix(e: Expr, min_level: int, var: str) -> str:
    info = OPS[e.op]
    a, b = e.args
    return _wrap(f"{print_expr(a, info.left, var)} {info.spelling} {print_expr(b, info.right, var)}",
                 info.level, min_level)


def _prefix(e: Expr, min_level: int, var: str) -> str:
    info = OPS[e.op]                        # a keyword ('not') is followed by a space
    sep = " " if info.spelling.isalpha() else ""
    return _wrap(info.spelling + sep + print_expr(e.args[0], info.right, var), info.level, min_level)


def _if(e: Expr, min_level: int, var: str) -> str:
    info = OPS[e.op]
    c, a, b = e.args
    text = (f"{print_expr(a, info.left, var)} if {print_expr(c, info.left, var)} else "
            f"{print_expr(b, info.right, var)}")
    return _wrap(text, info.level, min_level)


def _call(e: Expr, min_level: int, var: str) -> str:
    return f"{OPS[e.op].spelling}({', '.join(print_expr(a, Prec.IF, var) for a in e.args)})"


def _index(e: Expr, min_level: int, var: str) -> str:
    return f"{e.value}[{', '.join(print_expr(a, Prec.IF, var) for a in e.args)}]"


def _route(e: Expr, min_level: int, var: str) -> str:
    return f"{OPS[e.op].spelling}({e.value})"


def _reduce(e: Expr, min_level: int, var: str) -> str:
    n, body = e.args
    return (f"{OPS[e.op].spelling}({print_expr(body, Prec.IF, var)} for {var}{e.value} in "
            f"range({print_expr(n, Prec.IF, var)}))")


def _var(e: Expr, min_level: int, var: str) -> str:
    return f"{var}{e.value}"


_FORM_RULES = {"literal": _literal, "param": _param, "name": _name, "infix": _infix,
               "prefix": _prefix, "if": _if, "call": _call, "index": _index, "route": _route,
               "reduce": _reduce, "var": _var}
PRINT_RULES = {op: _FORM_RULES[info.form] for op, info in OPS.items()}    # one per op


def _param_text(p, values: dict) -> str:
    if p.is_tensor:
        return f"{p.name}: {p.type}"
    if p.name in values:
        return f"{p.name} = {format_value(values[p.name])}"
    return f"{p.name}: {p.type.value}" if isinstance(p.type, Type) else f"{p.name}: {p.type}"


def loop_prefix(names) -> str:
    """The shortest of ``i``, ``_i``, ``__i``, ... such that no name in ``names`` is it
    followed by digits (the printed names of loop variables cannot clash with a parameter)."""
    taken = {n.rstrip("0123456789") for n in names if n[-1:].isdigit()}
    var = "i"
    while var in taken:
        var = "_" + var
    return var


def print_pattern(ir: PatternIR, values: dict | None = None) -> str:
    """The pattern as a .attn declaration; ``values`` overrides the parameter defaults."""
    vals = {p.name: p.default for p in ir.params if not p.is_tensor and p.default is not None}
    vals.update(values or {})
    params = ", ".join(_param_text(p, vals) for p in ir.params)
    var = loop_prefix(p.name for p in ir.params)
    lines = [f"pattern {ir.name}({params}):", f"    mask = {print_expr(ir.mask, Prec.IF, var)}"]
    if ir.score is not None:
        lines.append(f"    score = {print_expr(ir.score, Prec.IF, var)}")
    return "\n".join(lines) + "\n"
