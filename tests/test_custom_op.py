"""The call as a torch custom operator (attndsl/op.py): ``torch.compile(fullgraph=True)``
forward and backward, ``torch.library.opcheck``, the routing of calls, and a backward that
recomputes tile by tile (no dense matrix, no autograd graph of the tile loop)."""

from __future__ import annotations

import gc

import pytest
import torch
from attndsl.codegen.torch_plan import SEGMENT_ELEMENTS
from conftest import largest_tensor, pattern

import attndsl
from attndsl import AttnCallError
from attndsl.op import differentiable_inputs

BIAS = """\
pattern rb(rel: float[][], gate: float[], max_dist = 4):
    mask = causal and gate[k] > -2.0
    score = score + rel[h, clamp(q - k, 0, max_dist)]
"""


def _operands(batch=1, heads=2, kv_heads=1, n=37, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=g, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, n, d, generator=g, dtype=dtype) for _ in range(2))
    rel = torch.randn(heads, 5, generator=g, dtype=dtype)
    gate = torch.randn(n, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, rel, gate)]


def _grads(fn, q, k, v, rel, gate):
    for t in (q, k, v, rel, gate):
        t.grad = None
    fn(q, k, v, rel, gate).backward()
    return [t.grad for t in (q, k, v, rel, gate)]


def test_differentiable_inputs_are_the_float_inputs_the_score_clause_reads():
    pat = pattern(BIAS)
    assert differentiable_inputs(pat.bound()) == {"rel"}
    routed = pattern("pattern r(c: float[][][], w: float[]):\n    mask = route(c)\n"
                     "    score = score + w[k] if route(c) else score\n")
    assert differentiable_inputs(routed.bound()) == {"w"}      # not the selector's centroids


@pytest.mark.parametrize("backend", ["torch", "triton-interpret"])
def test_compiled_fullgraph_forward_and_backward_equal_eager(backend):
    pat = pattern(BIAS)

    def loss(q, k, v, rel, gate):
        out, lse = pat(q, k, v, rel=rel, gate=gate, return_lse=True, backend=backend)
        return (out * out).sum() + lse.sum()

    args = _operands()
    eager = _grads(loss, *args)
    compiled = _grads(torch.compile(loss, fullgraph=True, backend="aot_eager"), *args)
    for a, b in zip(eager[:4], compiled[:4]):
        assert a is not None and torch.equal(a, b)
    assert eager[4] is None and compiled[4] is None     # 'gate': read by the mask only


@pytest.mark.slow
def test_compiled_with_inductor():
    pat = pattern(BIAS)

    def loss(q, k, v, rel, gate):
        return pat(q, k, v, rel=rel, gate=gate).square().sum()

    args = _operands()
    eager = _grads(loss, *args)
    compiled = _grads(torch.compile(loss, fullgraph=True), *args)
    for a, b in zip(eager[:4], compiled[:4]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton-interpret"])
def test_opcheck_of_both_operators(backend):
    pat = pattern(BIAS)
    q, k, v, rel, gate = (t.detach() for t in _operands(n=21))
    key = pat.bound().key
    fwd = (key, "gate,rel", q, k, v, [gate, rel], 0.25, backend)
    torch.library.opcheck(torch.ops.attndsl.attention.default,
                          (key, "gate,rel", *(t.clone().requires_grad_() for t in (q, k, v)),
                           [gate, rel.clone().requires_grad_()], 0.25, backend))
    out, lse = torch.ops.attndsl.attention(*fwd)
    torch.library.opcheck(torch.ops.attndsl.attention_backward.default,
                          (key, "gate,rel", q, k, v, [gate, rel], out, lse, torch.randn_like(out),
                           torch.randn_like(lse), 0.25, backend))


def test_backward_outputs_follow_the_inputs_dtypes_and_shapes():
    pat = pattern(BIAS)
    q, k, v, rel, gate = _operands(batch=2, heads=4, kv_heads=2)
    rel_batched = rel.detach()[None].expand(2, -1, -1).clone().requires_grad_()
    out = pat(q, k, v, rel=rel_batched, gate=gate)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    assert rel_batched.grad.shape == rel_batched.shape and gate.grad is None
    # a batched table's gradient, summed over the batch, is the shared table's
    shared = pat(*(t.detach().requires_grad_() for t in (q, k, v)), rel=rel, gate=gate)
    shared.sum().backward()
    torch.testing.assert_close(rel_batched.grad.sum(0), rel.grad)


def test_a_call_without_gradients_does_not_go_through_the_operator(monkeypatch):
    pat = pattern(BIAS)
    q, k, v, rel, gate = (t.detach() for t in _operands())

    def forbidden(*a, **kw):
        raise AssertionError("the custom operator ran")

    monkeypatch.setattr(attndsl.op, "forward", forbidden)
    pat(q, k, v, rel=rel, gate=gate)
    with torch.no_grad():
        pat(q.requires_grad_(), k, v, rel=rel, gate=gate)
    with pytest.raises(AssertionError, match="the custom operator ran"):
        pat(q, k, v, rel=rel, gate=gate)        # q requires grad now


def test_a_dropped_pattern_is_a_clear_error_in_a_later_call_of_the_operator():
    pat = pattern("pattern gone_soon(w = 3):\n    mask = sliding(w)\n")
    key = pat.bound().key
    q, k, v, _, _ = (t.detach() for t in _operands())
    del pat
    gc.collect()
    with pytest.raises(AttnCallError, match="no live attndsl pattern has key"):
        torch.ops.attndsl.attention(key, "", q, k, v, [], 0.25, "torch")


def test_the_torch_backward_recomputes_tile_by_tile():
    n, d = 4096, 16
    pat = pattern("pattern t(cap = 5.0):\n    mask = sliding(64)\n    score = cap * tanh(score / cap)\n")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, generator=g).requires_grad_() for _ in range(3))
    out = pat(q, k, v, backend="torch")
    with largest_tensor() as rec:
        out.sum().backward()
    assert rec.largest <= max(SEGMENT_ELEMENTS, n * d) and rec.largest < n * n // 64
    # the result, on a few rows, against dense attention
    rows = torch.tensor([0, 5, 63, 64, 2000, n - 1])
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    s = 5.0 * torch.tanh((qq[0, 0, rows] @ kk[0, 0].T) / 4.0 / 5.0)
    j = torch.arange(n)
    allowed = (rows[:, None] - j[None] >= 0) & (rows[:, None] - j[None] < 64)
    (torch.softmax(s.masked_fill(~allowed, -torch.inf), -1) @ vv[0, 0]).sum().backward()
    torch.testing.assert_close(q.grad[0, 0, rows], qq.grad[0, 0, rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", ["causal and sliding(7)", "q - k >= 3 and q - k < 9",
                                  "topk_blocks(2, 8)"])
def test_the_fused_backward_steps_agree_with_the_general_ones(monkeypatch, mask):
    """The torch backend's backward on torch's fused CPU operator (no score clause, finite
    inputs) against its general steps: GQA, rows with no allowed key (q - k >= 3), a
    selector's sparse steps."""
    import attndsl.torch_backward as tb

    pat = pattern(f"pattern p:\n    mask = {mask}\n")
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(2, 4, 45, 16, generator=g, dtype=torch.float64)] + \
        [torch.randn(2, 2, 45, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    calls = []
    real = tb.FUSED_BACKWARD
    monkeypatch.setattr(tb, "FUSED_BACKWARD", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("ATTNDSL_TORCH_FUSED", fused)
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = pat(q, k, v, backend="torch")
        results.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
        assert bool(calls) == (fused == "1")
        calls.clear()
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
