"""The tile tables a launch reads on the device, built from tile classes.

Input: tile classes (0 empty, 1 partial, 2 full) ``[Bt, G, H, nQT, nKT]`` — from the analysis
(host block maps) or classified on the device (codegen/device_tiles.py). Output:
:class:`DeviceTiles` — int32 tables ``[Bt, G, H, nQT]`` of counts and ``[Bt, G, H, nQT, W]``
of key-tile indices for full and partial tiles, and the classes they were built from (``Bt``
1 when the batch shares them, ``G`` the program groups of codegen/skeleton.py, ``H`` 1 when
every head shares them; int64 when a row has 2**31 key tiles or more). The tables are built
with torch on the device, so the host only moves the classes.

*Band form.* When, in every row of tiles, the full key tiles form at most two runs of
consecutive tiles and the partial ones at most three, the tables hold run bounds instead of
lists: ``(first of run 0, length of run 0, first of run 1)`` for the full tiles and
``(first of run 0, length of run 0, first of run 1, length of run 1, first of run 2)`` for the
partial ones (the counts give the last run's length); the kernel then walks arithmetic ranges
and loads no index per tile (``band``). Causal masks, sliding windows with sinks or globals
(Longformer), chunks and gathered dilated windows have this form.

*Transposition* (:func:`transposed`, the backward's dK/dV kernel, codegen/skeleton_bwd.py): the
same tiles listed per key tile — counts ``[Bt, G, H, nKT]`` and query-tile indices — built
from the classes transposed; tables made on the device without their classes are read back
into classes first (:func:`classes_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DeviceTiles:
    """The tile tables of one launch on the device: ``groups`` [G, 4] int64 rows (first query
    row, query count, first key row, key count) walked with steps ``step_q``/``step_k``; counts
    [Bt, G, H, nQT] and padded key-tile indices [Bt, G, H, nQT, W] (int32) of full and partial
    tiles; ``band``: the index tables hold run bounds. A table dimension of size 1 is
    broadcast (stride 0)."""

    groups: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    part_num: torch.Tensor
    part_idx: torch.Tensor
    step_q: int = 1
    step_k: int = 1
    band: bool = False
    key_counts: tuple[int, ...] = ()        # every group's key count, when known on the host
    run_k: int = 1                          # consecutive key rows per step (codegen/gather.py)
    classes: torch.Tensor | None = None     # int8 [Bt, G, H, nQT, nKT], when built from them

    def listing(self, rows: int = 8, heads: int = 2) -> list[str]:
        """The walked key tiles of the first ``rows`` query tiles of the first ``heads`` heads
        of batch row 0, group 0 (list form; read back from the device: for dumps), and the
        totals."""
        out = [f"tile lists: {int(self.full_num.sum())} full and {int(self.part_num.sum())} "
               f"partial tiles walked in all"]
        for h in range(min(heads, self.full_num.shape[2])):
            for i in range(min(rows, self.full_num.shape[3])):
                full = self.full_idx[0, 0, h, i, :int(self.full_num[0, 0, h, i])].tolist()
                part = self.part_idx[0, 0, h, i, :int(self.part_num[0, 0, h, i])].tolist()
                out.append(f"  head {h} query tile {i}: full {full} partial {part}")
        return out

    def even_keys(self, block_n: int) -> bool:
        """Whether every group has the same key count, a multiple of ``block_n``, and no run of
        residues (whose first rows may lie below 0): the listed key tiles then lie inside the
        keys (the kernel's ``EVEN_N``)."""
        return (len(set(self.key_counts)) == 1 and self.key_counts[0] % block_n == 0
                and self.run_k == 1)

    @property
    def n_query_tiles(self) -> int:
        return self.full_num.shape[-1]

    @property
    def n_groups(self) -> int:
        return self.groups.shape[0]


def index_lists(sel: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts [..., N] and ascending column indices [..., N, width] (:func:`index_dtype`,
    0-padded) of a bool [..., N, M] with at most ``width`` true entries per row."""
    kind = index_dtype(sel.shape[-1])
    num = sel.sum(dim=-1, dtype=kind)
    pos = torch.where(sel, torch.cumsum(sel, dim=-1) - 1, width).to(torch.int64)
    cols = torch.arange(sel.shape[-1], dtype=kind, device=sel.device).expand(sel.shape)
    idx = torch.zeros(sel.shape[:-1] + (width + 1,), dtype=kind, device=sel.device)
    idx.scatter_(-1, pos, cols)         # unselected columns all land in the dropped last slot
    return num, idx[..., :width].contiguous()


def _run_starts(sel: torch.Tensor) -> torch.Tensor:
    starts = sel.clone()
    starts[..., 1:] &= ~sel[..., :-1]
    return starts


def index_dtype(n_tiles: int) -> torch.dtype:
    """int32 for tile indices and counts, int64 when a row has 2**31 tiles or more."""
    return torch.int32 if n_tiles < 2 ** 31 else torch.int64


def _first(sel: torch.Tensor) -> torch.Tensor:
    """Index of the first true entry of each row (0 when none, or when rows are empty)."""
    kind = index_dtype(sel.shape[-1])
    if sel.shape[-1] == 0:
        return torch.zeros(sel.shape[:-1], dtype=kind, device=sel.device)
    return torch.where(sel.any(-1), sel.to(torch.int8).argmax(-1), 0).to(kind)


FULL_RUNS = 2
PARTIAL_RUNS = 3


def _run_bounds(sel: torch.Tensor, starts: torch.Tensor, runs: int) -> torch.Tensor:
    """(start 0, length 0, start 1, length 1, ..., start R-1) [..., 2R - 1] of the runs of each
    row (:func:`index_dtype`; absent runs hold 0)."""
    number = starts.to(torch.int8).cumsum(-1, dtype=torch.int8)        # run number 1..R
    cols = []
    for r in range(1, runs + 1):
        cols.append(_first(starts & (number == r)))
        if r < runs:
            cols.append((sel & (number == r)).sum(-1, dtype=index_dtype(sel.shape[-1])))
    return torch.stack(cols, dim=-1)


def band_tables(classes: torch.Tensor):
    """(full count, full runs [..., 3], partial count, partial runs [..., 5]) of tile classes
    [..., N, M] (runs as :func:`_run_bounds` gives them), or None when some row has more than
    two runs of full tiles or three of partial ones (reads one flag back from the device)."""
    full, part = classes == 2, classes == 1
    full_starts, part_starts = _run_starts(full), _run_starts(part)
    n_full_runs = full_starts.sum(-1, dtype=torch.int32)
    n_part_runs = part_starts.sum(-1, dtype=torch.int32)
    if n_full_runs.numel() and bool(((n_full_runs > FULL_RUNS) | (n_part_runs > PARTIAL_RUNS)).any()):
        return None
    kind = index_dtype(classes.shape[-1])
    return (full.sum(-1, dtype=kind), _run_bounds(full, full_starts, FULL_RUNS),
            part.sum(-1, dtype=kind), _run_bounds(part, part_starts, PARTIAL_RUNS))


def from_classes(classes: torch.Tensor, groups, step_q: int = 1, step_k: int = 1,
                 band: bool = True, run_k: int = 1) -> DeviceTiles:
    """DeviceTiles from tile classes [Bt, G, H, nQT, nKT] on the device (band form where it
    fits and ``band``; else index lists, padded to the widest row)."""
    device = classes.device
    tables = band_tables(classes) if band else None
    is_band = tables is not None
    if not is_band:
        full, part = classes == 2, classes == 1
        most = torch.maximum(full.sum(-1).amax(), part.sum(-1).amax()) if full.numel() else 1
        width = max(1, int(most))
        tables = (*index_lists(full, width), *index_lists(part, width))
    f_num, f_idx, p_num, p_idx = tables
    width = max(f_idx.shape[-1], p_idx.shape[-1])      # one stride serves both index tables

    def widened(t):
        return torch.nn.functional.pad(t, (0, width - t.shape[-1])).contiguous()

    group_rows = torch.as_tensor(np.array(groups, dtype=np.int64).reshape(-1, 4), device=device)
    counts = tuple(int(row[3]) for row in np.array(groups, dtype=np.int64).reshape(-1, 4))
    return DeviceTiles(group_rows, f_num.contiguous(), widened(f_idx), p_num.contiguous(),
                       widened(p_idx), step_q, step_k, is_band, counts, run_k, classes)


def from_block_maps(maps: list[np.ndarray], groups, device, step_q: int = 1,
                    step_k: int = 1, run_k: int = 1) -> DeviceTiles:
    """DeviceTiles from host block maps, one [G, H, nQT, nKT] per batch element (one when the
    batch shares them); maps of different sizes are padded with empty tiles."""
    n_qt = max(m.shape[-2] for m in maps)
    n_kt = max(m.shape[-1] for m in maps)
    stacked = np.stack([np.pad(m, [(0, 0)] * (m.ndim - 2) + [(0, n_qt - m.shape[-2]),
                                                              (0, n_kt - m.shape[-1])])
                        for m in maps])
    classes = torch.as_tensor(np.ascontiguousarray(stacked, dtype=np.int8), device=device)
    return from_classes(classes, groups, step_q, step_k, run_k=run_k)


# ------------------------------------------------------------------------- transposition
def _runs_member(num: torch.Tensor, bounds: torch.Tensor, runs: int, cols: torch.Tensor):
    """bool [..., M]: column ``cols`` lies in one of the ``runs`` runs of band bounds
    [..., 2 runs - 1] (:func:`_run_bounds`) whose lengths add up to ``num`` [...]."""
    b = bounds.to(torch.int64)
    left = num.to(torch.int64)
    inside = torch.zeros(num.shape + cols.shape, dtype=torch.bool, device=num.device)
    for r in range(runs):
        start = b[..., 2 * r]
        length = b[..., 2 * r + 1] if r < runs - 1 else left
        length = torch.minimum(length, left)
        left = left - length
        inside |= (cols >= start[..., None]) & (cols < (start + length)[..., None])
    return inside


def _listed(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """bool [..., n_cols]: the columns of padded index lists [..., W] (the first ``num``)."""
    slots = torch.arange(idx.shape[-1], device=idx.device)
    cols = torch.where(slots < num[..., None].to(torch.int64), idx.to(torch.int64), n_cols)
    out = torch.zeros(num.shape + (n_cols + 1,), dtype=torch.bool, device=num.device)
    out.scatter_(-1, cols, True)        # the dropped slots all land in the last column
    return out[..., :n_cols]


def classes_of(tiles: DeviceTiles, n_key_tiles: int) -> torch.Tensor:
    """The tile classes int8 [Bt, G, H, nQT, nKT] a launch walks: those it was built from,
    else (tables made on the device, codegen/device_tiles.py) read back from its tables, band
    or list form, over ``n_key_tiles`` key tiles."""
    if tiles.classes is not None:
        return tiles.classes
    if tiles.band:
        cols = torch.arange(n_key_tiles, device=tiles.full_num.device)
        full = _runs_member(tiles.full_num, tiles.full_idx[..., :2 * FULL_RUNS - 1],
                            FULL_RUNS, cols)
        part = _runs_member(tiles.part_num, tiles.part_idx[..., :2 * PARTIAL_RUNS - 1],
                            PARTIAL_RUNS, cols)
    else:
        full = _listed(tiles.full_num, tiles.full_idx, n_key_tiles)
        part = _listed(tiles.part_num, tiles.part_idx, n_key_tiles)
    return (2 * full.to(torch.int8) + part.to(torch.int8)).contiguous()


def transposed(tiles: DeviceTiles, n_key_tiles: int) -> DeviceTiles:
    """The tables of the same tiles walked by key tile: counts [Bt, G, H, nKT] and query-tile
    indices [Bt, G, H, nKT, W] of the full and partial tiles in each key tile's column (band
    form where it fits), with the same groups and steps (the backward's dK/dV kernel). A tile
    is full or partial in the transposed tables exactly when it is in ``tiles``."""
    classes = classes_of(tiles, n_key_tiles)
    out = from_classes(classes.transpose(-1, -2).contiguous(), np.zeros((tiles.n_groups, 4)),
                       tiles.step_q, tiles.step_k, run_k=tiles.run_k)     # (groups: below)
    return DeviceTiles(tiles.groups, out.full_num, out.full_idx, out.part_num, out.part_idx,
                       tiles.step_q, tiles.step_k, out.band, tiles.key_counts, tiles.run_k,
                       out.classes)
