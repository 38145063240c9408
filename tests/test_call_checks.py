"""Call checks (issue 14, item 8): every misuse of a call from Python is an ``AttnCallError``
naming the argument, raised before any kernel runs; nothing else escapes a public method.

A table of misuses per entry point (``pat(...)``, ``reference``, ``dense_mask``, ``block_map``,
``describe``, ``bind``, ``Program[...]``), each asserting the error class, the argument's name
in the message and that no internal module name leaks into it; inputs that look unusual but are
valid (non-contiguous, expanded, negative-strided, NumPy scalars, bfloat16 tensor inputs) must
work and agree with the reference; and a hypothesis test throwing junk at every keyword.
"""

from __future__ import annotations

import os
import re
import warnings

import attndsl.codegen.backend
import numpy as np
import pytest
import torch
from conftest import pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attndsl
import attndsl.runtime
from attndsl import AttnCallError, AttnError
from attndsl.inputs import MAX_LENGTH

SRC = """\
pattern t(w = 4, x = 0.5, b = false, doc: int[], f: float[]):
    mask = (b or causal) and sliding(w) and doc[q] == doc[k]
    score = score + x * f[k]
"""
SELECT = "pattern z:\n    mask = topk_blocks(2, 4)\n"
N, D = 4, 8
TOO_LONG = MAX_LENGTH + 1
# what must not show in a message: our module paths, Python's own exception names
LEAK = re.compile(r"attndsl|codegen|\.py\b|Traceback|\b(runtime|inputs|program|blocks|analysis|"
                  r"interp|torch_backend|kernel|skeleton)\.\w|Error\b|ufunc|numpy\.")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pat():
    return pattern(SRC)


def qkv(batch=1, heads=1, kv_heads=1, q_len=N, kv_len=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, heads, q_len, D, generator=g).to(dtype),
            torch.randn(batch, kv_heads, kv_len, D, generator=g).to(dtype),
            torch.randn(batch, kv_heads, kv_len, D, generator=g).to(dtype))


def inputs(n=N):
    return {"doc": torch.zeros(n, dtype=torch.long), "f": torch.linspace(-1.0, 1.0, n)}


def long_tensor(length):
    """A [1, 1, length, D] float32 tensor of any length: one element, expanded (stride 0)."""
    return torch.zeros(1, 1, 1, D).expand(1, 1, length, D)


def _kernel_ran(*args, **kwargs):
    raise AssertionError("a kernel ran before the call was rejected")


@pytest.fixture
def no_kernels(monkeypatch):
    """Any backend starting is a test failure (the checks run before any kernel)."""
    monkeypatch.setattr(attndsl.codegen.backend, "forward", _kernel_ran)
    monkeypatch.setattr(attndsl.runtime, "blockwise_attention", _kernel_ran, raising=False)


def _qkv_call(method, args: dict):
    args = dict(args)
    return method(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def call(**over):
    """pat(q, k, v, **tensor inputs) with some arguments replaced."""
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, **inputs(), **over}
    return lambda p: _qkv_call(p, args)


def ref(**over):
    """pat.reference(q, k, v, **tensor inputs) with some arguments replaced."""
    q, k, v = (t.numpy() for t in qkv())
    args = {"q": q, "k": k, "v": v, **{n: t.numpy() for n, t in inputs().items()}, **over}
    return lambda p: _qkv_call(p.reference, args)


def dense(**over):
    args = {"q_len": N, "kv_len": N, **inputs(), **over}
    return lambda p: p.dense_mask(**args)


def bmap(**over):
    args = {"q_len": N, "kv_len": N, "block": (2, 2), **inputs(), **over}
    return lambda p: p.block_map(**args)


def grad(t):
    return t.clone().requires_grad_(True)


def quantized(t):
    """``t`` as a qint8 tensor (torch warns that their creation functions are deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)


Q, K, V = qkv()
META = torch.zeros(1, 1, N, D, device="meta")
SPARSE = Q.to_sparse()
QUANT = quantized(Q)
INTERP = {"backend": "triton-interpret"}
CASES = [
    # pat(q, k, v, ...): q, k, v
    ("q-numpy", call(q=Q.numpy()), "q"),
    ("q-list", call(q=Q.tolist()), "q"),
    ("q-int", call(q=Q.long()), "q"),
    ("q-bool", call(q=Q.bool()), "q"),
    ("q-complex", call(q=Q.to(torch.complex64)), "q"),
    ("q-quantized", call(q=QUANT), "q"),
    ("q-sparse", call(q=SPARSE, k=K.to_sparse(), v=V.to_sparse()), "q"),
    ("q-meta", call(q=META, k=META, v=META, doc=inputs()["doc"].to("meta"),
                    f=inputs()["f"].to("meta")), "q"),
    ("q-meta-triton", call(q=META, k=META, v=META, doc=inputs()["doc"].to("meta"),
                           f=inputs()["f"].to("meta"), **INTERP), "q"),
    ("q-3d", call(q=Q[0]), "q"),
    ("k-dtype", call(k=K.double()), "k"),
    ("q-too-long", call(q=long_tensor(TOO_LONG)), "q"),
    ("k-too-long", call(k=long_tensor(TOO_LONG), v=long_tensor(TOO_LONG)), "k"),
    # pat(...): scale, backend, return_lse
    ("scale-nan", call(scale=float("nan")), "scale"),
    ("scale-inf", call(scale=float("inf")), "scale"),
    ("scale--inf", call(scale=-np.inf), "scale"),
    ("scale-huge-int", call(scale=2 ** 2000), "scale"),
    ("scale-str", call(scale="0.5"), "scale"),
    ("scale-complex", call(scale=0.5j), "scale"),
    ("scale-np-bool", call(scale=np.bool_(True)), "scale"),
    ("scale-tensor", call(scale=torch.tensor(0.5)), "scale"),
    ("backend-int", call(backend=3), "backend"),
    ("backend-list", call(backend=["torch"]), "backend"),
    ("backend-array", call(backend=np.array(["torch", "triton"])), "backend"),
    ("backend-name", call(backend="Torch"), "backend"),
    ("backend-triton-on-cpu", call(backend="triton"), "backend"),
    ("return_lse-str", call(return_lse="no"), "return_lse"),
    ("return_lse-int", call(return_lse=1), "return_lse"),
    ("return_lse-none", call(return_lse=None), "return_lse"),
    # pat(...): tensor inputs
    ("f-sparse", call(f=inputs()["f"].to_sparse()), "f"),
    ("f-quantized", call(f=quantized(inputs()["f"])), "f"),
    ("f-meta", call(f=inputs()["f"].to("meta")), "f"),
    ("f-bool", call(f=torch.ones(N, dtype=torch.bool)), "f"),
    ("f-complex", call(f=inputs()["f"].to(torch.complex64)), "f"),
    ("f-str", call(f=np.array(["a"] * N)), "f"),
    ("f-object", call(f=[object()] * N), "f"),
    ("f-beyond-float32-triton", call(f=torch.full((N,), 1e300, dtype=torch.float64), **INTERP), "f"),
    ("doc-float", call(doc=torch.zeros(N)), "doc"),
    ("doc-nan-float", call(doc=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "doc"),
    ("doc-uint64-huge", call(doc=np.full(N, 2 ** 64 - 1, dtype=np.uint64)), "doc"),
    ("doc-uint64-huge-triton", call(doc=np.full(N, 2 ** 64 - 1, dtype=np.uint64), **INTERP), "doc"),
    ("doc-python-huge", call(doc=[2 ** 70] * N), "doc"),
    ("doc-missing", call(doc=None), "doc"),
    ("doc-wrong-rank", call(doc=torch.zeros(1, 1, N, dtype=torch.long)), "doc"),
    ("unknown-input", call(segment=torch.zeros(N)), "segment"),
    # reference
    ("ref-q-bool", ref(q=np.ones((1, 1, N, D), bool)), "q"),
    ("ref-q-complex", ref(q=np.ones((1, 1, N, D), complex)), "q"),
    ("ref-q-str", ref(q=np.full((1, 1, N, D), "a")), "q"),
    ("ref-v-object", ref(v=object()), "v"),
    ("ref-q-meta", ref(q=META), "q"),
    ("ref-q-sparse", ref(q=SPARSE), "q"),
    ("ref-q-quantized", ref(q=QUANT), "q"),
    ("ref-q-too-long", ref(q=np.broadcast_to(np.zeros(1), (1, 1, TOO_LONG, D))), "q"),
    ("ref-q-longdouble", ref(q=np.full((1, 1, N, D), np.longdouble("1e4000"))), "q"),
    ("ref-scale-nan", ref(scale=float("nan")), "scale"),
    ("ref-scale-huge", ref(scale=10 ** 400), "scale"),
    ("ref-f-longdouble", ref(f=np.full(N, np.longdouble("1e4000"))), "f"),
    ("ref-f-meta", ref(f=inputs()["f"].to("meta")), "f"),
    # dense_mask: lengths and heads
    ("q_len-float", dense(q_len=4.0), "q_len"),
    ("q_len-str", dense(q_len="4"), "q_len"),
    ("q_len-bool", dense(q_len=True), "q_len"),
    ("q_len-np-bool", dense(q_len=np.bool_(True)), "q_len"),
    ("q_len-negative", dense(q_len=-1), "q_len"),
    ("q_len-too-long", dense(q_len=TOO_LONG), "q_len"),
    ("q_len-beyond-int64", dense(q_len=2 ** 70), "q_len"),
    ("kv_len-uint64-max", dense(kv_len=np.uint64(2 ** 64 - 1)), "kv_len"),
    ("kv_len-none", dense(kv_len=None), "kv_len"),
    ("heads-zero", dense(heads=0), "heads"),
    ("heads-float", dense(heads=1.0), "heads"),
    ("heads-beyond-int64", dense(heads=2 ** 64), "heads"),
    ("kv_heads-bool", dense(kv_heads=True), "kv_heads"),
    ("kv_heads-huge", dense(heads=2, kv_heads=2 ** 63), "kv_heads"),
    ("dense-too-large", dense(q_len=MAX_LENGTH, kv_len=MAX_LENGTH, heads=MAX_LENGTH), "q_len"),
    ("dense-doc-float", dense(doc=np.zeros(N, np.float64)), "doc"),
    # dense_mask: query= / key=
    ("query-str", lambda _: pattern(SELECT).dense_mask(N, N, query=np.full((1, N, D), "a"),
                                                       key=np.ones((1, N, D))), "query"),
    ("query-complex", lambda _: pattern(SELECT).dense_mask(N, N, query=np.ones((1, N, D), complex),
                                                           key=np.ones((1, N, D))), "query"),
    ("query-bool", lambda _: pattern(SELECT).dense_mask(N, N, query=np.ones((1, N, D), bool),
                                                        key=np.ones((1, N, D))), "query"),
    ("query-meta", lambda _: pattern(SELECT).dense_mask(N, N, query=torch.ones(1, N, D, device="meta"),
                                                        key=np.ones((1, N, D))), "query"),
    ("query-shape", lambda _: pattern(SELECT).dense_mask(N, N, query=np.ones((1, N + 1, D)),
                                                         key=np.ones((1, N, D))), "query"),
    ("key-int-shape", lambda _: pattern(SELECT).dense_mask(N, N, query=np.ones((1, N, D)),
                                                           key=np.ones((2, N, D), int)), "key"),
    ("query-alone", lambda _: pattern(SELECT).dense_mask(N, N, query=np.ones((1, N, D))), "query"),
    # block_map / describe: block and sizes
    ("block-float", bmap(block=(16.5, 16)), "block"),
    ("block-bool", bmap(block=True), "block"),
    ("block-bool-pair", bmap(block=(True, 16)), "block"),
    ("block-str-pair", bmap(block=("16", 16)), "block"),
    ("block-str", bmap(block="16"), "block"),
    ("block-np-float", bmap(block=(np.float64(16), 16)), "block"),
    ("block-beyond-int64", bmap(block=(2 ** 70, 16)), "block"),
    ("block-too-long", bmap(block=(16, TOO_LONG)), "block"),
    ("block-zero", bmap(block=(0, 16)), "block"),
    ("block-triple", bmap(block=(16, 16, 16)), "block"),
    ("block-none", bmap(block=None), "block"),
    ("block-map-too-large", bmap(q_len=MAX_LENGTH, kv_len=MAX_LENGTH, heads=MAX_LENGTH,
                                 block=(1, 1)), "block"),
    ("block_map-q_len-beyond-int64", bmap(q_len=2 ** 70), "q_len"),
    ("block_map-heads-float", bmap(heads=2.0), "heads"),
    ("describe-kv_len-too-long", lambda p: p.describe(N, TOO_LONG, doc=inputs()["doc"],
                                                      f=inputs()["f"]), "kv_len"),
    ("describe-block-bool", lambda p: p.describe(N, N, block=(16, False), **inputs()), "block"),
    # bind
    ("bind-int-float", lambda p: p.bind(w=4.0), "w"),
    ("bind-int-str", lambda p: p.bind(w="4"), "w"),
    ("bind-int-bool", lambda p: p.bind(w=True), "w"),
    ("bind-int-huge", lambda p: p.bind(w=2 ** 70), "w"),
    ("bind-int-uint64", lambda p: p.bind(w=np.uint64(2 ** 64 - 1)), "w"),
    ("bind-int-tensor", lambda p: p.bind(w=torch.tensor(4)), "w"),
    ("bind-float-str", lambda p: p.bind(x="0.5"), "x"),
    ("bind-float-huge-int", lambda p: p.bind(x=2 ** 2000), "x"),
    ("bind-float-longdouble", lambda p: p.bind(x=np.longdouble("1e4000")), "x"),
    ("bind-float-complex", lambda p: p.bind(x=1j), "x"),
    ("bind-bool-int", lambda p: p.bind(b=1), "b"),
    ("bind-bool-str", lambda p: p.bind(b="true"), "b"),
    ("bind-unknown", lambda p: p.bind(zz=1), "zz"),
    ("bind-tensor-input", lambda p: p.bind(doc=np.zeros(N)), "doc"),
    # Program[...]
    ("program-list", lambda _: attndsl.compile(SRC)[["t"]], "pattern name"),
    ("program-missing", lambda _: attndsl.compile(SRC)["nope"], "nope"),
]


@pytest.mark.parametrize("case, name", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_misuse_is_a_call_error_naming_the_argument(pat, no_kernels, case, name):
    with pytest.raises(AttnCallError) as info:
        case(pat)
    message = info.value.message
    quoted = name if " " in name else f"'{name}'"
    assert quoted in message, message
    assert not LEAK.search(message), message
    assert str(info.value).startswith("error: ")


def test_case_names_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES)


def test_every_case_is_valid_once_its_argument_is_fixed(pat):
    # the table's baseline calls (no argument replaced) succeed: each case fails for its argument
    q, k, v = qkv()
    assert pat(q, k, v, **inputs(), backend="torch").shape == (1, 1, N, D)
    assert call()(pat).shape == (1, 1, N, D)
    assert ref()(pat)[0].shape == (1, 1, N, D)
    assert dense()(pat).shape == (1, N, N)
    assert bmap()(pat).shape == (1, 2, 2)
    assert pattern(SELECT).dense_mask(N, N, query=np.ones((1, N, D)), key=np.ones((1, N, D))).shape \
        == (1, N, N)


def test_contract_maximum_length_is_2_to_the_40():
    assert MAX_LENGTH == 2 ** 40
    pattern(SELECT.replace("topk_blocks(2, 4)", "causal")).dense_mask(MAX_LENGTH, 0)


def test_out_of_memory_is_a_call_error(pat, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(attndsl.reference, "dense_mask", no_memory)
    with pytest.raises(AttnCallError, match="'q_len'"):
        dense()(pat)
    from attndsl.analysis import api

    monkeypatch.setattr(api, "call_classes", no_memory)       # the analysis runs out of memory
    attndsl.caches.clear()
    with pytest.raises(AttnCallError, match="'q_len'"):
        bmap()(pat)
    with pytest.raises(AttnCallError, match="'kv_len'"):
        pat.describe(N, N, **inputs())


# ----------------------------------------------------------------------------- valid inputs


CUDA = torch.cuda.is_available()
KERNEL = "triton" if CUDA else "triton-interpret"       # the generated kernels, where they run


def _host(t):
    return t.detach().cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy()


def _agrees(pat, out, q, k, v, **given):
    want, _ = pat.reference(*(_host(t) for t in (q, k, v)), **{
        n: _host(t) if isinstance(t, torch.Tensor) else t for n, t in given.items()})
    np.testing.assert_allclose(_host(out), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", KERNEL])
def test_strided_and_expanded_inputs_work(pat, backend):
    dev = "cuda" if backend == "triton" else "cpu"
    base = torch.randn(2, 3, D, N * 2, generator=torch.Generator().manual_seed(1)).to(dev)
    q = base[:, :1, :, ::2].transpose(2, 3)                  # non-contiguous
    k = base[:1, 2:, :, :N].transpose(2, 3).expand(2, 1, N, D)   # stride 0 over the batch
    v = base[:, 1:2, :, 1::2].transpose(2, 3)
    assert not q.is_contiguous() and k.stride(0) == 0
    doc = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=dev)[::2]   # non-contiguous input
    f = torch.linspace(0, 1, N, device=dev)[None].expand(2, N)      # expanded batch dimension
    out = pat(q, k, v, doc=doc, f=f, backend=backend)
    _agrees(pat, out, q, k, v, doc=doc, f=f)
    neg = np.zeros(2 * N, np.int64)[::-2]                    # NumPy negative strides
    assert neg.strides[0] < 0
    out = pat(q, k, v, doc=neg, f=np.linspace(1, 0, N)[::-1], backend=backend)
    _agrees(pat, out, q, k, v, doc=neg, f=np.linspace(1, 0, N)[::-1])


@pytest.mark.parametrize("backend", ["torch", KERNEL])
def test_unusual_but_valid_argument_types_work(pat, backend):
    dev = "cuda" if backend == "triton" else "cpu"
    q, k, v = (t.to(dev) for t in qkv())
    doc = torch.zeros(N, dtype=torch.bool, device=dev)
    f = inputs()["f"].to(device=dev, dtype=torch.bfloat16)
    out, lse = pat(q, k, v, doc=doc, f=f, scale=np.float32(0.25), backend=np.str_(backend),
                   return_lse=np.bool_(True))
    assert lse.shape == (1, 1, N)
    _agrees(pat, out, q, k, v, doc=doc.long(), f=f.float(), scale=0.25)
    assert pat.dense_mask(np.int32(N), np.uint8(N), heads=np.int64(2), kv_heads=np.int8(1),
                          doc=[0] * N, f=[0.0] * N).shape == (2, N, N)
    assert pat.block_map(np.int64(N), N, block=np.array([2, 2]), **inputs()).shape == (1, 2, 2)


@pytest.mark.parametrize("backend", ["torch", "triton-interpret"])
def test_inputs_requiring_grad_are_accepted_on_every_backend(pat, backend):
    q, k, v = (grad(t) for t in qkv())
    f = grad(inputs()["f"])
    out = pat(q, k, v, doc=inputs()["doc"], f=f, backend=backend)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    # 'f' is read by the score clause: it gets a gradient (its values: tests/test_backward.py)
    assert f.grad is not None and f.grad.shape == f.shape
    with torch.no_grad():          # a tensor input requiring grad is fine without autograd
        pat(*qkv(), doc=inputs()["doc"], f=grad(inputs()["f"]))


# Regression test of the kernel owner's fix (issue 14, item 8): a float64 call documents a
# float64 lse on every backend (docs/language.md, "Meaning of a call"); the Triton path used
# to return float32.
@pytest.mark.parametrize("backend", ["torch", KERNEL])
def test_float64_call_returns_float64_lse_on_every_backend(pat, backend):
    dev = "cuda" if backend == "triton" else "cpu"
    q, k, v = (t.to(dev) for t in qkv(dtype=torch.float64))
    given = {n: t.to(dev) for n, t in inputs().items()}
    out, lse = pat(q, k, v, return_lse=True, backend=backend, **given)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    _, want = pat.reference(*(_host(t) for t in (q, k, v)), **{n: _host(t) for n, t in given.items()})
    np.testing.assert_allclose(_host(lse), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- junk, at random

SCALE = max(1, int(os.environ.get("ATTNDSL_PROPERTY_SCALE", "1")))
JUNK_SETTINGS = settings(max_examples=40 * SCALE, deadline=None, derandomize=SCALE == 1,
                         suppress_health_check=list(HealthCheck), database=None)

_sizes = st.one_of(st.integers(-3, 9), st.sampled_from([MAX_LENGTH + 1, 2 ** 63 - 1, 2 ** 63,
                                                          2 ** 64, 2 ** 70, -(2 ** 63), -(2 ** 70)]))
_scalars = st.one_of(
    st.none(), st.booleans(), _sizes, st.floats(), st.complex_numbers(max_magnitude=1e3),
    st.text(max_size=3), st.binary(max_size=2),
    st.sampled_from([np.int64(4), np.uint64(2 ** 64 - 1), np.float32(0.5), np.bool_(True),
                     np.longdouble("1e4000"), np.str_("torch"), "torch", "triton", "cuda",
                     object(), Ellipsis, slice(1), {}, set(), 2 ** 2000]))


def _tensor_junk():
    """Arrays and tensors of odd dtypes, layouts, devices and shapes (small)."""
    shapes = st.sampled_from([(), (N,), (1, N), (2, N), (N, N), (1, 1, N, D), (1, 2, N, D),
                              (1, 1, N + 1, D), (1, 1, N, 0), (0, 1, N, D)])
    np_dtypes = st.sampled_from([np.bool_, np.int8, np.uint64, np.int64, np.float16, np.float64,
                                 np.longdouble, np.complex128, "U1", "datetime64[D]", object])
    torch_dtypes = st.sampled_from([torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16,
                                    torch.bfloat16, torch.float32, torch.float64, torch.complex64])

    def numpy_array(shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def torch_tensor(shape, dtype, how):
        t = torch.zeros(shape, dtype=dtype)
        if how == "meta":
            return t.to("meta")
        if how == "sparse" and t.dim():
            return t.to_sparse()
        if how == "grad" and t.is_floating_point():
            return t.requires_grad_(True)
        if how == "quantized" and dtype == torch.float32:
            return quantized(t)
        if how == "expanded" and t.dim():
            return t[..., :1].expand(shape)
        if how == "strided" and t.dim() > 1:
            return t.transpose(-1, -2)
        return t

    hows = st.sampled_from(["plain", "meta", "sparse", "grad", "quantized", "expanded", "strided"])
    return st.one_of(st.builds(numpy_array, shapes, np_dtypes),
                     st.builds(torch_tensor, shapes, torch_dtypes, hows),
                     st.lists(st.one_of(st.integers(-2, 5), st.floats()), max_size=N + 1))


JUNK = st.one_of(_scalars, _tensor_junk(), st.tuples(_scalars, _scalars))


def _valid(method: str):
    q, k, v = qkv()
    return {
        "call": {"q": q, "k": k, "v": v, "return_lse": False, "scale": None, "backend": "torch",
                 **inputs()},
        "reference": {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "scale": None, **inputs()},
        "dense_mask": {"q_len": N, "kv_len": N, "heads": 2, "kv_heads": 1, **inputs()},
        "block_map": {"q_len": N, "kv_len": N, "heads": 2, "kv_heads": 1, "block": (2, 2), **inputs()},
        "bind": {"w": 3, "x": 0.25, "b": True},
    }[method]


def _check_result(method: str, result) -> None:
    if method == "call":
        out, lse = result if isinstance(result, tuple) else (result, None)   # return_lse=True
        assert isinstance(out, torch.Tensor) and out.dim() == 4
        assert lse is None or (isinstance(lse, torch.Tensor) and lse.shape == out.shape[:3])
    elif method == "reference":
        assert all(isinstance(r, np.ndarray) and r.dtype == np.float64 for r in result)
    elif method == "dense_mask":
        assert isinstance(result, np.ndarray) and result.dtype == bool and result.ndim == 3
    elif method == "block_map":
        assert isinstance(result, np.ndarray) and result.dtype == np.int8 and result.ndim == 3
    else:
        assert isinstance(result, attndsl.Pattern)


@pytest.mark.parametrize("method", ["call", "reference", "dense_mask", "block_map", "bind"])
@JUNK_SETTINGS
@given(data=st.data())
def test_junk_at_any_keyword_is_an_attn_error_or_a_result(method, data):
    pat = pattern(SRC)
    args = _valid(method)
    keyword = data.draw(st.sampled_from(sorted(args) + ["unknown_name"]), label="keyword")
    args[keyword] = data.draw(JUNK, label="value")
    fn = {"call": lambda **a: pat(a.pop("q"), a.pop("k"), a.pop("v"), **a),
          "reference": lambda **a: pat.reference(a.pop("q"), a.pop("k"), a.pop("v"), **a),
          "dense_mask": pat.dense_mask, "block_map": pat.block_map, "bind": pat.bind}[method]
    attndsl.codegen.backend.forward, saved = _kernel_ran, attndsl.codegen.backend.forward
    try:
        result = fn(**args)
    except AttnError as err:
        assert not LEAK.search(err.message), err.message
        return
    finally:
        attndsl.codegen.backend.forward = saved
    _check_result(method, result)


@JUNK_SETTINGS
@given(junk=JUNK)
def test_junk_as_a_whole_call_is_an_attn_error(junk):
    pat = pattern(SRC)
    for fn in (lambda: pat(junk, junk, junk), lambda: pat.reference(junk, junk, junk),
               lambda: pat.dense_mask(junk, junk), lambda: pat.block_map(junk, junk),
               lambda: pat.describe(N, N, block=junk, **inputs())):
        try:
            fn()
        except AttnError as err:
            assert not LEAK.search(err.message), err.message
