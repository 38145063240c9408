"""``ATTNDSL_DUMP``: print the output of named pipeline stages to stderr.

``ATTNDSL_DUMP=ir,plan`` (any subset of :data:`STAGES`, comma-separated; ``all`` for every
one) prints each named stage's output with a header line ``--- attndsl: <stage> ---`` as the
stage finishes. Front end: ``ast`` (the parsed declarations), ``ir`` (the checked IR, printed
as .attn text). Backend, per call: ``bind`` (the bound call: pattern, sizes, dtype, device,
backend), ``analysis`` (the tile classes of each launch), ``plan`` (strategy, tile tables,
gathers, launches, merge), ``source`` (the generated module of each launch), ``launch`` (each
kernel launch: grid, constants, options). An unknown name is an error naming the known ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .errors import AttnCallError

ENV = "ATTNDSL_DUMP"
STAGES = ("ast", "ir", "bind", "analysis", "plan", "source", "launch")


def wanted() -> frozenset[str]:
    """The stages named by ``ATTNDSL_DUMP`` (empty when unset)."""
    raw = os.environ.get(ENV, "")
    names = {s.strip() for s in raw.split(",") if s.strip()}
    if "all" in names:
        return frozenset(STAGES)
    unknown = sorted(names - set(STAGES))
    if unknown:
        raise AttnCallError(f"{ENV}: unknown stage {unknown[0]!r}; the stages are "
                            f"{', '.join(STAGES)} (or all)")
    return frozenset(names)


def dump(stage: str, value, render: Callable[[object], str] = str):
    """Print ``render(value)`` under a header when ``stage`` is wanted; returns ``value``."""
    assert stage in STAGES, stage
    if stage in wanted():
        print(f"--- attndsl: {stage} ---\n{render(value)}", file=sys.stderr)
    return value
