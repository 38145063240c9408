"""The benchmark's cases: example patterns with their parameters, demo tensors and the
hand-written FlexAttention ``mask_mod`` that mirrors each one (see bench_block_map.py)."""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import attndsl  # noqa: E402

BLOCK = 128
EMPTY, PARTIAL, FULL = 0, 1, 2
PER_HEAD_HEADS = 4          # heads for patterns whose mask reads h (covers every class of the examples)


# ---------------------------------------------------------------------------------- demo tensors
def demo_docs(n: int, n_docs: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """doc[t] (document of token t) and doc_start[d] for ~n_docs documents of random lengths."""
    n_docs = max(1, min(n_docs, n))
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), size=n_docs - 1, replace=False)) if n_docs > 1 \
        else np.zeros(0, dtype=np.int64)
    doc = np.searchsorted(cuts, np.arange(n), side="right").astype(np.int64)
    starts = np.concatenate([[0], cuts]).astype(np.int64)
    return doc, starts


def demo_tensors(pattern, n: int, heads: int) -> dict | None:
    """Demo tensor inputs for an example pattern, or None when there is no recipe for it."""
    doc, starts = demo_docs(n)
    out = {}
    for name in pattern.tensor_params:
        if name == "doc":
            out[name] = doc
        elif name == "doc_start":
            out[name] = starts
        elif name == "segment":                 # UniLM: a source of 3/8 of the tokens, then target
            out[name] = (np.arange(n) >= 3 * n // 8).astype(np.int64)
        elif name == "rel":                     # a score-only bias table [heads, 2 * max_dist + 1]
            out[name] = np.zeros((heads, 2 * pattern.params.get("max_dist", 8) + 1))
        else:
            return None
    return out


# ------------------------------------------------------------------ BigBird random blocks (NumPy)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def random_block_table(r: int, b: int, seed: int, q_len: int, kv_len: int) -> np.ndarray:
    """bool [ceil(kv_len/b), ceil(kv_len/b)]: LANGUAGE.md section 5 random_blocks, written afresh
    for the FlexAttention mask_mod (an independent check of the interpreter's tables)."""
    nqb = -(-kv_len // b)               # q = i + (kv_len - q_len) < kv_len
    nkb = -(-kv_len // b)
    qb = np.arange(nqb, dtype=np.uint64)[:, None]
    kb = np.arange(nkb, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) << np.uint64(40)) + (qb << np.uint64(20)) + kb
    keys = _splitmix64(x & _M64)
    order = np.argsort(keys, axis=1, kind="stable")[:, :r]     # stable: ties go to the smaller J
    table = np.zeros((nqb, nkb), dtype=bool)
    np.put_along_axis(table, order, True, axis=1)
    return table


# ------------------------------------------------------------------------------- the patterns
@dataclass
class Case:
    key: str
    file: str
    pattern: str
    params: dict = field(default_factory=dict)
    heads: int = 1
    tensors: object = None      # (n, heads) -> dict of NumPy arrays
    flex: object = None         # (n, heads, torch) -> mask_mod, or a str: why it is skipped
    note: str = ""

    def load(self):
        return attndsl.load(os.path.join(ROOT, "examples", self.file))[self.pattern].bind(**self.params)

    def inputs(self, n: int) -> dict:
        return {} if self.tensors is None else self.tensors(n, self.heads)


def _flex_causal(n, heads, torch):
    def mask_mod(b, h, q, kv):
        return q >= kv
    return mask_mod


def _flex_sliding(w):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            return (q >= kv) & (q - kv < w)
        return mask_mod
    return make


def _flex_streaming(sinks, w):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            return (q >= kv) & ((kv < sinks) | (q - kv < w))
        return mask_mod
    return make


def _flex_longformer(w, g):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            return ((q - kv).abs() <= w) | (q < g) | (kv < g)
        return mask_mod
    return make


def _flex_bigbird(block, window_blocks, global_blocks, n_random, seed):
    def make(n, heads, torch):
        table = torch.from_numpy(random_block_table(n_random, block, seed, n, n))
        n_global = global_blocks * block

        def mask_mod(b, h, q, kv):
            near = (q // block - kv // block).abs() <= window_blocks
            return near | (q < n_global) | (kv < n_global) | table[q // block, kv // block]
        return mask_mod
    return make


def _flex_dilated(w, d):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            diff = q - kv
            return (diff >= 0) & (diff < w * d) & (diff % d == 0)
        return mask_mod
    return make


def _flex_strided_attention(stride):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            diff = q - kv
            return (diff >= 0) & ((diff <= stride) | (diff % stride == 0))
        return mask_mod
    return make


def _flex_fixed(stride, summary):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            return (q >= kv) & ((q // stride == kv // stride) | (kv % stride >= stride - summary))
        return mask_mod
    return make


def _flex_chunked(chunk):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            return (q >= kv) & (q // chunk == kv // chunk)
        return mask_mod
    return make


def _flex_prefix(p):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            return (kv <= q) | (kv < p)
        return mask_mod
    return make


def _flex_packed(n, heads, torch):
    doc = torch.from_numpy(demo_docs(n)[0])

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (doc[q] == doc[kv])
    return mask_mod


def _flex_global_window_docs(window, n_global):
    def make(n, heads, torch):
        doc_np, starts_np = demo_docs(n)
        doc, starts = torch.from_numpy(doc_np), torch.from_numpy(starts_np)

        def mask_mod(b, h, q, kv):
            local = (q - kv) < window
            is_global_key = kv - starts[doc[kv]] < n_global
            return (q >= kv) & (doc[q] == doc[kv]) & (local | is_global_key)
        return mask_mod
    return make


def _flex_duo(n_retrieval, sinks, window):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            return (q >= kv) & ((h < n_retrieval) | (kv < sinks) | (q - kv < window))
        return mask_mod
    return make


def _flex_s2(block, n_shards, window):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            return (q >= kv) & (((kv // block) % n_shards == h % n_shards) | (q - kv < window))
        return mask_mod
    return make


def _flex_longnet_segments(segment, r):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            same = q // segment == kv // segment
            return (q >= kv) & same & (((kv - h) % r == 0) | (kv == q))
        return mask_mod
    return make


def _flex_radial(frame):
    def make(n, heads, torch):
        def mask_mod(b, h, q, kv):
            d = (q // frame - kv // frame).abs()
            x = (q % frame - kv % frame).abs()
            r2 = torch.ones_like(d)                 # 2^floor(log2(max(d, 1))), capped at 2048
            for t in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048):
                r2 = torch.where(d >= t, t, r2)
            wide = x < frame // r2
            thin = (x == 0) & (d % torch.clamp(r2 // frame, min=1) == 0)
            near = torch.where(r2 <= frame, wide, thin)
            return (kv < frame) | near
        return mask_mod
    return make


def _docs_only(n, heads):
    return {"doc": demo_docs(n)[0]}


def _docs_and_starts(n, heads):
    doc, starts = demo_docs(n)
    return {"doc": doc, "doc_start": starts}


CASES = [
    Case("causal", "causal.attn", "causal_lm", flex=_flex_causal),
    Case("sliding_1024", "sliding_window.attn", "mistral_swa", {"window": 1024}, flex=_flex_sliding(1024)),
    Case("streaming_4_1024", "streaming_llm.attn", "streaming_llm", {"n_sinks": 4, "window": 1024},
         flex=_flex_streaming(4, 1024)),
    Case("longformer_512_64", "longformer.attn", "longformer", {"w": 512, "g": 64},
         flex=_flex_longformer(512, 64)),
    Case("bigbird", "bigbird.attn", "bigbird", {}, flex=_flex_bigbird(64, 1, 2, 3, 0),
         note="block 64, window 1 block, 2 global blocks, 3 random blocks"),
    Case("dilated_256_4", "dilated.attn", "dilated_window", {"window": 256, "dilation": 4},
         flex=_flex_dilated(256, 4)),
    Case("strided_128", "sparse_transformer.attn", "strided_attention", {"stride": 128},
         flex=_flex_strided_attention(128)),
    Case("fixed_128_8", "sparse_transformer.attn", "fixed_attention", {"stride": 128, "summary": 8},
         flex=_flex_fixed(128, 8)),
    Case("chunked_8192", "chunked_local.attn", "llama4_chunked", {"chunk": 8192}, flex=_flex_chunked(8192)),
    Case("prefix_lm_1000", "prefix_lm.attn", "prefix_lm", {"prefix_len": 1000}, flex=_flex_prefix(1000)),
    Case("packed_16_docs", "packed_documents.attn", "packed", tensors=_docs_only, flex=_flex_packed,
         note="16 documents of random lengths (seed 0), boundaries not tile-aligned"),
    Case("global_window_docs", "global_window_docs.attn", "global_window_docs",
         {"window": 128, "n_global": 2}, tensors=_docs_and_starts, flex=_flex_global_window_docs(128, 2),
         note="the same 16 documents"),
    Case("duo_attention", "duo_attention.attn", "duo_attention",
         {"n_retrieval": 2, "n_sinks": 4, "window": 256}, heads=PER_HEAD_HEADS, flex=_flex_duo(2, 4, 256)),
    Case("s2_attention", "s2_attention.attn", "s2_attention", {"block": 16, "n_shards": 4, "window": 64},
         heads=PER_HEAD_HEADS, flex=_flex_s2(16, 4, 64)),
    Case("longnet_segments", "dilated.attn", "longnet_segments", {"segment": 2048, "r": 4},
         heads=PER_HEAD_HEADS, flex=_flex_longnet_segments(2048, 4)),
    Case("radial_256", "radial.attn", "radial", {"frame": 256}, flex=_flex_radial(256),
         note="frames of 256 tokens; an if-chain over frame-distance bands"),
]
CASES_BY_KEY = {c.key: c for c in CASES}



def measure(fn, reps: int, budget_s: float):
    """(first result, first time, warm times): warm calls up to reps while they fit budget_s."""
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    warm: list[float] = []
    last = first
    while len(warm) < reps and sum(warm) + last <= budget_s:
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
        warm.append(last)
    return result, first, warm
