"""Lowering to Triton source (codegen/lower.py): equal sub-expressions are computed once per
tile (hash-consing, :func:`share_equal`), and a pattern's module holds only the helpers its hooks
call. The kernels themselves are checked against the reference in test_codegen.py and
test_narrow.py; here one pattern with shared sub-expressions runs end to end as well.
"""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import torch
from attndsl.codegen.lower import (
    HELPERS,
    LoweringError,
    hook_source,
    module_hooks,
    share_equal,
    used_helpers,
)
from conftest import pattern

from attndsl.ir import Expr, Op, Type, const

CUDA = torch.cuda.is_available()
BACKEND = "triton" if CUDA else "triton-interpret"
DEVICE = "cuda" if CUDA else "cpu"
Ti, Tf, Tb = Type.INT, Type.FLOAT, Type.BOOL
q, k = Expr(Op.Q, Ti), Expr(Op.K, Ti)


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def assignments(source: str) -> list[str]:
    """The right-hand sides of the hook's locals (``vN = ...``)."""
    return re.findall(r"^    v\d+ = (.*)$", source, flags=re.M)


def hooks_of(src: str) -> str:
    pat = pattern(src)
    return module_hooks(pat.ir.mask, pat.ir.score, dict(pat.values), {})


def module_text(src: str) -> str:
    return "import triton\nimport triton.language as tl\n\n\n" + hooks_of(src)


# ----------------------------------------------------------------------------- CSE


@pytest.mark.parametrize("src", [
    "pattern p:\n    mask = (q - k) % 4 == 0 or (q - k) % 4 == 1\n",
    "def d = (q - k) % 4\npattern p:\n    mask = d == 0 or d == 1\n",
    "pattern p:\n    let d = (q - k) % 4\n    mask = d == 0 or d == 1\n",
])
def test_a_repeated_sub_expression_is_computed_once(src):
    pat = pattern(src)
    rhs = assignments(hook_source("mask_hook", pat.ir.mask, {}, {}))
    assert rhs.count("(q - k)") == 1
    assert sum("floormod(" in r for r in rhs) == 1
    assert len(rhs) == 5              # q - k, % 4, == 0, == 1, or


def test_equal_score_terms_are_computed_once():
    pat = pattern("pattern p(c = 0.5):\n    mask = k <= q\n"
                  "    score = score * exp(-c * float(q - k)) + exp(-c * float(q - k))\n")
    rhs = assignments(hook_source("score_hook", pat.ir.score, dict(pat.values), {}))
    assert sum(r.startswith("tl.exp(") for r in rhs) == 1
    assert rhs.count("(q - k)") == 1


def test_share_equal_merges_by_structure_not_by_span_or_identity():
    from attndsl.errors import Span

    a = Expr(Op.SUB, Ti, (q, k), None, Span("<a>", 1, 1, 1, 5))
    b = Expr(Op.SUB, Ti, (Expr(Op.Q, Ti), Expr(Op.K, Ti)), None, Span("<b>", 2, 1, 2, 5))
    root = share_equal(Expr(Op.EQ, Tb, (a, b)))
    assert root.args[0] is root.args[1]
    assert root == Expr(Op.EQ, Tb, (a, b))
    assert root.args[0] is a                      # the first one met is kept as it is


@pytest.mark.parametrize("x,y", [
    (Expr(Op.CONST, Ti, (), 1), Expr(Op.CONST, Ti, (), True)),      # 1 == True in Python
    (Expr(Op.CONST, Tf, (), 0.0), Expr(Op.CONST, Tf, (), -0.0)),    # 0.0 == -0.0 in Python
    (const(1), const(1.0)),
    (Expr(Op.PARAM, Ti, (), "w"), Expr(Op.PARAM, Ti, (), "v")),
    (Expr(Op.INDEX, Ti, (q,), "t"), Expr(Op.INDEX, Ti, (k,), "t")),
])
def test_share_equal_keeps_different_values_apart(x, y):
    root = share_equal(Expr(Op.ADD, Ti, (x, y)))
    assert root.args[0] is not root.args[1]
    assert repr(root.args[0].value) == repr(x.value) and repr(root.args[1].value) == repr(y.value)


def test_share_equal_is_iterative_and_linear_on_shared_dags():
    deep = q
    for i in range(20_000):                       # far deeper than the recursion limit
        deep = Expr(Op.ADD, Ti, (deep, const(i % 3)))
    out = share_equal(deep)
    assert out.args[1].op is Op.CONST
    dag = q
    for _ in range(200):                          # 2**200 paths, 201 distinct nodes
        dag = Expr(Op.MUL, Ti, (dag, dag))
    assert share_equal(dag) is dag
    # two separately built copies of one DAG become one
    copies = []
    for _ in range(2):
        x = Expr(Op.Q, Ti)
        for _ in range(100):
            x = Expr(Op.MUL, Ti, (x, Expr(Op.ADD, Ti, (x, const(1)))))
        copies.append(x)
    both = share_equal(Expr(Op.EQ, Tb, tuple(copies)))
    assert both.args[0] is both.args[1]


# ----------------------------------------------------------------------------- helpers


def test_helpers_are_functions_that_need_only_triton_and_each_other():
    assert set(HELPERS) == {"floormod", "floordiv", "tanh", "powf", "shl", "shr", "ilog2",
                            "round_even", "to_int64"}
    assert HELPERS["floordiv"][1] == {"floormod"}
    for name, (text, _calls) in HELPERS.items():
        tree = ast.parse(text)
        (fn,) = tree.body
        assert isinstance(fn, ast.FunctionDef) and fn.name == name
        local = {a.arg for a in fn.args.args} | {n.id for n in ast.walk(fn)
                                                  if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        free = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert free - local <= {"tl", "triton", "float"} | set(HELPERS), name


@pytest.mark.parametrize("mask,score,want", [
    ("k <= q and q - k < w", None, set()),
    ("k <= q and (q - k) % 3 == 0", None, {"floormod"}),
    ("q // 4 == k // 4", None, {"floormod", "floordiv"}),
    ("k <= q and q - k < w // 2", None, set()),             # a constant: folded, no helper
    ("k <= q", "tanh(score) + 1.0", {"tanh"}),
    ("k <= q", "score * float(q - k) ** 0.5", {"powf"}),
    ("(q - k) % 2 == 0", "tanh(score) * float(k // 3)", {"floormod", "floordiv", "tanh"}),
])
def test_only_the_helpers_the_hooks_call_are_emitted(mask, score, want):
    src = f"pattern p(w = 6):\n    mask = {mask}\n" + (f"    score = {score}\n" if score else "")
    text = module_text(src)
    tree = ast.parse(text)
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    hooks = ["mask_hook", "mask_hook32"] + (["score_hook", "score_hook32", "score_grad_hook",
                                             "score_grad_hook32"] if score else [])
    assert set(defined) == want | set(hooks) and len(defined) == len(set(defined))
    assert defined[:len(want)] == [n for n in HELPERS if n in want]       # helpers come first
    # nothing else at module level: the two imports added above, then functions only
    assert all(isinstance(n, ast.FunctionDef) for n in tree.body[2:])
    assert "import" not in hooks_of(src) and "LOG2E" not in text
    assert used_helpers(text) == [n for n in HELPERS if n in want]


def test_module_hooks_has_the_kernel_s_hooks():
    pat = pattern("pattern p:\n    mask = k <= q\n    score = score + 1.0\n")
    text = module_hooks(pat.ir.mask, pat.ir.score, {}, {})
    for name, expr, narrow in (("mask_hook", pat.ir.mask, False), ("mask_hook32", pat.ir.mask, True),
                               ("score_hook", pat.ir.score, False),
                               ("score_hook32", pat.ir.score, True)):
        assert hook_source(name, expr, {}, {}, narrow) in text
    assert "score_hook" not in module_hooks(pat.ir.mask, None, {}, {})


def test_module_hooks_raises_lowering_errors():
    pat = pattern("pattern p(n = 2, b = 8):\n    mask = topk_blocks(n, b)\n")
    with pytest.raises(LoweringError):
        module_hooks(pat.ir.mask, None, dict(pat.values), {})
    with pytest.raises(LoweringError):
        module_hooks(const(True), None, {}, {f"t{i}": i for i in range(5)})


# ----------------------------------------------------------------------------- end to end


def test_a_pattern_with_shared_sub_expressions_matches_the_reference():
    pat = pattern("def d = (q - k) % 4\npattern p(c = 0.25):\n"
                  "    mask = k <= q and (d == 0 or d == 1 or q - k < 3)\n"
                  "    score = score - c * float(d) + tanh(c * float(d))\n")
    g = torch.Generator().manual_seed(0)
    qt, kt, vt = (torch.randn(1, 2, 21, 16, generator=g) for _ in range(3))
    out, lse = pat(qt.to(DEVICE), kt.to(DEVICE), vt.to(DEVICE), return_lse=True, backend=BACKEND)
    ref_out, ref_lse = pat.reference(qt.double().numpy(), kt.double().numpy(), vt.double().numpy())
    assert np.abs(out.double().cpu().numpy() - ref_out).max() <= 2e-5 * (np.abs(ref_out).max() + 1)
    assert np.abs(lse.double().cpu().numpy() - ref_lse).max() <= 2e-5 * (np.abs(ref_lse).max() + 1)
