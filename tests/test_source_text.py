"""Source text (docs/language.md, "Source text"): a leading UTF-8 byte-order mark is accepted,
and lines are counted one way, by the parser and by the diagnostic that shows the line: only
``\\n``, ``\\r\\n`` and ``\\r`` end a line. Characters that ``str.splitlines`` also splits at
(form feed, vertical tab, FS/GS/RS, NEL, U+2028, U+2029) are ordinary characters (inside
comments) and never shift the line a diagnostic shows.
"""

from __future__ import annotations

import pytest
from conftest import errors_of, pattern

import attndsl
from attndsl.cli import main
from attndsl.errors import AttnNameError, AttnSyntaxError

BOM = "\ufeff"
ODD = {"form feed": "\f", "vertical tab": "\v", "FS": "\x1c", "GS": "\x1d", "RS": "\x1e",
       "NEL": "\x85", "U+2028": "\u2028", "U+2029": "\u2029"}


def test_a_byte_order_mark_is_accepted_by_compile():
    pat = pattern(BOM + "pattern t:\n    mask = causal\n")
    assert pat.dense_mask(3, 3)[0].sum() == 6


def test_a_byte_order_mark_is_accepted_by_load(tmp_path):
    path = tmp_path / "bom.attn"
    path.write_text("pattern t:\n    mask = causal\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert attndsl.load(path)["t"].dense_mask(3, 3)[0].sum() == 6


def test_columns_on_the_first_line_ignore_the_byte_order_mark(tmp_path):
    src = "pattern t(x = q):\n    mask = true\n"
    plain, marked = errors_of(src), errors_of(BOM + src)
    assert (marked.line, marked.column) == (plain.line, plain.column) == (1, 15)
    assert str(marked) == str(plain)          # the mark is not shown, the caret is under 'q'
    assert BOM not in str(marked)
    path = tmp_path / "bom.attn"
    path.write_text("pattern t(windw: bool, x = q):\n    mask = true\n", encoding="utf-8-sig")
    with pytest.raises(AttnSyntaxError) as info:
        attndsl.load(path)
    assert (info.value.line, info.value.column) == (1, 28)


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_characters_in_a_comment_do_not_shift_the_shown_line(name):
    ch = ODD[name]
    src = f"# a comment{ch}with {name}\npattern t:\n    mask = k < foo\n"
    err = errors_of(src)
    assert isinstance(err, AttnNameError) and (err.line, err.column) == (3, 16)
    assert str(err).splitlines() == ["<test>:3:16: error: unknown name 'foo'", "    mask = k < foo",
                                     "               ^"]


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_characters_before_an_error_on_the_same_line(name):
    ch = ODD[name]
    src = f"pattern t:\n    mask = k < foo  # {ch}\n    mask = k < bar # again\n"
    err = errors_of(src)
    lines = str(err).splitlines()
    assert (err.line, err.column) == (2, 16)
    assert lines[:3] == ["<test>:2:16: error: unknown name 'foo'", "    mask = k < foo  #  ",
                         "               ^"]


@pytest.mark.parametrize("name", sorted(ODD))
def test_an_odd_character_outside_a_comment_is_reported_where_it_is(name):
    ch = ODD[name]
    src = f"# {ch}\npattern t:\n    mask = causal {ch}and true\n"
    if ch == "\f":                            # a form feed is blank space, as in Python
        assert pattern(src).dense_mask(2, 2)[0].sum() == 3
        return
    err = errors_of(src)
    assert isinstance(err, AttnSyntaxError)
    assert (err.line, err.column) == (3, 19)
    assert str(err).splitlines()[1] == "    mask = causal  and true"


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_line_ends(newline):
    src = newline.join(["# x", "pattern t:", "    mask = k < foo", ""])
    err = errors_of(src)
    assert (err.line, err.column) == (3, 16)
    assert str(err).splitlines()[1] == "    mask = k < foo"


def test_an_error_at_the_end_of_a_file_with_odd_characters():
    src = "# \u2028 \x85\npattern t:\n    mask = (k <"
    err = errors_of(src)
    assert err.line == 3 and str(err).splitlines()[1] == "    mask = (k <"


def test_the_cli_shows_the_right_line(tmp_path, capsys):
    path = tmp_path / "odd.attn"
    path.write_text(BOM + "# \u2028\fnotes\npattern t:\n    mask = k < foo\n", encoding="utf-8")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[:3] == [f"{path}:3:16: error: unknown name 'foo'", "    mask = k < foo",
                                    "               ^"]
