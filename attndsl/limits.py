"""Limits on the size and the nesting of a file, and the shape of long ``and``/``or`` chains.

Every pass after the parser (checker, printer, interpreter, analysis, code generation, the
torch backend) may recurse once per level of an expression. These checks bound that recursion
before it happens, so that no input can make a later pass raise ``RecursionError``:

* :func:`check_size` — input: the source text (after :func:`errors.normalize_source`).
  Output: None, or an :class:`AttnSyntaxError` located at the first character beyond
  :data:`MAX_SOURCE_CHARS`. Runs before lark, so an over-size file costs O(limit).
* :func:`too_deep` — input: one surface expression (:class:`parser.Node`). Output: the first
  node, in source order, nested deeper than :data:`MAX_DEPTH` levels, or None. Iterative.
  A level is one node; a ``kwarg`` wrapper is no level, and an ``and``/``or`` inside an
  operand position of the same operator continues its parent's chain (no new level).
* :class:`Heights` — the height of checked IR (leaves are 1), memoised per node; the checker
  rejects any expression whose IR is higher than :data:`MAX_DEPTH`. Invariant after the
  checker: every root of a :class:`~attndsl.ir.PatternIR` has height <= MAX_DEPTH.
* :func:`logic_chain` — a maximal chain of one of ``and``/``or`` as IR: at most
  :data:`LOGIC_RUN` operands (counted through nested nodes of the same operator) keep the
  shape they were written in; longer chains become a balanced tree over the flattened operand
  list. The shape depends only on that list, so printing and re-parsing gives the same IR. Both
  operators are associative and the interpreter's narrowing of live points (the right operand
  is evaluated only where the left one did not decide) gives the same values and the same
  errors under any grouping.

:data:`MAX_DEPTH` is chosen so that every later pass runs at exactly that height under
Python's default recursion limit, called from a stack already ~100 frames deep
(tests/test_limits.py runs them all at the limit).
"""

from __future__ import annotations

from .errors import AttnSyntaxError, Span
from .ir import Expr, Op, Type

MAX_DEPTH = 100                 # levels of one expression (as written, and once expanded)
MAX_SOURCE_CHARS = 1 << 18      # characters in one file (262,144)
LOGIC_RUN = 16                  # and/or chains up to this many operands keep their shape


def depth_message(where: str = "") -> str:
    return f"expression nested too deeply: more than {MAX_DEPTH} levels{where}"


def check_size(text: str, filename: str, source: str | None = None) -> AttnSyntaxError | None:
    """An error at the first character beyond MAX_SOURCE_CHARS, or None."""
    if len(text) <= MAX_SOURCE_CHARS:
        return None
    line = text.count("\n", 0, MAX_SOURCE_CHARS) + 1
    column = MAX_SOURCE_CHARS - (text.rfind("\n", 0, MAX_SOURCE_CHARS) + 1) + 1
    return AttnSyntaxError(f"file too large: {len(text)} characters, more than the limit of "
                           f"{MAX_SOURCE_CHARS}", Span(filename, line, column, line, column + 1),
                           source)


def too_deep(root):
    """The first surface node (pre-order, left to right) at level MAX_DEPTH + 1, or None."""
    stack = [(root, 1)]
    while stack:
        node, level = stack.pop()
        if level > MAX_DEPTH:
            return node
        for child in reversed(node.children):
            if not hasattr(child, "kind"):
                continue
            if child.kind == "kwarg" or (child.kind in ("and", "or") and child.kind == node.kind):
                stack.append((child, level))
            else:
                stack.append((child, level + 1))
    return None


class Heights:
    """Heights of IR nodes (a leaf is 1), memoised by identity; the memo keeps its nodes alive
    so that an id is never reused while it is a key."""

    def __init__(self):
        self._memo: dict[int, tuple[Expr, int]] = {}

    def _known(self, e: Expr) -> bool:
        got = self._memo.get(id(e))
        return got is not None and got[0] is e

    def of(self, e: Expr) -> int:
        stack = [e]
        while stack:
            node = stack[-1]
            if self._known(node):
                stack.pop()
                continue
            todo = [c for c in node.args if not self._known(c)]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            height = 1 + max((self._memo[id(c)][1] for c in node.args), default=0)
            self._memo[id(node)] = (node, height)
        return self._memo[id(e)][1]


def tree_size(roots) -> int:
    """The number of nodes of the trees ``roots`` with shared sub-trees counted at each use."""
    memo: dict[int, int] = {}
    for root in roots:
        stack = [root]
        while stack:
            node = stack[-1]
            todo = [c for c in node.args if id(c) not in memo]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            memo[id(node)] = 1 + sum(memo[id(c)] for c in node.args)
    return sum(memo[id(r)] for r in roots)


def surface_operands(node) -> list:
    """The operands of the maximal chain of ``node.kind`` ('and' or 'or') rooted at ``node``,
    left to right (iterative)."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if n.kind == node.kind:
            stack.extend(reversed(n.children))
        else:
            out.append(n)
    return out


def flatten(op: Op, items, budget: int) -> list[Expr] | None:
    """``items`` with every node of ``op`` replaced by its operands, left to right; None when
    that takes more than ``budget`` steps (nested lets can make it exponential)."""
    out: list[Expr] = []
    steps = 0
    for item in items:
        stack = [item]
        while stack:
            steps += 1
            if steps > budget:
                return None
            n = stack.pop()
            if n.op is op:
                stack.extend(reversed(n.args))
            else:
                out.append(n)
    return out


def balanced(op: Op, items: list[Expr], span: Span) -> Expr:
    """``items`` joined by ``op`` as a balanced tree (recursion depth log2 of their number)."""
    if len(items) == 1:
        return items[0]
    mid = len(items) // 2
    return Expr(op, Type.BOOL, (balanced(op, items[:mid], span), balanced(op, items[mid:], span)),
                None, span)


def logic_chain(op: Op, items: list[Expr], span: Span, as_written, budget: int) -> Expr | None:
    """The IR of a chain of ``op`` over ``items``: ``as_written()`` when the flattened chain has
    at most LOGIC_RUN operands, else a balanced tree over them; None beyond ``budget``."""
    flat = flatten(op, items, budget)
    if flat is None:
        return None
    if len(flat) <= LOGIC_RUN:
        return as_written()
    return balanced(op, flat, span)
