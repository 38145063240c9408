"""Diagnostics (LANGUAGE.md section 7): the error family, positions, rendering, several errors at
once, syntax errors in words, and call errors that name the offending argument.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import errors_of, pattern

import attndsl
from attndsl import AttnCallError, AttnError, AttnNameError, AttnSyntaxError, AttnTypeError


def rendered(filename: str, line: int, col: int, message: str, source_line: str) -> str:
    return f"{filename}:{line}:{col}: error: {message}\n{source_line}\n{' ' * (col - 1)}^"


# ----------------------------------------------------------------------------- the family


@pytest.mark.parametrize("cls", [AttnSyntaxError, AttnNameError, AttnTypeError, AttnCallError])
def test_error_subclasses(cls):
    assert issubclass(cls, AttnError) and issubclass(cls, Exception)
    assert cls is not AttnError
    assert getattr(attndsl, cls.__name__) is cls


def test_the_subclasses_are_distinct():
    classes = {AttnSyntaxError, AttnNameError, AttnTypeError, AttnCallError}
    assert len(classes) == 4
    for a in classes:
        for b in classes - {a}:
            assert not issubclass(a, b)


@pytest.mark.parametrize("src, cls", [
    ("pattern t:\n    mask = q $ k\n", AttnSyntaxError),
    ("pattern t:\n    mask = nope\n", AttnNameError),
    ("pattern t:\n    mask = 1\n", AttnTypeError),
])
def test_compile_errors_are_attn_errors_with_positions(src, cls):
    err = errors_of(src)
    assert type(err) is cls
    assert isinstance(err, AttnError)
    assert err.line == 2 and err.column >= 1
    assert str(err).startswith(f"<test>:2:{err.column}: error: ")


def test_call_errors_have_no_position():
    pat = pattern("pattern t(doc: int[]):\n    mask = doc[q] == doc[k]\n")
    with pytest.raises(AttnCallError) as info:
        pat.dense_mask(4, 4)
    err = info.value
    assert (err.line, err.column) == (0, 0)
    assert str(err) == f"error: {err.message}"


# ----------------------------------------------------------------------------- rendering


def test_the_example_of_section_7():
    # the contract's example: unknown name 'windw' at 3:17 of examples/bad.attn
    src = "# a file with a typo\npattern bad:\n    let width = windw(128)\n    mask = causal\n"
    err = errors_of(src, filename="examples/bad.attn")
    assert isinstance(err, AttnNameError)
    assert (err.line, err.column) == (3, 17)
    assert err.message == "unknown name 'windw'"
    assert err.filename == "examples/bad.attn"
    assert str(err) == rendered("examples/bad.attn", 3, 17, "unknown name 'windw'",
                                "    let width = windw(128)")


def test_the_example_of_section_7_in_a_mask():
    src = "pattern bad:\n    mask = causal and windw(128)\n"
    err = errors_of(src, filename="examples/bad.attn")
    assert str(err) == rendered("examples/bad.attn", 2, 23, "unknown name 'windw'",
                                "    mask = causal and windw(128)")


def test_loaded_file_errors_carry_the_path(tmp_path):
    path = tmp_path / "bad.attn"
    path.write_text("pattern bad:\n    mask = causal and windw(128)\n")
    with pytest.raises(AttnNameError) as info:
        attndsl.load(path)
    assert str(info.value).startswith(f"{path}:2:23: error: unknown name 'windw'\n")


def test_load_of_a_missing_file_is_an_attn_error(tmp_path):
    with pytest.raises(AttnError, match="nothere.attn"):
        attndsl.load(tmp_path / "nothere.attn")


@pytest.mark.parametrize("src, line, col, fragment", [
    # unknown name
    ("pattern t:\n    mask = k < limit\n", 2, 16, "unknown name 'limit'"),
    ("def f = g2\n", 1, 9, "unknown name 'g2'"),
    ("pattern t:\n    mask = causal and zzz(3)\n", 2, 23, "unknown name 'zzz'"),
    # divisor
    ("pattern t:\n    mask = q // 0 == 0\n", 2, 17, "greater than 0"),
    ("pattern t:\n    mask = k % 0 == 0\n", 2, 16, "greater than 0"),
    ("pattern t(c = 0):\n    mask = q // c == k // c\n", 2, 17, "greater than 0"),
    ("pattern t:\n    mask = q // k == 0\n", 2, 17, "call constant"),
    # redeclared names
    ("def a = true\ndef a = false\n", 2, 5, "already declared at line 1"),
    ("pattern p:\n    mask = true\npattern p:\n    mask = true\n", 3, 9, "already declared at line 1"),
    ("def causal = k < q\n", 1, 5, "prelude"),
    ("pattern sliding:\n    mask = true\n", 1, 9, "prelude"),
    # bad characters
    ("pattern t:\n    mask = q $ k\n", 2, 14, "'$'"),
    ("pattern t:\n    mask = q @ k\n", 2, 14, "'@'"),
    ("pattern t:\n    mask = k <= q ? 1\n", 2, 19, "'?'"),
    ("pattern t:\n    mask = k <= q & true\n", 2, 21, "'&' needs int operands"),
    ("pattern t:\n    mask = `k`\n", 2, 12, "'`'"),
    ("pattern t(w = 1):\n    mask = k <= q;\n", 2, 18, "';'"),
    ("def f = {k}\n", 1, 9, "'{'"),
])
def test_errors_point_at_the_culprit(src, line, col, fragment):
    err = errors_of(src)
    assert (err.line, err.column) == (line, col), str(err)
    assert fragment in err.message
    source_line = src.splitlines()[line - 1]
    assert str(err).startswith(rendered("<test>", line, col, err.message, source_line))


def test_caret_under_a_tab_indented_line():
    src = "pattern t:\n\tmask = k < nope\n"
    err = errors_of(src)
    assert (err.line, err.column) == (2, 13)
    lines = str(err).splitlines()
    assert lines[1] == " mask = k < nope"            # a tab is one column wide
    assert lines[2].index("^") == lines[1].index("nope")


def test_crlf_source_positions():
    src = "pattern t:\r\n    mask = k < nope\r\n"
    err = errors_of(src)
    assert (err.line, err.column) == (2, 16)
    assert str(err).splitlines()[1] == "    mask = k < nope"


# ----------------------------------------------------------------------------- syntax errors


SYNTAX_ERRORS = [
    "pattern t:\nmask = true\n",
    "pattern t:\n    mask = true\n   let a = 1\n",
    "pattern t:\n    mask = true\n        mask = true\n",
    "pattern t\n    mask = true\n",
    "pattern t:\n    mask true\n",
    "pattern t:\n    mask = (true\n",
    "pattern t:\n    mask = true)\n",
    "pattern t:\n    mask = t[]\n",
    "pattern t:\n    mask = t[q\n",
    "def f(x) = \n",
    "def = true\n",
    "mask = true\n",
    "pattern t:\n",
    "pattern t: mask = true\n",
    "pattern t:\n    mask = 1 < < 2\n",
    "pattern t:\n    mask = q 1\n",
    "pattern t:\n    mask = true if false\n",
    "pattern t:\n    let = 3\n    mask = true\n",
    "pattern t(x: int[:]):\n    mask = true\n",
    "pattern t:\n    mask = f(,)\n",
    "def f(x,,) = 1\n",
    "pattern t:\n    mask = q <= = k\n",
    "pattern",
    "pattern t(:\n    mask = true\n",
    "pattern t:\n    mask = [q]\n",
    "pattern t:\n    mask = f(a = 1 2)\n",
    "pattern t:\n    mask = 1.2.3 == 1.0\n",
    "pattern t:\n    mask = q ** ** k\n",
    "pattern t:\n    mask = not\n",
    "pattern t:\n    mask = (q == k))\n",
    "def f(x = ) = x\n",
    "pattern t(x = ):\n    mask = true\n",
    "pattern t(x: ):\n    mask = true\n",
    "pattern t(x: int[][):\n    mask = true\n",
    "pattern t:\n    mask = true\n    score = score +\n",
    "pattern t:\n    mask = true else false\n",
    "pattern t:\n    mask = a if b\n",
    "pattern t:\n    mask = q.k\n",
    "def def = 1\n",
    "pattern t:\n    mask = -\n",
    "pattern t:\n    mask = 1e\n",
    "\tpattern t:\n    mask = true\n",
    "  def f = true\n",
]

# what a lark terminal, rule or internal name would look like in a message
_INTERNAL = re.compile(r"\b(?:[A-Z][A-Z0-9]*_[A-Z0-9_]*|_?[A-Z]{3,}|__ANON\w*|\$END|_NL|_INDENT|_DEDENT)\b")


@pytest.mark.parametrize("src", SYNTAX_ERRORS)
def test_syntax_errors_in_words(src):
    err = errors_of(src)
    assert isinstance(err, AttnSyntaxError), str(err)
    text = str(err)
    for e in err.all_errors():
        assert e.line >= 1 and e.column >= 1
        assert not _INTERNAL.search(e.message), e.message
        assert "lark" not in e.message.lower() and "Token(" not in e.message
        assert "Traceback" not in text
    for word in ["RPAR", "LPAR", "_NL", "NAME", "INT", "FLOAT", "CMP_OP", "LSQB", "RSQB", "$END",
                 "__ANON", "_INDENT", "_DEDENT", "COMMA", "EQUAL", "COLON"]:
        assert word not in text, text


def test_syntax_error_lists_expected_tokens():
    err = errors_of("pattern t:\n    mask true\n")
    assert err.message == "unexpected 'true'; expected '='"
    assert (err.line, err.column) == (2, 10)
    err = errors_of("pattern t\n    mask = true\n")
    assert "expected" in err.message and "':'" in err.message
    err = errors_of("def = true\n")
    assert "a name" in err.message


def test_syntax_error_at_an_unclosed_parenthesis():
    err = errors_of("pattern t:\n    mask = (k <= q\n")
    assert isinstance(err, AttnSyntaxError)
    assert (err.line, err.column) == (2, 12)
    assert "'('" in err.message


def test_syntax_error_at_an_unmatched_closing_parenthesis():
    err = errors_of("pattern t:\n    mask = causal and )\n")
    assert (err.line, err.column) == (2, 23)
    assert "')'" in err.message


def test_parameter_default_must_be_a_literal():
    err = errors_of("pattern t(x = q):\n    mask = true\n")
    assert isinstance(err, AttnSyntaxError)
    assert (err.line, err.column) == (1, 15)


DEEP = {
    "not": lambda n: "not " * n + "true",
    "neg": lambda n: "-" * n + "q == 0",
    "add": lambda n: " + ".join(["q"] * n) + " == 0",
    "pow": lambda n: " ** ".join(["1.0"] * n) + " == 1.0",          # right-associative
    "if": lambda n: "true if false else " * n + "true",             # right-associative
    "abs": lambda n: "abs(" * n + "q" + ")" * n + " == 0",
    # 'and' inside 'or' inside 'and' ...: a chain of one of them is balanced, not deep (test_limits)
    "and": lambda n: "k <= q" + "".join(f" {'or' if i % 2 else 'and'} (k <= q" for i in range(n - 1))
                     + ")" * (n - 1),
}


@pytest.mark.parametrize("form", sorted(DEEP))
def test_nesting_too_deep_is_an_attn_error_not_a_recursion_error(form):
    src = "pattern t:\n    mask = " + DEEP[form](3000) + "\n"
    err = errors_of(src)
    assert isinstance(err, AttnSyntaxError) and "nested too deeply" in err.message
    assert err.line == 2 and err.column >= 12            # where the nesting is, not at 1:1
    # moderately deep expressions compile and evaluate
    pat = pattern("pattern t:\n    mask = " + DEEP[form](60) + "\n")
    assert pat.dense_mask(2, 2).shape == (1, 2, 2)


def test_deep_parentheses_alone_are_fine():
    pat = pattern("pattern t:\n    mask = " + "(" * 3000 + "k <= q" + ")" * 3000 + "\n")
    assert pat.dense_mask(3, 3)[0].sum() == 6


# ----------------------------------------------------------------------------- several errors


def test_two_syntax_errors_in_two_declarations():
    src = ("pattern a:\n    mask = causal and )\n\n"
           "def ok = true\n"
           "pattern b:\n    mask = k <= q $ true\n")
    err = errors_of(src)
    errs = err.all_errors()
    assert [(type(e), e.line, e.column) for e in errs] == [
        (AttnSyntaxError, 2, 23), (AttnSyntaxError, 6, 19)]
    text = str(err)
    assert text.count(": error: ") == 2
    assert "<test>:2:23: error: " in text and "<test>:6:19: error: " in text


def test_two_unknown_names_in_two_patterns():
    src = "pattern a:\n    mask = k < foo\npattern b:\n    mask = bar(3)\n"
    err = errors_of(src)
    assert [(type(e), e.line, e.column, e.message) for e in err.all_errors()] == [
        (AttnNameError, 2, 16, "unknown name 'foo'"), (AttnNameError, 4, 12, "unknown name 'bar'")]
    text = str(err)
    assert text == "\n".join([
        rendered("<test>", 2, 16, "unknown name 'foo'", "    mask = k < foo"),
        rendered("<test>", 4, 12, "unknown name 'bar'", "    mask = bar(3)")])


def test_errors_of_different_kinds_are_reported_together_in_source_order():
    src = ("pattern a:\n    mask = 1.0\n"          # type error, line 2
           "def causal = true\n"                   # prelude name, line 3
           "pattern b:\n    mask = q // 0 == nope\n")   # unknown name (the divisor is fine to skip)
    err = errors_of(src)
    lines = [e.line for e in err.all_errors()]
    assert lines == sorted(lines) and {2, 3, 5} <= set(lines)
    assert type(err) is type(err.all_errors()[0])


def test_a_syntax_error_does_not_hide_name_errors_elsewhere():
    src = "pattern a:\n    mask = (\npattern b:\n    mask = nope\n"
    err = errors_of(src)
    kinds = [(type(e), e.line) for e in err.all_errors()]
    assert (AttnNameError, 4) in kinds and any(k is AttnSyntaxError for k, _ in kinds)


def test_uses_of_a_declaration_that_did_not_parse_are_not_unknown():
    src = "def near = abs(q - k) <=\npattern a:\n    mask = near\n"
    err = errors_of(src)
    assert [type(e) for e in err.all_errors()] == [AttnSyntaxError]


def test_each_error_is_reported_once():
    src = "def f = nope\npattern a:\n    mask = f and f\npattern b:\n    mask = f\n"
    err = errors_of(src)
    assert [(e.line, e.message) for e in err.all_errors()] == [(1, "unknown name 'nope'")]


# ----------------------------------------------------------------------------- call errors


PACKED = "pattern packed(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n"


@pytest.fixture
def packed():
    return pattern(PACKED, filename="packed.attn")


def _qkv(batch=2, heads=4, kv_heads=2, q_len=8, kv_len=8, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, heads, q_len, d, generator=g, dtype=dtype),
            torch.randn(batch, kv_heads, kv_len, d, generator=g, dtype=dtype),
            torch.randn(batch, kv_heads, kv_len, d, generator=g, dtype=dtype))


def call_error(fn, *names):
    with pytest.raises(AttnCallError) as info:
        fn()
    for n in names:
        assert f"'{n}'" in info.value.message, info.value.message
    return info.value


def test_call_errors_name_the_argument(packed):
    q, k, v = _qkv()
    doc = torch.zeros(8, dtype=torch.long)
    assert packed(q, k, v, doc=doc).shape == q.shape
    # shapes
    call_error(lambda: packed(q[0], k, v, doc=doc), "q")
    call_error(lambda: packed(q, k[0], v, doc=doc), "k")
    call_error(lambda: packed(q, k, v[..., 0], doc=doc), "v")
    call_error(lambda: packed(q, k[..., :8], v, doc=doc), "k")                 # head_dim mismatch
    call_error(lambda: packed(q, k, v[:, :, :7], doc=doc), "k", "v")           # lengths
    call_error(lambda: packed(q, k, v[:1], doc=doc), "v")                      # batch sizes
    call_error(lambda: packed(q, k[:, :1].expand(2, 3, 8, 16), v[:, :1].expand(2, 3, 8, 16), doc=doc),
               "q")                                                           # GQA divisibility
    # dtypes
    call_error(lambda: packed(q.double(), k, v, doc=doc), "q", "k", "v")
    call_error(lambda: packed(q.int(), k.int(), v.int(), doc=doc), "q")
    call_error(lambda: packed(q.numpy(), k, v, doc=doc), "q")
    # tensor inputs
    call_error(lambda: packed(q, k, v), "doc")                                 # missing
    call_error(lambda: packed(q, k, v, doc=doc, segment=doc), "segment")       # unknown
    call_error(lambda: packed(q, k, v, doc=torch.zeros(8)), "doc")             # dtype
    call_error(lambda: packed(q, k, v, doc=torch.zeros(2, 8, 8, dtype=torch.long)), "doc")   # rank
    call_error(lambda: packed(q, k, v, doc=torch.zeros(3, 8, dtype=torch.long)), "doc")      # batch dim
    call_error(lambda: packed(q, k, v, doc=None), "doc")
    # other arguments
    call_error(lambda: packed(q, k, v, doc=doc, scale="big"), "scale")
    call_error(lambda: packed(q, k, v, doc=doc, backend="cuda"), "backend")


def test_reference_and_dense_mask_call_errors(packed):
    q, k, v = (x.numpy() for x in _qkv())
    doc = np.zeros(8, np.int64)
    call_error(lambda: packed.reference(q[0], k, v, doc=doc), "q")
    call_error(lambda: packed.reference(q, k[..., :4], v, doc=doc), "k")
    call_error(lambda: packed.reference(q, k, v), "doc")
    call_error(lambda: packed.reference(q, k, v, doc=doc, bias=doc), "bias")
    call_error(lambda: packed.reference(q, k, v, doc=np.zeros((3, 8), np.int64)), "doc")
    call_error(lambda: packed.reference(q, k, v, doc=doc, scale=[1.0]), "scale")
    call_error(lambda: packed.dense_mask(8, 8), "doc")
    call_error(lambda: packed.dense_mask(8, 8, doc=np.zeros((2, 8), np.int64)), "doc")
    call_error(lambda: packed.dense_mask(8, 8, doc=np.zeros(8), ), "doc")
    call_error(lambda: packed.dense_mask(8, 8, doc="abc"), "doc")
    call_error(lambda: packed.dense_mask(8, 8, doc=[[1, 2], [3]]), "doc")
    call_error(lambda: packed.dense_mask(-1, 8, doc=doc), "q_len")
    call_error(lambda: packed.dense_mask(8, 8.0, doc=doc), "kv_len")
    call_error(lambda: packed.dense_mask(8, 8, heads=0, doc=doc), "heads")
    call_error(lambda: packed.dense_mask(8, 8, heads=3, kv_heads=2, doc=doc), "heads", "kv_heads")


def test_compile_time_parameter_passed_as_tensor_input():
    pat = pattern("pattern t(w = 2):\n    mask = sliding(w)\n")
    call_error(lambda: pat.dense_mask(4, 4, w=3), "w")


def test_selector_patterns_need_query_and_key():
    pat = pattern("pattern t:\n    mask = topk_blocks(1, 4)\n")
    with pytest.raises(AttnCallError, match="query"):
        pat.dense_mask(8, 8)
    rng = np.random.default_rng(0)
    call_error(lambda: pat.dense_mask(8, 8, query=rng.standard_normal((1, 7, 4)),
                                      key=rng.standard_normal((1, 8, 4))), "query")
    call_error(lambda: pat.dense_mask(8, 8, query=rng.standard_normal((1, 8, 4)),
                                      key=rng.standard_normal((1, 8, 5))), "key")


def test_route_centroids_shape_is_checked():
    pat = pattern("pattern t(c: float[][][]):\n    mask = route(c)\n")
    rng = np.random.default_rng(0)
    qa, ka = rng.standard_normal((2, 8, 4)), rng.standard_normal((2, 8, 4))
    call_error(lambda: pat.dense_mask(8, 8, heads=2, query=qa, key=ka, c=rng.standard_normal((3, 5, 4))),
               "c")
    call_error(lambda: pat.dense_mask(8, 8, heads=2, query=qa, key=ka, c=rng.standard_normal((2, 5, 3))),
               "c")


def test_index_out_of_range_is_a_call_error_at_the_index(packed):
    with pytest.raises(AttnCallError) as info:
        packed.dense_mask(8, 8, doc=np.zeros(4, np.int64))
    err = info.value
    assert "'doc'" in err.message and "out of range" in err.message
    assert (err.filename, err.line, err.column) == ("packed.attn", 2, 23)
    assert str(err).splitlines()[1:] == ["    mask = causal and doc[q] == doc[k]", " " * 22 + "^"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_device_mismatch_names_the_argument(packed):
    q, k, v = _qkv()
    doc = torch.zeros(8, dtype=torch.long)
    call_error(lambda: packed(q.cuda(), k, v, doc=doc), "q", "k", "v")
    call_error(lambda: packed(q.cuda(), k.cuda(), v.cuda(), doc=doc), "doc")


def test_device_check_runs_on_meta_tensors(packed):
    # without a GPU, 'meta' tensors still exercise the device comparison
    q, k, v = _qkv()
    doc = torch.zeros(8, dtype=torch.long)
    call_error(lambda: packed(q, k.to("meta"), v, doc=doc), "q", "k", "v")
    call_error(lambda: packed(q, k, v, doc=doc.to("meta")), "doc")


def test_unbound_required_parameter_is_a_call_error():
    pat = pattern("pattern t(w: int):\n    mask = sliding(w)\n")
    call_error(lambda: pat.dense_mask(4, 4), "w")
    q, k, v = _qkv(q_len=4, kv_len=4)
    call_error(lambda: pat(q, k, v), "w")
    call_error(lambda: pat.reference(q.numpy(), k.numpy(), v.numpy()), "w")


def test_program_lookup_of_a_missing_pattern():
    prog = attndsl.compile("pattern a:\n    mask = true\n")
    with pytest.raises(AttnError, match="'b'"):
        prog["b"]


def test_compile_needs_text():
    with pytest.raises(AttnError):
        attndsl.compile(b"pattern a:\n    mask = true\n")
