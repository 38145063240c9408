"""Tile tables built on the device (codegen/device_tiles.py) against the host analysis and the
brute-force oracle (attndsl.blocks.block_map_by_tiles), and the kernel run on them against the
reference. Triton's interpreter on CPU tensors (natively where a GPU is present); small sizes."""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch
from attndsl.codegen import kernel
from attndsl.codegen import plan as planning
from attndsl.codegen.config import Config
from attndsl.codegen.device_tiles import candidates, device_tiles, tile_classes
from conftest import EXAMPLES, mask_pattern

import attndsl
from attndsl.analysis.relax import relax, relaxed_mask
from attndsl.blocks import block_map_by_tiles
from attndsl.inputs import tensor_inputs
from attndsl.ir import DATA_SELECTOR_OPS, Op
from attndsl.program import Pattern
from attndsl.runtime import launches

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MAPS = Config(block_m=16, block_n=16)


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def _docs(lengths) -> np.ndarray:
    """Document ids of packed documents of the given lengths (ids 0, 1, ...)."""
    return np.repeat(np.arange(len(lengths)), lengths)


def _qk(batch, heads, kv_heads, q_len, kv_len, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, d, generator=g),
            torch.randn(batch, kv_heads, kv_len, d, generator=g),
            torch.randn(batch, kv_heads, kv_len, d, generator=g))


def _on_device(given: dict) -> dict:
    return {n: torch.as_tensor(t).to(DEVICE) for n, t in given.items()}


def _classes_of(tiles, n_kt: int) -> np.ndarray:
    """int8 [Bt, H, nQT, nKT] rebuilt from the padded tables, checking their invariants: one
    group, counts within the width, ascending indices, zero padding, full and partial apart."""
    assert tiles.groups.shape == (1, 4) and tiles.step_q == tiles.step_k == 1 and not tiles.band
    fn, fi, pn, pi = (t.cpu().numpy() for t in (tiles.full_num, tiles.full_idx, tiles.part_num,
                                                 tiles.part_idx))
    assert fn.dtype == pn.dtype == fi.dtype == pi.dtype == np.int32
    assert fi.shape == pi.shape and fn.shape == pn.shape == fi.shape[:4] and fn.shape[1] == 1
    assert tiles.full_idx.stride() == tiles.part_idx.stride()        # the skeleton reads one set
    bt, _, heads, n_qt, width = fi.shape
    out = np.zeros((bt, heads, n_qt, n_kt), dtype=np.int8)
    for (b, h, m), _ in np.ndenumerate(fn[:, 0]):
        for num, idx, cls in ((fn, fi, 2), (pn, pi, 1)):
            n, row = num[b, 0, h, m], idx[b, 0, h, m]
            assert 0 <= n <= width and not row[n:].any()
            assert (np.diff(row[:n]) > 0).all() and (row[:n] < n_kt).all()
            assert not out[b, h, m, row[:n]].any()
            out[b, h, m, row[:n]] = cls
    return out


def _maps(pat, batch, heads, kv_heads, q_len, kv_len, given, config=MAPS):
    """(device, host, oracle) block maps [B, H, nQT, nKT] of a call."""
    q, k, _v = _qk(batch, heads, kv_heads, q_len, kv_len)
    tiles = device_tiles(pat.bound(), q.to(DEVICE), k.to(DEVICE), _on_device(given), config, not CUDA)
    dev = _classes_of(tiles, -(-kv_len // config.block_n))
    dev = np.broadcast_to(dev, (batch,) + dev.shape[1:])
    per = tensor_inputs(pat.ir, given, batch)
    host = np.stack([pat.block_map(q_len, kv_len, heads, config.block, kv_heads, **t) for t in per])
    oracle = np.stack([block_map_by_tiles(pat.grid(q_len, kv_len, heads, kv_heads, t), config.block)
                       for t in per])
    # sound, whatever the precision: never empty where a pair is allowed, never full where one
    # is not
    assert (oracle[dev == 0] == 0).all() and (oracle[dev == 2] == 2).all()
    # the host analysis, where it is exact, agrees
    agree = host == oracle
    assert (dev[agree] == host[agree]).all()
    return dev, host, oracle


def _exact(pat, batch, heads, kv_heads, q_len, kv_len, given, config=MAPS):
    dev, _host, oracle = _maps(pat, batch, heads, kv_heads, q_len, kv_len, given, config)
    np.testing.assert_array_equal(dev, oracle)
    assert (oracle == 1).any() and ((oracle == 0).any() or (oracle == 2).any())   # not trivial
    return dev


def _run(pat, batch, heads, kv_heads, q_len, kv_len, given, config, tol=2e-5, seed=1):
    """The kernel on device-built tables against the float64 reference."""
    q, k, v = _qk(batch, heads, kv_heads, q_len, kv_len, seed=seed)
    qd, kd, vd = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    assert device_tiles(pat.bound(), qd, kd, _on_device(given), config, not CUDA) is not None
    with mock.patch.object(planning, "on_device", lambda call: True):   # also on the CPU
        (launch,), _ = launches(pat.bound(), qd, kd, vd, 0.25, _on_device(given), config=config)
    out, lse = kernel.run(launch, not CUDA)
    ref, ref_lse = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                 scale=0.25, **given)
    out, lse = out.double().cpu().numpy(), lse.double().cpu().numpy()
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert np.abs(out - ref).max() <= tol * (np.abs(ref).max() + 1)
    fin = np.isfinite(ref_lse)
    assert np.abs(lse[fin] - ref_lse[fin]).max(initial=0) <= tol * (np.abs(ref_lse[fin]).max(initial=0) + 1)


PACKED = "pattern p(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n"


def test_packed_documents_of_varied_lengths_ragged_tiles():
    pat = attndsl.compile(PACKED)["p"]
    doc = _docs([34, 1, 4, 6])                     # 45: tiles of 16 with a ragged end
    dev = _exact(pat, 1, 2, 2, 45, 45, {"doc": doc})
    assert (dev == 2).any()                        # a whole tile inside document 1


def test_documents_per_batch_element_and_q_len_below_kv_len():
    pat = attndsl.compile(PACKED)["p"]
    doc = np.stack([_docs([30, 2, 18]), _docs([5, 5, 40])])
    dev = _exact(pat, 2, 2, 1, 23, 50, {"doc": doc})
    assert not np.array_equal(dev[0], dev[1])      # each batch element has its own tables
    # a batch dimension of size 1 is shared
    _exact(pat, 2, 1, 1, 50, 50, {"doc": doc[1:]})


def test_q_len_above_kv_len_bidirectional_and_interleaved_documents():
    pat = attndsl.compile(PACKED)["p"]
    _exact(pat, 1, 1, 1, 40, 24, {"doc": _docs([7, 17])})     # rows before key 0 see nothing
    pat = mask_pattern("doc[q] == doc[k]", "doc: int[]")
    doc = np.random.default_rng(3).integers(0, 3, 40)        # no runs: documents interleave
    doc[16:32] = 2                                           # one tile pair wholly in document 2
    _exact(pat, 1, 1, 1, 40, 40, {"doc": doc})


def test_several_tensors_read_through_each_other():
    pat = attndsl.load(EXAMPLES / "global_window_docs.attn")["global_window_docs"].bind(window=6)
    doc = _docs([9, 26, 13])
    start = np.array([0, 9, 35])
    _exact(pat, 1, 1, 1, 48, 48, {"doc": doc, "doc_start": start})


def test_per_head_tensors():
    src = ("pattern p(seg: int[][], win: int[]):\n"
           "    mask = causal and seg[h, q] == seg[h, k] and q - k < win[h]\n")
    pat = attndsl.compile(src)["p"]
    seg = np.stack([np.zeros(40, dtype=np.int64), _docs([8, 32]), _docs([32, 8])])
    win = np.array([40, 12, 40])
    dev = _exact(pat, 1, 3, 1, 40, 40, {"seg": seg, "win": win})
    assert len({dev[0, h].tobytes() for h in range(3)}) == 3
    q, k, _v = _qk(1, 3, 1, 40, 40)
    assert tile_classes(pat.bound(), q, k, _on_device({"seg": seg, "win": win}), MAPS, not CUDA).shape[1] == 3


def test_score_clauses_that_forbid_pairs():
    # by position: the bounds are exact, so the device map is too
    src = ("pattern p(doc: int[]):\n    mask = doc[q] == doc[k]\n"
           "    score = score if abs(q - k) <= 12 else -inf\n")
    _exact(attndsl.compile(src)["p"], 1, 1, 1, 48, 48, {"doc": _docs([30, 18])})
    # by a tensor in the branch condition: exact as well
    src = ("pattern p(doc: int[], span: int[]):\n    mask = causal and doc[q] == doc[k]\n"
           "    score = score if q - k < span[h] else -inf\n")
    _exact(attndsl.compile(src)["p"], 1, 2, 2, 48, 48, {"doc": _docs([40, 8]), "span": np.array([48, 9])})


def test_float_tensor_holding_minus_inf_is_tested_per_pair():
    # -inf in the bias of rows 16..31: those tiles cannot be full (nor are they provably empty:
    # the bounds cannot place the -inf), every other tile inside one document can; the host
    # analysis, which asks whether the whole tensor is finite, finds no full tile at all
    src = ("pattern p(doc: int[], bias: float[]):\n    mask = doc[q] == doc[k]\n"
           "    score = score + bias[q]\n")
    pat = attndsl.compile(src)["p"]
    bias = np.zeros(48)
    bias[16:32] = -np.inf
    dev, host, oracle = _maps(pat, 1, 1, 1, 48, 48, {"doc": _docs([48]), "bias": bias})
    assert (dev[0, 0, 1] == 1).all() and (oracle[0, 0, 1] == 0).all()
    assert (dev[0, 0, [0, 2]] == 2).all() and not (host == 2).any()


def test_candidates_are_a_tensor_free_superset():
    pat = attndsl.compile(PACKED)["p"]
    cand = candidates(pat.bound(), 45, 45, 1, 1, MAPS.block)
    assert np.array_equal(cand[0], np.tril(np.ones((3, 3), dtype=bool)))  # causal tiles only
    rng = np.random.default_rng(7)
    for _ in range(5):
        doc = rng.integers(0, 4, 45)
        oracle = block_map_by_tiles(pat.grid(45, 45, 1, 1, {"doc": doc}), MAPS.block)
        assert cand[oracle != 0].all()


@pytest.mark.parametrize("expr,relaxed", [
    ("causal and not (doc[q] != doc[k])", "causal"),
    ("not (causal or doc[q] == doc[k])", "not causal"),
    ("not (causal and doc[q] == doc[k])", "true"),
    ("sliding(8) if doc[q] == 0 else chunked(4)", "sliding(8) or chunked(4)"),
    ("not (sliding(8) if doc[k] > 1 else chunked(4))", "not (sliding(8) and chunked(4))"),
    ("(doc[q] == doc[k]) == causal and k >= 3", "k >= 3"),
])
def test_relax_follows_polarity(expr, relaxed):
    pat = mask_pattern(expr, "doc: int[]")
    out = relax(pat.ir.mask, lambda e: e.op is Op.INDEX)
    assert not out.uses(Op.INDEX)
    free = Pattern(replace(pat.ir, mask=out, params=()), pat.source, pat.values)
    want = mask_pattern(relaxed).dense_mask(20, 20)
    np.testing.assert_array_equal(free.dense_mask(20, 20), want)
    rng = np.random.default_rng(11)
    for _ in range(4):                              # a superset for any tensor
        assert want[pat.dense_mask(20, 20, doc=rng.integers(0, 3, 20))].all()


def test_relaxed_mask_drops_selectors_under_negation():
    pat = attndsl.compile("pattern p:\n    mask = causal and not topk_blocks(2, 8)\n")["p"]
    out = relaxed_mask(pat.ir.mask)
    assert not out.uses(*DATA_SELECTOR_OPS)
    free = Pattern(replace(pat.ir, mask=out), pat.source, pat.values)
    np.testing.assert_array_equal(free.dense_mask(20, 20), mask_pattern("causal").dense_mask(20, 20))


def test_patterns_left_to_the_host_path():
    q, k, _v = _qk(1, 2, 2, 20, 20)
    causal = attndsl.compile("pattern p:\n    mask = causal\n")["p"]
    assert device_tiles(causal.bound(), q, k, {}, MAPS, not CUDA) is None
    routing = attndsl.load(EXAMPLES / "routing.attn")["routing"]
    cents = torch.randn(2, 4, 16)
    assert device_tiles(routing.bound(), q, k, {"c": cents}, MAPS, not CUDA) is None
    mixed = mask_pattern("doc[q] == doc[k] and (causal or random_blocks(1, 4))", "doc: int[]")
    doc = {"doc": torch.zeros(20, dtype=torch.int64)}
    assert device_tiles(mixed.bound(), q, k, doc, MAPS, not CUDA) is None


def test_a_batch_dimension_must_match_the_call():
    pat = attndsl.compile(PACKED)["p"]
    q, k, _v = _qk(2, 1, 1, 20, 20)
    with pytest.raises(attndsl.AttnCallError, match="batch dimension of size 3"):
        device_tiles(pat.bound(), q, k, {"doc": np.zeros((3, 20), dtype=np.int64)}, MAPS, not CUDA)


def test_kernel_on_device_tables_matches_the_reference():
    config = Config(block_m=16, block_n=16)
    pat = attndsl.compile(PACKED)["p"]
    doc = np.stack([_docs([11, 20, 6]), _docs([2, 35])])
    _run(pat, 2, 2, 1, 37, 37, {"doc": doc}, config)                       # per batch element
    src = ("pattern p(seg: int[][], bias: float[][]):\n"
           "    mask = seg[h, q] == seg[h, k]\n"
           "    score = score + bias[h, k] if abs(q - k) <= 20 else -inf\n")
    seg = np.stack([_docs([10, 30]), _docs([25, 15])])
    bias = np.random.default_rng(4).standard_normal((2, 40))
    bias[1, 3] = -np.inf
    _run(attndsl.compile(src)["p"], 1, 2, 2, 29, 40, {"seg": seg, "bias": bias}, config)


def test_device_tables_are_reused_per_call_size():
    pat = attndsl.compile(PACKED)["p"]
    q, k, _v = _qk(1, 1, 1, 30, 30)
    a = device_tiles(pat.bound(), q, k, {"doc": torch.as_tensor(_docs([16, 14]))}, MAPS, not CUDA)
    b = device_tiles(pat.bound(), q, k, {"doc": torch.zeros(30, dtype=torch.int64)}, MAPS, not CUDA)
    assert a.groups is b.groups                     # the static part is cached, not uploaded again
    # the classes are not: tile (1, 0) lies between two documents, then inside one
    assert _classes_of(a, 2)[0, 0, 1, 0] == 0 and _classes_of(b, 2)[0, 0, 1, 0] == 2
