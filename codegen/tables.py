"""Selectors as tables: ``random_blocks``, ``topk_blocks``, ``topp_blocks`` and ``route`` are
computed per call (on the call's device by codegen/selection.py; the reference's NumPy tables by
:func:`table_values`) and read by the generated hooks as derived tensor inputs, named by their
content (a selector's op and arguments: equal selectors share one table, and a pattern with
some selectors replaced by constants names the others' tables as the pattern does).

Input: a :class:`~attndsl.bound.BoundPattern`. Output (:func:`with_tables`): the mask and score IR with every
selector replaced by reads of derived tensors, the tensor slots (user inputs first) and a
description of each derived tensor; :func:`table_values` computes them for a call. Derived names
start with '#', which no user identifier can.

* ``random_blocks(r, b, seed)``: ``T[q // b - first, k // b] == 1``, ``T`` [query blocks, nkb];
* ``topk_blocks`` / ``topp_blocks``: ``T[h, q // b - first, k // b] == 1`` with a batch dimension;
* ``route(c)``: ``CQ[h, q - (kv_len - q_len)] == CK[h, k]`` (cluster ids, with a batch dimension);
where ``first = (kv_len - q_len) // b`` is the block of the first query row.

A call's tile classes for selector patterns come from its selection (codegen/select_tiles.py);
the static analysis alone (``block_map``) relaxes the selectors (attndsl.analysis.relax).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attndsl.caches import LRUCache
from attndsl.interp import evaluate_scalar
from attndsl.ir import SELECTOR_OPS, Expr, Op, Type, rewrite
from attndsl.selectors import random_block_table


@dataclass(frozen=True)
class Derived:
    """A derived tensor: which selector, its constant arguments, and what it holds."""

    node: Expr
    kind: str           # 'random', 'blocks' (topk/topp), 'route_q' or 'route_k'
    args: tuple
    rank: int
    batched: bool
    atom: int = 0       # its selector's position in selector_atoms(pattern)


def _i(op: Op, *args: Expr) -> Expr:
    return Expr(op, Type.INT, args)


def _const(v: int) -> Expr:
    return Expr(Op.CONST, Type.INT, (), v)


WITH_TABLES = LRUCache("codegen.with_tables", 128)


def selector_atoms(ir) -> list[Expr]:
    """The distinct selector nodes of a pattern's clauses (equal by structure, spans aside), in
    the order of a walk of the mask then the score clause: the same list for every pattern
    with the same content."""
    seen: dict[Expr, None] = {}
    for root in ir.roots():
        for e in root.walk():
            if e.op in SELECTOR_OPS:
                seen.setdefault(e)
    return list(seen)


def with_tables(pattern):
    """(mask, score, slots, {name: Derived}) with the selectors of a BoundPattern read from
    derived tensors (kept per pattern: its IR and values never change)."""
    return WITH_TABLES.get(pattern.key, lambda: _with_tables(pattern))


def _with_tables(pattern):
    ir = pattern.ir
    values = dict(pattern.values)
    atom_of = {e: i for i, e in enumerate(selector_atoms(ir))}
    slots = {p.name: i for i, p in enumerate(p for p in ir.params if p.is_tensor)}
    derived: dict[str, Derived] = {}
    memo: dict = {}

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

    def table_read(e: Expr) -> Expr | None:
        if e.op in (Op.RANDOM_BLOCKS, Op.TOPK_BLOCKS, Op.TOPP_BLOCKS):
            args = tuple(evaluate_scalar(a, values) for a in e.args)
            if e.op is Op.RANDOM_BLOCKS:
                name = add(f"#random{args}", Derived(e, "random", args, 2, False, atom_of[e]))
                out = block_cell(e, name, with_head=False)
            else:
                name = add(f"#{e.op.value}{args}", Derived(e, "blocks", args, 3, True, atom_of[e]))
                out = block_cell(e, name, with_head=True)
        elif e.op is Op.ROUTE:
            cq = add(f"#route_q({e.value})", Derived(e, "route_q", (), 2, True, atom_of[e]))
            ck = add(f"#route_k({e.value})", Derived(e, "route_k", (), 2, True, atom_of[e]))
            offset = _i(Op.SUB, Expr(Op.KV_LEN, Type.INT), Expr(Op.Q_LEN, Type.INT))
            row = _i(Op.SUB, Expr(Op.Q, Type.INT), offset)
            h = Expr(Op.H, Type.INT)
            out = Expr(Op.EQ, Type.BOOL, (Expr(Op.INDEX, Type.INT, (h, row), cq),
                                          Expr(Op.INDEX, Type.INT, (h, Expr(Op.K, Type.INT)), ck)))
        else:
            return None
        return out

    score = rewrite(ir.score, table_read, memo) if ir.score is not None else None
    return rewrite(ir.mask, table_read, memo), score, slots, derived


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
