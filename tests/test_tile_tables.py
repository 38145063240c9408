"""Tile tables on the device (codegen/tile_tables.py): the band form holds the same tiles as the
lists it replaces, is chosen exactly when every row is one full run and at most two partial
runs, and the kernel reads both forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attndsl.codegen import kernel
from attndsl.codegen.tile_tables import band_tables, from_classes
from hypothesis import given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.runtime import launches


def _runs_of(row: list[int]) -> int:
    return sum(1 for i, x in enumerate(row) if i == 0 or x != row[i - 1] + 1)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.sampled_from([0, 0, 1, 2]), min_size=9, max_size=9), min_size=1, max_size=5))
def test_band_tables_hold_the_tiles_in_runs(rows):
    classes = torch.tensor(rows, dtype=torch.int8)[None]            # [1, N, M]
    full_rows = [[j for j, c in enumerate(r) if c == 2] for r in rows]
    part_rows = [[j for j, c in enumerate(r) if c == 1] for r in rows]
    band = band_tables(classes)
    fits = all(_runs_of(f) <= 2 for f in full_rows) and all(_runs_of(p) <= 3 for p in part_rows)
    assert (band is not None) == fits
    if band is None:
        tiles = from_classes(classes[None, None], [(0, 1, 0, 1)])
        assert not tiles.band
        for i, (f, p) in enumerate(zip(full_rows, part_rows)):
            assert tiles.full_idx[0, 0, 0, i, :tiles.full_num[0, 0, 0, i]].tolist() == f
            assert tiles.part_idx[0, 0, 0, i, :tiles.part_num[0, 0, 0, i]].tolist() == p
        return
    b_fn, b_full, b_pn, b_part = (t.numpy() for t in band)
    for i, (f, p) in enumerate(zip(full_rows, part_rows)):
        start0, len0, start1 = b_full[0, i]
        assert [start0 + j if j < len0 else start1 + (j - len0) for j in range(b_fn[0, i])] == f
        start0, len0, start1, len1, start2 = b_part[0, i]
        rebuilt = [start0 + j if j < len0 else start1 + (j - len0) if j < len0 + len1
                   else start2 + (j - len0 - len1) for j in range(b_pn[0, i])]
        assert rebuilt == p


@pytest.mark.parametrize("src,band", [
    ("pattern p(w = 9):\n    mask = causal and (sinks(2) or sliding(w))\n", True),   # sinks: run 2
    ("pattern p(w = 9):\n    mask = causal and sliding(w)\n", True),
    ("pattern p():\n    mask = causal\n", True),
    ("pattern p():\n    mask = k % 64 < 4 or q == k\n", True),         # three partial runs
    ("pattern p():\n    mask = k < 32 or 64 <= k < 96 or q == k\n", True),    # two full runs
    ("pattern p():\n    mask = k < 32 or 64 <= k < 96 or k >= 128 or q == k\n", False)])   # three
def test_the_kernel_reads_both_forms(src, band, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNDSL_GATHER", "0")       # one launch on tile tables, no gathers
    pat = attndsl.compile(src)["p"].bind()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=g) for _ in range(3))
    (launch,), _ = launches(pat.bound(), q, k, v, 0.25)
    assert launch.constants["BAND"] is band
    out, lse = kernel.run(launch, interpret=True)
    ref_out, ref_lse = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(), scale=0.25)
    assert np.abs(out.double().numpy() - ref_out).max() < 1e-5
    assert np.allclose(lse.double().numpy(), ref_lse, atol=1e-5)


@pytest.mark.parametrize("src,kv_len,d,even", [
    ("pattern p():\n    mask = causal\n", 128, 16, True),
    ("pattern p():\n    mask = causal\n", 128, 24, True),                 # head dim padded
    ("pattern p():\n    mask = causal\n    score = score - 0.1 * float(q - k)\n", 96, 16, True),
    ("pattern p(w = 40):\n    mask = causal and sliding(w)\n", 100, 16, False),
    ("pattern p(w = 9, d = 4):\n    mask = dilated(w, d)\n", 256, 16, True),   # groups of 64 keys
    ("pattern p(w = 9, d = 4):\n    mask = dilated(w, d)\n", 250, 16, False),
])
def test_tiles_inside_the_keys_load_without_masks(src, kv_len, d, even, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    pat = attndsl.compile(src)["p"].bind()
    g = torch.Generator().manual_seed(kv_len + d)
    q, k, v = (torch.randn(2, 2, kv_len, d, generator=g) for _ in range(3))
    planned, finish = launches(pat.bound(), q, k, v, 0.3)
    assert all(launch.constants["EVEN_N"] is even for launch in planned)
    out, lse = finish([kernel.run(launch, interpret=True) for launch in planned])
    ref_out, ref_lse = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(), scale=0.3)
    assert np.abs(out.double().numpy() - ref_out).max() < 1e-5
    assert np.allclose(lse.double().numpy(), ref_lse, atol=1e-5)
