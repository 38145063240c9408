"""The Triton backward kernels (codegen/skeleton_bwd.py, codegen/backward.py) against a dense
float64 autograd reference written here: plain, banded, gathered (residue classes, groups whose
key rows overlap), merged launches, score clauses, int tensor inputs per batch element, GQA,
q_len != kv_len both ways, ragged lengths, rows without keys, every float dtype, a gradient
flowing into lse, determinism; and the transposed tile tables (codegen/tile_tables.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from attndsl.codegen import backend
from attndsl.codegen import backward as bwd
from attndsl.codegen.config import DEFAULT_CONFIG
from attndsl.codegen.tile_tables import classes_of, from_classes, transposed

import attndsl
from attndsl import runtime
from attndsl.bound import call_grids
from attndsl.reference import dense_mask

CUDA = torch.cuda.is_available()
BACKEND = "triton" if CUDA else "triton-interpret"
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.float64: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def _pattern(src: str):
    prog = attndsl.compile(src)
    return prog[prog.patterns[0]]


def _softcap(cap):
    return lambda s, h, qp, kp: cap * torch.tanh(s / cap)


def _alibi(heads, max_bias=8.0):
    def score(s, h, qp, kp):
        slope = 2.0 ** (-max_bias * (h + 1).double() / heads)
        return s - slope * (qp - kp).double()
    return score


def reference(pat, q, k, v, dout, dlse, tensors, score=None):
    """(dq, dk, dv) float64 of the loss <out, dout> + <lse, dlse> (lse -inf rows count 0):
    the mask from the pattern's NumPy interpreter (attndsl.reference.dense_mask), the score
    clause as the torch function ``score(s, h, q, k)``, a masked softmax, autograd."""
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(q.shape[-1])
    grids = call_grids(pat.bound(), (batch, heads, kv_heads, q_len, kv_len), None, None, scale,
                       tensors)
    mask = torch.as_tensor(np.stack([dense_mask(g) for g in grids]))
    qq, kk, vv = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    group = heads // kv_heads
    s = scale * qq @ kk.repeat_interleave(group, 1).transpose(-1, -2)
    if score is not None:
        h = torch.arange(heads)[:, None, None]
        qp = torch.arange(q_len)[None, :, None] + (kv_len - q_len)
        kp = torch.arange(kv_len)[None, None, :]
        s = score(s, h, qp, kp)
    allowed = mask & (s.detach() != -torch.inf)
    m = torch.where(allowed, s.detach(), -torch.inf).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.where(allowed, torch.exp(torch.where(allowed, s, 0.0) - m), 0.0)
    total = e.sum(-1)
    has = total > 0
    lse = torch.where(has, m[..., 0] + torch.log(torch.where(has, total, 1.0)), 0.0)
    out = (e / torch.where(has, total, 1.0)[..., None]) @ vv.repeat_interleave(group, 1)
    loss = (out * dout.cpu().double()).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.cpu().double()).sum()
    loss.backward()
    return qq.grad, kk.grad, vv.grad


def _inputs(batch, heads, kv_heads, q_len, kv_len, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in (
        (batch, heads, q_len, d), (batch, kv_heads, kv_len, d), (batch, kv_heads, kv_len, d),
        (batch, heads, q_len, d), (batch, heads, q_len))]


def grads(pat, q, k, v, dout, dlse, tensors=None):
    """The Triton backend's (out, lse) and (dq, dk, dv), and its plan."""
    call, data = runtime.bind(pat.bound(), q, k, v, True, None, BACKEND, tensors or {})
    out, lse = backend.forward(call, data, q, k, v, DEFAULT_CONFIG)
    planned, _ = backend.generate(call, data, q, k, DEFAULT_CONFIG)
    return (out, lse), backend.backward(call, data, q, k, v, out, lse, dout, dlse), planned


def check(pat, batch=1, heads=2, kv_heads=1, q_len=37, kv_len=45, dtype=torch.float32,
          tensors=None, score=None, with_dlse=True, d=16):
    """Gradients within the forward tests' tolerances of the reference; the plan returned."""
    q, k, v, dout, dlse = _inputs(batch, heads, kv_heads, q_len, kv_len, d)
    q, k, v, dout = (x.to(DEVICE, dtype) for x in (q, k, v, dout))
    dlse = dlse.to(DEVICE) if with_dlse else None
    _, got, planned = grads(pat, q, k, v, dout, dlse, tensors)
    want = reference(pat, q, k, v, dout, dlse, tensors or {}, score)
    for name, x, ref, like in zip("qkv", got, want, (q, k, v)):
        assert x.dtype == like.dtype and x.shape == like.shape, name
        x = x.double().cpu()
        assert not torch.isnan(x).any(), name
        err = (x - ref).abs().max().item()
        assert err <= TOL[dtype] * (ref.abs().max().item() + 1), (name, err)
    return planned


CAUSAL = "pattern p:\n    mask = causal\n"
WINDOW = "pattern p:\n    mask = causal and sliding(9)\n"
DILATED = "pattern p(window = 5, dilation = 3):\n    mask = dilated(window, dilation)\n"


@pytest.mark.parametrize("q_len,kv_len", [(37, 45), (70, 70), (50, 17), (130, 61)])
def test_causal_gqa_lengths_both_ways(q_len, kv_len):
    # 50 x 17 and 130 x 61: the first rows have no key (zero gradients); 130: five query tiles
    check(_pattern(CAUSAL), 1, 2, 1, q_len, kv_len)


def test_sliding_window_gqa_4_2_batch_two():
    check(_pattern(WINDOW), 2, 4, 2, 70, 70)


@pytest.mark.parametrize("gather", ["1", "0"])
def test_dilated_gathered_and_not(gather, monkeypatch):
    monkeypatch.setenv("ATTNDSL_GATHER", gather)
    planned = check(_pattern(DILATED), 1, 2, 1, 70, 70)
    kinds = [lp.kind for lp in planned.launches]
    assert kinds == (["gather"] if gather == "1" else ["tiles"])


def test_groups_with_overlapping_key_rows_write_their_own_slices():
    # three live residues of four: group g reads key classes g, g+1, g+2 (runs of 3)
    pat = _pattern("pattern p:\n    mask = causal and q - k < 40 and (q - k) % 4 != 3\n")
    planned = check(pat, 1, 2, 1, 45, 45)
    (lp,) = planned.launches
    assert lp.tiles.run_k == 3 and lp.tiles.n_groups == 4
    assert not bwd.disjoint_keys(lp.tiles.groups.cpu().numpy(), lp.tiles.step_k,
                                 lp.tiles.run_k, 45)


def test_merged_launches_sum_their_gradients():
    pat = _pattern("pattern p(window = 5, dilation = 3):\n"
                   "    mask = dilated(window, dilation) or k < 3\n")
    planned = check(pat, 1, 2, 1, 37, 45)
    assert planned.merged and {lp.kind for lp in planned.launches} == {"tiles", "gather"}


def test_softcap_score_clause():
    pat = _pattern("pattern p(cap = 5.0):\n    mask = causal and sliding(20)\n"
                   "    score = cap * tanh(score / cap)\n")
    check(pat, 1, 2, 1, 45, 45, score=_softcap(5.0))


def test_alibi_identity_derivative():
    pat = _pattern("pattern alibi(max_bias = 8.0):\n"
                   "    let slope = 2.0 ** (-max_bias * float(h + 1) / float(heads))\n"
                   "    mask = causal\n    score = score - slope * float(q - k)\n")
    check(pat, 1, 4, 2, 37, 45, score=_alibi(4))


def test_documents_per_batch_element():
    docs = np.sort(np.random.default_rng(1).integers(0, 4, (2, 45)), axis=1)
    pat = _pattern("pattern p(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n")
    check(pat, 2, 2, 1, 45, 45, tensors={"doc": docs})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    check(_pattern(WINDOW), 1, 2, 1, 37, 45, dtype=dtype)


def test_without_dlse_and_head_dim_not_a_power_of_two():
    check(_pattern(CAUSAL), 1, 2, 2, 33, 33, with_dlse=False, d=24)


def test_rows_without_keys_get_exact_zeros_and_runs_are_bit_identical():
    pat = _pattern("pattern p:\n    mask = causal and k > 40\n")      # rows below 40: no key
    q, k, v, dout, dlse = (x.to(DEVICE) for x in _inputs(1, 2, 1, 50, 50))
    (_, lse), first, _ = grads(pat, q, k, v, dout, dlse)
    _, second, _ = grads(pat, q, k, v, dout, dlse)
    empty = torch.isneginf(lse)
    assert empty[:, :, :41].all() and not empty[:, :, 41:].any()
    dq, dk, dv = first
    assert (dq[:, :, :41] == 0).all() and (dk[:, :, :41] == 0).all() and (dv[:, :, :41] == 0).all()
    assert all(torch.isfinite(x).all() for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert dq[:, :, 41:].abs().sum() > 0 and dk[:, :, 41:].abs().sum() > 0


def test_empty_calls_give_zero_gradients():
    pat = _pattern(CAUSAL)
    q, k, v, dout, dlse = (x.to(DEVICE) for x in _inputs(1, 2, 1, 5, 0))
    _, (dq, dk, dv), _ = grads(pat, q, k, v, dout, dlse)
    assert dq.shape == q.shape and (dq == 0).all() and dk.shape == k.shape


def test_dump_names_the_backward_launches(monkeypatch, capsys):
    monkeypatch.setenv("ATTNDSL_DUMP", "launch")
    q, k, v, dout, dlse = (x.to(DEVICE) for x in _inputs(1, 2, 1, 20, 20))
    grads(_pattern(CAUSAL), q, k, v, dout, dlse)
    err = capsys.readouterr().err
    for name in ("attn_bwd_preprocess", "attn_bwd_dq", "attn_bwd_dkdv"):
        assert f"{name}[" in err


# ------------------------------------------------------------------- transposed tables
def _random_classes(seed, shape=(2, 1, 3, 5, 7), band=False):
    rng = np.random.default_rng(seed)
    if band:        # causal-like: full below the diagonal, partial on it
        n_q, n_k = shape[-2:]
        i, j = np.arange(n_q)[:, None], np.arange(n_k)[None, :]
        one = np.where(j < i, 2, np.where(j == i, 1, 0))
        return torch.as_tensor(np.broadcast_to(one, shape).astype(np.int8).copy())
    return torch.as_tensor(rng.integers(0, 3, shape).astype(np.int8))


@pytest.mark.parametrize("band", [False, True])
def test_transposed_tables_walk_the_same_tiles(band):
    classes = _random_classes(3, band=band)
    tiles = from_classes(classes, [(0, 40, 0, 56)])
    assert tiles.band == band
    t = transposed(tiles, classes.shape[-1])
    assert torch.equal(t.classes, classes.transpose(-1, -2))
    assert t.n_query_tiles == classes.shape[-1]
    # from the tables alone (as codegen/device_tiles.py builds them: no classes kept)
    bare = dataclasses.replace(tiles, classes=None)
    assert torch.equal(classes_of(bare, classes.shape[-1]), classes)
    again = transposed(bare, classes.shape[-1])
    assert torch.equal(again.full_num, t.full_num) and torch.equal(again.part_num, t.part_num)


def test_disjoint_keys():
    assert bwd.disjoint_keys([(0, 10, 0, 10)], 1, 1, 10)
    assert bwd.disjoint_keys([(0, 4, 0, 4), (1, 3, 1, 3), (2, 3, 2, 3)], 3, 1, 10)
    assert not bwd.disjoint_keys([(0, 4, 0, 4), (1, 3, 1, 3)], 3, 2, 10)
