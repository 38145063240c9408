"""Relaxation: a bool expression rewritten into a superset of its pairs that is free of chosen
atoms (by polarity).

Input: a checked bool :class:`~attndsl.ir.Expr` and a predicate flagging nodes. Output: an
expression with no flagged node that holds wherever the input holds. Used for the static part of
patterns with data-dependent selectors (:func:`relaxed_mask`: the tiles a selector could open)
and for the candidate tiles that the device classifier checks (codegen/device_tiles.py).
"""

from __future__ import annotations

from ..ir import DATA_SELECTOR_OPS, Expr, Op, Type


def relax(expr: Expr, dynamic) -> Expr:
    """A bool expression free of the nodes that ``dynamic(node)`` flags, holding at least
    wherever ``expr`` holds (a superset of its pairs).

    Each bool sub-expression is rewritten for a polarity: *up* (the result must be implied by
    the original) or *down* (the result must imply it). ``and`` / ``or`` keep the polarity,
    ``not`` flips it, a bool ``if`` keeps it in its branches and, when its test contains a
    flagged node, becomes ``then or else`` (up) or ``then and else`` (down). Any other bool
    node containing a flagged node (a comparison, ``==`` of bools, the flagged node itself)
    becomes ``true`` (up) or ``false`` (down). Sub-trees without flagged nodes are kept as they
    are (shared sub-trees stay shared), so the result is never larger than ``expr``.
    """
    flagged: dict[int, bool] = {}
    stack = [(expr, False)]
    while stack:                                    # children before parents, iteratively
        node, ready = stack.pop()
        if id(node) in flagged:
            continue
        if ready:
            flagged[id(node)] = bool(dynamic(node)) or any(flagged[id(a)] for a in node.args)
        else:
            stack.append((node, True))
            stack.extend((a, False) for a in node.args if id(a) not in flagged)
    memo: dict[tuple[int, bool], Expr] = {}

    def go(e: Expr, up: bool) -> Expr:
        if not flagged[id(e)]:
            return e
        key = (id(e), up)
        if key in memo:
            return memo[key]
        if e.op in (Op.AND, Op.OR):
            out = Expr(e.op, e.type, tuple(go(a, up) for a in e.args), e.value, e.span)
        elif e.op is Op.NOT:
            out = Expr(e.op, e.type, (go(e.args[0], not up),), e.value, e.span)
        elif e.op is Op.IF and e.type is Type.BOOL and not dynamic(e):
            c, a, b = e.args
            a, b = go(a, up), go(b, up)
            if flagged[id(c)]:
                out = Expr(Op.OR if up else Op.AND, Type.BOOL, (a, b))
            else:
                out = Expr(Op.IF, Type.BOOL, (c, a, b), e.value, e.span)
        else:
            out = Expr(Op.CONST, Type.BOOL, (), up)
        memo[key] = out
        return out

    return go(expr, True)


def relaxed_mask(expr: Expr) -> Expr:
    """The mask with every data-dependent selector relaxed away (:func:`relax`): a superset
    of its pairs that reads no query or key vectors."""
    return relax(expr, lambda e: e.op in DATA_SELECTOR_OPS)


def without_selectors(pattern):
    """The static part of a :class:`~attndsl.bound.BoundPattern`: data-dependent selectors
    relaxed away from the mask, and a score clause that reads them dropped (a superset of the
    allowed pairs that reads no query or key vectors); the pattern itself when it has none."""
    if not pattern.uses_selectors():
        return pattern
    score = pattern.ir.score
    if score is not None and score.uses(*DATA_SELECTOR_OPS):
        score = None
    return pattern.with_clauses(relaxed_mask(pattern.ir.mask), score)
