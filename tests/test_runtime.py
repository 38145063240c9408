"""The torch entry point ``pat(q, k, v, ...)`` (LANGUAGE.md sections 1 and 6) with backend="torch":
agreement with ``reference()`` across dtypes, GQA, ragged lengths, tensor inputs and empty rows;
gradients through the score clause; bounded memory (no dense [q_len, kv_len] matrix).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from attndsl.codegen.torch_plan import SEGMENT_ELEMENTS, cpu_block
from conftest import largest_tensor, pattern

from attndsl import AttnCallError, torch_backend

pytestmark = pytest.mark.usefixtures("one_thread")


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def tensors(batch, heads, kv_heads, q_len, kv_len, d=16, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(batch, heads, q_len, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, kv_len, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, kv_len, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def compare(pat, q, k, v, scale=None, **inputs):
    """pat(q, k, v) against pat.reference on the same (rounded) inputs."""
    out, lse = pat(q, k, v, return_lse=True, scale=scale, backend="torch", **inputs)
    assert out.dtype == q.dtype and out.shape == q.shape[:3] + (v.shape[-1],)
    assert lse.shape == q.shape[:3]
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    np_inputs = {n: (t.numpy() if isinstance(t, torch.Tensor) else t) for n, t in inputs.items()}
    want_out, want_lse = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                       scale=scale, **np_inputs)
    tol = TOL[q.dtype]
    got_out, got_lse = out.double().numpy(), lse.double().numpy()
    assert not np.isnan(got_out).any() and not np.isnan(got_lse).any()
    np.testing.assert_allclose(got_out, want_out, atol=tol, rtol=tol)
    assert np.array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[fin], want_lse[fin], atol=tol, rtol=tol)
    return out, lse


STREAMING = "pattern t(w = 40):\n    mask = causal and (sinks(3) or sliding(w))\n"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_match_the_reference(dtype):
    pat = pattern(STREAMING)
    q, k, v = tensors(2, 4, 2, 70, 300, dtype=dtype)
    compare(pat, q, k, v)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 3), (4, 1)])
def test_gqa(heads, kv_heads):
    pat = pattern("pattern t:\n    mask = causal and (h % 2 == 0 or sliding(17))\n")
    q, k, v = tensors(1, heads, kv_heads, 90, 90, dtype=torch.float64)
    compare(pat, q, k, v)


@pytest.mark.parametrize("q_len, kv_len", [
    (1, 1), (1, 300), (5, 513), (64, 256), (65, 257), (130, 130), (200, 77), (63, 255),
    (255, 129), (257, 127), (300, 385),
])
def test_lengths_that_are_not_tile_multiples(q_len, kv_len):
    assert cpu_block(q_len, kv_len) == (64, 64)         # the tiles these lengths straddle
    pat = pattern(STREAMING)
    q, k, v = tensors(1, 2, 1, q_len, kv_len, d=8, dv=5, dtype=torch.float64)
    compare(pat, q, k, v)


def test_scale_argument():
    pat = pattern(STREAMING)
    q, k, v = tensors(1, 2, 2, 40, 60, dtype=torch.float64)
    for scale in (0.05, 1.0, 3):
        compare(pat, q, k, v, scale=scale)
    a = pat(q, k, v, scale=0.25)
    b = pat(q, k, v)                              # default 1/sqrt(16) == 0.25
    assert torch.equal(a, b)


def test_score_clause_and_tensor_inputs():
    src = """pattern t(bias: float[][], cap = 20.0):
    mask = causal
    score = cap * tanh(score / cap) + bias[h, clamp(q - k, 0, 15)]
"""
    pat = pattern(src)
    q, k, v = tensors(2, 2, 1, 100, 300, dtype=torch.float64)
    bias = torch.randn(2, 16, dtype=torch.float64)
    compare(pat, q, k, v, bias=bias)
    compare(pat, q.float(), k.float(), v.float(), bias=bias.float())


@pytest.mark.parametrize("score", [
    "-score",
    "score * 0.5 + float(h)",
    "score ** 2.0",
    "2.0 ** score",
    "abs(score) - sqrt(abs(score))",
    "max(score, -0.5, 0.0 - score) + min(score, 0.25)",
    "score if score > 0.0 else 0.1 * score",
    "exp(min(score, 3.0)) + log(abs(score) + 1.0) + sigmoid(score)",
    "clamp(score, -1.0, 1.0)",
    "score + (bias[q - k] if q >= k else -inf)",
    "score + bias[q - k] if 0 <= q - k and q - k < 300 else score - 1.0",
    "-inf if bias[k] > 0.5 else score",
    "score if topk_blocks(2, 32, causal = false) else -inf",
    "score if random_blocks(1, 64) else score - 1.0",
])
def test_score_clause_forms_in_torch(score):
    pat = pattern(f"pattern t(bias: float[]):\n    mask = k <= q + 3\n    score = {score}\n")
    q, k, v = tensors(1, 2, 1, 70, 300, dtype=torch.float64)
    bias = torch.rand(300, dtype=torch.float64)
    compare(pat, q, k, v, bias=bias)


def test_a_batch_of_documents():
    pat = pattern("pattern t(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n")
    q, k, v = tensors(3, 2, 2, 300, 300, dtype=torch.float64)
    lens = [[100, 150, 50], [300], [1, 1, 298]]
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lens])
    out, _ = compare(pat, q, k, v, doc=doc)
    # without the batch dimension the same documents serve every element
    compare(pat, q, k, v, doc=doc[0])
    # element b uses row b
    single, _ = pat.reference(q[1:2].numpy(), k[1:2].numpy(), v[1:2].numpy(), doc=doc[1].numpy())
    np.testing.assert_allclose(out[1].numpy(), single[0], atol=1e-10)


def test_empty_rows_are_zero_with_minus_inf_lse():
    pat = pattern("pattern t:\n    mask = causal and q % 3 != 1\n    score = score if k != 0 else -inf\n")
    q, k, v = tensors(1, 2, 2, 80, 40, dtype=torch.float32)   # q_len > kv_len: early rows empty
    out, lse = compare(pat, q, k, v)
    empty = torch.isinf(lse)
    assert empty.any() and (~empty).any()
    assert torch.all(out[empty] == 0)


def test_every_row_empty():
    pat = pattern("pattern t:\n    mask = false\n")
    q, k, v = tensors(1, 1, 1, 70, 300)
    out, lse = pat(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_zero_lengths():
    pat = pattern("pattern t:\n    mask = true\n")
    q, k, v = tensors(1, 2, 1, 0, 10)
    out, lse = pat(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    q, k, v = tensors(1, 2, 1, 5, 0)
    out, lse = pat(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_selectors_in_the_torch_backend():
    src = ("pattern t(c: float[][][]):\n"
           "    mask = causal and (topk_blocks(2, 32) or route(c) or random_blocks(1, 64))\n")
    pat = pattern(src)
    q, k, v = tensors(2, 2, 1, 130, 300, dtype=torch.float64)
    c = torch.randn(2, 3, 16, dtype=torch.float64)
    compare(pat, q, k, v, c=c)


def test_default_backend_on_cpu_is_torch_and_return_lse_false_returns_the_output():
    pat = pattern(STREAMING)
    q, k, v = tensors(1, 2, 2, 30, 30)
    out = pat(q, k, v)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, pat(q, k, v, backend="torch"))
    out2, lse = pat(q, k, v, return_lse=True)
    assert torch.equal(out, out2)


# ----------------------------------------------------------------------------- autograd


def test_gradcheck_through_the_score_clause():
    src = """pattern t(bias: float[]):
    mask = causal and k != 1
    score = 5.0 * tanh(score / 5.0) - 0.1 * float(q - k) + bias[k]
"""
    pat = pattern(src)
    q, k, v = tensors(1, 2, 1, 5, 7, d=3, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)

    def fn(q, k, v):
        out, lse = pat(q, k, v, return_lse=True, bias=bias)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def dense_torch(q, k, v, allowed, score_fn=None, scale=None):
    """Plain dense attention in torch (a test oracle for gradients)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    idx = torch.arange(heads) // (heads // kv_heads)
    kk, vv = k[:, idx], v[:, idx]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q @ kk.transpose(-1, -2)
    if score_fn is not None:
        s = score_fn(s)
    allowed = allowed & (s != -torch.inf)
    s = s.masked_fill(~allowed, -torch.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m) * allowed
    z = p.sum(-1, keepdim=True)
    out = (p / torch.where(z > 0, z, torch.ones_like(z))) @ vv
    lse = torch.where(z[..., 0] > 0, torch.log(z[..., 0]) + m[..., 0], torch.full_like(z[..., 0], -torch.inf))
    return out, lse


def test_gradients_match_dense_attention_with_empty_rows():
    src = "pattern t:\n    mask = causal and q % 4 != 0\n    score = 8.0 * tanh(score / 8.0)\n"
    pat = pattern(src)
    q, k, v = tensors(2, 4, 2, 70, 40, d=8, dtype=torch.float64)
    allowed = torch.as_tensor(pat.dense_mask(70, 40, heads=4, kv_heads=2))[None]
    grads = []
    for impl in ("attndsl", "dense"):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        if impl == "attndsl":
            out, lse = pat(qq, kk, vv, return_lse=True)
        else:
            out, lse = dense_torch(qq, kk, vv, allowed, lambda s: 8.0 * torch.tanh(s / 8.0))
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() \
            + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()
        loss.backward()
        grads.append([x.grad for x in (qq, kk, vv)])
        assert all(torch.isfinite(g).all() for g in grads[-1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_gradients_with_a_float_tensor_input_in_the_score():
    pat = pattern("pattern t(bias: float[]):\n    mask = causal\n    score = score + bias[k]\n")
    q, k, v = tensors(1, 2, 1, 9, 9, d=4, dtype=torch.float64)
    bias = torch.randn(9, dtype=torch.float64)
    allowed = torch.as_tensor(pat.dense_mask(9, 9, heads=2, kv_heads=1, bias=bias.numpy()))[None]
    grads = []
    for impl in ("attndsl", "dense"):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        if impl == "attndsl":
            out = pat(qq, kk, vv, bias=bias)
        else:
            out, _ = dense_torch(qq, kk, vv, allowed, lambda s: s + bias)
        (out ** 2).sum().backward()
        grads.append([x.grad for x in (qq, kk, vv)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


# ----------------------------------------------------------------------------- memory


def test_no_dense_q_len_by_kv_len_matrix(monkeypatch):
    import time
    import tracemalloc
    n, d = 8192, 16
    pat = pattern("pattern t:\n    mask = sliding(64)\n")
    q, k, v = tensors(1, 1, 1, n, n, d=d)
    tiles = []
    real_hooks = torch_backend.torch_hooks

    class Spy:                               # the generated module, its mask calls recorded
        def __init__(self, module):
            self.module = module

        def mask(self, qpos, kpos, *rest):
            tiles.append((qpos.numel(), kpos.numel()))
            return self.module.mask(qpos, kpos, *rest)

    monkeypatch.setattr(torch_backend, "torch_hooks",
                        lambda p: replace(real_hooks(p), module=Spy(real_hooks(p).module)))
    tracemalloc.start()                      # NumPy's allocations are traced; torch's are not,
    try:                                     # torch's tensors are recorded by largest_tensor()
        t0 = time.perf_counter()
        with largest_tensor() as rec:
            out = pat(q, k, v)
        elapsed = time.perf_counter() - t0
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (1, 1, n, d)
    assert elapsed < 60, elapsed
    # every torch tensor is at most a step's block of scores or a [len, D] operand ...
    assert rec.largest <= max(SEGMENT_ELEMENTS, n * d)
    assert rec.largest < n * n // 256
    # ... NumPy never holds anything near a dense bool mask (64 MiB here) ...
    assert numpy_peak < n * n // 16, numpy_peak
    # ... and the mask is evaluated step by step, on the window's tiles only
    assert tiles and max(r * c for r, c in tiles) <= SEGMENT_ELEMENTS
    assert sum(r * c for r, c in tiles) < 8 * n * 64
    # and the result is right (checked on a few rows against a dense computation)
    rows = torch.tensor([0, 1, 63, 64, 1000, n - 1])
    s = (q[0, 0, rows] @ k[0, 0].T) / 4.0
    j = torch.arange(n)
    allowed = (rows[:, None] - j[None] >= 0) & (rows[:, None] - j[None] < 64)
    p = torch.softmax(s.masked_fill(~allowed, -torch.inf), -1)
    torch.testing.assert_close(out[0, 0, rows], p @ v[0, 0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_invalid_backend_name():
    pat = pattern(STREAMING)
    q, k, v = tensors(1, 1, 1, 4, 4)
    for name in ["cuda", "Torch", "", "numpy"]:
        with pytest.raises(AttnCallError, match="'backend'"):
            pat(q, k, v, backend=name)


def test_unknown_and_missing_tensor_inputs():
    pat = pattern("pattern t(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n")
    q, k, v = tensors(1, 1, 1, 4, 4)
    doc = torch.zeros(4, dtype=torch.long)
    with pytest.raises(AttnCallError, match="'segment'"):
        pat(q, k, v, doc=doc, segment=doc)
    with pytest.raises(AttnCallError, match="'doc'"):
        pat(q, k, v)
    with pytest.raises(AttnCallError, match="'w'"):
        pattern(STREAMING)(q, k, v, w=3)           # a compile-time parameter is not a tensor input


def test_index_out_of_range_raises_before_returning():
    pat = pattern("pattern t(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n")
    q, k, v = tensors(2, 1, 1, 300, 300)
    good = torch.zeros(300, dtype=torch.long)
    with pytest.raises(AttnCallError, match="out of range"):
        pat(q, k, v, doc=good[:299])
    bad_values = torch.zeros(2, 300, dtype=torch.long)
    nested = pattern("pattern t(doc: int[]):\n    mask = doc[doc[k]] == 0\n")
    bad_values[1, 5] = 300                        # only in batch element 1
    with pytest.raises(AttnCallError, match="out of range"):
        nested(q, k, v, doc=bad_values)
    nested(q[:1], k[:1], v[:1], doc=bad_values[:1])


def test_patterns_are_reusable_across_calls_and_shapes():
    pat = pattern(STREAMING)
    for q_len, kv_len in [(10, 10), (3, 50), (100, 100)]:
        q, k, v = tensors(1, 2, 1, q_len, kv_len, dtype=torch.float64)
        compare(pat, q, k, v)
    bound = pat.bind(w=5)
    q, k, v = tensors(1, 2, 1, 30, 30, dtype=torch.float64)
    compare(bound, q, k, v)
    assert not torch.allclose(bound(q, k, v), pat(q, k, v))


def test_triton_backend_on_cpu_tensors_is_a_call_error_naming_the_interpreter():
    # bind checks the tensors' device, not the machine's: on any machine, CPU tensors
    pat = pattern(STREAMING)
    q, k, v = tensors(1, 2, 1, 50, 70)
    with pytest.raises(AttnCallError, match=r"'triton' runs on CUDA tensors") as info:
        pat(q, k, v, backend="triton")
    assert "backend='triton-interpret'" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter runs where no GPU is")
def test_triton_interpret_backend_on_cpu_tensors_gives_the_torch_result():
    pat = pattern(STREAMING)
    q, k, v = tensors(1, 2, 1, 50, 70)
    out, lse = pat(q, k, v, return_lse=True, backend="triton-interpret")
    want_out, want_lse = pat(q, k, v, return_lse=True, backend="torch")
    assert out.dtype == q.dtype and out.shape == want_out.shape and lse.shape == want_lse.shape
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
