"""Unit tests of the block-sparsity analysis (attndsl.analysis): the row solver, the tile
interval analysis, partial evaluation, documents, block_map errors and its speed.

The oracle throughout is brute force: ``Pattern.dense_mask`` and
``attndsl.blocks.block_map_by_tiles`` (every pair of every tile evaluated). Small calls get
undecided tiles refined pair by pair, which would hide a wrong symbolic answer, so checks of
the symbolic passes run with refinement off (``blockmap.REFINE_PAIRS = 0``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.analysis import api, blockmap, pieces
from attndsl.analysis.descriptors import KeyIntervals
from attndsl.analysis.fold import fold, head_classes
from attndsl.analysis.intervals import (
    INTERVAL_RULES,
    Analyzer,
    TileGrid,
    _range_extremes,
    classify_tiles,
    make_grid,
)
from attndsl.analysis.pieces import ALL, MAX_PIECES, Piece
from attndsl.analysis.solve import run_tensors
from attndsl.blocks import block_map_by_tiles
from attndsl.interp import Evaluator
from attndsl.ir import Op

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# ----------------------------------------------------------------------------- helpers


def compile_mask(mask: str, params: str = "", lets: tuple[str, ...] = ()) -> attndsl.Pattern:
    head = f"pattern t({params}):" if params else "pattern t:"
    body = "".join(f"    let {x}\n" for x in lets)
    return attndsl.compile(f"{head}\n{body}    mask = {mask}\n")["t"]


@pytest.fixture
def no_refine(monkeypatch):
    """Block maps from the symbolic passes alone."""
    monkeypatch.setattr(blockmap, "REFINE_PAIRS", 0)


def brute(pat, q_len, kv_len, heads=1, block=(8, 8), kv_heads=None, **tensors):
    kv_heads = heads if kv_heads is None else kv_heads
    t = {k: np.asarray(v) for k, v in tensors.items()}
    for k, v in t.items():
        t[k] = v.astype(np.float64) if v.dtype.kind == "f" else v.astype(np.int64)
    return block_map_by_tiles(pat.grid(q_len, kv_len, heads, kv_heads, t), block)


def assert_sound(bm, ref):
    assert bm.shape == ref.shape and bm.dtype == np.int8
    assert not ((bm == 0) & (ref != 0)).any(), "a tile marked empty has an allowed pair"
    assert not ((bm == 2) & (ref != 2)).any(), "a tile marked full has a masked pair"


def rows_of(pat, expr, q_len, kv_len, heads=1):
    """Evaluate a k-free IR expression at every row: int/bool [heads, q_len]."""
    grid = pat.grid(q_len, kv_len, heads, heads, {})
    env = grid.env(np.arange(heads), np.arange(q_len), np.zeros(1, dtype=np.int64))
    v = np.asarray(Evaluator(env).sub(expr))
    return np.broadcast_to(v, (heads, q_len, 1))[..., 0]


def key_mask(pat, pieces, q_len, kv_len, heads=(0,), **tensors):
    """The key set of the pieces at every row (the pieces' own meaning, residues included)."""
    grid = pat.grid(q_len, kv_len, max(heads) + 1, max(heads) + 1, tensors)
    return KeyIntervals(tuple(heads), pat.ir.mask, tuple(pieces)).row_mask(grid, np.arange(q_len))


def assert_exact_sets(pat, q_len=40, kv_len=40):
    sets = api.row_sets(pat.bound())
    assert sets.exact
    dense = pat.dense_mask(q_len, kv_len)[0]
    assert (key_mask(pat, sets.lower, q_len, kv_len) == dense).all()
    return sets


# ----------------------------------------------------------------------------- the row solver


@pytest.mark.parametrize("w", [1, 3, 16])
def test_sliding_is_one_piece(w):
    pat = compile_mask(f"sliding({w})")
    sets = assert_exact_sets(pat)
    assert len(sets.lower) == 1
    (p,) = sets.lower
    assert p.guard.op is Op.CONST and p.guard.value is True and p.residue is None
    q = np.arange(40)
    assert (rows_of(pat, p.lo, 40, 40)[0] == np.maximum(0, q - w + 1)).all()
    assert (rows_of(pat, p.hi, 40, 40)[0] == q).all()


@pytest.mark.parametrize("c", [1, 4, 7])
def test_chunked_is_one_piece(c):
    pat = compile_mask(f"q // {c} == k // {c}")
    q_len = kv_len = 45                 # no multiple of 4 or 7: the last chunk is cut
    sets = assert_exact_sets(pat, q_len, kv_len)
    assert len(sets.lower) == 1
    (p,) = sets.lower
    q = np.arange(q_len)
    assert (rows_of(pat, p.lo, q_len, kv_len)[0] == c * (q // c)).all()
    assert (rows_of(pat, p.hi, q_len, kv_len)[0] == np.minimum(c * (q // c) + c - 1, kv_len - 1)).all()


def test_linear_coefficients_divide_exactly():
    pat = compile_mask("2 * k <= q and 3 * k >= q + 1")
    sets = assert_exact_sets(pat, 50, 50)
    (p,) = sets.lower
    q = np.arange(50)
    assert (rows_of(pat, p.hi, 50, 50)[0] == np.minimum(q // 2, 49)).all()
    assert (rows_of(pat, p.lo, 50, 50)[0] == np.maximum(-(-(q + 1) // 3), 0)).all()


@pytest.mark.parametrize("mask, pieces", [
    ("abs(q - k) <= 3", 1),
    ("max(q - k, k - q) <= 3", 1),            # the same band through max
    ("min(q - k, 5) >= 0", 1),                # causal (min(x, 5) >= 0 iff x >= 0)
    ("max(q - k, 2) <= 2", 1),                # q - k <= 2
    ("min(k, 10) < q - 3", None),
    ("abs(q - k) > 3", 2),
    ("abs(q - k) == 3", 2),
    ("abs(q - k) != 3", None),
    ("abs(q - k) <= -1", 0),                  # never
    ("clamp(k, 2, 10) == 5", 1),
    ("clamp(q - k, 0, 8) < 8", None),
    ("(k if q < 10 else q - k) <= 4", None),
])
def test_abs_min_max_if_are_rewritten_exactly(mask, pieces):
    sets = assert_exact_sets(compile_mask(mask))
    if pieces is not None:
        assert len(sets.lower) == pieces


def test_not_equal_is_the_complement():
    pat = compile_mask("k != q")
    sets = assert_exact_sets(pat)
    assert len(sets.lower) == 2
    q = np.arange(40)
    spans = sorted((tuple(rows_of(pat, p.lo, 40, 40)[0]), tuple(rows_of(pat, p.hi, 40, 40)[0]))
                   for p in sets.lower)
    lo0, hi0 = map(np.array, spans[0])
    lo1, hi1 = map(np.array, spans[1])
    assert (lo0 == 0).all() and (hi0 == q - 1).all()
    assert (lo1 == q + 1).all() and (np.minimum(hi1, 39) == 39).all()


@pytest.mark.parametrize("mask, params", [("k * k <= q", ""), ("doc[k] > 3", "doc: int[]"),
                                          ("q * k == 4", ""), ("float(k) < 2.5", "")])
def test_unknown_atoms_are_empty_below_and_everything_above(mask, params):
    sets = api.row_sets(compile_mask(mask, params).bound())
    assert not sets.exact
    assert sets.lower == ()
    assert sets.upper == ALL


def test_unknown_atoms_inside_and_or(no_refine):
    causal = compile_mask("causal").dense_mask(30, 30)[0]
    pat = compile_mask("causal and k * k <= q")
    both = api.row_sets(pat.bound())
    assert both.lower == () and (key_mask(pat, both.upper, 30, 30) == causal).all()
    pat = compile_mask("causal or k * k <= q")
    either = api.row_sets(pat.bound())
    assert not either.exact and (key_mask(pat, either.lower, 30, 30) == causal).all()
    assert either.upper == ALL
    for mask in ("causal and k * k <= q", "causal or k * k <= q", "not (causal and k * k <= q)"):
        pat = compile_mask(mask)
        assert_sound(pat.block_map(50, 50, block=(4, 4)), brute(pat, 50, 50, block=(4, 4)))


def test_residue_pieces():
    sets = assert_exact_sets(compile_mask("k % 4 >= 2"))
    (p,) = sets.lower
    assert p.residue.modulus == 4 and p.residue.live == frozenset({2, 3})
    assert p.residue.offset.op is Op.CONST and p.residue.offset.value == 0
    sets = assert_exact_sets(compile_mask("dilated(4, 3)"))
    (p,) = sets.lower
    assert p.residue.modulus == 3 and p.residue.live == frozenset({0})
    assert p.residue.offset.op is Op.Q                    # (k - q) mod 3 == 0


def test_overflowing_max_pieces_falls_back_soundly(no_refine):
    n = MAX_PIECES + 7
    mask = " or ".join(f"k == {2 * i}" for i in range(n))            # n disjoint single keys
    pat = compile_mask(mask)
    sets = api.row_sets(pat.bound())
    assert not sets.exact
    assert len(sets.lower) <= MAX_PIECES and len(sets.upper) <= MAX_PIECES
    dense = pat.dense_mask(30, 2 * n + 5)[0]
    assert not (key_mask(pat, sets.lower, 30, 2 * n + 5) & ~dense).any()
    assert not (dense & ~key_mask(pat, sets.upper, 30, 2 * n + 5)).any()
    for block in [(1, 1), (4, 3), (8, 8)]:
        assert_sound(pat.block_map(30, 2 * n + 5, block=block), brute(pat, 30, 2 * n + 5, block=block))
    # and below the budget the same union is exact
    pat = compile_mask(" or ".join(f"k == {2 * i}" for i in range(MAX_PIECES)))
    assert api.row_sets(pat.bound()).exact


def test_small_budget_falls_back_soundly(monkeypatch, no_refine):
    monkeypatch.setattr(pieces, "MAX_PIECES", 1)
    for mask in ["sliding(4) or sinks(2)", "not (band(3) or globals(2))", "chunked(4) and not causal",
                 "(causal if q < 9 else band(2)) or k == 17"]:
        pat = compile_mask(mask)
        assert_sound(pat.block_map(40, 40, block=(4, 4)), brute(pat, 40, 40, block=(4, 4)))


def test_shared_rewrites_do_not_alias():
    """Regression: the solver memoised results by id() of temporary trees built by the
    if/abs/min/max rewrites; a freed temporary's id was reused by the next one, so the second
    `if` below got the first one's key set."""
    pat = compile_mask("(causal if q < 5 else sinks(3)) and (sliding(4) if q < 7 else band(2))")
    assert_exact_sets(pat, 20, 20)
    for block in [(1, 1), (3, 2)]:
        assert (pat.block_map(20, 20, block=block) == brute(pat, 20, 20, block=block)).all()


@pytest.mark.parametrize("mask", [
    "not (globals(2) or prefix(3) or sinks(1))",
    "not (not (sliding(4) or sinks(2)) and not band(3))",
    "not ((full if prefix(11) else sinks(0))) and prefix(4)",
    "(not (not sinks(7))) if sliding(9) else not (full if band(1) else prefix(10))",
    "(globals(1) if q < 3 else sliding(5)) and not (chunked(4) if k > 6 else band(1))",
])
def test_nested_negations_stay_exact(mask, no_refine):
    """Regression: complements kept statically empty and subsumed pieces (e.g. [0, -1] or
    [q + 1, q]), so nested not/if over a few prelude sets overflowed MAX_PIECES and lost
    exactness."""
    pat = compile_mask(mask)
    assert_exact_sets(pat, 37, 45)
    assert (pat.block_map(37, 45, block=(4, 3)) == brute(pat, 37, 45, block=(4, 3))).all()


# ----------------------------------------------------------------------------- interval analysis


def test_interval_rules_cover_every_op():
    assert set(INTERVAL_RULES) == set(Op)


def tile_grid(q_ranges, k_ranges, heads=1, params=None, tensors=None, sizes=None) -> TileGrid:
    q_lo, q_hi = (np.array(x, dtype=np.int64)[None, :, None] for x in zip(*q_ranges, strict=True))
    k_lo, k_hi = (np.array(x, dtype=np.int64)[None, None, :] for x in zip(*k_ranges, strict=True))
    return TileGrid(q_lo, q_hi, k_lo, k_hi, np.arange(heads)[:, None, None],
                    sizes or {"q_len": 64, "kv_len": 64, "heads": heads, "kv_heads": heads},
                    params or {}, tensors or {}, (1, 1))


def test_congruence_on_mod():
    pat = compile_mask("(q - k) % 8 == 1")
    node = pat.ir.mask.args[0]                             # (q - k) % 8
    grid = tile_grid([(10, 13), (14, 17), (0, 20)], [(0, 1)])
    num = Analyzer(grid).value(node)
    lo, hi = num.lo[0, :, 0], num.hi[0, :, 0]
    assert (lo[0], hi[0]) == (1, 5)        # q - k in [9, 13]: residues 1..5, no wrap
    assert (lo[1], hi[1]) == (0, 7)        # [13, 17] wraps past 16
    assert (lo[2], hi[2]) == (0, 7)        # wider than the modulus
    t = Analyzer(grid).value(pat.ir.mask)
    assert t.may[0, :, 0].tolist() == [True, True, True]
    grid = tile_grid([(12, 13)], [(0, 1)])                 # q - k in [11, 13]: residues 3..5
    assert not Analyzer(grid).value(pat.ir.mask).may.any()  # proved empty by congruence
    grid = tile_grid([(-7, -5)], [(0, 0)])                 # floor semantics on negatives
    num = Analyzer(grid).value(node)
    assert (num.lo.item(), num.hi.item()) == (1, 3)


def test_mod_congruence_gives_empty_tiles_in_block_maps(no_refine):
    pat = compile_mask("k % 8 < 2 and q % 8 < 2 and k * k >= 0")   # inexact: intervals decide
    bm = pat.block_map(64, 64, block=(4, 4))
    ref = brute(pat, 64, 64, block=(4, 4))
    assert_sound(bm, ref)
    assert (bm == 0).sum() == (ref == 0).sum()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.integers(-10 ** 6, 10 ** 6), min_size=1, max_size=70), st.data())
def test_sparse_table_range_extremes(values, data):
    arr = np.array(values, dtype=np.int64)
    n = len(arr)
    pairs = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), min_size=1,
                               max_size=30))
    lo = np.array([min(a, b) for a, b in pairs])
    hi = np.array([max(a, b) for a, b in pairs])
    mn, mx = _range_extremes(arr, lo, hi)
    assert mn.tolist() == [arr[a:b + 1].min() for a, b in zip(lo, hi, strict=True)]
    assert mx.tolist() == [arr[a:b + 1].max() for a, b in zip(lo, hi, strict=True)]
    # broadcast shapes, as the tile grid produces them
    mn, mx = _range_extremes(arr, lo[:, None], np.full((1, 3), n - 1))
    assert mn.shape == (len(lo), 3) and (mx[:, 0] == [arr[a:].max() for a in lo]).all()


@pytest.mark.parametrize("r, b, seed", [(1, 4, 0), (2, 3, 7), (3, 8, 1), (5, 5, 2), (0, 4, 0)])
@pytest.mark.parametrize("q_len, kv_len, block", [(64, 64, (8, 8)), (30, 70, (7, 5)),
                                                  (1, 45, (1, 16)), (33, 33, (16, 3))])
def test_random_blocks_prefix_sums_are_exact(r, b, seed, q_len, kv_len, block):
    """The random_blocks rule reduces the exact block table over each tile by prefix sums: it
    is exact whatever the tile shape (a tile overlapping a b-block overlaps all its pairs' rows
    and columns)."""
    pat = compile_mask(f"random_blocks({r}, {b}, {seed})")
    grid = pat.grid(q_len, kv_len, 1, 1, {})
    tiles = make_grid(q_len, kv_len, 1, 1, block, grid.params, {})
    t = classify_tiles(pat.ir.mask, tiles)
    ref = block_map_by_tiles(grid, block)[0]
    assert (t.may[0] == (ref != 0)).all()
    assert (t.must[0] == (ref == 2)).all()


def test_integer_overflow_widens(no_refine):
    """The interpreter wraps at 64 bits; interval bounds that may wrap widen to everything."""
    big = 2 ** 62
    for mask in [f"(k + 1) * {big} > 0", f"q * {big} + k * {big} < 0", f"-(k * {big}) - {big} < 0",
                 f"abs(k * {big} - {big}) > 0", f"k + {big} + {big} > 0", f"q * {big} - k < 0",
                 f"k <= q + {2 ** 63 - 1}"]:
        pat = compile_mask(mask)
        grid = pat.grid(16, 16, 1, 1, {})
        t = classify_tiles(pat.ir.mask, make_grid(16, 16, 1, 1, (4, 4), grid.params, {}))
        ref = block_map_by_tiles(grid, (4, 4))
        assert not (~t.may & (ref != 0)).any() and not (t.must & (ref != 2)).any(), mask
        assert_sound(pat.block_map(16, 16, block=(4, 4)), ref)


@pytest.mark.parametrize("mask", ["k > t[q]", "k // 3 == t[q]", "k >= t[q] and k < t[q] + 3",
                                  "k <= t[q] - 1 or k > 6"])
@pytest.mark.parametrize("values", [[2 ** 63 - 1] * 8, [-2 ** 63] * 8, [2 ** 40] * 8, list(range(8)),
                                    [3, 2 ** 63 - 1, 0, 5, -2 ** 63, 1, 2, 9]])
def test_tensor_values_near_int64_limits_stay_sound(mask, values, no_refine):
    """Regression: bounds the solver builds from tensor values (k > t[q] is k >= t[q] + 1)
    wrapped in int64 where the mask itself does not, so k > t[q] with t[q] = 2**63 - 1 was
    marked full. Rows reading values beyond +-2**31 are now left to the interval analysis."""
    pat = compile_mask(mask, "t: int[]")
    t = np.array(values, dtype=np.int64)
    bm = pat.block_map(8, 8, block=(4, 4), t=t)
    ref = brute(pat, 8, 8, block=(4, 4), t=t)
    assert_sound(bm, ref)
    if values == list(range(8)):
        assert (bm == ref).all()


def test_min_max_with_three_arguments():
    """Regression: the n-ary min/max rule reduced a ragged list of per-tile bounds."""
    for mask in ["min(q, k, 3) >= 2", "max(q - k, k - 5, 1) <= 3", "clamp(min(q, k, 9), 2, 7) == 4"]:
        pat = compile_mask(mask)
        grid = pat.grid(20, 24, 1, 1, {})
        t = classify_tiles(pat.ir.mask, make_grid(20, 24, 1, 1, (3, 5), grid.params, {}))
        ref = block_map_by_tiles(grid, (3, 5))
        assert not (~t.may & (ref != 0)).any() and not (t.must & (ref != 2)).any(), mask


def test_nan_in_float_tensors(no_refine):
    """Regression: a NaN in a tile's range made its bounds NaN and every comparison false, so
    the tile was proved empty although other keys in it are allowed."""
    pat = compile_mask("w[k] < 1.0", "w: float[]")
    w = np.array([0.0, np.nan, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0, np.nan, np.nan, np.nan, np.nan])
    bm, ref = pat.block_map(8, 12, block=(8, 4), w=w), brute(pat, 8, 12, block=(8, 4), w=w)
    assert ref.tolist() == [[[1, 0, 0]]]
    assert_sound(bm, ref)
    assert bm[0, 0, :2].tolist() == [1, 0]          # (a tile of NaN only may stay partial)
    pat = compile_mask("not (w[k] >= 1.0)", "w: float[]")           # NaN >= 1.0 is false
    bm, ref = pat.block_map(8, 12, block=(8, 4), w=w), brute(pat, 8, 12, block=(8, 4), w=w)
    assert ref.tolist() == [[[2, 0, 2]]]
    assert_sound(bm, ref)
    pat = compile_mask("u[h, k] < 1.0", "u: float[][]")
    u = np.full((1, 12), np.nan)
    u[0, 3] = 0.0
    assert_sound(pat.block_map(8, 12, block=(8, 4), u=u), brute(pat, 8, 12, block=(8, 4), u=u))


def test_tensor_ranges_use_range_queries(no_refine):
    """t[k] compared with a constant: tiles whose key range holds only small values are empty."""
    pat = compile_mask("t[k] > 5 and k * k >= 0", "t: int[]")
    t = np.array([0, 1, 2, 9, 0, 0, 0, 0, 7, 0, 0, 0], dtype=np.int64)
    bm = pat.block_map(12, 12, block=(12, 4), t=t)
    ref = brute(pat, 12, 12, block=(12, 4), t=t)
    assert_sound(bm, ref)
    assert bm[0, 0].tolist() == [1, 0, 1]


# ----------------------------------------------------------------------------- partial evaluation


def test_fold_constants_and_short_circuits():
    pat = compile_mask("k <= q + heads * 2")
    folded = fold(pat.ir.mask, {"heads": 4}, {})
    assert folded == compile_mask("k <= q + 8").ir.mask
    pat = compile_mask("h < 2 and causal")
    assert fold(pat.ir.mask, {"h": 3}, {}) == compile_mask("false").ir.mask
    assert fold(pat.ir.mask, {"h": 1}, {}) == compile_mask("causal").ir.mask
    pat = compile_mask("h < 2 or causal")
    assert fold(pat.ir.mask, {"h": 0}, {}) == compile_mask("true").ir.mask
    pat = compile_mask("causal if h == 0 else sinks(2)")
    assert fold(pat.ir.mask, {"h": 1}, {}) == compile_mask("sinks(2)").ir.mask
    pat = compile_mask("sliding(w * 2)", "w = 3")
    assert fold(pat.ir.mask, {}, pat.params) == compile_mask("sliding(6)").ir.mask
    # q, k and tensors are never folded
    pat = compile_mask("t[q] == t[k] and h % 2 == 0", "t: int[]")
    assert fold(pat.ir.mask, {"h": 0}, {}) == pat.ir.mask.args[0]


def test_duo_attention_heads_form_two_classes(no_refine):
    prog = attndsl.load(EXAMPLES / "duo_attention.attn")
    pat = prog["duo_attention"].bind(window=8)
    sizes = {"q_len": 40, "kv_len": 40, "heads": 4, "kv_heads": 2}
    classes = head_classes(pat.ir.mask, 4, pat.params, sizes)
    assert len(classes) == 2
    (retrieval, rh), (streaming, sh) = classes
    assert rh == [0, 1] and sh == [2, 3]
    assert retrieval == compile_mask("causal").ir.mask
    assert not retrieval.uses(Op.H) and not streaming.uses(Op.H)
    bm = pat.block_map(40, 40, heads=4, kv_heads=2, block=(4, 4))
    assert (bm == brute(pat, 40, 40, heads=4, kv_heads=2, block=(4, 4))).all()
    assert (bm[0] == bm[1]).all() and (bm[2] == bm[3]).all() and (bm[0] != bm[2]).any()

    inter = prog["duo_attention_interleaved"].bind(window=8)
    classes = head_classes(inter.ir.mask, 4, inter.params, sizes)
    assert [hs for _e, hs in classes] == [[0, 2], [1, 3]]
    bm = inter.block_map(40, 40, heads=4, block=(4, 4))
    assert (bm == brute(inter, 40, 40, heads=4, block=(4, 4))).all()


def test_head_independent_masks_are_one_class():
    pat = compile_mask("causal and sliding(4)")
    classes = head_classes(pat.ir.mask, 3, {}, {"q_len": 8, "kv_len": 8, "heads": 3, "kv_heads": 3})
    assert classes == [(pat.ir.mask, [0, 1, 2])]


# ----------------------------------------------------------------------------- documents


PACKED = "causal and doc[q] == doc[k]"


def test_run_tensors():
    got = run_tensors("doc", np.array([4, 4, 4, 1, 1, 7, 2, 2]))
    assert got["doc#start"].tolist() == [0, 0, 0, 3, 3, 5, 6, 6]
    assert got["doc#end"].tolist() == [2, 2, 2, 4, 4, 5, 7, 7]
    assert run_tensors("doc", np.array([0, 0, 1, 1, 0])) == {}             # 0 in two runs
    assert run_tensors("doc", np.array([], dtype=np.int64)) == {}
    assert run_tensors("doc", np.array([[0, 1]])) == {}


@pytest.mark.parametrize("doc", [
    [0] * 10 + [1] * 7 + [2] * 20 + [3] * 3,
    [5] * 13 + [2] * 13 + [9] * 14,                   # single runs, labels not sorted
    list(range(40)),                                  # one token per document
    [0] * 40,
])
@pytest.mark.parametrize("q_len, block", [(40, (4, 4)), (40, (5, 3)), (9, (16, 7)), (1, (1, 1))])
def test_documents_in_single_runs_are_exact(doc, q_len, block, no_refine):
    pat = compile_mask(PACKED, "doc: int[]")
    doc = np.array(doc)
    runs = frozenset({"doc"})
    assert api.row_sets(pat.bound(), runs=runs).exact
    bm = pat.block_map(q_len, 40, block=block, doc=doc)
    assert (bm == brute(pat, q_len, 40, block=block, doc=doc)).all()
    desc = pat.describe(q_len, 40, block=block, doc=doc)
    keys = desc.keys_of_head(0)
    assert keys is not None
    tensors = {"doc": doc, **run_tensors("doc", doc)}
    rows = keys.row_mask(pat.grid(q_len, 40, 1, 1, tensors), np.arange(q_len))
    assert (rows == pat.dense_mask(q_len, 40, doc=doc)[0]).all()


@pytest.mark.parametrize("doc", [
    [0] * 10 + [1] * 10 + [0] * 10 + [2] * 10,        # document 0 in two runs
    [0, 1] * 20,
    [3] * 5 + [1] * 30 + [3] * 5,
])
@pytest.mark.parametrize("block", [(4, 4), (5, 3), (40, 1)])
def test_documents_repeating_in_two_runs_stay_sound(doc, block, no_refine):
    pat = compile_mask(PACKED, "doc: int[]")
    doc = np.array(doc)
    assert run_tensors("doc", doc) == {}
    assert not api.row_sets(pat.bound()).exact
    bm = pat.block_map(40, 40, block=block, doc=doc)
    assert_sound(bm, brute(pat, 40, 40, block=block, doc=doc))
    assert pat.describe(40, 40, block=block, doc=doc).keys_of_head(0) is None


def test_documents_prune_cross_document_tiles(no_refine):
    """Not exact, but the tile intervals still see that two documents' tiles are empty."""
    pat = compile_mask(PACKED, "doc: int[]")
    doc = np.array([0] * 16 + [1] * 16 + [0] * 16 + [2] * 16)
    bm = pat.block_map(64, 64, block=(16, 16), doc=doc)
    ref = brute(pat, 64, 64, block=(16, 16), doc=doc)
    assert_sound(bm, ref)
    assert bm[0, 1, 0] == 0 and bm[0, 3, 1] == 0


# ----------------------------------------------------------------------------- errors


def test_block_map_refuses_selectors():
    pat = compile_mask("causal and topk_blocks(2, 16)")
    with pytest.raises(attndsl.AttnCallError, match="static patterns"):
        pat.block_map(64, 64)
    with pytest.raises(attndsl.AttnCallError):
        pat.describe(64, 64)


@pytest.mark.parametrize("block", [(0, 128), (128, 0), (-1, 4), (128,), (128, 128, 1), "ab", None,
                                   ("x", 4), 128])
def test_block_map_rejects_bad_blocks(block):
    pat = compile_mask("causal")
    with pytest.raises(attndsl.AttnCallError, match="block"):
        pat.block_map(64, 64, block=block)


def test_block_map_call_errors():
    with pytest.raises(attndsl.AttnCallError, match="doc"):
        compile_mask(PACKED, "doc: int[]").block_map(8, 8)                # missing tensor
    with pytest.raises(attndsl.AttnCallError, match="w"):
        compile_mask("sliding(w)", "w: int").block_map(8, 8)              # unbound parameter
    with pytest.raises(attndsl.AttnCallError, match="kv_heads"):
        compile_mask("causal").block_map(8, 8, heads=3, kv_heads=2)
    with pytest.raises(attndsl.AttnCallError, match="q_len"):
        compile_mask("causal").block_map(-1, 8)


def test_empty_calls():
    pat = compile_mask("causal")
    assert pat.block_map(0, 10, block=(4, 4)).shape == (1, 0, 3)
    assert pat.block_map(10, 0, block=(4, 4)).shape == (1, 3, 0)


# ----------------------------------------------------------------------------- examples


def _example_patterns():
    out = []
    for path in sorted(EXAMPLES.glob("*.attn")):
        for pat in attndsl.load(path):
            if not pat.uses_selectors():
                out.append(pytest.param(path.name, pat.name, id=pat.name))
    return out


def _example_inputs(pat, kv_len, heads, rng):
    docs = np.sort(rng.integers(0, 4, kv_len))
    docs = np.unique(docs, return_inverse=True)[1]
    inputs = {}
    for name in pat.tensor_params:
        if name == "doc":
            inputs[name] = docs
        elif name == "doc_start":
            inputs[name] = np.searchsorted(docs, np.arange(docs.max() + 1))
        elif name == "segment":
            inputs[name] = (np.arange(kv_len) >= kv_len // 3).astype(np.int64)
        elif name == "rel":
            inputs[name] = rng.standard_normal((heads, 2 * pat.params.get("max_dist", 8) + 1))
        elif name == "retrieval":                   # one flag per key/value head
            inputs[name] = rng.integers(0, 2, heads)
        else:
            pytest.skip(f"no input for tensor '{name}'")
    return inputs


@pytest.mark.parametrize("filename, name", _example_patterns())
def test_examples_block_maps_are_sound(filename, name, no_refine):
    """Every static example at small sizes (large window/block parameters shrunk)."""
    pat = attndsl.load(EXAMPLES / filename)[name]
    small = {p.name: 8 for p in pat.ir.params
             if not p.is_tensor and isinstance(p.default, int) and not isinstance(p.default, bool)
             and p.default >= 64}
    if small:
        pat = pat.bind(**small)
    rng = np.random.default_rng(0)
    for q_len, kv_len, block in [(67, 67, (8, 4)), (5, 90, (16, 16)), (1, 33, (1, 5))]:
        inputs = _example_inputs(pat, kv_len, 4, rng)
        bm = pat.block_map(q_len, kv_len, heads=4, kv_heads=2, block=block, **inputs)
        ref = brute(pat, q_len, kv_len, heads=4, kv_heads=2, block=block, **inputs)
        assert_sound(bm, ref)
        call = api.call_classes(pat.bound(), q_len, kv_len, 4, block, 2, inputs)
        if call.exact and all(c.sets.exact and not any(p.residue for p in c.sets.upper)
                              for c in call.classes):
            assert (bm == ref).all(), "exactly solved, yet the map differs from brute force"


# ----------------------------------------------------------------------------- work (timings: bench/)


def _count_positions(monkeypatch) -> dict:
    """Count, per leaf q / k / h, the grid points at which the interpreter reads it (the size
    of the broadcast [H, Nq, Nk] grid of each read): the work of evaluating the mask."""
    from attndsl import interp

    counts = {Op.Q: 0, Op.K: 0, Op.H: 0}

    def counting(op, rule):
        def counted(ev, node, live):
            env = ev.env
            counts[op] += int(np.prod(np.broadcast_shapes(np.shape(env.h), np.shape(env.q),
                                                          np.shape(env.k))))
            return rule(ev, node, live)
        return counted

    for op in counts:
        monkeypatch.setitem(interp.EVAL_RULES, op, counting(op, interp.EVAL_RULES[op]))
    return counts


def test_block_map_work_is_linear_not_pairwise(monkeypatch):
    """``causal and (sinks(4) or sliding(1024))`` at 131072 tokens, (128, 128) tiles: the
    analysis evaluates the mask on rows, not on pairs. Measured as interpreter work (grid points
    read), not wall time (bench/bench_block_map.py times it against brute force): no pair is
    evaluated, the row work grows linearly in N (4x from 32768 to 131072) and stays at least
    1000x below the N**2 points brute force reads (a brute-force map is counted as a check that
    the counter sees evaluations at all)."""
    pat = compile_mask("causal and (sinks(4) or sliding(1024))")
    counts = _count_positions(monkeypatch)
    m = 512
    block_map_by_tiles(pat.grid(m, m, 1, 1, {}), (128, 128))
    assert counts[Op.K] >= m * m and counts[Op.Q] >= m * m        # brute force is counted
    work = {}
    for n in (32768, 131072):
        for op in counts:
            counts[op] = 0
        bm = pat.bind().block_map(n, n, block=(128, 128))         # fresh: solves again
        work[n] = sum(counts.values())
        assert counts[Op.K] == 0, f"{counts[Op.K]} pair evaluations at N={n}"
        assert work[n] * 1000 <= n * n
    assert work[131072] <= 5 * max(work[32768], 1)
    # and it is the right map
    assert bm.shape == (1, 1024, 1024)
    i = np.arange(1024)
    # row tile 20 (q in [2560, 2687]): keys [q - 1023, q] and the 4 sinks
    assert (bm[0, i, i] == 1).all() and (bm[0, 20, 13:20] == 2).all() and bm[0, 20, 12] == 1
    assert bm[0, 20, 0] == 1 and (bm[0, 20, 1:12] == 0).all() and (bm[0, 20, 21:] == 0).all()
    m = 8192
    assert (block_map_by_tiles(pat.grid(m, m, 1, 1, {}), (128, 128))
            == pat.block_map(m, m, block=(128, 128))).all()


def test_pieces_are_well_formed():
    """Row-set pieces are k-free IR (what descriptors hand to kernels)."""
    for mask in ["causal and (sinks(4) or sliding(64))", "dilated(8, 2) or band(3)",
                 "not (chunked(8) and k % 4 == 1)"]:
        sets = api.row_sets(compile_mask(mask).bound())
        for p in sets.lower + sets.upper:
            assert isinstance(p, Piece)
            for e in (p.guard, p.lo, p.hi) + ((p.residue.offset,) if p.residue else ()):
                assert not e.uses(Op.K, Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.ROUTE, Op.RANDOM_BLOCKS)
