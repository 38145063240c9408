"""Diagnostics: one error family, rendered ``file:line:col: error: msg`` with the line and a caret.

Every error a user can provoke is an :class:`AttnError`. Errors that come from a
``.attn`` file carry a :class:`Span`; errors from a Python call (wrong shapes,
missing tensor inputs) carry none and name the offending argument instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


def normalize_source(text: str) -> str:
    """The text the parser reads: without a leading UTF-8 byte-order mark, with ``\\r\\n`` and
    ``\\r`` turned into ``\\n``. Lines are counted on this text by one rule, for parsing and for
    diagnostics alike: only ``\\n`` ends a line (form feeds, vertical tabs, U+2028, U+2029, NEL
    and FS/GS/RS do not, though ``str.splitlines`` would split there)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


_ONE_COLUMN = str.maketrans({c: " " for c in "\t\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


@lru_cache(maxsize=8)
def source_lines(text: str) -> tuple[str, ...]:
    """The lines of a source text, numbered as the parser numbers them (line 1 is index 0).
    Cached: each of thousands of errors in one file renders its line from the same text."""
    return tuple(normalize_source(text).split("\n"))


@dataclass(frozen=True, slots=True)
class Span:
    """A 1-based source position (start line/column) plus its end, inside one file."""

    filename: str
    line: int
    column: int
    end_line: int
    end_column: int

    @staticmethod
    def unknown(filename: str = "<unknown>") -> Span:
        return Span(filename, 0, 0, 0, 0)


class AttnError(Exception):
    """Base of every error attndsl raises on bad input.

    ``line`` and ``column`` are 1-based (0 when the error has no source position).
    ``str(err)`` is the full rendered diagnostic.
    """

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, source: str | None = None,
                 notes: tuple[AttnError, ...] = ()):
        self.message = message
        self.span = span
        self.source = source
        self.notes = tuple(notes)
        super().__init__(self.render())

    @property
    def line(self) -> int:
        return self.span.line if self.span else 0

    @property
    def column(self) -> int:
        return self.span.column if self.span else 0

    @property
    def filename(self) -> str | None:
        return self.span.filename if self.span else None

    def render_one(self) -> str:
        if self.span is None or self.span.line == 0:
            return f"error: {self.message}"
        head = f"{self.span.filename}:{self.span.line}:{self.span.column}: error: {self.message}"
        if not self.source:
            return head
        lines = source_lines(self.source)
        if not 1 <= self.span.line <= len(lines):
            return head
        # a tab is one column; so are the characters that some tools take for line breaks
        text = lines[self.span.line - 1].translate(_ONE_COLUMN)
        caret = " " * (self.span.column - 1) + "^"
        return f"{head}\n{text}\n{caret}"

    def render(self) -> str:
        """This error, followed by any further errors found in the same pass."""
        return "\n".join([self.render_one()] + [n.render_one() for n in self.notes])

    def all_errors(self) -> tuple[AttnError, ...]:
        return (self,) + self.notes


class AttnSyntaxError(AttnError):
    """The text does not follow the grammar (or holds a character the language has no use for)."""


class AttnNameError(AttnError):
    """An unknown, duplicate or recursive name."""


class AttnTypeError(AttnError):
    """An expression of the wrong type, arity or constness."""


class AttnCallError(AttnError):
    """A bad call from Python: wrong arguments, shapes, dtypes, devices or tensor inputs."""


class ErrorSink:
    """Collects several errors of one phase so they can be reported together."""

    def __init__(self, source: str):
        self.source = source
        self.errors: list[AttnError] = []

    def add(self, cls: type[AttnError], message: str, span: Span | None) -> None:
        self.errors.append(cls(message, span, self.source))

    def raise_if_any(self) -> None:
        if not self.errors:
            return
        unique: dict = {}
        for e in self.errors:      # a def body is checked at each use: report each error once
            unique.setdefault((type(e), e.message, e.span), e)
        errs = sorted(unique.values(), key=lambda e: (e.line, e.column))
        first = errs[0]
        raise type(first)(first.message, first.span, self.source, notes=tuple(errs[1:]))


_SOURCES: dict[str, str] = {}


def remember_source(filename: str, text: str) -> None:
    """Keep the text of a compiled file, so that a call-time error can show its source line."""
    _SOURCES[filename] = text


def source_for(filename: str | None) -> str | None:
    """The text of a compiled file (:func:`remember_source`), or None."""
    return _SOURCES.get(filename or "")
