"""docs/language.md stands on its own (a user never needs a file outside the repository): the
prelude it restates is the prelude the compiler reads, and every builtin name is documented."""

from __future__ import annotations

import re
from pathlib import Path

from attndsl.reserved import BUILTIN_NAMES

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")


def _defs(text: str) -> list[str]:
    return [re.sub(r"\s*#.*", "", line).strip() for line in text.splitlines()
            if line.startswith("def ")]


def test_the_prelude_in_the_docs_is_the_prelude():
    prelude = (ROOT / "grammar" / "prelude.attn").read_text(encoding="utf-8")
    block = DOC.split("### The prelude", 1)[1].split("```", 2)[1]
    assert _defs(block) == _defs(prelude)


def test_every_builtin_name_is_documented():
    sections = DOC.split("## Expressions", 1)[1] + DOC.split("## Selectors", 1)[1]
    missing = [n for n in BUILTIN_NAMES if f"`{n}" not in sections]
    assert not missing, missing
