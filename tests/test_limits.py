"""Deep, long and huge inputs (docs/language.md, "Limits"), and names that clash with the API.

* Nesting: every pass (checker, printer, interpreter, dense_mask, block_map/describe, the cost
  and empty-row analyses, code generation, the torch backend) runs at exactly the limit,
  called from a stack already STACK frames deep; one level more is an AttnError at the node
  where the limit is crossed, never a RecursionError and never at 1:1.
* Chains of ``and``/``or`` of any length compile and mean what they say (they are balanced).
* Size: compile time is linear (thousands of terms are fine); a file over the size limit is
  rejected before the parser runs, at the first character beyond the limit.
* Reserved names: a parameter or tensor input that the Python API could not pass is rejected
  where it is declared; the tuples of reserved names follow the API's signatures.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import errors_of, grid, pattern

import attndsl
from attndsl import limits, reserved
from attndsl import parser as front_end
from attndsl.analysis.cost import cost_report
from attndsl.analysis.graph import empty_rows, graph_report, warn_empty_rows
from attndsl.checker import RESERVED
from attndsl.cli import main
from attndsl.errors import AttnNameError, AttnSyntaxError, AttnTypeError

DEPTH = limits.MAX_DEPTH
STACK = 100                   # frames a caller (pytest, the CLI, user code) may already hold


def height(e) -> int:
    best, stack = 0, [(e, 1)]
    while stack:
        node, d = stack.pop()
        best = max(best, d)
        stack.extend((c, d + 1) for c in node.args)
    return best


def nested(depth: int, fn):
    """``fn()`` called from ``depth`` extra stack frames."""
    return fn() if depth <= 0 else nested(depth - 1, fn)


def mask_src(expr: str, params: str = "") -> str:
    return f"pattern t{params}:\n    mask = {expr}\n"


# n -> source; the forms cover each way of nesting: operators as written, defs, lets, and the
# forms that later passes rewrite into deeper trees (not, if, == on bools)
FORMS = {
    "not": lambda n: mask_src("not " * n + "k <= q"),
    "neg": lambda n: mask_src("-" * n + "(q - k) <= 2"),
    "add": lambda n: mask_src(" + ".join(["(q - k)"] * n) + " <= 3"),
    "if": lambda n: mask_src("k <= q if q > k + 1 else " * n + "k == q"),
    "clamp": lambda n: mask_src("clamp(" * n + "q - k" + ", 0, 5)" * n + " <= 2"),
    "index": lambda n: mask_src("t[" * n + "k" + "]" * n + " <= 2", "(t: int[])"),
    "bool_eq": lambda n: mask_src("(" * n + "(k <= q)" + "".join(f" == (k <= q - {i}))" for i in range(n))),
    "not_if": lambda n: mask_src("not (k <= q if q > k else " * n + "k == q" + ")" * n),
    "not_or": lambda n: mask_src("".join(f"not (k == q - {i} or " for i in range(n)) + "k == q"
                                 + ")" * n),
    "score": lambda n: "pattern t:\n    mask = causal\n    score = " + "".join(
        "exp(-" for _ in range(n)) + "score" + ")" * n + "\n",
    "score_if": lambda n: "pattern t:\n    mask = causal\n    score = " +
        "score if q > k else " * n + "-inf\n",
    "defs": lambda n: "def f0 = q - k\n" + "".join(f"def f{i} = f{i - 1} + 1\n" for i in range(1, n))
        + f"pattern t:\n    mask = f{n - 1} <= 2\n",
    "lets": lambda n: "pattern t:\n    let x0 = q - k\n" + "".join(
        f"    let x{i} = x{i - 1} + 1\n" for i in range(1, n)) + f"    mask = x{n - 1} <= 2\n",
}


def compiles(src: str) -> attndsl.Pattern | None:
    try:
        return attndsl.compile(src)["t"]
    except attndsl.AttnError:
        return None


def deepest(form: str) -> tuple[int, attndsl.Pattern]:
    """The largest n for which FORMS[form](n) compiles, and its pattern."""
    lo, hi = 1, 2 * DEPTH + 2
    assert compiles(FORMS[form](lo)) is not None
    assert compiles(FORMS[form](hi)) is None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if compiles(FORMS[form](mid)) is not None else (lo, mid)
    return lo, compiles(FORMS[form](lo))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_pass_runs_at_the_nesting_limit(form):
    n, pat = deepest(form)
    assert max(height(r) for r in pat.ir.roots()) >= DEPTH - 1    # at the limit (clamp: 2 a level)
    over = errors_of(FORMS[form](n + 1))
    assert "nested too deeply" in over.message and (over.line, over.column) != (1, 1)
    tensors = {"t": np.zeros(8, np.int64)} if pat.tensor_params else {}
    rng = np.random.default_rng(0)
    q, k, v = (torch.tensor(rng.standard_normal((1, 2, 5, 16))) for _ in range(3))
    passes = {
        "printer": lambda: attndsl.compile(str(pat))["t"].ir == pat.ir,
        "dense_mask": lambda: pat.dense_mask(5, 5, heads=2, **tensors).shape == (2, 5, 5),
        "block_map": lambda: pat.block_map(5, 5, heads=2, block=(2, 2), **tensors).shape == (2, 3, 3),
        "describe": lambda: pat.describe(5, 5, heads=2, block=(2, 2), **tensors) is not None,
        "reference": lambda: pat.reference(q.numpy(), k.numpy(), v.numpy(), **tensors)[0].shape
        == (1, 2, 5, 16),
        "torch": lambda: pat(q, k, v, backend="torch", **tensors).shape == (1, 2, 5, 16),
        "triton_source": lambda: "def " in pat.triton_source(),
        "triton-interpret": lambda: pat(*(x.float() for x in (q, k, v)), backend="triton-interpret",
                                        **tensors).shape == (1, 2, 5, 16),
        "cost": lambda: cost_report(pat, 16, 16, **tensors) is not None,
        "warnings": lambda: isinstance(warn_empty_rows(pat, sizes=((5, 5),), **tensors), list),
    }
    for name, run in passes.items():
        assert nested(STACK, run), name


@pytest.mark.parametrize("n", [124, 400])
def test_deep_not_is_rejected_where_the_nesting_is(n):
    src = FORMS["not"](n)
    err = errors_of(src)
    # levels: the nots, then the comparison, then its operand k: level DEPTH + 1 is a 'not'
    # (n > DEPTH) whose column is 12 + 4 * DEPTH
    assert isinstance(err, AttnSyntaxError) and "nested too deeply" in err.message
    assert (err.line, err.column) == (2, 12 + 4 * DEPTH)
    assert src.splitlines()[1][err.column - 1:].startswith("not ")


def test_deep_abs_is_rejected_at_the_abs_that_crosses_the_limit():
    src = "pattern t:\n    let a = 1\n    mask = (k <=\n        " + "abs(" * 400 + "q" + ")" * 400 + ")\n"
    err = errors_of(src)
    line = src.splitlines()[3]
    # level 1 is the comparison, so the abs at level DEPTH + 1 is the DEPTH-th one
    assert (err.line, err.column) == (4, line.index("abs(") + 4 * (DEPTH - 1) + 1)
    assert isinstance(err, AttnSyntaxError) and "nested too deeply" in err.message


def test_a_long_sum_is_rejected_on_its_line_not_at_1_1():
    src = "pattern t:\n    mask = causal and (\n        " + " + ".join(["q"] * 400) + " == 0)\n"
    err = errors_of(src)
    assert isinstance(err, AttnSyntaxError) and "nested too deeply" in err.message
    assert (err.line, err.column) == (3, 9)        # the sum (left-nested) starts there
    assert str(err).splitlines()[1].startswith("        q + q")


def test_a_long_def_chain_is_rejected_inside_the_chain():
    src = FORMS["defs"](400)
    err = errors_of(src)
    assert isinstance(err, AttnTypeError) and "nested too deeply" in err.message
    # each def is one level (a use takes its body's place): the mask's comparison is level 1,
    # the use of f399 and f399's '+' level 2, the use of f398 in it level 3, ...: the use of f_j
    # is level 401 - j, so the node at level DEPTH + 1 is the use of f_{400 - DEPTH}, in the
    # body of f_{401 - DEPTH}, on line 402 - DEPTH
    line = src.splitlines()[401 - DEPTH]
    assert line.startswith(f"def f{401 - DEPTH} = f{400 - DEPTH} + 1")
    assert (err.line, err.column) == (402 - DEPTH, line.index("= ") + 3)


def test_a_chain_of_aliases_is_limited_too():
    src = "def f0 = k <= q\n" + "".join(f"def f{i} = f{i - 1}\n" for i in range(1, 400)) + \
        "pattern t:\n    mask = f399\n"
    err = errors_of(src)
    assert isinstance(err, AttnTypeError) and "defs nested too deeply" in err.message
    # f399 (the use in the mask) is the first of DEPTH + 1 nested uses, the last one in f300's
    # body (line 301 for DEPTH = 100)
    line = src.splitlines()[400 - DEPTH]
    assert line.startswith(f"def f{400 - DEPTH} = ")
    assert (err.line, err.column) == (401 - DEPTH, line.index("= ") + 3)
    ok = "def f0 = k <= q\n" + "".join(f"def f{i} = f{i - 1}\n" for i in range(1, DEPTH)) + \
        f"pattern t:\n    mask = f{DEPTH - 1}\n"
    assert pattern(ok).dense_mask(3, 3)[0].sum() == 6


def test_a_long_let_chain_is_rejected_at_the_let_that_crosses_the_limit():
    src = FORMS["lets"](400)
    err = errors_of(src)
    assert isinstance(err, AttnTypeError) and "nested too deeply" in err.message
    # x0 = q - k has height 2, x_i height i + 2: x_{DEPTH - 1} is the first over the limit
    i = DEPTH - 1
    assert err.line == i + 2 and src.splitlines()[err.line - 1].startswith(f"    let x{i} = ")


def test_nesting_through_the_prelude_is_reported_at_the_use():
    # w has height DEPTH - 1; sliding(w) = 0 <= q - k < w adds two levels inside the prelude
    src = ("pattern t:\n    let w = " + "abs(" * (DEPTH - 2) + "q" + ")" * (DEPTH - 2) +
           "\n    mask = causal and sliding(w)\n")
    err = errors_of(src)
    assert isinstance(err, AttnTypeError) and "nested too deeply" in err.message
    assert "inside the prelude's 'sliding'" in err.message
    assert (err.line, err.column) == (3, 23) and err.filename == "<test>"


# ----------------------------------------------------------------------------- and / or chains


@pytest.mark.parametrize("n", [17, 400, 3000])
def test_long_or_and_and_chains_compile_and_mean_what_they_say(n):
    _, q, k = grid(40, 40)
    ors = pattern(mask_src(" or ".join(f"q - k == {3 * i}" for i in range(n))))
    assert max(height(r) for r in ors.ir.roots()) <= 2 * n.bit_length() + 4
    np.testing.assert_array_equal(ors.dense_mask(40, 40),
                                  ((q - k) % 3 == 0) & (q >= k) & (q - k < 3 * n))
    ands = pattern(mask_src(" and ".join(f"q - k != {3 * i}" for i in range(n))))
    np.testing.assert_array_equal(ands.dense_mask(40, 40),
                                  ((q - k) % 3 != 0) | (q < k) | (q - k >= 3 * n))
    for pat in (ors, ands):
        again = attndsl.compile(str(pat))["t"]
        assert again.ir == pat.ir and str(again) == str(pat)


def test_grouping_of_a_long_chain_does_not_matter():
    terms = [f"k == q - {i}" for i in range(40)]
    flat = pattern(mask_src(" or ".join(terms)))
    grouped = pattern(mask_src(" or ".join(f"({a} or ({b}))" for a, b in zip(terms[::2], terms[1::2]))))
    through_lets = pattern("pattern t:\n    let a = " + " or ".join(terms[:25]) + "\n    mask = a or "
                           + " or ".join(terms[25:]) + "\n")
    assert flat.ir == grouped.ir == through_lets.ir
    # short chains keep the shape they were written in
    assert pattern(mask_src("k == q or (k == 0 or q == 1)")).ir.mask.args[1].op.value == "or"


def test_a_long_chain_keeps_evaluating_lazily():
    # an index out of range where an earlier operand already decided is not an error
    src = "pattern t(t: int[]):\n    mask = " + " or ".join(["q >= 3"] * 30 + ["t[q] == 1"]) + "\n"
    got = pattern(src).dense_mask(6, 6, t=np.array([1, 0, 1]))[0]
    _, q, _ = grid(6, 6)
    want = (q >= 3) | (np.array([1, 0, 1, 0, 0, 0])[q] == 1)
    np.testing.assert_array_equal(got, np.broadcast_to(want[0], (6, 6)))


def test_a_long_comparison_chain_compiles():
    pat = pattern(mask_src(" <= ".join(["k"] + ["q"] * 400)))
    assert max(height(r) for r in pat.ir.roots()) < 20
    _, q, k = grid(5, 5)
    np.testing.assert_array_equal(pat.dense_mask(5, 5), k <= q)


# ----------------------------------------------------------------------------- size


@pytest.mark.parametrize("n", [2000, 8000])
def test_thousands_of_terms_compile(n):
    pat = pattern(mask_src(" or ".join(f"k == q - {i}" for i in range(n))))
    _, q, k = grid(30, 30)
    np.testing.assert_array_equal(pat.dense_mask(30, 30), k <= q)
    lets = "".join(f"    let x{i} = q - k == {i}\n" for i in range(n // 4))
    pat = pattern("pattern t:\n" + lets + "    mask = x7\n")
    np.testing.assert_array_equal(pat.dense_mask(30, 30), q - k == 7)


def test_an_oversize_file_is_rejected_before_parsing(monkeypatch):
    body = "pattern t:\n    mask = " + " or ".join(["k == q"] * 3) + "\n"
    exact = body + "#" * (limits.MAX_SOURCE_CHARS - len(body) - 1) + "\n"
    assert len(exact) == limits.MAX_SOURCE_CHARS
    assert attndsl.compile(exact)["t"].dense_mask(2, 2)[0].sum() == 2
    lines = ["pattern t:"] + [f"    let x{i} = q - k == {i}" for i in range(limits.MAX_SOURCE_CHARS // 20)]
    big = "\n".join(lines + ["    mask = x0\n"])
    assert len(big) > limits.MAX_SOURCE_CHARS

    def no_parser():
        raise AssertionError("the parser ran on an over-size file")

    monkeypatch.setattr(front_end, "_lark", no_parser)
    err = errors_of(big)
    assert isinstance(err, AttnSyntaxError) and "file too large" in err.message
    before = big[:limits.MAX_SOURCE_CHARS]
    assert err.line == before.count("\n") + 1
    assert err.column == len(before.rsplit("\n", 1)[1]) + 1


@pytest.mark.parametrize("src, where", [
    (mask_src("q < " + "9" * 5000), (2, 16)),
    (mask_src("q < " + "0" * 5000 + "7"), None),                 # leading zeros: just 7
    ("pattern t(w = " + "9" * 5000 + "):\n    mask = q < w\n", (1, 11)),
    ("pattern t(w = -" + "9" * 5000 + "):\n    mask = q < w\n", (1, 11)),
])
def test_integer_literals_of_thousands_of_digits(src, where):
    # Python refuses to convert more than 4300 digits: still an AttnError at the literal
    if where is None:
        _, q, k = grid(9, 9)
        np.testing.assert_array_equal(pattern(src).dense_mask(9, 9), np.broadcast_to(q < 7, (1, 9, 9)))
        return
    err = errors_of(src)
    assert isinstance(err, AttnTypeError) and "out of range" in err.message
    assert (err.line, err.column) == where and len(err.message) < 100


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("text", [FORMS["not"](400), FORMS["defs"](400), FORMS["lets"](400),
                                  "pattern t(v: float[]):\n    mask = causal\n",
                                  "#" * (limits.MAX_SOURCE_CHARS + 1) + "\n"])
def test_the_cli_reports_limits_as_located_errors(tmp_path, capsys, text):
    path = tmp_path / "deep.attn"
    path.write_text(text, encoding="utf-8")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:") and ": error: " in err and "Traceback" not in err
    assert not err.startswith(f"{path}:1:1:")


# ----------------------------------------------------------------------------- reserved names


def _keywords(fn) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds}


def test_reserved_names_cover_the_api_and_the_builtins():
    for method in ("__call__", "dense_mask", "block_map", "reference", "describe", "triton_source",
                   "to_flex"):
        assert _keywords(getattr(attndsl.Pattern, method)) <= set(reserved.TENSOR_API_NAMES), method
    from attndsl import nn as attn_nn
    from attndsl.hf import register  # (a plain module: it imports transformers lazily)
    for fn in (register, attn_nn.Attention.__init__):
        # ("pattern", the keyword of the language, cannot name a tensor input anyway)
        assert _keywords(fn) - {"pattern"} <= set(reserved.TENSOR_API_NAMES), fn.__qualname__
    for fn in (cost_report, graph_report, empty_rows, warn_empty_rows):
        assert _keywords(fn) - {"pattern"} <= set(reserved.TENSOR_API_NAMES), fn.__name__
    assert _keywords(attndsl.Pattern.bind) <= set(reserved.PARAM_API_NAMES)
    assert RESERVED <= set(reserved.BUILTIN_NAMES)
    assert "kv_head" in reserved.BUILTIN_NAMES
    assert set(reserved.RESERVED_NAMES) == set(reserved.BUILTIN_NAMES) | set(reserved.TENSOR_API_NAMES)


@pytest.mark.parametrize("name", reserved.TENSOR_API_NAMES)
def test_a_tensor_input_named_like_an_api_argument_is_rejected(name):
    src = f"pattern t(w = 2,\n          {name}: int[]):\n    mask = causal\n"
    err = errors_of(src)
    assert isinstance(err, AttnNameError) and f"'{name}'" in err.message
    assert (err.line, err.column) == (2, 11)


@pytest.mark.parametrize("name", reserved.BUILTIN_NAMES)
def test_builtin_names_cannot_be_declared(name):
    for src, where in [(f"pattern t({name} = 3):\n    mask = causal\n", (1, 11)),
                       (f"pattern t({name}: float[]):\n    mask = causal\n", (1, 11)),
                       (f"def f({name}) = true\npattern t:\n    mask = f(1)\n", (1, 7)),
                       (f"pattern t:\n    let {name} = 1\n    mask = causal\n", (2, 9)),
                       (f"def {name} = true\npattern t:\n    mask = causal\n", (1, 5))]:
        err = errors_of(src)
        assert isinstance(err, AttnNameError) and (err.line, err.column) == where, src


def test_self_cannot_name_a_parameter_but_api_words_can_name_scalars():
    err = errors_of("pattern t(self = 3):\n    mask = causal\n")
    assert isinstance(err, AttnNameError) and (err.line, err.column) == (1, 11)
    # a scalar parameter is only ever passed to bind(): 'block', 'scale', 'v' are fine there
    pat = pattern("pattern t(block = 16, scale = 2, v = 1):\n    mask = q // block == k // block\n")
    assert pat.bind(block=2, scale=3, v=4).params == {"block": 2, "scale": 3, "v": 4}
    rng = np.random.default_rng(0)
    q, k, v = (torch.tensor(rng.standard_normal((1, 1, 4, 4))) for _ in range(3))
    assert pat(q, k, v, backend="torch", scale=0.5).shape == (1, 1, 4, 4)


def test_the_solver_does_bounded_work_on_nested_abs(monkeypatch):
    """abs inside a comparison is rewritten into two comparisons, so nested abs doubled the
    solver's work per level (16 levels: 2**16 atoms); past MAX_SOLVE_STEPS the rest is unknown,
    and the block map stays sound (checked against every pair)."""
    from attndsl.analysis import solve
    from attndsl.blocks import block_map_by_tiles

    calls = [0]
    compare = solve.Solver.compare

    def counting(self, *args):
        calls[0] += 1
        return compare(self, *args)

    monkeypatch.setattr(solve.Solver, "compare", counting)
    pat = attndsl.compile("pattern p:\n    mask = " + "abs(" * 16 + "q - k" + ")" * 16 + " < 5\n")["p"]
    bm = pat.block_map(40, 40, block=(8, 8))
    assert calls[0] <= solve.MAX_SOLVE_STEPS
    brute = block_map_by_tiles(pat.grid(40, 40, 1, 1, {}), (8, 8))
    assert ((bm == 0) <= (brute == 0)).all() and ((bm == 2) <= (brute == 2)).all()
