"""The tile tables a launch reads on the device, built from the analysis's tile lists.

Input: host :class:`~attndsl.analysis.descriptors.TileLists` (per batch element and group).
Output: :class:`DeviceTiles` — int32 tables ``[Bt, G, H, nQT]`` of counts and
``[Bt, G, H, nQT, W]`` of key-tile indices, for full and partial tiles (``Bt`` 1 when the
batch shares them, ``G`` the program groups of codegen/skeleton.py).

*Band form.* When, in every row of tiles, the full key tiles form one contiguous run and the
partial ones at most two, the tables hold loop bounds instead of lists: the full table's
first slot is the first full tile (the count gives the run), the partial table holds
``(first of run 0, length of run 0, first of run 1)``; the kernel then walks arithmetic
ranges and loads no index per tile (``band``). Sliding windows, causal masks, chunks and
gathered dilated windows all have this form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attndsl.analysis.descriptors import TileLists


@dataclass(frozen=True)
class DeviceTiles:
    """The tile tables of one launch on the device: ``groups`` [G, 4] int64 rows (first query
    row, query count, first key row, key count) walked with steps ``step_q``/``step_k``; counts
    [Bt, G, H, nQT] and padded key-tile indices [Bt, G, H, nQT, W] (int32) of full and partial
    tiles, ``Bt`` 1 when the batch shares them; ``band``: the index tables hold run bounds."""

    groups: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor
    part_num: torch.Tensor
    part_idx: torch.Tensor
    step_q: int = 1
    step_k: int = 1
    band: bool = False

    @property
    def n_query_tiles(self) -> int:
        return self.full_num.shape[-1]

    @property
    def n_groups(self) -> int:
        return self.groups.shape[0]


def _runs(num: np.ndarray, idx: np.ndarray, most: int):
    """(starts [..., most], lengths [..., most]) of the ascending runs of consecutive indices
    of every padded list, or None when some list has more than ``most`` runs."""
    width = idx.shape[-1]
    col = np.arange(width)
    live = col < num[..., None]
    breaks = np.zeros(idx.shape, dtype=bool)
    breaks[..., 1:] = (idx[..., 1:] != idx[..., :-1] + 1) & live[..., 1:]
    if (breaks.sum(axis=-1) > most - 1).any():
        return None
    first = np.where(num > 0, idx[..., 0], 0)
    cut = np.where(breaks.any(axis=-1), np.argmax(breaks, axis=-1), num)     # length of run 0
    second = np.take_along_axis(idx, np.minimum(cut, width - 1)[..., None], axis=-1)[..., 0]
    second = np.where(cut < num, second, 0)
    starts = np.stack([first, second], axis=-1)[..., :most]
    lengths = np.stack([cut, num - cut], axis=-1)[..., :most]
    return starts, lengths


def band_form(full_num, full_idx, part_num, part_idx):
    """The band tables (full first [..., 1], partial (start 0, length 0, start 1) [..., 3]) of
    list tables, or None when some row is not one full run and at most two partial runs."""
    full = _runs(full_num, full_idx, 1)
    part = _runs(part_num, part_idx, 2)
    if full is None or part is None:
        return None
    (p_starts, p_lens) = part
    partial = np.stack([p_starts[..., 0], p_lens[..., 0], p_starts[..., 1]], axis=-1)
    return full_num, full[0][..., :1], part_num, partial


def upload(full_num, full_idx, part_num, part_idx, groups, device, step_q: int = 1,
           step_k: int = 1) -> DeviceTiles:
    """DeviceTiles from host tables [Bt, G, H, nQT(, W)], in band form where possible."""
    band = band_form(full_num, full_idx, part_num, part_idx)
    f_num, f_idx, p_num, p_idx = band if band is not None else (full_num, full_idx, part_num, part_idx)
    width = max(f_idx.shape[-1], p_idx.shape[-1])      # one stride serves both index tables

    def widened(a):
        return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])

    tables = (f_num, widened(f_idx), p_num, widened(p_idx))

    def dev(a):
        return torch.as_tensor(np.ascontiguousarray(a, dtype=np.int32), device=device)

    return DeviceTiles(torch.as_tensor(np.array(groups, dtype=np.int64).reshape(-1, 4), device=device),
                       *(dev(a) for a in tables), step_q, step_k, band is not None)


def stack_tables(per_batch: list[list[TileLists]], groups: list[tuple[int, int, int, int]],
                 device, step_q: int = 1, step_k: int = 1) -> DeviceTiles:
    """DeviceTiles from host TileLists indexed [batch element][group] (one batch element when
    the batch shares them); lists of different sizes are padded with empty rows."""
    flat = [t for row in per_batch for t in row]
    n_qt = max(t.full_num.shape[1] for t in flat)
    width = max(max(t.full_idx.shape[-1], t.partial_idx.shape[-1]) for t in flat)

    def num(a):
        return np.pad(a, [(0, 0), (0, n_qt - a.shape[1])])

    def idx(a):
        return np.pad(a, [(0, 0), (0, n_qt - a.shape[1]), (0, width - a.shape[-1])])

    def table(get, pad):
        return np.stack([np.stack([pad(get(t)) for t in row]) for row in per_batch])

    return upload(table(lambda t: t.full_num, num), table(lambda t: t.full_idx, idx),
                  table(lambda t: t.partial_num, num), table(lambda t: t.partial_idx, idx),
                  groups, device, step_q, step_k)


def group_tables(lists: TileLists, groups, device, step_q: int, step_k: int) -> DeviceTiles:
    """DeviceTiles of a gathered component: ``lists`` [G, nQT, W] (the head axis of the derived
    pattern is the group) shared by every head and batch element."""
    return upload(lists.full_num[None, :, None], lists.full_idx[None, :, None],
                  lists.partial_num[None, :, None], lists.partial_idx[None, :, None], groups,
                  device, step_q, step_k)
