"""codegen/selection.py: the selector tables computed on the call's device (torch, float32, no host
synchronisation) equal codegen.tables.table_values (the float64 reference of
attndsl.selectors) in shape, meaning and dtype, on inputs away from ties."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from attndsl.codegen import selection
from attndsl.codegen.args import slot_dtype
from attndsl.codegen.selection import selection_tables
from attndsl.codegen.tables import table_values, with_tables
from conftest import no_host_sync

import attndsl
import attndsl.caches
from attndsl.bound import call_grids
from attndsl.ir import Op

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
_PROGRAMS: dict = {}


def _pattern(file: str, name: str, **values):
    if file not in _PROGRAMS:
        _PROGRAMS[file] = attndsl.load(str(EXAMPLES / file))
    pat = _PROGRAMS[file][name]
    return (pat.bind(**values) if values else pat).bound()


# (file, pattern, bound values)
PATTERNS = [
    ("moba.attn", "moba", dict(block=16, top_k=2)),
    ("moba.attn", "moba", dict(block=8, top_k=1)),
    ("moba.attn", "moba", dict(block=8, top_k=50)),          # n >= nkb: every candidate
    ("topp_selection.attn", "topp_causal", dict(block=8, p=0.9)),
    ("topp_selection.attn", "topp_causal", dict(block=16, p=0.5)),
    ("topp_selection.attn", "topp_bidirectional", dict(block=8, p=0.75)),
    ("topp_selection.attn", "topp_bidirectional", dict(block=16, p=0.3)),
    ("routing.attn", "routing", {}),
    ("routing.attn", "routing_local", dict(window=8)),
    ("bigbird.attn", "bigbird", dict(block=8, n_random=2, seed=3)),
    ("bigbird.attn", "bigbird", dict(block=16, n_random=1)),
]

# (batch, heads, kv_heads, q_len, kv_len, head_dim)
SHAPES = [
    (2, 4, 2, 37, 37, 16),       # lengths not multiples of the block, GQA
    (2, 4, 2, 20, 53, 16),       # q_len < kv_len, unaligned first query block
    (2, 4, 4, 64, 64, 8),        # aligned, MHA
    (1, 4, 1, 1, 45, 16),        # one query row (decode), MQA
    (2, 2, 2, 40, 23, 16),       # q_len > kv_len (negative offset)
]

N_CLUSTERS = 5


def _inputs(shape, seed, dtype=torch.float32):
    bsz, heads, kv_heads, q_len, kv_len, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, q_len, d, generator=g).to(dtype)
    k = torch.randn(bsz, kv_heads, kv_len, d, generator=g).to(dtype)
    c = torch.randn(bsz, heads, N_CLUSTERS, d, generator=g)
    return q, k, c


def _tensors(pattern, c, form: str):
    """The route centroids as ``form``: 'plain' [H, C, D] torch, 'batched' [B, H, C, D] torch,
    'one' [1, H, C, D] torch or 'numpy' [H, C, D] float64 NumPy."""
    if not pattern.tensor_params:
        return {}
    value = {"plain": c[0], "batched": c, "one": c[:1], "numpy": c[0].double().numpy()}[form]
    return {name: value for name in pattern.tensor_params}


def _reference(pattern, q, k, scale, tensors):
    bsz, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    qn = q.float().numpy().astype(np.float64)
    kn = k.float().numpy().astype(np.float64)
    given = {n: (v.double().numpy() if isinstance(v, torch.Tensor) else v)
             for n, v in tensors.items()}
    grids = call_grids(pattern, (bsz, heads, kv_heads, q_len, kv_len), qn, kn, scale, given)
    derived = with_tables(pattern)[3]
    return derived, grids, table_values(derived, grids, q_len, kv_len)


def _assert_away_from_ties(derived, grids, scale):
    """The float64 reference's decisions have a margin a float32 evaluation cannot cross, so an
    inequality below is a bug, not a tie."""
    rel = 1e-4
    with np.errstate(invalid="ignore"):
        _check_margins(derived, grids, scale, rel)


def _check_margins(derived, grids, scale, rel):
    for d in derived.values():
        if d.kind == "random":
            continue
        for g in grids:
            sel = g.selectors
            if d.kind == "route_q" or d.kind == "route_k":
                c = np.asarray(sel.tensors[d.node.value], np.float64)
                x = sel.query if d.kind == "route_q" else sel.key[sel.kv_head()]
                dots = np.sort(np.einsum("hid,hmd->him", x, c), axis=-1)
                gap = dots[..., -1] - dots[..., -2] if dots.shape[-1] > 1 else np.inf
                # a float32 dot product of float32 vectors errs by < D * 2**-24 * sum |x||c|:
                # the gap must exceed 16 times that (q, k and c are float32 values)
                bound = x.shape[-1] * 2.0**-24 * np.einsum("hid,hmd->him", np.abs(x), np.abs(c))
                assert np.all(gap > 16 * bound.max(axis=-1, initial=0.0)), "route near a tie"
                continue
            b, causal = int(d.args[1]), bool(d.args[2])
            s, first = sel._block_scores(b)
            if s.size == 0:
                continue
            cand = sel._candidates(b, causal, first, s.shape[1])
            keyed = np.where(cand[None], s, -np.inf)
            ranked = -np.sort(-keyed, axis=-1)
            top = np.max(np.abs(s))
            if d.node.op is Op.TOPK_BLOCKS:
                n = int(d.args[0])
                if n < ranked.shape[-1]:
                    at, after = ranked[..., n - 1], ranked[..., n]
                    both = np.isfinite(at) & np.isfinite(after)
                    assert np.all((at - after)[both] > rel * top), "topk tie at the cut"
            else:
                p = float(d.args[0])
                logits = np.where(cand[None], scale * s, -np.inf)
                m = np.max(logits, axis=-1, keepdims=True)
                m = np.where(np.isfinite(m), m, 0.0)
                w = np.where(cand[None], np.exp(logits - m), 0.0)
                prob = w / np.maximum(w.sum(-1, keepdims=True), np.finfo(np.float64).tiny)
                sp = -np.sort(-np.where(cand[None], prob, -1.0), axis=-1)
                sp = np.where(sp < 0, 0.0, sp)
                before = np.cumsum(sp, axis=-1) - sp
                live = sp > 0
                assert np.all(np.abs(before - p)[live] > rel), "topp mass within 1e-4 of p"
                # equal scores among candidates would make the order ambiguous
                diffs = np.diff(ranked, axis=-1)
                finite = np.isfinite(diffs)
                assert np.all(-diffs[finite] > rel * top), "topp score tie"


def _compare(pattern, got: dict, want: dict, derived: dict, device):
    assert set(got) == set(want)
    for name, value in got.items():
        assert value.device == torch.device(device), name
        assert value.dtype == slot_dtype(None, derived[name]), name
        assert tuple(value.shape) == want[name].shape, (name, value.shape, want[name].shape)
        np.testing.assert_array_equal(value.cpu().numpy().astype(np.int64), want[name],
                                      err_msg=f"{pattern.name} {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("file,name,values", PATTERNS,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in vs.items())}"
                              for _, n, vs in PATTERNS])
def test_matches_reference(file, name, values, shape):
    pattern = _pattern(file, name, **values)
    scale = 0.7 / np.sqrt(shape[-1])
    q, k, c = _inputs(shape, seed=zlib.crc32(repr((name, values, shape)).encode()) % 1000)
    for form in ("plain", "batched", "one", "numpy") if pattern.tensor_params else ("plain",):
        tensors = _tensors(pattern, c, form)
        derived, grids, want = _reference(pattern, q, k, scale, tensors)
        assert derived, "the pattern has selectors"
        _assert_away_from_ties(derived, grids, scale)
        got = selection_tables(pattern, q, k, scale, tensors)
        _compare(pattern, got, want, derived, "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("file,name,values", [PATTERNS[0], PATTERNS[3], PATTERNS[5], PATTERNS[7]])
def test_half_inputs_read_as_float32(file, name, values, dtype):
    pattern = _pattern(file, name, **values)
    shape = (2, 4, 2, 37, 53, 16)
    q, k, c = _inputs(shape, seed=11, dtype=dtype)
    tensors = _tensors(pattern, c, "plain")
    got = selection_tables(pattern, q, k, 0.25, tensors)
    want = selection_tables(pattern, q.float(), k.float(), 0.25, tensors)
    assert set(got) == set(want)
    for n in got:
        assert got[n].dtype == want[n].dtype
        assert torch.equal(got[n], want[n]), n


def test_guard_catches_host_reads():
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: bool(t[0]), lambda: t.tolist(),
                 lambda: int(t[0]), lambda: float(t[0]), lambda: t.cpu(), lambda: t.numpy(),
                 lambda: torch.nonzero(t)):
        with no_host_sync(), pytest.raises(AssertionError, match="host synchronisation"):
            read()


@pytest.mark.parametrize("file,name,values", PATTERNS[::2] + PATTERNS[7:8],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_no_host_synchronisation_cold(file, name, values):
    pattern = _pattern(file, name, **values)
    shape = (2, 4, 2, 29, 45, 16)
    q, k, c = _inputs(shape, seed=5)
    tensors = _tensors(pattern, c, "batched")
    want = selection_tables(pattern, q, k, 0.3, tensors)
    attndsl.caches.clear()                         # cold: the host constants are built inside
    with no_host_sync():
        cold = selection_tables(pattern, q, k, 0.3, tensors)
    with no_host_sync():
        warm = selection_tables(pattern, q, k, 0.3, tensors)
    for n in want:
        assert torch.equal(cold[n], want[n]) and torch.equal(warm[n], want[n]), n


def test_constants_are_cached_by_content():
    pattern = _pattern("moba.attn", "moba", block=16, top_k=2)
    q, k, _ = _inputs((2, 4, 2, 37, 53, 16), seed=1)
    attndsl.caches.clear()
    selection_tables(pattern, q, k, 0.3, {})
    misses = [c.misses for c in (selection.POOL_CONSTS, selection.CANDIDATES)]
    q2, k2, _ = _inputs((2, 4, 2, 37, 53, 16), seed=2)             # other values, same sizes
    selection_tables(pattern, q2, k2, 0.3, {})
    assert [c.misses for c in (selection.POOL_CONSTS, selection.CANDIDATES)] == misses


@pytest.mark.parametrize("q_len,kv_len", [(0, 0), (0, 16), (0, 17), (5, 0), (0, 5)])
@pytest.mark.parametrize("file,name,values", [PATTERNS[0], PATTERNS[3], PATTERNS[5], PATTERNS[7],
                                              PATTERNS[9]],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_empty_sizes(file, name, values, q_len, kv_len):
    pattern = _pattern(file, name, **values)
    q, k, c = _inputs((2, 4, 2, q_len, kv_len, 16), seed=0)
    tensors = _tensors(pattern, c, "plain")
    derived, _, want = _reference(pattern, q, k, 0.3, tensors)
    with no_host_sync():
        got = selection_tables(pattern, q, k, 0.3, tensors)
    _compare(pattern, got, want, derived, "cpu")


def test_empty_batch():
    for file, name, values in (PATTERNS[0], PATTERNS[3], PATTERNS[7], PATTERNS[9]):
        pattern = _pattern(file, name, **values)
        q, k, c = _inputs((0, 4, 2, 20, 30, 16), seed=0)
        tensors = _tensors(pattern, torch.randn(1, 4, N_CLUSTERS, 16), "plain")
        derived = with_tables(pattern)[3]
        got = selection_tables(pattern, q, k, 0.3, tensors)
        for n, d in derived.items():
            assert got[n].dtype == slot_dtype(None, d)
            if d.kind != "random":
                assert got[n].shape[0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference_and_graph_capture():
    for file, name, values in PATTERNS:
        pattern = _pattern(file, name, **values)
        shape = (2, 4, 2, 37, 53, 16)
        scale = 0.2
        q, k, c = _inputs(shape, seed=7)
        tensors = _tensors(pattern, c, "batched")
        derived, grids, want = _reference(pattern, q, k, scale, tensors)
        _assert_away_from_ties(derived, grids, scale)
        qd, kd = q.cuda().half(), k.cuda().half()
        dev_tensors = {n: v.cuda() for n, v in tensors.items()}
        got = selection_tables(pattern, q.cuda(), k.cuda(), scale, dev_tensors)
        _compare(pattern, got, want, derived, got[next(iter(got))].device)
        selection_tables(pattern, qd, kd, scale, dev_tensors)       # warm the constants
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = selection_tables(pattern, qd, kd, scale, dev_tensors)
        graph.replay()
        eager = selection_tables(pattern, qd, kd, scale, dev_tensors)
        torch.cuda.synchronize()
        for n in eager:
            assert torch.equal(captured[n], eager[n]), (name, n)
