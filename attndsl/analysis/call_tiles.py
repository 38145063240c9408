"""The tile classes of one call, per batch element: what every backend walks.

Input: a :class:`~attndsl.bound.BoundPattern`, the call's sizes, its tensor inputs (NumPy arrays
or torch tensors, with an optional batch dimension) and a tile shape. Output
(:func:`block_maps`): one int8 map ``[H or 1, nQT, nKT]`` per batch row (0 empty, 1 partial, 2
full; one head when every head shares it; the same array object for rows that share their tensor
inputs). Tiles that a data-dependent selector could open are partial: their pairs are decided
per call.
"""

from __future__ import annotations

import numpy as np

from ..inputs import to_numpy
from ..ir import Op
from . import api
from .relax import without_selectors


def per_batch(pattern, given: dict) -> tuple[list[dict], list[int]]:
    """The NumPy tensor inputs of every distinct batch element (batch dimension removed), and
    for each batch row the index of its element; one element when no tensor input has a batch
    dimension with more than one row."""
    arrays = {n: to_numpy(t, n) for n, t in given.items()}
    params = [p for p in pattern.ir.params if p.is_tensor]
    batched = {p.name for p in params if np.ndim(arrays[p.name]) == p.type.rank + 1}
    rows = max([len(arrays[n]) for n in batched], default=1)
    out, seen, index = [], {}, []
    for b in range(rows):
        element = {p.name: (arrays[p.name][min(b, len(arrays[p.name]) - 1)]
                            if p.name in batched else arrays[p.name]) for p in params}
        key = tuple((n, t.shape, t.tobytes()) for n, t in element.items())
        if key not in seen:
            seen[key] = len(out)
            out.append(element)
        index.append(seen[key])
    return out, index


def block_maps(pattern, q_len, kv_len, heads, kv_heads, given, block) -> list[np.ndarray]:
    """Tile classes [H or 1, nQT, nKT] of the call, one per batch row (see the module)."""
    elements, index = per_batch(pattern, given)
    if not pattern.uses_selectors():
        maps = []
        for t in elements:
            desc = api.describe(pattern, q_len, kv_len, heads, block, kv_heads, t)
            maps.append(desc.block_map[:1] if len(desc.head_classes) == 1 else desc.block_map)
        return [maps[i] for i in index]
    static = without_selectors(pattern)             # reads no query or key vectors
    read = {x.value for x in static.ir.mask.walk() if x.op is Op.INDEX}
    maps = [np.minimum(api.block_map(
        static, q_len, kv_len, heads, block, kv_heads,
        all_inputs(static, {n: t for n, t in shared.items() if n in read})), 1).astype(np.int8)
        for shared in elements]
    return [maps[i] for i in index]


def all_inputs(pattern, tensors: dict) -> dict:
    """Tensor inputs for every declared tensor of a pattern (unused ones get a placeholder)."""
    return {p.name: tensors.get(p.name, np.zeros((1,) * p.type.rank)) for p in pattern.ir.params
            if p.is_tensor}
