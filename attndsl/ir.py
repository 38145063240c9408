"""The typed IR of a checked pattern.

Invariants (established by :mod:`attndsl.checker`, relied on by every later pass):

* every node is an :class:`Expr` — frozen, slotted, with tuple children, an :class:`Op`,
  a result :class:`Type` and a source :class:`~attndsl.errors.Span`;
* defs and lets are inlined, chained comparisons are split into ``and``, ``clamp`` is
  ``min(max(...))``: only the ops below remain;
* operand types are checked (see the table in ``checker``), divisors of ``//`` and ``%``
  and selector block sizes are compile-time constant expressions (literals and scalar
  parameters only);
* equality and hashing ignore spans, so a round trip through the pretty-printer compares equal.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import Span


class Type(enum.Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"


@dataclass(frozen=True, slots=True)
class TensorType:
    """A runtime tensor input: element type (INT or FLOAT) and rank (1..3)."""

    elem: Type
    rank: int

    def __str__(self) -> str:
        return self.elem.value + "[]" * self.rank


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
    # tensors and selectors
    INDEX = "index"          # value: tensor parameter name; args: indices
    TOPK_BLOCKS = "topk_blocks"      # args: (n, b, causal) constant expressions
    TOPP_BLOCKS = "topp_blocks"      # args: (p, b, causal) constant expressions
    ROUTE = "route"                  # value: tensor parameter name of the centroids
    RANDOM_BLOCKS = "random_blocks"  # args: (r, b, seed) constant expressions


LEAF_OPS = frozenset({Op.CONST, Op.PARAM, Op.Q, Op.K, Op.H, Op.Q_LEN, Op.KV_LEN, Op.HEADS,
                      Op.KV_HEADS, Op.SCORE, Op.ROUTE})
BUILTIN_LEAVES = {"q": Op.Q, "k": Op.K, "h": Op.H, "q_len": Op.Q_LEN, "kv_len": Op.KV_LEN,
                  "heads": Op.HEADS, "kv_heads": Op.KV_HEADS}
ARITH_OPS = {Op.ADD, Op.SUB, Op.MUL}
COMPARE_OPS = {Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}
UNARY_FLOAT_FUNCS = {Op.EXP, Op.LOG, Op.SQRT, Op.TANH, Op.SIGMOID}
SELECTOR_OPS = {Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.ROUTE, Op.RANDOM_BLOCKS}
DATA_SELECTOR_OPS = {Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.ROUTE}  # need the call's Q and K


@dataclass(frozen=True, slots=True)
class Expr:
    op: Op
    type: Type
    args: tuple[Expr, ...] = ()
    value: object = None
    span: Span = field(default_factory=Span.unknown, compare=False, repr=False)

    def walk(self):
        """Every node of the tree, parents before children (iterative: trees may be deep).

        A sub-tree shared by several parents (a let used twice) is visited once, so a walk
        is linear in the number of distinct nodes even when the expanded tree is exponential.
        """
        stack = [self]
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            yield node
            stack.extend(reversed(node.args))

    def uses(self, *ops: Op) -> bool:
        return any(n.op in ops for n in self.walk())


def const(value, span: Span | None = None) -> Expr:
    kind = Type.BOOL if isinstance(value, bool) else Type.INT if isinstance(value, int) else Type.FLOAT
    return Expr(Op.CONST, kind, (), value, span or Span.unknown())


@dataclass(frozen=True, slots=True)
class Param:
    """A pattern parameter: scalar (compile-time) or tensor (runtime input)."""

    name: str
    type: Type | TensorType
    default: object = None          # a Python scalar, or None when required / a tensor
    span: Span = field(default_factory=Span.unknown, compare=False, repr=False)

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.type, TensorType)


@dataclass(frozen=True, slots=True)
class PatternIR:
    name: str
    params: tuple[Param, ...]
    mask: Expr
    score: Expr | None
    span: Span = field(default_factory=Span.unknown, compare=False, repr=False)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def roots(self) -> tuple[Expr, ...]:
        return (self.mask,) if self.score is None else (self.mask, self.score)
