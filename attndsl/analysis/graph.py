"""Graph properties of a pattern: empty rows, receptive field of stacked layers, union of heads.

Input: a static :class:`~attndsl.bound.BoundPattern` (no data-dependent selectors), a call's
sizes and tensor inputs. Output: :class:`GraphReport` (frozen; ``as_dict()`` holds only str,
int, float, bool, None and
lists, so it is JSON-serialisable). Everything is about the ``mask`` clause: a ``score`` clause
that yields ``-inf`` removes more pairs, so with one (``notes`` says so) empty-row counts are
lower bounds and reach is an upper bound.

1. ``empty_rows`` (one :class:`EmptyRows` per head): the rows ``i`` with no allowed key. Exact:
   from ``dense_mask`` when ``heads * q_len * kv_len <= DENSE_LIMIT``, else per class of heads
   from its exact key intervals (the ``KeyIntervals`` of ``describe()``, built here without the
   tile lists that ``describe`` also makes): a row is empty when no piece holds a key, in
   O(q_len x pieces); rows whose only keys may come from residue pieces with more than
   ``rows.MAX_SHRINK`` live residues are checked with ``KeyIntervals.row_mask``. Classes
   without exact intervals use the block map: a row tile whose tiles are all empty holds empty
   rows, one with a full tile none; rows of tiles with partial tiles only are evaluated pair by
   pair. Pair-by-pair work is capped at ``EVAL_BUDGET`` pairs per call; rows left undecided are
   counted in ``unknown``. ``count`` (rows certainly empty) is exact when ``unknown == 0``.
2. ``reach`` (:class:`Reach`; None unless ``q_len == kv_len == N > 0``): the directed graph on
   tokens with an edge i -> j when (i, j) is allowed in some head (a layer mixes all heads),
   plus self loops (residual connections). After L layers token i sees j iff dist(i, j) <= L.
   ``direction`` is 'bidirectional' when some allowed pair has j > i, else 'causal'; the target
   pairs are all (i, j) or those with j <= i. ``fractions[n]`` = the share of target pairs
   with dist <= ``layers[n]``. ``full_reach_depth`` = the least L >= 1 with every target pair
   at dist <= L, None when some target pair is never reached (reach is closed after N - 1
   layers). ``method`` 'tokens' (N <= max_tokens) is exact, with ``engine`` 'networkx'
   (all-pairs BFS, when N * edges <= NX_WORK) or 'numpy' (boolean matrix squaring and binary
   lifting; same results). ``method`` 'tiles' (N > max_tokens) works on the graph of tiles of
   ``tile`` tokens (edge when the block map is non-empty in some head; two tokens of one tile
   count as reached): reach is over-approximated, so fractions are upper bounds,
   ``full_reach_depth`` is a lower bound (``depth_is_lower_bound``) and None is exact.
3. union (heads > 1 and a mask that uses ``h``; else None): the share of causal pairs
   (``k <= q``, positions as in LANGUAGE.md section 1) allowed in each head and in at least one
   head; ``union_covers_causal`` is whether that share is 1. Exact within ``EVAL_BUDGET``
   pairs; beyond, from the block map (fractions None then): False when a tile meeting the
   triangle is empty in every head; else True when each such tile is full in some head or its
   pairs, evaluated within ``EVAL_BUDGET``, leave no causal pair uncovered; else None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import networkx as nx
import numpy as np

from ..bound import as_bound
from ..errors import AttnCallError
from ..inputs import tensor_inputs
from ..ir import Op
from ..reference import dense_mask
from . import api
from .rows import MAX_SHRINK, piece_bounds

DENSE_LIMIT = 1 << 22      # heads * q_len * kv_len evaluated as one dense mask
EVAL_BUDGET = 1 << 26      # mask pairs evaluated pair by pair beyond the dense limit
NX_WORK = 1 << 25          # N * edges of a networkx all-pairs BFS
EXAMPLES = 5               # example row indices kept per head


@dataclass(frozen=True)
class EmptyRows:
    head: int
    count: int              # rows known to be empty
    examples: tuple         # the first few of them
    unknown: int            # rows that could not be decided (0 when count is exact)
    method: str             # 'dense' | 'intervals' | 'tiles'


@dataclass(frozen=True)
class Reach:
    method: str             # 'tokens' | 'tiles'
    engine: str             # 'networkx' | 'numpy'
    tile: int               # tokens per node (1 for 'tokens')
    direction: str          # 'causal' (targets j <= i) | 'bidirectional' (all pairs)
    layers: tuple
    fractions: tuple        # per entry of layers
    full_reach_depth: int | None
    depth_is_lower_bound: bool


@dataclass(frozen=True)
class GraphReport:
    pattern: str
    q_len: int
    kv_len: int
    heads: int
    empty_rows: tuple       # EmptyRows per head
    reach: Reach | None
    union_covers_causal: bool | None
    union_fraction: float | None
    head_fractions: tuple | None
    notes: tuple

    def as_dict(self) -> dict:
        def plain(x):
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            return x.item() if isinstance(x, np.generic) else x
        return plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------- empty rows

def _head_rows(h: int, empty: np.ndarray, unknown: int, method: str) -> EmptyRows:
    idx = np.flatnonzero(empty)
    return EmptyRows(h, int(len(idx)), tuple(int(i) for i in idx[:EXAMPLES]), int(unknown), method)


def _interval_empty(kis, sub, q_len: int, kv_len: int, budget: list):
    """(empty, unknown) bool [q_len] for the heads of one exact KeyIntervals."""
    exact = np.array([p.residue is None or len(p.residue.live) <= MAX_SHRINK for p in kis.pieces],
                     dtype=bool)
    empty, unknown = np.zeros(q_len, bool), np.zeros(q_len, bool)
    heads = np.array(kis.heads[:1])
    step = max(1, (1 << 22) // max(1, len(kis.pieces)))
    for start in range(0, q_len, step):
        rows = np.arange(start, min(q_len, start + step))
        lo, hi, bad = piece_bounds(kis.pieces, sub, heads, rows, keep_residues=True)
        some = lo[0] <= hi[0]                                    # [R, pieces]
        sure = (some & exact).any(-1)
        maybe = some.any(-1) & ~sure & ~bad[0]                   # wide residue pieces only
        if maybe.any() and maybe.sum() * kv_len <= budget[0]:
            budget[0] -= int(maybe.sum()) * kv_len
            todo = rows[maybe]
            parts = np.array_split(todo, -(-len(todo) * kv_len // (1 << 22)))
            sure[maybe] = np.concatenate([kis.row_mask(sub, c).any(-1) for c in parts])
            maybe[:] = False
        unknown[rows] = bad[0] | maybe
        empty[rows] = ~sure & ~unknown[rows]
    return empty, unknown


def _tile_empty(grid, h: int, bm: np.ndarray, block, budget: list):
    """(empty, unknown) bool [q_len] of head h from its block map rows bm [nQT, nKT]."""
    bq, bk = block
    empty, unknown = np.zeros(grid.q_len, bool), np.zeros(grid.q_len, bool)
    for t in range(bm.shape[0]):
        rows = np.arange(t * bq, min(grid.q_len, (t + 1) * bq))
        if (bm[t] == 2).any():
            continue
        part = np.flatnonzero(bm[t] == 1)
        if not len(part):
            empty[rows] = True
            continue
        cols = np.concatenate([np.arange(j * bk, min(grid.kv_len, (j + 1) * bk)) for j in part])
        if len(rows) * len(cols) > budget[0]:
            unknown[rows] = True
            continue
        budget[0] -= len(rows) * len(cols)
        empty[rows] = ~np.asarray(grid.mask(np.array([h]), rows, cols))[0].any(-1)
    return empty, unknown


def _dense(pattern, q_len: int, kv_len: int, heads: int, given: dict) -> np.ndarray:
    """The mask clause at every (h, i, j) of a small call (the reference's dense mask)."""
    return dense_mask(pattern.grid(q_len, kv_len, heads, heads,
                                   tensor_inputs(pattern.ir, given, None)[0]))


def empty_rows(pattern, q_len: int, kv_len: int, heads: int = 1, block=(128, 128),
               dense: np.ndarray | None = None, **given) -> tuple:
    """EmptyRows per head (see the module docstring); ``dense`` reuses a computed dense mask."""
    pattern = as_bound(pattern)
    if dense is None and heads * q_len * kv_len <= DENSE_LIMIT:
        dense = _dense(pattern, q_len, kv_len, heads, given)
    if dense is None and kv_len == 0:
        dense = np.zeros((heads, q_len, 0), bool)
    if dense is not None:
        return tuple(_head_rows(h, ~dense[h].any(-1), 0, "dense") for h in range(heads))
    call = api.call_classes(pattern, q_len, kv_len, heads, block, None, given)
    found, budget, bm = {}, [EVAL_BUDGET], None
    for cls in call.classes:                    # the heads of a class share one mask
        hs, kis = cls.heads, cls.keys
        if kis is not None:
            result = _interval_empty(kis, cls.grid, q_len, kv_len, budget) + ("intervals",)
        else:
            bm = call.block_map() if bm is None else bm
            result = _tile_empty(call.grid, hs[0], bm[hs[0]], block, budget) + ("tiles",)
        found.update({h: result for h in hs})
    out = [_head_rows(h, found[h][0], int(found[h][1].sum()), found[h][2]) for h in range(heads)]
    return tuple(out)


def _sizes_text(q_len: int, kv_len: int) -> str:
    return f"q_len=kv_len={q_len}" if q_len == kv_len else f"q_len={q_len}, kv_len={kv_len}"


def warn_empty_rows(pattern, sizes=((1, 1), (7, 7), (64, 64), (300, 300), (1, 64)),
                    heads: int | None = None, **given) -> list[str]:
    """Human warnings, one per (size, head with empty rows) of a BoundPattern or an
    ``attndsl.Pattern``; [] for selector patterns, patterns
    with unbound parameters and patterns with tensor inputs not given. ``heads`` defaults to 1,
    or 8 when the mask uses ``h``."""
    if pattern.uses_selectors() or any(p.name not in given for p in pattern.ir.params if p.is_tensor) \
            or any(p.name not in pattern.values for p in pattern.ir.params if not p.is_tensor):
        return []
    pattern = as_bound(pattern)
    per_head = pattern.ir.mask.uses(Op.H)
    heads = heads if heads is not None else (8 if per_head else 1)
    out = []
    for q_len, kv_len in sizes:
        for r in empty_rows(pattern, q_len, kv_len, heads, **given):
            if not r.count or (r.head and not per_head):
                continue
            where = f" in head {r.head}" if per_head else ""
            eg = f"row {r.examples[0]}" if r.count == 1 else \
                "e.g. rows " + ", ".join(map(str, r.examples)) + (", ..." if r.count > EXAMPLES else "")
            out.append(f"pattern '{pattern.name}': {r.count} of {q_len} query rows{where} have no "
                       f"allowed key at {_sizes_text(q_len, kv_len)} ({eg}): their output "
                       "is 0 and lse -inf")
    return out


# ----------------------------------------------------------------------------- reach

def _bmm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32) @ b.astype(np.float32)) > 0      # exact: counts < 2**24


def _reach_networkx(adj, target, weight, layers):
    n = adj.shape[0]
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from(zip(*(x.tolist() for x in np.nonzero(adj & ~np.eye(n, dtype=bool)))))
    dist = np.full((n, n), -1, dtype=np.int64)
    for s, d in nx.all_pairs_shortest_path_length(g):
        dist[s, np.fromiter(d.keys(), np.int64, len(d))] = np.fromiter(d.values(), np.int64, len(d))
    seen = dist >= 0
    total = weight.sum()
    fractions = [float((weight * (seen & (dist <= L))).sum() / total) for L in layers]
    depth = None if (target & ~seen).any() else max(1, int(dist[target].max(initial=0)))
    return fractions, depth


def _reach_numpy(adj, target, weight, layers):
    """powers[k] = reach within 2**k layers, squared until it covers the targets or is closed."""
    powers = [adj | np.eye(adj.shape[0], dtype=bool)]

    def full(r):
        return not (target & ~r).any()

    closed = False
    while not full(powers[-1]):
        nxt = _bmm(powers[-1], powers[-1])
        if np.array_equal(nxt, powers[-1]):
            closed = True
            break
        powers.append(nxt)
    depth = None
    if not closed:                   # binary lifting: the most layers that do not cover, plus one
        cur, steps = None, 0
        for k in range(len(powers) - 2, -1, -1):
            cand = powers[k] if cur is None else _bmm(cur, powers[k])
            if not full(cand):
                cur, steps = cand, steps + (1 << k)
        depth = steps + 1

    def within(L):
        if L >= 1 << (len(powers) - 1):
            return powers[-1]
        r = None
        for k in range(len(powers)):
            if L >> k & 1:
                r = powers[k] if r is None else _bmm(r, powers[k])
        return r

    total = weight.sum()
    return [float((weight * within(L)).sum() / total) for L in layers], depth


def _reach(adj, target, weight, layers, engine=None):
    if engine is None:
        engine = "networkx" if adj.shape[0] * int(adj.sum()) <= NX_WORK else "numpy"
    fn = _reach_networkx if engine == "networkx" else _reach_numpy
    fractions, depth = fn(adj, target & (weight > 0), weight.astype(np.float64), layers)
    return tuple(fractions), depth, engine


def _token_reach(union: np.ndarray, layers, engine=None) -> Reach:
    n = union.shape[0]
    bidir = bool(np.triu(union, 1).any())
    target = np.ones((n, n), bool) if bidir else np.tri(n, dtype=bool)
    fractions, depth, engine = _reach(union, target, target, layers, engine)
    return Reach("tokens", engine, 1, "bidirectional" if bidir else "causal", tuple(layers),
                 fractions, depth, False)


def _tile_reach(pattern, n, heads, block, max_tokens, layers, given, notes) -> Reach:
    t = max(max(block), -(-n // max_tokens))
    bm = api.block_map(pattern, n, n, heads, (t, t), None, given)
    adj = (bm > 0).any(0)
    m = adj.shape[0]
    size = np.minimum(t, n - t * np.arange(m)).astype(np.float64)
    bidir = bool(np.triu(adj, 1).any())
    if not bidir:
        diag = [a for a in range(m) if (bm[:, a, a] > 0).any()]
        if sum(size[a] ** 2 for a in diag) * heads <= EVAL_BUDGET:
            grid = pattern.grid(n, n, heads, heads, tensor_inputs(pattern.ir, given, None)[0])
            for a in diag:
                idx = np.arange(a * t, a * t + int(size[a]))
                if np.triu(np.asarray(grid.mask(np.arange(heads), idx, idx)).any(0), 1).any():
                    bidir = True
                    break
        else:
            notes.append("direction taken as causal: no tile above the diagonal is non-empty, "
                         "pairs inside diagonal tiles were not checked")
    if bidir:
        weight = np.outer(size, size)
    else:
        weight = np.tril(np.outer(size, size), -1) + np.diag(size * (size + 1) / 2)
    fractions, depth, engine = _reach(adj, weight > 0, weight, layers)
    return Reach("tiles", engine, t, "bidirectional" if bidir else "causal", tuple(layers),
                 fractions, depth, depth is not None)


# ----------------------------------------------------------------------------- union of heads

def _causal_tri(q_len: int, kv_len: int, rows: np.ndarray) -> np.ndarray:
    return np.arange(kv_len)[None, :] <= (rows + (kv_len - q_len))[:, None]


def _union_tokens(pattern, q_len, kv_len, heads, given, dense):
    grid = None if dense is not None else \
        pattern.grid(q_len, kv_len, heads, heads, tensor_inputs(pattern.ir, given, None)[0])
    per_head = np.zeros(heads, np.int64)
    covered = total = 0
    step = max(1, (1 << 22) // max(1, heads * kv_len))
    for start in range(0, q_len, step):
        rows = np.arange(start, min(q_len, start + step))
        m = dense[:, rows] if dense is not None else \
            np.asarray(grid.mask(np.arange(heads), rows, np.arange(kv_len)))
        tri = _causal_tri(q_len, kv_len, rows)
        per_head += (m & tri).sum((1, 2))
        covered += int((m.any(0) & tri).sum())
        total += int(tri.sum())
    if total == 0:
        return True, 1.0, tuple(1.0 for _ in range(heads))
    return covered == total, covered / total, tuple(float(x / total) for x in per_head)


def _union_tiles(pattern, q_len, kv_len, heads, block, given):
    """True / False / None (undecided): tiles meeting the causal triangle that are empty in
    every head decide False, tiles full in some head are covered, the rest are evaluated pair
    by pair within EVAL_BUDGET."""
    bm = api.block_map(pattern, q_len, kv_len, heads, block, None, given)
    bq, bk = block
    last_q = np.minimum((np.arange(bm.shape[1]) + 1) * bq, q_len) - 1 + (kv_len - q_len)
    meets = (np.arange(bm.shape[2]) * bk)[None, :] <= last_q[:, None]
    if (meets & (bm == 0).all(0)).any():
        return False
    todo = np.argwhere(meets & ~(bm == 2).any(0))
    if len(todo) * bq * bk * heads > EVAL_BUDGET:
        return None
    grid = pattern.grid(q_len, kv_len, heads, heads, tensor_inputs(pattern.ir, given, None)[0])
    for a, b in todo:
        rows = np.arange(a * bq, min(q_len, (a + 1) * bq))
        cols = np.arange(b * bk, min(kv_len, (b + 1) * bk))
        m = np.asarray(grid.mask(np.arange(heads), rows, cols)).any(0)
        if (~m & (cols[None, :] <= (rows + kv_len - q_len)[:, None])).any():
            return False
    return True


# ----------------------------------------------------------------------------- the report

def graph_report(pattern, q_len: int, kv_len: int | None = None, heads: int = 1,
                 layers=(1, 2, 4, 8), block=(128, 128), max_tokens: int = 2048,
                 **tensor_inputs_) -> GraphReport:
    """Empty rows, receptive field and head union of ``pattern`` at one call's sizes."""
    pattern = as_bound(pattern)
    kv_len = q_len if kv_len is None else kv_len
    if pattern.uses_selectors():
        raise AttnCallError(f"pattern '{pattern.name}' selects blocks from the query and key vectors "
                            "at run time; graph_report describes static patterns only")
    layers = tuple(layers)
    if any(isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 1 for L in layers):
        raise AttnCallError(f"argument 'layers' must hold positive ints, got {layers!r}")
    layers = tuple(int(L) for L in layers)
    notes: list[str] = []
    if pattern.ir.score is not None:
        notes.append("the score clause is not analysed: where it yields -inf, fewer pairs are "
                     "allowed than the mask says (empty rows may be more, reach less)")
    self_attn = q_len == kv_len and q_len > 0
    dense = None
    if heads * q_len * kv_len <= DENSE_LIMIT or (self_attn and q_len <= max_tokens):
        dense = _dense(pattern, q_len, kv_len, heads, tensor_inputs_)
    rows = empty_rows(pattern, q_len, kv_len, heads, block, dense, **tensor_inputs_)
    reach = None
    if not self_attn:
        notes.append("no receptive field: it needs self-attention with q_len == kv_len > 0")
    elif dense is not None and q_len <= max_tokens:
        reach = _token_reach(dense.any(0), layers)
    else:
        reach = _tile_reach(pattern, q_len, heads, tuple(block), max_tokens, layers,
                            tensor_inputs_, notes)
    covers = fraction = per_head = None
    if heads > 1 and pattern.ir.mask.uses(Op.H):
        if dense is not None or heads * q_len * kv_len <= EVAL_BUDGET:
            covers, fraction, per_head = _union_tokens(pattern, q_len, kv_len, heads,
                                                       tensor_inputs_, dense)
        else:
            covers = _union_tiles(pattern, q_len, kv_len, heads, tuple(block), tensor_inputs_)
            notes.append("head union decided from the block map only (too many pairs to evaluate)")
    return GraphReport(pattern.name, q_len, kv_len, heads, rows, reach, covers, fraction, per_head,
                       tuple(notes))
