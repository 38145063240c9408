"""The analysis of the language's integer and bit operators, float functions, bool tensor inputs
and reductions (issue 15): sound everywhere, exact where a constant makes a bit operation
arithmetic.

* the interval bounds of analysis/bitwise.py against brute force (the hull of ``& | ^`` is
  exact for any signs; shifts, ``ilog2``, ``floor``/``ceil``/``round``);
* block maps with refinement off against the dense reference mask on small grids: every tile
  classified empty or full is so, for masks mixing the new operators with variables; the
  constant forms (``k >> 6 == q >> 6``, ``k & 63 < 8``, ``(q ^ k) & 3 == 0``, ``ilog2`` of a
  distance) are solved exactly and give the brute-force map;
* bool tensor reads, reductions (expanded per call before analysis), closed forms, the
  refusals of unexpanded reductions, and the int32 proof (codegen/narrow.py) with the new
  int operators.
"""

from __future__ import annotations

import math
import operator
import random

import numpy as np
import pytest
from attndsl.codegen import narrow

import attndsl
from attndsl.analysis import api, bitwise, blockmap, cost, intervals, solve
from attndsl.analysis.intervals import Analyzer, NeedsExpansion, classify_tiles, make_grid
from attndsl.blocks import block_map_by_tiles
from attndsl.interp import Evaluator
from attndsl.ir import Expr, Op, Type, const
from attndsl.ops import EXPANDED_OPS

BIT = {"&": operator.and_, "|": operator.or_, "^": operator.xor}
SIZES = [(37, 37, (8, 8)), (20, 45, (4, 16)), (45, 20, (16, 4)), (1, 50, (1, 7)), (33, 64, (8, 8))]


@pytest.fixture(autouse=True)
def no_refine(monkeypatch):
    """Block maps from the symbolic passes alone (refinement would hide their mistakes)."""
    monkeypatch.setattr(blockmap, "REFINE_PAIRS", 0)


def compile_mask(mask: str, params: str = "") -> attndsl.Pattern:
    return attndsl.compile(f"pattern t{params}:\n    mask = {mask}\n")["t"]


def brute(pat, q_len, kv_len, block, heads=1, **tensors):
    return block_map_by_tiles(pat.grid(q_len, kv_len, heads, heads, tensors), block)


def assert_sound(bm, ref, what=""):
    assert bm.shape == ref.shape and bm.dtype == np.int8
    assert not ((bm == 0) & (ref != 0)).any(), f"a tile marked empty has an allowed pair: {what}"
    assert not ((bm == 2) & (ref != 2)).any(), f"a tile marked full has a masked pair: {what}"


def _wrap(v: int) -> int:
    return (v + 2 ** 63) % 2 ** 64 - 2 ** 63


# ----------------------------------------------------------------------------- bounds


def test_bit_hulls_are_exact_for_any_signs():
    rng = random.Random(0)
    for _ in range(400):
        span = rng.choice([6, 40, 300])
        a0, b0 = rng.randint(-span, span), rng.randint(-span, span)
        a1, b1 = a0 + rng.randint(0, span // 2), b0 + rng.randint(0, span // 2)
        for op, fn in BIT.items():
            lo, hi = bitwise.bit_bounds(op, a0, a1, b0, b1)
            vals = [fn(x, y) for x in range(a0, a1 + 1) for y in range(b0, b1 + 1)]
            assert (int(lo), int(hi)) == (min(vals), max(vals)), (op, a0, a1, b0, b1)


def test_bit_hulls_at_the_int64_limits_and_elementwise():
    rng = random.Random(1)
    for _ in range(100):
        a0, b0 = rng.randint(-2 ** 63, 2 ** 63 - 6), rng.randint(-2 ** 63, 2 ** 63 - 6)
        a1, b1 = a0 + rng.randint(0, 5), b0 + rng.randint(0, 5)
        for op, fn in BIT.items():
            lo, hi = bitwise.bit_bounds(op, a0, a1, b0, b1)
            vals = [fn(x, y) for x in range(a0, a1 + 1) for y in range(b0, b1 + 1)]
            assert (int(lo), int(hi)) == (min(vals), max(vals))
    a0 = np.array([-9, -3, 0, 5, 17])
    b0 = np.array([-4, 2, 7])
    for op, fn in BIT.items():
        lo, hi = bitwise.bit_bounds(op, a0[:, None], a0[:, None] + 6, b0[None], b0[None] + 3)
        for i, j in np.ndindex(lo.shape):
            vals = [fn(x, y) for x in range(a0[i], a0[i] + 7) for y in range(b0[j], b0[j] + 4)]
            assert (lo[i, j], hi[i, j]) == (min(vals), max(vals))


def test_shift_bounds():
    rng = random.Random(2)
    for _ in range(500):
        a0 = rng.randint(-300, 300)
        a1 = a0 + rng.randint(0, 80)
        c0 = rng.randint(-3, 64)
        c1 = c0 + rng.randint(0, 4)
        counts = [c for c in range(c0, c1 + 1) if 0 <= c <= 62]
        for op in ("<<", ">>"):
            lo, hi = bitwise.shift_bounds(op, a0, a1, c0, c1)
            if not counts:          # a call error wherever evaluated: no value to bound
                continue
            vals = [_wrap(x << c) if op == "<<" else x >> c for x in range(a0, a1 + 1) for c in counts]
            assert lo <= min(vals) and max(vals) <= hi, (op, a0, a1, c0, c1)
            if op == ">>" or max(abs(a0), abs(a1)) << c1 < 2 ** 62:
                assert (int(lo), int(hi)) == (min(vals), max(vals)), (op, a0, a1, c0, c1)


def test_ilog2_is_exact():
    xs = [-2 ** 63, -5, 0, 1, 2, 3, 4, 2 ** 31 - 1, 2 ** 31, 2 ** 53 - 1, 2 ** 53, 2 ** 53 + 1,
          2 ** 62 - 1, 2 ** 62, 2 ** 63 - 1]
    assert bitwise.ilog2(np.array(xs)).tolist() == [x.bit_length() - 1 if x >= 1 else -1 for x in xs]


def test_float_to_int_bounds_clip_to_what_converts():
    lo, hi = bitwise.float_to_int_bounds(np.floor, np.array([-np.inf, 2.5, -0.5]),
                                         np.array([np.inf, 3.5, 0.5]))
    assert lo.tolist() == [-2 ** 63, 2, -1] and hi.tolist() == [2 ** 63 - 1024, 3, 0]
    lo, hi = bitwise.float_to_int_bounds(np.rint, np.array([0.5, 1.5]), np.array([2.5, 2.5]))
    assert lo.tolist() == [0, 2] and hi.tolist() == [2, 2]          # half to even
    assert bitwise.float_converts(-2.0 ** 63, 2.0 ** 63 - 1024, False)
    assert not bitwise.float_converts(0.0, 2.0 ** 63, False)
    assert not bitwise.float_converts(0.0, 1.0, np.array([False, True]))


# ----------------------------------------------------------------------------- interval rules


INT_EXPRS = ["q & k", "q | (k - 20)", "(q - 30) ^ k", "~(q - k)", "k >> (q % 5)", "(q - 9) << (k % 4)",
             "ilog2(q - k)", "(k * 3) & 12", "(q ^ 5) | 3", "floor(float(q) / 2.5)",
             "ceil(float(q - k) * 0.3)", "round(float(k) / 4.0)", "-(k ^ q) >> 2", "ilog2(~k)"]
FLOAT_EXPRS = ["erf(float(q - k) / 8.0)", "exp2(float(k % 7) - 2.0)", "log2(float(q - k))",
               "log2(float(k + 1)) * erf(w[k])", "exp2(w[k])"]


@pytest.mark.parametrize("text", INT_EXPRS + FLOAT_EXPRS)
def test_intervals_contain_every_value_of_their_tile(text):
    pat = attndsl.compile(f"pattern t(w: float[]):\n    let x = {text}\n    mask = x == x\n")["t"]
    node = pat.ir.mask.args[0]
    w = np.array([0.0, 1.5, -2.0, np.inf, np.nan, -np.inf, 0.25] * 10)
    for q_len, kv_len, block in SIZES[:3]:
        grid = pat.grid(q_len, kv_len, 2, 2, {"w": w[:kv_len]})
        with np.errstate(all="ignore"):
            env = grid.env(np.arange(2), np.arange(q_len), np.arange(kv_len))
            actual = np.broadcast_to(np.asarray(Evaluator(env).sub(node)), (2, q_len, kv_len))
        num = Analyzer(make_grid(q_len, kv_len, 2, 2, block, {}, {"w": w[:kv_len]})).value(node)
        bq, bk = block
        shape = (1, -(-q_len // bq), -(-kv_len // bk))
        for i in range(-(-q_len // bq)):
            for j in range(-(-kv_len // bk)):
                v = actual[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                tl, th, nan = (np.broadcast_to(np.asarray(x), shape)[0, i, j]
                               for x in (num.lo, num.hi, num.nan))
                if v.dtype.kind == "f":
                    assert nan or not np.isnan(v).any(), f"{text}: unflagged NaN in tile {(i, j)}"
                    v = v[~np.isnan(v)]
                    if v.size == 0:
                        continue
                assert tl <= v.min() and v.max() <= th, (text, (i, j), (tl, th), (v.min(), v.max()))


def test_the_hull_of_an_aligned_xor_decides_tiles():
    """``(q ^ k) < 16`` on 16-aligned tiles: the exact hull makes every tile empty or full."""
    pat = compile_mask("(q ^ k) < 16")
    tiles = make_grid(64, 64, 1, 1, (16, 16), {}, {})
    t = classify_tiles(pat.ir.mask, tiles)
    ref = brute(pat, 64, 64, (16, 16))
    assert (np.where(t.must, 2, np.where(t.may, 1, 0)) == ref).all()


def test_bool_tensor_reads():
    g = np.zeros(40, dtype=bool)
    g[8:16] = True
    g[21] = True
    pat = compile_mask("g[k] or g[q]", "(g: bool[])")
    tiles = make_grid(40, 40, 1, 1, (8, 8), {}, {"g": g})
    t = classify_tiles(pat.ir.mask, tiles)
    ref = brute(pat, 40, 40, (8, 8), g=g)
    assert (np.where(t.must, 2, np.where(t.may, 1, 0)) == ref).all()        # exact per tile
    for q_len, kv_len, block in [(40, 40, (8, 8)), (13, 40, (4, 16)), (1, 40, (1, 5))]:
        for mask in ["g[k] and k <= q", "not g[k] or q - k < 3", "g[k] == g[q]",
                     "(g[k - 1] if k > 0 else g[k]) and k < 30"]:
            p = compile_mask(mask, "(g: bool[])")
            assert_sound(p.block_map(q_len, kv_len, 1, block, g=g), brute(p, q_len, kv_len, block, g=g), mask)
    empty = compile_mask("q < 0 and g[k]", "(g: bool[])")
    assert (empty.block_map(5, 5, 1, (2, 2), g=np.zeros(0, bool)) == 0).all()


# ----------------------------------------------------------------------------- block maps

EXACT = [
    "(k >> 3) == (q >> 3)",                     # k // 8 == q // 8: blocks
    "(k >> 2) <= (q >> 2) and k > q - 20",
    "(k & 7) < 2",                              # k % 8 < 2: a residue
    "(q & 15) < 4 or k < 3",                    # a guard
    "((q ^ k) & 3) == 0",                       # k == q (mod 4)
    "((q ^ k) & 7) != 5",
    "((q ^ k) >> 4) == 0",                      # same 16-block
    "(k ^ q) == 3",
    "(k ^ 5) & 6 >= 4",                         # low bits through a constant xor
    "(~k & 3) == 1",
    "ilog2(q - k + 1) <= 3",                    # a band
    "ilog2(q - k) == 2 or ilog2(q - k) == 4",   # a union of bands
    "ilog2(k - q) < 0",                         # k <= q
    "~k >= -q - 1",                             # k <= q
    "(k << 2) <= q",
    "q - k <= (1 << 3)",
]


@pytest.mark.parametrize("mask", EXACT)
def test_constant_bit_forms_are_solved_exactly(mask):
    pat = compile_mask(mask)
    assert api.row_sets(pat.bound()).exact, mask
    for q_len, kv_len, block in SIZES:
        ref = brute(pat, q_len, kv_len, block)
        bm = pat.block_map(q_len, kv_len, 1, block)
        if not any(p.residue for p in api.row_sets(pat.bound()).upper):
            assert (bm == ref).all(), (mask, q_len, kv_len, block)
        assert_sound(bm, ref, mask)
        dense = pat.dense_mask(q_len, kv_len)
        desc = pat.describe(q_len, kv_len, 1, block)
        assert desc.keys[0] is not None
        assert (desc.keys[0].row_mask(pat.grid(q_len, kv_len, 1, 1, {}), np.arange(q_len)) == dense[0]).all()


def test_large_shifts_leave_no_wrapped_bounds():
    """``k >> 40 <= q - 5`` holds for every key of a row q >= 5; solved as ``k // 2**40``, its
    bound ``(q - 4) * 2**40 - 1`` would wrap in int64 for q >= 2**23: such divisors (and shifts
    by more than 31) are left to the intervals, so every row set still holds every allowed key."""
    from attndsl.interp import Env, evaluate

    for mask in ["(k >> 40) <= q - 5", "k // (1 << 40) <= q - 5", "(k << 40) >= -q", "(k >> 3) <= q - 5"]:
        sets = api.row_sets(compile_mask(mask).bound())
        n = 2 ** 25
        for row in (2 ** 24, 2 ** 23 + 9, n - 1):
            env = Env(h=0, q=np.int64(row), k=np.int64(0), q_len=n, kv_len=n, heads=1, kv_heads=1,
                      params={})
            keys = [0, n // 3, n - 1]
            want = [bool(evaluate(compile_mask(mask).ir.mask, Env(
                h=0, q=np.int64(row), k=np.int64(key), q_len=n, kv_len=n, heads=1, kv_heads=1,
                params={}))) for key in keys]
            for key, allowed in zip(keys, want):
                inside = [bool(evaluate(p.guard, env)) and int(evaluate(p.lo, env)) <= key
                          <= int(evaluate(p.hi, env)) for p in sets.upper if p.residue is None]
                if allowed:
                    assert any(inside), (mask, row, key)


def test_bit_mask_residues_are_descriptors():
    desc = compile_mask("(k & 7) < 2").describe(32, 32, 1, (8, 8))
    assert desc.keys[0].kind == "residue" and desc.keys[0].moduli == (8,)
    desc = compile_mask("((q ^ k) & 3) == 0").describe(32, 32, 1, (8, 8))
    assert desc.keys[0].kind == "residue" and desc.keys[0].moduli == (4,)


SOUND = [
    "(q & k) == 0",
    "(q | k) < 40",
    "(q ^ k) % 5 == 1",
    "(k >> (q % 4)) == 2",
    "((1 << (q % 8)) & k) != 0",
    "(k << (q % 3)) < q + 5",
    "causal and (q - k) & (q - k - 1) == 0",     # distances that are powers of two
    "q > k and (1 << ilog2(q - k)) == q - k",
    "ilog2(k + 1) == ilog2(q + 1)",
    "ilog2(q - k) % 2 == 0 and k <= q",
    "floor(float(q) * 0.3) == floor(float(k) * 0.3)",
    "round(float(q - k) / 2.5) == 1",
    "ceil(float(k) / 3.0) <= q % 7",
    "erf(float(q - k) / 8.0) > 0.3",
    "exp2(float(k % 5)) < float(q % 9)",
    "log2(float(q - k)) <= 2.5",
    "~(q ^ k) < -4",
    "(q & 12) == (k & 12) and (q | 3) >= (k | 3)",
    "any(k == q - (1 << i) for i in range(5))",
    "all((k >> (i + 1)) != (q >> (i + 1)) for i in range(2)) or k == q",
    "sum((k >> i) & 1 for i in range(4)) == sum((q >> i) & 1 for i in range(4))",
    "max(k >> i for i in range(3)) <= q % 11",
]


@pytest.mark.parametrize("mask", SOUND)
def test_block_maps_with_the_new_operators_are_sound(mask):
    pat = compile_mask(mask)
    for q_len, kv_len, block in SIZES:
        for heads in (1, 2):
            ref = brute(pat, q_len, kv_len, block, heads)
            bm = pat.block_map(q_len, kv_len, heads, block)
            assert_sound(bm, ref, mask)
            expanded = pat.bound().for_sizes(q_len, kv_len, heads, heads).ir.mask
            t = classify_tiles(expanded, make_grid(q_len, kv_len, heads, heads, block, {}, {}))
            may, must = (np.broadcast_to(x, ref.shape) for x in (t.may, t.must))
            assert not (~may & (ref != 0)).any() and not (must & (ref != 2)).any(), mask


def test_power_of_two_distances_leave_most_tiles_empty():
    """``(q - k) & (q - k - 1) == 0``: the hulls of the two operands prove the tiles without a
    power-of-two distance empty."""
    pat = compile_mask("causal and (q - k) & (q - k - 1) == 0")
    bm = pat.block_map(512, 512, 1, (32, 32))
    ref = brute(pat, 512, 512, (32, 32))
    assert_sound(bm, ref)
    causal = compile_mask("causal").block_map(512, 512, 1, (32, 32))
    assert (bm != 0).sum() == (ref != 0).sum() < (causal != 0).sum()     # exact here


def test_reductions_are_expanded_before_the_analysis():
    src = "pattern t:\n    mask = any(k == q - i for i in range(3))\n"
    pat = attndsl.compile(src)["t"]
    report = cost.cost_report(pat, 40, 40, block=(8, 8))
    dense = pat.dense_mask(40, 40)
    assert report.kept_pairs == int(dense.sum()) and report.exact
    assert report.closed_form_at(40) == int(dense.sum())       # 3N - 3
    assert (pat.block_map(40, 40, 1, (8, 8)) == brute(pat, 40, 40, (8, 8))).all()
    sized = attndsl.compile("pattern t:\n    mask = any(k == q - i for i in range(q_len // 8))\n")["t"]
    report = cost.cost_report(sized, 40, 40, block=(8, 8))
    assert report.kept_pairs == int(sized.dense_mask(40, 40).sum()) and report.closed_form is None


@pytest.mark.parametrize("table", [intervals.INTERVAL_RULES, solve.SOLVE_RULES, cost.SYMPY_RULES])
def test_unexpanded_reductions_are_refused(table):
    var = Expr(Op.VAR, Type.INT, (), 0)
    for op in EXPANDED_OPS:
        body = Expr(Op.EQ, Type.BOOL, (var, const(1)))
        node = var if op is Op.VAR else Expr(op, Type.BOOL, (const(2), body), 0)
        with pytest.raises(NeedsExpansion, match="must be expanded"):
            table[op](None, node, 0, 1) if table is cost.SYMPY_RULES else table[op](None, node)


def test_closed_forms_through_the_bit_forms():
    report = cost.cost_report(compile_mask("~k >= ~q"), 50, 50, block=(8, 8))      # causal
    assert report.closed_form_at(50) == 50 * 51 // 2 and report.kept_pairs == 50 * 51 // 2
    report = cost.cost_report(compile_mask("q - k < (1 << 2) and k <= q"), 50, 50, block=(8, 8))
    assert report.closed_form_at(50) == report.kept_pairs == int(compile_mask(
        "q - k < 4 and k <= q").dense_mask(50, 50).sum())


def test_sizes_in_bit_masks_and_shift_counts_fold_per_call():
    pat = compile_mask("(k & (kv_len // 4 - 1)) < 2 and "
                       "(q >> ilog2(kv_len // 8)) >= (k >> ilog2(kv_len // 8))")
    for n in (32, 64):
        call = api.call_classes(pat.bound(), n, n, 1, (8, 8))
        assert all(c.sets.exact for c in call.classes)
        assert_sound(call.block_map(), brute(pat, n, n, (8, 8)))


def test_guarded_bad_constants_do_not_stop_the_analysis():
    """A shift by 70 or floor(inf) only fails where a pair evaluates it: under a false guard
    the analysis folds around them."""
    for mask in ["q < 0 and (k >> 70) == 0", "q < 0 and floor(float(k) * inf) == 0",
                 "q < -5 and k < (1 << 70)"]:
        pat = compile_mask(mask)
        assert (pat.block_map(8, 8, 1, (4, 4)) == 0).all()
        assert not pat.dense_mask(8, 8).any()


# ----------------------------------------------------------------------------- int32 proof


def _fits(mask: str, n: int) -> bool:
    pat = compile_mask(mask).bound().for_sizes(n, n, 1, 1)
    return narrow.fits_int32([pat.ir.mask], dict(pat.values), (n, n, 1, 1), [{}])


@pytest.mark.parametrize("mask,n,fits", [
    ("(k >> 3) == (q >> 3)", 5000, True),
    ("(k ^ q) < 100", 5000, True),
    ("(k << 20) > q", 1000, True),              # 999 * 2**20 < 2**31
    ("(k << 20) > q", 3000, False),             # 2999 * 2**20 > 2**31
    ("(k >> 40) == 0", 100, False),             # an int32 shift by 40 is no int64 shift
    ("(k >> (q % 32)) == 0", 100, True),
    ("(k >> (q % 33)) == 0", 100, False),
    ("floor(float(k) * 1e6) > q", 1000, True),
    ("floor(float(k) * 1e7) > q", 1000, False),
    ("ilog2(k * 100000) < 3", 20000, True),     # the argument is 2e9 < 2**31 - 1
    ("ilog2(k * 200000) < 3", 20000, False),
    ("~(k * 100000) < q", 20000, True),
    ("(k | (1 << 30)) > q", 100, True),
    ("(k | (1 << 31)) > q", 100, False),
])
def test_the_int32_proof_covers_the_new_int_operators(mask, n, fits):
    assert _fits(mask, n) is fits


@pytest.mark.parametrize("mask", ["(k * 7919) ^ (q << 9)", "ilog2(q * k) + (k & q)", "(q - k) >> (k % 20)",
                                  "round(float(q * k) / 3.0) | 5", "~(q << (k % 13))"])
def test_when_the_int32_proof_holds_every_int_fits(mask):
    proved = 0
    for n in (50, 300, 3000):
        pat = compile_mask(f"({mask}) >= 0")
        if not _fits(f"({mask}) >= 0", n):
            continue
        proved += 1
        grid = pat.grid(n, n, 1, 1, {})
        env = grid.env(np.arange(1), np.arange(n), np.arange(n))
        ev = Evaluator(env)
        for node in pat.ir.mask.walk():
            if node.type is Type.INT:
                v = np.asarray(ev.sub(node))
                assert -2 ** 31 <= v.min() and v.max() < 2 ** 31, (mask, n)
                if node.op in (Op.LSHIFT, Op.RSHIFT):
                    c = np.asarray(ev.sub(node.args[1]))
                    assert 0 <= c.min() and c.max() <= 31
    assert proved


def test_erf_bounds_hold_math_erf():
    pat = compile_mask("erf(float(q - k) / 3.0) >= 0.5")
    tiles = make_grid(30, 30, 1, 1, (5, 5), {}, {})
    num = Analyzer(tiles).value(pat.ir.mask.args[0])
    d = (np.arange(30)[:, None] - np.arange(30)[None]) / 3.0
    vals = np.vectorize(math.erf)(d)
    for i in range(6):
        for j in range(6):
            v = vals[i * 5:(i + 1) * 5, j * 5:(j + 1) * 5]
            assert num.lo[0, i, j] <= v.min() and v.max() <= num.hi[0, i, j]
            assert -1.0 <= num.lo[0, i, j] and num.hi[0, i, j] <= 1.0


def test_int32_hooks_run_the_new_operators_right(tmp_path, monkeypatch):
    """A call whose ints the proof bounds in int32 runs the 32-bit hooks, and they give the
    reference's output (under the Triton interpreter)."""
    import torch

    from attndsl.runtime import launches

    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    pat = compile_mask("(k >> (q % 4)) == (q >> 2) or ((q ^ k) & 3) == 0 or "
                       "(ilog2(q - k + 1) == 2 and (~k | 1) < 0) or round(float(k) / 2.5) == q")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    (launch,), _ = launches(pat.bound(), q, k, k, 0.25, None)
    assert launch.constants["MASK_FN"].fn.__name__ == "mask_hook32"
    out = pat(q, k, v, backend="triton-interpret").double().numpy()
    ref = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy())[0]
    assert np.abs(out - ref).max() < 1e-4
