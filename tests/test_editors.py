"""Editor support: the Pygments lexer (attndsl/lexer.py, `attndsl show --color`) and the TextMate
grammar with its VS Code extension (editors/).

Python has no TextMate engine, so the grammar is checked with a small interpreter of the only
rules it uses, ``match`` rules: at each position of a line the leftmost match of any rule wins,
ties going to the earlier rule, and a rule's ``name`` (or each capture's) scopes what it
matched. On every example (and a sample holding every word and symbol of the language) every
non-blank character must get a scope, and the same kind of token as the Pygments lexer gives it.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pygments.token import (
    Comment,
    Error,
    Keyword,
    Name,
    Number,
    Operator,
    Punctuation,
)

from attndsl import cli, lexer
from attndsl.checker import AT, FUNCTIONS, REDUCTIONS, RESERVED, SELECTORS
from attndsl.errors import AttnCallError
from attndsl.parser import terminals
from attndsl.reserved import BUILTIN_NAMES

ROOT = Path(__file__).resolve().parent.parent
EDITORS = ROOT / "editors"
SOURCES = sorted((ROOT / "examples").rglob("*.attn")) + [ROOT / "grammar" / "prelude.attn"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _lex(text: str) -> list[tuple]:
    return list(lexer.AttnLexer(stripnl=False, ensurenl=False).get_tokens(text))


def _word_sample() -> str:
    """Every word and symbol the lexer knows, each once, in lines that parse as far as a lexer
    cares (``x = WORD``), plus declarations, a clause and typed parameters."""
    lines = [f"x = {w}" for w in lexer.KEYWORDS + lexer.VALUE_NAMES + lexer.CALLABLE_NAMES +
             lexer.PRELUDE_NAMES + lexer.CONSTANT_NAMES]
    lines += [f"x {s} y" for s in lexer.OPERATORS + lexer.PUNCTUATION]
    lines += ["pattern p(a: int[], b: float [ ] [ ], c: bool[][][], d = -1.5e3, e = .5, f = 7):",
              "    let y = 1e-3 if a[q] >= 2 else 3.  # note", "\tscore = score", "def g(w) = w"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the word lists


def test_keywords_are_the_grammars():
    reserved = re.match(r"\(\?!\(\?:([\w|]+)\)", terminals()["NAME"][1]).group(1).split("|")
    assert sorted(lexer.KEYWORDS) == sorted(reserved)
    assert set(lexer.DECLARATION_KEYWORDS + lexer.CONSTANT_KEYWORDS) <= set(lexer.KEYWORDS)
    assert set(lexer.WORD_OPERATORS) == {"and", "or", "not"}
    assert "for" in lexer.KEYWORDS and "in" in lexer.KEYWORDS


def test_builtin_names_are_the_checkers():
    values, callables = set(lexer.VALUE_NAMES), set(lexer.CALLABLE_NAMES)
    constants = set(lexer.CONSTANT_NAMES)
    assert not (values & callables or values & constants or callables & constants)
    assert values | callables | constants == set(BUILTIN_NAMES) == RESERVED
    assert callables == FUNCTIONS | set(SELECTORS) | set(REDUCTIONS) | {AT, "range"}
    assert {"q", "k", "h", "kv_head", "score"} <= values
    prelude = (ROOT / "grammar" / "prelude.attn").read_text(encoding="utf-8")
    assert list(lexer.PRELUDE_NAMES) == re.findall(r"^def (\w+)", prelude, re.M)


def test_symbols_are_the_grammars():
    literals = {text for kind, text in terminals().values()
                if kind == "str" and not text.isidentifier()}
    assert set(lexer.OPERATORS) | set(lexer.PUNCTUATION) == literals | {"<=", ">=", "==", "!=",
                                                                          "<", ">"}
    for op in ("&", "|", "^", "~", "<<", ">>", "**", "//", "%"):
        assert op in lexer.OPERATORS
    assert list(lexer.OPERATORS) == sorted(lexer.OPERATORS, key=lambda s: (-len(s), s))


# ----------------------------------------------------------------------------- the Pygments lexer


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_example_lexes_without_errors(path):
    text = path.read_text(encoding="utf-8")
    tokens = _lex(text)
    assert "".join(v for _, v in tokens) == text
    assert [(t, v) for t, v in tokens if t in Error] == []


def test_known_tokens_get_their_types():
    text = ("# c\npattern doc_window(doc: int[][], w = 4, on = true):\n"
            "    let d = q - k\n"
            "    mask = d & (d - 1) == 0 or at(sliding(w), q = q >> 1) and not doc[q, 0] < 2.5\n"
            "    score = score + sum(float(i) for i in range(heads)) if on else -inf\n")
    expected = [
        (Comment.Single, "# c"), (Keyword.Declaration, "pattern"), (Name.Function, "doc_window"),
        (Name, "doc"), (Keyword.Type, "int"), (Keyword.Type, "[][]"), (Name, "w"),
        (Number.Integer, "4"), (Keyword.Constant, "true"), (Keyword.Declaration, "let"),
        (Name.Variable, "d"), (Name.Builtin.Pseudo, "q"), (Operator, "-"),
        (Name.Builtin.Pseudo, "k"), (Keyword.Pseudo, "mask"), (Operator, "&"), (Operator, "=="),
        (Operator.Word, "or"), (Name.Builtin, "at"), (Name.Builtin, "sliding"),
        (Operator, ">>"), (Operator.Word, "and"), (Operator.Word, "not"), (Punctuation, "["),
        (Punctuation, ","), (Number.Float, "2.5"), (Keyword.Pseudo, "score"),
        (Name.Builtin.Pseudo, "score"), (Name.Builtin, "sum"), (Name.Builtin, "float"),
        (Keyword, "for"), (Name, "i"), (Keyword, "in"), (Name.Builtin, "range"),
        (Name.Builtin.Pseudo, "heads"), (Keyword, "if"), (Keyword, "else"),
        (Keyword.Constant, "inf"),
    ]
    tokens = [(t, v) for t, v in _lex(text) if v.strip()]
    at = 0
    for want in expected:                       # in this order, others in between
        while at < len(tokens) and tokens[at] != want:
            at += 1
        assert at < len(tokens), f"{want} not found (in order) in {tokens}"
        at += 1


def test_text_outside_the_grammar_gives_error_tokens():
    for bad in ("$", "?", "@", "é", "\\", "'s'"):
        tokens = _lex(f"x = a {bad} b\n")
        assert any(t in Error for t, _ in tokens), bad


def test_the_entry_point_registers_the_lexer():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^\[project\.entry-points\."pygments\.lexers"\]\s*\nattn = '
                     r'"attndsl\.lexer:AttnLexer"', pyproject, re.M)
    found = [e for e in importlib.metadata.entry_points(group="pygments.lexers") if e.name == "attn"]
    assert found, ("the pygments.lexers entry point 'attn' is not installed: reinstall the "
                   "project (pip install -e .)")
    assert found[0].load() is lexer.AttnLexer
    from pygments.lexers import get_lexer_by_name, get_lexer_for_filename

    assert isinstance(get_lexer_by_name("attn"), lexer.AttnLexer)
    assert isinstance(get_lexer_by_name("attndsl"), lexer.AttnLexer)
    assert isinstance(get_lexer_for_filename("examples/causal.attn"), lexer.AttnLexer)


def test_highlight_only_adds_colour_codes():
    for path in SOURCES[:5]:
        text = path.read_text(encoding="utf-8")
        colored = lexer.highlight(text)
        assert colored != text and ANSI.sub("", colored) == text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_color_modes(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert lexer.use_color("auto", _Tty()) and not lexer.use_color("auto", io.StringIO())
    assert lexer.use_color("always", io.StringIO()) and not lexer.use_color("never", _Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not lexer.use_color("auto", _Tty()) and lexer.use_color("always", _Tty())
    with pytest.raises(AttnCallError, match="--color"):
        lexer.use_color("sometimes", _Tty())
    lines = lexer.source_lines("pattern p:\n    mask = " + "q < 1 or " * 400 + "true\n", False)
    assert lines[0] == "pattern p:" and re.fullmatch(r"\.\.\. \(\d+ more characters\)", lines[-1])


def test_show_prints_the_pattern_coloured_on_request(tmp_path, capsys):
    path = tmp_path / "w.attn"
    path.write_text("pattern win(w = 2):\n    mask = sliding(w)\n", encoding="utf-8")
    args = ["show", str(path), "--q-len", "3", "--kv-len", "3"]
    assert cli.main(args + ["--color", "never"]) == 0
    plain = capsys.readouterr().out
    assert "\x1b[" not in plain
    assert plain.splitlines()[1:3] == ["  pattern win(w = 2):", "      mask = 0 <= q - k and q - k < w"]
    assert cli.main(args) == 0                       # auto: the captured stdout is no terminal
    assert capsys.readouterr().out == plain
    assert cli.main(args + ["--color", "always"]) == 0
    colored = capsys.readouterr().out
    assert colored != plain and ANSI.sub("", colored) == plain


def test_attndsl_works_without_pygments():
    probe = (
        "import sys; sys.modules['pygments'] = None\n"
        "import io, attndsl\n"
        "from attndsl import lexer\n"
        "assert lexer.AttnLexer is None and lexer.highlight('mask = q') == 'mask = q'\n"
        "class T(io.StringIO):\n    def isatty(self): return True\n"
        "assert not lexer.use_color('auto', T())\n"
        "try:\n    lexer.use_color('always', T())\n"
        "except attndsl.AttnCallError as e:\n    print(e.message)\n"
        "assert attndsl.compile('pattern p:\\n    mask = causal\\n')['p'].dense_mask(2, 2).sum() == 3\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs Pygments" in out.stdout


# ----------------------------------------------------------------------------- the TextMate grammar


def _json(name: str) -> dict:
    return json.loads((EDITORS / name).read_text(encoding="utf-8"))


GRAMMAR = _json("attn.tmLanguage.json")

# each scope of the grammar and the Pygments token of the same kind of text
SCOPES = {
    "comment.line.number-sign.attn": Comment.Single,
    "keyword.other.clause.attn": Keyword.Pseudo,
    "storage.type.function.attn": Keyword.Declaration,
    "entity.name.function.attn": Name.Function,
    "storage.type.let.attn": Keyword.Declaration,
    "variable.other.definition.attn": Name.Variable,
    "support.type.attn": Keyword.Type,
    "keyword.control.attn": Keyword,
    "storage.type.attn": Keyword,
    "keyword.operator.logical.attn": Operator.Word,
    "constant.language.attn": Keyword.Constant,
    "variable.language.attn": Name.Builtin.Pseudo,
    "support.function.builtin.attn": Name.Builtin,
    "support.function.prelude.attn": Name.Builtin,
    "variable.other.attn": Name,
    "constant.numeric.float.attn": Number.Float,
    "constant.numeric.integer.attn": Number.Integer,
    "keyword.operator.bitwise.shift.attn": Operator,
    "keyword.operator.comparison.attn": Operator,
    "keyword.operator.arithmetic.attn": Operator,
    "keyword.operator.bitwise.attn": Operator,
    "keyword.operator.assignment.attn": Operator,
    "punctuation.parenthesis.attn": Punctuation,
    "punctuation.section.brackets.attn": Punctuation,
    "punctuation.separator.comma.attn": Punctuation,
    "punctuation.separator.colon.attn": Punctuation,
}


def _rules() -> list[tuple[re.Pattern, str | None, dict]]:
    """The grammar's top-level rules in order: (regex, name, {group: scope})."""
    rules = []
    for include in GRAMMAR["patterns"]:
        assert set(include) == {"include"} and include["include"].startswith("#"), include
        rule = GRAMMAR["repository"][include["include"][1:]]
        assert set(rule) <= {"match", "name", "captures"}, f"only match rules: {rule}"
        captures = {int(g): c["name"] for g, c in rule.get("captures", {}).items()}
        rules.append((re.compile(rule["match"]), rule.get("name"), captures))
    return rules


def _tm_scopes(line: str, rules) -> list[str | None]:
    """The scope of each character of ``line`` (None where no rule put one)."""
    scopes: list[str | None] = [None] * len(line)
    pos = 0
    while pos < len(line):
        best = None
        for regex, name, captures in rules:
            m = regex.search(line, pos)
            if m and (best is None or m.start() < best[0].start()):
                best = (m, name, captures)
        if best is None:
            break
        m, name, captures = best
        if name:
            scopes[m.start():m.end()] = [name] * (m.end() - m.start())
        for group, scope in captures.items():
            if m.group(group) is not None:
                a, b = m.span(group)
                scopes[a:b] = [scope] * (b - a)
        pos = m.end() if m.end() > m.start() else m.start() + 1
    return scopes


def _lines(text: str):
    """(offset, line without its end) for each line; lines end at \\n, \\r\\n or \\r."""
    for m in re.finditer(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", text):
        yield m.start(), m.group().rstrip("\r\n")


def _pygments_kinds(text: str) -> list:
    kinds = []
    for token, value in _lex(text):
        kinds += [token] * len(value)
    return kinds


def _check_against_pygments(text: str, label: str) -> None:
    rules, kinds = _rules(), _pygments_kinds(text)
    for offset, line in _lines(text):
        scopes = _tm_scopes(line, rules)
        for col, ch in enumerate(line):
            if ch in " \t\f":
                continue
            where = f"{label}:{line!r} column {col + 1} ({ch!r})"
            assert scopes[col] is not None, f"no scope at {where}"
            assert SCOPES[scopes[col]] == kinds[offset + col], \
                f"{scopes[col]} vs Pygments {kinds[offset + col]} at {where}"


def test_grammar_and_extension_manifest_fit_together():
    assert GRAMMAR["scopeName"] == "source.attn" and GRAMMAR["fileTypes"] == ["attn"]
    package = _json("package.json")
    (language,) = package["contributes"]["languages"]
    (grammar,) = package["contributes"]["grammars"]
    assert language["extensions"] == [".attn"] and grammar["language"] == language["id"]
    assert grammar["scopeName"] == GRAMMAR["scopeName"]
    assert (EDITORS / grammar["path"]).resolve() == EDITORS / "attn.tmLanguage.json"
    config = json.loads((EDITORS / language["configuration"]).read_text(encoding="utf-8"))
    assert re.fullmatch(lexer.COMMENT_RE, config["comments"]["lineComment"] + " x")
    assert config["brackets"] == [["(", ")"], ["[", "]"]]
    assert {c for pair in config["brackets"] for c in pair} <= set(lexer.PUNCTUATION)
    for rule in config["onEnterRules"]:
        assert re.search(rule["beforeText"], "pattern p(w = 4):  # c")
        assert not re.search(rule["beforeText"], "    mask = causal")
    assert (EDITORS / "README.md").is_file()


def test_every_rule_compiles_and_every_scope_is_known():
    for regex, name, captures in _rules():
        for scope in [name, *captures.values()]:
            assert scope is None or scope in SCOPES, scope
        assert not re.search(r"\\[hHGAzZ]|\\p\{|\(\?[<]?[~>]", regex.pattern), regex.pattern


def _words(rule: str) -> list[str]:
    """The alternatives of a word rule ``\\b(?:a|b|c)\\b``."""
    m = re.fullmatch(r"\\b\(\?:([\w|]+)\)\\b", GRAMMAR["repository"][rule]["match"])
    assert m, rule
    return m.group(1).split("|")


def test_grammar_word_lists_are_the_packages():
    assert _words("keyword") == list(lexer.OTHER_KEYWORDS)
    assert _words("declaration-keyword") == list(lexer.DECLARATION_KEYWORDS)
    assert _words("word-operator") == list(lexer.WORD_OPERATORS)
    assert _words("constant") == list(lexer.CONSTANT_KEYWORDS + lexer.CONSTANT_NAMES)
    assert _words("builtin-value") == list(lexer.VALUE_NAMES)
    assert _words("builtin-function") == list(lexer.CALLABLE_NAMES)
    assert _words("prelude") == list(lexer.PRELUDE_NAMES)
    repo = GRAMMAR["repository"]
    assert repo["float"]["match"] == lexer.FLOAT_RE and repo["integer"]["match"] == lexer.INT_RE
    assert re.search(r"\((\w+(?:\|\w+)*)\)", repo["type"]["match"]).group(1).split("|") == \
        list(lexer.TYPE_NAMES)
    assert "(" + "|".join(lexer.CLAUSE_NAMES) + ")" in repo["clause"]["match"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_grammar_scopes_every_example_as_pygments_does(path):
    _check_against_pygments(path.read_text(encoding="utf-8"), path.name)


def test_grammar_scopes_every_word_and_symbol_as_pygments_does():
    _check_against_pygments(_word_sample(), "sample")


def test_the_checks_catch_a_broken_grammar(monkeypatch):
    """The interpreter is not vacuous: without the comparison rule '<=' gets no scope."""
    broken = dict(GRAMMAR, patterns=[p for p in GRAMMAR["patterns"]
                                     if p["include"] != "#comparison"])
    monkeypatch.setitem(globals(), "GRAMMAR", broken)
    with pytest.raises(AssertionError, match="no scope"):
        _check_against_pygments("pattern p:\n    mask = k <= q\n", "broken")
