"""The front end of the language additions of issue 15: bit operators with Python's precedence,
the new functions, bool tensor inputs, bounded reductions and ``at``: parsing, typing with located
errors, names, and the printer's round trip."""

from __future__ import annotations

import ast

import pytest
from conftest import errors_of, pattern
from hypothesis import given, settings
from hypothesis import strategies as st

import attndsl
from attndsl.ir import Expr, Op, TensorType, Type
from attndsl.printer import print_pattern

PY_BINARY = {ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&", ast.LShift: "<<",
             ast.RShift: ">>", ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//",
             ast.Mod: "%"}
PY_UNARY = {ast.USub: "-", ast.Invert: "~"}


def _parenthesised(node: ast.AST) -> str:
    """Python's reading of an expression, every operation in parentheses."""
    if isinstance(node, ast.BinOp):
        return (f"({_parenthesised(node.left)} {PY_BINARY[type(node.op)]} "
                f"{_parenthesised(node.right)})")
    if isinstance(node, ast.UnaryOp):
        return f"({PY_UNARY[type(node.op)]}{_parenthesised(node.operand)})"
    if isinstance(node, ast.Compare):
        assert len(node.ops) == 1
        sym = {ast.Eq: "==", ast.Lt: "<"}[type(node.ops[0])]
        return f"({_parenthesised(node.left)} {sym} {_parenthesised(node.comparators[0])})"
    if isinstance(node, ast.Name):
        return node.id
    return repr(node.value)


def _mask_ir(expr: str) -> Expr:
    return pattern(f"pattern p(a: int, b: int, c: int, d: int):\n    mask = {expr}\n").ir.mask


@pytest.mark.parametrize("text", [
    "a | b ^ c & d << 1 + a == b",
    "a & b | c ^ d < a << b >> c",
    "~a & -b == c",
    "a + b << c - d & a * b | c // d ^ a % b == 0",
    "-a >> ~b | c == d",
    "a << b << c == a >> b >> c",
])
def test_bit_operators_bind_as_in_python(text):
    explicit = _parenthesised(ast.parse(text, mode="eval").body)
    assert _mask_ir(text) == _mask_ir(explicit), explicit


_CONSTANTS = ["a", "b", "c", "d", "1", "3"]
_OPS = st.sampled_from(list(PY_BINARY.values()))


@st.composite
def _int_text(draw, depth=3, constant=False):
    """An int expression; ``constant``: of parameters and literals only."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(_CONSTANTS + ([] if constant else ["q", "k"])))
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(["-", "~"])) + draw(_int_text(depth - 1, constant))
    op = draw(_OPS)
    right = draw(st.sampled_from("abcd")) if op in ("//", "%") else \
        draw(_int_text(depth - 1, constant))     # (a parameter divisor: its value is unknown)
    return f"{draw(_int_text(depth - 1, constant))} {op} {right}"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_int_text(), _int_text())
def test_random_bit_expressions_parse_as_python_does(left, right):
    text = f"{left} == {right}"
    explicit = _parenthesised(ast.parse(text, mode="eval").body)
    ir = _mask_ir(text)
    assert ir == _mask_ir(explicit), text
    printed = print_pattern(pattern(f"pattern p(a: int, b: int, c: int, d: int):\n    mask = "
                                    f"{text}\n").ir)
    assert attndsl.compile(printed)["p"].ir.mask == ir


def test_unary_minus_binds_looser_than_power():
    ir = pattern("pattern p:\n    mask = q > 0\n    score = -2.0 ** 2.0\n").ir
    assert ir.score.op is Op.NEG and ir.score.args[0].op is Op.POW


@pytest.mark.parametrize("src", [
    "pattern p(g: bool[], u: bool[][], w: bool[][][]):\n"
    "    mask = g[k] or u[h, k] and not w[h, q, k] or (q ^ k) & 7 == 0 and ~q < 0\n",
    "pattern p:\n    mask = ilog2(q - k + 1) <= 3 and round(float(q) / 2.5) >= floor(0.5) + ceil(0.5)\n"
    "    score = score + erf(float(k)) + exp2(1.0) - log2(2.0)\n",
    "pattern p(n = 3):\n    mask = any(k == q >> i for i in range(n)) or all(q - k != i for i in "
    "range(heads))\n    score = score + sum(float(i) + sum(float(j) for j in range(i)) for i in "
    "range(3)) - max(float(i) for i in range(2)) * float(min(i for i in range(2)))\n",
])
def test_new_forms_round_trip(src):
    pat = pattern(src)
    text = print_pattern(pat.ir)
    again = attndsl.compile(text)["p"]
    assert again.ir == pat.ir, text
    assert print_pattern(again.ir) == text


def test_loop_variables_print_apart_from_parameters():
    pat = pattern("pattern p(i0 = 1):\n    mask = any(k == q - i - i0 for i in range(2))\n")
    text = print_pattern(pat.ir)
    assert "_i0 in range(2)" in text
    assert attndsl.compile(text)["p"].ir == pat.ir


def test_bool_tensor_types():
    pat = pattern("pattern p(g: bool[], u: bool[][], w: bool[][][]):\n    mask = g[k]\n")
    assert [p.type for p in pat.ir.params] == [TensorType(Type.BOOL, r) for r in (1, 2, 3)]
    assert pat.ir.mask.type is Type.BOOL


def test_reduction_ir_binds_depths():
    pat = pattern("def f = any(k == j for j in range(2))\n"
                  "pattern p:\n    mask = all(f or q == i for i in range(3))\n")
    outer = pat.ir.mask
    assert outer.op is Op.ALL and outer.value == 0
    inner = next(n for n in outer.args[1].walk() if n.op is Op.ANY)
    assert inner.value == 1         # a def used inside a reduction binds one level deeper
    assert {n.value for n in inner.args[1].walk() if n.op is Op.VAR} == {1}


def test_at_substitutes_positions_after_inlining():
    got = pattern("pattern p(doc: int[], start: int[]):\n    mask = doc[q] == doc[k] and "
                  "at(sliding(4), q = q - start[doc[q]], k = k - start[doc[k]])\n").ir.mask
    want = pattern("pattern p(doc: int[], start: int[]):\n    mask = doc[q] == doc[k] and "
                   "0 <= q - start[doc[q]] - (k - start[doc[k]]) < 4\n").ir.mask
    assert got == want


def test_at_rebinds_lets_and_nests_inside_out():
    got = pattern("pattern p:\n    let d = q - k\n    mask = at(at(d == 0, q = q + 1), q = q * 2)\n")
    want = pattern("pattern p:\n    mask = q * 2 + 1 - k == 0\n")
    assert got.ir.mask == want.ir.mask
    only_k = pattern("pattern p:\n    mask = at(causal, k = k + 3)\n")
    assert only_k.ir.mask == pattern("pattern p:\n    mask = k + 3 <= q\n").ir.mask


@pytest.mark.parametrize("src, line, col, message", [
    ("pattern p:\n    mask = (q > k) & (k > 0)\n", 2, 13, "'&' needs int operands, got bool "
     "(use 'and', 'or', 'not' on bools)"),
    ("pattern p:\n    mask = ~(q > k)\n", 2, 14, "'~' needs int operands, got bool"),
    ("pattern p:\n    mask = 1.5 << 2 > 0\n", 2, 12, "'<<' needs int operands, got float"),
    ("pattern p:\n    mask = floor(q) > 0\n", 2, 18, "'floor' takes a float, got int"),
    ("pattern p:\n    mask = ilog2(1.5) > 0\n", 2, 18, "'ilog2' takes an int, got float"),
    ("pattern p:\n    mask = erf(1) > 0.0\n", 2, 16, "'erf' takes a float, got int"),
    ("pattern p:\n    mask = q > 0\n    score = float(round(score))\n", 3, 25,
     "'round' cannot convert an expression that reads 'score'"),
    ("pattern p:\n    mask = any(k for i in range(3))\n", 2, 16, "'any' takes bool items, got int"),
    ("pattern p:\n    mask = sum(q > i for i in range(3)) > 0\n", 2, 16,
     "'sum' sums numbers, got bool items"),
    ("pattern p:\n    mask = max(q > i for i in range(3))\n", 2, 16, "'max' orders numbers"),
    ("pattern p:\n    mask = any(q > i for i in range(k))\n", 2, 37,
     "the bound of range() must be a call constant"),
    ("pattern p:\n    mask = any(q > i for i in range(1.5))\n", 2, 37, "range() takes an int"),
    ("pattern p:\n    mask = any(q > i for i in range(257))\n", 2, 37,
     "range(N): N must be between 0 and 256, got 257"),
    ("pattern p:\n    mask = any(q > i for i in xrange(3))\n", 2, 31,
     "a reduction loops over range(N), not 'xrange'"),
    ("pattern p:\n    mask = any(q > i for i in range(0, 3))\n", 2, 31, "range() takes one argument"),
    ("pattern p:\n    mask = abs(q > i for i in range(3))\n", 2, 12, "'abs' does not take a generator"),
    ("pattern p(i = 2):\n    mask = any(q > i for i in range(3))\n", 2, 26,
     "loop variable 'i' is already a name in scope"),
    ("pattern p:\n    let j = 1\n    mask = any(q > j for j in range(3))\n", 3, 26,
     "loop variable 'j' is already a name in scope"),
    ("pattern p:\n    mask = any(any(q > i for i in range(2)) for i in range(3))\n", 2, 30,
     "loop variable 'i' is already a name in scope"),
    ("pattern p:\n    mask = any(q > 0 for floor in range(3))\n", 2, 26,
     "loop variable 'floor' is a builtin name"),
    ("pattern p:\n    mask = any(q > k)\n", 2, 12, "'any' takes a generator"),
    ("pattern p:\n    mask = i > 0 and any(q > i for i in range(2))\n", 2, 12, "unknown name 'i'"),
    ("pattern p:\n    mask = at(q > k, h = 1)\n", 2, 22, "'at' rebinds only q and k, not 'h'"),
    ("pattern p:\n    mask = at(q > k)\n", 2, 12, "'at' needs q = ... or k = ..."),
    ("pattern p:\n    mask = at(q > k, k, q = 1)\n", 2, 12, "'at' takes one expression"),
    ("pattern p:\n    mask = at(q > k, q = 1.5)\n", 2, 26, "'at' rebinds q to an int, got float"),
    ("pattern p:\n    mask = at(q > k, q = 1, q = 2)\n", 2, 29, "argument 'q' of 'at' given twice"),
    ("pattern p:\n    mask = at(topk_blocks(2, 16), q = 1)\n", 2, 15,
     "the selector 'topk_blocks' cannot be used inside 'at'"),
    ("pattern p:\n    mask = q > 0\n    score = at(score, q = 1)\n", 3, 16,
     "'score' cannot be used inside 'at'"),
    ("pattern p(g: bool[]):\n    mask = g[q] + 1 > 0\n", 2, 12, "'+' needs an int or float, got bool"),
    ("pattern p(g: bool[][][][]):\n    mask = true\n", 1, 11, "unknown type 'bool[][][][]'"),
])
def test_misuse_is_a_located_error(src, line, col, message):
    err = errors_of(src)
    assert (err.span.line, err.span.column) == (line, col), str(err)
    assert message in err.message, err.message
    assert "attndsl." not in str(err)


@pytest.mark.parametrize("name", ["erf", "exp2", "log2", "floor", "ceil", "round", "ilog2", "any",
                                  "all", "sum", "at", "range"])
def test_new_builtin_names_cannot_be_declared(name):
    for src in (f"def {name} = true\npattern p:\n    mask = true\n",
                f"pattern p({name} = 1):\n    mask = true\n",
                f"pattern p:\n    let {name} = 1\n    mask = true\n"):
        err = errors_of(src)
        assert name in err.message and ("builtin" in err.message or "already defined" in
                                        err.message), err.message


@pytest.mark.parametrize("word", ["for", "in"])
def test_for_and_in_are_keywords(word):
    err = errors_of(f"pattern p({word} = 1):\n    mask = true\n")
    assert isinstance(err, attndsl.AttnSyntaxError)


def test_a_def_body_sees_its_loop_variable():
    pat = pattern("def near(n) = any(abs(q - k) == i for i in range(n))\n"
                  "pattern p:\n    mask = near(3)\n")
    assert pat.ir.mask.op is Op.ANY
    err = errors_of("def f = any(q == j for i in range(2))\npattern p:\n    mask = f\n")
    assert "unknown name 'j'" in err.message and (err.span.line, err.span.column) == (1, 18)
