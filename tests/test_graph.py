"""Graph properties (attndsl.analysis.graph): empty rows, receptive field, union of heads.

Expected values are computed by hand (closed forms in the comments) or by an independent
brute-force oracle (repeated boolean reach on the dense mask), never by the module itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import EXAMPLES, example_files, mask_pattern

import attndsl
from attndsl.analysis import graph as G
from attndsl.ir import Op


def ex(file: str, name: str, **values) -> attndsl.Pattern:
    return attndsl.load(EXAMPLES / file)[name].bind(**values)


def causal_pairs_within(n: int, max_gap: int, step: int = 1) -> int:
    """#(i, j) with 0 <= i - j <= max_gap and (i - j) % step == 0, in [0, n)."""
    return sum(n - d for d in range(0, min(max_gap, n - 1) + 1, step))


def brute_reach(adj: np.ndarray):
    """Oracle: reach within L layers by L one-step expansions (self loops added)."""
    a = adj | np.eye(len(adj), dtype=bool)
    r, out, prev = np.eye(len(adj), dtype=bool), {}, None
    for L in range(1, len(adj) + 1):
        r = (r.astype(np.int64) @ a.astype(np.int64)) > 0
        out[L] = r
        if prev is not None and np.array_equal(prev, r):
            break
        prev = r
    return lambda L: out[min(L, max(out))]


def reach(pattern, n, **kw):
    r = G.graph_report(pattern, n, **kw)
    json.dumps(r.as_dict())
    return r.reach


# ----------------------------------------------------------------------------- receptive field

def test_causal_reaches_everything_in_one_layer():
    r = reach(mask_pattern("causal"), 64)
    assert (r.method, r.direction, r.full_reach_depth, r.fractions) == \
        ("tokens", "causal", 1, (1.0, 1.0, 1.0, 1.0))


@pytest.mark.parametrize("engine", ["networkx", "numpy"])
def test_sliding_window_depth_and_fractions(engine):
    # dist(i, j) = ceil((i - j) / (w - 1)) for j <= i: depth ceil((N - 1) / (w - 1)) = 9
    n, w = 64, 8
    adj = mask_pattern(f"causal and sliding({w})").dense_mask(n, n)[0]
    r = G._token_reach(adj, (1, 2, 4, 8, 9), engine)
    assert r.engine == engine and r.direction == "causal"
    assert r.full_reach_depth == math.ceil((n - 1) / (w - 1)) == 9
    total = n * (n + 1) / 2
    assert r.fractions == tuple(causal_pairs_within(n, L * (w - 1)) / total for L in (1, 2, 4, 8, 9))
    assert r.fractions[0] == 484 / 2080 and r.fractions[-1] == 1.0


def test_sinks_shorten_the_window_chain():
    # sinks are reached directly; j >= 4 needs ceil((i - j) / 7) steps: ceil((59 - 4) / 7) = 8
    n = 60
    assert reach(mask_pattern("causal and sliding(8)"), n).full_reach_depth == 9
    assert reach(mask_pattern("causal and (sinks(4) or sliding(8))"), n).full_reach_depth == 8


def test_longformer_globals_reach_everything_in_two_layers():
    pat = ex("longformer.attn", "longformer", w=4, g=2)
    r = reach(pat, 64)
    # band pairs 64 + 2 * (60 + 61 + 62 + 63) = 556; pairs touching a global token off the
    # band: 252 - 18 = 234
    assert r.direction == "bidirectional" and r.full_reach_depth == 2
    assert r.fractions == (790 / 4096, 1.0, 1.0, 1.0)


def test_dilated_never_crosses_residues():
    # edges keep i - j even: odd gaps are never reached; even gaps within 2 * 3 * L in L layers
    pat = ex("dilated.attn", "dilated_window", window=4, dilation=2)
    r = reach(pat, 64)
    assert r.full_reach_depth is None and r.direction == "causal"
    assert r.fractions == tuple(causal_pairs_within(64, 6 * L, 2) / 2080 for L in (1, 2, 4, 8))
    assert r.fractions[0] == 244 / 2080


def test_chunks_never_reach_across():
    bi = reach(mask_pattern("chunked(16)"), 64)
    assert (bi.direction, bi.full_reach_depth, bi.fractions) == ("bidirectional", None, (0.25,) * 4)
    ca = reach(ex("chunked_local.attn", "llama4_chunked", chunk=16), 64)
    assert (ca.direction, ca.full_reach_depth, ca.fractions) == ("causal", None, (544 / 2080,) * 4)


def test_bigbird_globals_reach_everything_in_two_layers():
    pat = ex("bigbird.attn", "bigbird", block=16, window_blocks=1, global_blocks=1, n_random=1)
    r = reach(pat, 256)
    assert r.direction == "bidirectional" and r.full_reach_depth == 2 and r.fractions[0] < 1


def test_prefix_lm_is_bidirectional_and_never_reaches_later_keys():
    r = reach(ex("prefix_lm.attn", "prefix_lm", prefix_len=8), 32)
    assert r.direction == "bidirectional" and r.full_reach_depth is None
    # reached, all in one layer: the 528 pairs j <= i and the 28 pairs i < j < 8
    assert r.fractions == ((528 + 28) / 1024,) * 4


@pytest.mark.parametrize("mask", [
    "causal and sliding(5)", "band(3) or globals(2)", "dilated(3, 3) or sliding(2)",
    "causal and (k % 5 == 0 or sliding(3))", "fixed(8, 2)", "q // 4 == k // 4 or k == q + 4",
])
def test_engines_agree_with_brute_force(mask):
    adj = mask_pattern(mask).dense_mask(48, 48)[0]
    oracle = brute_reach(adj)
    layers = (1, 2, 3, 5, 8, 40)
    results = [G._token_reach(adj, layers, e) for e in ("networkx", "numpy")]
    bidir = bool(np.triu(adj, 1).any())
    target = np.ones_like(adj) if bidir else np.tri(48, dtype=bool)
    expect = tuple(float((oracle(L) & target).sum() / target.sum()) for L in layers)
    full = [L for L in range(1, 49) if not (target & ~oracle(L)).any()]
    for r in results:
        assert r.fractions == pytest.approx(expect, abs=1e-12)
        assert r.full_reach_depth == (full[0] if full else None)


def test_tiles_bound_the_token_answer():
    # tile graph of 16 tiles of 16 tokens: neighbouring tiles connect, depth 15 <= the true 37
    pat = mask_pattern("causal and sliding(8)")
    t = reach(pat, 256, max_tokens=16, block=(16, 16))
    exact = reach(pat, 256)
    assert (t.method, t.tile, t.full_reach_depth, t.depth_is_lower_bound) == ("tiles", 16, 15, True)
    # tiles a and a - d (d <= L) connect: 16 diagonal tiles of 16 * 17 / 2 causal pairs, plus
    # (16 - d) tiles of 256 pairs per d, over 256 * 257 / 2
    assert t.fractions == tuple((16 * 136 + sum((16 - d) * 256 for d in range(1, L + 1))) / 32896
                                for L in (1, 2, 4, 8))
    assert exact.full_reach_depth == math.ceil(255 / 7) == 37
    assert all(a >= b for a, b in zip(t.fractions, exact.fractions))
    # never-reaching is exact on tiles; pairs inside diagonal tiles decide the direction
    c = reach(mask_pattern("chunked(8)"), 256, max_tokens=16, block=(16, 16))
    assert (c.direction, c.full_reach_depth, c.depth_is_lower_bound) == ("bidirectional", None, False)


def test_no_receptive_field_without_self_attention():
    r = G.graph_report(mask_pattern("causal"), 4, kv_len=9)
    assert r.reach is None and any("q_len == kv_len" in n for n in r.notes)


# ----------------------------------------------------------------------------- union of heads

def s2_share(n, heads, block=16, shards=4, window=64):
    """Share of causal pairs that some head in ``heads`` sees (shard h % 4, or the window)."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    seen = np.isin((j // block) % shards, [h % shards for h in heads]) | (i - j < window)
    tri = j <= i
    return float((seen & tri).sum() / tri.sum())


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_s2_attention_union(heads):
    r = G.graph_report(ex("s2_attention.attn", "s2_attention"), 256, heads=heads)
    if heads == 1:
        assert r.union_covers_causal is None and r.union_fraction is None
        return
    assert r.union_fraction == s2_share(256, range(heads))
    assert r.union_covers_causal == (heads >= 4)
    assert r.head_fractions == tuple(s2_share(256, [h]) for h in range(heads))
    assert max(r.head_fractions) < 1


def test_duo_attention_union():
    r = G.graph_report(ex("duo_attention.attn", "duo_attention"), 512, heads=4)
    assert r.union_covers_causal is True and r.head_fractions[:2] == (1.0, 1.0)
    # no retrieval head: every head keeps 4 sinks + a 256-window
    s = G.graph_report(ex("duo_attention.attn", "duo_attention", n_retrieval=0), 512, heads=4)
    tri = 512 * 513 / 2
    streaming = (causal_pairs_within(512, 255) + sum(min(4, i - 255) for i in range(256, 512))) / tri
    assert s.union_covers_causal is False and s.union_fraction == streaming
    one = G.graph_report(ex("duo_attention.attn", "duo_attention_interleaved"), 64, heads=1)
    assert one.union_covers_causal is None


def test_union_from_tiles_at_large_sizes(monkeypatch):
    monkeypatch.setattr(G, "DENSE_LIMIT", 0)
    monkeypatch.setattr(G, "EVAL_BUDGET", 1 << 16)
    pat = ex("duo_attention.attn", "duo_attention", window=16)
    assert G.graph_report(pat, 256, heads=4, block=(16, 16), max_tokens=8).union_covers_causal is True
    no = G.graph_report(pat.bind(n_retrieval=0), 256, heads=4, block=(16, 16), max_tokens=8)
    assert no.union_covers_causal is False and no.union_fraction is None


# ----------------------------------------------------------------------------- empty rows

def test_first_row_of_strict_causal_is_empty():
    pat = mask_pattern("k < q")
    rows = G.graph_report(pat, 64).empty_rows
    assert [(r.count, r.examples, r.unknown) for r in rows] == [(1, (0,), 0)]
    assert G.graph_report(pat, 1, kv_len=64).empty_rows[0].count == 0
    warnings = G.warn_empty_rows(pat)
    assert len(warnings) == 4       # (1, 1), (7, 7), (64, 64), (300, 300); not (1, 64)
    assert len(G.warn_empty_rows(pat, heads=4)) == 4           # heads alike: warned once
    assert warnings[2] == ("pattern 't': 1 of 64 query rows have no allowed key at q_len=kv_len=64 "
                           "(row 0): their output is 0 and lse -inf")


def test_warning_lists_examples_and_heads():
    w = G.warn_empty_rows(mask_pattern("k < q - h * 3"), sizes=((64, 64),), heads=3)
    assert w[2] == ("pattern 't': 7 of 64 query rows in head 2 have no allowed key at "
                    "q_len=kv_len=64 (e.g. rows 0, 1, 2, 3, 4, ...): their output is 0 and lse -inf")
    assert len(w) == 3 and "1 of 64" in w[0]


def test_documents_have_no_empty_rows_and_selectors_are_skipped():
    pat = ex("packed_documents.attn", "packed")
    doc = np.repeat(np.arange(8), 8)
    assert all(r.count == 0 for r in G.graph_report(pat, 64, doc=doc).empty_rows)
    assert G.warn_empty_rows(pat) == []                       # no tensors: nothing to evaluate
    assert G.warn_empty_rows(pat, sizes=((64, 64),), doc=doc) == []
    assert G.warn_empty_rows(ex("moba.attn", "moba")) == []
    with pytest.raises(attndsl.AttnError, match="static patterns"):
        G.graph_report(ex("moba.attn", "moba"), 64)


LARGE = [
    ("k < q", {}), ("causal and (k % 7 == 3)", {}), ("k % 40 >= 20 and k < q - 10", {}),
    ("causal and q % 5 != 0", {}), ("causal and sliding(3) and q >= 20", {}),
    ("causal and doc[q] == doc[k] and doc[q] != 2", {"doc": np.repeat(np.arange(12), 25)}),
    ("k < q and doc[q] == doc[k]", {"doc": np.arange(300) % 7}),          # no interval form
    ("random_blocks(1, 32) and k < q - 40", {}), ("k < q - 3 * h", {}),
]


@pytest.mark.parametrize("mask,tensors", LARGE)
def test_empty_rows_beyond_the_dense_limit_match_the_dense_mask(monkeypatch, mask, tensors):
    pat = attndsl.compile(f"pattern t(doc: int[]):\n    mask = {mask}\n")["t"] if tensors \
        else mask_pattern(mask)
    dense = pat.dense_mask(300, 300, 3, **tensors)
    monkeypatch.setattr(G, "DENSE_LIMIT", 0)
    rows = G.empty_rows(pat, 300, 300, 3, (32, 32), **tensors)
    for h, r in enumerate(rows):
        empty = np.flatnonzero(~dense[h].any(-1))
        assert (r.count, r.examples, r.unknown) == (len(empty), tuple(empty[:5]), 0)
        assert r.method in ("intervals", "tiles")
    assert any(r.count for r in rows)        # every case has empty rows to find


def test_undecidable_rows_are_reported_unknown(monkeypatch):
    monkeypatch.setattr(G, "DENSE_LIMIT", 0)
    monkeypatch.setattr(G, "EVAL_BUDGET", 0)
    # rows >= 64 have a full tile (k < 32); the first two row tiles are only partial: unknown
    pat = attndsl.compile("pattern t(doc: int[]):\n"
                          "    mask = k < q and doc[q] == doc[k] or q >= 64 and k < 32\n")["t"]
    r = G.empty_rows(pat, 300, 300, 1, (32, 32), doc=np.arange(300) % 7)[0]
    assert (r.method, r.count, r.unknown) == ("tiles", 0, 64)
    # 20 live residues: too many to bound exactly; rows 0..10 have no key at all, rows 11..30
    # have only keys of dead residues (truly empty), the rest are not evaluated: unknown
    wide = G.empty_rows(mask_pattern("k % 40 >= 20 and k < q - 10"), 300, 300)[0]
    assert (wide.method, wide.count, wide.unknown) == ("intervals", 11, 289)


# ----------------------------------------------------------------------------- the examples

def demo_tensors(pat, n, heads):
    out = {}
    for p in pat.ir.params:
        if not p.is_tensor:
            continue
        if p.name == "doc":
            out["doc"] = np.repeat(np.arange(n), 37)[:n]
        elif p.name == "doc_start":
            out["doc_start"] = np.arange(n) * 37
        elif p.name == "segment":
            out["segment"] = (np.arange(n) >= n // 3).astype(np.int64)
        elif p.name == "rel":
            out["rel"] = np.zeros((heads, 2 * pat.values["max_dist"] + 1))
        elif p.name == "retrieval":                 # one flag per key/value head
            out["retrieval"] = np.arange(heads) % 2
        elif p.name == "g":                         # global-token flags
            out["g"] = np.arange(n) % 37 == 0
        elif p.name == "sel":                       # key block lists, own block first
            sel = np.random.default_rng(6).integers(-1, 4, (heads, n, 16))
            sel[..., 0] = np.arange(n)
            out["sel"] = sel
        else:
            raise AssertionError(f"no demo tensor for {pat.name}.{p.name}")
    return out


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_examples_report_at_256(path):
    for pat in attndsl.load(path):
        if pat.uses_selectors():
            continue
        r = G.graph_report(pat, 256, heads=4, block=(32, 32), **demo_tensors(pat, 256, 4))
        d = json.loads(json.dumps(r.as_dict()))
        assert d["reach"]["method"] == "tokens" and len(d["reach"]["fractions"]) == 4
        assert [e["count"] for e in d["empty_rows"]] == [0, 0, 0, 0], pat.name
        assert (r.union_covers_causal is None) == (not pat.ir.mask.uses(Op.H))
        fr, depth = r.reach.fractions, r.reach.full_reach_depth
        assert all(0 < a <= b <= 1 for a, b in zip(fr, fr[1:])), pat.name
        assert (fr[-1] == 1.0) == (depth is not None and depth <= 8), pat.name


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_examples_tile_graph_bounds_the_token_graph(path):
    """Over-approximation: tile fractions >= token fractions, tile depth <= token depth, and
    tiles never connecting means tokens never connect (parameters scaled down to N = 200)."""
    for pat in attndsl.load(path):
        if pat.uses_selectors() or pat.tensor_params:
            continue
        small = {k: min(v, 24) for k, v in pat.values.items() if type(v) is int and v > 24}
        pat = pat.bind(**small)
        tok = G.graph_report(pat, 200, heads=2).reach
        tile = G.graph_report(pat, 200, heads=2, block=(16, 16), max_tokens=10).reach
        assert (tile.method, tile.tile, tile.direction) == ("tiles", 20, tok.direction), pat.name
        assert all(a >= b for a, b in zip(tile.fractions, tok.fractions)), pat.name
        if tile.full_reach_depth is None:
            assert tok.full_reach_depth is None, pat.name
        elif tok.full_reach_depth is not None:
            assert tile.full_reach_depth <= tok.full_reach_depth, pat.name
