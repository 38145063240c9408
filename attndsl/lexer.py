"""Highlighting of ``.attn`` source: the Pygments lexer :class:`AttnLexer` and the colouring of
``attndsl show``.

Every word and symbol the lexer knows comes from the package, so it cannot drift from the
language: keywords, operator and punctuation symbols and the literal syntax are read from the
compiled grammar's terminals (grammar/attn.lark through :mod:`attndsl.parser`), builtin names from
:data:`attndsl.reserved.BUILTIN_NAMES` (split into values and callables with the operator
registry, :mod:`attndsl.ops`), type names from :class:`attndsl.ops.Type`. The word lists are
module constants (:data:`KEYWORDS`, :data:`VALUE_NAMES`, :data:`CALLABLE_NAMES`, ...);
tests/test_editors.py checks the TextMate grammar in editors/ against them.

Pygments is optional (the ``highlight`` extra): this module imports without it. Then
:data:`AttnLexer` is None, :func:`use_color` is false for ``auto`` and an error for ``always``.
With Pygments, ``AttnLexer`` is registered under the name ``attn`` (pyproject.toml's
``pygments.lexers`` entry point), for ``*.attn`` files.

Token types (Pygments' standard ones): ``Comment.Single``; ``Keyword.Declaration`` (``def``,
``pattern``, ``let``) with the declared name as ``Name.Function`` (defs, patterns) or
``Name.Variable`` (lets); ``Keyword.Pseudo`` for a clause's ``mask`` / ``score``;
``Keyword.Type`` for a parameter's type (``int``, ``float[][]``); ``Operator.Word`` (``and or
not``); ``Keyword.Constant`` (``true false inf``); ``Keyword`` (``if else for in``);
``Name.Builtin.Pseudo`` for the position and size builtins (``q k h q_len ... score``);
``Name.Builtin`` for builtin functions, selectors, reductions, ``range``, ``at`` and the prelude's
defs (``causal``, ``sliding``, ...);
``Number.Float`` / ``Number.Integer``; ``Operator``; ``Punctuation``; ``Name`` for other names;
``Whitespace``. A character the grammar has no token for is Pygments' ``Error``.
"""

from __future__ import annotations

import os
import re
from importlib import resources

from .errors import AttnCallError
from .ops import OPS, Type
from .parser import parse, terminals
from .reserved import BUILTIN_NAMES

try:                                    # optional: pip install 'attndsl[highlight]'
    from pygments import highlight as _pygments_highlight
    from pygments.formatters import TerminalFormatter
    from pygments.lexer import RegexLexer, bygroups, words
    from pygments.token import (
        Comment,
        Error,
        Keyword,
        Name,
        Number,
        Operator,
        Punctuation,
        Token,
        Whitespace,
    )
except ImportError:                     # attndsl works without it; AttnLexer is None
    RegexLexer = None

# ----------------------------------------------------------------------------- the word lists


_TERMINALS = terminals()
_STRINGS = [v for kind, v in _TERMINALS.values() if kind == "str"]

# keywords: the grammar's literal words, in the order it declares them
KEYWORDS: tuple[str, ...] = tuple(dict.fromkeys(s for s in _STRINGS if s.isidentifier()))
CONSTANT_KEYWORDS: tuple[str, ...] = (_TERMINALS["TRUE"][1], _TERMINALS["FALSE"][1])
DECLARATION_KEYWORDS: tuple[str, ...] = ("def", "pattern", "let")
# keywords that are operators of the language (and, or, not)
WORD_OPERATORS: tuple[str, ...] = tuple(w for w in KEYWORDS if any(
    i.spelling == w and i.form in ("infix", "prefix") for i in OPS.values()))
OTHER_KEYWORDS: tuple[str, ...] = tuple(
    w for w in KEYWORDS if w not in CONSTANT_KEYWORDS + DECLARATION_KEYWORDS + WORD_OPERATORS)

# builtins: values (positions, sizes, the score) and callables (functions, selectors, reductions,
# range, at); 'inf' is a constant
CONSTANT_NAMES: tuple[str, ...] = ("inf",)
VALUE_NAMES: tuple[str, ...] = tuple(n for n in BUILTIN_NAMES if n == "kv_head" or any(
    i.spelling == n and i.form == "name" for i in OPS.values()))
CALLABLE_NAMES: tuple[str, ...] = tuple(
    n for n in BUILTIN_NAMES if n not in VALUE_NAMES + CONSTANT_NAMES)
# the prelude's defs (grammar/prelude.attn), which every file sees
PRELUDE_NAMES: tuple[str, ...] = tuple(d.name for d in parse(
    resources.files("attndsl.grammar").joinpath("prelude.attn").read_text(encoding="utf-8"),
    "<prelude>"))
CLAUSE_NAMES: tuple[str, ...] = ("mask", "score")
TYPE_NAMES: tuple[str, ...] = tuple(t.value for t in Type)

# symbols: every non-word literal of the grammar and the comparison operators, longest first
PUNCTUATION: tuple[str, ...] = tuple(s for s in _STRINGS if s in {"(", ")", "[", "]", ",", ":"})


def _alternatives(regex: str) -> list[str]:
    """The literal alternatives of a terminal written as ``(?:a|b|...)`` (CMP_OP)."""
    inner = re.fullmatch(r"\(\?:(.*)\)", regex)
    parts = inner.group(1).split("|") if inner else []
    if not parts or not all(re.fullmatch(regex, p) for p in parts):
        raise RuntimeError(f"attndsl.lexer: cannot read the literals of the terminal /{regex}/")
    return parts


OPERATORS: tuple[str, ...] = tuple(sorted(
    dict.fromkeys([s for s in _STRINGS if not s.isidentifier() and s not in PUNCTUATION]
                  + _alternatives(_TERMINALS["CMP_OP"][1])), key=lambda s: (-len(s), s)))

NAME_RE: str = _TERMINALS["NAME"][1]
FLOAT_RE: str = _TERMINALS["FLOAT"][1]
INT_RE: str = _TERMINALS["INT"][1]
COMMENT_RE = r"#[^\r\n]*"               # lines end at \n, \r\n or \r (docs/language.md)

# ----------------------------------------------------------------------------- the lexer

_WORD = r"[A-Za-z_][A-Za-z0-9_]*"
_BLANK = r"[ \t\f]"


def _rules() -> list:
    """The RegexLexer rules of state 'root', tried in order at each position."""
    keyword_groups = (
        (WORD_OPERATORS, Operator.Word),
        (CONSTANT_KEYWORDS + CONSTANT_NAMES, Keyword.Constant),
        (OTHER_KEYWORDS + DECLARATION_KEYWORDS, Keyword),     # a declaration word used alone
        (VALUE_NAMES, Name.Builtin.Pseudo),
        (CALLABLE_NAMES + PRELUDE_NAMES, Name.Builtin),
    )
    types = "|".join(TYPE_NAMES)
    return [
        (COMMENT_RE, Comment.Single),
        # a clause's name, '    mask = ...' (before the blanks' rule, which would take the indent)
        (rf"(?:^|(?<=\r))({_BLANK}+)({'|'.join(CLAUSE_NAMES)})({_BLANK}*)(=)(?!=)",
         bygroups(Whitespace, Keyword.Pseudo, Whitespace, Operator)),
        (rf"{_BLANK}+", Whitespace),
        (r"\r\n|\r|\n", Whitespace),
        (rf"(def|pattern)({_BLANK}+)({_WORD})", bygroups(Keyword.Declaration, Whitespace,
                                                          Name.Function)),
        (rf"(let)({_BLANK}+)({_WORD})", bygroups(Keyword.Declaration, Whitespace, Name.Variable)),
        # a parameter's type: 'doc: int[]', 'c: float[][][]' (':' only ever precedes a type)
        (rf"(:)(\s*)({types})\b((?:\s*\[\s*\])*)",
         bygroups(Punctuation, Whitespace, Keyword.Type, Keyword.Type)),
        *((words(group, suffix=r"\b"), token) for group, token in keyword_groups),
        (NAME_RE, Name),
        (FLOAT_RE, Number.Float),
        (INT_RE, Number.Integer),
        ("|".join(map(re.escape, OPERATORS)), Operator),
        ("|".join(map(re.escape, PUNCTUATION)), Punctuation),
    ]


if RegexLexer is not None:
    class AttnLexer(RegexLexer):
        """Pygments lexer for attndsl's ``.attn`` pattern language (token types: see the
        module docstring). Lexing any text gives tokens whose values concatenate to the text;
        text the grammar can tokenize gives no ``Error`` token."""

        name = "attn"
        aliases = ["attn", "attndsl"]
        filenames = ["*.attn"]
        mimetypes = ["text/x-attn"]
        tokens = {"root": _rules()}
    # TerminalFormatter's colours, (light background, dark background); blanks and plain names
    # stay uncoloured
    _COLORS = {
        Token: ("", ""), Whitespace: ("", ""), Name: ("", ""), Punctuation: ("", ""),
        Operator: ("", ""), Comment: ("gray", "brightblack"),
        Keyword: ("blue", "brightblue"), Operator.Word: ("magenta", "brightmagenta"),
        Keyword.Type: ("cyan", "brightcyan"), Keyword.Constant: ("yellow", "brightyellow"),
        Name.Builtin: ("cyan", "brightcyan"), Name.Function: ("green", "brightgreen"),
        Name.Variable: ("green", "brightgreen"), Number: ("yellow", "brightyellow"),
        Error: ("_red_", "_brightred_"),
    }
else:
    AttnLexer = None


# ----------------------------------------------------------------------------- terminal colours

COLOR_MODES = ("auto", "always", "never")


def use_color(mode: str, stream) -> bool:
    """Whether to colour text written to ``stream`` for ``--color MODE``.

    ``never``: no. ``always``: yes, and an AttnCallError when Pygments is missing. ``auto``: when
    Pygments is present, ``stream`` is a terminal, ``NO_COLOR`` is unset or empty and ``TERM`` is
    not ``dumb``.
    """
    if mode not in COLOR_MODES:
        raise AttnCallError(f"--color must be one of {', '.join(COLOR_MODES)}, got {mode!r}")
    if mode == "never":
        return False
    if mode == "always":
        if AttnLexer is None:
            raise AttnCallError("--color always needs Pygments: pip install 'attndsl[highlight]'")
        return True
    if AttnLexer is None or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):        # a closed or detached stream
        return False


def highlight(text: str) -> str:
    """``text`` with ANSI colour codes for a terminal; removing the codes gives ``text`` back
    exactly. ``text`` itself when Pygments is missing."""
    if AttnLexer is None or not text:
        return text
    return _pygments_highlight(text, AttnLexer(stripnl=False, ensurenl=False),
                               TerminalFormatter(colorscheme=_COLORS))


def source_lines(text: str, color: bool, max_chars: int = 2000) -> list[str]:
    """The lines of ``text`` (a pattern's source) for a terminal, coloured when ``color``: at
    most ``max_chars`` characters of it, then a line saying how many were left out."""
    text = text.rstrip("\n")
    cut = len(text) - max_chars
    if cut > 0:
        text = text[:max_chars]
    lines = (highlight(text) if color else text).split("\n")
    if cut > 0:
        lines.append(f"... ({cut} more characters)")
    return lines
