"""The Triton lowering of the language's newer forms (codegen/lower.py, codegen/tlhelpers.py):
``erf``/``exp2``/``log2``, ``floor``/``ceil``/``round`` (their operand in float64), ``ilog2``,
the bit operators and shifts, and bool tensor inputs (int8 slots, codegen/args.py).

Two levels, all under Triton's interpreter (tests/conftest.py):

* hooks on one tile (:func:`run_tile`): a pattern's ``mask_hook`` and, where every int fits in
  int32, ``mask_hook32`` are called by a small kernel on a whole call of 16 queries x 32 keys;
  each mask has the form ``E == w[q, k]`` with ``w`` computed here with NumPy (int64 and float64,
  Python's semantics), so the hook and the reference (``dense_mask``) must both be all true;
* whole calls (``pat(q, k, v, backend="triton-interpret")``) against ``pat.reference``, with
  lengths that are no multiple of a tile and grouped heads.

A pattern's kernels compiled ahead of time for sm_90 with Triton 3.9 and 3.6 are in the slow
lane at the end.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from attndsl.codegen import lower
from attndsl.codegen.args import slot_dtype, tensor_args
from conftest import ROOT, assert_same_values, pattern

from attndsl.ir import Expr, Op, Type
from attndsl.ops import EXPANDED_OPS

BM, BN = 16, 32             # the tile: the whole call (q_len, kv_len)
Q = np.arange(BN - BM, BN)[:, None]         # the query positions (bottom-right aligned)
K = np.arange(BN)[None, :]
HARNESS = '''

@triton.jit
def run_tile(HOOK: tl.constexpr, OUT, S, h, q_len, kv_len, heads, kv_heads,
             t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2, t0_sb,
             t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2, t1_sb,
             t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2, t2_sb,
             t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2, t3_sb,
             BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    q = (rows + (kv_len - q_len)).to(tl.int64)[:, None]
    k = cols.to(tl.int64)[None, :]
    offs = rows[:, None] * BN + cols[None, :]
    s = tl.load(S + offs)
    r = HOOK(s, q, k, h.to(tl.int64), q_len, kv_len, heads, kv_heads,
             t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
             t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
             t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
             t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2)
    tl.store(OUT + offs, tl.where((q == q) & (k == k), r, r))
'''


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def _module(text: str, folder: Path):
    path = folder / f"hooks_{abs(hash(text)):x}.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n" + text + HARNESS)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tile(pat, tmp_path, hook="mask_hook", s=None, **tensors) -> np.ndarray:
    """The hook ``hook`` of ``pat`` (a Pattern) on the whole call of BM queries x BN keys,
    one head, the tensor inputs passed through the slots as a call passes them
    (codegen/args.py); [BM, BN] bool for a mask hook, float32 for a score hook."""
    bound = pat.bound()
    slots = {n: i for i, n in enumerate(bound.tensor_params)}
    score = bound.ir.score if hook.startswith("score") else None
    module = _module(lower.module_hooks(bound.ir.mask, score, dict(bound.values), slots), tmp_path)
    args = tensor_args(bound, tensors, {}, "cpu")
    is_mask = hook.startswith("mask")
    out = torch.zeros(BM, BN, dtype=torch.int8 if is_mask else torch.float32)
    s = torch.zeros(BM, BN) if s is None else torch.as_tensor(s, dtype=torch.float32)
    module.run_tile[(1,)](getattr(module, hook), out, s, 0, BM, BN, 1, 1, *args, BM=BM, BN=BN)
    return out.numpy().astype(bool) if is_mask else out.numpy()


# the language's functions on NumPy int64 / float64 arrays (an independent definition)
def ilog2(n):
    n = np.asarray(n, dtype=np.int64)
    return np.array([int(x).bit_length() - 1 if x > 0 else -1 for x in n.ravel()],
                    dtype=np.int64).reshape(n.shape)


NUMPY = {"float": lambda x: np.asarray(x, dtype=np.float64),
         "floor": lambda x: np.floor(x).astype(np.int64),
         "ceil": lambda x: np.ceil(x).astype(np.int64),
         "round": lambda x: np.round(x).astype(np.int64),          # half to even
         "ilog2": ilog2, "erf": np.vectorize(math.erf), "exp2": np.exp2, "log2": np.log2,
         "tanh": np.tanh, "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "sqrt": np.sqrt,
         "log": np.log, "exp": np.exp, "abs": np.abs, "max": np.maximum}


def numpy_value(expr: str, **names) -> np.ndarray:
    """``expr`` (int valued, Python syntax) at every (q, k) of the tile, in NumPy int64."""
    with np.errstate(all="ignore"):
        value = eval(expr, {**NUMPY, **names}, {"q": Q.astype(np.int64), "k": K.astype(np.int64)})
    return np.array(np.broadcast_to(np.asarray(value, dtype=np.int64), (BM, BN)))


def fits_int32(*arrays) -> bool:
    return all(np.abs(np.asarray(a, dtype=np.int64)).max() < 2 ** 31 for a in arrays)


def check_equal_mask(src: str, tmp_path, want_true=None, **tensors):
    """The hooks of ``src`` (a mask expected to be all true, or ``want_true``) and the
    reference give that mask; ``mask_hook32`` too."""
    pat = pattern(src)
    want = np.ones((BM, BN), bool) if want_true is None else want_true
    np.testing.assert_array_equal(pat.dense_mask(BM, BN, **tensors)[0], want)
    for hook in ("mask_hook", "mask_hook32"):
        np.testing.assert_array_equal(run_tile(pat, tmp_path, hook, **tensors), want,
                                      err_msg=hook)


# ----------------------------------------------------------------------------- int ops

# int-valued expressions of the positions (q in [16, 32), k in [0, 32)): every value, and every
# value computed on the way, fits in int32, so mask_hook32 computes them in int32
POSITION_EXPRS = [
    "(q ^ k) & 5",
    "(q - k) | 6",
    "~(q - k)",
    "(q - k) >> 2",                 # arithmetic on negative values
    "(q - k) << 3",
    "1 << (k % 31)",
    "(q - k) >> (k % 40)",          # counts beyond 31 in the int32 hook: -1 or 0
    "(k - q) << (k % 3) ^ q & ~k | k >> 1",
    "ilog2(q - k)",                 # -1 for q - k <= 0
    "ilog2(q * k * 1000003)",
]


@pytest.mark.parametrize("expr", POSITION_EXPRS)
def test_int_operators_of_positions(expr, tmp_path):
    w = numpy_value(expr)
    assert fits_int32(w)
    check_equal_mask(f"pattern t(w: int[][]):\n    mask = {expr} == w[q - 16, k]\n", tmp_path, w=w)


BIG = np.array([0, 1, -1, 2, 3, 7, 8, -8, -9, 2 ** 31 - 1, 2 ** 31, -2 ** 31 - 1, 2 ** 40 + 3,
                2 ** 53 + 1, 2 ** 62, 2 ** 62 - 1, 2 ** 63 - 1, -2 ** 63, -2 ** 63 + 1,
                -(2 ** 62) - 5, 123456789012345, -987654321098765, 5, 6, 1000, -1000,
                2 ** 32, 2 ** 32 - 1, 2 ** 33, 2 ** 61 + 7, 17, 2 ** 16], dtype=np.int64)
COUNTS = np.array([0, 1, 62, 3, 61, 33, 31, 32, 2, 62, 1, 0, 20, 9, 1, 1, 62, 0, 5,
                   3, 10, 40, 62, 62, 63 - 2, 4, 31, 32, 30, 2, 60, 47], dtype=np.int64)


@pytest.mark.parametrize("expr", [
    "a[k] & b[k]", "a[k] | b[k]", "a[k] ^ b[k]", "~a[k]",
    "a[k] << c[k]",                 # wraps around in int64
    "a[k] >> c[k]",
    "ilog2(a[k])", "ilog2(b[k])",
])
def test_int_operators_in_int64(expr, tmp_path):
    """Values across int64 (mask_hook32 is not run: they do not fit in int32)."""
    a, b, c = BIG, BIG[::-1].copy(), COUNTS
    w = numpy_value(expr.replace("[k]", ""), a=a[None, :], b=b[None, :], c=c[None, :])
    pat = pattern(f"pattern t(a: int[], b: int[], c: int[], w: int[][]):\n"
                  f"    mask = {expr} == w[q - 16, k]\n")
    given = dict(a=a, b=b, c=c, w=np.ascontiguousarray(w))
    assert pat.dense_mask(BM, BN, **given)[0].all()
    assert run_tile(pat, tmp_path, **given).all()


def test_shift_counts_out_of_range_at_discarded_pairs_are_harmless(tmp_path):
    """A count outside 0..62 is a call error only at an evaluated pair; the kernel evaluates
    every pair and clamps the others' counts."""
    c = np.array([-1, 3, -64, 0, 63, 62, 64, 1, 100, 2, 2 ** 40, 5, -2 ** 63, 7, 2 ** 63 - 1,
                  61] * 2, dtype=np.int64)
    good = (c >= 0) & (c <= 62)
    pat = pattern("pattern t(c: int[]):\n"
                  "    mask = (c[k] >= 0 and c[k] <= 62 and (k << c[k]) - (q >> c[k]) > 0) or "
                  "k > 20\n")
    count = np.where(good, c, 0)[None, :]
    want = (good[None, :] & ((K << count) - (Q >> count) > 0)) | (K > 20)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(pat.dense_mask(BM, BN, c=c)[0], want)
    np.testing.assert_array_equal(run_tile(pat, tmp_path, c=c), want)


# ----------------------------------------------------------------------------- floor, ceil, round

FLOAT_TO_INT_EXPRS = [
    "floor(float(q + 64) * 0.7)",       # q + 64 = 90: 62.99999999999999, 63.0 in float32
    "ceil(float(q + k) * 0.6)",         # 25, 45, 50
    "round(float(q + k) * 1.1)",        # 55
    "round(float(q + k) * 0.3)",
    "round(float(q - k) * 0.5)",        # ties to even, both signs
    "round(float(q) / 2.5) - ceil(float(k) / 3.0)",
    "floor(erf(float(k - 16) * 0.1) * 100.0) + ceil(exp2(float(q) * 0.3) + log2(float(k) + 1.5))",
    "floor(float(floor(float(q) * 0.7)) * 0.7 + float(q & 3))",   # nested, and an int part
    # the other float operations in float64 (no value within 1e-3 of an integer)
    "floor((float(q) ** 0.5 + tanh(float(k) * 0.1) + sigmoid(float(k - q)) + sqrt(float(k)) + "
    "log(float(q)) - exp(-float(k)) + abs(float(k) - 3.0) + max(float(q), 20.5)) * 10.0)",
]


def test_the_chosen_operands_round_differently_in_float32():
    """The point of the float64 operand: float32 would give other integers for these."""
    x64 = (Q + 64) * 0.7
    x32 = (Q + 64).astype(np.float32) * np.float32(0.7)
    assert (np.floor(x64) != np.floor(x32)).any()
    s64, s32 = (Q + K) * 0.6, (Q + K).astype(np.float32) * np.float32(0.6)
    assert (np.ceil(s64) != np.ceil(s32)).any()
    r64, r32 = (Q + K) * 1.1, (Q + K).astype(np.float32) * np.float32(1.1)
    assert (np.round(r64) != np.round(r32)).any()


@pytest.mark.parametrize("expr", FLOAT_TO_INT_EXPRS)
def test_floor_ceil_round_match_float64(expr, tmp_path):
    w = numpy_value(expr)
    check_equal_mask(f"pattern t(w: int[][]):\n    mask = {expr} == w[q - 16, k]\n", tmp_path, w=w)


def test_a_float_tensor_operand_is_widened_from_float32(tmp_path):
    x = (np.arange(BN, dtype=np.float32) * np.float32(0.1) - np.float32(1.3))
    w = numpy_value("floor(x * 10.0) + round(x * 5.0)", x=x.astype(np.float64)[None, :])
    check_equal_mask("pattern t(x: float[], w: int[][]):\n"
                     "    mask = floor(x[k] * 10.0) + round(x[k] * 5.0) == w[q - 16, k]\n",
                     tmp_path, x=x, w=w)


def test_reads_indexed_by_a_float64_decision(tmp_path):
    """Inside the operand, ``float(k + 64) * 0.7 >= 63.0`` is decided in float64 (false at
    k = 26, where float32 says true), and so is which element the tensors are read at."""
    x = np.arange(BN, dtype=np.float32) * np.float32(0.37)
    n = np.arange(BN, dtype=np.int64) * 7 - 50
    at = np.where((K + 64) * 0.7 >= 63.0, (K + 1) % BN, K)
    assert (at != np.where(((K + 64).astype(np.float32) * np.float32(0.7)) >= 63.0,
                           (K + 1) % BN, K)).any()
    w = np.floor(x.astype(np.float64)[at] * 10.0) + np.round(n[at] * 0.5)
    w = np.ascontiguousarray(np.broadcast_to(w, (BM, BN)).astype(np.int64))
    check_equal_mask("pattern t(x: float[], n: int[], w: int[][]):\n"
                     "    let i = (k + 1) % 32 if float(k + 64) * 0.7 >= 63.0 else k\n"
                     "    mask = floor(x[i] * 10.0) + round(float(n[i]) * 0.5) == w[q - 16, k]\n",
                     tmp_path, x=x, n=n, w=w)


def test_a_constant_the_interpreter_refuses_in_a_discarded_branch(tmp_path):
    """``floor`` of NaN, a shift by 70: call errors where evaluated, but 'and' rules these out
    at every pair; folding them gives any value, so the hooks compute no shift or floor."""
    for src in ("pattern t(p = 0.0):\n    mask = k < 0 and floor(p / 0.0) == 1 or k >= 0\n",
                "pattern t(p = 70):\n    mask = k < 0 and (1 << p) == 1 or k >= 0\n"):
        pat = pattern(src)
        text = lower.hook_source("mask_hook", pat.ir.mask, dict(pat.values), {})
        assert "shl(" not in text and "to_int64(" not in text
        check_equal_mask(src, tmp_path)


def test_nan_and_inf_operands_at_discarded_pairs_are_harmless(tmp_path):
    """1 / 0 = inf at k = 3, log of a negative is NaN at k < 4: those pairs are decided by
    the left operand of 'or', so no call error; the kernel converts them all the same."""
    with np.errstate(all="ignore"):
        w = np.where(K > 4, np.floor(1.0 / (K - 3.0)) + np.round(np.log(K - 4.0)), 0)
    w = np.ascontiguousarray(np.broadcast_to(w, (BM, BN)).astype(np.int64))
    check_equal_mask("pattern t(w: int[][]):\n    mask = k <= 4 or "
                     "floor(1.0 / float(k - 3)) + round(log(float(k - 4))) == w[q - 16, k]\n",
                     tmp_path, w=w)


def test_the_operand_is_float64_and_shares_the_int_part(tmp_path):
    pat = pattern("pattern t:\n    mask = floor(float(q - k) * 0.7) >= q - k and "
                  "float(q - k) * 0.7 < 9.0\n")
    for narrow in (False, True):
        text = lower.hook_source("mask_hook", pat.ir.mask, {}, {}, narrow)
        rhs = [line.split(" = ", 1)[1] for line in text.splitlines() if line.startswith("    v")]
        assert rhs.count("(q - k)") == 1                        # the int part, once
        casts = [r for r in rhs if r.startswith("tl.cast(v")]
        assert sum(r.endswith("tl.float64)") for r in casts) == 1     # float(q - k) in float64
        assert sum(r.endswith("tl.float32)") for r in casts) == 1     # ... and in float32
        assert "tl.full((1, 1), 0.7, tl.float64)" in text and "(0.7)" in text
        assert sum("to_int64(tl.floor(" in r for r in rhs) == 1


# ----------------------------------------------------------------------------- float functions


@pytest.mark.parametrize("fn", ["erf", "exp2", "log2"])
def test_float_functions_of_the_scores(fn, tmp_path):
    s = np.linspace(-9.0, 9.0, BM * BN).reshape(BM, BN).astype(np.float32)
    s[0, :6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30]
    pat = pattern(f"pattern t:\n    mask = true\n    score = {fn}(score) + 1.0\n")
    got = run_tile(pat, tmp_path, "score_hook", s=s)
    with np.errstate(all="ignore"):
        want = NUMPY[fn](s.astype(np.float64)) + 1.0
    assert_same_values(want, got, tol=1e-6)


# ----------------------------------------------------------------------------- bool inputs


def test_bool_tensor_inputs_travel_as_int8(tmp_path):
    rng = np.random.default_rng(3)
    g, f, n = rng.random(BN) < 0.3, rng.random((BN, BN)) < 0.5, rng.integers(-1, 2, BN)
    src = ("pattern t(g: bool[], f: bool[][], n: int[]):\n"
           "    mask = g[k] or (f[q, k] and not g[q]) or g[k] == f[k, q] and n[k] > 0\n")
    pat = pattern(src)
    params = {p.name: p for p in pat.ir.params}
    assert slot_dtype(params["g"], None) == torch.int8 == slot_dtype(params["f"], None)
    assert slot_dtype(params["n"], None) == torch.int64
    want = g[K] | (f[Q, K] & ~g[Q]) | ((g[K] == f[K, Q]) & (n[K] > 0))
    for given in (dict(g=g, f=f, n=n), dict(g=torch.from_numpy(g), f=torch.from_numpy(f), n=n)):
        check_equal_mask(src, tmp_path, want_true=want, **given)
        args = tensor_args(pat.bound(), given, {}, "cpu")
        assert args[0].dtype == torch.int8 and set(args[0].unique().tolist()) == {0, 1}


# ----------------------------------------------------------------------------- refusals


def test_reductions_and_loop_variables_must_be_expanded_first():
    assert EXPANDED_OPS and all(lower.TRITON_RULES[op] is lower.needs_expansion
                                for op in EXPANDED_OPS)
    var = Expr(Op.VAR, Type.INT, (), 0)
    with pytest.raises(lower.LoweringError, match="expanded"):
        lower.hook_source("mask_hook", Expr(Op.EQ, Type.BOOL, (Expr(Op.K, Type.INT), var)), {}, {})
    pat = pattern("pattern t:\n    mask = any(k == q - i for i in range(3))\n")
    with pytest.raises(lower.LoweringError, match="expanded"):
        lower.module_hooks(pat.ir.mask, None, {}, {})


# ----------------------------------------------------------------------------- whole calls

CALLS = [
    ("pattern p(g: bool[], w = 3):\n"
     "    mask = ((q ^ k) & w) == 0 or g[k] or any(k == (q >> i) for i in range(4)) or "
     "ilog2(q - k) == 2\n"
     "    score = score - float((q - k) >> 1 | 1) * 0.01\n"),
    ("pattern p:\n"
     "    mask = k <= q and (floor(float(q + 64) * 0.7) - floor(float(k + 64) * 0.7)) % 3 != 1 "
     "and round(float(q - k) * 0.5) <= 9\n"
     "    score = score + erf(score) * 0.5 + exp2(-float(q - k) * 0.125) - log2(float(k + 1)) * 0.1\n"),
]


@pytest.mark.parametrize("src", CALLS)
@pytest.mark.parametrize("narrow", ["1", "0"])
def test_calls_match_the_reference(src, narrow, monkeypatch):
    monkeypatch.setenv("ATTNDSL_NARROW", narrow)
    pat = pattern(src)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, n, 16, generator=gen) for h, n in ((4, 19), (2, 37), (2, 37)))
    given = {"g": np.arange(37) % 5 == 0} if pat.tensor_params else {}
    out, lse = pat(q, k, v, return_lse=True, backend="triton-interpret", **given)
    ref_out, ref_lse = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                     **given)
    assert_same_values(ref_out, out)
    assert_same_values(ref_lse, lse)


def test_a_float64_input_near_integers_converts_as_the_reference():
    """A float tensor input read by a floor argument is held in float64 by the kernels (and read
    in float32 elsewhere): 0.99999999999 is 1.0 in float32, whose floor is 1, not 0."""
    pat = pattern("pattern p(b: float[]):\n    mask = floor(b[k]) == 0 or q == k\n"
                  "    score = score + b[k]\n")
    b = np.full(23, 0.99999999999)
    b[::3], b[1::5] = 1.00000000001, -0.5
    assert (np.floor(b.astype(np.float32)) != np.floor(b)).any()
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (19, 23, 23))
    out = pat(q, k, v, backend="triton-interpret", b=torch.tensor(b))
    ref = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(), b=b)[0]
    assert_same_values(ref, out)


# ----------------------------------------------------------------------------- ahead of time

TRITON36 = Path(os.environ.get("ATTNDSL_TRITON36_PYTHON", ROOT / ".venv-triton36" / "bin" / "python"))


@pytest.mark.slow
@pytest.mark.parametrize("python", ["current", "triton36"])
def test_the_new_operators_compile_for_sm90(python, tmp_path, monkeypatch):
    """Every new operator, its float64 operands and bool inputs, in the kernels (int32 and int64
    hooks) compiled for sm_90 (bf16) by this environment's Triton and by Triton 3.6, without a
    GPU."""
    from attndsl.codegen import aot

    if python == "triton36" and not TRITON36.exists():
        pytest.skip(f"no Triton 3.6 environment at {TRITON36} (`make triton36` creates it)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    pat = pattern("pattern p(g: bool[], x: float[]):\n"
                  "    mask = (((q ^ k) & 7) | ~k) != 3 and (g[k] or ilog2(q - k) <= 5) and "
                  "(q << (k & 7)) >> 2 >= k and floor(x[k] * 0.7) + ceil(float(q) / 3.0) + "
                  "round(erf(float(k) * 0.1) + exp2(x[k]) + log2(float(q + 1)) + float(q) ** 0.5 + "
                  "tanh(x[k]) + sigmoid(x[k]) + sqrt(float(k)) + log(float(q + 1)) - exp(x[k]) + "
                  "abs(x[k]) + max(x[k], 0.5) + min(x[k], -0.5)) > -5\n"
                  "    score = score + erf(score) + exp2(score) - log2(abs(score) + 1.0)\n")
    monkeypatch.setenv("ATTNDSL_NARROW", "0")
    jobs = aot.pattern_jobs(pat, aot.Call(dtype="bf16", head_dim=64), ["sm_90"])
    assert {j["hooks"]["MASK_FN"] for j in jobs} == {"mask_hook"}
    # the same kernels with the int32 hooks (whether a call may run them is not the point here)
    jobs += [dict(j, hooks={arg: f"{hook}32" for arg, hook in j["hooks"].items()}) for j in jobs]
    reports = aot.compile_jobs(jobs, python=None if python == "current" else str(TRITON36),
                               processes=2)
    flat = [r for rs in reports for r in rs]
    assert flat and all(r["ok"] for r in flat), "\n".join(aot.report_lines(flat))
