"""Zero sizes: empty outputs of the right shape from every entry point, and rows without keys
give output 0 and lse -inf (LANGUAGE.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attndsl.codegen.tile_tables import band_tables, from_classes

import attndsl

PROG = attndsl.compile("""
pattern causal_p:
    mask = causal
pattern window(w = 16):
    mask = sliding(w) or sinks(2)
pattern docs(doc: int[]):
    mask = causal and doc[q] == doc[k]
pattern moba(n = 2, b = 8):
    mask = causal and (topk_blocks(n, b) or q // b == k // b)
pattern topp(p = 0.5, b = 8):
    mask = topp_blocks(p, b, causal = false)
pattern routed(c: float[][][]):
    mask = route(c)
pattern dil:
    mask = dilated(4, 3)
pattern rand:
    mask = random_blocks(2, 8) or causal
pattern scored(bias: float[]):
    mask = causal
    score = score + bias[k]
""", filename="<zero>")

SIZES = [(1, 0, 5), (1, 5, 0), (0, 5, 5), (1, 0, 0), (2, 1, 0), (0, 0, 0)]
HEADS, KV_HEADS, D = 2, 1, 8


def _inputs(name: str, batch: int, kv_len: int) -> dict:
    if name == "docs":
        return {"doc": torch.zeros(kv_len, dtype=torch.int64)}
    if name == "routed":
        return {"c": torch.randn(HEADS, 3, D)}
    if name == "scored":
        return {"bias": torch.zeros(kv_len)}
    return {}


def _operands(batch, q_len, kv_len):
    return (torch.randn(batch, HEADS, q_len, D), torch.randn(batch, KV_HEADS, kv_len, D),
            torch.randn(batch, KV_HEADS, kv_len, D))


def _check_empty_rows(out, lse, batch, q_len):
    out, lse = np.asarray(out, dtype=np.float64), np.asarray(lse, dtype=np.float64)
    assert out.shape == (batch, HEADS, q_len, D) and lse.shape == (batch, HEADS, q_len)
    assert (out == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("name", PROG.patterns)
@pytest.mark.parametrize("batch,q_len,kv_len", SIZES)
def test_every_backend_gives_empty_rows(name, batch, q_len, kv_len):
    q, k, v = _operands(batch, q_len, kv_len)
    tensors = _inputs(name, batch, kv_len)
    _check_empty_rows(*PROG[name].reference(q, k, v, **tensors), batch, q_len)
    for backend in ("torch", "triton-interpret"):
        out, lse = PROG[name](q, k, v, return_lse=True, backend=backend, **tensors)
        _check_empty_rows(out.numpy(), lse.numpy(), batch, q_len)


@pytest.mark.parametrize("name", PROG.patterns)
@pytest.mark.parametrize("q_len,kv_len", [(0, 5), (5, 0), (0, 0)])
def test_masks_and_block_maps_have_the_right_empty_shapes(name, q_len, kv_len):
    pat = PROG[name]
    tensors = _inputs(name, 1, kv_len)
    selectors = {}
    if pat.uses_selectors():
        selectors = {"query": np.zeros((HEADS, q_len, D)), "key": np.zeros((KV_HEADS, kv_len, D))}
    mask = pat.dense_mask(q_len, kv_len, heads=HEADS, kv_heads=KV_HEADS, **selectors, **tensors)
    assert mask.shape == (HEADS, q_len, kv_len) and mask.dtype == bool
    if pat.uses_selectors():
        return                                          # block maps describe static patterns
    bm = pat.block_map(q_len, kv_len, heads=HEADS, kv_heads=KV_HEADS, block=(4, 4), **tensors)
    assert bm.shape == (HEADS, -(-q_len // 4), -(-kv_len // 4)) and bm.dtype == np.int8


def test_some_rows_with_no_key_are_empty_beside_full_ones():
    """q_len > kv_len: the first rows have negative positions, before every key."""
    q, k, v = _operands(1, 9, 4)
    for backend in ("torch", "triton-interpret"):
        out, lse = PROG["causal_p"](q, k, v, return_lse=True, backend=backend)
        assert np.isneginf(lse[0, :, :5].numpy()).all() and (out[0, :, :5] == 0).all()
        assert np.isfinite(lse[0, :, 5:].numpy()).all()


@pytest.mark.parametrize("shape", [(1, 1, 1, 3, 0), (1, 1, 1, 0, 4), (1, 1, 0, 0, 0)])
def test_tile_tables_of_empty_class_arrays(shape):
    classes = torch.zeros(shape, dtype=torch.int8)
    tables = band_tables(classes)
    assert tables is not None and all(t.shape[:4] == shape[:4] for t in tables)
    tiles = from_classes(classes, [(0, 0, 0, 0)])
    assert tiles.n_query_tiles == shape[3]


def test_route_needs_a_centroid():
    q, k, v = _operands(1, 4, 4)
    with pytest.raises(attndsl.AttnError, match="'c'"):
        PROG["routed"].reference(q, k, v, c=torch.zeros(HEADS, 0, D))
