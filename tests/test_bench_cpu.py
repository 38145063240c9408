"""bench/bench_cpu.py: its FlexAttention mask_mods match the patterns, and its smoke run works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")

pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture(scope="module")
def bench_cpu():
    sys.path.insert(0, BENCH)
    try:
        import bench_cpu

        yield bench_cpu
    finally:
        sys.path.remove(BENCH)


def test_mask_mods_match_dense_mask(bench_cpu):
    """Every case's mask_mod equals attndsl's dense_mask on every pair (MoBA: 16 blocks, selection
    from q and k), at a length where the windows, globals and random blocks are all in play."""
    _, args = bench_cpu.parse([])
    bench_cpu.MOBA.params["block"] = 64
    try:
        for cc in bench_cpu.BENCH:
            got = bench_cpu.check_mask(cc, 1024, args)
            assert got["differ"] == 0, (cc.key, got)
            assert 0.0 < got["density"] < 1.0 or cc.key in ("longformer_512_64",), (cc.key, got)
    finally:
        bench_cpu.MOBA.params["block"] = 256


@pytest.mark.slow
def test_smoke_run():
    """--smoke (no torch.compile, N = 256): every step runs and every check passes (exit 0)."""
    run = subprocess.run([sys.executable, os.path.join(BENCH, "bench_cpu.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "| causal | 256 |" in out
    assert "identical for causal, sliding_1024, dilated_256_4, packed_16_docs, longformer_512_64, " \
           "bigbird, moba" in out
    assert "**FAIL**" not in out and "Errors:" not in out
    assert "attndsl/SDPA" in out and "linearity, sliding window 32" in out
