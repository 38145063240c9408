"""The meaning of a pattern (LANGUAGE.md section 1) and of the selectors (sections 4 and 5),
checked against straightforward NumPy / pure-Python implementations written from the text.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from conftest import grid, naive_attention, pattern, qkv, raw_scores

import attndsl
from attndsl import AttnCallError

# ----------------------------------------------------------------------------- positions


@pytest.mark.parametrize("q_len, kv_len", [(6, 6), (3, 10), (1, 9), (1, 1), (9, 4)])
def test_positions_are_bottom_right_aligned(q_len, kv_len):
    # q = i + (kv_len - q_len), k = j
    for value in range(-q_len, kv_len + 1):
        expr = f"q == {value}" if value >= 0 else f"q == -{-value}"
        got = pattern(f"pattern t:\n    mask = {expr}\n").dense_mask(q_len, kv_len)[0]
        rows = np.arange(q_len) + kv_len - q_len
        assert np.array_equal(got, np.repeat((rows == value)[:, None], kv_len, axis=1))
    got = pattern("pattern t:\n    mask = k == 2\n").dense_mask(q_len, kv_len)[0]
    assert np.array_equal(got, np.broadcast_to(np.arange(kv_len) == 2, (q_len, kv_len)))


def test_one_decoding_query_is_the_newest_token():
    got = pattern("pattern t:\n    mask = causal\n").dense_mask(1, 50)
    assert got.shape == (1, 1, 50) and got.all()               # q = 49 sees every key
    got = pattern("pattern t:\n    mask = sliding(8)\n").dense_mask(1, 50)[0, 0]
    assert np.array_equal(np.flatnonzero(got), np.arange(42, 50))


def test_causal_with_fewer_queries_than_keys():
    got = pattern("pattern t:\n    mask = causal\n").dense_mask(3, 7)[0]
    assert got.tolist() == [[j <= i + 4 for j in range(7)] for i in range(3)]


def test_more_queries_than_keys_gives_negative_positions():
    got = pattern("pattern t:\n    mask = causal\n").dense_mask(5, 3)[0]
    assert got.tolist() == [[j <= i - 2 for j in range(3)] for i in range(5)]
    assert not got[:2].any()


def test_length_builtins_and_heads():
    pat = pattern("pattern t:\n    mask = q_len == 3 and kv_len == 7 and heads == 4 and kv_heads == 2\n")
    assert pat.dense_mask(3, 7, heads=4, kv_heads=2).all()
    assert not pat.dense_mask(3, 7, heads=4).any()            # kv_heads defaults to heads
    got = pattern("pattern t:\n    mask = h == k\n").dense_mask(2, 4, heads=3)
    for h in range(3):
        assert np.array_equal(got[h], np.broadcast_to(np.arange(4) == h, (2, 4)))


def test_dense_mask_shape_and_dtype():
    m = pattern("pattern t:\n    mask = causal\n").dense_mask(5, 6, heads=3)
    assert m.shape == (3, 5, 6) and m.dtype == np.bool_
    assert pattern("pattern t:\n    mask = causal\n").dense_mask(0, 6).shape == (1, 0, 6)
    assert pattern("pattern t:\n    mask = causal\n").dense_mask(4, 0).shape == (1, 4, 0)


# ----------------------------------------------------------------------------- attention


def _check_reference(pat, q, k, v, allowed, s, scale=None, atol=1e-10, **tensors):
    out, lse = pat.reference(q, k, v, scale=scale, **tensors)
    want_out, want_lse = naive_attention(q, k, v, allowed, s)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(out, want_out, atol=atol, rtol=1e-9)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], atol=atol, rtol=1e-9)
    return out, lse


@pytest.mark.parametrize("heads, kv_heads", [(6, 6), (6, 3), (6, 2), (6, 1), (4, 2)])
def test_gqa_query_head_reads_kv_head_h_div_group(rng, heads, kv_heads):
    # a head-dependent mask makes a wrong kv head visible
    pat = pattern("pattern t:\n    mask = causal and (h % 2 == 0 or sliding(3))\n")
    q, k, v = qkv(rng, 2, heads, kv_heads, 9, 9)
    h, qq, kk = grid(9, 9, heads)
    allowed = np.broadcast_to((kk <= qq) & ((h % 2 == 0) | ((0 <= qq - kk) & (qq - kk < 3))),
                              (2, heads, 9, 9))
    _check_reference(pat, q, k, v, allowed, raw_scores(q, k))


def test_gqa_wrong_grouping_would_be_detected(rng):
    # the check above is meaningful: the interleaved grouping h % kv_heads gives other numbers
    pat = pattern("pattern t:\n    mask = full\n")
    q, k, v = qkv(rng, 1, 4, 2, 5, 5)
    out, _ = pat.reference(q, k, v)
    wrong_k, wrong_v = k[:, [0, 1, 0, 1]], v[:, [0, 1, 0, 1]]
    wrong, _ = naive_attention(q, wrong_k, wrong_v, np.ones((1, 4, 5, 5), bool),
                               raw_scores(q, wrong_k))
    assert not np.allclose(out, wrong)


@pytest.mark.parametrize("q_len, kv_len", [(7, 7), (3, 11), (1, 8), (10, 4)])
def test_reference_matches_naive_attention(rng, q_len, kv_len):
    pat = pattern("pattern t(w = 4):\n    mask = causal and (sinks(2) or sliding(w))\n")
    q, k, v = qkv(rng, 2, 4, 2, q_len, kv_len, d=6, dv=5)
    _, qq, kk = grid(q_len, kv_len)
    allowed = np.broadcast_to((kk <= qq) & ((kk < 2) | ((0 <= qq - kk) & (qq - kk < 4))),
                              (2, 4, q_len, kv_len))
    _check_reference(pat, q, k, v, allowed, raw_scores(q, k))


@pytest.mark.parametrize("scale", [None, 0.1, 1.0, 2.5, 0.0])
def test_scale_argument(rng, scale):
    pat = pattern("pattern t:\n    mask = causal\n")
    q, k, v = qkv(rng, 1, 2, 2, 6, 6, d=16)
    _, qq, kk = grid(6, 6)
    allowed = np.broadcast_to(kk <= qq, (1, 2, 6, 6))
    _check_reference(pat, q, k, v, allowed, raw_scores(q, k, scale), scale=scale)


def test_default_scale_is_one_over_sqrt_head_dim(rng):
    pat = pattern("pattern t:\n    mask = full\n")
    q, k, v = qkv(rng, 1, 1, 1, 4, 4, d=9)
    a, _ = pat.reference(q, k, v)
    b, _ = pat.reference(q, k, v, scale=1 / 3)
    c, _ = pat.reference(q, k, v, scale=1.0)
    np.testing.assert_allclose(a, b, atol=1e-12)
    assert not np.allclose(a, c)


def test_score_clause(rng):
    src = """pattern t(slope = 0.25):
    mask = causal
    score = score - slope * float(q - k) + (0.5 if h == 1 else 0.0)
"""
    pat = pattern(src)
    q, k, v = qkv(rng, 2, 2, 1, 5, 8)
    h, qq, kk = grid(5, 8, 2)
    s = raw_scores(q, k) - 0.25 * (qq - kk) + np.where(h == 1, 0.5, 0.0)
    _check_reference(pat, q, k, v, np.broadcast_to(kk <= qq, s.shape), s)


def test_score_clause_sees_the_scaled_score(rng):
    pat = pattern("pattern t:\n    mask = full\n    score = 30.0 * tanh(score / 30.0)\n")
    q, k, v = qkv(rng, 1, 1, 1, 4, 4)
    s = 30.0 * np.tanh(raw_scores(q, k, 0.7) / 30.0)
    _check_reference(pat, q, k, v, np.ones(s.shape, bool), s, scale=0.7)


def test_score_minus_inf_disallows_the_pair(rng):
    src = "pattern t:\n    mask = causal\n    score = score if (q + k) % 3 != 0 else -inf\n"
    pat = pattern(src)
    q, k, v = qkv(rng, 1, 2, 2, 7, 7)
    _, qq, kk = grid(7, 7)
    s0 = raw_scores(q, k)
    s = np.where((qq + kk) % 3 != 0, s0, -np.inf)
    out, lse = _check_reference(pat, q, k, v, np.broadcast_to(kk <= qq, s.shape), s)
    # row 0 (q = 0) only has k = 0 with q + k = 0: no allowed key at all
    assert np.all(out[:, :, 0] == 0) and np.all(np.isneginf(lse[:, :, 0]))
    # a -inf score on an allowed pair is not the same as a tiny score
    allowed_finite = (kk <= qq) & ((qq + kk) % 3 != 0)
    assert np.isfinite(lse[:, :, 1:]).all() == bool(allowed_finite[0, 1:].any(axis=-1).all())


def test_empty_rows_give_zero_and_minus_inf_never_nan(rng):
    q, k, v = qkv(rng, 2, 2, 2, 6, 4)
    for src in ["pattern t:\n    mask = false\n",
                "pattern t:\n    mask = causal\n",                    # q_len > kv_len: first rows empty
                "pattern t:\n    mask = true\n    score = -inf\n",
                "pattern t:\n    mask = q % 2 == 0\n    score = score * 0.0 - inf\n"]:
        out, lse = pattern(src).reference(q, k, v)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        m = pattern(src).dense_mask(6, 4, heads=2)
        empty = np.isneginf(lse)
        assert np.all(out[empty] == 0.0)
        assert empty.any()
        if "score" not in src:
            assert np.array_equal(empty[0], ~m.any(axis=-1))


def test_zero_length_keys():
    pat = pattern("pattern t:\n    mask = true\n")
    q, k, v = np.ones((1, 1, 3, 4)), np.ones((1, 1, 0, 4)), np.ones((1, 1, 0, 4))
    out, lse = pat.reference(q, k, v)
    assert out.shape == (1, 1, 3, 4) and np.all(out == 0) and np.all(np.isneginf(lse))


# ----------------------------------------------------------------------------- tensor inputs


def test_tensor_input_without_batch_dimension_serves_every_batch_element(rng):
    pat = pattern("pattern t(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n")
    doc = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    q, k, v = qkv(rng, 2, 2, 1, 8, 8)
    _, qq, kk = grid(8, 8)
    allowed = np.broadcast_to((kk <= qq) & (doc[qq] == doc[kk]), (2, 2, 8, 8))
    _check_reference(pat, q, k, v, allowed, raw_scores(q, k), doc=doc)


def test_tensor_input_with_batch_dimension_differs_per_batch_element(rng):
    pat = pattern("pattern t(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n")
    docs = np.array([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 3, 3], [5, 5, 5, 5, 5, 5, 5, 5]])
    q, k, v = qkv(rng, 3, 2, 2, 8, 8)
    _, qq, kk = grid(8, 8)
    allowed = np.stack([np.broadcast_to((kk <= qq) & (d[qq] == d[kk]), (2, 8, 8)) for d in docs])
    _check_reference(pat, q, k, v, allowed, raw_scores(q, k), doc=docs)
    # and element b really uses row b: swapping the rows swaps the outputs
    out, _ = pat.reference(q, k, v, doc=docs)
    out_swapped, _ = pat.reference(q, k, v, doc=docs[[1, 0, 2]])
    assert not np.allclose(out[0], out_swapped[0])
    # a batch dimension of size 1 serves every element
    out1, _ = pat.reference(q, k, v, doc=docs[:1])
    out0, _ = pat.reference(q, k, v, doc=docs[0])
    np.testing.assert_array_equal(out1, out0)


def test_float_tensor_inputs_in_the_score(rng):
    src = """pattern t(bias: float[][], w: float[]):
    mask = causal
    score = score + bias[h, max(q - k, 0)] * w[k]
"""
    pat = pattern(src)
    bias = rng.standard_normal((2, 6))
    w = rng.standard_normal((2, 6))                       # batch of 2
    q, k, v = qkv(rng, 2, 2, 2, 6, 6)
    h, qq, kk = grid(6, 6, 2)
    causal = kk <= qq
    d = np.where(causal, qq - kk, 0)
    s = raw_scores(q, k) + np.stack([bias[h, d] * w[b][kk] for b in range(2)])
    _check_reference(pat, q, k, v, np.broadcast_to(causal, s.shape), s, bias=bias, w=w)


def test_dense_mask_with_tensor_inputs_of_rank_two_and_three(rng):
    src = "pattern t(a: int[][], c: float[][][]):\n    mask = a[q, k] == 1 and c[h, q, k] > 0.0\n"
    a = rng.integers(0, 2, (6, 6))
    c = rng.standard_normal((3, 6, 6))
    h, qq, kk = grid(5, 6, 3)                 # q runs over 1..5 (bottom-right aligned)
    want = (a[qq, kk] == 1) & (c[h, qq, kk] > 0)
    got = pattern(src).dense_mask(5, 6, heads=3, a=a, c=c)
    assert np.array_equal(got, want)
    got = pattern(src).dense_mask(5, 6, heads=3, a=a[None], c=c[None])   # batch dimension of 1
    assert np.array_equal(got, want)


def test_index_out_of_range_raises_before_anything_returns(rng):
    pat = pattern("pattern t(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n")
    q, k, v = qkv(rng, 2, 1, 1, 8, 8)
    with pytest.raises(AttnCallError, match="out of range"):
        pat.reference(q, k, v, doc=np.zeros(7, np.int64))
    with pytest.raises(AttnCallError, match="out of range"):
        pat.dense_mask(8, 8, doc=np.zeros(7, np.int64))
    with pytest.raises(AttnCallError, match="out of range"):
        pat.reference(q, k, v, doc=np.zeros((2, 7), np.int64))
    # a value read from the tensor used as an index: only the second batch element is bad
    nested = pattern("pattern t(doc: int[]):\n    mask = doc[doc[k]] == 0\n")
    docs = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 8]])
    with pytest.raises(AttnCallError, match="out of range"):
        nested.reference(q, k, v, doc=docs)
    nested.reference(q, k, v, doc=docs[:1])
    with pytest.raises(attndsl.AttnError):
        pattern("pattern t(doc: int[]):\n    mask = doc[q - 1] == 0\n").dense_mask(4, 4, doc=np.zeros(4, int))
    with pytest.raises(attndsl.AttnError):     # a negative index is out of range too (no wrap-around)
        pattern("pattern t(doc: int[]):\n    mask = doc[k - 2] == 0\n").dense_mask(4, 4, doc=np.zeros(8, int))


def test_index_of_a_tensor_value_out_of_range(rng):
    # the index is itself read from a tensor: doc_start[doc[k]]
    src = "pattern t(doc: int[], start: int[]):\n    mask = k >= start[doc[q]]\n"
    pat = pattern(src)
    doc = np.array([0, 0, 1, 1, 2])
    got = pat.dense_mask(5, 5, doc=doc, start=np.array([0, 2, 4]))
    _, qq, kk = grid(5, 5)
    assert np.array_equal(got[0], (kk >= np.array([0, 2, 4])[doc[qq]])[0])
    with pytest.raises(AttnCallError, match="'start'"):
        pat.dense_mask(5, 5, doc=doc, start=np.array([0, 2]))


GUARDED_DOC = [0, 0, 1, 0, 1]


def _d(i):
    """doc[i] as Python sees it; an out-of-range read would be a test bug (raises IndexError)."""
    if not 0 <= i < len(GUARDED_DOC):
        raise IndexError(i)
    return GUARDED_DOC[i]


@pytest.mark.parametrize("expr, py", [
    ("(doc[q - 1] if q > 0 else -1) == 0", lambda q, k: (_d(q - 1) if q > 0 else -1) == 0),
    ("q > 0 and doc[q - 1] == 0", lambda q, k: q > 0 and _d(q - 1) == 0),
    ("q == 0 or doc[q - 1] == 0", lambda q, k: q == 0 or _d(q - 1) == 0),
    ("not (q > 0 and doc[q - 1] != 0)", lambda q, k: not (q > 0 and _d(q - 1) != 0)),
    ("(0 if q == 0 else doc[q - 1]) == 0", lambda q, k: (0 if q == 0 else _d(q - 1)) == 0),
    ("q >= 1 and (k < 1 or doc[q - 1] == doc[k - 1])",
     lambda q, k: q >= 1 and (k < 1 or _d(q - 1) == _d(k - 1))),
    ("k > 0 and q > 0 and doc[k - 1] == doc[q - 1] and doc[q - 1] == 0",
     lambda q, k: k > 0 and q > 0 and _d(k - 1) == _d(q - 1) and _d(q - 1) == 0),
])
def test_index_guarded_where_not_live_is_fine(expr, py):
    pat = pattern(f"pattern t(doc: int[]):\n    mask = {expr}\n")
    got = pat.dense_mask(5, 5, doc=np.array(GUARDED_DOC))[0]
    want = np.array([[bool(py(i, j)) for j in range(5)] for i in range(5)])
    assert np.array_equal(got, want)


def test_score_clause_indexes_are_checked_at_every_pair_not_only_allowed_ones(rng):
    # the score clause is defined at every (h, i, j) (section 1): an unguarded index that is out
    # of range where the mask is false is still an error, in the reference and in the torch backend
    import torch
    pat = pattern("pattern t(bias: float[]):\n    mask = causal\n    score = score + bias[q - k]\n")
    q, k, v = qkv(rng, 1, 1, 1, 6, 6)
    with pytest.raises(AttnCallError, match="out of range"):
        pat.reference(q, k, v, bias=np.zeros(6))
    with pytest.raises(AttnCallError, match="out of range"):
        pat(*(torch.as_tensor(x) for x in (q, k, v)), bias=torch.zeros(6))
    # also when the bad pairs are all in key tiles that no query tile needs (skipped tiles)
    far = pattern("pattern t(bias: float[]):\n    mask = k < 200\n    score = score + bias[k]\n")
    q, k, v = qkv(rng, 1, 1, 1, 64, 512)
    with pytest.raises(AttnCallError, match="out of range"):
        far.reference(q, k, v, bias=np.zeros(256))
    with pytest.raises(AttnCallError, match="out of range"):
        far(*(torch.as_tensor(x) for x in (q, k, v)), bias=torch.zeros(256))


def test_unguarded_index_out_of_range_in_the_other_branch_still_raises():
    pat = pattern("pattern t(doc: int[]):\n    mask = (doc[q - 1] if q >= 0 else 0) == 0\n")
    with pytest.raises(AttnCallError, match="out of range"):
        pat.dense_mask(4, 4, doc=np.zeros(4, int))


def test_index_guard_in_the_score_clause(rng):
    src = """pattern t(bias: float[]):
    mask = causal
    score = score + (bias[q - k] if 0 <= q - k < 3 else 0.0)
"""
    pat = pattern(src)
    bias = np.array([0.5, -0.25, 1.0])
    q, k, v = qkv(rng, 1, 1, 1, 6, 6)
    _, qq, kk = grid(6, 6)
    d = qq - kk
    s = raw_scores(q, k) + np.where((d < 3) & (d >= 0), bias[np.clip(d, 0, 2)], 0.0)
    _check_reference(pat, q, k, v, np.broadcast_to(kk <= qq, s.shape), s, bias=bias)


# ----------------------------------------------------------------------------- selectors


def _pooled_scores(query, key, heads, kv_heads, q_len, kv_len, b):
    """S[h, I, J] from section 4 with explicit loops (I, here blk, an absolute block index)."""
    off = kv_len - q_len
    group = heads // kv_heads
    nkb = math.ceil(kv_len / b)
    S = {}
    for h in range(heads):
        for i in range(q_len):
            blk = (i + off) // b
            if (h, blk) in S:
                continue
            rows = [r for r in range(q_len) if (r + off) // b == blk]
            pq = np.mean([query[h, r] for r in rows], axis=0)
            scores = []
            for J in range(nkb):
                cols = [c for c in range(kv_len) if c // b == J]
                pk = np.mean([key[h // group, c] for c in cols], axis=0)
                scores.append(float(pq @ pk))
            S[h, blk] = scores
    return S


def my_topk(query, key, heads, kv_heads, q_len, kv_len, n, b, causal=True):
    S = _pooled_scores(query, key, heads, kv_heads, q_len, kv_len, b)
    off = kv_len - q_len
    out = np.zeros((heads, q_len, kv_len), bool)
    for h in range(heads):
        for i in range(q_len):
            blk = (i + off) // b
            cands = [J for J in range(len(S[h, blk])) if (J < blk or not causal)]
            chosen = sorted(cands, key=lambda J: (-S[h, blk][J], J))[:n]
            for j in range(kv_len):
                out[h, i, j] = j // b in chosen
    return out


def my_topp(query, key, heads, kv_heads, q_len, kv_len, p, b, causal=True, scale=None):
    S = _pooled_scores(query, key, heads, kv_heads, q_len, kv_len, b)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    off = kv_len - q_len
    out = np.zeros((heads, q_len, kv_len), bool)
    for h in range(heads):
        for i in range(q_len):
            blk = (i + off) // b
            cands = [J for J in range(len(S[h, blk])) if (J < blk or not causal)]
            if not cands:
                continue
            m = max(scale * S[h, blk][J] for J in cands)
            w = {J: math.exp(scale * S[h, blk][J] - m) for J in cands}
            total = sum(w.values())
            chosen, mass = [], 0.0
            for J in sorted(cands, key=lambda J: (-S[h, blk][J], J)):
                chosen.append(J)
                mass += w[J] / total
                if mass >= p:
                    break
            for j in range(kv_len):
                out[h, i, j] = j // b in chosen
    return out


def my_route(query, key, c, heads, kv_heads):
    group = heads // kv_heads
    H, Lq, _ = query.shape
    Lk = key.shape[1]
    out = np.zeros((H, Lq, Lk), bool)
    for h in range(H):
        def cluster(x, h=h):
            scores = [float(x @ c[h, m]) for m in range(c.shape[1])]
            return scores.index(max(scores))          # ties: the smaller m
        cq = [cluster(query[h, i]) for i in range(Lq)]
        ck = [cluster(key[h // group, j]) for j in range(Lk)]
        for i in range(Lq):
            for j in range(Lk):
                out[h, i, j] = cq[i] == ck[j]
    return out


M64 = (1 << 64) - 1


def my_splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def my_random_blocks(q_len, kv_len, r, b, seed=0):
    off = kv_len - q_len
    nkb = math.ceil(kv_len / b)
    out = np.zeros((q_len, kv_len), bool)
    for i in range(q_len):
        blk = (i + off) // b
        keys = [(my_splitmix64((seed * 2 ** 40 + blk * 2 ** 20 + J) & M64), J) for J in range(nkb)]
        chosen = {J for _, J in sorted(keys)[:r]}
        for j in range(kv_len):
            out[i, j] = j // b in chosen
    return out


def test_splitmix64_known_answer():
    assert my_splitmix64(0) == 0xE220A8397B1DCDAF
    from attndsl.selectors import splitmix64
    assert int(splitmix64(np.array([0], np.uint64))[0]) == 0xE220A8397B1DCDAF
    xs = [1, 2, 12345, 2 ** 40, 2 ** 63 + 5, M64]
    got = splitmix64(np.array(xs, np.uint64))
    assert [int(g) for g in got] == [my_splitmix64(x) for x in xs]


@pytest.mark.parametrize("q_len, kv_len, r, b, seed", [
    (64, 64, 2, 8, 0), (64, 64, 3, 8, 7), (20, 70, 2, 8, 1), (1, 100, 3, 16, 0),
    (37, 37, 1, 5, 123456789), (16, 16, 0, 4, 0), (16, 16, 9, 4, 0), (12, 5, 1, 2, 3),
    (40, 40, 2, 8, -1),
])
def test_random_blocks_against_splitmix64(q_len, kv_len, r, b, seed):
    seed_text = str(seed) if seed >= 0 else f"-{-seed}"
    pat = pattern(f"pattern t:\n    mask = random_blocks({r}, {b}, seed = {seed_text})\n")
    got = pat.dense_mask(q_len, kv_len, heads=2)
    want = my_random_blocks(q_len, kv_len, r, b, seed)
    assert np.array_equal(got[0], want) and np.array_equal(got[1], want)
    # each query row sees exactly min(r, nkb) key blocks
    nkb = math.ceil(kv_len / b)
    blocks_seen = {tuple(sorted({j // b for j in np.flatnonzero(row)})) for row in want}
    assert all(len(s) == min(r, nkb) for s in blocks_seen)


def test_random_blocks_seed_parameter_changes_the_blocks():
    pat = pattern("pattern t(s = 0):\n    mask = random_blocks(2, 8, seed = s)\n")
    a = pat.dense_mask(64, 64)
    b = pat.bind(s=1).dense_mask(64, 64)
    assert not np.array_equal(a, b)
    assert np.array_equal(b[0], my_random_blocks(64, 64, 2, 8, 1))


def _selector_inputs(rng, heads, kv_heads, q_len, kv_len, d=8):
    return rng.standard_normal((heads, q_len, d)), rng.standard_normal((kv_heads, kv_len, d))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads, q_len, kv_len, n, b", [
    (2, 1, 40, 40, 2, 8), (4, 2, 13, 45, 1, 6), (1, 1, 1, 64, 3, 8), (2, 2, 33, 33, 5, 4),
    (3, 3, 20, 20, 10, 4),                   # n larger than the number of candidates
    (1, 1, 30, 12, 1, 4),                    # q_len > kv_len: negative query blocks
])
def test_topk_blocks_against_a_loop(rng, causal, heads, kv_heads, q_len, kv_len, n, b):
    query, key = _selector_inputs(rng, heads, kv_heads, q_len, kv_len)
    c = "true" if causal else "false"
    pat = pattern(f"pattern t:\n    mask = topk_blocks({n}, {b}, causal = {c})\n")
    got = pat.dense_mask(q_len, kv_len, heads=heads, kv_heads=kv_heads, query=query, key=key)
    want = my_topk(query, key, heads, kv_heads, q_len, kv_len, n, b, causal)
    assert np.array_equal(got, want)


def test_topk_blocks_default_is_causal(rng):
    query, key = _selector_inputs(rng, 1, 1, 32, 32)
    a = pattern("pattern t:\n    mask = topk_blocks(2, 4)\n").dense_mask(32, 32, query=query, key=key)
    b = pattern("pattern t:\n    mask = topk_blocks(2, 4, causal = true)\n").dense_mask(
        32, 32, query=query, key=key)
    assert np.array_equal(a, b)
    _, qq, kk = grid(32, 32)
    assert not (a & ~(kk // 4 < qq // 4)).any()         # only strictly earlier key blocks


def test_topk_blocks_ties_prefer_smaller_blocks():
    # every key block pools to the same vector: all scores tie, the n smallest J win
    d, b = 4, 4
    key = np.tile(np.array([1.0, 0.5, -0.25, 2.0]), (1, 32, 1))
    query = np.random.default_rng(3).standard_normal((1, 32, d))
    pat = pattern(f"pattern t:\n    mask = topk_blocks(2, {b}, causal = false)\n")
    got = pat.dense_mask(32, 32, query=query, key=key)[0]
    assert np.array_equal(got, np.broadcast_to(np.arange(32) < 8, (32, 32)))
    assert np.array_equal(got, my_topk(query, key, 1, 1, 32, 32, 2, b, False)[0])


def test_topk_blocks_fewer_candidates_than_n_selects_all():
    rng = np.random.default_rng(5)
    query, key = _selector_inputs(rng, 1, 1, 24, 24)
    got = pattern("pattern t:\n    mask = topk_blocks(100, 4)\n").dense_mask(24, 24, query=query, key=key)[0]
    _, qq, kk = grid(24, 24)
    assert np.array_equal(got, (kk // 4 < qq // 4)[0])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("heads, kv_heads, q_len, kv_len, b", [
    (2, 1, 40, 40, 8), (4, 2, 10, 50, 5), (1, 1, 1, 64, 8),
])
def test_topp_blocks_against_a_loop(rng, causal, p, heads, kv_heads, q_len, kv_len, b):
    query, key = _selector_inputs(rng, heads, kv_heads, q_len, kv_len)
    query *= 3                                       # spread the block probabilities
    c = "true" if causal else "false"
    pat = pattern(f"pattern t:\n    mask = topp_blocks({p}, {b}, causal = {c})\n")
    got = pat.dense_mask(q_len, kv_len, heads=heads, kv_heads=kv_heads, query=query, key=key)
    want = my_topp(query, key, heads, kv_heads, q_len, kv_len, p, b, causal)
    assert np.array_equal(got, want)


def test_topp_blocks_uses_the_call_scale(rng):
    query, key = _selector_inputs(rng, 1, 1, 32, 32)
    query *= 4
    pat = pattern("pattern t:\n    mask = topp_blocks(0.7, 4, causal = false)\n")
    q, k = query[None], key[None]
    v = np.ones_like(k)
    # through reference(): with scale 0.05 the probabilities are flat, so more blocks are kept
    for scale in (0.05, 3.0):
        want = my_topp(query, key, 1, 1, 32, 32, 0.7, 4, False, scale=scale)
        allowed = want[None]
        s = raw_scores(q, k, scale)
        out, lse = pat.reference(q, k, v, scale=scale)
        want_out, want_lse = naive_attention(q, k, v, allowed, s)
        np.testing.assert_allclose(lse, want_lse, atol=1e-10)
    flat = my_topp(query, key, 1, 1, 32, 32, 0.7, 4, False, scale=0.05).sum()
    sharp = my_topp(query, key, 1, 1, 32, 32, 0.7, 4, False, scale=3.0).sum()
    assert flat > sharp


def test_topp_blocks_ties_and_exact_mass():
    # 4 key blocks with identical pooled keys: each has probability 1/4 exactly
    key = np.tile(np.array([0.5, -1.0]), (1, 16, 1))
    query = np.random.default_rng(0).standard_normal((1, 16, 2))
    for p, n_blocks in [(0.25, 1), (0.5, 2), (0.5000001, 3), (0.75, 3), (1.0, 4), (1e-9, 1)]:
        pat = pattern(f"pattern t:\n    mask = topp_blocks({p}, 4, causal = false)\n")
        got = pat.dense_mask(16, 16, query=query, key=key)[0]
        assert np.array_equal(got, np.broadcast_to(np.arange(16) < 4 * n_blocks, (16, 16))), p


def test_topp_blocks_at_least_one_block_when_there_is_a_candidate(rng):
    query, key = _selector_inputs(rng, 1, 1, 32, 32)
    pat = pattern("pattern t:\n    mask = topp_blocks(1e-12, 4)\n")
    got = pat.dense_mask(32, 32, query=query, key=key)[0]
    for i in range(32):
        blocks = {j // 4 for j in np.flatnonzero(got[i])}
        assert len(blocks) == (1 if i // 4 > 0 else 0)      # query block 0 has no candidate


@pytest.mark.parametrize("heads, kv_heads, q_len, kv_len, C", [
    (2, 1, 16, 16, 3), (4, 2, 5, 20, 4), (1, 1, 1, 30, 2), (3, 3, 12, 12, 5),
])
def test_route_against_a_loop(rng, heads, kv_heads, q_len, kv_len, C):
    query, key = _selector_inputs(rng, heads, kv_heads, q_len, kv_len)
    c = rng.standard_normal((heads, C, query.shape[-1]))
    pat = pattern("pattern t(c: float[][][]):\n    mask = route(c)\n")
    got = pat.dense_mask(q_len, kv_len, heads=heads, kv_heads=kv_heads, query=query, key=key, c=c)
    assert np.array_equal(got, my_route(query, key, c, heads, kv_heads))


def test_route_ties_prefer_the_smaller_centroid(rng):
    query, key = _selector_inputs(rng, 1, 1, 10, 10, d=3)
    c = rng.standard_normal((1, 3, 3))
    c[0, 2] = c[0, 0]                       # centroid 2 duplicates centroid 0: never chosen
    pat = pattern("pattern t(c: float[][][]):\n    mask = route(c)\n")
    got = pat.dense_mask(10, 10, query=query, key=key, c=c)
    assert np.array_equal(got, my_route(query, key, c, 1, 1))
    c2 = c.copy()
    c2[0, 2] = 100.0                        # now a clear winner: every token in cluster 2
    c2[0, :2] = 0.0
    query2 = np.abs(query)
    key2 = np.abs(key)
    assert pat.dense_mask(10, 10, query=query2, key=key2, c=c2).all()


def test_selectors_in_reference_use_the_call_vectors(rng):
    # MoBA-like pattern through reference(): the selector sees q and k of each batch element
    pat = pattern("pattern t:\n    mask = causal and (topk_blocks(1, 4) or q // 4 == k // 4)\n")
    q, k, v = qkv(rng, 2, 2, 1, 16, 16)
    allowed = np.zeros((2, 2, 16, 16), bool)
    _, qq, kk = grid(16, 16)
    for b in range(2):
        sel = my_topk(q[b], k[b], 2, 1, 16, 16, 1, 4, True)
        allowed[b] = (kk <= qq) & (sel | (qq // 4 == kk // 4))
    _check_reference(pat, q, k, v, allowed, raw_scores(q, k))


def test_selectors_combine_with_other_clauses(rng):
    query, key = _selector_inputs(rng, 2, 2, 24, 24)
    src = "pattern t:\n    mask = topk_blocks(1, 4, causal = false) and not random_blocks(1, 4)\n"
    got = pattern(src).dense_mask(24, 24, heads=2, query=query, key=key)
    want = my_topk(query, key, 2, 2, 24, 24, 1, 4, False) & ~my_random_blocks(24, 24, 1, 4)[None]
    assert np.array_equal(got, want)


# ----------------------------------------------------------------------------- scale of dense_mask


def test_dense_mask_16k_streaming_is_fast_and_exact():
    n = 16384
    pat = pattern("pattern t:\n    mask = causal and (sinks(4) or sliding(1024))\n")
    t0 = time.perf_counter()
    m = pat.dense_mask(n, n)
    elapsed = time.perf_counter() - t0
    assert m.shape == (1, n, n)
    assert elapsed < 20, elapsed
    rows = m[0].sum(axis=1)
    qpos = np.arange(n)
    want = np.where(qpos < 1024, qpos + 1, 1024 + np.minimum(4, qpos - 1023))
    assert np.array_equal(rows, want)
    assert int(rows.sum()) == int(want.sum())
    for i in [0, 3, 5, 1023, 1024, 1026, 1028, 5000, n - 1]:
        j = np.arange(n)
        assert np.array_equal(m[0, i], (j <= i) & ((j < 4) | (i - j < 1024))), i
