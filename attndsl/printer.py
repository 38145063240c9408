"""The pretty-printer: IR -> .attn text that parses and checks back to the same IR.

Deterministic: the output depends only on the IR (and parameter values), with the fewest
parentheses the precedence table allows. Lets and defs are already inlined in the IR, so a
printed pattern is a single ``mask`` (and ``score``) clause.
"""

from __future__ import annotations

import math

from .ir import Expr, Op, PatternIR, Type

# precedence levels, lowest first (LANGUAGE.md section 3)
IF, OR, AND, NOT, CMP, ADD, MUL, UNARY, POW, ATOM = range(10)

_INFIX = {
    Op.OR: ("or", OR, OR, AND), Op.AND: ("and", AND, AND, NOT),
    Op.LT: ("<", CMP, ADD, ADD), Op.LE: ("<=", CMP, ADD, ADD), Op.GT: (">", CMP, ADD, ADD),
    Op.GE: (">=", CMP, ADD, ADD), Op.EQ: ("==", CMP, ADD, ADD), Op.NE: ("!=", CMP, ADD, ADD),
    Op.ADD: ("+", ADD, ADD, MUL), Op.SUB: ("-", ADD, ADD, MUL),
    Op.MUL: ("*", MUL, MUL, UNARY), Op.DIV: ("/", MUL, MUL, UNARY),
    Op.FLOORDIV: ("//", MUL, MUL, UNARY), Op.MOD: ("%", MUL, MUL, UNARY),
    Op.POW: ("**", POW, ATOM, UNARY),
}
_LEAF_NAMES = {Op.Q: "q", Op.K: "k", Op.H: "h", Op.Q_LEN: "q_len", Op.KV_LEN: "kv_len",
               Op.HEADS: "heads", Op.KV_HEADS: "kv_heads", Op.SCORE: "score"}
_CALLS = {Op.ABS, Op.MIN, Op.MAX, Op.FLOAT, Op.EXP, Op.LOG, Op.SQRT, Op.TANH, Op.SIGMOID,
          Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.RANDOM_BLOCKS}


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


def print_expr(e: Expr, min_level: int = IF) -> str:
    op = e.op
    if op is Op.CONST:
        text = format_value(e.value)
        return _wrap(text, UNARY if text.startswith("-") else ATOM, min_level)
    if op is Op.PARAM:
        return str(e.value)
    if op in _LEAF_NAMES:
        return _LEAF_NAMES[op]
    if op in _INFIX:
        sym, level, left, right = _INFIX[op]
        a, b = e.args
        return _wrap(f"{print_expr(a, left)} {sym} {print_expr(b, right)}", level, min_level)
    if op is Op.NEG:
        return _wrap("-" + print_expr(e.args[0], UNARY), UNARY, min_level)
    if op is Op.NOT:
        return _wrap("not " + print_expr(e.args[0], NOT), NOT, min_level)
    if op is Op.IF:
        c, a, b = e.args
        text = f"{print_expr(a, OR)} if {print_expr(c, OR)} else {print_expr(b, IF)}"
        return _wrap(text, IF, min_level)
    if op is Op.INDEX:
        return f"{e.value}[{', '.join(print_expr(a) for a in e.args)}]"
    if op is Op.ROUTE:
        return f"route({e.value})"
    if op in _CALLS:
        return f"{op.value}({', '.join(print_expr(a) for a in e.args)})"
    raise ValueError(f"no printer rule for {op}")  # pragma: no cover


def _param_text(p, values: dict) -> str:
    if p.is_tensor:
        return f"{p.name}: {p.type}"
    if p.name in values:
        return f"{p.name} = {format_value(values[p.name])}"
    return f"{p.name}: {p.type.value}" if isinstance(p.type, Type) else f"{p.name}: {p.type}"


def print_pattern(ir: PatternIR, values: dict | None = None) -> str:
    """The pattern as a .attn declaration; ``values`` overrides the parameter defaults."""
    vals = {p.name: p.default for p in ir.params if not p.is_tensor and p.default is not None}
    vals.update(values or {})
    params = ", ".join(_param_text(p, vals) for p in ir.params)
    lines = [f"pattern {ir.name}({params}):", f"    mask = {print_expr(ir.mask)}"]
    if ir.score is not None:
        lines.append(f"    score = {print_expr(ir.score)}")
    return "\n".join(lines) + "\n"
