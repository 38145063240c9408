"""The meaning of the issue-15 operators (attndsl/interp.py), checked against independent
per-element definitions written from Python's own ``math`` and int semantics, and the torch
lowering (codegen/torch_lower.py) and backend checked against that meaning.

Covered: ``erf``, ``exp2``, ``log2``; ``floor``, ``ceil``, ``round`` (half to even, computed in
float64 by the torch lowering even when its float type is float32); ``ilog2`` (exact at the
int64 edges); the bit operators (``<<`` wrapping like int64, ``>>`` arithmetic); the call-time
errors at their spans (shift count outside 0..62, float -> int of NaN/inf/beyond int64, a
reduction bound outside 0..256, max/min of an empty range) and the analysis' collecting mode;
the bounded reductions (empty ranges, nesting with ``range(i)``, the short-circuit narrowing of
``any``/``all`` for tensor indices); ``bool[]`` inputs; the derivative rules; and the torch
backend's output against the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from attndsl.codegen.cache import load_torch_module
from attndsl.codegen.lower import LoweringError
from attndsl.codegen.torch_lower import TORCH_RULES, module_source
from conftest import pattern, qkv

from attndsl import AttnCallError
from attndsl.bound import as_bound
from attndsl.derivative import DERIVATIVE_RULES, score_derivative
from attndsl.expand import expand_reductions
from attndsl.interp import Env, Evaluator, evaluate
from attndsl.ir import Op, Type
from attndsl.reference_grad import reference_grads

pytestmark = pytest.mark.usefixtures("one_thread")

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


def _wrap(n: int) -> int:
    """``n`` as an int64 (two's complement wrap-around)."""
    return (n + 2 ** 63) % 2 ** 64 - 2 ** 63


def _ilog2(n: int) -> int:
    return n.bit_length() - 1 if n >= 1 else -1


def _expr(text: str, params: str = ""):
    """The checked IR of expression ``text`` (read from ``mask = (text) == (text)``)."""
    head = f"pattern t({params}):" if params else "pattern t:"
    return pattern(f"{head}\n    mask = ({text}) == ({text})\n").ir.mask.args[0]


def _env(q_len: int, kv_len: int, score=None, out_of_range=None, **tensors) -> Env:
    return Env(h=np.zeros((1, 1, 1), np.int64),
               q=(np.arange(q_len) + kv_len - q_len)[None, :, None],
               k=np.arange(kv_len)[None, None, :], q_len=q_len, kv_len=kv_len, heads=1,
               kv_heads=1, params={}, tensors=tensors, score=score, out_of_range=out_of_range)


def ref_value(expr, q_len: int, kv_len: int, params=None, **tensors) -> np.ndarray:
    """The interpreter's value of ``expr`` on the (h=0) grid, [q_len, kv_len]."""
    env = _env(q_len, kv_len, **tensors)
    env.params = dict(params or {})
    return np.broadcast_to(evaluate(expr, env), (1, q_len, kv_len))[0]


def ref_mask(pat, q_len: int, kv_len: int, **tensors) -> np.ndarray:
    """The interpreter's value of a pattern's mask, reductions not expanded."""
    return ref_value(pat.ir.mask, q_len, kv_len, as_bound(pat).values, **tensors)


def torch_value(expr, q_len: int, kv_len: int, fdt=torch.float64, **tensors) -> np.ndarray:
    """The torch lowering's value of ``expr`` (as the ``mask`` function of a generated module,
    float type ``fdt``), [q_len, kv_len]."""
    slots = {name: i for i, name in enumerate(tensors)}
    module = load_torch_module(module_source(expr, None, {}, slots))
    sizes = [torch.tensor(n, dtype=torch.int64) for n in (q_len, kv_len, 1, 1)]
    q = (torch.arange(q_len) + kv_len - q_len).view(1, -1, 1)
    k = torch.arange(kv_len).view(1, 1, -1)
    args = [torch.as_tensor(t) for t in tensors.values()]
    got = module.mask(q, k, torch.zeros((1, 1, 1), dtype=torch.int64), *sizes, fdt, *args)
    return np.broadcast_to(torch.as_tensor(got).numpy(), (1, q_len, kv_len))[0]


def python_value(fn, q_len: int, kv_len: int) -> np.ndarray:
    off = kv_len - q_len
    return np.array([[fn(i + off, j) for j in range(kv_len)] for i in range(q_len)])


# ----------------------------------------------------------------------------- int-valued ops

INT_CASES = [
    ("ilog2(q - k)", lambda q, k: _ilog2(q - k)),
    ("ilog2(q * k + 1)", lambda q, k: _ilog2(q * k + 1)),
    ("q & k", lambda q, k: q & k),
    ("q | (k - 5)", lambda q, k: q | (k - 5)),
    ("(q - 7) ^ k", lambda q, k: (q - 7) ^ k),
    ("~(q - k)", lambda q, k: ~(q - k)),
    ("(q - 4) << (k % 8)", lambda q, k: (q - 4) << (k % 8)),
    ("(q - 9) >> (k % 5)", lambda q, k: (q - 9) >> (k % 5)),
    ("(q + 1) << 61", lambda q, k: _wrap((q + 1) << 61)),             # wraps like int64
    ("floor(float(q - k) / 3.0)", lambda q, k: math.floor((q - k) / 3.0)),
    ("ceil(float(q - k) / 3.0)", lambda q, k: math.ceil((q - k) / 3.0)),
    ("round(float(q - k) / 2.0)", lambda q, k: round((q - k) / 2.0)),   # halves to even
    ("round(float(q - k) * 1.5)", lambda q, k: round((q - k) * 1.5)),
]


@pytest.mark.parametrize("text, py", INT_CASES, ids=[c[0] for c in INT_CASES])
def test_int_ops_mean_python_ints(text, py):
    expr = _expr(text)
    want = python_value(py, 9, 13)
    got = ref_value(expr, 9, 13)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    assert np.array_equal(torch_value(expr, 9, 13), want)


def test_int_ops_at_the_int64_edges():
    values = [0, 1, 2, 3, 7, 8, 2 ** 31, 2 ** 53 - 1, 2 ** 53, 2 ** 53 + 1, 2 ** 62 - 1, 2 ** 62,
              INT64_MAX, -1, -2, -(2 ** 62), INT64_MIN]
    t = np.array(values, dtype=np.int64)
    n = len(values)
    cases = [("ilog2(t[k])", lambda x, q: _ilog2(x)), ("~t[k]", lambda x, q: ~x),
             ("t[k] << (q % 4)", lambda x, q: _wrap(x << (q % 4))),
             ("t[k] >> (q % 4 + 59)", lambda x, q: x >> (q % 4 + 59)),
             ("t[k] & (q - 2)", lambda x, q: x & (q - 2)), ("t[k] ^ ~q", lambda x, q: x ^ ~q)]
    for text, py in cases:
        expr = _expr(text, "t: int[]")
        want = np.array([[py(x, q) for x in values] for q in range(n - 4, n)], dtype=object)
        assert ref_value(expr, 4, n, t=t).tolist() == want.tolist(), text
        assert torch_value(expr, 4, n, t=torch.from_numpy(t)).tolist() == want.tolist(), text


def test_float_to_int_at_halves_and_the_int64_edges():
    xs = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.0 ** 52 - 0.5, -(2.0 ** 52) + 0.5, 0.49999999999999994,
          -0.0, 1e18, -(2.0 ** 63), 2.0 ** 63 - 1024.0, 1e-300, -1e-300]
    x = np.array(xs)
    for name, py in (("floor", math.floor), ("ceil", math.ceil), ("round", round)):
        expr = _expr(f"{name}(x[k])", "x: float[]")
        want = [py(v) for v in xs]
        assert ref_value(expr, 1, len(xs), x=x)[0].tolist() == want, name
        assert torch_value(expr, 1, len(xs), x=torch.from_numpy(x))[0].tolist() == want, name


_F32 = np.float32
F32_CASES = [       # (expression, its value computed in float32 from int positions q, k)
    ("floor(float(q) * 0.7)", lambda q, k, x: np.floor(_F32(q) * _F32(0.7))),
    ("round(float(q) * 0.3)", lambda q, k, x: np.rint(_F32(q) * _F32(0.3))),
    ("ceil(float(k) * 0.3 - 0.1)", lambda q, k, x: np.ceil(_F32(k) * _F32(0.3) - _F32(0.1))),
    ("floor(x[k] * 0.7) - 2 * floor(float(floor(float(q) * 0.7)) * 0.7)",
     lambda q, k, x: np.floor(x[k] * _F32(0.7))
     - 2 * np.floor(np.floor(_F32(q) * _F32(0.7)) * _F32(0.7))),
]


@pytest.mark.parametrize("text, naive", F32_CASES, ids=[c[0] for c in F32_CASES])
def test_float_to_int_arguments_are_float64_in_the_torch_lowering(text, naive):
    """``floor(float(q) * 0.7)`` rounds differently in float32 at q = 90, 170, ...: the torch
    lowering computes the argument in float64 whatever its float type, so a float32 module
    gives the reference's integers there (float tensor reads inside are float64 too)."""
    n = 400
    expr = _expr(text, "x: float[]")
    x = np.arange(n, dtype=np.float64)
    want = ref_value(expr, n, n, x=x)
    pos = np.arange(n)
    in_float32 = naive(pos[:, None], pos[None, :], x.astype(np.float32))
    assert (in_float32 != want).any(), "the test needs pairs where float32 rounds differently"
    for fdt in (torch.float32, torch.float64):
        assert np.array_equal(torch_value(expr, n, n, fdt=fdt, x=torch.from_numpy(x)), want), fdt


def test_torch_backend_float32_score_clause_keeps_the_float64_integers():
    src = """pattern w(x: float[]):
    mask = k <= q
    score = score if floor(float(k) * 0.7) != 63 and floor(x[k]) != 150 else -inf
"""
    pat = pattern(src)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 200, 8, generator=gen) for _ in range(3))
    x = torch.arange(200, dtype=torch.float64) - 1e-9
    # float32 would drop k = 90 (63.0) too, and k = 150 (x[150] is 150.0 in float32) instead
    # of k = 151
    assert np.floor(np.float32(90) * np.float32(0.7)) == 63 != math.floor(90 * 0.7)
    assert np.floor(np.float32(x[150])) == 150 != math.floor(x[150])
    out, lse = pat(q, k, v, backend="torch", return_lse=True, x=x)
    want_out, want_lse = pat.reference(q.numpy(), k.numpy(), v.numpy(), x=x.numpy())
    np.testing.assert_allclose(out.numpy(), want_out, atol=2e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=2e-5)


# ----------------------------------------------------------------------------- float functions


@pytest.mark.parametrize("text, py", [
    ("erf(float(q - k) * 0.37)", lambda q, k: math.erf((q - k) * 0.37)),
    ("exp2(float(q - k) * 0.37)", lambda q, k: 2.0 ** ((q - k) * 0.37)),
    ("log2(float(q * k) + 0.5)", lambda q, k: math.log2(q * k + 0.5)),
    ("erf(float(q) * 1.5) - erf(-float(k))", lambda q, k: math.erf(q * 1.5) - math.erf(-k)),
])
def test_float_functions_mean_pythons(text, py):
    expr = _expr(text)
    want = python_value(py, 7, 11)
    np.testing.assert_allclose(ref_value(expr, 7, 11), want, rtol=4e-16, atol=0)
    np.testing.assert_allclose(torch_value(expr, 7, 11), want, rtol=1e-15, atol=1e-300)


def test_float_functions_at_special_values():
    xs = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-310, 6.0, -6.0, 1024.0, -1080.0]
    x = np.array(xs)
    for name, py in (("erf", math.erf), ("exp2", lambda v: math.inf if v >= 1024 else 2.0 ** v)):
        expr = _expr(f"{name}(x[k])", "x: float[]")
        got = ref_value(expr, 1, len(xs), x=x)[0]
        want = np.array([py(v) for v in xs])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(torch_value(expr, 1, len(xs), x=torch.from_numpy(x))[0],
                                      want)
    got = ref_value(_expr("log2(x[k])", "x: float[]"), 1, 4, x=np.array([0.0, -1.0, math.inf, 8.0]))
    np.testing.assert_array_equal(got[0], [-math.inf, math.nan, math.inf, 3.0])  # IEEE, as log


# ----------------------------------------------------------------------------- call-time errors


def _raises(fn) -> AttnCallError:
    with pytest.raises(AttnCallError) as info:
        fn()
    return info.value


def _at(src: str, line: int, text: str) -> tuple[int, int]:
    """(line, column) of the first ``text`` on line ``line`` (1-based) of ``src``."""
    return line, src.splitlines()[line - 1].index(text) + 1


SHIFT = "pattern s(n = 3):\n    mask = causal and (q >> (k - n)) <= 1\n"


def test_a_shift_count_out_of_range_is_an_error_at_the_count():
    pat = pattern(SHIFT, filename="shift.attn")
    err = _raises(lambda: pat.dense_mask(4, 4))
    assert (err.line, err.column) == _at(SHIFT, 2, "k - n")          # the count
    msg = err.message
    assert "shift count -3 is out of range: the count 'k - n' of '>>' is -3 at h=0, q=0, k=0" \
        in msg and "0..62" in msg and "'and', 'or' or 'if'" in msg
    assert "masked pairs included" not in msg
    torch_err = _raises(lambda: pat(*(torch.zeros(1, 1, 4, 4) for _ in range(3)), backend="torch"))
    assert (torch_err.line, torch_err.column) == _at(SHIFT, 2, "k - n")
    err = _raises(lambda: pattern(SHIFT.replace("k - n", "k + 60")).dense_mask(4, 4))
    assert "is 63 at h=0, q=3, k=3" in err.message      # 62 is the largest count
    guarded = pattern(SHIFT.replace("causal and", "k >= n and"))
    want = python_value(lambda q, k: k >= 3 and (q >> (k - 3)) <= 1, 6, 6)
    assert np.array_equal(guarded.dense_mask(6, 6)[0], want)
    assert pattern(SHIFT.replace("k - n", "k + 59")).dense_mask(4, 4).shape == (1, 4, 4)


def test_a_shift_count_in_the_score_clause_is_checked_at_every_pair():
    src = "pattern s:\n    mask = k <= 2\n    score = score + float(1 << (2 - k))\n"
    pat = pattern(src)
    q, k, v = (np.ones((1, 1, 4, 2)) for _ in range(3))
    err = _raises(lambda: pat.reference(q, k, v))
    assert (err.line, err.column) == _at(src, 3, "2 - k")
    assert "is -1 at h=0, q=0, k=3" in err.message and "masked pairs included" in err.message


ROUND = "pattern f(x: float[]):\n    mask = k == 0 or round(x[k]) == 0\n"


@pytest.mark.parametrize("value, shown", [(math.nan, "nan"), (math.inf, "inf"),
                                          (-math.inf, "-inf"), (2.0 ** 63, "9.223372036854776e+18"),
                                          (-1e19, "-1e+19")])
def test_float_to_int_of_a_bad_value_is_an_error_at_the_function(value, shown):
    pat = pattern(ROUND)
    x = np.zeros(4)
    x[2] = value
    err = _raises(lambda: pat.dense_mask(3, 4, x=x))
    assert (err.line, err.column) == _at(ROUND, 2, "round")
    assert f"round of {shown} is not an int64: the argument 'x[k]' is {shown} at h=0, q=1, k=2" \
        in err.message
    x[0], x[2] = value, 0.0                        # where 'or' rules it out: fine
    assert pat.dense_mask(3, 4, x=x)[0].all()
    x[2] = -(2.0 ** 63)                            # the int64 minimum is an int64
    assert pat.dense_mask(3, 4, x=x)[0, :, 0].all()


def test_the_collecting_mode_clips_and_records_the_bad_pairs():
    """Env.out_of_range a list (the analysis): no error; the live bad pairs are recorded."""
    expr = pattern("pattern t(x: float[]):\n    mask = k > 1 and ((q >> (k - 3)) == 0 or "
                   "floor(x[k]) == 1)\n").ir.mask
    x = np.array([0.0, 0.0, 1.0, math.nan, 1.0])
    env = _env(5, 5, out_of_range=[], x=x)
    with np.errstate(all="ignore"):
        got = np.broadcast_to(Evaluator(env).sub(expr), (1, 5, 5))[0]
    bad = np.zeros((5, 5), bool)
    for b in env.out_of_range:
        bad |= np.broadcast_to(b, (1, 5, 5))[0]
    want_bad = python_value(lambda q, k: k == 2 or (k == 3 and (q >> 0) != 0), 5, 5)
    assert np.array_equal(bad, want_bad)
    ok = ~want_bad
    want = python_value(lambda q, k: k > 1 and k >= 3 and ((q >> (k - 3)) == 0 or x[k] == 1), 5, 5)
    assert np.array_equal(got[ok], want[ok])


# ----------------------------------------------------------------------------- reductions


def _mask(src_mask: str, params: str = ""):
    head = f"pattern t({params}):" if params else "pattern t:"
    return pattern(f"{head}\n    mask = {src_mask}\n", filename="red.attn")



@pytest.mark.parametrize("text, py", [
    ("any(k == q - 2 * i for i in range(n))", lambda q, k, n: any(k == q - 2 * i for i in range(n))),
    ("all(k != q - 2 * i for i in range(n))", lambda q, k, n: all(k != q - 2 * i for i in range(n))),
    ("sum(q - k + i for i in range(n)) > 7", lambda q, k, n: sum(q - k + i for i in range(n)) > 7),
    ("sum(float(k) * 0.5 for i in range(n)) < 3.0",
     lambda q, k, n: sum(k * 0.5 for i in range(n)) < 3.0),
    ("sum(sum(i * j + k for j in range(i)) for i in range(n)) % 5 == q % 5",
     lambda q, k, n: sum(sum(i * j + k for j in range(i)) for i in range(n)) % 5 == q % 5),
    ("max(min(k - i * j + q for j in range(i + 1)) for i in range(n + 1)) > 6",
     lambda q, k, n: max(min(k - i * j + q for j in range(i + 1)) for i in range(n + 1)) > 6),
    ("any(all(k != i + j for j in range(i)) and q > i for i in range(n))",
     lambda q, k, n: any(all(k != i + j for j in range(i)) and q > i for i in range(n))),
])
@pytest.mark.parametrize("n", [0, 1, 4])
def test_reductions_mean_pythons(text, py, n):
    if n == 0 and "max(" in text:
        n = 1
    pat = _mask(text.replace("range(n)", f"range({n})").replace("range(n + 1)", f"range({n + 1})"))
    want = python_value(lambda q, k: py(q, k, n), 6, 8)
    assert np.array_equal(ref_mask(pat, 6, 8), want)          # the interpreter's loops
    assert np.array_equal(pat.dense_mask(6, 8)[0], want)               # the expansion


def test_empty_ranges():
    for text, want in (("any(k == i for i in range(kv_len - k_max))", False),
                       ("all(k == i for i in range(kv_len - k_max))", True),
                       ("sum(k + i for i in range(kv_len - k_max)) == 0", True),
                       ("sum(float(k) for i in range(kv_len - k_max)) == 0.0", True)):
        pat = _mask(text, "k_max = 5")
        assert (ref_mask(pat, 3, 5) == want).all(), text
    score = _mask("sum(float(k) for i in range(0)) == 0.0").ir.mask.args[0]
    assert score.type is Type.FLOAT and ref_value(score, 1, 1).dtype == np.float64


@pytest.mark.parametrize("fn", ["max", "min"])
def test_max_or_min_of_an_empty_range_is_an_error_at_the_reduction(fn):
    pat = _mask(f"k < 2 or {fn}(k - i for i in range(kv_len - 4)) > 0")
    err = _raises(lambda: ref_mask(pat, 4, 4))
    where = _at(pat.source, 2, fn)
    assert (err.line, err.column) == where and f"{fn}() of an empty range" in err.message
    err2 = _raises(lambda: pat.dense_mask(4, 4))                       # the expansion agrees
    assert (err2.line, err2.column) == where
    assert ref_mask(pat, 4, 5).shape == (4, 5)


@pytest.mark.parametrize("bound, shown", [("kv_len * 86", 258), ("kv_len - n", -2),
                                          ("q_len * 100", 300)])
def test_a_reduction_bound_out_of_range_is_an_error_at_the_bound(bound, shown):
    pat = _mask(f"any(k == i for i in range({bound}))", "n = 5")
    err = _raises(lambda: ref_mask(pat, 3, 3))
    where = _at(pat.source, 2, bound)
    assert (err.line, err.column) == where
    assert f"N must be between 0 and 256, got {shown}" in err.message
    err2 = _raises(lambda: pat.dense_mask(3, 3))
    assert (err2.line, err2.column) == where


def test_the_largest_range():
    pat = _mask("sum(i for i in range(256)) == q + 32639")
    want = python_value(lambda q, k: sum(range(256)) == q + 32639, 2, 2)
    assert want.any() and not want.all()
    assert np.array_equal(ref_mask(pat, 2, 2), want)


DOC = "pattern t(doc: int[]):\n    mask = {}(doc[k - i] == 1 for i in range(3))\n"


def _doc_py(fn, doc):
    def read(i):
        if not 0 <= i < len(doc):
            raise IndexError(i)
        return doc[i]
    return lambda q, k: fn(read(k - i) == 1 for i in range(3))


@pytest.mark.parametrize("fn, doc, ok", [
    (any, [1, 1, 0, 0, 1], True),       # k=0, 1: an earlier item decides before doc[-1], doc[-2]
    (any, [1, 0, 0, 0, 1], True),
    (any, [0, 1, 0, 0, 1], False),      # k=0: item 0 false, item 1 reads doc[-1]
    (all, [0, 0, 1, 1, 1], True),       # k=0, 1: an earlier item is false
    (all, [0, 1, 1, 1, 1], True),
    (all, [1, 1, 0, 0, 0], False),      # k=1: items 0 and 1 true, item 2 reads doc[-1]
])
def test_any_and_all_evaluate_an_item_only_where_the_earlier_ones_did_not_decide(fn, doc, ok):
    pat = pattern(DOC.format(fn.__name__), filename="doc.attn")
    d = np.array(doc)
    if ok:
        want = python_value(_doc_py(fn, doc), 5, 5)
        assert np.array_equal(ref_mask(pat, 5, 5, doc=d), want)
        assert np.array_equal(pat.dense_mask(5, 5, doc=d)[0], want)
        return
    with pytest.raises(IndexError):
        python_value(_doc_py(fn, doc), 5, 5)
    for run in (lambda: ref_mask(pat, 5, 5, doc=d), lambda: pat.dense_mask(5, 5, doc=d)):
        err = _raises(run)
        assert (err.line, err.column) == _at(pat.source, 2, "doc")
        assert "out of range for tensor input 'doc'" in err.message


# ----------------------------------------------------------------------------- bool inputs

FLAGS = "pattern g(flag: bool[], blk: bool[][]):\n    mask = flag[k] or blk[q // 2, k // 2]\n"


def test_bool_inputs_take_bool_arrays_and_tensors():
    pat = pattern(FLAGS)
    rng = np.random.default_rng(0)
    flag, block = rng.random(6) < 0.3, rng.random((3, 3)) < 0.5
    want = python_value(lambda q, k: bool(flag[k] or block[q // 2, k // 2]), 6, 6)
    assert np.array_equal(pat.dense_mask(6, 6, flag=flag, blk=block)[0], want)
    got = pat.dense_mask(6, 6, flag=torch.from_numpy(flag), blk=torch.from_numpy(block)[None])
    assert np.array_equal(got[0], want)
    flags = np.stack([flag, ~flag])                       # a batch dimension
    q, k, v = qkv(rng, 2, 1, 1, 6, 6)
    out = pat(*(torch.from_numpy(x) for x in (q, k, v)), backend="torch",
              flag=torch.from_numpy(flags), blk=torch.from_numpy(block))
    want_out, _ = pat.reference(q, k, v, flag=flags, blk=block)
    np.testing.assert_allclose(out.numpy(), want_out, atol=1e-12)


@pytest.mark.parametrize("bad", [np.zeros(6, np.int64), np.zeros(6), torch.zeros(6, dtype=torch.int32),
                                 torch.zeros(6, dtype=torch.uint8)])
def test_a_bool_input_refuses_other_dtypes_naming_the_input(bad):
    pat = pattern(FLAGS)
    err = _raises(lambda: pat.dense_mask(6, 6, flag=bad, blk=np.zeros((3, 3), bool)))
    assert "tensor input 'flag' is declared bool[] and needs bools" in err.message


def test_bool_arrays_for_int_and_float_inputs_keep_their_meaning():
    # int inputs take bools as 0 and 1 (as before); float inputs refuse them (as before)
    pat = pattern("pattern t(a: int[]):\n    mask = a[k] == 1\n")
    assert np.array_equal(pat.dense_mask(1, 3, a=np.array([True, False, True]))[0, 0],
                          [True, False, True])
    pat = pattern("pattern t(a: float[]):\n    mask = a[k] > 0.5\n")
    err = _raises(lambda: pat.dense_mask(1, 3, a=np.array([True, False, True])))
    assert "'a'" in err.message


# ----------------------------------------------------------------------------- derivatives


def test_derivatives_of_the_float_functions():
    src = "pattern t:\n    mask = causal\n    score = erf(score) + exp2(score * 0.5) - log2(score + 9.0)\n"
    ir = pattern(src).ir
    d = score_derivative(ir.score, {})
    s = np.linspace(-3.0, 3.0, 13).reshape(1, 1, 13)
    got = np.broadcast_to(evaluate(d, _env(1, 13, score=s)), s.shape)
    want = 2 / math.sqrt(math.pi) * np.exp(-s * s) + 0.5 * math.log(2) * np.exp2(0.5 * s) \
        - 1 / ((s + 9.0) * math.log(2))
    np.testing.assert_allclose(got, want, rtol=1e-14)


def test_reductions_are_refused_before_expansion():
    for op in (Op.ANY, Op.ALL, Op.SUM, Op.REDUCE_MAX, Op.REDUCE_MIN, Op.VAR):
        node = _mask("sum(float(i) for i in range(2)) == 1.0").ir.mask.args[0]
        with pytest.raises(ValueError, match="expanded"):
            DERIVATIVE_RULES[op](None, node, (), ())
        with pytest.raises(LoweringError, match="expanded"):
            TORCH_RULES[op](None, node, [])


def test_torch_backend_gradients_through_the_new_functions():
    src = """pattern t(x: float[]):
    mask = causal and (q ^ k) & 1 == 0
    score = erf(score) + exp2(score * 0.5) + x[k] * float(round(float(q) * 0.5) + \
ilog2(q - k)) + sum(score * float(i) for i in range(3))
"""
    pat = pattern(src)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, generator=gen).requires_grad_()
               for _ in range(3))
    x = torch.randn(9, dtype=torch.float64, generator=gen).requires_grad_()
    dout = torch.randn(1, 2, 9, 4, dtype=torch.float64, generator=gen)
    out = pat(q, k, v, backend="torch", x=x)
    got = dict(zip("qkvx", torch.autograd.grad(out, (q, k, v, x), dout)))
    want = reference_grads(pat, q, k, v, dout, x=x)
    for name in "qkvx":
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), atol=1e-9)


# ----------------------------------------------------------------------------- torch backend

BACKEND_CASES = [
    ("pattern p(g: bool[]):\n    mask = ((q ^ k) & 3) == 0 or g[k] or "
     "any(k == (q >> i) for i in range(4))\n", {"g": np.arange(13) % 5 == 0}),
    ("pattern r:\n    mask = ilog2(q - k + 1) <= 3 and round(float(q) / 2.5) >= 1\n"
     "    score = score + erf(float(k)) - sum(float(i) for i in range(3))\n", {}),
    ("pattern m:\n    mask = max(k - (q >> i) for i in range(3)) <= 1 and ~k & 2 == 0\n"
     "    score = score * exp2(-log2(float(q + 1))) + float(ceil(float(k) * 0.3) << 2)\n", {}),
    ("pattern v(blocks: int[], on: bool[][]):\n    mask = any(k // 4 == blocks[i] for i in "
     "range(3)) and on[q % 2, k % 3]\n", {"blocks": np.array([0, 2, 3]),
                                           "on": np.array([[1, 0, 1], [1, 1, 0]], bool)}),
]


@pytest.mark.parametrize("src, tensors", BACKEND_CASES, ids=lambda c: str(c)[:12])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_equals_the_reference(src, tensors, dtype):
    pat = pattern(src)
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 2, 1, 11, 13)
    out, lse = pat(*(torch.from_numpy(a).to(dtype) for a in (q, k, v)), backend="torch",
                   return_lse=True, **{n: torch.from_numpy(t) for n, t in tensors.items()})
    want_out, want_lse = pat.reference(*(torch.from_numpy(a).to(dtype).double().numpy()
                                         for a in (q, k, v)), **tensors)
    tol = 1e-10 if dtype is torch.float64 else 2e-5
    np.testing.assert_allclose(out.double().numpy(), want_out, atol=tol)
    assert np.array_equal(np.isneginf(lse.numpy()), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse.double().numpy()[fin], want_lse[fin], atol=tol)


def test_the_expansion_means_what_the_interpreter_does():
    for src, tensors in BACKEND_CASES:
        bound = as_bound(pattern(src))
        expanded = expand_reductions(bound.ir, dict(bound.values),
                                     {"q_len": 11, "kv_len": 13, "heads": 1, "kv_heads": 1})
        assert not any(e.op in (Op.ANY, Op.SUM, Op.REDUCE_MAX, Op.VAR)
                       for r in expanded.roots() for e in r.walk())
        assert np.array_equal(ref_value(bound.ir.mask, 11, 13, **tensors),
                              ref_value(expanded.mask, 11, 13, **tensors))
        if bound.ir.score is not None:
            s = np.random.default_rng(0).standard_normal((1, 11, 13))
            a = evaluate(bound.ir.score, _env(11, 13, score=s, **tensors))
            b = evaluate(expanded.score, _env(11, 13, score=s, **tensors))
            np.testing.assert_allclose(a, b, rtol=1e-15)
