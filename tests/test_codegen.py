"""Generated Triton kernels against the reference: every example, run by Triton's
interpreter on the CPU (natively where a GPU is present), plus lowering and cache properties."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import EXAMPLES

import attndsl
from attndsl.ir import Op

CUDA = torch.cuda.is_available()
BACKEND = "triton" if CUDA else "triton-interpret"
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def _docs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, 4, n))


def _tensors(pat, kv_len: int, heads: int, d: int = 16) -> dict:
    out = {}
    for p in pat.ir.params:
        if not p.is_tensor:
            continue
        if p.type.elem.value == "bool":                      # flags (global tokens): every 5th
            out[p.name] = np.arange(kv_len) % 5 == 0
            continue
        if p.type.elem.value == "int" and p.type.rank == 3:  # block lists [heads, q block, j]
            sel = np.random.default_rng(4).integers(-1, 4, (heads, kv_len, 16))
            sel[..., 0] = np.arange(kv_len)                  # its own block first
            out[p.name] = sel
            continue
        if p.type.rank == 1 and p.type.elem.value == "int":
            if p.name.endswith("start"):
                docs = out.get("doc", _docs(kv_len, 1))
                out[p.name] = np.array([int(np.argmax(docs == d)) for d in range(docs.max() + 1)])
            else:
                out[p.name] = _docs(kv_len, 1)
        elif p.type.rank == 1:
            out[p.name] = np.random.default_rng(2).standard_normal(2 * kv_len + 1)
        elif p.type.rank == 3:                               # route centroids [heads, C, D]
            out[p.name] = np.random.default_rng(3).standard_normal((heads, 4, d))
        else:
            out[p.name] = np.random.default_rng(2).standard_normal((heads, 2 * kv_len + 1))
    return out


def _examples():
    for path in sorted(EXAMPLES.glob("*.attn")):
        for pat in attndsl.load(path):
            yield pytest.param(pat, id=f"{path.stem}:{pat.name}")


def _small(pat):
    small = {"window": 7, "w": 6, "g": 3, "block": 4, "chunk": 16, "segment": 16, "width": 8,
             "height": 5, "kernel": 3, "n_sinks": 2, "prefix_len": 9, "stride": 8, "summary": 2,
             "dilation": 3, "max_dist": 5}
    return pat.bind(**{k: v for k, v in small.items() if k in pat.values})


def _check(pat, batch, heads, kv_heads, q_len, kv_len, d, dtype=torch.float32, tol=2e-5):
    g = torch.Generator().manual_seed(q_len * 7 + kv_len)
    q = torch.randn(batch, heads, q_len, d, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, d, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, d, generator=g)
    tensors = _tensors(pat, kv_len, heads, d)
    out, lse = pat(q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype),
                   return_lse=True, backend=BACKEND, **tensors)
    ref_out, ref_lse = pat.reference(q.to(dtype).double().numpy(), k.to(dtype).double().numpy(),
                                     v.to(dtype).double().numpy(), **tensors)
    out, lse = out.double().cpu().numpy(), lse.double().cpu().numpy()
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert not np.isnan(out).any()
    scale = np.abs(ref_out).max() + 1
    assert np.abs(out - ref_out).max() <= tol * scale, np.abs(out - ref_out).max()
    fin = np.isfinite(ref_lse)
    assert np.abs(lse[fin] - ref_lse[fin]).max(initial=0) <= tol * (np.abs(ref_lse[fin]).max(initial=0) + 1)


@pytest.mark.parametrize("pat", list(_examples()))
def test_every_example_matches_the_reference(pat):
    pat = _small(pat)
    heads = 4 if pat.ir.mask.uses(Op.H) else 2
    _check(pat, 1, heads, heads // 2, 37, 45, 16)          # GQA 2, q_len < kv_len, ragged tiles


@pytest.mark.parametrize("q_len,kv_len,heads,kv_heads,d", [
    (1, 50, 4, 1, 24), (33, 33, 2, 2, 64), (50, 17, 2, 1, 16)])
def test_shapes_decode_gqa_head_dims_and_empty_rows(q_len, kv_len, heads, kv_heads, d):
    pat = attndsl.compile("pattern p(w = 5):\n    mask = causal and (sinks(2) or sliding(w))\n")["p"]
    _check(pat, 2, heads, kv_heads, q_len, kv_len, d)       # 50 x 17: rows before key 0 are empty


def test_bfloat16_and_documents_in_a_batch():
    pat = attndsl.load(EXAMPLES / "packed_documents.attn")["packed"]
    _check(pat, 2, 2, 1, 40, 40, 16, dtype=torch.bfloat16, tol=3e-2)


def test_user_identifiers_never_reach_the_source():
    src = ("pattern p(tl = 3, torch = 2, acc = 1, BLOCK_M = 4, doc: int[]):\n"
           "    mask = causal and q - k < tl + torch + acc + BLOCK_M and doc[q] == doc[k]\n")
    pat = attndsl.compile(src)["p"]
    text = pat.triton_source()
    hook = text[text.index("def mask_hook"):text.index("the kernel skeleton")]
    for name in ("torch", "acc", "BLOCK_M", "doc"):
        assert name not in hook
    _check(pat, 1, 2, 2, 30, 30, 16)


def test_every_op_has_a_lowering_rule():
    from attndsl.codegen.lower import TRITON_RULES

    assert set(TRITON_RULES) == set(Op)


def test_cache_writes_real_files_and_regenerates_corrupt_entries(tmp_path, monkeypatch):
    from attndsl.codegen import cache

    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    pat = attndsl.compile("pattern p:\n    mask = causal\n")["p"]
    body = pat.triton_source()
    interpret = not CUDA
    module = cache.load_module(body, interpret)
    path = tmp_path / (module.__name__ + ".py")
    assert path.is_file() and module.__file__ == str(path)
    # a truncated entry is detected and written again (in a new process: drop the loaded one)
    path.write_text(path.read_text()[:40])
    cache._LOADED.pop(str(path))
    again = cache.load_module(body, interpret)
    assert path.read_text().endswith(body) and hasattr(again, "mask_hook")
    assert hasattr(again, "attn_fwd")           # the whole kernel is in the module
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_selectors_read_the_reference_selection_per_batch_element():
    # the selection depends on each batch element's q and k: two different ones in one call
    src = "pattern m(n = 2, b = 8):\n    mask = causal and (topk_blocks(n, b) or q // b == k // b)\n"
    _check(attndsl.compile(src)["m"], 2, 2, 1, 40, 40, 16)


@pytest.mark.skipif(CUDA, reason="checks the CPU-only error")
def test_triton_backend_needs_cuda_tensors():
    pat = attndsl.compile("pattern p:\n    mask = causal\n")["p"]
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(attndsl.AttnCallError, match="triton-interpret"):
        pat(q, q, q, backend="triton")
    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("d,dv", [(80, 80), (96, 64), (192, 32)])
def test_head_dims_that_are_not_powers_of_two(d, dv):
    pat = attndsl.compile("pattern p:\n    mask = causal and sliding(9)\n")["p"]
    g = torch.Generator().manual_seed(d)
    q = torch.randn(1, 2, 20, d, generator=g)
    k = torch.randn(1, 2, 20, d, generator=g)
    v = torch.randn(1, 2, 20, dv, generator=g)
    out, lse = pat(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), return_lse=True, backend=BACKEND)
    ref, ref_lse = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy())
    assert out.shape == (1, 2, 20, dv)
    assert np.abs(out.double().cpu().numpy() - ref).max() <= 2e-5 * (np.abs(ref).max() + 1)
    assert np.abs(lse.double().cpu().numpy() - ref_lse).max() <= 2e-5 * (np.abs(ref_lse).max() + 1)


def test_non_contiguous_inputs_are_read_through_their_strides():
    pat = attndsl.compile("pattern p:\n    mask = causal\n    score = score * 0.5\n")["p"]
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 30, 3, 2, 32, generator=g)         # [B, L, (q|k|v), H, D]
    q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out, lse = pat(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), return_lse=True, backend=BACKEND)
    ref, _ = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy())
    assert np.abs(out.double().cpu().numpy() - ref).max() <= 2e-5 * (np.abs(ref).max() + 1)


def test_kernels_have_a_backward_equal_to_the_torch_backends():
    pat = attndsl.compile("pattern p:\n    mask = causal and sliding(5)\n")["p"]
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(1, 2, 21, 16, generator=g).to(DEVICE) for _ in range(3)]
    grads = []
    for backend in (BACKEND, "torch" if DEVICE == "cpu" else BACKEND):
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        pat(q, k, v, backend=backend).square().sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
