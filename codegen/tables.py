"""Selectors as tables: ``random_blocks``, ``topk_blocks``, ``topp_blocks`` and ``route`` are
computed per call on the host (by attndsl.selectors, the reference's own code) and read by the
generated hooks as derived tensor inputs.

Input: a :class:`~attndsl.bound.BoundPattern`. Output (:func:`with_tables`): the mask and score IR with every
selector replaced by reads of derived tensors, the tensor slots (user inputs first) and a
description of each derived tensor; :func:`table_values` computes them for a call. Derived names
start with '#', which no user identifier can.

* ``random_blocks(r, b, seed)``: ``T[q // b - first, k // b] == 1``, ``T`` [query blocks, nkb];
* ``topk_blocks`` / ``topp_blocks``: ``T[h, q // b - first, k // b] == 1`` with a batch dimension;
* ``route(c)``: ``CQ[h, q - (kv_len - q_len)] == CK[h, k]`` (cluster ids, with a batch dimension);
where ``first = (kv_len - q_len) // b`` is the block of the first query row.

The host's tile lists for selector patterns come from the relaxed mask
(attndsl.analysis.relax).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attndsl.caches import LRUCache
from attndsl.interp import evaluate_scalar
from attndsl.ir import Expr, Op, Param, TensorType, Type
from attndsl.selectors import random_block_table


@dataclass(frozen=True)
class Derived:
    """A derived tensor: which selector, its constant arguments, and what it holds."""

    node: Expr
    kind: str           # 'random', 'blocks' (topk/topp), 'route_q' or 'route_k'
    args: tuple
    rank: int
    batched: bool


def _i(op: Op, *args: Expr) -> Expr:
    return Expr(op, Type.INT, args)


def _const(v: int) -> Expr:
    return Expr(Op.CONST, Type.INT, (), v)


WITH_TABLES = LRUCache("codegen.with_tables", 128)


def with_tables(pattern):
    """(mask, score, slots, {name: Derived}) with the selectors of a BoundPattern read from
    derived tensors (kept per pattern: its IR and values never change)."""
    return WITH_TABLES.get(pattern.key, lambda: _with_tables(pattern))


def _with_tables(pattern):
    ir = pattern.ir
    values = dict(pattern.values)
    slots = {p.name: i for i, p in enumerate(p for p in ir.params if p.is_tensor)}
    derived: dict[str, Derived] = {}
    memo: dict[int, Expr] = {}

    def add(name: str, d: Derived) -> str:
        if name not in slots:
            slots[name] = len(slots)
            derived[name] = d
        return name

    def block_cell(e: Expr, name: str, with_head: bool) -> Expr:
        b = e.args[1]
        first = _i(Op.FLOORDIV, _i(Op.SUB, Expr(Op.KV_LEN, Type.INT), Expr(Op.Q_LEN, Type.INT)), b)
        row = _i(Op.SUB, _i(Op.FLOORDIV, Expr(Op.Q, Type.INT), b), first)
        col = _i(Op.FLOORDIV, Expr(Op.K, Type.INT), b)
        idx = (Expr(Op.H, Type.INT), row, col) if with_head else (row, col)
        return Expr(Op.EQ, Type.BOOL, (Expr(Op.INDEX, Type.INT, idx, name), _const(1)))

    def go(e: Expr) -> Expr:
        if id(e) in memo:
            return memo[id(e)]
        if e.op in (Op.RANDOM_BLOCKS, Op.TOPK_BLOCKS, Op.TOPP_BLOCKS):
            args = tuple(evaluate_scalar(a, values) for a in e.args)
            if e.op is Op.RANDOM_BLOCKS:
                name = add(f"#random{args}", Derived(e, "random", args, 2, False))
                out = block_cell(e, name, with_head=False)
            else:
                name = add(f"#{e.op.value}{len(derived)}", Derived(e, "blocks", args, 3, True))
                out = block_cell(e, name, with_head=True)
        elif e.op is Op.ROUTE:
            cq = add(f"#route_q{len(derived)}", Derived(e, "route_q", (), 2, True))
            ck = add(f"#route_k{len(derived)}", Derived(e, "route_k", (), 2, True))
            offset = _i(Op.SUB, Expr(Op.KV_LEN, Type.INT), Expr(Op.Q_LEN, Type.INT))
            row = _i(Op.SUB, Expr(Op.Q, Type.INT), offset)
            h = Expr(Op.H, Type.INT)
            out = Expr(Op.EQ, Type.BOOL, (Expr(Op.INDEX, Type.INT, (h, row), cq),
                                          Expr(Op.INDEX, Type.INT, (h, Expr(Op.K, Type.INT)), ck)))
        elif e.args:
            out = Expr(e.op, e.type, tuple(go(a) for a in e.args), e.value, e.span)
        else:
            out = e
        memo[id(e)] = out
        return out

    score = go(ir.score) if ir.score is not None else None
    return go(ir.mask), score, slots, derived


def table_values(derived: dict, grids, q_len: int, kv_len: int) -> dict:
    """NumPy values of the derived tensors for a call (``grids``: one CallGrid per batch
    element, whose selector tables are the reference's)."""
    out = {}
    for name, d in derived.items():
        if d.kind == "random":
            r, b, seed = (int(a) for a in d.args)
            first, last = (kv_len - q_len) // b, (kv_len - 1) // b
            out[name] = random_block_table(r, b, seed, first, last, kv_len).astype(np.int64)
        elif d.kind == "blocks":
            out[name] = np.stack([g.selectors.table(d.node)[0] for g in grids]).astype(np.int64)
        else:
            which = 0 if d.kind == "route_q" else 1
            out[name] = np.stack([g.selectors.table(d.node)[which] for g in grids]).astype(np.int64)
    return out


SELECTION_PATTERNS = LRUCache("codegen.selection_patterns", 64)


def selection_pattern(pattern):
    """The pattern with its selectors read from their tables and the tables declared as int
    tensor inputs (their '#' names): analysed with a call's tables
    (:func:`table_values`) as tensor inputs, its tile classes are the call's exact ones, the
    selected blocks included (attndsl.analysis reads a block table at tile-constant indices
    entry by entry)."""
    def make():
        mask, score, _, derived = with_tables(pattern)
        params = tuple(pattern.ir.params) + tuple(
            Param(name, TensorType(Type.INT, d.rank)) for name, d in derived.items())
        return pattern.with_clauses(mask, score, params)

    return SELECTION_PATTERNS.get(pattern.key, make)
