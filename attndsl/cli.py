"""The ``attndsl`` command-line tool: ``check``, ``show``, ``run``, ``analyze``, ``bench``, ``emit``,
``testgen``.

Every :class:`~attndsl.errors.AttnError` (a diagnostic in a file, a file that cannot be read,
a bad size or parameter) is printed as its rendered message on stderr with exit status 1,
never as a Python traceback; so is an allocation failure (sizes too large) and, as an
"internal error" line, any other exception (a bug; ``ATTNDSL_TRACEBACK=1`` shows its traceback).
Command-line usage errors are argparse's (usage and message, exit status 2). Pictures and
report lines are built by :mod:`attndsl.render`.
Patterns that take tensor inputs or select blocks from the query and key vectors get demo
values from a fixed seed (:func:`attndsl.render.demo_inputs`), and the output says what they are;
``--input NAME=PATH`` gives a tensor input from a file instead (:mod:`attndsl.cli_common`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

from . import __version__, render
from .cli_analyze import add_parser as add_analyze
from .cli_bench import add_parser as add_bench
from .cli_codegen import add_parsers as add_codegen
from .cli_common import (
    call_arguments,
    call_inputs,
    load_inputs,
    random_call,
    report,
    require_bound,
    select_patterns,
    timed,
)
from .cli_common import common_arguments as _common
from .cli_common import count as _count
from .cli_common import parse_assignment as parse_assignment  # re-exported: cli.parse_assignment
from .errors import AttnCallError, AttnError
from .inputs import check_lengths
from .ir import Op
from .program import load
from .reference import head_dependent

# Accepted max |out - ref| is TOLERANCE[dtype] * (max |ref| + 1); the same rule for lse.
TOLERANCE = {"float32": 2e-5, "float16": 2e-2, "bfloat16": 5e-2, "float64": 1e-10}
DENSE_LIMIT = 1 << 27        # largest heads * q_len * kv_len for which a dense mask is built
DEMO_DIM = 16                # head_dim of the demo query/key vectors of `show`
MAX_ROWS, MAX_COLS = 64, 120


def main(argv=None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:            # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 1
    try:
        return args.func(args)
    except AttnError as err:
        report(err)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                # `attndsl show ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:               # a bug in attndsl: one rendered line, no traceback
        if _out_of_memory(exc):
            report(AttnCallError(f"not enough memory for these sizes ({type(exc).__name__}): "
                                 "use smaller --q-len / --kv-len / --heads / --batch"))
            return 1
        if os.environ.get("ATTNDSL_TRACEBACK"):
            raise
        report(AttnError(f"internal error (a bug in attndsl, please report it): "
                         f"{type(exc).__name__}: {exc}; set ATTNDSL_TRACEBACK=1 to see the "
                         "traceback"))
        return 1


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (NumPy's MemoryError, torch's allocators)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        (isinstance(exc, RuntimeError) and ("can't allocate memory" in text
                                            or "out of memory" in text))


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attndsl", description="Compile, draw and run attention patterns written in .attn.",
        epilog="Run 'attndsl COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"attndsl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="compile files and report their errors",
                       description="Compile each file; print its diagnostics, or the names of "
                                   "its patterns. Exit status 1 when any file has an error.")
    p.add_argument("files", nargs="+", metavar="FILE", help=".attn files")
    p.add_argument("--no-warnings", action="store_true",
                   help="do not check sample sizes for query rows without any allowed key")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("show", help="draw the mask of a pattern in the terminal or a PNG",
                       description="Draw each pattern's mask: one character per query/key pair "
                                   "for small sizes, two rows per character for medium ones, "
                                   "and the block map (tiles full / partial / empty) when the "
                                   "mask is bigger than the terminal. Heads with identical "
                                   "masks share one panel.")
    _common(p, 64, "query heads (default 1, or 4 when the mask depends on the head)")
    p.add_argument("--block", type=_count(1), default=16, metavar="B",
                   help="tile size of the block map (default 16; enlarged until the map fits)")
    p.add_argument("--view", choices=("auto", "cells", "half", "blocks"), default="auto",
                   help="cells: one character per pair; half: two rows per character; "
                        "blocks: the block map (default auto: the most detailed that fits)")
    p.add_argument("--width", type=_count(8), metavar="COLS",
                   help=f"picture width limit (default: the terminal's, at most {MAX_COLS})")
    p.add_argument("--png", metavar="OUT", help="also write a heat map (one subplot per head "
                                               "group, one row per pattern) to this PNG file")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the pattern's source (needs Pygments; default auto: when the "
                        "output is a terminal and NO_COLOR is unset)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("run", help="run a pattern with torch and validate it against the "
                                   "reference", description="Run each pattern on random "
                       "inputs, time it, and compare its output and log-sum-exp with the "
                       "float64 reference interpreter. Exit status 1 when any pattern FAILs.")
    _common(p, 512, "query heads (default 4)")
    call_arguments(p, 1, "timed calls after one warm-up call; the median is reported")
    p.set_defaults(func=cmd_run, heads=None)

    add_analyze(sub)
    add_bench(sub)
    add_codegen(sub)
    return parser


# ----------------------------------------------------------------------------- check


def cmd_check(args) -> int:
    status = 0
    for path in args.files:
        try:
            prog = load(path)
        except AttnError as err:
            report(err)
            status = 1
            continue
        n = len(prog.patterns)
        names = f": {', '.join(prog.patterns)}" if n else ""
        print(f"{path}: ok ({n} pattern{'' if n == 1 else 's'}{names})")
        if not args.no_warnings:
            warn_patterns(prog)
    return status


def warn_patterns(prog) -> None:
    """Compile-time warnings on stderr: rows without any allowed key at sample sizes."""
    from .analysis.graph import warn_empty_rows

    for pat in prog:
        span = pat.ir.span
        for message in warn_empty_rows(pat):
            sys.stdout.flush()
            print(f"{span.filename}:{span.line}:{span.column}: warning: {message}",
                  file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- show


def cmd_show(args) -> int:
    from .lexer import use_color  # lazily: only `show` loads Pygments

    prog = load(args.file)
    args.colored = use_color(args.color, sys.stdout)
    width = args.width
    if width is None:
        width = max(8, min(MAX_COLS, shutil.get_terminal_size((MAX_COLS, MAX_ROWS)).columns - 1))
    status, figures, blocks = 0, [], []
    pats = select_patterns(prog, args)
    given = load_inputs(args)
    for pat in pats:
        try:
            lines, figure = show_one(pat, args, MAX_ROWS, width, given)
        except AttnError as err:
            report(err)
            status = 1
            continue
        blocks.append("\n".join(lines))
        figures.append(figure)
    if blocks:
        print("\n\n".join(blocks))
    if args.png and figures:
        try:
            render.write_png(args.png, figures)
        except OSError as exc:
            raise AttnCallError(f"cannot write '{args.png}': {exc.strerror or exc}") from None
        print(f"wrote {args.png}")
    return status


def show_one(pat, args, max_rows: int, max_cols: int, given=None):
    """(text lines, PNG figure) for one pattern (``given``: the ``--input`` values)."""
    require_bound(pat)
    q_len, kv_len = args.q_len, args.q_len if args.kv_len is None else args.kv_len
    heads = args.heads or (4 if any(head_dependent(r) for r in pat.ir.roots()) else 1)
    kv_heads = args.kv_heads or heads
    check_lengths(q_len, kv_len, heads, kv_heads)
    rng = np.random.default_rng(args.seed)
    notes, query, key = [], None, None
    selectors = pat.uses_selectors()
    if selectors:
        query = rng.standard_normal((heads, q_len, DEMO_DIM))
        key = rng.standard_normal((kv_heads, kv_len, DEMO_DIM))
        notes.append(f"query/key: random Gaussian vectors, head_dim {DEMO_DIM} (seed "
                     f"{args.seed}); the selection depends on them")
    inputs = call_inputs(pat, given or {}, (q_len, kv_len, heads, kv_heads), DEMO_DIM, rng,
                         query, key, seed=args.seed)
    tensors = inputs.first
    notes += inputs.notes
    total = heads * q_len * kv_len
    dense = None
    if total <= DENSE_LIMIT:
        dense = pat.dense_mask(q_len, kv_len, heads, kv_heads, query=query, key=key, **tensors)
    view = args.view
    if view == "auto":
        view = render.choose_view(q_len, kv_len, max_rows, max_cols - 2)   # 2: the frame
    if view != "blocks" and dense is None:
        raise AttnCallError(f"--view {view}: {heads} x {q_len} x {kv_len} is too large to draw "
                            "pair by pair; use --view blocks")
    if view == "blocks":
        block = render.fit_block(q_len, kv_len, args.block, max_rows, max_cols - 2)
        uses_kvh = any(r.uses(Op.KV_HEADS) for r in pat.ir.roots())
        if selectors or (uses_kvh and kv_heads != heads):
            if dense is None:
                raise AttnCallError(f"pattern '{pat.name}': {heads} x {q_len} x {kv_len} is too "
                                    "large for a block map computed from the dense mask")
            per_head = render.tiles_from_mask(dense, block, block)
        else:
            per_head = pat.block_map(q_len, kv_len, heads, block=(block, block), **tensors)
        draw, legend = render.block_cells, render.TILE_LEGEND
        grown = f" (--block {args.block} enlarged to fit)" if block != args.block else ""
        legend += f"; tiles of {block} queries x {block} keys{grown}"
    else:
        per_head = dense
        draw = render.mask_cells if view == "cells" else render.mask_half
        legend = render.CELL_LEGEND if view == "cells" else render.HALF_LEGEND
        legend += f"; rows: queries {render.span(q_len)}, columns: keys {render.span(kv_len)}"
    if dense is not None:
        dens = render.density_text(int(dense.sum()), total)
    else:
        lo, hi = render.density_bounds(per_head, q_len, kv_len, block, block)
        dens = f"density between {lo:.3f} and {hi:.3f} (from the block map)"
    lines = [f"{render.signature(pat)}: q_len={q_len} kv_len={kv_len} heads={heads} "
             f"kv_heads={kv_heads}, {dens}"]
    from .lexer import source_lines  # the pattern as checked (defs inlined), coloured or not

    lines += [f"  {line}" for line in source_lines(str(pat), getattr(args, "colored", False))]
    lines += [f"  {n}" for n in notes] + [f"  {legend}"]
    groups = render.group_heads(per_head)
    panels = []
    for hs, arr in groups:
        title = render.format_heads(hs)
        if dense is not None and len(groups) > 1:
            title += f", density {dense[hs].mean():.3f}" if dense[hs].size else ""
        panels.append(render.frame(draw(arr), title))
    lines += render.layout(panels, max_cols)
    return lines, (f"{pat.name}  ({q_len} x {kv_len})",
                   _figure(pat, args, dense, per_head if view == "blocks" else None,
                           (q_len, kv_len, heads, kv_heads), tensors))


def _figure(pat, args, dense, bmap, sizes, tensors) -> list:
    """PNG panels per distinct head: the mask (when drawable) and the tile map, with density."""
    q_len, kv_len, heads, kv_heads = sizes
    block = args.block
    if bmap is None:
        if dense is not None and (pat.uses_selectors() or kv_heads != heads):
            bmap = render.tiles_from_mask(dense, block, block)
        else:
            bmap = pat.block_map(q_len, kv_len, heads, block=(block, block), kv_heads=kv_heads,
                                 **tensors)
    else:
        block = max(1, -(-q_len // max(1, bmap.shape[1])))
    panels = []
    source = dense if dense is not None else bmap
    for hs, _ in render.group_heads(source):
        label = render.format_heads(hs)
        if dense is not None:
            label += f", density {dense[hs[0]].mean():.3f}" if dense[hs[0]].size else ""
            panels.append((label, dense[hs[0]], "mask"))
        else:
            lo, hi = render.density_bounds(bmap[hs[0]][None], q_len, kv_len, block, block)
            label += f", density {lo:.3f}-{hi:.3f}"
        counts = np.bincount(bmap[hs[0]].ravel(), minlength=3)
        panels.append((f"tiles {block}x{block}: {counts[2]} full, {counts[1]} partial, "
                       f"{counts[0]} empty", bmap[hs[0]], "blocks"))
    return panels


# ----------------------------------------------------------------------------- run


def cmd_run(args) -> int:
    prog = load(args.file)
    status = 0
    pats = select_patterns(prog, args)
    given = load_inputs(args)
    for pat in pats:
        try:
            ok = run_one(pat, args, given)
        except AttnError as err:
            report(err)
            print(f"FAIL {pat.name}: {err.message}")
            ok = False
        status |= not ok
    return int(status)


def compare(out, lse, ref_out, ref_lse, rtol: float):
    """Errors of (out, lse) against the reference, with the tolerances they are held to.

    Returns (max |out - ref|, max |ref|, rtol * (max |ref| + 1), max |lse - ref lse| over the
    rows with keys, its tolerance, whether the rows without keys (lse -inf) agree and no NaN).
    """
    o = out.detach().double().cpu().numpy()
    lo = lse.detach().double().cpu().numpy()
    err = float(np.max(np.abs(o - ref_out))) if o.size else 0.0
    ref_max = float(np.max(np.abs(ref_out))) if o.size else 0.0
    fin = np.isfinite(ref_lse)
    same_empty = np.array_equal(np.isneginf(lo), np.isneginf(ref_lse)) and not np.isnan(lo).any()
    lse_err = float(np.max(np.abs(lo[fin] - ref_lse[fin]))) if fin.any() else 0.0
    lse_max = float(np.max(np.abs(ref_lse[fin]))) if fin.any() else 0.0
    return err, ref_max, rtol * (ref_max + 1), lse_err, rtol * (lse_max + 1), same_empty


def run_one(pat, args, given=None) -> bool:
    """Run one pattern, print its report; True when it PASSes (``given``: the ``--input``
    values)."""
    import torch

    call = random_call(pat, args, given)
    b, heads, kv_heads, q_len, kv_len, d = call.sizes
    q, k, v, query, key, inputs, backend = (call.q, call.k, call.v, call.query, call.key,
                                            call.inputs, call.backend)
    device, selectors, tensors = q.device, query is not None, inputs.values
    tt = {n: torch.as_tensor(a, device=device) for n, a in tensors.items()}
    (out, lse), ms = timed(lambda: pat(q, k, v, return_lse=True, backend=backend, **tt),
                            args.repeat, call.sync)
    t0 = time.perf_counter()
    ref_out, ref_lse = pat.reference(q, k, v, **tensors)
    ref_ms = 1e3 * (time.perf_counter() - t0)

    total = heads * q_len * kv_len
    density = None
    if total <= DENSE_LIMIT:
        mask = pat.dense_mask(q_len, kv_len, heads, kv_heads, query=query, key=key,
                              **inputs.first)
        density = float(mask.sum()) / total if total else 0.0
        dens = render.density_text(int(mask.sum()), total)
        per_batch = any(np.ndim(tensors[n]) > np.ndim(inputs.first[n]) and
                        np.shape(tensors[n])[0] > 1 for n in tensors)
        dens += " (batch element 0)" if b > 1 and (selectors or per_batch) else ""
    else:
        dens = "density not computed (mask too large)"
    err, ref_max, tol, lse_err, lse_tol, same_empty = compare(out, lse, ref_out, ref_lse,
                                                              TOLERANCE[args.dtype])
    ok = bool(err <= tol and lse_err <= lse_tol and same_empty)

    print(render.signature(pat))
    print(f"  backend {backend} on {device}, dtype {args.dtype}, scale 1/sqrt({d})")
    print(f"  q {[b, heads, q_len, d]}, k and v {[b, kv_heads, kv_len, d]}: random Gaussian "
          f"(seed {args.seed})")
    for line in inputs.notes:
        print(f"  {line}")
    print(f"  {dens}")
    rel = err / ref_max if ref_max else err
    print(f"  out: max |err| {render.fmt_err(err)}, relative {render.fmt_err(rel)} (vs the "
          f"float64 reference; max |ref| {ref_max:.3g})")
    empty = "" if same_empty else "; rows without keys DIFFER (-inf vs finite)"
    print(f"  lse: max |err| {render.fmt_err(lse_err)} (tolerance {render.fmt_err(lse_tol)}){empty}")
    print(f"  time: {backend} {ms:.1f} ms (median of {args.repeat} after a warm-up), "
          f"reference {ref_ms:.1f} ms")
    print(render.verdict_line(ok, pat.name, err, tol, density, backend, ms))
    return ok
