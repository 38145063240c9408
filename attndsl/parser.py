"""Pass 1, parse: source text -> a tuple of surface declarations (:class:`DefDecl`, :class:`PatternDecl`).

Input: any text. Output: surface syntax trees whose every node carries a 1-based span, or an
:class:`~attndsl.errors.AttnSyntaxError` listing every syntax error found. The file is split
at top-level ``def``/``pattern`` lines and each declaration is parsed on its own, so one bad
declaration does not hide errors in the next. Lark's exceptions never escape this module.

Lines are counted by :func:`~attndsl.errors.normalize_source`'s rule (a leading byte-order mark
dropped; only ``\\n``, ``\\r\\n``, ``\\r`` end a line), the one diagnostics use. A file over
:data:`~attndsl.limits.MAX_SOURCE_CHARS` is rejected before lark runs; an expression nested
deeper than :data:`~attndsl.limits.MAX_DEPTH` is a syntax error at the node that crosses it
(and its declaration is dropped), so no later pass sees one. Nothing here recurses per level
of an expression: lark's LALR parser builds the tree iteratively and :class:`_ToSurface`
converts it iteratively.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import lark
from lark import Token, Tree

from .errors import AttnSyntaxError, ErrorSink, Span, normalize_source, source_lines
from .limits import check_size, depth_message, too_deep

# ----------------------------------------------------------------------------- surface syntax


@dataclass(frozen=True, slots=True)
class Node:
    """A surface expression. ``kind`` is the grammar's name for it ('name', 'int', 'call', '+' ...)."""

    kind: str
    children: tuple = ()
    value: object = None
    span: Span = field(default_factory=Span.unknown, compare=False)


@dataclass(frozen=True, slots=True)
class DefParam:
    name: str
    default: Node | None
    span: Span


@dataclass(frozen=True, slots=True)
class DefDecl:
    name: str
    params: tuple[DefParam, ...] | None     # None: declared without parentheses
    body: Node
    span: Span                              # the name


@dataclass(frozen=True, slots=True)
class ParamDecl:
    name: str
    type_name: str | None                   # 'int', 'float[][]', ... or None when defaulted
    default: object                         # Python scalar literal, or None
    span: Span


@dataclass(frozen=True, slots=True)
class Clause:
    kind: str                               # 'let', 'mask' or 'score'
    name: str
    expr: Node
    span: Span                              # the clause's name


@dataclass(frozen=True, slots=True)
class PatternDecl:
    name: str
    params: tuple[ParamDecl, ...]
    clauses: tuple[Clause, ...]
    span: Span                              # the name


# ----------------------------------------------------------------------------- lark plumbing


class _Indenter(lark.lark.PostLex):
    """Python-style INDENT/DEDENT tokens; newlines inside brackets continue the line."""

    always_accept = ("_NL",)
    OPEN = ("LPAR", "LSQB")
    CLOSE = ("RPAR", "RSQB")

    def process(self, stream):
        levels = [0]
        opened: list[Token] = []
        last = None
        for tok in stream:
            last = tok
            if tok.type == "_NL":
                if opened:
                    continue
                yield tok
                indent_text = tok.rsplit("\n", 1)[-1] if "\n" in tok else ""
                indent = len(indent_text.expandtabs(8))
                if indent > levels[-1]:
                    levels.append(indent)
                    yield Token.new_borrow_pos("_INDENT", indent_text, tok)
                else:
                    while indent < levels[-1]:
                        levels.pop()
                        yield Token.new_borrow_pos("_DEDENT", indent_text, tok)
                    if indent != levels[-1]:
                        raise _Located("unindent does not match any outer indentation level",
                                       tok.end_line, len(indent_text) + 1)
                continue
            if tok.type in self.OPEN:
                opened.append(tok)
            elif tok.type in self.CLOSE and opened:
                opened.pop()
            yield tok
        if opened:
            tok = opened[-1]
            raise _Located(f"'{tok}' was never closed", tok.line, tok.column)
        while len(levels) > 1:
            levels.pop()
            yield Token.new_borrow_pos("_DEDENT", "", last) if last else Token("_DEDENT", "")


class _Located(Exception):
    """A syntax error found by the indenter, at a 1-based line and column."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.message = message
        self.line, self.column = line, column


@lru_cache(maxsize=1)
def grammar_text() -> str:
    return resources.files("attndsl.grammar").joinpath("attn.lark").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    # positions come from the tokens (the unary operators keep theirs, see the grammar):
    # propagate_positions would cost a third of the parse time
    return lark.Lark(grammar_text(), parser="lalr", lexer="contextual", postlex=_Indenter(),
                     maybe_placeholders=False)


def terminals() -> dict[str, tuple[str, str]]:
    """The grammar's terminals: name -> (kind, text), kind ``"str"`` for a literal (its text)
    or ``"re"`` for a regular expression (its pattern). For tools that must agree with the
    grammar (the highlighter, attndsl/lexer.py)."""
    return {t.name: ("str" if type(t.pattern).__name__ == "PatternStr" else "re", t.pattern.value)
            for t in _lark().terminals}


_WORDS = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "_NL": "end of line",
    "_INDENT": "an indented block", "_DEDENT": "end of the indented block", "CMP_OP": "a comparison",
    "TRUE": "'true'", "FALSE": "'false'", "$END": "end of file", "COMMENT": "a comment",
    "SHL": "'<<'", "SHR": "'>>'",
}


def _describe(term: str, parser: lark.Lark) -> str:
    if term in _WORDS:
        return _WORDS[term]
    for t in parser.terminals:
        if t.name == term and t.pattern.type == "str":
            return repr(t.pattern.value)
    return term.lower()


def _expected(names, parser: lark.Lark) -> str:
    words = sorted({_describe(n, parser) for n in names})
    if not words:
        return ""
    if len(words) > 6:
        words = words[:6] + ["..."]
    return "; expected " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1])


def _found(tok: Token) -> str:
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "_INDENT":
        return "unexpected indentation"
    if tok.type == "_DEDENT":
        return "end of the indented block"
    if tok.type == "$END":
        return "end of file"
    return repr(str(tok))


def _syntax_error(exc: Exception, filename: str, parser: lark.Lark, text: str) -> tuple[str, Span]:
    if isinstance(exc, _Located):
        return exc.message, Span(filename, exc.line, exc.column, exc.line, exc.column + 1)
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        ch = text[exc.pos_in_stream] if 0 <= exc.pos_in_stream < len(text) else "?"
        span = Span(filename, exc.line, exc.column, exc.line, exc.column + 1)
        return f"unexpected character {ch!r}", span
    if isinstance(exc, lark.exceptions.UnexpectedToken):
        tok = exc.token
        line, col = tok.line or 0, tok.column or 0
        if tok.type in ("_NL", "_DEDENT", "_INDENT") and tok.type != "_INDENT":
            # point just after the last real token on that line
            line = getattr(tok, "line", line) or line
        if tok.type == "_INDENT":
            line = tok.end_line
            col = len(str(tok)) + 1
        if tok.type == "$END" or not line:
            lines = source_lines(text.rstrip("\n"))
            line, col = len(lines), len(lines[-1]) + 1
        what = _found(tok)
        msg = what if tok.type == "_INDENT" else f"unexpected {what}"
        return msg + _expected(exc.accepts or exc.expected, parser), Span(filename, line, col, line, col + 1)
    if isinstance(exc, lark.exceptions.UnexpectedEOF):
        lines = source_lines(text.rstrip("\n"))
        line = len(lines)
        return "unexpected end of file" + _expected(exc.expected, parser), Span(
            filename, line, len(lines[-1]) + 1, line, len(lines[-1]) + 1)
    raise exc


# ----------------------------------------------------------------------------- tree -> surface


def _tok_span(filename: str, tok: Token) -> Span:
    return Span(filename, tok.line, tok.column, tok.end_line or tok.line,
                tok.end_column or tok.column + len(tok))


HUGE_INT = 10 ** 40        # stands for an integer literal of more than 30 digits (never int64)


def int_literal(text: str) -> int:
    """An integer literal's value; HUGE_INT beyond 30 digits (Python refuses to convert more than
    4300, and nothing beyond 19 fits the language's 64-bit ints anyway)."""
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 30 else HUGE_INT


class _ToSurface:
    """Lark's tree -> surface declarations, one method per rule (or alias) of the grammar."""

    def __init__(self, filename: str, line_offset: int = 0):
        self.f = filename
        self.line_offset = line_offset      # lines of the file before the parsed chunk

    def transform(self, tree: Tree):
        """Bottom-up and iterative (lark's Transformer recurses once per level of the tree)."""
        done: list = []                     # results, in the order their subtrees finish
        stack: list = [(tree, False)]
        while stack:
            node, expanded = stack.pop()
            if not isinstance(node, Tree):
                if isinstance(node, Token) and self.line_offset:
                    node.line += self.line_offset
                    node.end_line = (node.end_line or node.line) + self.line_offset
                done.append(node)
            elif expanded:
                n = len(node.children)
                children = done[len(done) - n:] if n else []
                del done[len(done) - n:]
                done.append(getattr(self, node.data)(children))
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in reversed(node.children))
        return done[0]

    def _unary_span(self, tok: Token, operand: Node) -> Span:
        return Span(self.f, tok.line, tok.column, operand.span.end_line, operand.span.end_column)

    # --- atoms
    def int_lit(self, c):
        return Node("int", (), int_literal(c[0]), _tok_span(self.f, c[0]))

    def float_lit(self, c):
        return Node("float", (), float(c[0]), _tok_span(self.f, c[0]))

    def true_lit(self, c):
        return Node("bool", (), True, _tok_span(self.f, c[0]))

    def false_lit(self, c):
        return Node("bool", (), False, _tok_span(self.f, c[0]))

    def name(self, c):
        return Node("name", (), str(c[0]), _tok_span(self.f, c[0]))

    # --- operators
    def add(self, c):
        return Node("+", tuple(c), None, c[0].span)

    def sub(self, c):
        return Node("-", tuple(c), None, c[0].span)

    def mul(self, c):
        return Node("*", tuple(c), None, c[0].span)

    def div(self, c):
        return Node("/", tuple(c), None, c[0].span)

    def floordiv(self, c):
        return Node("//", tuple(c), None, c[0].span)

    def mod(self, c):
        return Node("%", tuple(c), None, c[0].span)

    def pow(self, c):
        return Node("**", tuple(c), None, c[0].span)

    def bit_or(self, c):
        return Node("|", tuple(c), None, c[0].span)

    def bit_xor(self, c):
        return Node("^", tuple(c), None, c[0].span)

    def bit_and(self, c):
        return Node("&", tuple(c), None, c[0].span)

    def lshift(self, c):                     # c: operand, the '<<' token, operand
        return Node("<<", (c[0], c[2]), None, c[0].span)

    def rshift(self, c):
        return Node(">>", (c[0], c[2]), None, c[0].span)

    def invert(self, c):                     # c: the '~' token and the operand
        return Node("~", (c[1],), None, self._unary_span(c[0], c[1]))

    def or_(self, c):
        return Node("or", tuple(c), None, c[0].span)

    def and_(self, c):
        return Node("and", tuple(c), None, c[0].span)

    def neg(self, c):                        # c: the '-' token and the operand
        return Node("neg", (c[1],), None, self._unary_span(c[0], c[1]))

    def not_(self, c):                       # c: the 'not' token and the operand
        return Node("not", (c[1],), None, self._unary_span(c[0], c[1]))

    def cond(self, c):
        then, test, other = c
        return Node("if", (test, then, other), None, then.span)

    def chain(self, c):
        operands = tuple(c[0::2])
        ops = tuple(str(t) for t in c[1::2])
        return Node("chain", operands, ops, operands[0].span)

    def call(self, c):
        name_tok = c[0]
        args = c[1] if len(c) > 1 and c[1] is not None else ()
        return Node("call", tuple(args), str(name_tok), _tok_span(self.f, name_tok))

    def reduction(self, c):
        """``NAME(body for VAR in RANGE(args))``: children (body, *range arguments), value
        (function name, loop variable, its span, the range function's name, its span)."""
        func, body, var, range_name, args = c
        node_args = tuple(args) if args is not None else ()
        value = (str(func), str(var), _tok_span(self.f, var), str(range_name),
                 _tok_span(self.f, range_name))
        return Node("reduction", (body, *node_args), value, _tok_span(self.f, func))

    def arguments(self, c):
        return tuple(a for a in c if a is not None)

    def kwarg(self, c):
        return Node("kwarg", (c[1],), str(c[0]), _tok_span(self.f, c[0]))

    def index(self, c):
        name_tok = c[0]
        idx = tuple(x for x in c[1:] if isinstance(x, Node))
        return Node("index", idx, str(name_tok), _tok_span(self.f, name_tok))

    # --- declarations
    def def_param(self, c):
        return DefParam(str(c[0]), c[1] if len(c) > 1 else None, _tok_span(self.f, c[0]))

    def def_params(self, c):
        return tuple(p for p in c if p is not None)

    def def_decl(self, c):
        params = c[1] if len(c) == 3 else None
        return DefDecl(str(c[0]), params, c[-1], _tok_span(self.f, c[0]))

    def literal(self, c):
        return c[0]

    def negated_literal(self, c):
        return ("neg", c[0])

    def param_default(self, c):
        return ParamDecl(str(c[0]), None, c[1], _tok_span(self.f, c[0]))

    def type_name(self, c):
        return str(c[0]) + "[]" * ((len(c) - 1) // 2)

    def param_typed(self, c):
        return ParamDecl(str(c[0]), c[1], None, _tok_span(self.f, c[0]))

    def pattern_params(self, c):
        return tuple(p for p in c if p is not None)

    def let_clause(self, c):
        return Clause("let", str(c[0]), c[1], _tok_span(self.f, c[0]))

    def named_clause(self, c):
        return Clause(str(c[0]), str(c[0]), c[1], _tok_span(self.f, c[0]))

    def pattern_decl(self, c):
        params = c[1] if len(c) > 2 and isinstance(c[1], tuple) else ()
        clauses = tuple(x for x in c[1:] if isinstance(x, Clause))
        return PatternDecl(str(c[0]), params, clauses, _tok_span(self.f, c[0]))

    def start(self, c):
        return tuple(c)


_LITERAL_WORDS = {"inf": float("inf")}


def _literal_value(raw, span: Span, sink: ErrorSink):
    """A pattern parameter's default: an int, float or bool literal, optionally negated."""
    negate = isinstance(raw, tuple)
    tok = raw[1] if negate else raw
    text = str(tok)
    if tok.type == "INT":
        value = int_literal(text)
    elif tok.type == "FLOAT":
        value = float(text)
    elif tok.type in ("TRUE", "FALSE"):
        value = tok.type == "TRUE"
    elif text in _LITERAL_WORDS:
        value = _LITERAL_WORDS[text]
    else:
        sink.add(AttnSyntaxError, f"a parameter default must be a literal, not {text!r}",
                 _tok_span(span.filename, tok))
        return 0
    if negate:
        if isinstance(value, bool):
            sink.add(AttnSyntaxError, "a bool default cannot be negated", _tok_span(span.filename, tok))
            return value
        value = -value
    return value


_TOP_LEVEL = re.compile(r"^(def|pattern)\b")


def _split_declarations(text: str) -> list[tuple[int, str]]:
    """Chunks starting at each top-level ``def``/``pattern`` line, with their first line index."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if _TOP_LEVEL.match(line)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    starts.append(len(lines))
    return [(a, "\n".join(lines[a:b])) for a, b in zip(starts, starts[1:]) if a < b]


def _check_depth(decls, sink: ErrorSink) -> bool:
    """Report every expression of ``decls`` nested deeper than limits.MAX_DEPTH; True if none."""
    ok = True
    for d in decls:
        if isinstance(d, DefDecl):
            exprs = [d.body] + [p.default for p in d.params or () if p.default is not None]
        else:
            exprs = [c.expr for c in d.clauses]
        for e in exprs:
            deep = too_deep(e)
            if deep is not None:
                sink.add(AttnSyntaxError, depth_message(), deep.span)
                ok = False
    return ok


_DECL_NAME = re.compile(r"^(?:def|pattern)\s+([A-Za-z_][A-Za-z0-9_]*)")


def parse(text: str, filename: str = "<string>", sink: ErrorSink | None = None,
          broken: set | None = None) -> tuple:
    """Parse a whole file into its declarations.

    Without ``sink``, raises AttnSyntaxError with every syntax error found. With one, adds the
    errors to it and returns the declarations that parsed; the names of those that did not are
    added to ``broken`` so that later passes do not report their uses as unknown.
    """
    text = normalize_source(text)
    own_sink = sink is None
    sink = ErrorSink(text) if own_sink else sink
    too_large = check_size(text, filename, sink.source)
    if too_large is not None:              # before lark, whose time grows with the text
        sink.errors.append(too_large)
        if own_sink:
            sink.raise_if_any()
        return ()
    parser = _lark()
    decls: list = []
    # The indenter sees the indentation after each newline only, so an indented first line
    # would pass unnoticed: like Python, a file's first statement must not be indented.
    first = text.split("\n", 1)[0]
    body = first.lstrip(" \t\f")
    if body and body != first and not body.startswith("#"):
        col = len(first) - len(body) + 1
        sink.add(AttnSyntaxError, "unexpected indentation; a declaration starts at column 1",
                 Span(filename, 1, col, 1, col + 1))
    for first_line, chunk in _split_declarations(text):
        chunk += "\n"
        try:
            tree = parser.parse(chunk)
        except (lark.exceptions.LarkError, _Located) as exc:
            message, span = _syntax_error(exc, filename, parser, chunk)
            sink.add(AttnSyntaxError, message, Span(filename, span.line + first_line, span.column,
                                                    span.end_line + first_line, span.end_column))
            named = _DECL_NAME.match(chunk)
            if named and broken is not None:
                broken.add(named.group(1))
            continue
        parsed = _ToSurface(filename, first_line).transform(tree)
        if _check_depth(parsed, sink):
            decls.extend(parsed)
        elif broken is not None:
            broken.update(d.name for d in parsed)
    for i, d in enumerate(decls):
        if isinstance(d, PatternDecl):
            params = tuple(
                ParamDecl(p.name, p.type_name, _literal_value(p.default, p.span, sink), p.span)
                if p.type_name is None else p for p in d.params)
            decls[i] = PatternDecl(d.name, params, d.clauses, d.span)
    if own_sink:
        sink.raise_if_any()
    return tuple(decls)
