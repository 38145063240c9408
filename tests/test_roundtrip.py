"""The pretty-printer: ``str(pattern)`` is .attn text that compiles back to the same IR, and printing
that again gives the same text. Deterministic cases here; random ones in test_properties.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import example_files, pattern

import attndsl
from attndsl.printer import print_pattern


def round_trip(pat: attndsl.Pattern) -> attndsl.Pattern:
    text = str(pat)
    assert text == print_pattern(pat.ir, pat.values)
    again = attndsl.compile(text, filename="<printed>")[pat.name]
    assert again.ir == pat.ir, text
    assert again.params == pat.params
    assert str(again) == text
    return again


def _example_patterns():
    out = []
    for path in example_files():
        try:
            prog = attndsl.load(path)
        except attndsl.AttnError:          # examples are written concurrently; broken ones are
            continue                       # test_examples' business
        out += [pytest.param(path, name, id=f"{path.stem}:{name}") for name in prog.patterns]
    return out or [pytest.param(None, None, id="no-examples")]


@pytest.mark.parametrize("path, name", _example_patterns())
def test_examples_round_trip(path, name):
    if path is None:
        pytest.skip("examples/ has no .attn files yet")
    pat = attndsl.load(path)[name]
    again = round_trip(pat)
    # and they mean the same: dense masks agree on a small call (static patterns)
    if not pat.tensor_params and not pat.uses_selectors() and len(pat.params) == len(
            [p for p in pat.ir.params if not p.is_tensor]):
        np.testing.assert_array_equal(pat.dense_mask(40, 40, heads=4, kv_heads=2),
                                      again.dense_mask(40, 40, heads=4, kv_heads=2))


@pytest.mark.parametrize("path, name", _example_patterns())
def test_examples_round_trip_when_bound(path, name):
    if path is None:
        pytest.skip("examples/ has no .attn files yet")
    pat = attndsl.load(path)[name]
    values = {}
    for p in pat.ir.params:
        if p.is_tensor:
            continue
        if p.type is attndsl.ir.Type.BOOL:
            values[p.name] = not pat.params.get(p.name, False)
        elif p.type is attndsl.ir.Type.INT:
            values[p.name] = pat.params.get(p.name, 3) + 1
        else:
            values[p.name] = pat.params.get(p.name, 0.5) * 0.5
    try:
        bound = pat.bind(**values)
    except attndsl.AttnError:               # a value out of a parameter's range: nothing to print
        pytest.skip("these values are out of range for this pattern")
    text = str(bound)
    again = attndsl.compile(text)[name]
    assert again.ir.mask == pat.ir.mask and again.ir.score == pat.ir.score
    assert again.params == bound.params
    assert str(again) == text


@pytest.mark.parametrize("expr", [
    "-2.0 ** 2.0 == -4.0",
    "(-2.0) ** 2.0 == 4.0",
    "2.0 ** -1.0 == 0.5",
    "(2.0 ** 3.0) ** 2.0 == 64.0",
    "2.0 ** 3.0 ** 2.0 == 512.0",
    "-(2.0 ** 2.0) < 0.0",
    "q - (k - 1) > 0",
    "q - k - 1 > 0",
    "q * (k + 1) > 0",
    "q // (2 * 3 - 1) == q % (7 - 2 - 1)",
    "-(-q) == q",
    "- -q == q",
    "-q * k == -(q * k)",
    "(q < k) == (k < q)",
    "not (q == k)",
    "not q == k",
    "not not (q < k)",
    "(q < k) != true",
    "q < k and k < q or q == k",
    "q < k and (k < q or q == k)",
    "(q < k or k < q) and q == k",
    "(q if k < 2 else (k if q < 2 else 0)) > 0 if true else false",
    "(q if k < 2 else k) > 0",
    "((q if k < 2 else k) if q > 1 else 0) == 0",
    "(true if q < k else false) if (k < 2 if true else false) else q == k",
    "0 <= q - k < 5",
    "q < k < 3 <= h",
    "abs(q - k) <= 3 and min(q, k, 3) == max(q, k) and clamp(q, 1, 2) == 1",
    "float(q) / 2.0 > 1e-3",
    "float(q) * 1e300 < inf and -inf < 5e-324",
    "float(k) > 0.1 and 1.7976931348623157e308 > 0.0",
    "q < 9223372036854775807",
    "exp(1.0) > log(2.0) and sqrt(2.0) > tanh(1.0) and sigmoid(0.0) == 0.5",
    "random_blocks(2, 4, seed = 5) or random_blocks(r = 1, b = 8)",
    "topk_blocks(2, 4, causal = false) or topp_blocks(0.5, 4)",
    "sliding(3) or band(2) and not chunked(4) or dilated(2, 3) or strided(4) or fixed(4, 1) or prefix(2)",
])
def test_tricky_expressions_round_trip(expr):
    round_trip(pattern(f"pattern p:\n    mask = {expr}\n"))


@pytest.mark.parametrize("score", [
    "score",
    "-score",
    "score - 2.0 * float(q - k)",
    "(score + 1.0) * 0.5",
    "30.0 * tanh(score / 30.0)",
    "score if k <= q else -inf",
    "-inf if q < k else score",
    "score ** 2.0",
    "(-score) ** 2.0",
    "-score ** 2.0",
    "max(score, -1.0, 0.0 - score)",
])
def test_score_clauses_round_trip(score):
    round_trip(pattern(f"pattern p:\n    mask = causal\n    score = {score}\n"))


@pytest.mark.parametrize("header", [
    "pattern p:",
    "pattern p(a = 3, b = -4, c = 0.5, d = -2.5, e = true, f = false):",
    "pattern p(x = inf, y = -inf, z = 1e-300, u = 1e300, v = 9223372036854775807, w = -0.0):",
    "pattern p(r1: int, r2: float, r3: bool):",
    "pattern p(t1: int[], t2: float[], t3: int[][], t4: float[][], t5: float[][][]):",
    "pattern p(t1: int[], a = 1, r: int, f = 0.25):",
])
def test_parameters_round_trip(header):
    pat = pattern(f"{header}\n    mask = true\n")
    again = round_trip(pat)
    assert [(p.name, p.type, p.default) for p in again.ir.params] == \
        [(p.name, p.type, p.default) for p in pat.ir.params]


def test_bound_required_parameters_print_as_defaults():
    pat = pattern("pattern p(w: int, f: float, b: bool):\n    mask = sliding(w) and b and float(q) > f\n")
    assert str(pat).startswith("pattern p(w: int, f: float, b: bool):\n")
    bound = pat.bind(w=4, f=-1.5, b=True)
    assert str(bound).startswith("pattern p(w = 4, f = -1.5, b = true):\n")
    again = attndsl.compile(str(bound))["p"]
    assert again.params == {"w": 4, "f": -1.5, "b": True}
    np.testing.assert_array_equal(again.dense_mask(10, 10), bound.dense_mask(10, 10))


def test_printed_text_inlines_lets_and_defs_into_single_clauses():
    src = """# documentation
def near(d) = abs(q - k) <= d      # a def
pattern p(w = 2):
    let x = near(w)
    let y = x or k == 0
    mask = y and causal
    score = score - float(q - k)
"""
    text = str(pattern(src))
    lines = text.splitlines()
    assert lines[0] == "pattern p(w = 2):"
    assert lines[1].startswith("    mask = ") and lines[2].startswith("    score = ")
    assert len(lines) == 3 and text.endswith("\n")
    assert "#" not in text and "let" not in text and "near" not in text and "causal" not in text


def test_printing_is_deterministic():
    src = "pattern p(w = 2, doc: int[]):\n    mask = causal and (sliding(w) or doc[q] == doc[k])\n"
    texts = {str(attndsl.compile(src)["p"]) for _ in range(3)}
    assert len(texts) == 1


@pytest.mark.parametrize("path, name", _example_patterns())
def test_examples_pickle_and_deepcopy(path, name):
    import copy
    import pickle

    if path is None:
        pytest.skip("examples/ has no .attn files yet")
    pat = attndsl.load(path)[name]
    for again in (pickle.loads(pickle.dumps(pat)), copy.deepcopy(pat)):
        assert again.bound().key == pat.bound().key and again.source == pat.source
        assert again.ir.span.filename == pat.ir.span.filename


def test_a_derived_pattern_pickles_as_its_printed_ir():
    import pickle

    pat = pattern("pattern s(n = 1, b = 8):\n    mask = causal and (topk_blocks(n, b) or "
                  "q // b == k // b)\n").without_selectors()
    again = pickle.loads(pickle.dumps(pat))
    assert again.bound().key == pat.bound().key and again.ir == pat.ir
