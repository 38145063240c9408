"""Syntax: every form of LANGUAGE.md sections 2 and 3, and the precedence table.

Each form is checked twice where that makes sense: by the shape of the IR it produces (an
s-expression written here, independent of attndsl.printer) and by its value through the
interpreter (``dense_mask``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import constant_true, eval_bool, grid, mask_pattern, pattern

import attndsl
from attndsl.ir import Op, TensorType, Type

# ----------------------------------------------------------------------------- helpers


def sexp(e) -> str:
    """The IR as an s-expression: leaves by name/value, inner nodes as (op args...)."""
    if e.op is Op.CONST:
        return repr(e.value)
    if e.op is Op.PARAM:
        return f"${e.value}"
    if not e.args and e.op is not Op.ROUTE:
        return e.op.value
    head = e.op.value if e.value is None else f"{e.op.value}:{e.value}"
    return "(" + " ".join([head] + [sexp(a) for a in e.args]) + ")"


def mask_ir(expr: str, params: str = "a = true, b = false, c = true, d = false, x = 1, y = 2, z = 3, "
            "f = 2.0, g = 3.0"):
    return sexp(mask_pattern(expr, params).ir.mask)


def score_ir(expr: str) -> str:
    return sexp(pattern(f"pattern t:\n    mask = true\n    score = {expr}\n").ir.score)


# ----------------------------------------------------------------------------- literals & builtins


@pytest.mark.parametrize("text, value, typ", [
    ("12", 12, Type.INT),
    ("0", 0, Type.INT),
    ("0.5", 0.5, Type.FLOAT),
    ("1e-3", 1e-3, Type.FLOAT),
    ("1E3", 1000.0, Type.FLOAT),
    ("2e+2", 200.0, Type.FLOAT),
    (".25", 0.25, Type.FLOAT),
    ("3.", 3.0, Type.FLOAT),
    ("1.5e2", 150.0, Type.FLOAT),
    ("true", True, Type.BOOL),
    ("false", False, Type.BOOL),
    ("inf", math.inf, Type.FLOAT),
])
def test_literals(text, value, typ):
    # compare the literal with itself so that the mask is bool whatever its type
    ir = mask_pattern(f"{text} == {text}").ir.mask
    lit = ir.args[0]
    assert lit.op is Op.CONST and lit.type is typ
    assert lit.value == value and type(lit.value) is type(value)
    assert constant_true(f"{text} == {text}")


def test_one_e_minus_three_is_a_float_with_its_value():
    assert constant_true("1e-3 == 0.001")
    assert constant_true("1e-3 * 1000.0 == 1.0")
    assert constant_true("1e-3 > 0.0009 and 1e-3 < 0.0011")


def test_inf_is_a_float():
    assert constant_true("inf > 1e308")
    assert constant_true("-inf < -1e308")
    assert constant_true("inf == inf and -inf != inf")
    with pytest.raises(attndsl.AttnTypeError):
        mask_pattern("inf > 1")                # int vs float: no implicit conversion


def test_true_false():
    assert constant_true("true")
    assert not constant_true("false")
    assert constant_true("true != false")


@pytest.mark.parametrize("name, op", [
    ("q", Op.Q), ("k", Op.K), ("h", Op.H), ("q_len", Op.Q_LEN), ("kv_len", Op.KV_LEN),
    ("heads", Op.HEADS), ("kv_heads", Op.KV_HEADS),
])
def test_int_builtins(name, op):
    ir = mask_pattern(f"{name} >= 0").ir.mask
    assert ir.args[0].op is op and ir.args[0].type is Type.INT


def test_builtin_values():
    pat = mask_pattern("true")
    assert pat.dense_mask(3, 5).all()
    h, q, k = grid(3, 5, heads=4)
    for expr, want in [("q", q), ("k", k), ("h", h), ("q_len", 3), ("kv_len", 5), ("heads", 4),
                       ("kv_heads", 2)]:
        for v in range(-1, 7):
            got = mask_pattern(f"{expr} == {v}").dense_mask(3, 5, heads=4, kv_heads=2)
            assert np.array_equal(got, np.broadcast_to(np.asarray(want) == v, (4, 3, 5))), (expr, v)


def test_score_in_score_clause():
    assert score_ir("score") == "score"
    assert score_ir("score * 2.0 - 1.0") == "(- (* score 2.0) 1.0)"


# ----------------------------------------------------------------------------- operators


@pytest.mark.parametrize("expr, ir", [
    ("x + y == z", "(== (+ $x $y) $z)"),
    ("x - y == z", "(== (- $x $y) $z)"),
    ("x * y == z", "(== (* $x $y) $z)"),
    ("-x == z", "(== (neg $x) $z)"),
    ("x // y == z", "(== (// $x $y) $z)"),
    ("x % y == z", "(== (% $x $y) $z)"),
    ("f / g == f", "(== (/ $f $g) $f)"),
    ("f ** g == f", "(== (** $f $g) $f)"),
    ("x < y", "(< $x $y)"),
    ("x <= y", "(<= $x $y)"),
    ("x > y", "(> $x $y)"),
    ("x >= y", "(>= $x $y)"),
    ("x == y", "(== $x $y)"),
    ("x != y", "(!= $x $y)"),
    ("not a", "(not $a)"),
    ("a and b", "(and $a $b)"),
    ("a or b", "(or $a $b)"),
    ("a if b else c", "(if $b $a $c)"),
    ("abs(x) == y", "(== (abs $x) $y)"),
    ("min(x, y) == z", "(== (min $x $y) $z)"),
    ("min(x, y, z, 4) == z", "(== (min $x $y $z 4) $z)"),
    ("max(x, y, z) == z", "(== (max $x $y $z) $z)"),
    ("clamp(x, y, z) == z", "(== (min (max $x $y) $z) $z)"),
    ("float(x) == f", "(== (float $x) $f)"),
    ("exp(f) == f", "(== (exp $f) $f)"),
    ("log(f) == f", "(== (log $f) $f)"),
    ("sqrt(f) == f", "(== (sqrt $f) $f)"),
    ("tanh(f) == f", "(== (tanh $f) $f)"),
    ("sigmoid(f) == f", "(== (sigmoid $f) $f)"),
])
def test_operator_forms(expr, ir):
    assert mask_ir(expr) == ir


def test_comparison_chain_means_and():
    assert mask_ir("0 <= q - k < x") == "(and (<= 0 (- q k)) (< (- q k) $x))"
    assert mask_ir("x < y <= z != 7") == "(and (and (< $x $y) (<= $y $z)) (!= $z 7))"
    # 0 <= q - k < w : exactly the sliding window
    w = 3
    got = eval_bool("0 <= q - k < w", params=f"w = {w}", q_len=9, kv_len=9)
    _, q, k = grid(9, 9)
    assert np.array_equal(got, ((0 <= q - k) & (q - k < w))[0])


def test_chain_of_mixed_directions_is_not_transitive():
    # 1 < 3 > 2 is true in Python (1 < 3 and 3 > 2), unlike (1 < 3) > 2
    assert constant_true("1 < 3 > 2")
    assert not constant_true("3 > 1 > 2")
    assert constant_true("1 == 1 == 1")
    assert not constant_true("0 == 0 == 1")


# ----------------------------------------------------------------------------- precedence

# (expression, value) with a = true, b = false, c = true, d = false, x = 1, y = 2, z = 3,
# f = 2.0, g = 3.0; each value is what Python gives for the same text.
PRECEDENCE = [
    ("not a == b", "(not (== $a $b))", True),
    ("not b == b", "(not (== $b $b))", False),
    ("not a and b", "(and (not $a) $b)", False),
    ("not b or a", "(or (not $b) $a)", True),
    ("a or b and c", "(or $a (and $b $c))", True),
    ("b and c or a", "(or (and $b $c) $a)", True),
    ("b and (c or a)", "(and $b (or $c $a))", False),
    ("(a or b) and d", "(and (or $a $b) $d)", False),
    ("not not a", "(not (not $a))", True),
    ("a if b else c if d else b", "(if $b $a (if $d $c $b))", False),
    ("a if d else b if a else c", "(if $d $a (if $a $b $c))", False),
    ("(a if b else c) if d else b", "(if $d (if $b $a $c) $b)", False),
    ("a or b if b else d", "(if $b (or $a $b) $d)", False),
    ("a if b or c else d", "(if (or $b $c) $a $d)", True),
    ("-2.0 ** 2.0 == -4.0", "(== (neg (** 2.0 2.0)) (neg 4.0))", True),
    ("(-2.0) ** 2.0 == 4.0", "(== (** (neg 2.0) 2.0) 4.0)", True),
    ("2.0 ** -1.0 == 0.5", "(== (** 2.0 (neg 1.0)) 0.5)", True),
    ("2.0 ** 3.0 ** 2.0 == 512.0", "(== (** 2.0 (** 3.0 2.0)) 512.0)", True),
    ("-f ** g == -8.0", "(== (neg (** $f $g)) (neg 8.0))", True),
    ("f * g ** f == 18.0", "(== (* $f (** $g $f)) 18.0)", True),
    ("-x * y == -2", "(== (* (neg $x) $y) (neg 2))", True),
    ("x + y * z == 7", "(== (+ $x (* $y $z)) 7)", True),
    ("(x + y) * z == 9", "(== (* (+ $x $y) $z) 9)", True),
    ("x - y - z == -4", "(== (- (- $x $y) $z) (neg 4))", True),
    ("x - (y - z) == 2", "(== (- $x (- $y $z)) 2)", True),
    ("z * y // 4 == 1", "(== (// (* $z $y) 4) 1)", True),
    ("z * (y // 4) == 0", "(== (* $z (// $y 4)) 0)", True),
    ("7 % 4 * 2 == 6", "(== (* (% 7 4) 2) 6)", True),
    ("-7 // 2 == -4", "(== (// (neg 7) 2) (neg 4))", True),
    ("-(7 // 2) == -3", "(== (neg (// 7 2)) (neg 3))", True),
    ("-7 % 2 == 1", "(== (% (neg 7) 2) 1)", True),
    ("x + y < z", "(< (+ $x $y) $z)", False),
    ("x < y == a", None, None),          # a chain int < int == bool: a type error, see below
    ("(x < y) == a", "(== (< $x $y) $a)", True),
    ("not x < y", "(not (< $x $y))", False),
    ("a and x < y", "(and $a (< $x $y))", True),
    ("--x == 1", "(== (neg (neg $x)) 1)", True),
    ("f / g * g == f", "(== (* (/ $f $g) $g) $f)", True),
    ("g / f / f == 0.75", "(== (/ (/ $g $f) $f) 0.75)", True),
    ("abs(x - z) ** 1 == 2", None, None),  # '**' is float-only: a type error
    ("float(x - z) ** 2.0 == 4.0", "(== (** (float (- $x $z)) 2.0) 4.0)", True),
]

_PY_NAMES = dict(a=True, b=False, c=True, d=False, x=1, y=2, z=3, f=2.0, g=3.0)


@pytest.mark.parametrize("expr, ir, value", [p for p in PRECEDENCE if p[1] is not None])
def test_precedence(expr, ir, value):
    assert mask_ir(expr) == ir
    params = ", ".join(f"{k} = {str(v).lower()}" for k, v in _PY_NAMES.items())
    assert constant_true(expr, params) is value
    # the same text in Python means the same thing (Python has the same precedence table)
    assert eval(expr, {"float": float}, dict(_PY_NAMES)) == value  # noqa: S307 - test oracle


@pytest.mark.parametrize("expr", [p[0] for p in PRECEDENCE if p[1] is None])
def test_precedence_type_errors(expr):
    with pytest.raises(attndsl.AttnTypeError):
        mask_ir(expr)


# ----------------------------------------------------------------------------- calls & indexing


def test_tensor_indexing_one_two_three_indices():
    src = """pattern t(a: int[], b: float[][], c: float[][][]):
    mask = a[q] == 1 and b[q, k] > 0.0 and c[h, q, k] < 1.0
"""
    ir = pattern(src).ir
    assert sexp(ir.mask) == ("(and (and (== (index:a q) 1) (> (index:b q k) 0.0)) "
                             "(< (index:c h q k) 1.0))")
    assert [p.type for p in ir.params] == [TensorType(Type.INT, 1), TensorType(Type.FLOAT, 2),
                                           TensorType(Type.FLOAT, 3)]


def test_index_expressions_are_full_expressions():
    src = "pattern t(a: int[]):\n    mask = a[k if k < q else q] == a[min(q, k) // 2 + 0]\n"
    assert sexp(pattern(src).ir.mask) == "(== (index:a (if (< k q) k q)) (index:a (+ (// (min q k) 2) 0)))"


def test_def_calls_positional_then_named():
    src = """def f(x, y = 10, z = 100) = x + y + z
pattern t:
    mask = f(1) == 111 and f(1, 2) == 103 and f(1, 2, 3) == 6 and f(1, z = 3) == 14 \
and f(x = 1, z = 3, y = 2) == 6 and f(1, y = 2,) == 103
"""
    pat = pattern(src)
    assert pat.dense_mask(1, 1).all()


def test_prelude_def_calls_with_named_arguments():
    a = pattern("pattern t:\n    mask = sliding(w = 3) or dilated(2, d = 3) or fixed(c = 1, l = 4)\n")
    b = pattern("pattern t:\n    mask = sliding(3) or dilated(2, 3) or fixed(4, 1)\n")
    assert a.ir == b.ir
    with pytest.raises(attndsl.AttnTypeError, match="no parameter 'width'"):
        pattern("pattern t:\n    mask = sliding(width = 3)\n")


def test_selector_calls_positional_then_named():
    src = """pattern t(s = 3):
    mask = random_blocks(1, 4) and random_blocks(1, 4, seed = s) and random_blocks(r = 1, b = 4)
"""
    ir = pattern(src).ir
    assert sexp(ir.mask) == ("(and (and (random_blocks 1 4 0) (random_blocks 1 4 $s)) "
                             "(random_blocks 1 4 0))")


# ----------------------------------------------------------------------------- files (section 2)


def test_comments_everywhere():
    src = """# a comment before everything
# another one

def w = 3   # after a def
pattern t(x = 1):   # after a header
    # a comment line inside the block
    let y = x + 1 # after a let
        # an over-indented comment is still only a comment
    mask = (q - k      # inside parentheses
            < y)       # and after them
# at the end, not indented
"""
    pat = pattern(src)
    h, q, k = grid(5, 5)
    assert np.array_equal(pat.dense_mask(5, 5)[0], (q - k < 2)[0])


def test_hash_inside_a_line_starts_a_comment():
    pat = pattern("pattern t:\n    mask = true#false\n")
    assert pat.dense_mask(1, 1).all()


def test_file_of_only_comments_and_defs_has_no_patterns():
    prog = attndsl.compile("# nothing here\n\ndef f = true\n")
    assert prog.patterns == [] and len(prog) == 0


def test_empty_file():
    assert attndsl.compile("").patterns == []
    assert attndsl.compile("\n\n   \n").patterns == []


def test_def_without_parameters():
    pat = pattern("def near = abs(q - k) <= 1\npattern t:\n    mask = near\n")
    _, q, k = grid(6, 6)
    assert np.array_equal(pat.dense_mask(6, 6)[0], (abs(q - k) <= 1)[0])


def test_def_with_parameters_and_defaults():
    src = """def win(lo, hi = 2) = lo <= q - k and q - k <= hi
pattern t:
    mask = win(0) or win(lo = -1, hi = -1)
"""
    _, q, k = grid(7, 7)
    want = ((0 <= q - k) & (q - k <= 2)) | (q - k == -1)
    assert np.array_equal(pattern(src).dense_mask(7, 7)[0], want[0])


def test_def_default_may_be_an_expression_of_other_defs():
    src = """def two = 2
def f(a, b = two * 3) = a + b
pattern t:
    mask = f(1) == 7
"""
    assert pattern(src).dense_mask(1, 1).all()


def test_def_sees_other_defs_prelude_and_builtins_in_any_order():
    src = """def a = b and causal
def b = k >= q_len - kv_len + 0
pattern t:
    mask = a
"""
    _, q, k = grid(4, 4)
    assert np.array_equal(pattern(src).dense_mask(4, 4)[0], (k <= q)[0])


def test_def_with_empty_parentheses():
    pat = pattern("def f() = k <= q\npattern t:\n    mask = f()\n")
    assert pat.dense_mask(3, 3)[0].sum() == 6


@pytest.mark.parametrize("header, values", [
    ("pattern t(x = 3, f = 0.5, b = true):", {"x": 3, "f": 0.5, "b": True}),
    ("pattern t(x = -3, f = -0.5, b = false):", {"x": -3, "f": -0.5, "b": False}),
    ("pattern t(f = 1e-3, g = -2e2, i = inf, j = -inf):",
     {"f": 1e-3, "g": -200.0, "i": math.inf, "j": -math.inf}),
    ("pattern t(x = 0,):", {"x": 0}),
    ("pattern t():", {}),
    ("pattern t:", {}),
])
def test_pattern_parameter_defaults(header, values):
    pat = pattern(f"{header}\n    mask = true\n")
    assert pat.params == values
    for name, v in values.items():
        p = pat.ir.param(name)
        assert p.default == v and type(p.default) is type(v)
        assert p.type is {int: Type.INT, float: Type.FLOAT, bool: Type.BOOL}[type(v)]


def test_negative_default_is_used():
    pat = pattern("pattern t(x = -2):\n    mask = q - k == x\n")
    _, q, k = grid(5, 5)
    assert np.array_equal(pat.dense_mask(5, 5)[0], (q - k == -2)[0])


@pytest.mark.parametrize("typ, py", [("int", 3), ("float", 2.5), ("bool", True)])
def test_required_typed_parameters(typ, py):
    expr = {"int": "q - k < p", "float": "float(q - k) < p", "bool": "p"}[typ]
    pat = pattern(f"pattern t(p: {typ}):\n    mask = {expr}\n")
    param = pat.ir.param("p")
    assert param.default is None and param.type is Type(typ)
    assert pat.params == {}
    with pytest.raises(attndsl.AttnError, match="'p'"):
        pat.dense_mask(4, 4)
    bound = pat.bind(p=py)
    assert bound.params == {"p": py}
    _, q, k = grid(4, 4)
    want = {"int": q - k < 3, "float": q - k < 2.5, "bool": np.ones((1, 4, 4), bool)}[typ]
    assert np.array_equal(bound.dense_mask(4, 4)[0], np.broadcast_to(want, (1, 4, 4))[0])
    # the original is unchanged: bind returns a new pattern
    with pytest.raises(attndsl.AttnError):
        pat.dense_mask(4, 4)


@pytest.mark.parametrize("typ, elem, rank", [
    ("int[]", Type.INT, 1), ("float[]", Type.FLOAT, 1), ("int[][]", Type.INT, 2),
    ("float[][]", Type.FLOAT, 2), ("float[][][]", Type.FLOAT, 3),
])
def test_tensor_types(typ, elem, rank):
    idx = ", ".join(["q", "k", "h"][:rank])
    cmp = "== 0" if elem is Type.INT else "== 0.0"
    pat = pattern(f"pattern t(x: {typ}):\n    mask = x[{idx}] {cmp}\n")
    assert pat.ir.param("x").type == TensorType(elem, rank)
    assert pat.tensor_params == ["x"]


def test_tensor_type_with_spaces_inside_brackets():
    pat = pattern("pattern t(x: float [ ] [ ]):\n    mask = x[q, k] > 0.0\n")
    assert pat.ir.param("x").type == TensorType(Type.FLOAT, 2)


def test_lets_see_earlier_lets():
    src = """pattern t(w = 2):
    let d = q - k
    let near = 0 <= d and d < w
    let far = not near
    mask = near or far and k == 0
"""
    _, q, k = grid(6, 6)
    d = q - k
    near = (0 <= d) & (d < 2)
    assert np.array_equal(pattern(src).dense_mask(6, 6)[0], (near | (~near & (k == 0)))[0])


def test_let_used_in_the_score_clause():
    src = """pattern t:
    let bias = float(q - k) * 0.5
    mask = true
    score = score - bias
"""
    ir = pattern(src).ir
    assert sexp(ir.score) == "(- score (* (float (- q k)) 0.5))"


def test_let_may_mention_score_when_only_the_score_clause_uses_it():
    src = """pattern t:
    let doubled = score * 2.0
    mask = causal
    score = doubled + 1.0
"""
    assert sexp(pattern(src).ir.score) == "(+ (* score 2.0) 1.0)"


def test_clauses_in_any_order():
    src = "pattern t:\n    score = score * 2.0\n    let a = k <= q\n    mask = a\n"
    ir = pattern(src).ir
    assert sexp(ir.mask) == "(<= k q)" and sexp(ir.score) == "(* score 2.0)"


def test_parenthesised_continuation_lines():
    src = """pattern t(w = 2):
    mask = (k <= q
        and
            q - k < w
    or k == 0)
    score = (score
             +
             float(min(q,
                       k)))
"""
    ir = pattern(src).ir
    assert sexp(ir.mask) == "(or (and (<= k q) (< (- q k) $w)) (== k 0))"
    assert sexp(ir.score) == "(+ score (float (min q k)))"


def test_continuation_inside_brackets_and_calls():
    src = """def f(a,
      b) = a + b
pattern t(x: int[][],
          y = 1,
          ):
    mask = x[q,
             k] == f(y,
                     2)
"""
    pat = pattern(src)
    assert sexp(pat.ir.mask) == "(== (index:x q k) (+ $y 2))"


def test_def_continued_in_parentheses():
    src = "def f = (k <= q\n    and k >= 0)\npattern t:\n    mask = f\n"
    assert sexp(pattern(src).ir.mask) == "(and (<= k q) (>= k 0))"


def test_several_patterns_and_defs_interleaved():
    src = """pattern one:
    mask = causal
def g = k == 0
pattern two:
    mask = g
"""
    prog = attndsl.compile(src)
    assert prog.patterns == ["one", "two"]
    assert "one" in prog and "three" not in prog
    assert sexp(prog["two"].ir.mask) == "(== k 0)"


def test_crlf_and_missing_final_newline_and_tabs():
    src = "def g = k == 0\r\npattern t:\r\n\tmask = g or causal"
    pat = pattern(src)
    _, q, k = grid(3, 3)
    assert np.array_equal(pat.dense_mask(3, 3)[0], ((k == 0) | (k <= q))[0])


def test_deeper_indentation_is_fine():
    pat = pattern("pattern t:\n            let a = true\n            mask = a\n")
    assert pat.dense_mask(1, 1).all()


def test_keywords_are_not_names_but_prefixes_are():
    src = ("def define = true\ndef notify = true\ndef iffy = true\n"
           "pattern t:\n    mask = define and notify and iffy\n")
    assert pattern(src).dense_mask(1, 1).all()
    for kw in ["def", "pattern", "let", "if", "else", "and", "or", "not"]:
        with pytest.raises(attndsl.AttnSyntaxError):
            attndsl.compile(f"def {kw} = true\n")


@pytest.mark.parametrize("src", [
    "pattern t:\nmask = true\n",                        # block not indented
    "pattern t:\n    mask = true\n   let a = 1\n",       # dedent to no known level
    "pattern t:\n    mask = true\n        mask = true\n",  # unexpected indent
    "pattern t\n    mask = true\n",                     # missing ':'
    "pattern t:\n    mask true\n",                      # missing '='
    "pattern t:\n    mask = (true\n",                   # unclosed parenthesis
    "pattern t:\n    mask = true)\n",                   # unbalanced parenthesis
    "pattern t:\n    mask = t[]\n",                     # indexing with no index
    "pattern t:\n    mask = f(a = 1 2)\n",
    "pattern t(x = q):\n    mask = true\n",             # a default must be a literal
    "pattern t(x = 1 + 1):\n    mask = true\n",
    "pattern t(x = -true):\n    mask = true\n",
    "def f(x) = \n",
    "def = true\n",
    "mask = true\n",                                    # a clause outside a pattern
    "pattern t:\n",                                     # no clauses at all
    "pattern t: mask = true\n",                         # clauses go on their own lines
    "pattern t:\n    mask = 1 < < 2\n",
    "pattern t:\n    mask = q 1\n",
    "pattern t:\n    mask = true if false\n",
    "pattern t:\n    mask = 1.2.3 == 1.0\n",
    "pattern t:\n    let = 3\n    mask = true\n",
])
def test_syntax_errors(src):
    with pytest.raises(attndsl.AttnSyntaxError):
        attndsl.compile(src)
