"""Calls past 2**31 keys: every position, tile offset and index is computed in 64 bits.

No test here needs the memory of such a call: K and V are expanded with stride 0 along the
length (one stored key serves every position), and one decoding query with a window and sinks
touches only a few tiles. The score clause adds ``k % 7`` so that the lse depends on exactly
which key positions are allowed: a position computed in 32 bits (wrapped around) changes it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attndsl

LONG = 2 ** 31 + 300
D = 16
WINDOW, SINKS = 40, 4

PROG = attndsl.compile(f"""
pattern decode(w = {WINDOW}, n = {SINKS}):
    mask = sliding(w) or sinks(n)
    score = score + float(k % 7)
pattern window(w = {WINDOW}):
    mask = sliding(w)
""", filename="<long>")


def _operands(kv_len: int):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 1, 1, D, generator=g)
    key = torch.randn(1, 1, 1, D, generator=g)
    value = torch.randn(1, 1, 1, D, generator=g)
    return q, key.expand(1, 1, kv_len, D), value.expand(1, 1, kv_len, D), key, value


def _expected(q, key, kv_len: int, sinks: int, window: int) -> float:
    """lse of the last row: keys [0, sinks) and [kv_len - window, kv_len), all equal vectors."""
    s0 = float(q[0, 0, 0] @ key[0, 0, 0]) / math.sqrt(D)
    keys = list(range(sinks)) + list(range(kv_len - window, kv_len))
    return s0 + math.log(sum(math.exp(k % 7) for k in keys))


@pytest.mark.parametrize("backend", ["torch", "triton-interpret"])
def test_a_decoding_query_past_2_31_keys_sees_its_window_and_sinks(backend):
    q, k, v, key, value = _operands(LONG)
    out, lse = PROG["decode"](q, k, v, return_lse=True, backend=backend)
    assert float(lse) == pytest.approx(_expected(q, key, LONG, SINKS, WINDOW), rel=1e-6)
    torch.testing.assert_close(out[0, 0, 0], value[0, 0, 0], rtol=1e-5, atol=1e-5)


def test_the_expected_value_tells_the_window_apart():
    """The check above fails for a window shifted by one key or for missing sinks."""
    q, _, _, key, _ = _operands(LONG)
    right = _expected(q, key, LONG, SINKS, WINDOW)
    assert abs(_expected(q, key, LONG - 1, SINKS, WINDOW) - right) > 1e-3
    assert abs(_expected(q, key, LONG, 0, WINDOW) - right) > 1e-3


def test_block_map_of_a_decoding_query_past_2_31_keys():
    block = (128, 128)
    bm = PROG["window"].block_map(1, LONG, block=block)
    n_kt = -(-LONG // 128)
    assert bm.shape == (1, 1, n_kt)
    touched = np.flatnonzero(bm[0, 0])
    first = (LONG - WINDOW) // 128
    np.testing.assert_array_equal(touched, np.arange(first, n_kt))
    assert (bm[0, 0, touched] == 1).all()               # a window of 40 fills no tile


def test_block_map_keeps_its_scratch_to_the_tiles_it_returns(monkeypatch):
    """Row tiles are classified a chunk at a time; chunks of one row tile give the same map."""
    from attndsl.analysis import blockmap

    pat = attndsl.compile("pattern p:\n    mask = sliding(37) or sinks(3)\n")["p"]
    whole = pat.block_map(300, 700, block=(16, 32))
    monkeypatch.setattr(blockmap, "CHUNK_ELEMENTS", 1)
    fresh = attndsl.compile("pattern p:\n    mask = sliding(37) or sinks(3)\n")["p"]
    np.testing.assert_array_equal(fresh.block_map(300, 700, block=(16, 32)), whole)


def test_dense_mask_windows_of_a_call_past_2_31_keys():
    pat = PROG["decode"]
    last = pat.dense_mask(1, LONG, cols=range(LONG - 64, LONG))
    assert last.shape == (1, 1, 64)
    np.testing.assert_array_equal(last[0, 0], np.arange(LONG - 64, LONG) >= LONG - WINDOW)
    first = pat.dense_mask(1, LONG, cols=(0, 8))
    np.testing.assert_array_equal(first[0, 0], np.arange(8) < SINKS)


def test_dense_mask_windows_are_slices_of_the_whole_mask():
    pat = attndsl.compile("pattern p(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n")["p"]
    doc = np.repeat([0, 1, 2], [5, 9, 6])
    whole = pat.dense_mask(17, 20, heads=2, doc=doc)
    np.testing.assert_array_equal(pat.dense_mask(17, 20, heads=2, rows=range(3, 11),
                                                 cols=(4, 19), doc=doc), whole[:, 3:11, 4:19])
    assert pat.dense_mask(17, 20, rows=(5, 5), doc=doc).shape == (1, 0, 20)


@pytest.mark.parametrize("window", [range(0, 9, 2), (3, 2), (0, 21), (-1, 4), (0.0, 4), "0:4",
                                    (True, 3), [1, 2, 3]])
def test_dense_mask_windows_are_checked(window):
    pat = attndsl.compile("pattern p:\n    mask = causal\n")["p"]
    with pytest.raises(attndsl.AttnError, match="'cols'"):
        pat.dense_mask(20, 20, cols=window)


def test_lengths_beyond_the_supported_maximum_are_rejected():
    pat = PROG["window"]
    q = torch.zeros(1, 1, 1, D)
    with pytest.raises(attndsl.AttnError, match="'k'"):
        k = torch.zeros(1, 1, 1, D).expand(1, 1, 2 ** 40 + 1, D)
        pat(q, k, k)
    with pytest.raises(attndsl.AttnError, match="'kv_len'"):
        pat.block_map(1, 2 ** 40 + 1)
    with pytest.raises(attndsl.AttnError, match="'q_len'"):
        pat.dense_mask(2 ** 63 + 5, 1)


def test_the_grid_stays_within_what_a_gpu_launches():
    """Batch x heads on grid axis 1 would stop at 65535; they share axis 0 with the query
    tiles (2**31 - 1 programs), and a call beyond that is an AttnError before any launch."""
    from attndsl.codegen.config import launch_grid

    from attndsl.runtime import launches

    q = torch.zeros(70000, 1, 1, 16)                    # 70000 x 1 heads: axis 1 could not
    planned, _ = launches(PROG["window"].bound(), q, q, q, 0.25)
    assert [launch.grid for launch in planned] == [(70000, 1, 1)]
    assert launch_grid(3, 5, 2) == (15, 2, 1)
    with pytest.raises(attndsl.AttnError, match="'q' and 'k'"):
        launch_grid(2 ** 20, 2 ** 12, 1)
    with pytest.raises(attndsl.AttnError, match="residue groups"):
        launch_grid(1, 1, 70000)
