"""The analyse and plan stages of the torch backend: which key ranges each tile of query rows
visits, and how.

``analyse`` — input: a :class:`~attndsl.call.BoundCall` and its
:class:`~attndsl.call.CallData`. Output: the Triton backend's :class:`~attndsl.codegen.plan.
CallAnalysis` (codegen/plan.py) at the CPU tile shape (:func:`cpu_block`), its tile classes on
the host: the pattern's maps, or residue-class components (codegen/gather.py) where each
gathered component's rows are strided views.

``plan`` — input: that analysis. Output: :class:`TorchPlan` — per batch row, the *parts* of the
call, each a pattern (the call's, or a component's restriction of it) and its *groups*: a group
is a set of query rows ``q_row0 + q_step * i`` (i < q_count) against key rows ``k_row0 + k_step
* j`` (j < k_count), walked in tiles of ``block_q`` compressed rows; each tile of rows has a
tuple of :class:`Segment` (compressed key ranges). Steps of 1 are plain slices of q, k and v; a
gathered group's steps are the component's modulus, so its rows and keys are strided views
(never copies) and its pairs dense.

Invariants: the segments of a row tile are disjoint and in key order; a segment is a maximal
run of consecutive kept tiles of one class: *full* (every pair allowed for every head: no mask
is evaluated) or *partial* (the generated mask decides); empty tiles are in no segment. The
backend scores a segment in steps of at most :func:`segment_cap` keys, so memory stays
O(rows x cap), never [q_len, kv_len]. The parts' pairs are disjoint and together the pattern's,
so their results merge exactly by log-sum-exp. Plans of calls whose analysis reads no data (no
tensor inputs, no selectors) are kept per (pattern, sizes, tile shape, launches).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from attndsl.bound import BoundPattern
from attndsl.caches import LRUCache
from attndsl.call import BoundCall, CallData
from attndsl.errors import AttnCallError
from attndsl.interp import evaluate_scalar
from attndsl.ir import Op

from .plan import CallAnalysis
from .plan import analyse as analyse_launches
from .tables import selector_atoms, with_tables

FULL, PARTIAL = 2, 1
# The cost model of a tile of rows (seconds on a 2-core CPU, torch's fused operator; only their
# ratios matter): per (head, query, key) pair scored, per (query, key) pair of a partial segment
# (its bias, and its mask: :func:`mask_cost`), per segment step, per tile of rows.
PAIR_COST = 1.7e-9
MASK_COST = 1.0e-9              # per (query, key) pair: the bias; plus per node of the mask:
NODE_COST = 0.3e-9              # an elementwise op,
READ_COST = 3.0e-9              # a tensor read (a gather); both times the heads when per head
SEGMENT_COST = 60e-6
TILE_COST = 100e-6
MAX_ROWS = 1024                 # rows of a merged tile
# elements of one [heads, rows, keys] block of scores the backend holds at once (float32: 4 MiB)
SEGMENT_ELEMENTS = 1 << 20
TORCH_PLANS = LRUCache("codegen.torch_plans", 64)
MASK_COSTS = LRUCache("codegen.torch_mask_costs", 256)


@dataclass(frozen=True)
class Segment:
    """Compressed key indices ``[c0, c1)`` of a group; ``full``: no mask evaluation."""

    c0: int
    c1: int
    full: bool


@dataclass(frozen=True)
class RowTile:
    """Compressed query indices ``[r0, r1)`` of a group and the key segments they visit."""

    r0: int
    r1: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Group:
    """Query rows ``q_row0 + q_step * i`` (i < q_count) against keys ``k_row0 + k_step * j``."""

    q_row0: int
    q_step: int
    q_count: int
    k_row0: int
    k_step: int
    k_count: int
    tiles: tuple[RowTile, ...]


@dataclass(frozen=True)
class Part:
    """A pattern (whose mask partial segments evaluate) and the groups that cover its pairs."""

    pattern: BoundPattern
    groups: tuple[Group, ...]
    gathered: bool
    heads: tuple[int, int] | None = None    # (first, count) of its query heads; None: all


@dataclass(frozen=True)
class TorchPlan:
    """The plan of one call: its tile shape and, per batch row, its parts."""

    block: tuple[int, int]
    # per batch row; one entry when every row has the same (rows may share one tuple)
    rows: tuple[tuple[Part, ...], ...]

    def describe(self) -> str:
        parts = self.rows[0] if self.rows else ()
        lines = [f"torch backend: tile {self.block[0]}x{self.block[1]}, {len(parts)} part(s)"
                 + (f", {len(self.rows)} batch rows" if len(self.rows) > 1 else "")]
        for i, part in enumerate(parts):
            segs = [s for g in part.groups for t in g.tiles for s in t.segments]
            full = sum(s.c1 - s.c0 for s in segs if s.full)
            partial = sum(s.c1 - s.c0 for s in segs if not s.full)
            g0 = part.groups[0]
            how = (f"gathered, {len(part.groups)} groups, steps q {g0.q_step} k {g0.k_step}"
                   if part.gathered else "plain slices")
            lines.append(f"part {i + 1}: {how}; {len(segs)} segments, keys per row tile: "
                         f"{full} in full segments, {partial} in partial ones")
        return "\n".join(lines)


def cpu_block(q_len: int, kv_len: int) -> tuple[int, int]:
    """The tile shape of the torch backend's analysis: ``ATTNDSL_TORCH_BLOCK=BQxBK``, or 64 x 64
    up to 16384 tokens and 128 x 128 beyond (fine tiles keep the work near the mask's edges;
    the plan merges tiles of rows where that is cheaper)."""
    spec = os.environ.get("ATTNDSL_TORCH_BLOCK")
    if spec:
        parts = spec.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise AttnCallError(f"ATTNDSL_TORCH_BLOCK must be ROWSxKEYS with positive integers "
                                f"(e.g. 64x64), got {spec!r}")
        return int(parts[0]), int(parts[1])
    return (64, 64) if max(q_len, kv_len) <= 16384 else (128, 128)


def selection_block(pattern: BoundPattern, q_len: int, kv_len: int) -> tuple[int, int]:
    """The tile shape of the torch backend's selection walk (attndsl/torch_select.py): rows of
    the smallest selector block ``b`` within 64 .. 512 (one query block per tile of rows: each
    head's list is that block's selection, and its key tiles are gathered once for all its
    rows), keys ``b`` within 64 .. 128; ``route`` has no block: :func:`cpu_block`; or
    ``ATTNDSL_TORCH_BLOCK``."""
    blocks = [int(evaluate_scalar(e.args[1], dict(pattern.values)))
              for e in selector_atoms(pattern.ir) if e.op is not Op.ROUTE]
    if os.environ.get("ATTNDSL_TORCH_BLOCK") or not blocks:
        return cpu_block(q_len, kv_len)
    b = min(blocks)
    return min(512, max(64, b)), min(128, max(64, b))


def segment_cap(heads: int, rows: int, bk: int) -> int:
    """The most keys of a segment that one step of the torch backend scores at once for
    ``rows`` rows (a block of [heads, rows, keys] scores or mask values): a multiple of the key
    tile ``bk``, at least one."""
    return max(bk, SEGMENT_ELEMENTS // max(1, heads * rows) // bk * bk)


def analyse(call: BoundCall, data: CallData, gathers: bool = True,
            block: tuple[int, int] | None = None) -> CallAnalysis:
    """The analyse stage of the torch backend: the Triton backend's (codegen/plan.py) at the
    CPU tile shape (or ``block``), tile classes always on the host (a selector call's, from its
    selection, read back: the launch keeps them in ``selected`` too); gathered only where every
    gathered component's rows are strided views (else the plain tiles)."""
    s = call.shape
    block = block or cpu_block(s.q_len, s.kv_len)
    found = analyse_launches(call, data, block, gathers=gathers, host=True)
    if found.launches[0].kind == "select":      # the selection's classes, read on the host
        a = found.launches[0]
        classes = a.selected.classes.cpu().numpy()
        maps = [classes[0]] * s.batch if classes.shape[0] == 1 else list(classes)
        return replace(found, launches=(replace(a, kind="tiles", maps=tuple(maps)),))
    if all(_strided(a.component) for a in found.launches if a.kind == "gather"):
        return found
    return analyse_launches(call, data, block, gathers=False, host=True)


def plan(analysis: CallAnalysis) -> TorchPlan:
    """The plan stage: each launch of the analysis becomes a part, its maps row tiles and
    segments (see the module). Plans of calls whose analysis reads no data are kept."""
    call, block = analysis.call, tuple(analysis.block)
    pattern, s = call.pattern, call.shape
    if pattern.tensor_params or pattern.uses_selectors():
        return _plan(analysis)
    key = (pattern.key, s.q_len, s.kv_len, s.heads, s.kv_heads, block,
           tuple((a.kind, a.pattern.key) for a in analysis.launches))
    return TORCH_PLANS.get(key, lambda: _plan(analysis))


def _plan(analysis: CallAnalysis) -> TorchPlan:
    s, block = analysis.call.shape, tuple(analysis.block)
    if len(analysis.launches) == 1 and analysis.launches[0].kind == "tiles":
        launch = analysis.launches[0]
        done: list[tuple[np.ndarray, tuple[Part, ...]]] = []
        rows = []
        for bm in launch.maps:      # batch rows that share their inputs share one map object
            parts = next((p for m, p in done if m is bm), None)
            if parts is None:
                parts = _plain(launch.pattern, bm, s, block)
                done.append((bm, parts))
            rows.append(parts)
        return TorchPlan(block, tuple(rows))
    out = []
    for launch in analysis.launches:
        if launch.kind == "gather":
            part, bm = launch.component, launch.maps[0]
            mask_pair = mask_cost(launch.pattern, s.heads)
            groups = tuple(Group(q0, part.step_q, nq, k0, part.step_k, nk,
                                 _row_tiles(bm[g:g + 1], nq, nk, block, s.heads, mask_pair)[0])
                           for g, (q0, nq, k0, nk) in enumerate(part.groups))
            out.append(Part(launch.pattern, groups, True))
        else:                       # the plain component of a gathered call: no tensor inputs
            out.extend(_plain(launch.pattern, launch.maps[0], s, block))
    return TorchPlan(block, (tuple(out),))      # no tensor inputs: one entry for every row


def _strided(part) -> bool:
    """Whether a gathered component's rows are plain strided views (one live residue per
    period, first rows in range)."""
    return part.run_k == 1 and all(q0 >= 0 and k0 >= 0 for q0, _, k0, _ in part.groups)


def _plain(pattern, bm, s, block) -> tuple[Part, ...]:
    """The parts of a plain (not gathered) launch: one over every head, or, when that is
    cheaper by the cost model, one per set of heads with one map (:func:`head_sets`), each
    walking only its own tiles."""
    def part(heads: tuple[int, int] | None) -> tuple[Part, float]:
        first, count = heads or (0, s.heads)
        rows = bm if bm.shape[0] == 1 else bm[first:first + count]
        tiles, cost = _row_tiles(rows, s.q_len, s.kv_len, block, count, mask_cost(pattern, count))
        return Part(pattern, (Group(0, 1, s.q_len, 0, 1, s.kv_len, tiles),), False, heads), cost

    whole, cost = part(None)
    sets = head_sets(bm, s.heads, s.kv_heads)
    if len(sets) == 1:
        return (whole,)
    split = [part(h) for h in sets]
    return tuple(p for p, _ in split) if sum(c for _, c in split) < cost else (whole,)


def head_sets(bm: np.ndarray, heads: int, kv_heads: int) -> list[tuple[int, int]]:
    """(first, count) of runs of consecutive query heads with one tile map, each a whole number
    of key/value head groups (its K and V are a slice of heads) or else split into single
    heads; one set of every head when the map is shared."""
    if bm.shape[0] == 1:
        return [(0, heads)]
    group = heads // kv_heads
    cuts = [0] + [h for h in range(1, heads) if not np.array_equal(bm[h], bm[h - 1])] + [heads]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        if a % group == 0 and (b - a) % group == 0:
            out.append((a, b - a))
        else:
            out.extend((h, 1) for h in range(a, b))
    return out


def _row_tiles(bm: np.ndarray, n_q: int, n_k: int, block, heads: int,
               mask_pair: float) -> tuple[tuple[RowTile, ...], float]:
    """Row tiles of a [H or 1, nQT, nKT] map over ``n_q`` rows and ``n_k`` keys, and their
    modelled cost.

    A key tile is kept for a tile of rows when any head keeps it, full when full for every
    head. Consecutive tiles of rows are merged while the merged tile costs less than the two
    apart (:func:`step_cost`: a merged tile scores the union of the keys, a key tile full
    only where full for all its rows, but pays the per-tile and per-segment costs once), up
    to :data:`MAX_ROWS` rows. Each run of consecutive kept key tiles of one class is one
    segment."""
    bq, bk = block
    n_rows, n_cols = min(bm.shape[1], -(-n_q // bq)), min(bm.shape[2], -(-n_k // bk))
    kept = (bm[:, :n_rows, :n_cols] > 0).any(axis=0)
    full = (bm[:, :n_rows, :n_cols] == FULL).all(axis=0) & kept
    widths = np.minimum(bk, n_k - np.arange(n_cols) * bk)
    out, total = [], 0.0
    cur = None                              # (first row tile, end row tile, kept, full, cost)
    for i in range(n_rows):
        if not kept[i].any():
            total += _flush(out, cur, n_q, bq, bk, n_k)
            cur = None
            continue
        rows = min(n_q, (i + 1) * bq) - i * bq
        alone = step_cost(rows, kept[i], full[i], widths, heads, mask_pair)
        if cur is not None and (i + 1 - cur[0]) * bq <= MAX_ROWS:
            k2, f2 = cur[2] | kept[i], cur[3] & full[i]
            merged = step_cost(min(n_q, (i + 1) * bq) - cur[0] * bq, k2, f2, widths, heads,
                               mask_pair)
            if merged <= cur[4] + alone:
                cur = (cur[0], i + 1, k2, f2, merged)
                continue
        total += _flush(out, cur, n_q, bq, bk, n_k)
        cur = (i, i + 1, kept[i], full[i], alone)
    total += _flush(out, cur, n_q, bq, bk, n_k)
    return tuple(out), total


def mask_cost(pattern: BoundPattern, heads: int) -> float:
    """The modelled cost (seconds) of the mask and bias at one (query, key) pair of a partial
    segment: its distinct nodes with selectors as table reads (codegen/tables.py), times the
    heads when the mask reads ``h``."""
    def per_head() -> tuple[float, bool]:
        mask = with_tables(pattern)[0]
        nodes = {id(e): e for e in mask.walk()}.values()
        return (sum(READ_COST if e.op is Op.INDEX else NODE_COST for e in nodes if e.args),
                mask.uses(Op.H))

    cost, uses_h = MASK_COSTS.get(pattern.key, per_head)
    return MASK_COST + cost * (heads if uses_h else 1)


def step_cost(rows: int, kept: np.ndarray, full: np.ndarray, widths: np.ndarray,
              heads: int, mask_pair: float) -> float:
    """The modelled cost (seconds) of one tile of ``rows`` rows over key tiles ``kept``
    (``full`` among them) of ``widths`` keys each (``mask_pair``: :func:`mask_cost`)."""
    cls = kept.view(np.int8) + full.view(np.int8)          # 0 empty, 1 partial, 2 full
    runs = int(np.count_nonzero(cls[:1])) + int(np.count_nonzero((cls[1:] != 0)
                                                                 & (cls[1:] != cls[:-1])))
    pairs = rows * int(widths @ kept)
    partial = rows * int(widths @ (kept & ~full))
    return TILE_COST + runs * SEGMENT_COST + pairs * heads * PAIR_COST + partial * mask_pair


def _flush(out: list, cur, n_q: int, bq: int, bk: int, n_k: int) -> float:
    """Append the row tile ``cur`` (if any) with its segments; its modelled cost (0 for none)."""
    if cur is None:
        return 0.0
    first, end, kept, full, cost = cur
    idx = np.flatnonzero(kept)
    kind = np.where(full[idx], FULL, PARTIAL)
    cuts = (np.flatnonzero((np.diff(idx) != 1) | (np.diff(kind) != 0)) + 1).tolist()
    idx, kind = idx.tolist(), kind.tolist()
    segs = tuple(Segment(idx[a] * bk, min(n_k, (idx[b - 1] + 1) * bk), kind[a] == FULL)
                 for a, b in zip([0] + cuts, cuts + [len(idx)]))
    out.append(RowTile(first * bq, min(n_q, end * bq), segs))
    return cost
