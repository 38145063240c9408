"""Tile classes count a pair as allowed only where the score clause is not -inf (section 1)."""

from __future__ import annotations

import numpy as np
import pytest

import attndsl
from attndsl.analysis.allowed import finite
from attndsl.blocks import block_map_by_tiles

SOURCE = """
pattern by_score(w = 3):
    mask = full
    score = score if abs(q - k) <= w else -inf

pattern logged:
    mask = causal
    score = log(score)

pattern divided(d = 0.0):
    mask = causal
    score = score / d

pattern biased(bias: float[]):
    mask = causal
    score = score + bias[abs(q - k)]
"""


@pytest.fixture(scope="module")
def prog():
    return attndsl.compile(SOURCE)


def test_position_dependent_minus_inf_makes_tiles_partial_or_empty(prog):
    pat = prog["by_score"]
    bm = pat.block_map(32, 32, block=(4, 4))
    # |q - k| <= 3: diagonal tiles full, the neighbours partial, everything else empty
    idx = np.arange(8)
    dist = np.abs(idx[:, None] - idx[None, :])
    want = np.where(dist == 0, 2, np.where(dist == 1, 1, 0))
    assert np.array_equal(bm[0], want)
    assert np.array_equal(bm, block_map_by_tiles(pat.grid(32, 32, 1, 1, {}), (4, 4)))
    # the reference agrees: rows only see |q - k| <= 3
    q = np.random.default_rng(0).standard_normal((1, 1, 32, 8))
    out, lse = pat.reference(q, q, q)
    assert np.isfinite(lse).all()


def test_score_that_may_be_minus_inf_never_gives_full_tiles(prog):
    # log(score) is -inf where score is 0 (and NaN below): no tile can be proved full
    for name in ("logged", "divided"):
        bm = prog[name].block_map(64, 64, block=(8, 8))
        assert (bm != 2).all(), name
        assert (bm[0][np.tril_indices(8)] == 1).all()


def test_float_tensor_finiteness_is_read_from_the_call(prog):
    pat = prog["biased"]
    finite_bias = np.zeros(64)
    bm = pat.block_map(64, 64, block=(8, 8), bias=finite_bias)
    assert (bm[0][np.tril_indices(8, -1)] == 2).all()
    masked_bias = np.zeros(64)
    masked_bias[5] = -np.inf                       # a bias can mask pairs too
    bm = pat.block_map(64, 64, block=(8, 8), bias=masked_bias)
    assert (bm != 2).all()                         # which pairs it masks is not analysed
    brute = block_map_by_tiles(pat.grid(64, 64, 1, 1, {"bias": masked_bias}), (8, 8))
    assert ((bm == 0) == (brute == 0)).all()       # sound, and empty exactly where it is
    assert (brute == 2).any()                      # (some tiles are in fact full)


def test_finite_condition_shapes(prog):
    ir = prog["by_score"].ir
    cond = finite(ir.score, {"w": 3}, {})
    assert not cond.uses(attndsl.ir.Op.SCORE)
    assert cond.uses(attndsl.ir.Op.ABS)            # the branch condition survives
