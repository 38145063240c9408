"""The cost model (attndsl.analysis.cost): exact pair counts, FLOPs and waste, closed forms.

Counts are checked against the allowed pairs (``dense_mask`` and a score clause that is not
-inf) and closed forms against both the dense
count and hand-derived formulas; nothing here trusts the module's own verification.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest
import sympy as sp

import attndsl
from attndsl.analysis import cost
from attndsl.analysis.cost import cost_report

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
# small values for the parameters whose defaults are too large for dense checks
SMALL = dict(w=16, window=16, chunk=32, block=8, g=4, prefix_len=10, segment=32, stride=8, summary=2,
             width=8, height=4, kernel=3, n_sinks=3, max_dist=4, wt=2, wh=2, ww=4)
HEADS = 3


def _patterns():
    out = []
    for path in sorted(EXAMPLES.glob("*.attn")):
        for pat in attndsl.load(path):
            if not pat.uses_selectors():
                out.append(pat.bind(**{k: v for k, v in SMALL.items() if k in pat.values}))
    return out


PATTERNS = _patterns()


def _docs(n: int) -> np.ndarray:
    cuts = [n // 5, n // 5 + 1, n // 2, (4 * n) // 5]
    return np.searchsorted(np.array(cuts), np.arange(n), side="right").astype(np.int64)


def _block_lists(n: int, heads: int) -> np.ndarray:
    """Selected key block ids [heads, query block, 16] (-1: unused), each row's own block first."""
    sel = np.random.default_rng(5).integers(-1, 4, (heads, n, 16))
    sel[..., 0] = np.arange(n)
    return sel


def demo_tensors(pat, kv_len: int, heads: int) -> dict:
    """Tensor inputs for the example patterns that take some (indexed by absolute positions)."""
    doc = _docs(kv_len)
    known = {"doc": doc, "segment": doc % 2, "rel": np.linspace(-1, 1, heads * 40).reshape(heads, 40),
             "doc_start": np.array([np.flatnonzero(doc == d)[0] for d in range(doc.max() + 1)]),
             "retrieval": np.arange(heads) % 2,                  # one flag per key/value head
             "g": np.arange(kv_len) % 7 == 0,                    # global-token flags
             "sel": _block_lists(kv_len, heads)}
    return {name: known[name] for name in pat.tensor_params}


def holds(condition: str | None, env: dict) -> bool:
    if condition is None:
        return True
    scope = {k: sp.Integer(v) for k, v in env.items()}
    return all(bool(sp.sympify(part, locals=scope)) for part in condition.split(" and "))


def target(report, text: str):
    """A formula written with the report's own symbols (matched by name)."""
    syms = {s.name: s for s in report.closed_form_expr.free_symbols}
    return sp.sympify(text, locals=syms)


def compile_mask(mask: str, params: str = "") -> attndsl.Pattern:
    return attndsl.compile(f"pattern t{'(' + params + ')' if params else ''}:\n    mask = {mask}\n")["t"]


# ----------------------------------------------------------------------------- exact counts


def allowed_pairs(pat, q_len, kv_len, heads, kv_heads, given) -> np.ndarray:
    """The allowed pairs of section 1: the mask, and a score clause (at a finite score) != -inf."""
    dense = pat.dense_mask(q_len, kv_len, heads=heads, kv_heads=kv_heads, **given)
    if pat.ir.score is None:
        return dense
    grid = pat.grid(q_len, kv_len, heads, kv_heads or heads,
                    attndsl.inputs.tensor_inputs(pat.ir, given, None)[0])
    rows, cols = np.arange(q_len), np.arange(kv_len)
    s = grid.score(np.arange(heads), rows, cols, np.zeros((heads, q_len, kv_len)))
    return dense & (s != -np.inf)


SHAPES = [(96, 96, 1, None, (16, 16)), (200, 200, HEADS, None, (32, 16)), (37, 101, 4, 2, (16, 32)),
          (1, 77, 2, 1, (128, 128)), (257, 96, 2, None, (8, 8)), (130, 257, 2, 2, (64, 64))]


@pytest.mark.parametrize("pat", PATTERNS, ids=lambda p: p.name)
def test_kept_pairs_equal_dense_mask(pat):
    for q_len, kv_len, heads, kv_heads, block in SHAPES:
        given = demo_tensors(pat, kv_len, heads)
        if q_len > kv_len and {"doc", "segment", "g", "sel"} & set(given):
            continue            # negative positions would index the document tensors
        r = cost_report(pat, q_len, kv_len, heads=heads, kv_heads=kv_heads, block=block, head_dim=64, **given)
        dense = allowed_pairs(pat, q_len, kv_len, heads, kv_heads, given)
        assert r.exact, (pat.name, q_len, kv_len)
        assert r.kept_pairs == int(dense.sum()), (pat.name, q_len, kv_len, heads)
        assert r.total_pairs == heads * q_len * kv_len
        bm = pat.block_map(q_len, kv_len, heads=heads, block=block, kv_heads=kv_heads, **given)
        rows = np.diff(np.minimum(np.arange(0, q_len + block[0], block[0]), q_len))
        cols = np.diff(np.minimum(np.arange(0, kv_len + block[1], block[1]), kv_len))
        area = rows[None, :, None] * cols[None, None, :]
        assert r.computed_pairs == int((area * (bm > 0)).sum())
        assert r.kept_pairs <= r.computed_pairs


def test_negative_positions_with_tensor_bounds():
    # q_len > kv_len: rows with q < 0 read doc[q] out of range in their bounds, but the mask
    # never reads it there (causal is false first); those rows are evaluated by the mask
    pat = attndsl.load(EXAMPLES / "packed_documents.attn")["packed"]
    doc = _docs(96)
    r = cost_report(pat, 257, 96, block=(8, 8), doc=doc)
    assert r.exact and r.kept_pairs == int(pat.dense_mask(257, 96, doc=doc).sum())


def test_residue_pieces_are_counted_arithmetically():
    for mask, params in [("0 <= q - k <= stride or strided(stride)", "stride=7"),
                         ("causal and (k % 5 == 0 or sliding(w))", "w=6"),
                         ("dilated(w, d) or sinks(3)", "w=9, d=4"),
                         ("(k // 4) % 3 == 1 and k <= q or band(w)", "w=2")]:
        pat = compile_mask(mask, params)
        assert any(k is not None and k.kind == "residue" for k in pat.describe(50, 50).keys), mask
        for q_len, kv_len in [(131, 131), (20, 77)]:
            r = cost_report(pat, q_len, kv_len, block=(16, 16))
            assert r.exact and r.kept_pairs == int(pat.dense_mask(q_len, kv_len).sum()), mask


def test_tile_fallback_exact_and_over_budget(monkeypatch):
    two_residues = compile_mask("(q - k) % 3 == 0 or k % 5 == 0")
    neighborhood = attndsl.load(EXAMPLES / "neighborhood_2d.attn")["neighborhood_2d"].bind(width=8, height=6)
    for pat in (two_residues, neighborhood):
        dense = int(pat.dense_mask(48, 48).sum())
        r = cost_report(pat, 48, 48, block=(16, 16))
        assert r.exact and r.kept_pairs == dense
        monkeypatch.setattr(cost, "PAIR_BUDGET", 0)
        pat = pat.bind()                                 # a fresh pattern: no cached results
        r = cost_report(pat, 48, 48, block=(16, 16))
        bm = pat.block_map(48, 48, block=(16, 16))
        assert not r.exact and r.kept_pairs == 256 * int((bm > 0).sum()) >= dense
        assert r.asymptotic is None or not r.asymptotic_estimated
        monkeypatch.undo()


def test_flops_density_and_waste():
    pat = compile_mask("causal")
    r = cost_report(pat, 256, 256, heads=2, block=(128, 128), head_dim=64)
    kept = 2 * 256 * 257 // 2
    assert r.kept_pairs == kept and r.total_pairs == 2 * 256 * 256
    assert r.flops == 4 * 64 * kept and r.dense_flops == 4 * 64 * 2 * 256 * 256
    assert r.density == pytest.approx(kept / (2 * 256 * 256))
    assert r.computed_pairs == 2 * 3 * 128 * 128               # two diagonal tiles + one full
    assert r.wasted_fraction == pytest.approx(1 - kept / (2 * 3 * 128 * 128))
    # ragged tiles: 100 x 100 with 64-tiles -> areas 64*64, 36*64, 36*36 (upper one empty)
    r = cost_report(pat, 100, 100, block=(64, 64))
    assert r.computed_pairs == 64 * 64 + 36 * 64 + 36 * 36
    assert r.wasted_fraction == pytest.approx(1 - 5050 / r.computed_pairs)
    empty = cost_report(compile_mask("not full"), 30, 30)
    assert (empty.kept_pairs, empty.computed_pairs, empty.wasted_fraction, empty.density) == (0, 0, 0.0, 0.0)


def test_as_dict_is_json():
    r = cost_report(compile_mask("causal and sliding(w)", "w=8"), 64, 64, block=(16, 16))
    d = json.loads(json.dumps(r.as_dict()))
    assert d["kept_pairs"] == r.kept_pairs and d["closed_form"] == r.closed_form
    assert d["params"] == {"w": 8} and d["closed_form_condition"] == "N >= w"


def test_selector_patterns_are_rejected():
    moba = attndsl.load(EXAMPLES / "moba.attn")["moba"]
    with pytest.raises(attndsl.AttnError):
        cost_report(moba, 64, 64)


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("mask, params, formula, condition, asymptotic", [
    ("causal", "", "N*(N + 1)/2", None, "O(N**2)"),
    ("sliding(w)", "w=16", "N*w - w*(w - 1)/2", "N >= w", "O(N*w)"),
    ("causal and sliding(w)", "w=5", "N*w - w*(w - 1)/2", "N >= w", "O(N*w)"),
    ("band(w)", "w=16", "N*(2*w + 1) - w*(w + 1)", "N >= 2*w + 1", "O(N*w)"),
    ("sinks(n) and causal", "n=5", "N*n - n*(n - 1)/2", "N >= n", "O(N*n)"),
    ("causal and (sinks(4) or sliding(w))", "w=16", "N*(w + 4) - (w + 3)*(w + 4)/2", None, "O(N*w)"),
    ("full", "", "N**2", None, "O(N**2)"),
    ("k == q", "", "N", None, "O(N)"),
    ("globals(n)", "n=3", "2*N*n - n**2", "N >= n", "O(N*n)"),
    ("k >= q_len - w", "w=3", "N*w", "N >= w", "O(N*w)"),
])
def test_closed_form_targets(mask, params, formula, condition, asymptotic):
    r = cost_report(compile_mask(mask, params), 100, 100, block=(16, 16))
    assert r.closed_form is not None, mask
    assert sp.expand(r.closed_form_expr - target(r, formula)) == 0, r.closed_form
    if condition is not None:
        assert r.closed_form_condition == condition
    assert r.asymptotic == asymptotic and not r.asymptotic_estimated
    assert r.closed_form_at(100) == r.kept_pairs


def test_closed_form_per_head_with_a_tied_guard():
    # head 2 meets h > n with equality in h - n = 1: decided at the bound values, not nudged ones
    pat = compile_mask("causal if h > n else sliding(w)", "n=1, w=4")
    r = cost_report(pat, 64, 64, heads=3)
    assert r.closed_form_expr is not None
    assert sp.expand(r.closed_form_expr - target(r, "N*(N + 1)/2 + 2*(N*w - w*(w - 1)/2)")) == 0
    assert r.closed_form_condition == "N >= w and n <= 1"


def test_closed_form_holds_beyond_the_bound_values():
    """Derived at one binding, the formula stays right for other values meeting its condition."""
    cases = [("causal and (sinks(n) or sliding(w))", dict(n=4, w=16), [dict(n=2, w=9), dict(n=7, w=30)]),
             ("band(w) or globals(g)", dict(w=16, g=4), [dict(w=5, g=2), dict(w=11, g=11)]),
             ("prefix(p) and k >= q - w", dict(p=6, w=20), [dict(p=3, w=7), dict(p=1, w=33)])]
    for mask, base, others in cases:
        pat = compile_mask(mask, ", ".join(f"{k}={v}" for k, v in base.items()))
        r = cost_report(pat, 64, 64, block=(16, 16))
        assert r.closed_form_expr is not None, mask
        checked = 0
        for values in [base] + others:
            for n in (40, 77, 128):
                env = dict(values, N=n)
                if not holds(r.closed_form_condition, env):
                    continue
                want = int(pat.bind(**values).dense_mask(n, n).sum())
                got = r.closed_form_expr.xreplace({s: env[s.name] for s in r.closed_form_expr.free_symbols})
                assert got == want, (mask, values, n, r.closed_form)
                checked += 1
        assert checked >= 4, mask


def test_closed_forms_agree_with_dense_on_examples():
    with_form = set()
    for pat in PATTERNS:
        heads = HEADS if pat.ir.mask.uses(attndsl.ir.Op.H) else 1
        given = demo_tensors(pat, 64, heads)
        if any(name in given for name in ("doc", "segment")):
            continue             # the masks read tensors of the call's length: no closed form
        r = cost_report(pat, 64, 64, heads=heads, block=(16, 16), **given)
        if r.closed_form_expr is None:
            continue
        with_form.add(pat.name)
        for n in (96, 200, 257):
            assert n >= r.closed_form_min_n and holds(r.closed_form_condition, dict(r.params, N=n))
            dense = int(allowed_pairs(pat, n, n, heads, None, demo_tensors(pat, n, heads)).sum())
            assert r.closed_form_at(n) == dense, (pat.name, n, r.closed_form)
    assert {"causal_lm", "mistral_swa", "streaming_llm", "longformer", "prefix_lm", "duo_attention",
            "duo_attention_interleaved", "gemma2_local", "alibi", "windowed_relative_bias"} <= with_form


def test_unverified_formulas_are_dropped(monkeypatch):
    derive = cost._Summer.rows_total
    monkeypatch.setattr(cost._Summer, "rows_total", lambda self, pieces: derive(self, pieces) + 1)
    r = cost_report(compile_mask("causal and sliding(w)", "w=7"), 64, 64)
    assert r.closed_form is None and r.closed_form_expr is None and r.closed_form_condition is None
    assert r.asymptotic == "O(N)" and r.asymptotic_estimated


def test_no_closed_form_gives_an_estimated_growth():
    chunked = attndsl.load(EXAMPLES / "chunked_local.attn")["llama4_chunked"].bind(chunk=32)
    r = cost_report(chunked, 512, 512, block=(64, 64))
    assert r.closed_form is None and r.asymptotic == "O(N)" and r.asymptotic_estimated
    dilated = compile_mask("dilated(w, d)", "w=8, d=3")
    r = cost_report(dilated, 512, 512)
    assert r.closed_form is None and r.asymptotic == "O(N)" and r.asymptotic_estimated
    r = cost_report(compile_mask("k % 2 == 0"), 256, 256)
    assert r.asymptotic == "O(N**2)" and r.asymptotic_estimated


def test_long_sequence_count_is_fast_and_exact():
    n, w = 131072, 1024
    pat = compile_mask("causal and sliding(w)", f"w={w}")
    cost_report(pat, 2048, 2048)                    # derives (and caches) the closed form
    start = time.perf_counter()
    r = cost_report(pat, n, n)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, elapsed
    assert r.exact and r.kept_pairs == n * w - w * (w - 1) // 2 == r.closed_form_at(n)
    assert r.asymptotic == "O(N*w)"
