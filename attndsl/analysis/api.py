"""The analysis entry points behind ``Pattern.block_map`` and ``Pattern.describe``.

A static call is analysed on its *allowed* pairs: the mask, strengthened by the condition under
which the score clause is finite (:mod:`.allowed`), so that a score of ``-inf`` by position
never leaves a tile marked full.

Input: a :class:`~attndsl.bound.BoundPattern` and a call's sizes, tile shape and tensor
inputs. Output: the block map or the :class:`~attndsl.analysis.descriptors.Description`.
A pattern's reductions are expanded at the call's sizes first (``BoundPattern.for_sizes``):
every pass below sees none. Solved row sets are kept in the ``analysis.row_sets`` cache per
(pattern, specialised mask, run-contiguous tensors); descriptions of calls without tensor inputs in
``analysis.descriptions`` per (pattern, lengths, heads, block) (:mod:`attndsl.caches`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np

from ..blocks import tile_shape
from ..bound import expr_digest
from ..caches import LRUCache
from ..errors import AttnCallError
from ..inputs import check_dense_size, check_lengths, out_of_memory, tensor_inputs
from ..ir import Expr, Type
from ..reference import CallGrid
from .allowed import allowed_bounds
from .blockmap import FULL, PARTIAL
from .blockmap import block_map as _block_map
from .descriptors import Description, KeyIntervals, key_intervals
from .fold import fold, head_classes
from .pieces import RowSets
from .solve import random_tables, run_tensors, solve

ROW_SETS = LRUCache("analysis.row_sets", 256)
DESCRIPTIONS = LRUCache("analysis.descriptions", 64)


def row_sets(pattern, expr=None, runs: frozenset = frozenset()) -> RowSets:
    """The mask (or a specialisation of it) solved for k."""
    expr = pattern.ir.mask if expr is None else expr
    return ROW_SETS.get((pattern.key, expr_digest(expr), runs),
                        lambda: solve(expr, dict(pattern.values), runs))


def _with_runs(pattern, tensors: dict):
    """Tensor inputs plus the run bounds of the 1-D int ones whose values form single runs."""
    derived: dict = {}
    for p in pattern.ir.params:
        if p.is_tensor and p.type.rank == 1 and p.type.elem is Type.INT:
            derived.update(run_tensors(p.name, tensors[p.name]))
    runs = frozenset(name.split("#")[0] for name in derived)
    return {**tensors, **derived}, runs


def _static_call(pattern, q_len, kv_len, heads, kv_heads, block, given):
    """(the pattern at these sizes: its reductions expanded, grid of the upper bound of the
    allowed pairs, lower-bound mask or None, block, runs)."""
    if pattern.uses_selectors():
        raise AttnCallError(f"pattern '{pattern.name}' selects blocks from the query and key "
                            "vectors at run time; block maps describe static patterns only")
    kv_heads = heads if kv_heads is None else kv_heads
    q_len, kv_len, heads, kv_heads = check_lengths(q_len, kv_len, heads, kv_heads)
    pattern.check_sizes(q_len, kv_len, heads, kv_heads)
    pattern = pattern.for_sizes(q_len, kv_len, heads, kv_heads)      # (attndsl/expand.py)
    block = tile_shape(block)
    check_dense_size(heads, -(-q_len // block[0]), -(-kv_len // block[1]), "block map")
    tensors, runs = _with_runs(pattern, tensor_inputs(pattern.ir, given, None)[0])
    lower, upper = allowed_bounds(pattern.ir, dict(pattern.values), tensors)
    if pattern.ir.score is not None:            # constant conditions (2.0 != 0.0) drop out
        sizes = {"q_len": q_len, "kv_len": kv_len, "heads": heads, "kv_heads": kv_heads}
        lower, upper = (fold(e, sizes, {}) for e in (lower, upper))   # parameters stay
    ir = replace(pattern.ir, mask=upper) if upper is not pattern.ir.mask else pattern.ir
    grid = CallGrid(ir, dict(pattern.values), q_len, kv_len, heads, kv_heads, tensors)
    return pattern, grid, (None if lower == upper else lower), block, runs


def _classes(pattern, grid, runs):
    """[(specialised mask, heads, row sets, sub-grid with one head)] per class of heads."""
    sizes = {"q_len": grid.q_len, "kv_len": grid.kv_len, "heads": grid.heads,
             "kv_heads": grid.kv_heads}
    out = []
    for expr, heads in head_classes(grid.ir.mask, grid.heads, grid.params, sizes):
        sub = copy.copy(grid)
        if expr is not grid.ir.mask:
            sub.ir = replace(grid.ir, mask=expr)
            sub.heads = sub.kv_heads = 1
            sub.mask_per_head = False
        sets = row_sets(pattern, expr, runs)
        if sets.tables:
            sub.tensors = {**sub.tensors, **random_tables(sets.tables, grid.q_len, grid.kv_len)}
        out.append((expr, heads, sets, sub))
    return out


def _class_maps(grid, block, classes) -> np.ndarray:
    bq, bk = block
    shape = (grid.heads, -(-grid.q_len // bq), -(-grid.kv_len // bk))
    if len(classes) == 1 and classes[0][3] is not None and classes[0][3].heads == grid.heads:
        return _block_map(classes[0][3], block, classes[0][2])
    out = np.empty(shape, dtype=np.int8)
    done: dict = {}                     # exact row sets -> block map (one head)
    for _expr, heads, sets, sub in classes:
        if sets.exact and sets in done:
            out[heads] = done[sets]
            continue
        out[heads] = _block_map(sub, block, sets)[0]
        if sets.exact:
            done[sets] = out[heads[0]]
    return out


def block_map(pattern, q_len, kv_len, heads=1, block=(128, 128), kv_heads=None,
              given=None) -> np.ndarray:
    """int8 [heads, ceil(q_len/BQ), ceil(kv_len/BK)]: 0 empty, 1 partial, 2 full (sound for every
    pattern, exact on the band family)."""
    try:
        return call_classes(pattern, q_len, kv_len, heads, block, kv_heads, given).block_map()
    except MemoryError:
        raise out_of_memory("the block map", {"q_len": q_len, "kv_len": kv_len,
                                              "heads": heads}) from None


@dataclass
class HeadClass:
    """Heads that share one specialised mask, its row sets and a one-head grid of the call
    (holding the derived tensors its pieces read)."""

    mask: Expr
    heads: list
    sets: RowSets
    grid: CallGrid

    @property
    def keys(self) -> KeyIntervals | None:
        return key_intervals(self.sets, self.mask, self.heads, self.grid)


@dataclass
class CallClasses:
    """A static call (grid, tile shape) split into classes of heads; see :func:`call_classes`.

    The classes describe an upper bound of the allowed pairs (the mask, cut by the score
    clause's literal -inf branches). ``lower`` is None when that bound is exact; otherwise it
    holds the classes of a lower bound, from which full tiles are proved.
    """

    grid: CallGrid
    block: tuple[int, int]
    classes: list
    lower: CallClasses | None = None

    @property
    def exact(self) -> bool:
        """Whether the classes' pairs are exactly the allowed pairs."""
        return self.lower is None

    def block_map(self) -> np.ndarray:
        upper = _class_maps(self.grid, self.block,
                            [(c.mask, c.heads, c.sets, c.grid) for c in self.classes])
        if self.lower is None:
            return upper
        full = self.lower.block_map() == FULL
        return np.where(full, FULL, np.minimum(upper, PARTIAL)).astype(np.int8)


def call_classes(pattern, q_len, kv_len, heads=1, block=(128, 128), kv_heads=None,
                 given=None) -> CallClasses:
    """The head classes of a static call: what block_map and describe are computed from."""
    pattern, grid, lower, block, runs = _static_call(pattern, q_len, kv_len, heads, kv_heads,
                                                     block, given or {})
    low = None
    if lower is not None:
        low_grid = CallGrid(replace(grid.ir, mask=lower), grid.params, grid.q_len, grid.kv_len,
                            grid.heads, grid.kv_heads, grid.tensors)
        low = CallClasses(low_grid, block, [HeadClass(*c) for c in _classes(pattern, low_grid, runs)])
    return CallClasses(grid, block, [HeadClass(*c) for c in _classes(pattern, grid, runs)], low)


def describe(pattern, q_len, kv_len, heads=1, block=(128, 128), kv_heads=None,
             given=None) -> Description:
    """The kernel-facing Description (block map, tile lists, key intervals) of a call."""
    given = given or {}
    # checked before the cache is looked up: True or 4.0 must not hit the entry of 1 or 4
    q_len, kv_len, heads, kv_heads = check_lengths(q_len, kv_len, heads,
                                                   heads if kv_heads is None else kv_heads)
    block = tile_shape(block)

    def compute() -> Description:
        call = call_classes(pattern, q_len, kv_len, heads, block, kv_heads, given)
        keys = tuple(c.keys for c in call.classes) if call.exact else (None,) * len(call.classes)
        return Description(q_len, kv_len, heads, call.block, call.block_map(), keys,
                           tuple(tuple(c.heads) for c in call.classes))

    try:
        if given:
            return compute()
        return DESCRIPTIONS.get((pattern.key, q_len, kv_len, heads, kv_heads, block), compute)
    except MemoryError:
        raise out_of_memory("the description", {"q_len": q_len, "kv_len": kv_len,
                                                "heads": heads}) from None
