"""32-bit hooks (codegen/narrow.py, lower.py ``narrow``): used exactly where interval analysis
proves every integer of the call fits in int32, never where one could overflow, and equal to
the 64-bit hooks wherever they run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attndsl.codegen import aot, narrow
from attndsl.codegen import plan as planning

import attndsl
from attndsl.runtime import launches


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def _hook(pat, q_len, kv_len, given=None) -> str:
    q = torch.zeros(1, 2, q_len, 16)
    k = torch.zeros(1, 2, kv_len, 16)
    (launch,), _ = launches(pat.bound(), q, k, k, 0.25, given)
    return launch.constants["MASK_FN"].fn.__name__


@pytest.mark.parametrize("src,kv_len,given,name", [
    ("pattern p():\n    mask = causal\n", 64, None, "mask_hook32"),
    ("pattern p(w = 8):\n    mask = causal and (sinks(2) or sliding(w))\n", 64, None, "mask_hook32"),
    ("pattern p():\n    mask = q * 100000 >= k * 100000\n", 30000, None, "mask_hook"),   # 3e9
    ("pattern p():\n    mask = q * 100000 >= k * 100000\n", 20000, None, "mask_hook32"),  # 2e9
    ("pattern p(doc: int[]):\n    mask = doc[q] == doc[k]\n", 64, {"doc": np.arange(64) // 9},
     "mask_hook32"),
    ("pattern p(doc: int[]):\n    mask = doc[q] == doc[k]\n", 64,
     {"doc": np.arange(64) * 2 ** 33}, "mask_hook"),                  # ids past int32
    ("pattern p(n = 2, b = 16):\n    mask = causal and topk_blocks(n, b)\n", 64, None, "mask_hook32"),
])
def test_which_hooks_a_call_runs(src, kv_len, given, name):
    pat = attndsl.compile(src)["p"].bind()
    assert _hook(pat, 1, kv_len, given) == name


def test_narrowing_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("ATTNDSL_NARROW", "0")
    assert _hook(attndsl.compile("pattern p():\n    mask = causal\n")["p"], 8, 8) == "mask_hook"


def _run(pat, q_len, kv_len):
    g = torch.Generator().manual_seed(kv_len)
    q = torch.randn(1, 1, q_len, 16, generator=g)
    k, v = (torch.randn(1, 1, kv_len, 16, generator=g) for _ in range(2))
    out = pat(q, k, v, backend="triton-interpret").double().numpy()
    ref = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy())[0]
    return np.abs(out - ref).max()


@pytest.mark.slow                   # two interpreted calls at 30000 keys (~7 s)
def test_the_proof_is_what_keeps_results_right(monkeypatch):
    """At 30000 keys, k * 100000 overflows int32: the call runs the int64 hooks and matches the
    reference; forcing the int32 hooks gives a different answer (so the proof matters)."""
    src = "pattern p():\n    mask = (k * 100000) % 7 < 3\n"
    assert _run(attndsl.compile(src)["p"], 1, 30000) < 1e-5
    monkeypatch.setattr(planning, "fits_int32", lambda *a, **k: True)
    attndsl.caches.clear()              # the plan of this call is kept: make it again
    assert _run(attndsl.compile(src)["p"], 1, 30000) > 1e-3


@pytest.mark.parametrize("name", ["sliding_window.attn", "bigbird.attn", "packed_documents.attn"])
def test_int32_and_int64_hooks_agree(name, monkeypatch):
    from conftest import EXAMPLES
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ATTNDSL_NARROW", flag)
        pat = list(attndsl.load(EXAMPLES / name))[0]
        pat = pat.bind(**{k: v for k, v in {"window": 20, "block": 16}.items() if k in pat.values})
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(3))
        given = {"doc": np.arange(70) // 23} if pat.tensor_params else {}
        results.append(pat(q, k, v, backend="triton-interpret", **given))
    assert torch.equal(results[0], results[1])


def test_both_hook_widths_compile_for_a_gpu(monkeypatch):
    jobs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ATTNDSL_NARROW", flag)
        pat = attndsl.compile("pattern p(w = 64):\n    mask = causal and sliding(w)\n")["p"]
        jobs += aot.pattern_jobs(pat, aot.Call(dtype="bf16", head_dim=64), ["sm_90"])
    assert {job["hooks"]["MASK_FN"] for job in jobs} == {"mask_hook32", "mask_hook"}
    reports = aot.compile_jobs(jobs, processes=2)
    assert all(r["ok"] for rs in reports for r in rs), reports


def test_fits_int32_rejects_huge_tensors():
    assert not narrow.fits_int32([], {}, (4, 4, 1, 1), [{"t": np.broadcast_to(np.int8(0), (2 ** 31,))}])
