"""docs/language.md stands on its own (a user never needs a file outside the repository): the
prelude it restates is the prelude the compiler reads, every builtin and reserved name is
documented, every link and example file it names exists, and every `.attn` example in it
compiles — or, for an example followed by an error, fails with exactly that error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import attndsl
from attndsl.reserved import BUILTIN_NAMES, TENSOR_API_NAMES

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")

# a fenced block: its info string (language), its text, and where it starts and ends in DOC
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LANGUAGES = {"attn", "text", "python", "sh"}
ERROR_LINE = re.compile(r"(\S+):\d+:\d+: error: ")


def _defs(text: str) -> list[str]:
    return [re.sub(r"\s*#.*", "", line).strip() for line in text.splitlines()
            if line.startswith("def ")]


def _attn_examples() -> list[tuple[int, str, str | None, str | None]]:
    """(line, source, filename, shown error or None) of every ```attn block: a block directly
    followed (nothing but blank space between) by a text block that starts with
    ``FILE:LINE:COL: error:`` shows that error."""
    fences = list(FENCE.finditer(DOC))
    examples = []
    for n, m in enumerate(fences):
        if m.group(1).strip() != "attn":
            continue
        line = DOC.count("\n", 0, m.start()) + 1
        nxt = fences[n + 1] if n + 1 < len(fences) else None
        error = None
        if nxt is not None and nxt.group(1).strip() == "text" and \
                not DOC[m.end():nxt.start()].strip() and ERROR_LINE.match(nxt.group(2)):
            error = nxt.group(2).rstrip("\n")
        filename = ERROR_LINE.match(error).group(1) if error else "docs/language.md"
        examples.append((line, m.group(2), filename, error))
    return examples


EXAMPLES = _attn_examples()


def test_the_prelude_in_the_docs_is_the_prelude():
    prelude = (ROOT / "grammar" / "prelude.attn").read_text(encoding="utf-8")
    block = DOC.split("### The prelude", 1)[1].split("```", 2)[1]
    assert _defs(block) == _defs(prelude)


def test_every_builtin_name_is_documented():
    sections = DOC.split("## Expressions", 1)[1] + DOC.split("## Selectors", 1)[1]
    missing = [n for n in BUILTIN_NAMES if f"`{n}" not in sections]
    assert not missing, missing


def _reserved_list(starts: str) -> list[str]:
    """The names of the backquoted list ending the 'Reserved names' bullet that starts so."""
    section = DOC.split("### Reserved names", 1)[1].split("\n## ", 1)[0]
    bullet = section.split(f"\n* {starts}", 1)[1].split("\n* ", 1)[0].split("\n\n", 1)[0]
    return re.findall(r"`([^`]*)`", bullet)[-1].split()


def test_the_reserved_names_are_the_packages():
    assert sorted(_reserved_list("no declaration at all")) == sorted(BUILTIN_NAMES)
    assert sorted(_reserved_list("a tensor input may not")) == sorted(TENSOR_API_NAMES)


def test_the_page_needs_nothing_outside_the_repository():
    for outside in ("LANGUAGE.md", "../shared", "the contract"):
        assert outside not in DOC, outside
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", DOC)
    assert links
    for link in links:
        assert "://" in link or (ROOT / "docs" / link).resolve().exists(), link
    for path in set(re.findall(r"\b((?:examples|grammar|attndsl|tests)/[\w/.-]*\w)", DOC)):
        assert (ROOT / path).exists() or (ROOT / (path + ".py")).exists(), path


def test_every_code_block_names_its_language():
    fences = FENCE.findall(DOC)
    assert len(fences) >= 10
    assert [info for info, _ in fences if info.strip() not in LANGUAGES] == []
    assert DOC.count("```") == 2 * len(fences), "an unclosed or odd fence"
    assert sum(1 for e in EXAMPLES if e[3]) >= 2 and sum(1 for e in EXAMPLES if not e[3]) >= 5


@pytest.mark.parametrize("line, source, filename, error", EXAMPLES, ids=[f"line{e[0]}" for e in EXAMPLES])
def test_every_attn_example_compiles_or_shows_its_error(line, source, filename, error):
    if error is not None:
        with pytest.raises(attndsl.AttnError) as info:
            attndsl.compile(source, filename)
        assert str(info.value) == error
        return
    prog = attndsl.compile(source, filename)
    assert len(prog) >= 1, f"the example at docs/language.md:{line} declares no pattern"
    for pat in prog:                 # the ones that need nothing more also evaluate
        if pat.tensor_params or pat.uses_selectors() or \
                any(not p.is_tensor and p.name not in pat.params for p in pat.ir.params):
            continue
        mask = pat.dense_mask(12, 12, heads=2)
        assert mask.shape == (2, 12, 12) and mask.any(), pat.name
