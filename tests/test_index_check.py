"""The proof that spares the kernels' calls the pair-by-pair check of their values
(attndsl.analysis.call_checks.call_values_proved): whenever it proves a call's tensor indices in
range, its shift counts in 0..62 and its floor/ceil/round arguments convertible to int64, the
exact check finds no bad value, and calls with a bad value still fail with the interpreter's
error before any kernel runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.analysis.call_checks import call_values_proved
from attndsl.errors import AttnCallError
from attndsl.reference import check_indices


def _grids(src: str, q_len: int, kv_len: int, heads: int = 2, **tensors):
    pat = attndsl.compile(src)["p"]
    return pat.grids((1, heads, heads, q_len, kv_len), None, None, 1.0, tensors)


def _exact_ok(grids) -> bool:
    try:
        check_indices(grids)
    except AttnCallError:
        return False
    return True


@pytest.mark.parametrize("expr,proved", [
    ("doc[q] == doc[k]", True),
    ("t[q + 1] > 0", False),                     # q = kv_len - 1 reads past the end
    ("t[clamp(q + 1, 0, kv_len - 1)] > 0", True),
    ("start[doc[q]] <= k", True),
    ("start[doc[q] + 1] <= k", False),
    ("u[h, k] > 0", True),
    ("(t[q - 40] > 0) if q >= 40 else true", False),   # guarded: not proved, yet in range
])
def test_what_the_intervals_prove(expr, proved):
    n = 60
    doc = np.repeat(np.arange(3), 20)
    grids = _grids(f"pattern p(doc: int[], t: int[], start: int[], u: int[][]):\n    mask = {expr}\n", n, n,
                   doc=doc, t=np.arange(n), start=np.array([0, 20, 40]), u=np.ones((2, n), np.int64))
    assert call_values_proved(grids[0]) is proved
    if proved:
        assert _exact_ok(grids)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(-3, 3), st.integers(-3, 3), st.integers(-70, 70), st.integers(1, 50), st.integers(0, 30),
       st.integers(1, 90))
def test_a_proof_is_never_wrong(a, b, c, kv_len, short, size):
    q_len = max(1, kv_len - short)
    src = f"pattern p(t: int[]):\n    mask = t[{a} * q + {b} * k + {c}] >= 0\n"
    grids = _grids(src, q_len, kv_len, t=np.zeros(size, np.int64))
    if call_values_proved(grids[0]):
        assert _exact_ok(grids)


def test_out_of_range_calls_fail_before_the_kernel():
    pat = attndsl.compile("pattern p(t: int[]):\n    mask = t[q + 1] >= 0\n")["p"]
    q = torch.randn(1, 1, 20, 16)
    with pytest.raises(AttnCallError, match="out of range"):
        pat(q, q, q, backend="triton-interpret", t=np.zeros(20, np.int64))


@pytest.mark.parametrize("expr,proved", [
    ("(k >> 3) == (q >> 3)", True),
    ("(k << (q % 8)) > 0", True),
    ("(k >> (q - k)) > 0", False),                          # q - k < 0 below the diagonal
    ("(k >> (q - k)) > 0 if q >= k else false", False),     # guarded: not proved, yet valid
    ("(1 << (q // 2)) > k", False),                         # at 130 keys (below): counts to 64
    ("floor(float(q) / 3.0) == k", True),
    ("round(w[k]) > 0", True),
    ("floor(w[k] * 1e300 * 1e300) > 0", False),             # w[k] * 1e600 is inf
    ("ceil(log(float(k))) < 3", False),                     # log(0.0) is -inf
    ("ceil(log(float(k + 1))) < 3", True),
])
def test_what_the_intervals_prove_of_shifts_and_float_to_int(expr, proved):
    n = 60
    src = f"pattern p(w: float[]):\n    mask = {expr}\n"
    grids = _grids(src, n, n, w=np.linspace(-3.0, 3.0, n))
    if "q // 2" in expr:        # counts 0..29: proved; at 130 keys, 0..64: not
        assert call_values_proved(grids[0])
        grids = _grids(src, 130, 130, w=np.zeros(130))
    assert call_values_proved(grids[0]) is proved
    if proved:
        assert _exact_ok(grids)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(-3, 3), st.integers(-3, 3), st.integers(-70, 70), st.integers(1, 70), st.integers(0, 30),
       st.sampled_from([">>", "<<"]))
def test_a_shift_proof_is_never_wrong(a, b, c, kv_len, short, op):
    q_len = max(1, kv_len - short)
    src = f"pattern p:\n    mask = (k {op} ({a} * q + {b} * k + {c})) >= 0\n"
    grids = _grids(src, q_len, kv_len)
    if call_values_proved(grids[0]):
        assert _exact_ok(grids)


def test_bad_shift_counts_and_floats_fail_before_the_kernel():
    q = torch.randn(1, 1, 20, 16)
    pat = attndsl.compile("pattern p:\n    mask = (k >> (q - 3)) >= 0\n")["p"]
    with pytest.raises(AttnCallError, match="shift count -3"):
        pat(q, q, q, backend="triton-interpret")
    pat = attndsl.compile("pattern p(w: float[]):\n    mask = floor(w[k]) >= 0\n")["p"]
    w = np.zeros(20)
    w[7] = np.nan
    with pytest.raises(AttnCallError, match="floor of nan"):
        pat(q, q, q, backend="triton-interpret", w=w)
