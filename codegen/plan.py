"""The analyse and plan stages of the Triton backend.

``analyse`` — input: a :class:`~attndsl.call.BoundCall`, its :class:`~attndsl.call.CallData`
and the tile shape. Output: :class:`CallAnalysis`, one :class:`LaunchAnalysis` per launch:
the whole pattern on the analysis's tile classes (``tiles``: one int8 map ``[H or 1, nQT,
nKT]`` per batch row, attndsl.analysis.call_tiles), tile classes left to the device classifier
(``device``: CUDA calls with tensor inputs, codegen/device_tiles.py), the classes of a
selector call from its selection (``select``: on the call's device, codegen/select_tiles.py),
or, for dilated and strided patterns, one launch per residue-class component (``gather``: maps
``[G, nQT, nKT]`` over compressed indices, codegen/gather.py) whose results are merged.

``plan`` — input: the analysis and a tile configuration. Output: :class:`Plan`, one
:class:`LaunchPlan` per launch: its pattern (a component's restriction, or the call's), tile
tables on the device (band or list form, codegen/tile_tables.py), whether the int32 hooks run
(codegen/narrow.py), the selector tables read as derived tensors (codegen/tables.py, the
call's selection), the grid; and whether the results are merged by log-sum-exp. Plans of calls
whose analysis reads no data (no tensor inputs, no selector but ``random_blocks``) are kept per
(call, configuration), so a repeated call uploads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from attndsl.analysis.call_tiles import block_maps, per_batch
from attndsl.bound import as_bound
from attndsl.caches import LRUCache
from attndsl.call import BoundCall, CallData, CallShape
from attndsl.ir import SELECTOR_OPS

from . import gather, narrow
from .config import Config, launch_grid
from .device_tiles import device_tiles
from .narrow import fits_int32
from .select_tiles import Selected, select_tiles, selected_classes
from .tables import with_tables
from .tile_tables import DeviceTiles, band_tables, from_block_maps

PLANS = LRUCache("codegen.plans", 32)
NARROW = LRUCache("codegen.narrow", 256)


# ------------------------------------------------------------------------------- analyse
@dataclass(frozen=True)
class LaunchAnalysis:
    """The tile classes one launch walks: ``kind`` 'tiles' (host maps), 'gather' (residue
    classes), 'device' (classified on the device from tensor inputs) or 'select' (from the
    call's selection, codegen/select_tiles.py)."""

    pattern: object                                 # BoundPattern of the launch
    kind: str
    maps: tuple = ()                    # host tile classes (none for 'device' and 'select')
    component: gather.Component | None = None
    selected: Selected | None = None    # 'select': the classes from the call's selection

    def describe(self) -> str:
        if self.kind == "device":
            return "tile classes: on the device, per call (tensor inputs)"
        if self.kind == "select":
            return self.selected.describe()
        bm = self.maps[0]
        head = (f"gather: {len(self.component.groups)} groups, query step "
                f"{self.component.step_q}, key step {self.component.step_k}, run "
                f"{self.component.run_k}" if self.kind == "gather" else "tiles")
        rows = f", {len(self.maps)} batch rows" if len(self.maps) > 1 else ""
        return (f"{head}: map {list(bm.shape)}{rows}; {int((bm > 0).sum())} tiles walked, "
                f"{int((bm == 2).sum())} full, {int((bm == 1).sum())} partial, "
                f"{int((bm == 0).sum())} skipped")


@dataclass(frozen=True)
class CallAnalysis:
    """The analysis of one call for one tile shape."""

    call: BoundCall
    block: tuple[int, int]
    launches: tuple[LaunchAnalysis, ...]

    def describe(self) -> str:
        return "\n".join([f"tile {self.block[0]}x{self.block[1]}, {len(self.launches)} launch(es)"]
                         + [f"launch {i + 1}: {a.describe()}"
                            for i, a in enumerate(self.launches)])


def on_device(call: BoundCall) -> bool:
    """Whether the call's tile classes are computed on the device (CUDA, tensor inputs, no
    selectors: their values are read where they are)."""
    pattern = call.pattern
    return (call.device.startswith("cuda") and bool(pattern.tensor_params)
            and not any(r.uses(*SELECTOR_OPS) for r in pattern.ir.roots()))


def analyse(call: BoundCall, data: CallData, block: tuple[int, int], gathers: bool = True,
            host: bool = False) -> CallAnalysis:
    """The launches of a call and the tile classes each walks (see the module). ``gathers``:
    residue-class components allowed; ``host``: tile classes on the host even where the device
    could compute them from tensor inputs (the torch backend). A selector call's classes are
    its selection's, on its device, for both backends."""
    s, pattern = call.shape, call.pattern
    parts = gather.components(pattern, s.q_len, s.kv_len, s.heads, s.kv_heads, block) \
        if gathers else None
    if parts is None:
        if pattern.uses_selectors():        # the call's selection: classes on its device
            launches = (LaunchAnalysis(pattern, "select", (), None, selected_classes(
                pattern, (s.q_len, s.kv_len, s.heads, s.kv_heads), tuple(block),
                data.selection, data.tensors, torch.device(call.device))),)
        elif on_device(call) and not host:
            launches = (LaunchAnalysis(pattern, "device"),)
        else:
            maps = block_maps(pattern, s.q_len, s.kv_len, s.heads, s.kv_heads, data.tensors, block)
            launches = (LaunchAnalysis(pattern, "tiles", tuple(maps)),)
    else:
        launches = tuple(
            LaunchAnalysis(part.pattern, "gather", (gather.group_block_map(part, block),), part)
            if part.gathered else
            LaunchAnalysis(part.pattern, "tiles", tuple(block_maps(
                part.pattern, s.q_len, s.kv_len, s.heads, s.kv_heads, {}, block)))
            for part in parts)
    return CallAnalysis(call, tuple(block), launches)


# ---------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class LaunchPlan:
    """One launch: its pattern, tile tables on the device, hooks, grid and selector tables."""

    pattern: object                                 # BoundPattern whose hooks it runs
    kind: str                                       # as LaunchAnalysis.kind
    tiles: DeviceTiles
    narrow: bool                                    # the int32 hooks
    grid: tuple[int, int, int]
    derived_values: dict = field(default_factory=dict)      # selector tables (torch)
    wide_out: bool = False                          # output in the accumulation dtype (merged)

    def describe(self) -> str:
        t = self.tiles
        gathered = (f", {t.n_groups} groups, steps q {t.step_q} k {t.step_k}, run {t.run_k}"
                    if self.kind == "gather" else "")
        text = (f"{self.kind}{gathered}; {'band' if t.band else 'list'} tables "
                f"{list(t.full_idx.shape)}; {'int32' if self.narrow else 'int64'} hooks; grid "
                f"{self.grid}" + (f"; selector tables {sorted(self.derived_values)}"
                                  if self.derived_values else ""))
        if self.kind == "select":       # the lists themselves (read back: a dump only)
            text += "\n" + "\n".join(t.listing())
        return text


@dataclass(frozen=True)
class Plan:
    """The bound call with its analysis, configuration and launches; ``merged``: the launches
    cover disjoint key sets and their results are combined by log-sum-exp."""

    analysis: CallAnalysis
    config: Config
    launches: tuple[LaunchPlan, ...]

    @property
    def call(self) -> BoundCall:
        return self.analysis.call

    @property
    def merged(self) -> bool:
        return len(self.launches) > 1

    def describe(self) -> list[str]:
        s = self.call.shape
        out = [f"attndsl plan: {len(self.launches)} launch(es) of attn_fwd, tile configuration "
               f"{self.config}", f"call: batch {s.batch}, heads {s.heads}/{s.kv_heads}, q_len "
               f"{s.q_len}, kv_len {s.kv_len}, head_dim {s.head_dim}/{s.v_dim}, {self.call.dtype}"]
        out += [f"launch {i + 1}: {lp.describe()}" for i, lp in enumerate(self.launches)]
        out.append("merge: log-sum-exp of the launches' (out, lse), in the accumulation dtype"
                   if self.merged else "merge: none (one launch)")
        return out


def plan(analysis: CallAnalysis, data: CallData, config: Config, q, k) -> Plan:
    """The launches of an analysed call (``q``, ``k``: the call's tensors, for the device
    classifier; cached for calls whose analysis reads no data: no tensor input, and no selector
    but ``random_blocks``, whose table is content)."""
    call = analysis.call
    derived = [d for a in analysis.launches for d in with_tables(a.pattern)[3].values()]
    if not data.tensors and all(d.kind == "random" for d in derived):
        switches = (gather.enabled(), narrow.enabled())        # ATTNDSL_GATHER, ATTNDSL_NARROW
        return PLANS.get((call.key, config, switches), lambda: _plan(analysis, data, config, q, k))
    return _plan(analysis, data, config, q, k)


def _plan(analysis: CallAnalysis, data: CallData, config: Config, q, k) -> Plan:
    call, s = analysis.call, analysis.call.shape
    device = torch.device(call.device)
    merged = len(analysis.launches) > 1
    launches = []
    for a in analysis.launches:
        if a.kind == "device":
            tiles = device_tiles(a.pattern, q, k, data.tensors, config, call.interpret)
        elif a.kind == "select":
            tiles = select_tiles(a.selected, s.heads, s.q_len, s.kv_len)
        elif a.kind == "gather":
            c = a.component
            tiles = from_block_maps([a.maps[0][:, None]], c.groups, device, c.step_q, c.step_k,
                                    c.run_k)
        else:
            maps = list(a.maps)
            if len(maps) > 1 and all(m is maps[0] for m in maps):
                maps = maps[:1]
            tiles = from_block_maps([m[None] for m in maps], [(0, s.q_len, 0, s.kv_len)], device)
        values = data.selection if with_tables(a.pattern)[3] else {}
        launches.append(LaunchPlan(
            a.pattern, a.kind, tiles, _narrow(a.pattern, s, data, values),
            launch_grid(tiles.n_query_tiles, s.batch * s.heads, tiles.n_groups), values, merged))
    return Plan(analysis, config, tuple(launches))


def _narrow(pattern, s, data: CallData, derived_values: dict) -> bool:
    """Whether the launch runs the int32 hooks (codegen/narrow.py); kept per pattern and size
    when it reads no data."""
    mask_ir, score_ir, _slots, derived = with_tables(pattern)
    sizes = (s.q_len, s.kv_len, s.heads, s.kv_heads)
    roots = [mask_ir] + ([score_ir] if score_ir is not None else [])

    def compute() -> bool:
        if not data.tensors:
            users = [{}]
        elif data.grids:
            users = [g.tensors for g in data.grids]
        else:
            users = per_batch(pattern, data.tensors)[0]
        tables = {name: _value_range(d) for name, d in derived.items()}
        return fits_int32(roots, dict(pattern.values), sizes,
                          [{**user, **tables} for user in users])

    if data.tensors or derived:
        return compute()
    return NARROW.get((pattern.key, sizes, narrow.enabled()), compute)


def _value_range(d) -> np.ndarray:
    """A stand-in for a selector table in the int32 proof (the tables stay on the device): the
    range of its entries — selections 0 and 1, cluster ids below 2**31 (int32 slots) — over
    the table's rank; the hooks compute no integer from a table's shape."""
    high = 1 if d.kind in ("random", "blocks") else 2 ** 31 - 1
    return np.array([0, high]).reshape((2,) + (1,) * (d.rank - 1))


def strategy(pattern, q_len: int, kv_len: int, heads: int, kv_heads: int, block,
             tensors: dict) -> list[dict]:
    """What the launches of a call at these sizes would be, without a device: per launch, plain
    tiles or a residue-class gather (groups, step, run), band or list tables, and the
    non-empty / full tiles it walks (``attndsl analyze`` prints it)."""
    pattern = as_bound(pattern)
    shape = CallShape(1, heads, kv_heads, q_len, kv_len, 1, 1)
    call = BoundCall(pattern, shape, "float32", "cpu", "triton-interpret", 1.0)
    if pattern.uses_selectors():        # classes per call from its selection: the candidates
        bm = np.stack(block_maps(pattern, q_len, kv_len, heads, kv_heads, tensors, block))
        return [{"kind": "select", "tables": "lists", "tiles": int((bm > 0).sum()),
                 "full": int((bm == 2).sum())}]
    out = []
    for a in analyse(call, CallData(tensors), tuple(block)).launches:
        bm = a.maps[0] if a.kind == "gather" else np.stack(a.maps)
        info = {"kind": "tiles"} if a.kind != "gather" else {
            "kind": "gather", "groups": len(a.component.groups), "step_q": a.component.step_q,
            "step_k": a.component.step_k, "run": a.component.run_k}
        band = band_tables(torch.as_tensor(np.ascontiguousarray(bm, dtype=np.int8))) is not None
        out.append({**info, "tables": "band" if band else "lists", "tiles": int((bm > 0).sum()),
                    "full": int((bm == 2).sum())})
    return out
