"""The examples of issue 15's language forms, each checked against an independent NumPy definition.

Files: examples/logsparse.attn (bit tests, ``ilog2``, ``<<``), morton_2d.attn (shifts, ``&``,
bounded ``sum``), vsa_blocks.attn (``any`` over a list input), activation_attention.attn
(``erf``), doc_local_window.attn (``at``), global_flags.attn (``bool[]`` input).

The definitions below are written from the papers with NumPy index grids and plain integer
arithmetic (no bit operators: powers of two are listed, Morton codes are decoded with ``//`` and
``%``), so they do not restate the language's own rules. They are :class:`test_examples.Case`
rows and run through the same dense-mask and ``reference`` checks as every other example
(:data:`LANG_CASES`; tests/test_examples.py and tests/test_backward.py can take them from here).
Beyond that: the defaults restated, each pattern's torch and triton-interpret outputs against
``pat.reference`` on one tiny call, and the examples' documented edge cases (unused list slots,
an empty reduction, a bool input given as ints).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_same_values
from test_examples import (
    EXAMPLES,
    MANY_HEADS,
    SHAPES,
    Case,
    bound,
    declared_patterns,
    doc_ids,
    run_dense_case,
    run_reference_case,
    written_defaults,
)

import attndsl

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_FILES = ("logsparse.attn", "morton_2d.attn", "vsa_blocks.attn", "activation_attention.attn",
             "doc_local_window.attn", "global_flags.attn")
# distances that LogSparse keeps: 0 and the powers of two (positions stay far below 2**40)
POWERS = np.array([0] + [2 ** j for j in range(41)])


# ----------------------------------------------------------------------------- definitions


def causal(q, k):
    return k <= q


def ref_logsparse(P, h, q, k, ctx):
    # Li et al. 2019: cell l attends to l - 2^j (j = 0 .. floor(log2 l)) and to itself
    return causal(q, k) & np.isin(q - k, POWERS)


def ref_logsparse_local_restart(P, h, q, k, ctx):
    d = q - k
    seg = P["segment"]
    return causal(q, k) & (q // seg == k // seg) & ((d < P["window"]) | np.isin(d, POWERS))


def morton_decode(t, bits):
    """(image, x, y) of Morton code t: bit 2i of t's offset in its image is bit i of x, bit
    2i + 1 is bit i of y (written with // and %, floor semantics)."""
    image = t // 4 ** bits
    x = np.zeros_like(t)
    y = np.zeros_like(t)
    for i in range(bits):
        x = x + (t // 4 ** i) % 2 * 2 ** i
        y = y + (t // (2 * 4 ** i)) % 2 * 2 ** i
    return image, x, y


def ref_morton(P, h, q, k, ctx):
    iq, xq, yq = morton_decode(q, P["bits"])
    ik, xk, yk = morton_decode(k, P["bits"])
    return (iq == ik) & (np.maximum(np.abs(xq - xk), np.abs(yq - yk)) <= P["radius"])


def ref_vsa(P, h, q, k, ctx):
    b, n = P["block"], P["top_k"]
    sel = ctx.inputs["sel"]
    nkb = -(-ctx.kv_len // b)
    chosen = np.zeros(sel.shape[:2] + (nkb,), dtype=bool)    # [heads, query blocks, key blocks]
    for hh in range(sel.shape[0]):
        for qb in range(sel.shape[1]):
            for kb in sel[hh, qb, :n]:
                if 0 <= kb < nkb:
                    chosen[hh, qb, kb] = True
    return chosen[h, q // b, k // b]


def ref_doc_sliding(P, h, q, k, ctx):
    doc, start = ctx.inputs["doc"], ctx.inputs["doc_start"]
    lq, lk = q - start[doc[q]], k - start[doc[k]]           # positions inside the document
    return (doc[q] == doc[k]) & (0 <= lq - lk) & (lq - lk < P["window"])


def ref_doc_prefix_lm(P, h, q, k, ctx):
    doc, start = ctx.inputs["doc"], ctx.inputs["doc_start"]
    lq, lk = q - start[doc[q]], k - start[doc[k]]
    return (doc[q] == doc[k]) & ((lk <= lq) | (lk < P["prefix_len"]))


def ref_global_flags(P, h, q, k, ctx):
    g = ctx.inputs["g"]
    return g[q] | g[k] | (np.abs(q - k) <= P["w"])


def ref_full(P, h, q, k, ctx):
    return np.ones_like(q - k, dtype=bool)


def ref_causal(P, h, q, k, ctx):
    return causal(q, k)


_ERF = np.frompyfunc(math.erf, 1, 1)


def gelu_score(P, s, h, q, k, inp, H):
    """GELU(s) = s * Phi(s) = 0.5 s (1 + erf(s / sqrt 2)) (Hendrycks & Gimpel, exact form)."""
    return 0.5 * s * (1.0 + _ERF(s / math.sqrt(2.0)).astype(np.float64))


def relu_score(P, s, h, q, k, inp, H):
    return np.maximum(s, 0.0)


# ----------------------------------------------------------------------------- tensor inputs


def inputs_sel(q_len, kv_len, heads, P, rng):
    """sel [heads, query blocks, top_k + 1]: ids in [-1, key blocks); the last column is never
    read (top_k slots only), so it holds blocks the read slots may lack."""
    b, n = P["block"], P["top_k"]
    nqb = max(kv_len - 1, 0) // b + 1                       # rows for every query position
    nkb = max(-(-kv_len // b), 1)
    sel = rng.integers(-1, nkb, size=(heads, nqb, n + 1))
    sel[..., n] = rng.integers(0, nkb, size=(heads, nqb))
    return {"sel": sel.astype(np.int64)}


def inputs_doc_start(q_len, kv_len, heads, P, rng):
    doc = doc_ids(kv_len, rng, mean_len=7)
    start = np.array([np.nonzero(doc == d)[0][0] for d in range(doc.max() + 1)], dtype=np.int64)
    return {"doc": doc, "doc_start": start}


def inputs_flags(q_len, kv_len, heads, P, rng):
    return {"g": rng.random(kv_len) < 0.08}


# ----------------------------------------------------------------------------- the table


LANG_CASES = [
    Case("logsparse.attn", "logsparse", {}, ref_logsparse,
         shapes=SHAPES + [(300, 300), (3, 600)]),
    Case("logsparse.attn", "logsparse_local_restart", {"window": 4, "segment": 256},
         ref_logsparse_local_restart,
         binds=[{}, {"window": 3, "segment": 20}, {"window": 0, "segment": 64},
                {"window": 1, "segment": 1}],
         shapes=SHAPES + [(300, 300)]),
    Case("morton_2d.attn", "morton_neighbourhood", {"bits": 5, "radius": 1}, ref_morton,
         binds=[{}, {"bits": 2, "radius": 1}, {"bits": 3, "radius": 2}, {"bits": 0, "radius": 0},
                {"bits": 4, "radius": 16}],
         shapes=SHAPES + [(256, 256)]),
    Case("vsa_blocks.attn", "vsa_blocks", {"block": 64, "top_k": 8}, ref_vsa,
         binds=[{}, {"block": 4, "top_k": 3}, {"block": 7, "top_k": 1}, {"block": 5, "top_k": 0}],
         heads=MANY_HEADS, inputs=inputs_sel),
    Case("activation_attention.attn", "gelu_scores", {}, ref_full, score=gelu_score),
    Case("activation_attention.attn", "relu_scores", {}, ref_causal, score=relu_score),
    Case("doc_local_window.attn", "doc_sliding", {"window": 4}, ref_doc_sliding,
         binds=[{}, {"window": 2}, {"window": 1000}], inputs=inputs_doc_start),
    Case("doc_local_window.attn", "doc_prefix_lm", {"prefix_len": 3}, ref_doc_prefix_lm,
         binds=[{}, {"prefix_len": 0}, {"prefix_len": 5}], inputs=inputs_doc_start),
    Case("global_flags.attn", "global_flags", {"w": 64}, ref_global_flags,
         binds=[{}, {"w": 2}, {"w": 0}], inputs=inputs_flags),
]
# tensor inputs indexed by q need q >= 0: those cases run with q_len <= kv_len only
for _case in LANG_CASES:
    if _case.inputs is not None:
        _case.shapes = [(a, b) for a, b in _case.shapes if a <= b]

LANG_CASE_BY_ID = {c.id: c for c in LANG_CASES}
assert len(LANG_CASE_BY_ID) == len(LANG_CASES), "duplicate case"


# ----------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("name", NEW_FILES)
def test_every_new_pattern_has_a_definition(name):
    declared = declared_patterns(EXAMPLES / name)
    assert declared, name
    assert sorted(attndsl.load(str(EXAMPLES / name)).patterns) == sorted(declared)
    missing = [p for p in declared if f"{name}::{p}" not in LANG_CASE_BY_ID]
    assert not missing, missing


@pytest.mark.parametrize("case", LANG_CASES, ids=lambda c: c.id)
def test_defaults_restated(case):
    assert written_defaults(case) == case.defaults


# ----------------------------------------------------------------------------- dense masks and reference


DENSE = [pytest.param(c, b, id=f"{c.id}[{n}]") for c in LANG_CASES for n, b in enumerate(c.binds)]


@pytest.mark.parametrize("case,bind", DENSE)
def test_dense_mask(case, bind):
    run_dense_case(case, bind)


@pytest.mark.parametrize("case", LANG_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("q_len,kv_len", [(24, 24), (6, 41)])
def test_reference(case, q_len, kv_len):
    run_reference_case(case, case.binds[min(1, len(case.binds) - 1)], q_len, kv_len)


def test_reference_batched_bool_input():
    """A bool[] input with a leading batch dimension: row b serves batch element b."""
    run_reference_case(LANG_CASE_BY_ID["global_flags.attn::global_flags"], {"w": 2}, 19, 19,
                       batched_inputs=True)


# ----------------------------------------------------------------------------- backends


BACKENDS = ("torch", "triton-interpret")


def _backend_call(case, backend, q_len=21, kv_len=37, d=16):
    bind = case.binds[min(1, len(case.binds) - 1)]
    pat = bound(case, bind)
    P = {**case.defaults, **bind}
    heads, kv_heads = (4, 2) if case.heads == MANY_HEADS else (2, 1)
    rng = np.random.default_rng(7)
    inputs = case.inputs(q_len, kv_len, heads, P, rng) if case.inputs else {}
    q = rng.standard_normal((1, heads, q_len, d))
    k = rng.standard_normal((1, kv_heads, kv_len, d))
    v = rng.standard_normal((1, kv_heads, kv_len, d))
    want_out, want_lse = pat.reference(q, k, v, **inputs)
    tq, tk, tv = (torch.tensor(x, dtype=torch.float32) for x in (q, k, v))
    out, lse = pat(tq, tk, tv, return_lse=True, backend=backend, **inputs)
    assert_same_values(want_out, out, tol=1e-4)
    assert_same_values(want_lse, lse, tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LANG_CASES, ids=lambda c: c.id)
def test_backend_matches_reference(case, backend):
    _backend_call(case, backend)


# ----------------------------------------------------------------------------- documented edge cases


def test_logsparse_row_counts():
    """Row q of LogSparse keeps itself and 1 + floor(log2 q) earlier cells (q >= 1)."""
    m = bound(LANG_CASE_BY_ID["logsparse.attn::logsparse"], {}).dense_mask(200, 200)[0]
    want = [1] + [2 + int(math.floor(math.log2(q))) for q in range(1, 200)]
    assert m.sum(axis=1).tolist() == want


def test_morton_large_radius_is_whole_images():
    """With a radius as wide as the image, the neighbourhood is the image: 4^bits-token chunks."""
    m = bound(LANG_CASE_BY_ID["morton_2d.attn::morton_neighbourhood"],
              {"bits": 2, "radius": 4}).dense_mask(40, 40)[0]
    t = np.arange(40)
    assert np.array_equal(m, t[:, None] // 16 == t[None, :] // 16)


def test_vsa_unused_slots_and_unread_columns():
    """-1 slots select nothing, and columns past top_k are never read."""
    pat = bound(LANG_CASE_BY_ID["vsa_blocks.attn::vsa_blocks"], {"block": 4, "top_k": 2})
    sel = np.array([[[-1, -1, 0], [1, -1, 0], [2, 0, 1]]])          # [1 head, 3 q blocks, 3]
    m = pat.dense_mask(12, 12, sel=sel)[0]
    kb = np.arange(12) // 4
    assert not m[0:4].any()
    assert np.array_equal(m[4:8], np.broadcast_to(kb == 1, (4, 12)))
    assert np.array_equal(m[8:12], np.broadcast_to((kb == 2) | (kb == 0), (4, 12)))


def test_vsa_list_length_is_bounded():
    """top_k is a reduction bound: above 256 it is an error at bind (located at the bound), not
    a silent truncation; 256 itself is fine."""
    case = LANG_CASE_BY_ID["vsa_blocks.attn::vsa_blocks"]
    with pytest.raises(attndsl.AttnError, match="range") as info:
        bound(case, {"block": 4, "top_k": 257})
    lines = (EXAMPLES / case.file).read_text().splitlines()
    line = next(i for i, s in enumerate(lines, 1) if "range(top_k)" in s)
    at = lines[line - 1].index("range(top_k)") + len("range(") + 1
    assert (info.value.line, info.value.column) == (line, at)
    sel = np.full((1, 3, 256), -1, dtype=np.int64)
    sel[0, :, 255] = 2
    m = bound(case, {"block": 4, "top_k": 256}).dense_mask(12, 12, sel=sel)[0]
    assert np.array_equal(m, np.broadcast_to(np.arange(12) // 4 == 2, (12, 12)))


def test_global_flags_take_bools_only():
    """bool[] inputs accept bool dtypes only: 0/1 ints are an AttnCallError naming the input."""
    pat = bound(LANG_CASE_BY_ID["global_flags.attn::global_flags"], {"w": 1})
    flags = np.zeros(10, dtype=bool)
    flags[3] = True
    m = pat.dense_mask(10, 10, g=flags)[0]
    # the band |q - k| <= 1 (28 pairs) plus row 3 and column 3 (7 new pairs each)
    assert m[3].all() and m[:, 3].all() and m.sum() == 28 + 7 + 7
    with pytest.raises(attndsl.AttnCallError, match="'g'"):
        pat.dense_mask(10, 10, g=flags.astype(np.int64))
    m2 = pat.dense_mask(10, 10, g=torch.from_numpy(flags))[0]
    assert np.array_equal(m, m2)
