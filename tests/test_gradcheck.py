"""``torch.autograd.gradcheck`` of the gradient oracle and of the public call.

First the oracle (attndsl/reference_grad.py): its autograd gradient is the derivative of its own
function, checked against finite differences in float64 on tiny shapes, for a plain mask, a
soft-capped score, ALiBi, a relative bias (the gradient into a float tensor input), a GQA call
with q_len != kv_len, and a pattern whose first rows have no allowed key (lse -inf there:
those entries are left out of the checked outputs, a constant has no finite difference; their
gradient must be exactly zero, checked directly). Then the public call ``pat(q, k, v,
backend=...)``: the torch backend computes in float64 for float64 inputs and is checked to
gradcheck's default tolerances. The Triton kernels compute in float32 even for float64 inputs
(forward error ~1e-7), so their finite differences carry ~1e-7 / eps of noise: they are checked
with ``fast_mode`` (a random projection of the Jacobian), eps = 1e-3 and atol = rtol = 2e-3,
which that noise fits and a wrong gradient (an error of the size of the gradient, ~1e-1 here)
does not; tests/test_backward.py compares every backend's gradient with the oracle directly.
"""

from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl.reference_grad import reference_call, reference_grads

pytestmark = pytest.mark.usefixtures("one_thread")

PROG = attndsl.compile("""
pattern causal_p:
    mask = causal
pattern softcap(cap = 1.5):
    mask = causal and sliding(4)
    score = cap * tanh(score / cap)
pattern alibi(max_bias = 8.0):
    let slope = 2.0 ** (-max_bias * float(h + 1) / float(heads))
    mask = causal
    score = score - slope * float(q - k)
pattern rel_bias(rel: float[][]):
    mask = full
    score = score + rel[h, clamp(q - k, -3, 3) + 3] if abs(q - k) <= 4 else -inf
pattern late(start = 3):
    mask = causal and q >= start
pattern sqrt_bias(b: float[]):
    mask = causal
    score = score + b[k] * sqrt(float(q - k))
""", filename="<gradcheck>")


def _qkv(batch=1, heads=2, kv_heads=1, q_len=5, kv_len=7, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, q_len, d), (batch, kv_heads, kv_len, d), (batch, kv_heads, kv_len, d))
    return tuple(torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
                 for s in shapes)


def _finite_lse(lse):
    """lse with its -inf entries (rows without an allowed key: constant) replaced by 0."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


@pytest.mark.parametrize("name,sizes", [
    ("causal_p", {}),
    ("softcap", {}),
    ("alibi", {"heads": 4, "kv_heads": 2}),
    ("causal_p", {"heads": 4, "kv_heads": 2, "q_len": 6, "kv_len": 3}),   # rows without keys
    ("late", {}),
])
def test_oracle_gradcheck(name, sizes):
    pat = PROG[name]
    q, k, v = _qkv(**sizes)

    def fn(q, k, v):
        out, lse = reference_call(pat, q, k, v)
        return out, _finite_lse(lse)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_oracle_gradcheck_tensor_input():
    pat = PROG["rel_bias"]
    q, k, v = _qkv(heads=2, kv_heads=2, q_len=6, kv_len=6)
    rel = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, rel):
        out, lse = reference_call(pat, q, k, v, rel=rel)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, rel))
    # the bias is read at every pair within distance 3, so its gradient is not trivially zero
    grads = reference_grads(pat, q, k, v, torch.ones(1, 2, 6, 4, dtype=torch.float64),
                            torch.ones(1, 2, 6, dtype=torch.float64), rel=rel)
    assert grads["rel"] is not None and grads["rel"].abs().sum() > 0


def test_oracle_derivative_not_finite_at_disallowed_pairs():
    """sqrt(q - k) is NaN where k > q, which the mask rules out: the score clause is
    differentiated at allowed pairs only, so no NaN reaches q, k or b (not even 0 * NaN)."""
    pat = PROG["sqrt_bias"]
    q, k, v = _qkv(q_len=6, kv_len=6)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, b: reference_call(pat, q, k, v, b=b),
                                    (q, k, v, b))
    out, lse = reference_call(pat, q, k, v, b=b)
    grads = reference_grads(pat, q, k, v, torch.ones_like(out), torch.ones_like(lse), b=b)
    assert all(torch.isfinite(grads[n]).all() for n in ("q", "k", "v", "b"))
    assert grads["b"].abs().sum() > 0


def test_oracle_rows_without_keys_have_zero_gradient():
    pat = PROG["late"]                          # rows 0..2 (q < 3) have no allowed key
    q, k, v = _qkv(q_len=5, kv_len=5)
    out, lse = reference_call(pat, q, k, v)
    assert torch.isneginf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()
    assert (out[..., :3, :] == 0).all()
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)   # finite, also at -inf rows
    grads = reference_grads(pat, q, k, v, dout, dlse)
    assert all(torch.isfinite(grads[n]).all() for n in "qkv")
    assert (grads["q"][..., :3, :] == 0).all()
    assert grads["q"][..., 3:, :].abs().sum() > 0


def _public_call(name, inputs, backend):
    """(fn, its float64 leaves) for gradcheck of ``pat(q, k, v, backend=backend, ...)`` on a
    tiny call: fn returns out and the finite part of lse; the leaves are q, k, v and the
    tensor inputs of the given shapes."""
    pat = PROG[name]
    q, k, v = _qkv(heads=2, kv_heads=2 if inputs else 1, q_len=6, kv_len=6)
    tensors = {n: torch.randn(*s, dtype=torch.float64, requires_grad=True)
               for n, s in inputs.items()}
    names = list(tensors)

    def fn(q, k, v, *ts):
        out, lse = pat(q, k, v, return_lse=True, backend=backend, **dict(zip(names, ts)))
        return out, _finite_lse(lse)

    return fn, (q, k, v, *tensors.values())


@pytest.mark.parametrize("name,inputs", [
    ("causal_p", {}),
    ("softcap", {}),
    ("late", {}),
    ("rel_bias", {"rel": (2, 7)}),
    ("sqrt_bias", {"b": (6,)}),
])
def test_public_call_gradcheck_torch(name, inputs):
    assert torch.autograd.gradcheck(*_public_call(name, inputs, "torch"))


@pytest.mark.parametrize("name,inputs", [("causal_p", {}), ("softcap", {}),
                                         ("rel_bias", {"rel": (2, 7)})])
def test_public_call_gradcheck_triton_interpret(name, inputs):
    assert torch.autograd.gradcheck(*_public_call(name, inputs, "triton-interpret"), eps=1e-3,
                                    atol=2e-3, rtol=2e-3, fast_mode=True)
