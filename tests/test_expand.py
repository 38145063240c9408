"""Reduction expansion (attndsl/expand.py): per call's sizes, every bounded reduction becomes a
plain chain, and the expanded pattern means what the interpreter's loops mean (the reference
evaluates the unexpanded IR directly here); bounds, empty ranges, divisors that read a loop
variable and too large expansions are located call errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pattern
from hypothesis import given, settings
from hypothesis import strategies as st

from attndsl import AttnCallError
from attndsl.expand import MAX_EXPANDED_NODES, expand_reductions, has_reductions
from attndsl.ops import EXPANDED_OPS
from attndsl.reference import CallGrid, dense_mask


def _loops_mask(pat, q_len, kv_len, heads, **tensors):
    """The mask by the interpreter's own loops (the unexpanded IR, evaluated directly)."""
    grid = CallGrid(pat.ir, dict(pat.bound().values), q_len, kv_len, heads, heads, tensors)
    return dense_mask(grid)


def _expanded(pat, q_len, kv_len, heads):
    return pat.bound().for_sizes(q_len, kv_len, heads, heads).ir


_BOOL_BODIES = ["q - k == {i} * 3", "k // 4 == q // 4 - {i}", "(q + {i}) % 5 == k % 5",
                "q - k >= {i} and k > {i}", "h == {i} % heads", "(k >> {i}) & 1 == 1"]
_INT_BODIES = ["q - {i}", "k * {i}", "(q ^ {i}) & 7", "{i} % 3", "h + {i}"]
_BOUNDS = ["0", "1", "3", "n", "heads", "q_len // 8", "{outer} + 1", "{outer}"]


@st.composite
def _reduction(draw, kind: str, var: str, outer: str | None, depth: int):
    bounds = [b for b in _BOUNDS if outer is not None or "{outer}" not in b]
    bound = draw(st.sampled_from(bounds)).format(outer=outer)
    if kind in ("any", "all"):
        if depth > 0 and draw(st.booleans()):
            inner = draw(st.sampled_from(["any", "all"]))
            body = draw(_reduction(inner, var + "j", var, depth - 1))
        else:
            body = draw(st.sampled_from(_BOOL_BODIES)).format(i=var)
        return f"{kind}({body} for {var} in range({bound}))"
    body = draw(st.sampled_from(_INT_BODIES)).format(i=var)
    if kind == "sum" and depth > 0 and draw(st.booleans()):
        body = f"{body} + {draw(_reduction('sum', var + 'j', var, depth - 1))}"
    return f"{kind}({body} for {var} in range({bound}))"


@st.composite
def _mask_text(draw):
    kind = draw(st.sampled_from(["any", "all", "sum", "max", "min"]))
    text = draw(_reduction(kind, "i", None, 2))
    if kind in ("sum", "max", "min"):
        if kind != "sum" and ("range(0)" in text or "range(i)" in text):
            text = text.replace("range(0)", "range(1)").replace("range(i)", "range(i + 1)")
        text = f"{text} {draw(st.sampled_from(['<', '>=', '=='])) } k"
    return text


@settings(max_examples=80, deadline=None, derandomize=True)
@given(_mask_text(), st.integers(1, 19), st.integers(0, 6), st.integers(1, 3), st.integers(0, 3))
def test_the_expansion_means_the_loops(text, kv_len, short, heads, n):
    pat = pattern(f"pattern p(n = {n}):\n    mask = {text}\n")
    q_len = max(1, kv_len - short)
    try:
        want = _loops_mask(pat, q_len, kv_len, heads)
    except AttnCallError as err:           # max/min of an empty range: the expansion agrees
        with pytest.raises(AttnCallError) as info:
            _expanded(pat, q_len, kv_len, heads)
        assert info.value.message.split(" at this call")[0] in err.message or \
            "empty range" in err.message
        return
    ir = _expanded(pat, q_len, kv_len, heads)
    assert not any(r.uses(*EXPANDED_OPS) for r in ir.roots())
    got = pat.dense_mask(q_len, kv_len, heads=heads)
    assert np.array_equal(np.broadcast_to(got, want.shape), want), text


def test_sum_and_score_clause_expand_with_float_items():
    pat = pattern("pattern p:\n    mask = true\n"
                  "    score = score + sum(float(i) * 0.5 + float(k) for i in range(5))\n")
    ir = _expanded(pat, 7, 9, 2)
    assert not ir.score.uses(*EXPANDED_OPS)
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (7, 9, 9))
    out = pat(q, k, v, backend="torch")
    ref = pat.reference(q.numpy(), k.numpy(), v.numpy())[0]
    assert np.allclose(out.numpy(), ref, atol=1e-10)
    s0 = np.random.default_rng(0).normal(size=(2, 7, 9))
    loops = CallGrid(pat.ir, {}, 7, 9, 2, 2, {}).score([0, 1], np.arange(7), np.arange(9), s0)
    chain = CallGrid(ir, {}, 7, 9, 2, 2, {}).score([0, 1], np.arange(7), np.arange(9), s0)
    assert np.allclose(np.broadcast_to(chain, s0.shape), loops, rtol=0, atol=1e-12)


def test_a_pattern_without_reductions_is_not_copied():
    pat = pattern("pattern p:\n    mask = causal\n")
    assert not has_reductions(pat.ir)
    assert pat.bound().for_sizes(4, 4, 1, 1) is pat.bound()
    assert expand_reductions(pat.ir, {}, {"q_len": 1, "kv_len": 1, "heads": 1, "kv_heads": 1}) \
        is pat.ir


def test_expansions_are_cached_by_content_and_sizes():
    pat = pattern("pattern p:\n    mask = any(q - k == i for i in range(heads))\n")
    a = pat.bound().for_sizes(8, 8, 2, 2)
    assert pat.bound().for_sizes(8, 8, 2, 2) is a
    b = pat.bound().for_sizes(8, 8, 3, 3)
    assert b.key != a.key
    again = pattern("pattern p:\n    mask = any(q - k == i for i in range(heads))\n")
    assert again.bound().for_sizes(8, 8, 2, 2).key == a.key


def _call_error(src: str, q_len=8, kv_len=8, heads=2) -> AttnCallError:
    pat = pattern(src)
    with pytest.raises(AttnCallError) as info:
        pat.dense_mask(q_len, kv_len, heads=heads)
    return info.value


def test_a_bound_beyond_256_at_a_call_is_located():
    err = _call_error("pattern p:\n    mask = any(q == i for i in range(heads * 100))\n", heads=3)
    assert (err.span.line, err.span.column) == (2, 38)
    assert "between 0 and 256, got 300" in err.message and "heads=3" in err.message


def test_a_negative_bound_is_located():
    err = _call_error("pattern p:\n    mask = any(q == i for i in range(q_len - 9))\n")
    assert (err.span.line, err.span.column) == (2, 38) and "got -1" in err.message


def test_max_of_an_empty_range_is_located():
    err = _call_error("pattern p:\n    mask = k <= max(q - i for i in range(heads - 2))\n")
    assert (err.span.line, err.span.column) == (2, 17)
    assert "empty range" in err.message


def test_empty_ranges_of_any_all_sum():
    pat = pattern("pattern p:\n    mask = not any(q == i for i in range(0)) and "
                  "all(q == i for i in range(0)) and sum(q for i in range(0)) == 0\n")
    assert pat.dense_mask(3, 3).all()


def test_a_divisor_reading_a_loop_variable_is_checked_at_the_call():
    err = _call_error("pattern p:\n    mask = any(q // (2 - i) == k for i in range(3))\n")
    assert (err.span.line, err.span.column) == (2, 22)
    assert "divisor of '//' must be greater than 0, got 0" in err.message


def test_a_nested_bound_reads_the_outer_variable():
    pat = pattern("pattern p:\n    mask = sum(sum(1 for j in range(i)) for i in range(5)) == k\n")
    mask = pat.dense_mask(12, 12)
    assert mask[0].sum(axis=-1).tolist() == [1] * 12 and mask[0, :, 10].all()   # 0+1+2+3+4


def test_too_large_an_expansion_is_located():
    err = _call_error("pattern p:\n    mask = any(any(any(q == i + j + l for l in range(256)) "
                      "for j in range(256)) for i in range(heads))\n", heads=4)
    assert (err.span.line, err.span.column) == (2, 12)
    assert f"more than {MAX_EXPANDED_NODES} nodes" in err.message


def test_kernels_run_the_expansion():
    src = ("pattern p(sel: int[][], n = 3):\n    mask = any(k // 4 == sel[q // 4, j] for j in "
           "range(n)) or k == q\n")
    pat = pattern(src)
    sel = np.array([[0, 1, 2], [1, 2, 3], [0, 2, 3], [3, 3, 3]] * 3)
    q, k, v = (torch.randn(1, 2, n, 16) for n in (21, 23, 23))
    ref = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(), sel=sel)[0]
    for backend in ("torch", "triton-interpret"):
        out = pat(q, k, v, sel=sel, backend=backend)
        assert np.allclose(out.numpy(), ref, atol=2e-5), backend
