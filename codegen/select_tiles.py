"""Tile lists of selector patterns, built on the call's device from its selection.

Input: a :class:`~attndsl.bound.BoundPattern` that uses selectors (``topk_blocks``,
``topp_blocks``, ``route``, ``random_blocks``), the call's sizes, a tile shape, the selector
tables of the call on its device (codegen/selection.py, laid out as codegen/tables.py describes)
and the call's tensor inputs. Output: :class:`Selected` — the tile classes int8 ``[B or 1, H,
nQT, nKT]`` (0 empty, 1 partial, 2 full) on the device and the padded width of a row's list;
:func:`select_tiles` turns them into list-form :class:`~codegen.tile_tables.DeviceTiles`.

How:

1. *Static, once per (pattern, sizes, tile shape, device).* The selector nodes of the clauses
   are the *atoms* (at most :data:`MAX_ATOMS`; a further one is treated as mixed on every
   tile). For every assignment of true / false to the atoms, the analysis classifies the tiles
   of the pattern with the atoms replaced by those constants (attndsl.analysis): the static
   part's classes under that assignment, uploaded once. Per block selector, each tile's range
   of selector blocks (first and last query block, first and last key block) is uploaded too.
2. *Per call, on the device* (torch ops, no host synchronisation): each atom's *state* per
   tile — ``none`` (false at every in-range pair of the tile), ``all`` (true at every one) or
   mixed — from 2-D prefix sums of its block table (block selectors: the number of selected
   blocks the tile covers, against how many it covers), or from the clusters present in the
   tile's rows and keys (``route``: none when they share no cluster, all when both hold one
   and the same).
3. A tile's class is the join over the assignments its atoms' states allow: empty when each
   allowed assignment's static class is empty, full when each is full, else partial.

Invariants: sound (every pair of a tile is allowed exactly when the mask under its own
assignment allows it, and that assignment is among the allowed ones); exact where every atom is
constant on the tile (selector blocks that are multiples of the tile, aligned): a selected
block inside the static part's full region is a full tile and runs no mask hook; an unselected
one is empty and never visited. Selector blocks smaller than the tile, or not aligned with it,
make the tiles they split partial.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from attndsl.analysis.call_tiles import block_maps
from attndsl.caches import LRUCache
from attndsl.interp import evaluate_scalar
from attndsl.ir import SELECTOR_OPS, Expr, Op, const, rewrite

from .tables import selector_atoms, with_tables
from .tile_tables import DeviceTiles, index_lists

MAX_ATOMS = 4                   # 2**4 static maps per call size at most
STATIC = LRUCache("codegen.select_static", 32)    # (pattern, sizes, block, device) -> _Static
GROUPS = LRUCache("codegen.select_groups", 64)    # (q_len, kv_len, device) -> groups [1, 4]
SUBSTITUTED = LRUCache("codegen.select_constants", 64)  # (pattern, atoms chosen) -> pattern


@dataclass(frozen=True)
class Selected:
    """The tile classes of one selector call on its device and the widest row's tile count."""

    classes: torch.Tensor           # int8 [B or 1, H, nQT, nKT]
    width: int
    # per atom (selector_atoms order): the atom and its states on each tile, (none, all) bool
    # [B or 1, H or 1, nQT, nKT]: false at every pair of the tile / true at every pair
    states: tuple = ()

    def describe(self) -> str:
        return (f"tile classes on the device from the call's selection: "
                f"{list(self.classes.shape)}, lists of at most {self.width} key tiles per row")


def substituted(pattern, chosen: dict[Expr, bool]):
    """The pattern with each selector node equal to a key of ``chosen`` replaced by its
    constant (tensor inputs it no longer reads undeclared)."""
    memo: dict = {}

    def constant(e: Expr):
        return const(chosen[e], e.span) if e.op in SELECTOR_OPS and e in chosen else None

    mask = rewrite(pattern.ir.mask, constant, memo)
    score = rewrite(pattern.ir.score, constant, memo) if pattern.ir.score is not None else None
    read = {x.value for r in (mask, score) if r is not None for x in r.walk()
            if x.op is Op.INDEX}
    return pattern.with_clauses(mask, score, (p for p in pattern.ir.params
                                              if not p.is_tensor or p.name in read))


class _Static:
    """Per call size: the static maps of every assignment, uploaded (``maps`` int8 [A, Bs, Hs,
    nQT, nKT]), the widest row of their union and each block atom's tile-to-block ranges."""

    def __init__(self, pattern, sizes, block, device, tensors: dict):
        q_len, kv_len, heads, kv_heads = sizes
        self.atoms = selector_atoms(pattern.ir)[:MAX_ATOMS]
        found = []
        for values in itertools.product((False, True), repeat=len(self.atoms)):
            fixed = substituted(pattern, dict(zip(self.atoms, values)))
            rows = block_maps(fixed, q_len, kv_len, heads, kv_heads, tensors, block)
            found.append(_stack(rows, heads))
        maps = np.stack(np.broadcast_arrays(*found))            # [A, Bs, Hs, nQT, nKT]
        self.width = max(1, int((maps != 0).any(axis=0).sum(axis=-1).max(initial=0)))
        self.maps = torch.as_tensor(np.ascontiguousarray(maps), device=device)
        self.ranges = [None if a.op is Op.ROUTE else
                       _block_ranges(pattern, a, q_len, kv_len, block, device)
                       for a in self.atoms]
        self.tiles_of_rows = {
            side: torch.as_tensor(np.arange(n) // bs, device=device)
            for side, n, bs in (("q", q_len, block[0]), ("k", kv_len, block[1]))}


def _stack(rows: list[np.ndarray], heads: int) -> np.ndarray:
    """[Bs, Hs, nQT, nKT] of per-batch-row maps [H or 1, nQT, nKT] (one row: shared)."""
    if all(r is rows[0] for r in rows):
        rows = rows[:1]
    hs = max(r.shape[0] for r in rows)
    return np.stack([np.broadcast_to(r, (hs,) + r.shape[1:]) for r in rows])


def _block_ranges(pattern, atom: Expr, q_len: int, kv_len: int, block, device):
    """int64 tensors (first query block, last query block) [nQT] — relative to the block of
    the first query row, as the tables are — and (first key block, last key block) [nKT]."""
    b = int(evaluate_scalar(atom.args[1], dict(pattern.values)))
    bq, bk = block
    offset = kv_len - q_len
    first = offset // b
    r0 = np.arange(0, q_len, bq)
    r1 = np.minimum(r0 + bq, q_len) - 1
    k0 = np.arange(0, kv_len, bk)
    k1 = np.minimum(k0 + bk, kv_len) - 1
    return tuple(torch.as_tensor(x, dtype=torch.int64, device=device)
                 for x in ((r0 + offset) // b - first, (r1 + offset) // b - first,
                           k0 // b, k1 // b))


def _static(pattern, sizes, block, device, tensors: dict) -> _Static:
    """The static part of a call size; kept when the substituted patterns read no tensor input
    (else computed per call from the tensors, on the host)."""
    fixed = substituted(pattern, dict.fromkeys(selector_atoms(pattern.ir), True))
    given = {n: t for n, t in tensors.items() if n in fixed.tensor_params}
    if given:
        return _Static(pattern, sizes, block, device, given)
    key = (pattern.key, tuple(sizes), tuple(block), str(device))
    return STATIC.get(key, lambda: _Static(pattern, sizes, block, device, {}))


def _block_state(table: torch.Tensor, ranges) -> tuple[torch.Tensor, torch.Tensor]:
    """(none, all) bool [B, H, nQT, nKT] of a block table [B, H, nqb, nkb] (or [nqb, nkb])."""
    if table.dim() == 2:
        table = table[None, None]
    i0, i1, j0, j1 = ranges
    sums = torch.zeros(table.shape[:2] + (table.shape[2] + 1, table.shape[3] + 1),
                       dtype=torch.int32, device=table.device)
    sums[..., 1:, 1:] = (table != 0).to(torch.int32).cumsum(-2).cumsum(-1)
    lo_i, hi_i = i0[:, None], (i1 + 1)[:, None]
    lo_j, hi_j = j0[None, :], (j1 + 1)[None, :]
    count = (sums[..., hi_i, hi_j] - sums[..., lo_i, hi_j] - sums[..., hi_i, lo_j]
             + sums[..., lo_i, lo_j])
    total = (hi_i - lo_i) * (hi_j - lo_j)
    return count == 0, count == total


def _route_state(cq: torch.Tensor, ck: torch.Tensor, n_clusters: int, static: _Static):
    """(none, all) bool [B, H, nQT, nKT] of cluster ids cq [B, H, q_len], ck [B, H, kv_len]."""
    def present(ids, tiles_of, n_tiles):
        flat = tiles_of.to(torch.int64) * n_clusters + ids.to(torch.int64)
        out = torch.zeros(ids.shape[:2] + (n_tiles * n_clusters,), dtype=torch.float32,
                          device=ids.device)
        out.scatter_(-1, flat, 1.0)
        return out.view(ids.shape[:2] + (n_tiles, n_clusters))

    n_qt, n_kt = static.maps.shape[-2:]
    pq = present(cq, static.tiles_of_rows["q"], n_qt)
    pk = present(ck, static.tiles_of_rows["k"], n_kt)
    shared = pq @ pk.transpose(-1, -2)          # clusters in both (exact: small integers)
    single = (pq.sum(-1) == 1)[..., :, None] & (pk.sum(-1) == 1)[..., None, :]
    return shared == 0, single & (shared > 0)


def selected_classes(pattern, sizes, block, tables: dict, tensors: dict, device) -> Selected:
    """The tile classes of a selector call (see the module): ``sizes`` (q_len, kv_len, heads,
    kv_heads), ``tables`` the call's selector tables by derived name on ``device``."""
    static = _static(pattern, sizes, block, device, tensors)
    derived = with_tables(pattern)[3]
    by_atom: dict[int, dict[str, str]] = {}
    for name, d in derived.items():
        by_atom.setdefault(d.atom, {})[d.kind] = name
    states = []
    for i, atom in enumerate(static.atoms):
        names = by_atom[i]
        if atom.op is Op.ROUTE:
            cq, ck = tables[names["route_q"]], tables[names["route_k"]]
            n_clusters = int(np.shape(tensors[atom.value])[-2])
            states.append(_route_state(cq, ck, n_clusters, static))
        else:
            table = tables[names["random" if atom.op is Op.RANDOM_BLOCKS else "blocks"]]
            states.append(_block_state(table, static.ranges[i]))
    nonempty = notfull = None
    for a, values in enumerate(itertools.product((False, True), repeat=len(static.atoms))):
        possible = None
        for (none, every), value in zip(states, values):
            here = ~none if value else ~every
            possible = here if possible is None else possible & here
        cls = static.maps[a]                                    # [Bs, Hs, nQT, nKT]
        some = cls != 0 if possible is None else possible & (cls != 0)
        short = cls != 2 if possible is None else possible & (cls != 2)
        nonempty = some if nonempty is None else nonempty | some
        notfull = short if notfull is None else notfull | short
    classes = torch.where(nonempty, torch.where(notfull, 1, 2), 0).to(torch.int8)
    return Selected(classes, static.width,
                    tuple((atom, none, every) for atom, (none, every) in zip(static.atoms, states)))


def constant_atoms(selected: Selected, b: int, tiles) -> tuple[tuple[int, bool], ...]:
    """((atom index, value), ...) of the atoms constant on every tile of ``tiles`` (a function
    of a state [H or 1, nQT, nKT] giving its entries at the tiles, broadcast, with unlisted ones
    True) of batch row ``b``: the pattern with them substituted (:func:`with_constants`) decides
    those tiles' pairs exactly as the pattern does. Reads the states on the host."""
    out = []
    for i, (_atom, none, every) in enumerate(selected.states):
        row = min(b, none.shape[0] - 1)
        if bool(tiles(none[row]).all()):
            out.append((i, False))
        elif bool(tiles(every[row]).all()):
            out.append((i, True))
    return tuple(out)


def with_constants(pattern, chosen: tuple[tuple[int, bool], ...]):
    """The pattern with its atoms ``(index in selector_atoms, value)`` substituted (kept per
    pattern and choice)."""
    def make():
        atoms = selector_atoms(pattern.ir)
        return substituted(pattern, {atoms[i]: value for i, value in chosen})

    return SUBSTITUTED.get((pattern.key, chosen), make)


def select_tiles(selected: Selected, heads: int, q_len: int, kv_len: int) -> DeviceTiles:
    """List-form DeviceTiles [Bt, 1, H, nQT(, W)] of a selector call's classes (one group of
    every row; the head dimension broadcast when every head has the same classes)."""
    classes = selected.classes
    if classes.shape[1] != heads:
        classes = classes.expand(classes.shape[0], heads, *classes.shape[2:])
    classes = classes[:, None]
    full_num, full_idx = index_lists(classes == 2, selected.width)
    part_num, part_idx = index_lists(classes == 1, selected.width)
    device = classes.device
    groups = GROUPS.get((q_len, kv_len, str(device)), lambda: torch.tensor(
        [[0, q_len, 0, kv_len]], dtype=torch.int64, device=device))
    return DeviceTiles(groups, full_num, full_idx, part_num, part_idx, key_counts=(kv_len,),
                       classes=classes)
