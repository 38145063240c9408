"""The typed IR of a checked pattern.

Invariants (established by :mod:`attndsl.checker`, relied on by every later pass):

* every node is an :class:`Expr` — frozen, slotted, with tuple children, an :class:`Op`,
  a result :class:`Type` and a source :class:`~attndsl.errors.Span`;
* defs and lets are inlined, chained comparisons are split into ``and``, ``clamp`` is
  ``min(max(...))``: only the ops of the registry (:mod:`attndsl.ops`) remain;
* operand types are checked (signatures in ``ops``, typing rules in ``checker``), selector
  arguments are compile-time constant expressions (literals and scalar parameters only) and
  divisors of ``//`` and ``%`` call constants (those and the sizes ``q_len``, ``kv_len``,
  ``heads``, ``kv_heads``; checked > 0 per call); ``kv_head`` is ``h // (heads // kv_heads)``;
* equality and hashing ignore spans, so a round trip through the pretty-printer compares equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span
from .ops import (  # the operators and their groups are declared in the registry (ops.py)
    ARITH_OPS,
    BUILTIN_LEAVES,
    COMPARE_OPS,
    DATA_SELECTOR_OPS,
    LEAF_OPS,
    SELECTOR_OPS,
    UNARY_FLOAT_FUNCS,
    Op,
    Type,
)

__all__ = ["ARITH_OPS", "BUILTIN_LEAVES", "COMPARE_OPS", "DATA_SELECTOR_OPS", "LEAF_OPS",
           "SELECTOR_OPS", "UNARY_FLOAT_FUNCS", "Expr", "Op", "Param", "PatternIR", "TensorType",
           "Type", "const"]


@dataclass(frozen=True, slots=True)
class TensorType:
    """A runtime tensor input: element type (INT or FLOAT) and rank (1..3)."""

    elem: Type
    rank: int

    def __str__(self) -> str:
        return self.elem.value + "[]" * self.rank


@dataclass(frozen=True, slots=True)
class Expr:
    op: Op
    type: Type
    args: tuple[Expr, ...] = ()
    value: object = None
    span: Span = field(default_factory=Span.unknown, compare=False, repr=False)
    # the structural hash, computed once from the children's (a DAG whose expansion is
    # exponential hashes in time linear in its distinct nodes)
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_hash", hash((self.op, self.type, self.args, self.value)))

    def __hash__(self) -> int:
        return self._hash

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


def kv_head_expr(span: Span) -> Expr:
    """The builtin ``kv_head``: the key/value head that query head ``h`` reads,
    ``h // (heads // kv_heads)`` (it is that expression in the IR)."""
    h, heads, kv_heads = (Expr(op, Type.INT, (), None, span)
                          for op in (Op.H, Op.HEADS, Op.KV_HEADS))
    return Expr(Op.FLOORDIV, Type.INT,
                (h, Expr(Op.FLOORDIV, Type.INT, (heads, kv_heads), None, span)), None, span)


def rewrite(root: Expr, replace, memo: dict | None = None) -> Expr:
    """``root`` with every node for which ``replace(node)`` gives an Expr replaced by it (its
    children not visited), the others rebuilt over their rewritten children; shared sub-trees
    stay shared (``memo``, by node identity, may be shared by several roots)."""
    memo = {} if memo is None else memo

    def go(e: Expr) -> Expr:
        got = memo.get(id(e))
        if got is None:
            got = replace(e)
            if got is None:
                got = Expr(e.op, e.type, tuple(go(a) for a in e.args), e.value, e.span) \
                    if e.args else e
            memo[id(e)] = got
        return got

    return go(root)


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
