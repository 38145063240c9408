"""What the subcommands of the ``attndsl`` tool share: argument types, the common arguments,
pattern selection with ``--set``, tensor inputs from files with ``--input`` and the diagnostic
printer.

``--input NAME=PATH`` reads a tensor input from a ``.npy`` file (``numpy.save``) or a ``.pt``
file (``torch.save`` of one tensor, or of a dict holding a tensor under NAME). It is checked
like a call argument (the name a tensor input of a chosen pattern, the declared element type,
the rank with an optional batch dimension); every problem is an
:class:`~attndsl.errors.AttnCallError` naming the option. The tensor inputs not given get demo
values (:func:`attndsl.render.demo_inputs`), derived from the given ones where the demo values are
(a ``*start*`` table from a given document-id tensor) and sized by the indices the pattern uses.

:mod:`attndsl.cli` (``check``, ``show``, ``run``), :mod:`attndsl.cli_analyze` (``analyze``) and
:mod:`attndsl.cli_codegen` (``emit``, ``testgen``) import this module; :mod:`attndsl.cli`
imports the other two, never the reverse.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from . import render
from .errors import AttnCallError, AttnError
from .inputs import tensor_inputs, to_numpy


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
    input_argument(p)


DTYPES = ("float32", "float16", "bfloat16", "float64")      # of q, k, v in run and bench


def call_arguments(p: argparse.ArgumentParser, repeat: int, repeat_help: str) -> None:
    """The arguments of the call that ``run`` and ``bench`` make (read by :func:`random_call`):
    --batch, --head-dim, --dtype, --backend, --device, and --repeat (default ``repeat``)."""
    p.add_argument("--batch", type=count(1), default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--head-dim", type=count(1), default=64, metavar="D",
                   help="head dimension (default 64)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of q, k and v (default float32)")
    p.add_argument("--backend", choices=("torch", "triton", "triton-interpret"),
                   help="backend (default: torch on CPU, triton on CUDA)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--repeat", type=count(1), default=repeat, metavar="R",
                   help=f"{repeat_help} (default {repeat})")


def input_argument(p: argparse.ArgumentParser, what: str = "") -> None:
    """The repeatable ``--input NAME=PATH`` option (``what``: a note added to its help)."""
    p.add_argument("--input", action="append", type=parse_input, metavar="NAME=PATH",
                   help="a tensor input from a .npy or .pt file (checked like a call argument; "
                        f"the inputs not given get demo values){what}; repeatable")


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
    _check_input_names(pats, [n for n, _ in getattr(args, "input", None) or []])
    return out


def _check_input_names(pats: list, names: list[str]) -> None:
    """Every ``--input`` name is a tensor input of some chosen pattern, given once."""
    for i, name in enumerate(names):
        if name in names[:i]:
            raise AttnCallError(f"--input {name}: given more than once")
        if any(name in p.tensor_params for p in pats):
            continue
        scalar = next((p for p in pats if any(x.name == name for x in p.ir.params)), None)
        if scalar is not None:
            raise AttnCallError(f"--input {name}: '{name}' is a compile-time parameter of "
                                f"pattern '{scalar.name}'; set it with --set {name}=VALUE")
        known = sorted({n for p in pats for n in p.tensor_params})
        raise AttnCallError(f"--input {name}: no tensor input '{name}' in pattern"
                            f"{'s' if len(pats) > 1 else ''} {', '.join(p.name for p in pats)} "
                            f"(tensor inputs: {', '.join(known) or 'none'})")


def require_bound(pat) -> None:
    """An AttnCallError naming the first scalar parameter of ``pat`` without a value."""
    for p in pat.ir.params:
        if not p.is_tensor and p.name not in pat.values:
            raise AttnCallError(f"pattern '{pat.name}' needs a value for parameter '{p.name}' "
                                f"({p.type.value}): pass --set {p.name}=VALUE")


# ----------------------------------------------------------------------------- tensor inputs

INPUT_SUFFIXES = (".npy", ".pt")


class Given(NamedTuple):
    """A tensor input read from a file: its path and its values (not yet checked against a
    pattern's declaration)."""

    path: str
    array: np.ndarray


class CallInputs(NamedTuple):
    """The tensor inputs of one call: ``values`` to pass to it (a given input keeps its batch
    dimension), ``first`` the values of batch element 0 (declared ranks, for ``dense_mask``,
    ``block_map``, the analyses), and ``notes``, one line per input saying what it is."""

    values: dict
    first: dict
    notes: list


def parse_input(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path); the file is read by :func:`load_inputs`."""
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a .npy or .pt file), got {text!r}")
    return name, path.strip()


def read_tensor(name: str, path: str) -> np.ndarray:
    """The array in a ``.npy`` file or a ``.pt`` file (one tensor, or a dict holding one under
    ``name``); an unknown extension, an unreadable file or other content is an AttnCallError."""
    where = f"--input {name}={path}"
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in INPUT_SUFFIXES:
        raise AttnCallError(f"{where}: expected a .npy file (numpy.save) or a .pt file "
                            f"(torch.save), got {f'a {suffix} file' if suffix else 'no extension'}")
    kind = "NumPy .npy" if suffix == ".npy" else "torch .pt"
    try:
        if suffix == ".npy":
            with open(path, "rb") as f:
                magic = f.read(6)
            if magic != b"\x93NUMPY":
                what = "a zip archive (.npz?)" if magic[:2] == b"PK" else "no NumPy header"
                raise AttnCallError(f"{where}: '{path}' is not a .npy file ({what}); save one "
                                    "array with numpy.save")
            value = np.load(path, allow_pickle=False)
        else:
            import torch

            value = torch.load(path, map_location="cpu", weights_only=True)
    except AttnCallError:
        raise
    except OSError as exc:
        raise AttnCallError(f"{where}: cannot read '{path}': {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AttnCallError(f"{where}: '{path}' is not a readable {kind} file ({detail})") from None
    if suffix == ".pt":
        import torch

        if isinstance(value, dict) and isinstance(value.get(name), torch.Tensor):
            value = value[name]
        if not isinstance(value, torch.Tensor):
            what = (f"a dict without a tensor '{name}' (keys: "
                    f"{', '.join(map(str, list(value)[:8])) or 'none'})"
                    if isinstance(value, dict) else f"a {type(value).__name__}")
            raise AttnCallError(f"{where}: '{path}' holds {what}; save one tensor "
                                f"(torch.save(t, path)) or a dict with the key '{name}'")
    try:
        return to_numpy(value, name)
    except AttnCallError as err:
        raise AttnCallError(f"{where}: {err.message}") from None


def load_inputs(args) -> dict:
    """name -> :class:`Given` for every ``--input`` of the command (files read once)."""
    return {name: Given(path, read_tensor(name, path))
            for name, path in getattr(args, "input", None) or []}


def check_given(pat, given: dict, batch: int | None = None) -> tuple[dict, dict]:
    """The ``--input`` values that ``pat`` declares, checked like the call's arguments (element
    type, rank, batch dimension against ``batch``; None: a call without a batch, where a batch
    dimension must have size 1). Returns (name -> the value as read, name -> batch element 0)."""
    values, first = {}, {}
    for name, g in given.items():
        if name not in pat.tensor_params:
            continue
        ir = replace(pat.ir, params=tuple(p for p in pat.ir.params if p.name == name))
        try:
            first[name] = tensor_inputs(ir, {name: g.array}, batch)[0][name]
        except AttnCallError as err:
            raise AttnCallError(f"--input {name}={g.path}: {err.message}") from None
        values[name] = g.array if batch is not None else first[name]
    return values, first


def call_inputs(pat, given: dict, sizes, head_dim: int, rng, query=None, key=None,
                batch: int | None = None, seed: int | None = None) -> CallInputs:
    """The tensor inputs of a call of ``pat`` at ``sizes`` (q_len, kv_len, heads, kv_heads): the
    ``--input`` values it declares (:func:`check_given`) and demo values for the others
    (:func:`attndsl.render.demo_inputs` around them; a demo note ends with the seed when
    ``seed`` is given)."""
    values, first = check_given(pat, given, batch)
    notes = [f"{n}: from {given[n].path} ({given[n].array.dtype}, shape "
             f"{list(given[n].array.shape)})" for n in values]
    missing = [n for n in pat.tensor_params if n not in values]
    if not missing:
        return CallInputs(values, first, notes)
    batched = [n for n in values if values[n].ndim > first[n].ndim and values[n].shape[0] > 1]
    if batched:
        raise AttnCallError(f"--input {batched[0]}: a tensor input with a batch dimension needs "
                            f"every tensor input given with --input (missing: "
                            f"{', '.join(missing)}); demo values describe one batch element")
    demo, more = render.demo_inputs(pat, sizes, head_dim, rng, query, key, given=first)
    notes += [line + (f" (seed {seed})" if seed is not None else "") for line in more]
    extra = {n: demo[n] for n in missing}
    return CallInputs({**values, **extra}, {**first, **extra}, notes)


class RandomCall(NamedTuple):
    """The arguments of one call of ``run`` or ``bench``: sizes (batch, heads, kv_heads, q_len,
    kv_len, head_dim), random Gaussian q, k, v on the device, the query and key vectors of
    batch element 0 as float64 NumPy (selector patterns only, else None), the tensor inputs,
    the backend and the device's synchronisation."""

    sizes: tuple
    q: object
    k: object
    v: object
    query: object
    key: object
    inputs: CallInputs
    backend: str
    sync: object


def random_call(pat, args, given: dict) -> RandomCall:
    """The call of ``pat`` that ``args`` describes (``--batch``, ``--q-len``, ``--kv-len``,
    ``--heads`` (default 4), ``--kv-heads``, ``--head-dim``, ``--dtype``, ``--device``,
    ``--backend``, ``--seed``), with the ``--input`` values ``given`` and demo values for the
    other tensor inputs; sizes and device checked (AttnCallError)."""
    import torch

    from .inputs import check_lengths

    require_bound(pat)
    b, q_len, d = args.batch, args.q_len, args.head_dim
    kv_len = q_len if args.kv_len is None else args.kv_len
    heads = args.heads or 4
    kv_heads = args.kv_heads or heads
    check_lengths(q_len, kv_len, heads, kv_heads)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise AttnCallError(f"--device {args.device}: {exc}") from None
    gen = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
               for shape in ((b, heads, q_len, d), (b, kv_heads, kv_len, d), (b, kv_heads, kv_len, d)))
    query, key = ((q[0].double().cpu().numpy(), k[0].double().cpu().numpy())
                  if pat.uses_selectors() else (None, None))
    inputs = call_inputs(pat, given or {}, (q_len, kv_len, heads, kv_heads), d,
                         np.random.default_rng(args.seed), query, key, batch=b, seed=args.seed)
    backend = args.backend or ("torch" if device.type == "cpu" else "triton")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return RandomCall((b, heads, kv_heads, q_len, kv_len, d), q, k, v, query, key, inputs,
                      backend, sync)


def timed(fn, repeat: int, sync):
    """(the result of a warm-up call of ``fn``, the median wall time in ms of ``repeat`` more
    calls, the device synchronised (``sync``) around each)."""
    import statistics
    import time

    result = fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return result, 1e3 * statistics.median(times)
