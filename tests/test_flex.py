"""``pat.to_flex(q, k, ...)``: a pattern exported to PyTorch's FlexAttention (docs/flex.md).

What is checked, on the CPU:

* every pattern of examples/*.attn: ``flex_attention(q, k, v, **fx.kwargs)`` equals
  ``pat(q, k, v)`` (torch backend, float64) at unaligned, ragged sizes (q_len < kv_len: the
  bottom-right translation), with GQA where the example has several heads and its demo tensor
  inputs (tests/test_examples.py, tests/test_lang_examples.py). Flex's CPU reference evaluates
  ``mask_mod`` on every pair and ignores the block lists, so each example also runs with a
  ``mask_mod`` that applies the lists the way Flex's kernels do (a full block allowed outright,
  a partial block through ``mask_mod``, an unlisted block never): the block mask is checked by
  its meaning, not only by its shape;
* the lists are attndsl's tile classes: equal to ``pat.block_map`` for static patterns, sound
  against the dense mask for selector patterns;
* a tensor input with a batch dimension, selectors rebuilt per call, ``score_mod`` None without a
  score clause, ``q_len > kv_len``, Flex's own eager path (dynamo) and ``torch.compile`` (Flex's
  block-sparse CPU kernel), and the errors.

Most calls run Flex's reference without dynamo (``_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG``: vmap
only, milliseconds a call); a few run its default eager path and one its compiled kernel.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from conftest import example_files, pattern
from test_examples import CASE_BY_ID, HEAD_DIM, MANY_HEADS, declared_patterns, program
from test_lang_examples import LANG_CASE_BY_ID
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import attndsl
from attndsl.errors import AttnCallError, AttnError
from attndsl.render import demo_inputs

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

Q_LEN, KV_LEN, BATCH = 21, 37, 2
BLOCK = (8, 16)
TOL = 1e-9


@pytest.fixture
def vmap_only(monkeypatch):
    """Flex's CPU reference without dynamo (the same math, traced by vmap only)."""
    monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True,
                        raising=False)


def _example_ids() -> list[str]:
    return [f"{path.name}::{name}" for path in example_files()
            for name in declared_patterns(path)]


def _case_call(case_id: str, seed: int = 0):
    """(pattern, q, k, v, tensor inputs, heads, kv_heads) of an example at the test's sizes."""
    file, name = case_id.split("::")
    case = CASE_BY_ID.get(case_id) or LANG_CASE_BY_ID.get(case_id)
    pat = program(file)[name]
    heads, kv_heads = 2, 2
    rng = np.random.default_rng(seed)
    if case is not None:
        bind = case.binds[min(1, len(case.binds) - 1)]         # small parameters
        pat = pat.bind(**bind) if bind else pat
        if case.heads == MANY_HEADS:
            heads, kv_heads = 4, 2                              # GQA
        P = {**case.defaults, **bind}
        inputs = case.inputs(Q_LEN, KV_LEN, heads, P, rng) if case.inputs else {}
    else:                                                       # an example without a case
        inputs = demo_inputs(pat, (Q_LEN, KV_LEN, heads, kv_heads), HEAD_DIM, rng)[0]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, heads, Q_LEN, HEAD_DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(BATCH, kv_heads, KV_LEN, HEAD_DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(BATCH, kv_heads, KV_LEN, HEAD_DIM, generator=gen, dtype=torch.float64)
    return pat, q, k, v, inputs, heads, kv_heads


def listed(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """bool [..., rows, n_cols]: the blocks of a BlockMask's (count, indices) lists."""
    take = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    out = torch.zeros(idx.shape[:-1] + (n_cols + 1,), dtype=torch.bool, device=idx.device)
    out.scatter_(-1, torch.where(take, idx.long(), n_cols), True)
    return out[..., :n_cols]


def block_lists(bm: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) bool [B or 1, H or 1, nQB, nKB] of a block mask."""
    n_cols = -(-bm.seq_lengths[1] // bm.BLOCK_SIZE[1])
    return (listed(bm.full_kv_num_blocks, bm.full_kv_indices, n_cols),
            listed(bm.kv_num_blocks, bm.kv_indices, n_cols))


def as_kernels_do(fx) -> BlockMask:
    """fx's block mask with a mask_mod that applies its lists as Flex's kernels do: a full block
    allowed without mask_mod, a partial one through mask_mod, any other never."""
    bm = fx.block_mask
    full, partial = block_lists(bm)
    bq, bk = bm.BLOCK_SIZE

    def mask_mod(b, h, q_idx, kv_idx):
        bi = b if full.shape[0] > 1 else torch.zeros_like(b)
        hi = h if full.shape[1] > 1 else torch.zeros_like(h)
        cell = (bi, hi, q_idx // bq, kv_idx // bk)
        return full[cell] | (partial[cell] & fx.mask_mod(b, h, q_idx, kv_idx))

    return BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                    bm.full_kv_indices, BLOCK_SIZE=bm.BLOCK_SIZE,
                                    mask_mod=mask_mod, seq_lengths=bm.seq_lengths)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    assert got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * (want.abs().max().item() + 1), err


# ----------------------------------------------------------------------------- every example


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.usefixtures("vmap_only")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("case_id", _example_ids())
def test_every_example_equals_attndsl(case_id, device):
    pat, q, k, v, inputs, heads, kv_heads = _case_call(case_id)
    want = pat(q, k, v, backend="torch", **inputs)              # on the CPU
    q, k, v = (x.to(device) for x in (q, k, v))
    fx = pat.to_flex(q, k, BLOCK_SIZE=BLOCK, **inputs)
    assert fx.enable_gqa == (heads != kv_heads)
    assert fx.block_mask.seq_lengths == (Q_LEN, KV_LEN) and fx.block_mask.BLOCK_SIZE == BLOCK
    assert (fx.score_mod is None) == (pat.ir.score is None)
    assert_close(flex_attention(q, k, v, **fx.kwargs).cpu(), want)
    kwargs = {**fx.kwargs, "block_mask": as_kernels_do(fx)}
    assert_close(flex_attention(q, k, v, **kwargs).cpu(), want)
    # the lists are the classes they were built from
    full, partial = block_lists(fx.block_mask)
    assert torch.equal(full, fx.classes == 2) and torch.equal(partial, fx.classes == 1)
    classes = fx.classes.cpu().numpy()
    if not pat.uses_selectors():          # (the cases' tensor inputs have no batch dimension)
        want_map = pat.block_map(Q_LEN, KV_LEN, heads, BLOCK, kv_heads, **inputs)
        np.testing.assert_array_equal(np.broadcast_to(classes[0], want_map.shape), want_map)
    elif pat.ir.score is None:          # sound against the mask of each batch row
        for b in range(BATCH):
            dense = pat.dense_mask(Q_LEN, KV_LEN, heads, kv_heads, query=q[b].cpu().numpy(),
                                   key=k[b].cpu().numpy(), **inputs)
            _assert_sound(classes[min(b, len(classes) - 1)], dense, BLOCK)


def _assert_sound(classes: np.ndarray, dense: np.ndarray, block) -> None:
    """Full tiles hold only allowed pairs, empty tiles none (classes [H or 1, nQB, nKB])."""
    bq, bk = block
    for h in range(dense.shape[0]):
        for i in range(classes.shape[1]):
            for j in range(classes.shape[2]):
                tile = dense[h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                c = classes[min(h, classes.shape[0] - 1), i, j]
                assert (c != 2 or tile.all()) and (c != 0 or not tile.any()), (h, i, j, c)


def test_every_example_is_covered():
    ids = _example_ids()
    assert len(ids) >= 40
    assert all(i in CASE_BY_ID or i in LANG_CASE_BY_ID for i in ids), \
        [i for i in ids if i not in CASE_BY_ID and i not in LANG_CASE_BY_ID]


# ----------------------------------------------------------------------------- call shapes


@pytest.mark.usefixtures("vmap_only")
def test_a_tensor_input_with_a_batch_dimension_is_read_per_row():
    pat = program("packed_documents.attn")["packed"]
    rng = np.random.default_rng(3)
    doc = np.stack([np.sort(rng.integers(0, 4, KV_LEN)), np.sort(rng.integers(0, 9, KV_LEN))])
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64)
               for n in (KV_LEN, KV_LEN, KV_LEN))
    fx = pat.to_flex(q, k, BLOCK_SIZE=8, doc=torch.from_numpy(doc))
    assert fx.classes.shape[0] == 2 and not torch.equal(fx.classes[0], fx.classes[1])
    want = pat(q, k, v, doc=doc)
    assert_close(flex_attention(q, k, v, **fx.kwargs), want)
    assert_close(flex_attention(q, k, v, **{**fx.kwargs, "block_mask": as_kernels_do(fx)}), want)


@pytest.mark.usefixtures("vmap_only")
def test_selectors_are_rebuilt_per_call():
    pat = program("moba.attn")["moba"].bind(top_k=1, block=8)
    gen = torch.Generator().manual_seed(5)
    calls = [[torch.randn(1, 4, 40, 8, generator=gen, dtype=torch.float64) for _ in "qkv"]
             for _ in range(2)]
    exports = [pat.to_flex(q, k[:, :2], BLOCK_SIZE=8) for q, k, _ in calls]
    assert not torch.equal(exports[0].classes, exports[1].classes)
    for (q, k, v), fx in zip(calls, exports):
        want = pat(q, k[:, :2], v[:, :2])
        assert_close(flex_attention(q, k[:, :2], v[:, :2], **fx.kwargs), want)
    q, k, v = calls[1]
    stale = flex_attention(q, k[:, :2], v[:, :2], **exports[0].kwargs)
    assert (stale - pat(q, k[:, :2], v[:, :2])).abs().max() > 1e-3    # the selection is data


@pytest.mark.usefixtures("vmap_only")
def test_more_queries_than_keys_and_a_scale():
    pat = program("sliding_window.attn")["mistral_swa"].bind(window=5)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 30, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 12, 8, generator=gen, dtype=torch.float64) for _ in "kv")
    fx = pat.to_flex(q, k, BLOCK_SIZE=16, scale=0.3)
    assert fx.block_mask.BLOCK_SIZE == (16, 16) and fx.scale == 0.3
    want = pat(q, k, v, scale=0.3)
    assert bool((want[0, :, :18] == 0).all())            # rows before the first key: no key
    assert_close(flex_attention(q, k, v, **fx.kwargs), want)
    assert_close(flex_attention(q, k, v, **{**fx.kwargs, "block_mask": as_kernels_do(fx)}), want)


def test_score_mod_is_none_without_a_score_clause():
    q = k = torch.zeros(1, 1, 4, 8)
    assert program("causal.attn")["causal_lm"].to_flex(q, k).score_mod is None
    fx = program("alibi.attn")["alibi"].to_flex(q, k)
    assert callable(fx.score_mod) and callable(fx.mask_mod)


# ----------------------------------------------------------------------------- Flex's own paths


SCORED = """\
pattern t(rel: float[][], n = 1, b = 16):
    mask = causal and (topk_blocks(n, b) or q // b == k // b)
    score = score + rel[h, clamp(q - k, 0, 7)]
"""


def _scored_call(seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 29, 16, generator=gen)
    k, v = (torch.randn(2, 2, 45, 16, generator=gen) for _ in "kv")
    rel = torch.randn(4, 8, generator=gen)
    return q, k, v, rel


def test_flex_eager_path_traces_the_mods():
    """Flex's default eager path traces mask_mod and score_mod with dynamo (fullgraph)."""
    pat = pattern(SCORED)
    q, k, v, rel = _scored_call(0)
    fx = pat.to_flex(q, k, BLOCK_SIZE=16, rel=rel)
    assert fx.enable_gqa
    assert_close(flex_attention(q, k, v, **fx.kwargs), pat(q, k, v, rel=rel), 1e-5)


@pytest.mark.slow          # an inductor compile: ~20 s cold on 2 cores, ~3 s from its cache
def test_compiled_flex_walks_the_block_lists():
    """torch.compile'd Flex (its block-sparse CPU kernel, which reads the lists) on two calls:
    each export equals its call; a new export of the same pattern compiles nothing new."""
    if not torch._dynamo.is_dynamo_supported() or not any(
            shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        pytest.skip("torch.compile on the CPU needs dynamo and a C++ compiler")
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    pat = pattern(SCORED)
    graphs = []
    for seed in (1, 2):
        q, k, v, rel = _scored_call(seed)
        fx = pat.to_flex(q, k, BLOCK_SIZE=16, rel=rel)
        assert int((fx.classes == 2).sum()) > 0 and int((fx.classes == 0).sum()) > 0
        assert_close(compiled(q, k, v, **fx.kwargs), pat(q, k, v, rel=rel), 1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0]
    # the kernel honours the lists: every block marked full skips the mask
    classes = torch.where(fx.classes == 1, 2, fx.classes)
    bm = fx.block_mask
    wrong = BlockMask.from_kv_blocks(bm.kv_num_blocks * 0, bm.kv_indices,
                                     *_lists(classes == 2), BLOCK_SIZE=bm.BLOCK_SIZE,
                                     mask_mod=fx.mask_mod, seq_lengths=bm.seq_lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(q, k, v, **{**fx.kwargs, "block_mask": wrong})
    assert (out - pat(q, k, v, rel=rel)).abs().max() > 1e-2


@CUDA
@pytest.mark.parametrize("case_id", ["packed_documents.attn::packed", "alibi.attn::alibi",
                                     "moba.attn::moba", "scored"])
def test_compiled_flex_on_cuda(case_id):
    """Flex's compiled CUDA kernels at its default block size (run only where a GPU is)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 300, 64, generator=gen)
    k, v = (torch.randn(2, 2, 500, 64, generator=gen) for _ in "kv")
    inputs = {}
    if case_id == "scored":
        pat = pattern(SCORED).bind(b=128)
        inputs = {"rel": torch.randn(4, 8, generator=gen)}
    else:
        file, name = case_id.split("::")
        pat = program(file)[name]
        if name == "moba":
            pat = pat.bind(top_k=1, block=128)
        if name == "packed":
            inputs = {"doc": torch.sort(torch.randint(0, 6, (2, 500), generator=gen)).values}
    want = pat(q, k, v, **inputs)
    dev = {n: t.cuda() for n, t in inputs.items()}
    q, k, v = (x.cuda() for x in (q, k, v))
    fx = pat.to_flex(q, k, **dev)
    out = torch.compile(flex_attention, dynamic=False)(q, k, v, **fx.kwargs)
    assert_close(out.cpu(), want, 2e-3)


def _lists(sel: torch.Tensor):
    num = sel.sum(-1, dtype=torch.int32)
    idx = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True)
    return num, idx.to(torch.int32)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("size", [0, -8, True, 16.0, "16", (16,), (16, 0), (16, 16, 16),
                                  (16, 1.5), None])
def test_a_bad_block_size_is_a_call_error(size):
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(AttnCallError, match="BLOCK_SIZE"):
        program("causal.attn")["causal_lm"].to_flex(q, q, BLOCK_SIZE=size)


def test_call_errors():
    q = torch.zeros(1, 2, 6, 8)
    packed = program("packed_documents.attn")["packed"]
    with pytest.raises(AttnCallError, match="doc"):
        packed.to_flex(q, q)                                  # a missing tensor input
    with pytest.raises(AttnCallError, match="extra"):
        packed.to_flex(q, q, doc=np.zeros(6, dtype=np.int64), extra=np.zeros(3))
    with pytest.raises(AttnCallError, match="torch.Tensor"):
        packed.to_flex(q.numpy(), q, doc=np.zeros(6, dtype=np.int64))
    with pytest.raises(AttnCallError, match="q_len"):
        program("causal.attn")["causal_lm"].to_flex(q[:, :, :0], q)
    with pytest.raises(AttnCallError):
        program("causal.attn")["causal_lm"].to_flex(q, torch.zeros(1, 3, 6, 8))   # 2 % 3
    with pytest.raises(AttnCallError, match="w"):
        attndsl.compile("pattern t(w: int):\n    mask = q - k < w\n")["t"].to_flex(q, q)
    # an out-of-range tensor index is the same located error as the call's
    rel = pattern("pattern t(rel: float[]):\n    mask = causal\n    score = score + rel[q - k]\n")
    with pytest.raises(AttnError) as err:
        rel.to_flex(q, q, rel=np.zeros(3))
    with pytest.raises(AttnError) as same:
        rel(q, q, q, rel=np.zeros(3))
    assert str(err.value) == str(same.value)
