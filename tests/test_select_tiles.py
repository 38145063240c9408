"""Tile lists of selector calls built on the call's device (codegen/select_tiles.py): sound
against the reference's dense mask at selector blocks smaller than, equal to and larger than
the tile, exact where the blocks align with the tiles (an unselected tile is never listed, a
selected one inside the static part is full), no host synchronisation while a call is
prepared, and both backends equal to the reference on the selector examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attndsl.codegen import torch_plan
from attndsl.codegen.select_tiles import Selected, select_tiles, selected_classes
from conftest import EXAMPLES, no_host_sync

import attndsl
from attndsl import runtime
from attndsl.caches import clear
from attndsl.torch_select import _Walk

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "moba": ("moba.attn", "moba", dict(top_k=2, block=16)),
    "topp_causal": ("topp_selection.attn", "topp_causal", dict(p=0.7, block=16)),
    "topp_bidirectional": ("topp_selection.attn", "topp_bidirectional", dict(block=16)),
    "routing": ("routing.attn", "routing", {}),
    "routing_local": ("routing.attn", "routing_local", dict(window=8)),
    "bigbird": ("bigbird.attn", "bigbird", dict(block=16, n_random=2)),
}


def _setup(name, q_len, kv_len, heads=4, kv_heads=2, batch=2, d=16, seed=0):
    file, pattern, values = CASES[name]
    pat = attndsl.load(EXAMPLES / file)[pattern].bind(**values)
    rng = np.random.default_rng(seed)
    q = torch.tensor(rng.standard_normal((batch, heads, q_len, d)), dtype=torch.float32)
    k = torch.tensor(rng.standard_normal((batch, kv_heads, kv_len, d)), dtype=torch.float32)
    v = torch.tensor(rng.standard_normal((batch, kv_heads, kv_len, d)), dtype=torch.float32)
    tensors = {"c": rng.standard_normal((heads, 3, d)).astype(np.float32)} \
        if "c" in pat.tensor_params else {}
    return pat, q, k, v, tensors


def _dense(pat, q, k, tensors, b):
    s = q.shape
    return pat.dense_mask(s[2], k.shape[2], s[1], k.shape[1], query=q[b].double().numpy(),
                          key=k[b].double().numpy(), **tensors)


def _classes(pat, q, k, v, tensors, block):
    _call, data = runtime.bind(pat.bound(), q, k, v, False, None, "triton-interpret", tensors)
    sizes = (q.shape[2], k.shape[2], q.shape[1], k.shape[1])
    return selected_classes(pat.bound(), sizes, block, data.selection, data.tensors,
                            q.device).classes


def _tile_truth(dense, block):
    """(any allowed, all allowed) [H, nQT, nKT] of a dense mask [H, Lq, Lkv]."""
    h, lq, lk = dense.shape
    bq, bk = block
    nqt, nkt = -(-lq // bq), -(-lk // bk)
    some = np.zeros((h, nqt, nkt), bool)
    every = np.zeros((h, nqt, nkt), bool)
    for i in range(nqt):
        for j in range(nkt):
            t = dense[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            some[:, i, j] = t.any(axis=(1, 2))
            every[:, i, j] = t.all(axis=(1, 2))
    return some, every


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("block", [(16, 16), (8, 8), (32, 32), (16, 32), (8, 16)])
@pytest.mark.parametrize("lengths", [(64, 64), (45, 77)])
def test_classes_sound_and_exact_where_aligned(name, block, lengths):
    pat, q, k, v, tensors = _setup(name, *lengths)
    classes = _classes(pat, q, k, v, tensors, block).numpy()
    b_sel = 16
    offset = lengths[1] - lengths[0]
    aligned = b_sel % block[0] == 0 and b_sel % block[1] == 0 and offset % block[0] == 0
    for b in range(q.shape[0]):
        some, every = _tile_truth(_dense(pat, q, k, tensors, b), block)
        got = np.broadcast_to(classes[min(b, classes.shape[0] - 1)], some.shape)
        assert not np.any((got == 0) & some), "a tile with an allowed pair is not listed"
        assert not np.any((got == 2) & ~every), "a tile listed full has a masked pair"
        if aligned and name in ("moba", "topp_causal", "topp_bidirectional"):
            exact = np.where(every, 2, np.where(some, 1, 0))
            np.testing.assert_array_equal(got, exact)


def test_unselected_tiles_are_not_listed():
    """MoBA top-2 at 256 keys of 16-key blocks: each query tile lists its own block and at most
    two selected blocks, the selected ones full (no mask hook)."""
    pat, q, k, v, tensors = _setup("moba", 256, 256)
    classes = _classes(pat, q, k, v, tensors, (16, 16))
    tiles = select_tiles(Selected(classes, classes.shape[-1]), 4, 256, 256)
    listed = tiles.full_num + tiles.part_num
    assert int(listed.max()) <= 3
    assert int(tiles.part_num.max()) == 1                   # the diagonal tile only
    assert int((classes != 0).sum()) == int(listed.sum())
    # query block I lists min(I + 1, 3) tiles: its own and its top two of I earlier ones,
    # against I + 1 for dense causal (136 tiles in all)
    np.testing.assert_array_equal(listed[0, 0, 0].numpy(), np.minimum(np.arange(16) + 1, 3))


@pytest.mark.parametrize("name", ["moba", "topp_causal", "routing", "bigbird"])
def test_preparing_a_call_reads_no_tensor_on_the_host(name):
    """bind (the selection), analyse, plan (the tile lists) and generate run without reading a
    tensor's values on the host — on CUDA, no synchronisation; caches cold for the selectors
    that read q and k. (``random_blocks`` reads no data: its plan is made once per call size,
    on the host, and kept.)"""
    pat, q, k, v, tensors = _setup(name, 96, 128)
    tensors = {n: torch.as_tensor(t) for n, t in tensors.items()}
    clear()
    if not pat.uses_selectors():
        runtime.launches(pat.bound(), q, k, v, tensors=tensors, backend="triton-interpret")
    with no_host_sync():
        launches, _finish = runtime.launches(pat.bound(), q, k, v, tensors=tensors,
                                             backend="triton-interpret")
    assert launches


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend,block", [("torch", "16x16"), ("torch", "8x8"),
                                           ("torch", "32x32"), ("triton-interpret", None)])
def test_outputs_equal_the_reference(name, backend, block, monkeypatch):
    if block:
        monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", block)
    pat, q, k, v, tensors = _setup(name, 45, 77, batch=1)
    out, lse = pat(q, k, v, return_lse=True, backend=backend, **tensors)
    ref_out, ref_lse = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                     **tensors)
    np.testing.assert_allclose(out.numpy(), ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=2e-5, rtol=2e-5)


MIXED = """
pattern two(top = 2):
    mask = causal and (topk_blocks(top, 16) or topp_blocks(0.5, 32) or q // 8 == k // 8)
    score = score - 1.0 if topk_blocks(top, 16) else score

pattern many:
    mask = (topk_blocks(1, 8) or topk_blocks(1, 16) or topk_blocks(2, 16, causal = false)
            or topp_blocks(0.3, 8) or random_blocks(1, 32, seed = 3) or sliding(4))
"""


@pytest.mark.parametrize("name", ["two", "many"])
@pytest.mark.parametrize("block", [(16, 16), (8, 32), (32, 8)])
def test_several_selectors_sound(name, block):
    """Two selectors (one read by the score clause too), and more than MAX_ATOMS of them."""
    pat = attndsl.compile(MIXED)[name]
    rng = np.random.default_rng(3)
    q = torch.tensor(rng.standard_normal((1, 2, 50, 16)), dtype=torch.float32)
    k = torch.tensor(rng.standard_normal((1, 2, 70, 16)), dtype=torch.float32)
    classes = _classes(pat, q, k, k, {}, block).numpy()
    some, every = _tile_truth(_dense(pat, q, k, {}, 0), block)
    got = np.broadcast_to(classes[0], some.shape)
    assert not np.any((got == 0) & some)
    assert not np.any((got == 2) & ~every)
    assert (got == 0).any()                 # still sparse


@pytest.mark.parametrize("name", ["two", "many"])
@pytest.mark.parametrize("backend", ["torch", "triton-interpret"])
def test_several_selectors_equal_the_reference(name, backend, monkeypatch):
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", "16x8")
    pat = attndsl.compile(MIXED)[name]
    rng = np.random.default_rng(4)
    q, k, v = (torch.tensor(rng.standard_normal(s), dtype=torch.float32)
               for s in ((1, 2, 50, 16), (1, 2, 70, 16), (1, 2, 70, 16)))
    if name == "many" and backend != "torch":      # five tables: beyond the kernels' slots
        with pytest.raises(attndsl.AttnCallError, match="at most 4 tensor inputs"):
            pat(q, k, v, backend=backend)
        return
    out, lse = pat(q, k, v, return_lse=True, backend=backend)
    ref_out, ref_lse = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy())
    np.testing.assert_allclose(out.numpy(), ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU run)")
@pytest.mark.parametrize("name", ["moba", "topp_causal", "routing"])
def test_whole_call_captured_in_a_cuda_graph(name):
    """On CUDA the whole call — selection, tile lists, kernels — is captured in a CUDA graph
    after a first call at the same sizes, and a replay on new q and k (new selections) equals
    an eager call."""
    pat, q, k, v, tensors = _setup(name, 256, 256)
    q, k, v = (t.cuda().half() for t in (q, k, v))
    tensors = {n: torch.as_tensor(t).cuda() for n, t in tensors.items()}
    pat(q, k, v, **tensors)                                  # warm: constants, kernels, tuning
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = pat(q, k, v, **tensors)
    q.copy_(torch.randn_like(q))
    k.copy_(torch.randn_like(k))
    graph.replay()
    eager = pat(q, k, v, **tensors)
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("name", ["moba", "topp_causal", "topp_bidirectional", "routing",
                                  "routing_local", "two"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("block", ["16x16", "8x16", "32x8"])
@pytest.mark.parametrize("lengths", [(45, 77), (77, 45)])
def test_gathered_walk_equals_the_reference(name, fused, block, lengths, monkeypatch):
    """The torch backend's gathered walk itself (whatever the choice between it and the plan's
    walk), on the fused operator and on the general engine, with GQA, q_len < kv_len and
    q_len > kv_len (rows without keys)."""
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", block)
    if name == "two":
        pat = attndsl.compile(MIXED)["two"]
        rng = np.random.default_rng(5)
        lq, lk = lengths
        q, k, v = (torch.tensor(rng.standard_normal(s), dtype=torch.float32)
                   for s in ((2, 4, lq, 16), (2, 2, lk, 16), (2, 2, lk, 16)))
        tensors = {}
    else:
        pat, q, k, v, tensors = _setup(name, *lengths)
    if fused and pat.bound().ir.score is not None:
        pytest.skip("the fused operator takes no score clause")
    call, data = runtime.bind(pat.bound(), q, k, v, False, None, "torch", tensors)
    analysis = torch_plan.analyse(call, data)
    launch = analysis.launches[0]
    out, lse = _Walk(call, data, q, k, v, analysis.block, fused, launch.selected).run(launch.maps)
    ref_out, ref_lse = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                     **tensors)
    np.testing.assert_allclose(out.numpy(), ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=2e-5, rtol=2e-5)
