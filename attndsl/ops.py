"""The operator registry: every IR operator declared once, with what the passes need to know.

Output: :class:`Type` (the language's value types), :class:`Op` (the IR operators), one
:class:`OpInfo` per op in :data:`OPS` (spelling, arity, signature, printing form and precedence,
group flags), the op groups derived from it (:data:`LEAF_OPS`, :data:`SELECTOR_OPS`,
:data:`CONSTANT_OPS`, ...) and :func:`table_gaps`, which checks that a per-op rule table of a pass
has exactly one entry per op.

This module sits below :mod:`attndsl.ir` (which re-exports ``Type``, ``Op`` and the groups) and
imports nothing from the package. Each pass keeps its own table keyed by :class:`Op` — typing
(``checker.TYPING``), printing (``printer.PRINT_RULES``), evaluation (``interp.EVAL_RULES``),
differentiation (``derivative.DERIVATIVE_RULES``), tile intervals
(``analysis.intervals.INTERVAL_RULES``), closed-form sums (``analysis.cost.SYMPY_RULES``),
solving for k (``analysis.solve.SOLVE_RULES``), Triton lowering (``codegen.lower.TRITON_RULES``)
and the torch backend (``codegen.torch_lower.TORCH_RULES``); an op a pass does not handle has
an explicit entry saying so. tests/test_op_registry.py checks them all
with :func:`table_gaps`, so adding an op here without its rules fails there.

Signatures use type variables: every :data:`NUM` operand of one node has the same type, int or
float, and every :data:`ANY` operand the same type, any; a result of ``NUM``/``ANY`` is that
type. A variadic op takes at least ``arity`` operands, the last kind repeating.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Type(enum.Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"


class Op(enum.Enum):
    # leaves
    CONST = "const"          # value: int | float | bool
    PARAM = "param"          # value: parameter name (a scalar, compile-time constant)
    Q = "q"
    K = "k"
    H = "h"
    Q_LEN = "q_len"
    KV_LEN = "kv_len"
    HEADS = "heads"
    KV_HEADS = "kv_heads"
    SCORE = "score"
    # arithmetic
    NEG = "neg"
    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    FLOORDIV = "//"
    MOD = "%"
    POW = "**"
    # comparisons and logic
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="
    NOT = "not"
    AND = "and"
    OR = "or"
    IF = "if"                # args: (condition, then, else)
    # functions
    ABS = "abs"
    MIN = "min"              # n-ary
    MAX = "max"              # n-ary
    FLOAT = "float"
    EXP = "exp"
    LOG = "log"
    SQRT = "sqrt"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    ERF = "erf"
    EXP2 = "exp2"
    LOG2 = "log2"
    FLOOR = "floor"          # float -> int (like ceil, round: NaN, inf, beyond int64: call error)
    CEIL = "ceil"
    ROUND = "round"          # half to even, as Python
    ILOG2 = "ilog2"          # int -> int: floor(log2(n)) for n >= 1, -1 for n <= 0
    # bit operators on ints (two's complement int64; shift counts 0..62 else a call error)
    BIT_AND = "&"
    BIT_OR = "|"
    BIT_XOR = "^"
    LSHIFT = "<<"
    RSHIFT = ">>"            # arithmetic
    INVERT = "~"
    # bounded reductions: args (n, body), value: the loop variable's binder depth (see VAR);
    # 'any(body for i in range(n))' and the like. Expanded into and/or/+/max/min chains once a
    # call's sizes are known (attndsl/expand.py), before analysis and lowering.
    ANY = "any"
    ALL = "all"
    SUM = "sum"
    REDUCE_MAX = "reduce_max"        # spelt max(... for i in range(n))
    REDUCE_MIN = "reduce_min"        # spelt min(... for i in range(n))
    VAR = "var"              # a reduction's loop variable; value: its binder's depth
    # tensors and selectors
    INDEX = "index"          # value: tensor parameter name; args: indices
    TOPK_BLOCKS = "topk_blocks"      # args: (n, b, causal) constant expressions
    TOPP_BLOCKS = "topp_blocks"      # args: (p, b, causal) constant expressions
    ROUTE = "route"                  # value: tensor parameter name of the centroids
    RANDOM_BLOCKS = "random_blocks"  # args: (r, b, seed) constant expressions


class Prec(enum.IntEnum):
    """The printer's precedence levels, lowest first (docs/language.md section 3)."""

    IF = 0
    OR = 1
    AND = 2
    NOT = 3
    CMP = 4
    BIT_OR = 5
    BIT_XOR = 6
    BIT_AND = 7
    SHIFT = 8
    ADD = 9
    MUL = 10
    UNARY = 11
    POW = 12
    ATOM = 13


NUM = "num"          # operand kind: int or float, one type for all NUM operands of a node
ANY = "any"          # operand kind: any type, one type for all ANY operands of a node
VALUE_TYPE = "value"     # result kind of CONST: the type of its Python value
PARAM_TYPE = "param"     # result kind of PARAM: the declared type of the parameter
ELEM_TYPE = "elem"       # result kind of INDEX: the element type of the tensor input

# printing forms (printer.PRINT_RULES has one rule per form)
FORMS = ("literal", "param", "name", "infix", "prefix", "if", "call", "index", "route",
         "reduce", "var")


@dataclass(frozen=True, slots=True)
class OpInfo:
    """One operator.

    * ``spelling``: how source writes it (symbol, keyword, function or builtin name; None when
      the node is written by its value);
    * ``arity``: its operands in the IR (at least that many when ``variadic``); ``operands``:
      the kind of each (a Type, NUM or ANY); ``result``: a Type, NUM, ANY, VALUE_TYPE,
      PARAM_TYPE or ELEM_TYPE;
    * ``form``: one of FORMS; ``level``: its precedence; ``left``/``right``: the lowest levels
      its operands print at without parentheses (infix: left and right operand; prefix:
      ``right``; if: ``left`` for the branch taken and the condition, ``right`` for the other);
    * ``constant``: its value is a compile-time constant when its operands' are;
      ``constant_args``: the operands that must be compile-time constants;
      ``call_constant_args``: the operands that must be call constants (compile-time constants
      or the call's sizes ``q_len``, ``kv_len``, ``heads``, ``kv_heads``: known per call);
    * ``selector`` / ``data_selector``: a block selector (reading the call's Q and K);
      ``params``: a selector's named arguments (name, Type or tensor type text, default or
      None when required).
    """

    op: Op
    spelling: str | None
    arity: int
    operands: tuple
    result: object
    form: str
    level: Prec = Prec.ATOM
    left: Prec = Prec.IF
    right: Prec = Prec.IF
    variadic: bool = False
    constant: bool = True
    constant_args: tuple[int, ...] = ()
    call_constant_args: tuple[int, ...] = ()
    selector: bool = False
    data_selector: bool = False
    params: tuple = ()

    @property
    def leaf(self) -> bool:
        return self.arity == 0 and not self.variadic

    def kind(self, i: int):
        """The kind of operand ``i`` (the last kind repeats: variadic ops, and/or chains)."""
        return self.operands[min(i, len(self.operands) - 1)]


def _leaf(op: Op, result) -> OpInfo:
    return OpInfo(op, op.value, 0, (), result, "name", constant=False)


def _infix(op: Op, operands, result, level: Prec, left: Prec, right: Prec) -> OpInfo:
    return OpInfo(op, op.value, 2, operands, result, "infix", level, left, right)


def _call(op: Op, operands, result, variadic: bool = False) -> OpInfo:
    return OpInfo(op, op.value, len(operands), operands, result, "call", variadic=variadic)


def _selector(op: Op, params, data: bool) -> OpInfo:
    kinds = tuple(p[1] for p in params)
    return OpInfo(op, op.value, len(params), kinds, Type.BOOL, "call", constant=False,
                  constant_args=tuple(range(len(params))), selector=True, data_selector=data,
                  params=params)


def _reduce(op: Op, spelling: str, body) -> OpInfo:
    return OpInfo(op, spelling, 2, (Type.INT, body), body, "reduce", call_constant_args=(0,))


_I, _F, _B, _P = Type.INT, Type.FLOAT, Type.BOOL, Prec
_NN, _FF, _II = (NUM, NUM), (_F, _F), (_I, _I)

OPS: dict[Op, OpInfo] = {info.op: info for info in (
    OpInfo(Op.CONST, None, 0, (), VALUE_TYPE, "literal"),
    OpInfo(Op.PARAM, None, 0, (), PARAM_TYPE, "param"),
    _leaf(Op.Q, _I), _leaf(Op.K, _I), _leaf(Op.H, _I),
    _leaf(Op.Q_LEN, _I), _leaf(Op.KV_LEN, _I), _leaf(Op.HEADS, _I), _leaf(Op.KV_HEADS, _I),
    _leaf(Op.SCORE, _F),
    OpInfo(Op.NEG, "-", 1, (NUM,), NUM, "prefix", _P.UNARY, right=_P.UNARY),
    _infix(Op.ADD, _NN, NUM, _P.ADD, _P.ADD, _P.MUL),
    _infix(Op.SUB, _NN, NUM, _P.ADD, _P.ADD, _P.MUL),
    _infix(Op.MUL, _NN, NUM, _P.MUL, _P.MUL, _P.UNARY),
    _infix(Op.DIV, _FF, _F, _P.MUL, _P.MUL, _P.UNARY),
    OpInfo(Op.FLOORDIV, "//", 2, _II, _I, "infix", _P.MUL, _P.MUL, _P.UNARY,
           call_constant_args=(1,)),
    OpInfo(Op.MOD, "%", 2, _II, _I, "infix", _P.MUL, _P.MUL, _P.UNARY, call_constant_args=(1,)),
    _infix(Op.POW, _FF, _F, _P.POW, _P.ATOM, _P.UNARY),
    _infix(Op.LT, _NN, _B, _P.CMP, _P.BIT_OR, _P.BIT_OR),
    _infix(Op.LE, _NN, _B, _P.CMP, _P.BIT_OR, _P.BIT_OR),
    _infix(Op.GT, _NN, _B, _P.CMP, _P.BIT_OR, _P.BIT_OR),
    _infix(Op.GE, _NN, _B, _P.CMP, _P.BIT_OR, _P.BIT_OR),
    _infix(Op.EQ, (ANY, ANY), _B, _P.CMP, _P.BIT_OR, _P.BIT_OR),
    _infix(Op.NE, (ANY, ANY), _B, _P.CMP, _P.BIT_OR, _P.BIT_OR),
    _infix(Op.BIT_OR, _II, _I, _P.BIT_OR, _P.BIT_OR, _P.BIT_XOR),
    _infix(Op.BIT_XOR, _II, _I, _P.BIT_XOR, _P.BIT_XOR, _P.BIT_AND),
    _infix(Op.BIT_AND, _II, _I, _P.BIT_AND, _P.BIT_AND, _P.SHIFT),
    _infix(Op.LSHIFT, _II, _I, _P.SHIFT, _P.SHIFT, _P.ADD),
    _infix(Op.RSHIFT, _II, _I, _P.SHIFT, _P.SHIFT, _P.ADD),
    OpInfo(Op.INVERT, "~", 1, (_I,), _I, "prefix", _P.UNARY, right=_P.UNARY),
    OpInfo(Op.NOT, "not", 1, (_B,), _B, "prefix", _P.NOT, right=_P.NOT),
    _infix(Op.AND, (_B, _B), _B, _P.AND, _P.AND, _P.NOT),
    _infix(Op.OR, (_B, _B), _B, _P.OR, _P.OR, _P.AND),
    OpInfo(Op.IF, "if", 3, (_B, ANY, ANY), ANY, "if", _P.IF, _P.OR, _P.IF),
    _call(Op.ABS, (NUM,), NUM),
    _call(Op.MIN, _NN, NUM, variadic=True),
    _call(Op.MAX, _NN, NUM, variadic=True),
    _call(Op.FLOAT, (_I,), _F),                 # of a float: the checker keeps the operand
    _call(Op.EXP, (_F,), _F), _call(Op.LOG, (_F,), _F), _call(Op.SQRT, (_F,), _F),
    _call(Op.TANH, (_F,), _F), _call(Op.SIGMOID, (_F,), _F),
    _call(Op.ERF, (_F,), _F), _call(Op.EXP2, (_F,), _F), _call(Op.LOG2, (_F,), _F),
    _call(Op.FLOOR, (_F,), _I), _call(Op.CEIL, (_F,), _I), _call(Op.ROUND, (_F,), _I),
    _call(Op.ILOG2, (_I,), _I),
    OpInfo(Op.INDEX, None, 1, (_I,), ELEM_TYPE, "index", variadic=True, constant=False),
    _selector(Op.TOPK_BLOCKS, (("n", _I, None), ("b", _I, None), ("causal", _B, True)), True),
    _selector(Op.TOPP_BLOCKS, (("p", _F, None), ("b", _I, None), ("causal", _B, True)), True),
    OpInfo(Op.ROUTE, "route", 0, (), _B, "route", constant=False, selector=True,
           data_selector=True, params=(("c", "float[][][]", None),)),   # value: the tensor
    _selector(Op.RANDOM_BLOCKS, (("r", _I, None), ("b", _I, None), ("seed", _I, 0)), False),
    _reduce(Op.ANY, "any", _B), _reduce(Op.ALL, "all", _B), _reduce(Op.SUM, "sum", NUM),
    _reduce(Op.REDUCE_MAX, "max", NUM), _reduce(Op.REDUCE_MIN, "min", NUM),
    OpInfo(Op.VAR, None, 0, (), _I, "var", constant=False),
)}

# ----------------------------------------------------------------------------- groups

LEAF_OPS = frozenset(op for op, i in OPS.items() if i.leaf)
# the builtin names that are IR leaves ('score' is scoped to the score clause)
BUILTIN_LEAVES = {i.spelling: op for op, i in OPS.items()
                  if i.form == "name" and op is not Op.SCORE}
ARITH_OPS = {op for op, i in OPS.items() if i.form == "infix" and i.operands == _NN and
             i.result == NUM}
COMPARE_OPS = {op for op, i in OPS.items() if i.form == "infix" and i.level is Prec.CMP}
UNARY_FLOAT_FUNCS = {op for op, i in OPS.items() if i.form == "call" and i.operands == (_F,)
                     and i.result is _F}
SELECTOR_OPS = {op for op, i in OPS.items() if i.selector}
DATA_SELECTOR_OPS = {op for op, i in OPS.items() if i.data_selector}  # need the call's Q and K
CONSTANT_OPS = {op for op, i in OPS.items() if i.constant}
# known once a call's sizes are: the constant ops and the size builtins
# (a reduction's loop variable is a call constant inside its body: known once the reduction is
# expanded, attndsl/expand.py)
CALL_CONSTANT_OPS = CONSTANT_OPS | {Op.Q_LEN, Op.KV_LEN, Op.HEADS, Op.KV_HEADS, Op.VAR}
REDUCE_OPS = {op for op, i in OPS.items() if i.form == "reduce"}
# the ops a call's expansion removes (attndsl/expand.py): analysis and lowering never see them
EXPANDED_OPS = REDUCE_OPS | {Op.VAR}
FLOAT_TO_INT_OPS = {Op.FLOOR, Op.CEIL, Op.ROUND}
MAX_RANGE = 256          # the largest bound N of a reduction's range(N)
MAX_SHIFT = 62           # shift counts lie in 0..MAX_SHIFT (else a call error)
SHIFT_OPS = {Op.LSHIFT, Op.RSHIFT}


def table_gaps(table, ops=Op) -> tuple[list, list]:
    """(ops without an entry, keys that are no op) of a per-op rule table: both empty when the
    table has exactly one entry per op."""
    ops = list(ops)
    return [op for op in ops if op not in table], [k for k in table if k not in ops]
