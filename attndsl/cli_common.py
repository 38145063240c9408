"""What the subcommands of the ``attndsl`` tool share: argument types, the common arguments,
pattern selection with ``--set`` and the diagnostic printer.

:mod:`attndsl.cli` (``check``, ``show``, ``run``), :mod:`attndsl.cli_analyze` (``analyze``) and
:mod:`attndsl.cli_codegen` (``emit``, ``testgen``) import this module; :mod:`attndsl.cli`
imports the other two, never the reverse.
"""

from __future__ import annotations

import argparse
import sys

from .errors import AttnCallError, AttnError


def report(err: AttnError) -> None:
    """Print a diagnostic on stderr, after whatever stdout holds, so the two interleave right."""
    sys.stdout.flush()
    print(err, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- arguments


def count(minimum: int):
    """An argparse type: an int of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def seed(text: str) -> int:
    """A seed both numpy and torch accept: an int in [0, 2**63)."""
    value = count(0)(text)
    if value >= 1 << 63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def parse_assignment(text: str):
    """``NAME=VALUE`` -> (name, value) with the value an int, a float or true/false."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for conv in (int, float):
        try:
            return name, conv(value)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r}: the value must be an int, a float, true or false")


def common_arguments(p: argparse.ArgumentParser, q_len: int, heads_help: str) -> None:
    """The arguments of ``show``, ``run`` and ``analyze``: file, patterns, sizes, --set, --seed."""
    p.add_argument("file", help="the .attn file")
    p.add_argument("-p", "--pattern", action="append", metavar="PATTERN",
                   help="pattern to use (repeatable; default: every pattern of the file)")
    p.add_argument("--q-len", type=count(0), default=q_len, metavar="N",
                   help=f"number of query rows (default {q_len})")
    p.add_argument("--kv-len", type=count(0), metavar="N",
                   help="number of keys (default: as many as --q-len)")
    p.add_argument("--heads", type=count(1), metavar="H", help=heads_help)
    p.add_argument("--kv-heads", type=count(1), metavar="H",
                   help="key/value heads, dividing --heads (default: as many as --heads)")
    p.add_argument("--set", action="append", type=parse_assignment, metavar="NAME=VALUE",
                   help="bind a scalar parameter (int, float, true/false); repeatable")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed of the random demo inputs, in [0, 2**63) (default 0)")


# ----------------------------------------------------------------------------- patterns


def select_patterns(prog, args) -> list:
    """The chosen patterns of a file, with every --set value bound where the name exists."""
    names = args.pattern or prog.patterns
    if not names:
        raise AttnCallError(f"{prog.filename}: the file has no patterns")
    pats = [prog[n] for n in names]
    sets = dict(args.set or [])
    used = set()
    out = []
    for pat in pats:
        mine = {n: v for n, v in sets.items() if any(p.name == n for p in pat.ir.params)}
        used |= mine.keys()
        out.append(pat.bind(**mine) if mine else pat)
    unknown = [n for n in sets if n not in used]
    if unknown:
        raise AttnCallError(f"--set {unknown[0]}: no parameter '{unknown[0]}' in pattern"
                            f"{'s' if len(pats) > 1 else ''} {', '.join(names)}")
    return out


def require_bound(pat) -> None:
    """An AttnCallError naming the first scalar parameter of ``pat`` without a value."""
    for p in pat.ir.params:
        if not p.is_tensor and p.name not in pat.values:
            raise AttnCallError(f"pattern '{pat.name}' needs a value for parameter '{p.name}' "
                                f"({p.type.value}): pass --set {p.name}=VALUE")
