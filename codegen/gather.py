"""Residue-class gathers: a dilated or strided pattern run over dense tiles of live keys.

Input: a :class:`~attndsl.bound.BoundPattern` (no tensor inputs, no selectors) and a call's
sizes. Output: a list of :class:`Component` — disjoint pieces of the allowed pairs, each run as
one launch of the skeleton — or ``None`` when the plain table-driven kernel is the strategy.

The analysis gives every row's exact key set as a union of pieces (attndsl.analysis
descriptors). A piece ``k in [lo, hi], (k - offset) mod m == l`` whose offset follows the query
(``offset = q + c``, a dilated window) keeps, for the queries of one residue class
``q = g (mod m)``, only the keys of one residue class ``k = g + c + l (mod m)``: taking every
m-th query row and every m-th key row makes those pairs dense. Such a piece becomes a
*gathered* component with one program group per residue class ``g`` (codegen/skeleton.py:
rows ``q_row0 + m * i`` against keys ``k_row0 + m * j``). A piece whose offset is constant
(``k = s (mod m)`` for every query) gathers only the keys (one group, query step 1). The other
pieces form one *plain* component. Components are made disjoint — each one's mask is the
pattern's mask, its own pieces, and none of the earlier components' pieces — so their results
merge exactly by log-sum-exp (codegen/kernel.py).

A gathered component's tile lists come from the analysis of a *derived* pattern over the
compressed indices: its ``h`` is the group, and ``q``/``k`` are replaced by the positions the
group's rows stand for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from attndsl.analysis import api
from attndsl.analysis.api import call_classes
from attndsl.analysis.descriptors import TileLists, tile_lists
from attndsl.analysis.pieces import b_and, b_not, b_or
from attndsl.analysis.rows import merge, piece_bounds, touch_and_cover
from attndsl.bound import BoundPattern
from attndsl.caches import LRUCache
from attndsl.interp import Evaluator
from attndsl.ir import SELECTOR_OPS, Expr, Op, Type, const, rewrite

MIN_MODULUS = 2


@dataclass(frozen=True)
class Component:
    """One launch: ``pattern`` is the original with its mask restricted to this component's
    pairs; ``groups`` rows (first query row, query count, first key row, key count) walked with
    steps ``step_q``/``step_k``; ``derived``: the pattern over the compressed indices whose
    tile lists are the launch's (None for a plain component: the pattern's own)."""

    pattern: BoundPattern
    step_q: int = 1
    step_k: int = 1
    groups: tuple[tuple[int, int, int, int], ...] = ()
    derived: BoundPattern | None = None
    derived_sizes: tuple[int, int] = (0, 0)
    # what the fast tile lists of a gathered component read (see group_lists)
    source: BoundPattern | None = None
    call: tuple[int, int, int, int] = (0, 0, 0, 0)      # q_len, kv_len, heads, kv_heads
    head: int = 0
    own: tuple = ()                                     # its pieces (one residue class)
    excluded: tuple = ()                                # the earlier components' pieces
    offset: tuple = ()                                  # ("q", shift) or ("const", residue)
    run_k: int = 1                                      # consecutive live residues per period

    @property
    def gathered(self) -> bool:
        return self.derived is not None


def enabled() -> bool:
    """``ATTNDSL_GATHER=0`` turns residue-class gathers off (every pattern runs on tile lists)."""
    return os.environ.get("ATTNDSL_GATHER", "1") != "0"


# ----------------------------------------------------------------------------- IR helpers

def _cmp(op: Op, a: Expr, b: Expr) -> Expr:
    return Expr(op, Type.BOOL, (a, b))


def _int(op: Op, *args: Expr) -> Expr:
    return Expr(op, Type.INT, tuple(args))


def _leaf(op: Op) -> Expr:
    return Expr(op, Type.INT)


def in_piece(p) -> Expr:
    """The IR of ``k`` lying in a piece: guard, bounds and residue class."""
    k = _leaf(Op.K)
    cond = b_and(p.guard, b_and(_cmp(Op.GE, k, p.lo), _cmp(Op.LE, k, p.hi)))
    if p.residue is not None:
        res = _int(Op.MOD, _int(Op.SUB, k, p.residue.offset), const(p.residue.modulus))
        live = const(False)
        for r in sorted(p.residue.live):
            live = b_or(live, _cmp(Op.EQ, res, const(int(r))))
        cond = b_and(cond, live)
    return cond


def substitute(expr: Expr, leaves: dict) -> Expr:
    """``expr`` with every leaf whose op is a key of ``leaves`` replaced by its value (shared
    sub-trees stay shared)."""
    return rewrite(expr, lambda e: None if e.args else leaves.get(e.op))


# ----------------------------------------------------------------------------- planning

def _run_start(live: frozenset, m: int) -> int | None:
    """The first residue of ``live`` when it is one run of consecutive residues (mod m)."""
    for first in sorted(live):
        if {(first + i) % m for i in range(len(live))} == set(live):
            return first
    return None


def _offset_kind(pattern, piece, q_len: int, kv_len: int, heads: int, kv_heads: int, head: int):
    """('q', c, run) when the piece's live keys are ``q + c + i`` (mod m, i < run) on every row,
    ('const', s, run) when they are ``s + i`` (mod m) on every row, else None."""
    res = piece.residue
    if res is None or res.modulus < MIN_MODULUS or q_len == 0 or len(res.live) >= res.modulus:
        return None
    first = _run_start(res.live, res.modulus)
    if first is None:
        return None
    grid = pattern.grid(q_len, kv_len, heads, kv_heads, {})
    rows = np.arange(q_len, dtype=np.int64)
    env = grid.env(np.array([head]), rows, np.zeros(1, dtype=np.int64))
    with np.errstate(all="ignore"):
        off = np.broadcast_to(np.asarray(Evaluator(env).sub(res.offset), dtype=np.int64),
                              (1, q_len, 1)).ravel()
    m, run = res.modulus, len(res.live)
    pos = rows + (kv_len - q_len)
    shift = np.unique((off - pos + first) % m)
    if len(shift) == 1:
        return ("q", int(shift[0]), run)
    fixed = np.unique((off + first) % m)
    return ("const", int(fixed[0]), run) if len(fixed) == 1 else None


def _count(first: int, total: int, step: int, run: int = 1) -> int:
    """How many of the rows ``first + step * t + i`` (i < run) lie below ``total``."""
    return sum(max(0, -(-(total - first - i) // step)) for i in range(run))


def _groups(kind, value: int, m: int, run: int, q_len: int, kv_len: int):
    """The group rows and steps of a gathered component."""
    off = kv_len - q_len
    if kind == "const":
        k_row0 = _first_row(value, m, run)
        return 1, m, ((0, q_len, k_row0, _count(k_row0, kv_len, m, run)),)
    groups = []
    for g in range(m):
        q_row0 = (g - off) % m
        k_row0 = _first_row((g + value) % m, m, run)
        groups.append((q_row0, _count(q_row0, q_len, m), k_row0, _count(k_row0, kv_len, m, run)))
    return m, m, tuple(groups)


def _first_row(start: int, m: int, run: int):
    """The first key row of a run of residues starting at residue ``start``: one period earlier
    when the run wraps past ``m`` (its head, residues 0.., comes first; rows below 0 are
    masked by the kernel). Works elementwise on arrays."""
    return start - m * ((start + run) > m)


def key_rows(first, step: int, run: int, j):
    """The key rows of compressed key indices ``j``: ``first + step * (j // run) + j % run``."""
    return first + step * (j // run) + j % run


def _derived(pattern: BoundPattern, mask: Expr, kind, value: int, m: int, run: int, q_len: int,
             kv_len: int, head: int, groups) -> tuple[BoundPattern, tuple[int, int]]:
    """The component over compressed indices: ``h`` is the group ``g``; query ``i`` and key
    ``j`` stand for positions ``pos_q(g, i)`` and ``pos_k(g, j)``."""
    off = kv_len - q_len
    d_q = max(g[1] for g in groups)
    d_kv = max(g[3] for g in groups)
    q_index = _int(Op.SUB, _leaf(Op.Q), _int(Op.SUB, _leaf(Op.KV_LEN), _leaf(Op.Q_LEN)))
    g = _leaf(Op.H)
    j = _leaf(Op.K)
    k_step = _int(Op.ADD, _int(Op.MUL, const(m), _int(Op.FLOORDIV, j, const(run))),
                  _int(Op.MOD, j, const(run)))
    if kind == "const":
        q_pos = _int(Op.ADD, const(off), q_index)
        k_pos = _int(Op.ADD, const(int(_first_row(value, m, run))), k_step)
    else:
        q_first = _int(Op.MOD, _int(Op.SUB, g, const(off)), const(m))
        q_pos = _int(Op.ADD, const(off), _int(Op.ADD, q_first, _int(Op.MUL, const(m), q_index)))
        start = _int(Op.MOD, _int(Op.ADD, g, const(value)), const(m))
        wraps = _cmp(Op.GT, _int(Op.ADD, start, const(run)), const(m))
        k_first = Expr(Op.IF, Type.INT, (wraps, _int(Op.SUB, start, const(m)), start))
        k_pos = _int(Op.ADD, k_first, k_step)
    # original sizes and head first (constants), then the positions (which read derived sizes)
    fixed = {Op.Q_LEN: const(q_len), Op.KV_LEN: const(kv_len), Op.H: const(head)}
    moved = {Op.Q: q_pos, Op.K: k_pos}

    def over_groups(e: Expr | None) -> Expr | None:
        return None if e is None else substitute(substitute(e, fixed), moved)

    return pattern.with_clauses(over_groups(mask), over_groups(pattern.ir.score)), (d_q, d_kv)


def _applicable(pattern: BoundPattern) -> bool:
    ir = pattern.ir
    roots = [ir.mask] + ([ir.score] if ir.score is not None else [])
    if any(p.is_tensor for p in ir.params) or any(r.uses(*SELECTOR_OPS) for r in roots):
        return False                # random_blocks included: its pieces read analysis tables
    return ir.score is None or not ir.score.uses(Op.H)


COMPONENTS = LRUCache("codegen.gather_components", 64)
GROUP_MAPS = LRUCache("codegen.group_block_maps", 64)


def components(pattern: BoundPattern, q_len: int, kv_len: int, heads: int, kv_heads: int,
               block: tuple[int, int]) -> list[Component] | None:
    """The components of a call, or None for the plain kernel (kept per pattern and size)."""
    if not enabled() or not _applicable(pattern) or q_len == 0 or kv_len == 0:
        return None
    key = (pattern.key, q_len, kv_len, heads, kv_heads, tuple(block))
    return COMPONENTS.get(key, lambda: _components(pattern, q_len, kv_len, heads, kv_heads,
                                                   block))


def _components(pattern, q_len, kv_len, heads, kv_heads, block):
    call = call_classes(pattern, q_len, kv_len, heads, block, kv_heads)   # no block map needed
    if not call.exact or len(call.classes) != 1 or call.classes[0].keys is None:
        return None
    keys = call.classes[0].keys
    if any(e.uses(Op.INDEX) for p in keys.pieces for e in (p.guard, p.lo, p.hi)):
        return None                 # bounds that read tables of the analysis: not lowerable
    head = keys.heads[0]
    classes: dict[tuple, list] = {}
    plain = []
    for p in keys.pieces:
        kind = _offset_kind(pattern, p, q_len, kv_len, heads, kv_heads, head)
        if kind is None:
            plain.append(p)
        else:
            classes.setdefault((p.residue.modulus,) + kind, []).append(p)
    if not classes:
        return None
    mask = pattern.ir.mask
    out, earlier, before = [], const(False), ()
    if plain:
        own = _union(plain)
        out.append(Component(_restricted(pattern, b_and(mask, own))))
        earlier, before = own, tuple(plain)
    for (m, kind, value, run), ps in classes.items():
        own = _union(ps)
        restricted = b_and(mask, b_and(own, b_not(earlier)))
        step_q, step_k, groups = _groups(kind, value, m, run, q_len, kv_len)
        derived, sizes = _derived(pattern, restricted, kind, value, m, run, q_len, kv_len, head,
                                  groups)
        out.append(Component(_restricted(pattern, restricted), step_q, step_k, groups, derived, sizes,
                             pattern, (q_len, kv_len, heads, kv_heads), head, tuple(ps), before,
                             (kind, value), run))
        earlier, before = b_or(earlier, own), before + tuple(ps)
    return out


def _union(pieces) -> Expr:
    out = const(False)
    for p in pieces:
        out = b_or(out, in_piece(p))
    return out


def _restricted(pattern: BoundPattern, mask: Expr) -> BoundPattern:
    return pattern.with_clauses(mask, pattern.ir.score)


def group_block_map(component: Component, block: tuple[int, int]) -> np.ndarray:
    """Tile classes [G, nQT, nKT] of a gathered component over its compressed indices, from the
    row intervals of its pieces where they decide every tile (:func:`_fast_block_map`), else
    from the analysis of the derived pattern (its head axis is the group); kept per component."""
    def compute():
        bm = _fast_block_map(component, block)
        if bm is None:
            d_q, d_kv = component.derived_sizes
            bm = api.describe(component.derived, d_q, d_kv, len(component.groups), block,
                              1).block_map
        return bm

    key = (component.derived.key, component.groups, component.derived_sizes, tuple(block))
    return GROUP_MAPS.get(key, compute)


def group_lists(component: Component, block: tuple[int, int]) -> TileLists:
    """TileLists [G, nQT, W] of a gathered component (for tools and tests)."""
    return tile_lists(group_block_map(component, block), block)


MAX_SLOTS = 16


def _minus(lo, hi, cut_lo, cut_hi):
    """Each interval [lo, hi] (slots [..., S]) minus one interval per row [..., 1]: the part
    below the cut and the part above it (slots [..., 2S]; empty slots have lo > hi)."""
    live_cut = cut_lo <= cut_hi
    below_hi = np.where(live_cut, np.minimum(hi, cut_lo - 1), hi)
    above_lo = np.where(live_cut, np.maximum(lo, cut_hi + 1), 1)
    above_hi = np.where(live_cut, hi, 0)
    return np.concatenate([lo, above_lo], -1), np.concatenate([below_hi, above_hi], -1)


def _fast_block_map(comp: Component, block) -> np.ndarray | None:
    """The block map [G, nQT, nKT] of a gathered component over compressed indices, from the
    per-row key intervals of its pieces (exact: every row's keys in the class, minus the
    earlier components' intervals). None where that does not decide it: a score clause, an
    earlier residue piece, a bound the rows cannot evaluate."""
    if comp.source.ir.score is not None or any(p.residue is not None for p in comp.excluded):
        return None
    q_len, kv_len, heads, kv_heads = comp.call
    if len(comp.own) * 2 ** len(comp.excluded) > MAX_SLOTS:
        return None
    grid = comp.source.grid(q_len, kv_len, heads, kv_heads, {})
    rows = np.arange(q_len, dtype=np.int64)
    head = np.array([comp.head])
    lo, hi, unknown = piece_bounds(comp.own, grid, head, rows, keep_residues=True)
    cut_lo, cut_hi, unknown_cut = piece_bounds(comp.excluded, grid, head, rows, keep_residues=False)
    if unknown.any() or unknown_cut.any():
        return None
    lo, hi = lo[0].astype(np.int64), hi[0].astype(np.int64)                 # [R, slots]
    kind, value = comp.offset
    m, run = comp.step_k, comp.run_k
    pos = rows + (kv_len - q_len)
    first_key = _first_row((pos + value) % m if kind == "q" else np.full(q_len, value), m, run)[:, None]
    live = lo <= hi
    if ((lo - first_key) % m >= run)[live].any() or ((hi - first_key) % m >= run)[live].any():
        return None                                    # not the class the groups gather
    j_lo = np.where(live, _index_at_or_after(lo - first_key, m, run), 1)
    j_hi = np.where(live, _index_at_or_before(hi - first_key, m, run), 0)
    for c in range(cut_lo.shape[-1]):                  # minus the earlier components' keys
        c_lo, c_hi = cut_lo[0, :, c:c + 1].astype(np.int64), cut_hi[0, :, c:c + 1].astype(np.int64)
        live_c = c_lo <= c_hi
        j_lo, j_hi = _minus(j_lo, j_hi,
                            np.where(live_c, _index_at_or_after(c_lo - first_key, m, run), 1),
                            np.where(live_c, _index_at_or_before(c_hi - first_key, m, run), 0))
    j_lo, j_hi = merge(j_lo, j_hi)
    return _group_block_map(comp, rows, j_lo, j_hi, block)


def _index_at_or_after(d, m: int, run: int):
    """The compressed index of the first gathered key at or after offset ``d`` from the first
    (keys at offsets ``m * t + i``, i < run)."""
    t, r = d // m, d % m
    return np.where(r < run, run * t + r, run * (t + 1))


def _index_at_or_before(d, m: int, run: int):
    """The compressed index of the last gathered key at or before offset ``d``."""
    t, r = d // m, d % m
    return np.where(r < run, run * t + r, run * t + run - 1)


@dataclass(frozen=True)
class _Sizes:
    q_len: int
    kv_len: int


def _group_block_map(comp: Component, rows, j_lo, j_hi, block) -> np.ndarray:
    """Scatter per-row compressed intervals into [G, d_q, slots] by group and classify tiles.
    Rows past a group's end touch nothing and cover everything (the kernel never stores them);
    for covering, an interval reaching a group's last key reaches the common end (the keys a
    group lacks are masked by the kernel)."""
    d_q, d_kv = comp.derived_sizes
    groups = np.array(comp.groups, dtype=np.int64).reshape(-1, 4)
    n_groups, slots = len(groups), j_lo.shape[-1]
    if comp.step_q == 1:
        g_of, i_of = np.zeros(len(rows), np.int64), rows
    else:
        g_of = (rows + comp.call[1] - comp.call[0]) % comp.step_q
        i_of = (rows - groups[g_of, 0]) // comp.step_q
    lo = np.ones((n_groups, d_q, slots), np.int64)
    hi = np.zeros((n_groups, d_q, slots), np.int64)
    lo[g_of, i_of], hi[g_of, i_of] = j_lo, j_hi
    sizes, all_rows = _Sizes(d_q, d_kv), np.arange(d_q)
    touched, _ = touch_and_cover(lo, hi, sizes, all_rows, block)
    nk = groups[:, 3][:, None, None]
    hi = np.where((hi == nk - 1) & (lo <= hi), d_kv - 1, hi)
    padding = all_rows[None, :] >= groups[:, 1][:, None]          # rows a group does not have
    lo[padding], hi[padding] = 1, 0                 # ... cover anything (they are never stored),
    lo[..., 0][padding], hi[..., 0][padding] = 0, d_kv - 1      # once: coverage counts slots
    _, covered = touch_and_cover(lo, hi, sizes, all_rows, block)
    return np.where(touched & covered, 2, np.where(touched, 1, 0)).astype(np.int8)
