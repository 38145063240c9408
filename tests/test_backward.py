"""The backward pass of ``pat(q, k, v, ...)`` on both CPU backends against the gradient oracle.

Every gradient comes through the public API: inputs with ``requires_grad=True``, ``out`` (and
``lse`` with ``return_lse=True``) differentiated by ``torch.autograd.grad`` with random
``dout`` / ``dlse``; it is compared with :func:`attndsl.reference_grad.reference_grads` (a dense float64
autograd definition, attndsl/reference_grad.py, itself gradchecked in tests/test_gradcheck.py)
evaluated on the same input values. Covered: every pattern of examples/*.attn (their parameters
and tensor inputs from tests/test_examples.py) on "torch" and "triton-interpret"; the
gradient into a float tensor input read by a score clause (and none into one read only by a
selector); dtypes; GQA; q_len != kv_len both ways; ragged lengths; rows without an allowed key
(zero gradients, no NaN); batch-broadcast tensor inputs (their gradient sums over the batch);
bit-identical repeated backward runs; random small patterns and shapes (hypothesis).

Tolerances: a gradient is within ``tol * (max |want| + 1)`` of the oracle's, with ``tol`` per
dtype (:data:`TOL`): the rounding of the inputs is shared (the oracle reads the same values),
only the backend's arithmetic and the rounding of its results differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_values, examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_examples import CASES as EXAMPLE_CASES
from test_examples import EXAMPLES, MANY_HEADS
from test_lang_examples import LANG_CASES

import attndsl
from attndsl.ir import Type
from attndsl.reference_grad import reference_call, reference_grads

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = EXAMPLE_CASES + LANG_CASES      # every example file's patterns

BACKENDS = ("torch", "triton-interpret")
D = 16
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
# one (q_len, kv_len) per example, none a multiple of 16: decoding-like, square, and
# q_len > kv_len (the first rows sit before position 0: causal rows without keys)
SHAPES = [(37, 53), (45, 45), (61, 29)]


# ----------------------------------------------------------------------------- helpers


def float_inputs(pat) -> set:
    return {p.name for p in pat.ir.params if p.is_tensor and p.type.elem is Type.FLOAT}


def make_call(pat, tensors: dict, batch, heads, kv_heads, q_len, kv_len, dtype=torch.float32,
              seed=0, d=D):
    """(q, k, v, tensor inputs, dout, dlse): leaves requiring grad (float tensor inputs too)."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True)

    q, k, v = leaf(batch, heads, q_len, d), leaf(batch, kv_heads, kv_len, d), \
        leaf(batch, kv_heads, kv_len, d)
    floats = float_inputs(pat)
    given_ = {}
    for name, value in tensors.items():
        t = torch.as_tensor(np.asarray(value))
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        given_[name] = t.to(wide).requires_grad_(True) if name in floats else t
    dout = torch.randn(batch, heads, q_len, d, generator=gen).to(dtype)
    dlse = torch.randn(batch, heads, q_len, generator=gen)
    return q, k, v, given_, dout, dlse


def backend_grads(pat, q, k, v, tensors, dout, dlse, backend, scale=None) -> dict:
    """name -> gradient (or None) of <out, dout> (+ <lse, dlse>) through the public call."""
    if dlse is None:                # return_lse=False: the loss reads out only
        out = pat(q, k, v, backend=backend, scale=scale, **tensors)
        outputs, grads_in = (out,), (dout,)
    else:
        out, lse = pat(q, k, v, return_lse=True, backend=backend, scale=scale, **tensors)
        assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
        outputs, grads_in = (out, lse), (dout, dlse.to(lse.dtype))
    assert out.dtype == q.dtype
    wrt = {"q": q, "k": k, "v": v, **{n: t for n, t in tensors.items() if t.requires_grad}}
    got = torch.autograd.grad(outputs, list(wrt.values()), grads_in, allow_unused=True)
    return dict(zip(wrt, got))


def assert_grads_match(got: dict, want: dict, tol: float, where: str):
    for name, g in got.items():
        w = want[name]
        if w is None:
            assert g is None, f"{where}: '{name}' is not read by the score clause, yet has a " \
                              "gradient"
            continue
        assert g is not None, f"{where}: no gradient for '{name}'"
        assert g.shape == w.shape, (where, name)
        g64 = g.detach().double()
        assert torch.isfinite(g64).all(), f"{where}: non-finite gradient for '{name}'"
        err = float((g64 - w).abs().max()) if w.numel() else 0.0
        bound = tol * (float(w.abs().max()) + 1.0) if w.numel() else 0.0
        assert err <= bound, f"{where}: d{name} differs from the oracle by {err:.3g} > {bound:.3g}"


def check_call(pat, tensors, batch, heads, kv_heads, q_len, kv_len, backend,
               dtype=torch.float32, seed=0, with_lse=True, scale=None) -> dict:
    q, k, v, given_, dout, dlse = make_call(pat, tensors, batch, heads, kv_heads, q_len,
                                            kv_len, dtype, seed)
    dlse = dlse if with_lse else None
    got = backend_grads(pat, q, k, v, given_, dout, dlse, backend, scale)
    for name in ("q", "k", "v"):
        assert got[name].dtype == dtype
    want = reference_grads(pat, q, k, v, dout, dlse, scale=scale, **given_)
    where = f"{pat.name} {backend} {dtype} B{batch} H{heads}/{kv_heads} {q_len}x{kv_len}"
    assert_grads_match(got, want, TOL[dtype], where)
    return got


# ----------------------------------------------------------------------------- every example


def _example_call(index: int, case):
    """The pattern, tensor inputs and sizes of one example's gradient check."""
    bind = case.binds[1] if len(case.binds) > 1 else case.binds[0]
    pat = attndsl.load(str(EXAMPLES / case.file))[case.pattern]
    pat = pat.bind(**bind) if bind else pat
    heads, kv_heads = (4, 2) if case.heads == MANY_HEADS else (2, 1)
    q_len, kv_len = SHAPES[index % len(SHAPES)]
    if case.inputs is not None and q_len > kv_len:      # inputs indexed by q need q >= 0
        q_len, kv_len = kv_len, q_len
    rng = np.random.default_rng(index)
    params = {**case.defaults, **bind}
    tensors = case.inputs(q_len, kv_len, heads, params, rng) if case.inputs else {}
    if "c" in tensors:                                   # routing centroids: [heads, 4, D]
        tensors["c"] = rng.standard_normal((heads, 4, D))
    return pat, tensors, heads, kv_heads, q_len, kv_len


EXAMPLE_PARAMS = [pytest.param(i, case, backend, id=f"{case.id}-{backend}")
                  for i, case in enumerate(CASES) for backend in BACKENDS]


@pytest.mark.parametrize("index,case,backend", EXAMPLE_PARAMS)
def test_example_gradients(index, case, backend):
    pat, tensors, heads, kv_heads, q_len, kv_len = _example_call(index, case)
    check_call(pat, tensors, 1, heads, kv_heads, q_len, kv_len, backend, seed=index)


@pytest.mark.parametrize("index,case", [pytest.param(i, c, id=c.id) for i, c in enumerate(CASES)])
def test_oracle_forward_is_the_reference(index, case):
    """The oracle's (out, lse) are the NumPy interpreter's (``pat.reference``) on each example."""
    pat, tensors, heads, kv_heads, q_len, kv_len = _example_call(index, case)
    q, k, v, given_, _, _ = make_call(pat, tensors, 2, heads, kv_heads, q_len, kv_len,
                                      torch.float64, seed=index)
    out, lse = reference_call(pat, q, k, v, **given_)
    ref_out, ref_lse = pat.reference(*(x.detach().numpy() for x in (q, k, v)), **tensors)
    assert_same_values(ref_out, out, tol=1e-12)
    assert_same_values(ref_lse, lse, tol=1e-12)


def test_every_example_file_is_covered():
    files = {c.file for c in CASES}
    assert files == {p.name for p in EXAMPLES.glob("*.attn")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_input_gets_gradient_selector_input_gets_none(backend):
    rel_case = next(c for c in CASES if c.pattern == "clipped_relative_bias")
    pat, tensors, heads, kv_heads, q_len, kv_len = _example_call(0, rel_case)
    got = check_call(pat, tensors, 1, heads, kv_heads, q_len, kv_len, backend)
    assert got["rel"] is not None and got["rel"].abs().sum() > 0
    route_case = next(c for c in CASES if c.pattern == "routing")
    pat, tensors, heads, kv_heads, q_len, kv_len = _example_call(0, route_case)
    got = check_call(pat, tensors, 1, heads, kv_heads, q_len, kv_len, backend)
    assert "c" in got and got["c"] is None


# ----------------------------------------------------------------------------- focused checks


PROG = attndsl.compile("""
pattern causal_p:
    mask = causal
pattern softcap(cap = 2.0):
    mask = causal and sliding(20)
    score = cap * tanh(score / cap)
pattern rel_bias(rel: float[][]):
    mask = causal
    score = score + rel[h, clamp(q - k, 0, 5)]
pattern late(start = 30):
    mask = causal and q >= start
pattern holes:
    mask = full
    score = score if q % 3 != 0 else -inf
pattern sqrt_bias(b: float[]):
    mask = causal
    score = score + b[k] * sqrt(float(q - k))
""", filename="<backward>")


def _rel(heads):
    return {"rel": np.random.default_rng(7).standard_normal((heads, 6))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, dtype):
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 calls differentiate on the torch backend (the kernels hold float32)")
    for name in ("softcap", "rel_bias"):
        pat = PROG[name]
        tensors = _rel(4) if name == "rel_bias" else {}
        check_call(pat, tensors, 2, 4, 2, 29, 43, backend, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,kv_len", [(13, 70), (70, 13), (1, 33), (33, 1), (64, 64)])
def test_gqa_and_lengths(backend, q_len, kv_len):
    check_call(PROG["causal_p"], {}, 1, 4, 1, q_len, kv_len, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_only_loss(backend):
    check_call(PROG["softcap"], {}, 1, 2, 2, 40, 40, backend, with_lse=False, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,q_len,kv_len", [("late", 50, 50), ("holes", 40, 25),
                                               ("causal_p", 50, 20)])
def test_rows_without_keys_get_zero_gradient(backend, name, q_len, kv_len):
    pat = PROG[name]
    q, k, v, _, dout, dlse = make_call(pat, {}, 1, 2, 1, q_len, kv_len)
    out, lse = pat(q, k, v, return_lse=True, backend=backend)
    empty = torch.isneginf(lse)                         # [B, H, Lq]
    assert empty.any() and not empty.all()
    got = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    for g in got:
        assert torch.isfinite(g).all()
    assert (got[0][empty] == 0).all()
    assert got[0][~empty].abs().sum() > 0
    want = reference_grads(pat, q, k, v, dout, dlse)
    assert_grads_match(dict(zip("qkv", got)), want, TOL[torch.float32], f"{name} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_derivative_not_finite_at_disallowed_pairs(backend):
    """d(score clause) is NaN at the pairs the mask rules out (sqrt of q - k < 0): dS_raw is
    0 there, never 0 * NaN, so every gradient is finite and the oracle's."""
    b = np.random.default_rng(5).standard_normal(40)
    got = check_call(PROG["sqrt_bias"], {"b": b}, 1, 2, 1, 33, 40, backend)
    assert got["b"] is not None and got["b"].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_broadcast_tensor_input(backend):
    pat = PROG["rel_bias"]
    rel = _rel(2)["rel"]
    shared = check_call(pat, {"rel": rel}, 2, 2, 1, 21, 30, backend, seed=3)
    per_batch = check_call(pat, {"rel": np.stack([rel, rel])}, 2, 2, 1, 21, 30, backend, seed=3)
    assert shared["rel"].shape == rel.shape and per_batch["rel"].shape == (2,) + rel.shape
    # the same call: the shared input's gradient is the sum of the per-batch ones
    torch.testing.assert_close(shared["rel"], per_batch["rel"].sum(0), rtol=1e-5, atol=1e-5)
    for name in "qkv":
        torch.testing.assert_close(shared[name], per_batch[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    pat = PROG["rel_bias"]
    runs = []
    for _ in range(2):
        q, k, v, tensors, dout, dlse = make_call(pat, _rel(4), 2, 4, 2, 37, 58, seed=11)
        runs.append(backend_grads(pat, q, k, v, tensors, dout, dlse, backend))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"{backend}: d{name} differs"


# ----------------------------------------------------------------------------- random patterns


MASKS = ["causal", "sliding(7)", "k % 3 != 1 or q == k", "q >= k + 2", "full",
         "chunked(5) and causal", "dilated(4, 2)", "band(3) or sinks(2)"]
SCORES = [None, "score * 0.5", "3.0 * tanh(score / 3.0)", "score - 0.1 * float(q - k)",
          "score + b[k]", "score if (q + k) % 4 != 0 else -inf", "sigmoid(score) * 2.0",
          "score + 0.25 * float(h)", "score * b[k] + b[q % kv_len]"]


@st.composite
def random_calls(draw):
    mask, score = draw(st.sampled_from(MASKS)), draw(st.sampled_from(SCORES))
    src = f"pattern r{'(b: float[])' if score and 'b[' in score else ''}:\n    mask = {mask}\n"
    if score:
        src += f"    score = {score}\n"
    heads, kv_heads = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (2, 2)]))
    q_len, kv_len = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    batch = draw(st.sampled_from([1, 2]))
    backend = draw(st.sampled_from(BACKENDS))
    seed = draw(st.integers(0, 2 ** 16))
    return src, heads, kv_heads, q_len, kv_len, batch, backend, seed


@settings(max_examples=examples(40), deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(random_calls())
def test_random_patterns(call):
    src, heads, kv_heads, q_len, kv_len, batch, backend, seed = call
    pat = attndsl.compile(src, filename="<random>")["r"]
    tensors = {}
    if "b" in pat.tensor_params:
        tensors["b"] = np.random.default_rng(seed).standard_normal(kv_len)
    check_call(pat, tensors, batch, heads, kv_heads, q_len, kv_len, backend, seed=seed)
