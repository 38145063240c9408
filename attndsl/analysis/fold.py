"""Partial evaluation: an IR tree specialised to known values of ``h``, sizes and parameters.

Input: a checked expression and bindings (any of ``h``, ``q_len``, ``kv_len``, ``heads``,
``kv_heads`` and the scalar parameters). Output: an equivalent expression (for those values)
in which every sub-tree without ``q``, ``k``, ``score``, tensors or selectors is one constant,
``and``/``or``/``if`` with a constant operand are short-circuited, and ``PARAM`` nodes are
replaced by their values. Used to group heads whose masks are the same expression
(``head_classes``), so that per-head analyses run once per class.
"""

from __future__ import annotations

import numpy as np

from ..constants import CONSTANT_OPS, is_call_constant, is_constant
from ..errors import AttnCallError
from ..interp import Env, Evaluator
from ..ir import DATA_SELECTOR_OPS, LEAF_OPS, SELECTOR_OPS, Expr, Op, Type, const

_LEAVES = {Op.H: "h", Op.Q_LEN: "q_len", Op.KV_LEN: "kv_len", Op.HEADS: "heads",
           Op.KV_HEADS: "kv_heads"}
_SELECTOR_ARGS = SELECTOR_OPS - LEAF_OPS        # selectors with (constant) operands
# the operands the solver reads as constants: divisors, moduli, shift counts, bit masks
_SIZED = {**dict.fromkeys((Op.FLOORDIV, Op.MOD, Op.LSHIFT, Op.RSHIFT), slice(1, 2)),
          **dict.fromkeys((Op.BIT_AND, Op.BIT_OR, Op.BIT_XOR), slice(0, 2))}


def _value(v, kind: Type) -> Expr:
    v = np.asarray(v).item()
    if kind is Type.BOOL:
        return const(bool(v))
    return const(int(v)) if kind is Type.INT else const(float(v))


def fold(expr: Expr, bindings: dict, params: dict) -> Expr:
    """``expr`` with the bound leaves and parameters replaced and constants folded."""
    memo: dict[int, Expr] = {}
    env = Env(h=np.int64(bindings.get("h", 0)), q=np.int64(0), k=np.int64(0),
              q_len=bindings.get("q_len", 0), kv_len=bindings.get("kv_len", 0),
              heads=bindings.get("heads", 1), kv_heads=bindings.get("kv_heads", 1), params=params)

    def known(e: Expr) -> bool:
        return e.op is Op.CONST

    def go(e: Expr) -> Expr:
        key = id(e)
        if key not in memo:
            memo[key] = _go(e)
        return memo[key]

    def _go(e: Expr) -> Expr:
        op = e.op
        if op is Op.PARAM and e.value in params:
            return _value(params[e.value], e.type)
        if op in _LEAVES:
            return _value(bindings[_LEAVES[op]], e.type) if _LEAVES[op] in bindings else e
        if not e.args or op in _SELECTOR_ARGS:
            return e
        args = tuple(go(a) for a in e.args)
        if op in (Op.AND, Op.OR):
            a, b = args
            short = op is Op.OR
            for x, y in ((a, b), (b, a)):
                if known(x):
                    return x if x.value is short else y
        if op is Op.IF and known(args[0]):
            return args[1] if args[0].value else args[2]
        if op in CONSTANT_OPS and all(known(a) for a in args):      # (INDEX reads a tensor)
            try:
                with np.errstate(all="ignore"):
                    value = Evaluator(env).sub(Expr(op, e.type, args, e.value, e.span))
                return _value(value, e.type)
            except AttnCallError:       # (a shift count past 62, floor(inf)): an error only
                pass                    # where a pair evaluates it: kept as it is
        return Expr(op, e.type, args, e.value, e.span)

    return go(expr)


def head_classes(expr: Expr, heads: int, params: dict, sizes: dict) -> list[tuple[Expr, list[int]]]:
    """Groups of heads whose specialised expressions are equal: [(expression, heads)]."""
    if expr.uses(*DATA_SELECTOR_OPS):                           # per-head data: no sharing
        return [(expr, [h]) for h in range(heads)]
    if not expr.uses(Op.H):
        # a divisor, shift count or bit mask of the call's sizes becomes the constant it is at
        # this call (the solver reads them as constants)
        sized = any(n.op in _SIZED and any(is_call_constant(a) and not is_constant(a)
                                           for a in n.args[_SIZED[n.op]])
                    for n in expr.walk())
        return [(fold(expr, sizes, params) if sized else expr, list(range(heads)))]
    groups: dict[Expr, list[int]] = {}
    for h in range(heads):
        groups.setdefault(fold(expr, {"h": h, **sizes}, params), []).append(h)
    return list(groups.items())
