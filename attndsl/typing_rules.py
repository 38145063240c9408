"""The checker's typing rules: one per IR op, in :data:`TYPING` (the op registry's typing table).

Input: an op, its operands already checked (typed IR), their source spans, the node's span and
a value (a literal's, the :class:`~attndsl.ir.Param` of a parameter, tensor read or route, a
reduction's binder depth). Output: the typed :class:`~attndsl.ir.Expr` of the node, or an
AttnTypeError at the offending operand. :class:`TypingRules` is a base of
:class:`attndsl.checker.Checker`, which calls ``TYPING[op](self, ...)`` for every node it builds.
"""

from __future__ import annotations

from .constants import is_call_constant, is_constant
from .decls import parse_type
from .errors import AttnTypeError, Span
from .ir import Expr, Op, Type, const
from .ops import FLOAT_TO_INT_OPS, NUM, OPS

_HINTS = {Op.DIV: " (write float(x), or use '//' for floor division)", Op.POW: " (write float(x))"}
CALL_CONST = ("a call constant: an int expression of literals, parameters, heads, kv_heads, "
              "q_len and kv_len")
_BITS = {Op.BIT_AND, Op.BIT_OR, Op.BIT_XOR, Op.LSHIFT, Op.RSHIFT}


class TypingRules:
    """The typing rules (mixed into the Checker, which provides ``_err``)."""

    # (op, operands, spans, node span, value: a literal's, or the Param of PARAM/INDEX/ROUTE)
    def _fail(self, message: str, span: Span):
        raise self._err(AttnTypeError, message, span)

    def _numeric(self, x: Expr, what: str, span: Span) -> None:
        if x.type not in (Type.INT, Type.FLOAT):
            self._fail(f"{what} needs an int or float, got {x.type.value}", span)

    def _one_type(self, name: str, args: list, spans: list) -> Type:      # abs, min, max, clamp
        for a, a_span in zip(args, spans):
            self._numeric(a, f"'{name}'", a_span)
            if a.type is not args[0].type:
                self._fail(f"the arguments of '{name}' must have one type, got "
                           f"{args[0].type.value} and {a.type.value}", a_span)
        return args[0].type

    def _t_build(self, op, args, spans, span, value) -> Expr:     # the registry's result type
        return Expr(op, OPS[op].result, tuple(args), None, span)

    def _t_value(self, op, args, spans, span, value) -> Expr:
        if op is Op.CONST:                      # a literal: the type of its value
            return const(value, span)
        if op is Op.INDEX:                      # value: the tensor input
            return Expr(op, value.type.elem, tuple(args), value.name, span)
        if op is Op.ROUTE:                      # value: the parameter named, or None
            if value is None or value.type != parse_type(OPS[op].params[0][1]):
                self._fail("route(c) needs a tensor input c of type float[][][] (centroids "
                           "[heads, C, head_dim])", spans[0])
            return Expr(op, Type.BOOL, (), value.name, span)
        if value.is_tensor:
            self._fail(f"'{value.name}' is a tensor input ({value.type}); index it, as in "
                       f"{value.name}[q]", span)
        return Expr(op, value.type, (), value.name, span)

    def _t_negate(self, op, args, spans, span, value) -> Expr:
        self._numeric(args[0], f"unary '{OPS[op].spelling}'", span)
        return Expr(op, args[0].type, (args[0],), None, span)

    def _t_arith(self, op, args, spans, span, value) -> Expr:     # +, -, *
        sym, (a, b) = OPS[op].spelling, args
        self._numeric(a, f"'{sym}'", spans[0])
        if a.type is not b.type:
            self._fail(f"operands of '{sym}' must have one type, got {a.type.value} and "
                       f"{b.type.value} (convert with float(x))", spans[1])
        return Expr(op, a.type, (a, b), None, span)

    def _t_fixed(self, op, args, spans, span, value) -> Expr:     # /, **, //, %
        info = OPS[op]
        for x, want, x_span in zip(args, info.operands, spans):
            if x.type is not want:
                self._fail(f"'{info.spelling}' needs {want.value} operands, got {x.type.value}"
                           f"{_HINTS.get(op, '')}", x_span)
        for i in (i for i in info.call_constant_args if not is_call_constant(args[i])):
            self._fail(f"the divisor of '{info.spelling}' must be {CALL_CONST}", spans[i])
        return self._t_build(op, args, spans, span, value)

    def _t_compare(self, op, args, spans, span, value) -> Expr:
        sym, (a, b) = OPS[op].spelling, args
        if a.type is not b.type:
            self._fail(f"cannot compare {a.type.value} with {b.type.value} using '{sym}'", spans[1])
        if a.type is Type.BOOL and OPS[op].operands[0] == NUM:
            self._fail(f"'{sym}' does not order bools", spans[1])
        return Expr(op, Type.BOOL, (a, b), None, a.span)

    def _t_if(self, op, args, spans, span, value) -> Expr:
        test, a, b = args
        if a.type is not b.type:
            self._fail(f"both branches of 'if' must have one type, got {a.type.value} and "
                       f"{b.type.value}", spans[2])
        return Expr(op, a.type, (test, a, b), None, span)

    def _t_numeric(self, op, args, spans, span, value) -> Expr:   # abs, min, max
        return Expr(op, self._one_type(OPS[op].spelling, args, spans), tuple(args), None, span)

    def _t_function(self, op, args, spans, span, value) -> Expr:  # float(), exp, floor, ...
        t, want, name = args[0].type, OPS[op].operands[0], OPS[op].spelling
        if op is Op.FLOAT and t is Type.FLOAT:
            return args[0]                      # float() of a float is that float
        if t is not want:
            self._fail(f"float() takes an int, got {t.value}" if op is Op.FLOAT else
                       f"'{name}' takes an int, got {t.value}" if want is Type.INT else
                       f"'{name}' takes a float, got {t.value} (write float(x))", spans[0])
        if op in FLOAT_TO_INT_OPS and args[0].uses(Op.SCORE):
            self._fail(f"'{name}' cannot convert an expression that reads 'score' (its value at "
                       "each pair is not known before the kernel runs, so a NaN or an infinity "
                       "reaching it could not be reported)", spans[0])
        return self._t_build(op, args, spans, span, value)

    def _t_bits(self, op, args, spans, span, value) -> Expr:      # & | ^ << >> ~
        sym = OPS[op].spelling
        for x, x_span in zip(args, spans):
            if x.type is not Type.INT:
                hint = " (use 'and', 'or', 'not' on bools)" if x.type is Type.BOOL else \
                    " (bit operators take ints: convert with floor(x), ceil(x) or round(x))"
                self._fail(f"'{sym}' needs int operands, got {x.type.value}{hint}", x_span)
        return self._t_build(op, args, spans, span, value)

    def _t_var(self, op, args, spans, span, value) -> Expr:       # a loop variable: its depth
        return Expr(op, Type.INT, (), value, span)

    def _t_reduce(self, op, args, spans, span, value) -> Expr:    # any, all, sum, max, min
        n, body = args
        name = OPS[op].spelling
        if n.type is not Type.INT:
            self._fail(f"range() takes an int, got {n.type.value}", spans[0])
        if not is_call_constant(n):
            self._fail(f"the bound of range() must be {CALL_CONST} (or a loop variable)",
                       spans[0])
        if op in (Op.ANY, Op.ALL) and body.type is not Type.BOOL:
            self._fail(f"'{name}' takes bool items, got {body.type.value}", spans[1])
        if op not in (Op.ANY, Op.ALL) and body.type is Type.BOOL:
            what = "sums numbers" if op is Op.SUM else "orders numbers"
            self._fail(f"'{name}' {what}, got bool items (write 1 if ... else 0)", spans[1])
        return Expr(op, body.type, (n, body), value, span)

    def _t_operand(self, op, i, x, span) -> None:
        """The check of operand ``i`` of an op in _EARLY (done before the next operand is
        checked, so its error comes first), by its kind in the registry."""
        info, want, got = OPS[op], OPS[op].kind(i), x.type.value
        if isinstance(want, Type) and x.type is not want:
            what = "the condition of 'if'" if op is Op.IF else f"'{info.spelling}'"
            self._fail(f"an index must be int, got {got}" if op is Op.INDEX else
                       f"argument '{info.params[i][0]}' of '{info.spelling}' must be {want.value}, "
                       f"got {got}" if info.selector else f"{what} needs a bool, got {got}", span)
        if info.selector and not is_constant(x):
            self._fail(f"argument '{info.params[i][0]}' of '{info.spelling}' must be a compile-time "
                       "constant (a literal or a scalar parameter)", span)


_T = TypingRules
TYPING = {                          # one typing rule per op (see the methods above)
    **dict.fromkeys((Op.CONST, Op.PARAM, Op.INDEX, Op.ROUTE), _T._t_value),
    **dict.fromkeys((Op.Q, Op.K, Op.H, Op.Q_LEN, Op.KV_LEN, Op.HEADS, Op.KV_HEADS, Op.SCORE), _T._t_build),
    Op.NEG: _T._t_negate, Op.ADD: _T._t_arith, Op.SUB: _T._t_arith, Op.MUL: _T._t_arith,
    **dict.fromkeys((Op.DIV, Op.FLOORDIV, Op.MOD, Op.POW), _T._t_fixed),
    **dict.fromkeys((Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE), _T._t_compare),
    Op.NOT: _T._t_build, Op.AND: _T._t_build, Op.OR: _T._t_build, Op.IF: _T._t_if,
    Op.ABS: _T._t_numeric, Op.MIN: _T._t_numeric, Op.MAX: _T._t_numeric,
    **dict.fromkeys((Op.FLOAT, Op.EXP, Op.LOG, Op.SQRT, Op.TANH, Op.SIGMOID, Op.ERF, Op.EXP2,
                     Op.LOG2, Op.FLOOR, Op.CEIL, Op.ROUND, Op.ILOG2), _T._t_function),
    **dict.fromkeys((*_BITS, Op.INVERT), _T._t_bits),
    **dict.fromkeys((Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.RANDOM_BLOCKS), _T._t_build),
    **dict.fromkeys((Op.ANY, Op.ALL, Op.SUM, Op.REDUCE_MAX, Op.REDUCE_MIN), _T._t_reduce),
    Op.VAR: _T._t_var,
}
