"""Every pattern in examples/ checked against an independent NumPy definition.

The definitions below are written from the papers (and from LANGUAGE.md sections 1, 4 and 5 for
the exact meaning of positions, selectors and random blocks) with NumPy index grids.  Nothing here
calls attndsl except the public API of LANGUAGE.md section 6: ``attndsl.load``, ``prog[name]``,
``prog.patterns``, ``pat.bind``, ``pat.dense_mask`` and ``pat.reference``.
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

import attndsl

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# Shapes (q_len, kv_len): square, and decoding-like q_len < kv_len (bottom-right aligned).
SQUARE = [(37, 37), (64, 64), (130, 130)]
RAGGED = [(5, 70), (1, 50), (17, 40)]
SHAPES = SQUARE + RAGGED
# (heads, kv_heads) combinations; patterns that read `h` get several heads and GQA.
ONE_HEAD = [(1, None)]
MANY_HEADS = [(4, 2), (3, None), (6, 6)]
HEAD_DIM = 8  # query/key width for selector inputs and reference() calls


# ----------------------------------------------------------------------------- helpers


@dataclass
class Ctx:
    """What a reference definition may look at besides the index grids."""

    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    inputs: dict
    query: np.ndarray | None = None  # [heads, q_len, D]
    key: np.ndarray | None = None  # [kv_heads, kv_len, D]


def grids(q_len: int, kv_len: int, heads: int):
    """Index grids h [H,1,1], q [1,Lq,1], k [1,1,Lkv]; q is bottom-right aligned."""
    h = np.arange(heads).reshape(-1, 1, 1)
    q = (np.arange(q_len) + (kv_len - q_len)).reshape(1, -1, 1)
    k = np.arange(kv_len).reshape(1, 1, -1)
    return h, q, k


def kv_head_of(heads: int, kv_heads: int) -> np.ndarray:
    return np.arange(heads) // (heads // kv_heads)


def reference_mask(case, P: dict, ctx: Ctx) -> np.ndarray:
    h, q, k = grids(ctx.q_len, ctx.kv_len, ctx.heads)
    m = case.ref(P, h, q, k, ctx)
    return np.broadcast_to(np.asarray(m, dtype=bool), (ctx.heads, ctx.q_len, ctx.kv_len))


# ----------------------------------------------------------------------------- selectors


def block_scores(query, key, b, q_len, kv_len, heads, kv_heads):
    """S[h, qb, J] over absolute query blocks qb (NaN where block qb has no row in this call)."""
    qpos = np.arange(q_len) + (kv_len - q_len)
    qblk = qpos // b
    nqb = int(qblk.max()) + 1
    nkb = -(-kv_len // b)
    pooled_k = np.stack(
        [key[:, J * b : min((J + 1) * b, kv_len)].mean(axis=1) for J in range(nkb)], axis=1
    )  # [kv_heads, nkb, D]
    kvh = kv_head_of(heads, kv_heads)
    S = np.full((heads, nqb, nkb), np.nan)
    for qb in np.unique(qblk):
        pooled_q = query[:, qblk == qb].mean(axis=1)  # [heads, D]
        for hh in range(heads):
            S[hh, qb] = pooled_k[kvh[hh]] @ pooled_q[hh]
    return S, nqb, nkb


def candidates(qb: int, nkb: int, causal: bool) -> np.ndarray:
    return np.arange(qb) if causal else np.arange(nkb)


def ranked(scores: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """Candidates by descending score, ties broken by smaller block index."""
    order = np.lexsort((cands, -scores[cands]))
    return cands[order]


def topk_selection(ctx: Ctx, n: int, b: int, causal: bool = True) -> np.ndarray:
    """Boolean [heads, nqb, nkb]: key block J selected for query block qb (LANGUAGE.md 4)."""
    S, nqb, nkb = block_scores(ctx.query, ctx.key, b, ctx.q_len, ctx.kv_len, ctx.heads,
                               ctx.kv_heads)
    sel = np.zeros((ctx.heads, nqb, nkb), dtype=bool)
    for hh in range(ctx.heads):
        for qb in range(nqb):
            if np.isnan(S[hh, qb, 0]):
                continue
            cands = candidates(qb, nkb, causal)
            if len(cands) == 0:
                continue
            chosen = ranked(S[hh, qb], cands)[:n]
            sel[hh, qb, chosen] = True
    return sel


def topp_selection(ctx: Ctx, p: float, b: int, causal: bool = True) -> np.ndarray:
    S, nqb, nkb = block_scores(ctx.query, ctx.key, b, ctx.q_len, ctx.kv_len, ctx.heads,
                               ctx.kv_heads)
    scale = 1.0 / math.sqrt(ctx.query.shape[-1])
    sel = np.zeros((ctx.heads, nqb, nkb), dtype=bool)
    for hh in range(ctx.heads):
        for qb in range(nqb):
            if np.isnan(S[hh, qb, 0]):
                continue
            cands = candidates(qb, nkb, causal)
            if len(cands) == 0:
                continue
            order = ranked(S[hh, qb], cands)
            x = scale * S[hh, qb, order]
            e = np.exp(x - x.max())
            cum = np.cumsum(e / e.sum())
            reached = np.nonzero(cum >= p)[0]
            count = int(reached[0]) + 1 if len(reached) else len(order)
            sel[hh, qb, order[:count]] = True
    return sel


def apply_block_selection(sel: np.ndarray, b: int, h, q, k) -> np.ndarray:
    return sel[h, q // b, k // b]


def route_equal(ctx: Ctx, c: np.ndarray, h, q, k) -> np.ndarray:
    kvh = kv_head_of(ctx.heads, ctx.kv_heads)
    # cluster of each query row / key column under head h's centroids; argmax takes the first max
    cq = np.stack([np.argmax(ctx.query[hh] @ c[hh].T, axis=1) for hh in range(ctx.heads)])
    ck = np.stack([np.argmax(ctx.key[kvh[hh]] @ c[hh].T, axis=1) for hh in range(ctx.heads)])
    i = q - (ctx.kv_len - ctx.q_len)  # back to row indices
    return cq[h, i] == ck[h, k]


MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def random_block_table(r: int, b: int, seed: int, kv_len: int, max_q: int) -> np.ndarray:
    """Boolean [nqb, nkb]: the r key blocks J with the smallest splitmix64 key (ties: smaller J)."""
    nkb = -(-kv_len // b)
    nqb = max_q // b + 1
    table = np.zeros((nqb, nkb), dtype=bool)
    for qb in range(nqb):
        keys = [splitmix64((seed * 2**40 + qb * 2**20 + J) & MASK64) for J in range(nkb)]
        chosen = sorted(range(nkb), key=lambda J: (keys[J], J))[:r]
        table[qb, chosen] = True
    return table


# ----------------------------------------------------------------------------- definitions


def causal(q, k):
    return k <= q


def ref_causal_lm(P, h, q, k, ctx):
    return causal(q, k)


def ref_mistral(P, h, q, k, ctx):
    return causal(q, k) & (q - k < P["window"])


def ref_streaming(P, h, q, k, ctx):
    return causal(q, k) & ((k < P["n_sinks"]) | (q - k < P["window"]))


def ref_longformer(P, h, q, k, ctx):
    g = P["g"]
    return (np.abs(q - k) <= P["w"]) | (q < g) | (k < g)


def ref_bigbird(P, h, q, k, ctx):
    b = P["block"]
    window = np.abs(q // b - k // b) <= P["window_blocks"]
    n_global = P["global_blocks"] * b
    glob = (q < n_global) | (k < n_global)
    table = random_block_table(P["n_random"], b, P["seed"], ctx.kv_len, ctx.kv_len - 1)
    rand = table[q // b, k // b]
    return window | glob | rand


def ref_strided(P, h, q, k, ctx):
    stride = P["stride"]
    d = q - k
    local = (0 <= d) & (d <= stride)  # t = max(0, i - l) .. i
    summary = (d >= 0) & (d % stride == 0)
    return local | summary


def ref_fixed(P, h, q, k, ctx):
    stride, c = P["stride"], P["summary"]
    same_block = q // stride == k // stride
    summary_cols = k % stride >= stride - c
    return causal(q, k) & (same_block | summary_cols)


def ref_dilated(P, h, q, k, ctx):
    w, d = P["window"], P["dilation"]
    dist = q - k
    return (dist >= 0) & (dist < w * d) & (dist % d == 0)


def ref_longnet_segments(P, h, q, k, ctx):
    s, r = P["segment"], P["r"]
    keep = ((k - h) % r == 0) | (k == q)
    return causal(q, k) & (q // s == k // s) & keep


def ref_llama4(P, h, q, k, ctx):
    c = P["chunk"]
    return causal(q, k) & (q // c == k // c)


def ref_prefix_lm(P, h, q, k, ctx):
    return causal(q, k) | (k < P["prefix_len"])


def ref_unilm(P, h, q, k, ctx):
    seg = ctx.inputs["segment"]
    sq, sk = seg[q], seg[k]
    source_source = (sq == 0) & (sk == 0)
    target = (sq == 1) & ((sk == 0) | causal(q, k))
    return source_source | target


def ref_packed(P, h, q, k, ctx):
    doc = ctx.inputs["doc"]
    return causal(q, k) & (doc[q] == doc[k])


def ref_neighborhood(P, h, q, k, ctx):
    W, H, K = P["width"], P["height"], P["kernel"]

    def start(x, n):
        return np.clip(x - K // 2, 0, n - K)

    qr, qc, kr, kc = q // W, q % W, k // W, k % W
    rows_ok = (start(qr, H) <= kr) & (kr < start(qr, H) + K)
    cols_ok = (start(qc, W) <= kc) & (kc < start(qc, W) + K)
    return rows_ok & cols_ok


def _fhw(x, H, W):
    return x // (H * W), (x // W) % H, x % W


def ref_video_sliding(P, h, q, k, ctx):
    H, W = P["height"], P["width"]
    qt, qh, qw = _fhw(q, H, W)
    kt, kh, kw = _fhw(k, H, W)
    return ((np.abs(qt - kt) <= P["rt"]) & (np.abs(qh - kh) <= P["rh"])
            & (np.abs(qw - kw) <= P["rw"]))


def ref_video_swin(P, h, q, k, ctx):
    H, W = P["height"], P["width"]
    qt, qh, qw = _fhw(q, H, W)
    kt, kh, kw = _fhw(k, H, W)
    return ((qt // P["wt"] == kt // P["wt"]) & (qh // P["wh"] == kh // P["wh"])
            & (qw // P["ww"] == kw // P["ww"]))


def ref_radial(P, h, q, k, ctx):
    # Radial Attention (arXiv:2506.19852, section 4.1): frames of s tokens; temporal distance d,
    # band 2^r = 2^floor(log2(max(d, 1))) (the example spells out d < 2^12); spatial distance x
    s = P["frame"]
    d = np.abs(q // s - k // s)
    x = np.abs(q % s - k % s)
    r2 = np.minimum(2 ** np.floor(np.log2(np.maximum(d, 1))).astype(np.int64), 2048)
    near = np.where(r2 <= s, x < s // r2, (x == 0) & (d % np.maximum(1, r2 // s) == 0))
    return (k < s) | near


def _streaming(P, q, k):
    return causal(q, k) & ((k < P["n_sinks"]) | (q - k < P["window"]))


def ref_duo(P, h, q, k, ctx):
    retrieval = h < P["n_retrieval"]
    return np.where(retrieval, causal(q, k), _streaming(P, q, k))


def ref_duo_interleaved(P, h, q, k, ctx):
    return np.where(h % 2 == 0, causal(q, k), _streaming(P, q, k))


def ref_duo_kv(P, h, q, k, ctx):
    kv_head = h // (ctx.heads // ctx.kv_heads)
    retrieval = ctx.inputs["retrieval"][kv_head] == 1
    return np.where(retrieval, causal(q, k), _streaming(P, q, k))


def ref_s2_per_head(P, h, q, k, ctx):
    mine = (k // P["block"]) % ctx.heads == h
    return causal(q, k) & (mine | (q - k < P["window"]))


def ref_quarter_chunks(P, h, q, k, ctx):
    c = max(1, ctx.kv_len // 4)
    return causal(q, k) & (q // c == k // c)


def ref_s2(P, h, q, k, ctx):
    shard_of_key = (k // P["block"]) % P["n_shards"]
    mine = shard_of_key == h % P["n_shards"]
    return causal(q, k) & (mine | (q - k < P["window"]))


def ref_moba(P, h, q, k, ctx):
    b = P["block"]
    sel = topk_selection(ctx, P["top_k"], b, causal=True)
    return causal(q, k) & (apply_block_selection(sel, b, h, q, k) | (q // b == k // b))


def ref_topp_causal(P, h, q, k, ctx):
    b = P["block"]
    sel = topp_selection(ctx, P["p"], b, causal=True)
    return causal(q, k) & (apply_block_selection(sel, b, h, q, k) | (q // b == k // b))


def ref_topp_bidir(P, h, q, k, ctx):
    b = P["block"]
    sel = topp_selection(ctx, P["p"], b, causal=False)
    return apply_block_selection(sel, b, h, q, k)


def ref_routing(P, h, q, k, ctx):
    return causal(q, k) & route_equal(ctx, ctx.inputs["c"], h, q, k)


def ref_routing_local(P, h, q, k, ctx):
    routed = route_equal(ctx, ctx.inputs["c"], h, q, k)
    local = q - k < P["window"]
    return causal(q, k) & np.where(h % 2 == 0, routed, local)


def ref_global_window_docs(P, h, q, k, ctx):
    doc, start = ctx.inputs["doc"], ctx.inputs["doc_start"]
    same = doc[q] == doc[k]
    global_key = k - start[doc[k]] < P["n_global"]
    return causal(q, k) & same & ((q - k < P["window"]) | global_key)


def ref_axial(P, h, q, k, ctx):
    W = P["width"]
    return np.where(h % 2 == 0, q // W == k // W, q % W == k % W)


def ref_axial_causal(P, h, q, k, ctx):
    return causal(q, k) & ref_axial(P, h, q, k, ctx)


def ref_full(P, h, q, k, ctx):
    return np.ones_like(q - k, dtype=bool)


# ----------------------------------------------------------------------------- tensor inputs


def doc_ids(n: int, rng: np.random.Generator, mean_len: int = 9) -> np.ndarray:
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(rng.integers(1, 2 * mean_len)))
    return np.repeat(np.arange(len(lengths)), lengths)[:n].astype(np.int64)


def inputs_doc(q_len, kv_len, heads, P, rng):
    return {"doc": doc_ids(kv_len, rng)}


def inputs_doc_start(q_len, kv_len, heads, P, rng):
    doc = doc_ids(kv_len, rng, mean_len=13)
    starts = np.array([np.nonzero(doc == d)[0][0] for d in range(doc.max() + 1)], dtype=np.int64)
    return {"doc": doc, "doc_start": starts}


def inputs_segment(q_len, kv_len, heads, P, rng):
    src = int(rng.integers(0, kv_len + 1))
    return {"segment": (np.arange(kv_len) >= src).astype(np.int64)}


def inputs_centroids(q_len, kv_len, heads, P, rng):
    return {"c": rng.standard_normal((heads, 4, HEAD_DIM))}


def inputs_retrieval(q_len, kv_len, heads, P, rng):
    """One retrieval flag per key/value head (the cases' kv_heads: heads // 2 or heads)."""
    return {"retrieval": rng.integers(0, 2, heads)}


def inputs_rel_causal(q_len, kv_len, heads, P, rng):
    return {"rel": rng.standard_normal((heads, P["max_dist"] + 1))}


def inputs_rel_window(q_len, kv_len, heads, P, rng):
    return {"rel": rng.standard_normal((heads, 2 * P["max_dist"] + 1))}


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    file: str
    pattern: str
    defaults: dict  # the defaults written in the .attn file, restated here
    ref: Callable  # ref(P, h, q, k, ctx) -> bool, broadcastable to [H, Lq, Lkv]
    binds: list = field(default_factory=lambda: [{}])
    shapes: list = field(default_factory=lambda: list(SHAPES))
    heads: list = field(default_factory=lambda: list(ONE_HEAD))
    inputs: Callable | None = None  # inputs(q_len, kv_len, heads, P, rng) -> tensor inputs
    selector: bool = False  # needs query= / key= arrays
    score: Callable | None = None  # score(P, s, h, q, k, inputs) -> s' for score patterns
    check_dense: bool = True

    @property
    def id(self):
        return f"{self.file}::{self.pattern}"


CASES = [
    Case("causal.attn", "causal_lm", {}, ref_causal_lm),
    Case("sliding_window.attn", "mistral_swa", {"window": 4096}, ref_mistral,
         binds=[{}, {"window": 16}, {"window": 1}]),
    Case("streaming_llm.attn", "streaming_llm", {"n_sinks": 4, "window": 1024}, ref_streaming,
         binds=[{}, {"n_sinks": 3, "window": 10}, {"n_sinks": 0, "window": 5}]),
    Case("longformer.attn", "longformer", {"w": 256, "g": 16}, ref_longformer,
         binds=[{}, {"w": 5, "g": 3}, {"w": 0, "g": 0}]),
    Case("bigbird.attn", "bigbird",
         {"block": 64, "window_blocks": 1, "global_blocks": 2, "n_random": 3, "seed": 0},
         ref_bigbird,
         binds=[{}, {"block": 8, "window_blocks": 1, "global_blocks": 1, "n_random": 2},
                {"block": 4, "window_blocks": 0, "global_blocks": 0, "n_random": 3,
                 "seed": 12345},
                {"block": 16, "global_blocks": 0, "n_random": 20, "seed": 3}]),
    Case("sparse_transformer.attn", "strided_attention", {"stride": 128}, ref_strided,
         binds=[{}, {"stride": 4}, {"stride": 7}]),
    Case("sparse_transformer.attn", "fixed_attention", {"stride": 128, "summary": 8}, ref_fixed,
         binds=[{}, {"stride": 8, "summary": 2}, {"stride": 5, "summary": 1}]),
    Case("dilated.attn", "dilated_window", {"window": 512, "dilation": 4}, ref_dilated,
         binds=[{}, {"window": 5, "dilation": 3}, {"window": 4, "dilation": 1},
                {"window": 0, "dilation": 2}]),
    Case("dilated.attn", "longnet_segments", {"segment": 2048, "r": 4}, ref_longnet_segments,
         binds=[{}, {"segment": 16, "r": 3}, {"segment": 9, "r": 2}], heads=MANY_HEADS),
    Case("chunked_local.attn", "llama4_chunked", {"chunk": 8192}, ref_llama4,
         binds=[{}, {"chunk": 16}, {"chunk": 7}]),
    Case("prefix_lm.attn", "prefix_lm", {"prefix_len": 64}, ref_prefix_lm,
         binds=[{}, {"prefix_len": 10}, {"prefix_len": 0}]),
    Case("prefix_lm.attn", "unilm_seq2seq", {}, ref_unilm, inputs=inputs_segment),
    Case("packed_documents.attn", "packed", {}, ref_packed, inputs=inputs_doc),
    Case("neighborhood_2d.attn", "neighborhood_2d", {"width": 14, "height": 14, "kernel": 7},
         ref_neighborhood,
         binds=[{}, {"width": 8, "height": 8, "kernel": 3},
                {"width": 10, "height": 13, "kernel": 5}],
         shapes=SHAPES + [(196, 196), (10, 196)]),
    Case("video_3d.attn", "video_sliding_3d",
         {"height": 16, "width": 16, "rt": 1, "rh": 3, "rw": 3}, ref_video_sliding,
         binds=[{}, {"height": 4, "width": 5, "rt": 1, "rh": 1, "rw": 2}],
         shapes=SHAPES + [(300, 600)]),
    Case("video_3d.attn", "video_swin_3d",
         {"height": 16, "width": 16, "wt": 2, "wh": 8, "ww": 8}, ref_video_swin,
         binds=[{}, {"height": 4, "width": 6, "wt": 2, "wh": 2, "ww": 3}],
         shapes=SHAPES + [(300, 600)]),
    Case("radial.attn", "radial", {"frame": 256}, ref_radial,
         binds=[{}, {"frame": 4}, {"frame": 3}, {"frame": 1}],
         shapes=SHAPES + [(300, 600), (700, 700)]),
    Case("duo_attention.attn", "duo_attention",
         {"n_retrieval": 2, "n_sinks": 4, "window": 256}, ref_duo,
         binds=[{}, {"n_retrieval": 1, "n_sinks": 2, "window": 8},
                {"n_retrieval": 3, "n_sinks": 0, "window": 1}],
         heads=MANY_HEADS),
    Case("duo_attention.attn", "duo_attention_interleaved", {"n_sinks": 4, "window": 256},
         ref_duo_interleaved, binds=[{}, {"n_sinks": 2, "window": 8}], heads=MANY_HEADS),
    Case("duo_attention.attn", "duo_attention_kv", {"n_sinks": 4, "window": 256},
         ref_duo_kv, binds=[{}, {"n_sinks": 2, "window": 8}], heads=MANY_HEADS,
         inputs=inputs_retrieval),
    Case("s2_attention.attn", "s2_attention_per_head", {"block": 16, "window": 64},
         ref_s2_per_head, binds=[{}, {"block": 4, "window": 6}], heads=MANY_HEADS),
    Case("chunked_local.attn", "quarter_chunks", {}, ref_quarter_chunks,
         shapes=[(37, 37), (64, 64), (130, 130), (17, 40), (8, 9), (1, 3), (2, 2)]),
    Case("s2_attention.attn", "s2_attention", {"block": 16, "n_shards": 4, "window": 64},
         ref_s2, binds=[{}, {"block": 4, "n_shards": 3, "window": 6}], heads=MANY_HEADS),
    Case("moba.attn", "moba", {"top_k": 3, "block": 512}, ref_moba, selector=True,
         binds=[{}, {"top_k": 2, "block": 8}, {"top_k": 1, "block": 5},
                {"top_k": 10, "block": 16}],
         heads=MANY_HEADS),
    Case("topp_selection.attn", "topp_causal", {"p": 0.9, "block": 64}, ref_topp_causal,
         selector=True, binds=[{}, {"p": 0.5, "block": 8}, {"p": 0.9, "block": 6}],
         heads=MANY_HEADS),
    Case("topp_selection.attn", "topp_bidirectional", {"p": 0.75, "block": 64}, ref_topp_bidir,
         selector=True, binds=[{}, {"p": 0.3, "block": 8}, {"p": 0.95, "block": 10}],
         heads=MANY_HEADS),
    Case("routing.attn", "routing", {}, ref_routing, selector=True, inputs=inputs_centroids,
         heads=MANY_HEADS),
    Case("routing.attn", "routing_local", {"window": 32}, ref_routing_local, selector=True,
         inputs=inputs_centroids, binds=[{}, {"window": 5}], heads=MANY_HEADS),
    Case("global_window_docs.attn", "global_window_docs", {"window": 128, "n_global": 2},
         ref_global_window_docs, inputs=inputs_doc_start,
         binds=[{}, {"window": 4, "n_global": 1}, {"window": 1, "n_global": 3}]),
    Case("axial.attn", "axial_2d", {"width": 32}, ref_axial,
         binds=[{}, {"width": 8}, {"width": 5}], heads=MANY_HEADS),
    Case("axial.attn", "axial_causal", {"width": 32}, ref_axial_causal,
         binds=[{}, {"width": 8}, {"width": 5}], heads=MANY_HEADS),
    # score-modifying patterns: dense_mask is the mask clause; reference() is checked below
    Case("alibi.attn", "alibi", {"max_bias": 8.0}, ref_causal_lm,
         binds=[{}, {"max_bias": 4.0}], heads=MANY_HEADS,
         score=lambda P, s, h, q, k, inp, H: (
             s - 2.0 ** (-P["max_bias"] * (h + 1).astype(np.float64) / H)
             * (q - k).astype(np.float64))),
    Case("softcap.attn", "gemma2_global", {"cap": 50.0}, ref_causal_lm,
         binds=[{}, {"cap": 0.7}],
         score=lambda P, s, h, q, k, inp, H: P["cap"] * np.tanh(s / P["cap"])),
    Case("softcap.attn", "gemma2_local", {"cap": 50.0, "window": 4096}, ref_mistral,
         binds=[{}, {"cap": 1.5, "window": 6}],
         score=lambda P, s, h, q, k, inp, H: P["cap"] * np.tanh(s / P["cap"])),
    Case("relative_bias.attn", "clipped_relative_bias", {"max_dist": 8}, ref_causal_lm,
         binds=[{}, {"max_dist": 3}], heads=MANY_HEADS, inputs=inputs_rel_causal,
         score=lambda P, s, h, q, k, inp, H: s + inp["rel"][h, np.clip(q - k, 0, P["max_dist"])]),
    # mask = full; the window comes from -inf scores, so dense_mask (the mask clause) is all true
    # there is no static claim to check beyond that; reference() carries the meaning
    Case("relative_bias.attn", "windowed_relative_bias", {"max_dist": 8}, ref_full,
         binds=[{}, {"max_dist": 3}], heads=MANY_HEADS, inputs=inputs_rel_window,
         check_dense=False,
         score=lambda P, s, h, q, k, inp, H: np.where(
             np.abs(q - k) <= P["max_dist"],
             s + inp["rel"][h, np.clip(q - k, -P["max_dist"], P["max_dist"]) + P["max_dist"]],
             -np.inf)),
]

CASE_BY_ID = {c.id: c for c in CASES}
assert len(CASE_BY_ID) == len(CASES), "duplicate case"


# ----------------------------------------------------------------------------- loading


_PROGRAMS: dict[str, object] = {}


def program(file: str):
    if file not in _PROGRAMS:
        _PROGRAMS[file] = attndsl.load(str(EXAMPLES / file))
    return _PROGRAMS[file]


def bound(case: Case, bind: dict):
    pat = program(case.file)[case.pattern]
    return pat.bind(**bind) if bind else pat


def declared_patterns(path: pathlib.Path) -> list[str]:
    return re.findall(r"^pattern\s+([A-Za-z_][A-Za-z0-9_]*)", path.read_text(), flags=re.M)


# ----------------------------------------------------------------------------- coverage tests


def example_files():
    return sorted(p.name for p in EXAMPLES.glob("*.attn"))


def test_at_least_twenty_examples():
    assert len(example_files()) >= 20


@pytest.mark.parametrize("name", example_files())
def test_every_pattern_has_a_definition(name):
    declared = declared_patterns(EXAMPLES / name)
    assert declared, f"{name} declares no pattern"
    prog = program(name)
    assert sorted(prog.patterns) == sorted(declared)
    # the issue-15 examples (tests/test_lang_examples.py imports this file: a late import)
    from test_lang_examples import LANG_CASE_BY_ID
    missing = [p for p in declared if f"{name}::{p}" not in CASE_BY_ID | LANG_CASE_BY_ID]
    assert not missing, f"no independent definition in tests/test_examples.py for {missing}"


def test_table_refers_to_existing_patterns():
    for case in CASES:
        path = EXAMPLES / case.file
        assert path.exists(), case.file
        assert case.pattern in declared_patterns(path), case.id


@pytest.mark.parametrize("name", example_files())
def test_source_citation_comment(name):
    lines = (EXAMPLES / name).read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{name} must start with a citation comment"
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert re.search(r"\b(19|20)\d\d\b", text), f"{name}: citation needs a year"
    assert re.search(r"arXiv:\d{4}\.\d{4,5}|model", text), f"{name}: needs an arXiv id or model"
    assert len(header) >= 2 or len(lines[0]) > 60, f"{name}: needs a one-line description"


def written_defaults(case) -> dict:
    """The parameter defaults written in the case's example file."""
    src = (EXAMPLES / case.file).read_text()
    m = re.search(rf"^pattern\s+{case.pattern}\s*(\((.*?)\))?\s*:", src, flags=re.M | re.S)
    assert m, case.id
    written = {}
    for name, value in re.findall(r"(\w+)\s*=\s*([-\w.]+)", m.group(2) or ""):
        written[name] = float(value) if "." in value else int(value)
    return written


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_defaults_restated_correctly(case):
    """The defaults in the table are the ones written in the file (so `{}` binds test them)."""
    assert written_defaults(case) == case.defaults


def test_splitmix64_known_value():
    # the first output of the standard SplitMix64 generator seeded with 0
    assert splitmix64(0) == 0xE220A8397B1DCDAF


# ----------------------------------------------------------------------------- dense masks


def run_dense_case(case: Case, bind: dict, seed: int = 0):
    pat = bound(case, bind)
    P = {**case.defaults, **bind}
    rng = np.random.default_rng(seed)
    for heads, kv_heads in case.heads:
        kvh = kv_heads or heads
        for q_len, kv_len in case.shapes:
            inputs = case.inputs(q_len, kv_len, heads, P, rng) if case.inputs else {}
            ctx = Ctx(q_len, kv_len, heads, kvh, inputs)
            kwargs = dict(inputs)
            if case.selector:
                ctx.query = rng.standard_normal((heads, q_len, HEAD_DIM))
                ctx.key = rng.standard_normal((kvh, kv_len, HEAD_DIM))
                kwargs.update(query=ctx.query, key=ctx.key)
            got = pat.dense_mask(q_len, kv_len, heads=heads, kv_heads=kv_heads, **kwargs)
            want = reference_mask(case, P, ctx)
            got = np.asarray(got)
            where = f"{case.id} bind={bind} heads={heads}/{kvh} q_len={q_len} kv_len={kv_len}"
            assert got.dtype == np.bool_, where
            assert got.shape == (heads, q_len, kv_len), where
            if not np.array_equal(got, want):
                diff = np.argwhere(got != want)
                hh, i, j = diff[0]
                raise AssertionError(
                    f"{where}: {len(diff)} entries differ; first at head {hh} row {i} col {j} "
                    f"(q={i + kv_len - q_len}, k={j}): got {got[hh, i, j]}, want {want[hh, i, j]}")


DENSE_PARAMS = [
    pytest.param(case, bind, id=f"{case.id}[{n}]")
    for case in CASES if case.check_dense
    for n, bind in enumerate(case.binds)
]


@pytest.mark.parametrize("case,bind", DENSE_PARAMS)
def test_dense_mask(case, bind):
    run_dense_case(case, bind)


def test_neighborhood_sees_exactly_kernel_squared():
    """A property of the paper's definition, checked on the compiled pattern."""
    for W, H, K in [(8, 8, 3), (10, 13, 5), (14, 14, 7)]:
        pat = bound(CASE_BY_ID["neighborhood_2d.attn::neighborhood_2d"],
                    {"width": W, "height": H, "kernel": K})
        m = pat.dense_mask(W * H, W * H)
        assert (m.sum(axis=-1) == K * K).all()


def test_bigbird_random_blocks_count():
    """Without window or globals, every query row sees exactly n_random full key blocks."""
    pat = bound(CASE_BY_ID["bigbird.attn::bigbird"],
                {"block": 8, "window_blocks": -1, "global_blocks": 0, "n_random": 3, "seed": 5})
    m = pat.dense_mask(64, 64)
    assert (m.sum(axis=-1) == 3 * 8).all()


# ----------------------------------------------------------------------------- reference()


def softmax_attention(q, k, v, allowed, s):
    """float64 softmax attention over allowed & (s != -inf); empty rows give 0 and -inf."""
    group = q.shape[1] // k.shape[1]
    vv = np.repeat(v, group, axis=1)
    allowed = allowed & (s != -np.inf)
    sm = np.where(allowed, s, -np.inf)
    m = sm.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(allowed, np.exp(np.where(allowed, sm - m, 0.0)), 0.0)
    denom = p.sum(axis=-1)
    out = np.einsum("bhij,bhjd->bhid", p, vv) / np.where(denom > 0, denom, 1.0)[..., None]
    lse = np.where(denom > 0, np.log(np.where(denom > 0, denom, 1.0)) + m[..., 0], -np.inf)
    return out, lse


def raw_scores(q, k, scale):
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(k, group, axis=1)
    return scale * np.einsum("bhid,bhjd->bhij", q, kk)


def run_reference_case(case: Case, bind: dict, q_len: int, kv_len: int, B=2, H=4, KVH=2, D=HEAD_DIM,
                       scale=None, seed=1, batched_inputs=False):
    pat = bound(case, bind)
    P = {**case.defaults, **bind}
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, q_len, D)) * 1.5
    k = rng.standard_normal((B, KVH, kv_len, D)) * 1.5
    v = rng.standard_normal((B, KVH, kv_len, D))
    per_batch = [case.inputs(q_len, kv_len, H, P, rng) if case.inputs else {} for _ in range(B)]
    if batched_inputs:
        names = per_batch[0].keys()
        # doc ids per batch element padded to one shape are not needed: same lengths by design
        kwargs = {n: np.stack([pb[n] for pb in per_batch]) for n in names}
    else:
        per_batch = [per_batch[0]] * B
        kwargs = dict(per_batch[0])
    out, lse = pat.reference(q, k, v, scale=scale, **kwargs)
    eff_scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = raw_scores(q, k, eff_scale)
    if case.score is not None:
        h4 = np.arange(H).reshape(1, -1, 1, 1)
        q4 = (np.arange(q_len) + kv_len - q_len).reshape(1, 1, -1, 1)
        k4 = np.arange(kv_len).reshape(1, 1, 1, -1)
        s = np.stack([case.score(P, s[b:b + 1], h4, q4, k4, per_batch[b], H)[0]
                      for b in range(B)])
    allowed = np.stack([
        reference_mask(case, P, Ctx(q_len, kv_len, H, KVH, per_batch[b],
                                    q[b] if case.selector else None,
                                    k[b] if case.selector else None))
        for b in range(B)
    ])
    want_out, want_lse = softmax_attention(q, k, v, allowed, s)
    where = f"{case.id} bind={bind} q_len={q_len} kv_len={kv_len}"
    assert out.shape == (B, H, q_len, D) and lse.shape == (B, H, q_len), where
    assert not np.isnan(out).any() and not np.isnan(lse).any(), where
    np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-10, err_msg=where)
    np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-10, err_msg=where)


SCORE_CASES = [c for c in CASES if c.score is not None]


@pytest.mark.parametrize(
    "case,bind",
    [pytest.param(c, b, id=f"{c.id}[{n}]") for c in SCORE_CASES for n, b in enumerate(c.binds)])
@pytest.mark.parametrize("q_len,kv_len", [(37, 37), (5, 70), (1, 50)])
def test_score_reference(case, bind, q_len, kv_len):
    run_reference_case(case, bind, q_len, kv_len)


@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: c.id)
def test_score_reference_explicit_scale(case):
    run_reference_case(case, case.binds[-1], 23, 31, scale=0.9)


# Every mask-only pattern through reference(), with its first small binding:
# this checks the mask is applied, that empty rows give 0 / -inf, and GQA head mapping.
MASK_REF_PARAMS = [
    pytest.param(c, c.binds[min(1, len(c.binds) - 1)], id=c.id) for c in CASES if c.score is None
]


@pytest.mark.parametrize("case,bind", MASK_REF_PARAMS)
@pytest.mark.parametrize("q_len,kv_len", [(24, 24), (6, 41)])
def test_mask_reference(case, bind, q_len, kv_len):
    run_reference_case(case, bind, q_len, kv_len)


def test_batched_tensor_input_reference():
    """A tensor input with a leading batch dimension: row b serves batch element b."""
    run_reference_case(CASE_BY_ID["packed_documents.attn::packed"], {}, 30, 30,
                       batched_inputs=True)
    run_reference_case(CASE_BY_ID["packed_documents.attn::packed"], {}, 3, 30,
                       batched_inputs=True)
    run_reference_case(CASE_BY_ID["relative_bias.attn::clipped_relative_bias"],
                       {"max_dist": 3}, 12, 20, batched_inputs=True)


def test_empty_rows_reference():
    """dilated_window with window 0 allows nothing: out 0 and lse -inf, never NaN."""
    case = CASE_BY_ID["dilated.attn::dilated_window"]
    pat = bound(case, {"window": 0, "dilation": 2})
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 4, 8))
    k = rng.standard_normal((1, 2, 9, 8))
    v = rng.standard_normal((1, 2, 9, 8))
    out, lse = pat.reference(q, k, v)
    assert np.array_equal(out, np.zeros_like(out))
    assert np.all(lse == -np.inf)
