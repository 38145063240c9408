"""The index range proof that spares the kernels' calls the pair-by-pair check
(attndsl.analysis.intervals.indices_in_range): whenever it proves a call's indices in range,
the exact check finds none out of range, and calls with an index out of range still fail with
the interpreter's error before any kernel runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.analysis.intervals import indices_in_range
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
    assert indices_in_range(grids[0]) is proved
    if proved:
        assert _exact_ok(grids)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(-3, 3), st.integers(-3, 3), st.integers(-70, 70), st.integers(1, 50), st.integers(0, 30),
       st.integers(1, 90))
def test_a_proof_is_never_wrong(a, b, c, kv_len, short, size):
    q_len = max(1, kv_len - short)
    src = f"pattern p(t: int[]):\n    mask = t[{a} * q + {b} * k + {c}] >= 0\n"
    grids = _grids(src, q_len, kv_len, t=np.zeros(size, np.int64))
    if indices_in_range(grids[0]):
        assert _exact_ok(grids)


def test_out_of_range_calls_fail_before_the_kernel():
    pat = attndsl.compile("pattern p(t: int[]):\n    mask = t[q + 1] >= 0\n")["p"]
    q = torch.randn(1, 1, 20, 16)
    with pytest.raises(AttnCallError, match="out of range"):
        pat(q, q, q, backend="triton-interpret", t=np.zeros(20, np.int64))
