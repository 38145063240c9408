"""Benchmark: attndsl's block-sparsity analysis against brute-force evaluation of the pairs.

For each pattern and length N (q_len == kv_len == N, batch 1, tiles of 128 x 128) it times

* ``attndsl``: ``pattern.block_map(N, N, heads, block=(128, 128), **tensors)`` -- the first call
  on a freshly bound pattern (it includes solving the mask) and the median of 5 warm calls;
* ``NumPy`` brute force: the reference interpreter evaluated on every pair, reduced to tiles
  (``attndsl.blocks.block_map_by_tiles``, row tile by row tile, like ``dense_mask`` then a
  reduction, without holding the whole [heads, N, N] mask);
* ``FlexAttention``: ``torch.nn.attention.flex_attention.create_block_mask`` on the CPU in eager
  mode (``_compile=False``) with a hand-written ``mask_mod`` per pattern, run in a worker process
  with a memory limit and a time limit; with ``--flex-compiled`` also
  ``torch.compile(create_block_mask)`` (inductor, C++ on the CPU), and the check of the target
  "block_map at least 100x faster than compiled create_block_mask": the compiled Flex warm
  median over attndsl's *first* call on a fresh pattern, case by case.

and checks, wherever a brute force ran, that the attndsl map is sound (a tile marked empty holds
no allowed pair, a tile marked full only allowed pairs) and whether it is exact. It also times
``block_map`` on every static example of examples/ at 131072 tokens.

    .venv/bin/python bench/bench_block_map.py --quick                 # 8K only, a smoke run
    .venv/bin/python bench/bench_block_map.py                         # 8K, 32K, 128K
    .venv/bin/python bench/bench_block_map.py --write docs/benchmarks.md

See bench/README.md for the options.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import glob
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import (  # noqa: E402
    BLOCK,
    CASES,
    CASES_BY_KEY,
    PER_HEAD_HEADS,
    ROOT,
    Case,
    demo_tensors,
    measure,
)
from flex_worker import (  # noqa: E402
    TARGET,
    FlexRunner,
    compare,
    flex_worker,
    fmt_ratio,
    fmt_time,
    run_compiled,
    target_lines,
)

import attndsl  # noqa: E402
from attndsl.blocks import block_map_by_tiles  # noqa: E402
from attndsl.inputs import tensor_inputs  # noqa: E402
from attndsl.ir import Op  # noqa: E402

TOTAL_HEADS = 16            # heads for per-head examples in the all-examples total
TOTAL_SIZE = 131072


# ------------------------------------------------------------------------------------ helpers


def tile_stats(m: np.ndarray) -> str:
    counts = np.bincount(m.ravel().astype(np.int64), minlength=3)
    total = max(1, m.size)
    return f"{100 * counts[0] / total:.1f}/{100 * counts[1] / total:.1f}/{100 * counts[2] / total:.1f}"


def machine_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch_version, "mem_gib": _mem_available_gib()}


def _mem_available_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------- the run
@dataclass
class Row:
    case: Case
    n: int
    ours_first: float = 0.0
    ours_warm: float = 0.0
    stats: str = ""
    np_time: float | None = None
    np_extrapolated: bool = False
    np_note: str = ""
    np_cmp: dict | None = None
    flex_first: float | None = None
    flex_warm: float | None = None
    flex_note: str = ""
    flex_cmp: dict | None = None
    flex_vs_np: bool | None = None
    flexc_first: float | None = None        # torch.compile(create_block_mask)
    flexc_warm: float | None = None
    flexc_note: str = ""
    flexc_cmp: dict | None = None

    @property
    def compiled_ratio(self) -> float | None:
        """Compiled Flex (warm median) over attndsl's first call: the 100x target's ratio."""
        if self.flexc_warm is None or not self.ours_first:
            return None
        return self.flexc_warm / self.ours_first

    @property
    def speedup(self) -> float | None:
        """NumPy brute force over attndsl's warm block_map (extrapolated when NumPy was)."""
        if self.np_time is None or not self.ours_warm:
            return None
        return self.np_time / self.ours_warm


def fmt_speedup(r: Row) -> str:
    return "—" if r.speedup is None else f"{'~' if r.np_extrapolated else ''}{r.speedup:,.0f}x"


def flex_skip(case: Case, n: int, flex: dict, args) -> str | None:
    """Why FlexAttention is not run for case at n, or None to run it."""
    if case.key in flex["failed"]:
        return "skipped: failed at a smaller size"
    need = case.heads * n * n           # the dense bool mask eager create_block_mask builds
    if need > args.flex_mem_used * 2 ** 30:
        return (f"skipped: eager create_block_mask materialises the [{case.heads}, N, N] mask "
                f"({need / 2 ** 30:.3g} GiB as bool, more in temporaries), over the "
                f"{args.flex_mem_used:.3g} GiB limit")
    mine = flex["times"].get(case.key, {})
    smaller = [m for m in mine if m < n]
    if not smaller:
        return None
    p = max(smaller)
    probe_times = flex["times"].get(flex["probe"], {})
    if case.key != flex["probe"]:
        if n in flex["probe_failed"]:
            return f"skipped: the probe ({flex['probe']}) did not complete at this N"
        if p in probe_times and n in probe_times:
            predicted = mine[p] * probe_times[n] / probe_times[p]
            if predicted > args.limit:
                return (f"skipped: predicted {predicted:.0f} s from N={p} scaled like the probe "
                        f"({flex['probe']}: {probe_times[p]:.1f} s -> {probe_times[n]:.1f} s; "
                        f"limit {args.limit:.0f} s)")
            return None
    predicted = mine[p] * (n / p) ** 2
    if predicted > args.limit:
        return f"skipped: predicted {predicted:.0f} s by pair count from N={p} (limit {args.limit:.0f} s)"
    return None


def run_numpy(pattern, case: Case, n: int, tensors: dict):
    given = tensor_inputs(pattern.ir, tensors, None)[0]

    def go():
        return block_map_by_tiles(pattern.grid(n, n, case.heads, case.heads, given), (BLOCK, BLOCK))
    return go


def bench(cases, sizes, args, log) -> list[Row]:
    rows: list[Row] = []
    np_last: dict = {}         # case -> (n, seconds) of the largest brute force that ran
    # FlexAttention: first-call times per case and size, cases that failed, and the probe -- the
    # first case run at each size, whose growth from the previous size predicts the others'
    probe = next((c.key for c in cases if callable(c.flex)), None)
    flex: dict = {"times": {}, "failed": set(), "probe": probe, "probe_failed": set()}
    warmup = attndsl.compile("pattern w:\n    mask = causal and sliding(3)\n")["w"]
    warmup.block_map(512, 512)          # imports and first-use costs outside the timings
    workdir = tempfile.mkdtemp(prefix="attndsl-bench-")
    runner = None
    compiled_failed: set = set()
    if not args.no_flex or args.flex_compiled:
        mem = args.flex_mem_gib
        if mem is None:
            avail = _mem_available_gib() or 8.0
            mem = min(16.0, 0.6 * avail)
        runner = FlexRunner(int(mem * 2 ** 30), args.flex_reps, args.flex_budget,
                            args.limit + 2 * args.flex_budget + 5, workdir)
        args.flex_mem_used = mem
    try:
        for n in sizes:
            for case in cases:
                row = Row(case, n)
                tensors = case.inputs(n)
                # --- attndsl: first call on a fresh Pattern (solves), then warm calls (cached row sets)
                pattern = case.load()
                ours, first, warm = measure(lambda p=pattern, t=tensors, n=n, h=case.heads: p.block_map(
                    n, n, h, block=(BLOCK, BLOCK), **t), 5, 1e9)
                row.ours_first, row.ours_warm = first, statistics.median(warm)
                row.stats = tile_stats(ours)
                # --- NumPy brute force
                brute = None
                if not args.no_numpy:
                    pairs = case.heads * n * n
                    prev = np_last.get(case.key)
                    predicted = prev[1] * pairs / prev[0] if prev else None
                    if predicted is not None and predicted > args.np_limit:
                        row.np_time, row.np_extrapolated = predicted, True
                        row.np_note = f"extrapolated from N={prev[2]} by pair count"
                    else:
                        brute, t1, tw = measure(run_numpy(case.load(), case, n, tensors), args.np_reps,
                                                args.np_budget)
                        row.np_time = statistics.median([t1] + tw)
                        np_last[case.key] = (pairs, row.np_time, n)
                        row.np_cmp = compare(ours, brute)
                # --- FlexAttention
                if runner is not None and args.flex_compiled:
                    run_compiled(runner, row, ours, brute, compiled_failed)
                if runner is not None and not args.no_flex:
                    if isinstance(case.flex, str) or case.flex is None:
                        row.flex_note = case.flex or "no mask_mod"
                    else:
                        reason = flex_skip(case, n, flex, args)
                        if reason:
                            row.flex_note = reason
                        else:
                            ans = runner.run(case, n)
                            if "error" in ans:
                                row.flex_note = ans["error"]
                                flex["failed"].add(case.key)
                            else:
                                row.flex_first = ans["first"]
                                row.flex_warm = statistics.median(ans["warm"]) if ans["warm"] else None
                                if not ans["warm"]:
                                    row.flex_note = "no warm call (first call over the time budget)"
                                flex["times"].setdefault(case.key, {})[n] = ans["first"]
                                fmap = np.load(ans["map"])
                                os.unlink(ans["map"])
                                row.flex_cmp = compare(ours, fmap)
                                if brute is not None:
                                    row.flex_vs_np = bool((fmap == brute).all())
                        if case.key == flex["probe"] and row.flex_first is None:
                            flex["probe_failed"].add(n)
                rows.append(row)
                log(progress_line(row))
    finally:
        if runner is not None:
            runner.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def progress_line(r: Row) -> str:
    parts = [f"{r.case.key:<20} N={r.n:<7} H={r.case.heads}", f"attndsl {fmt_time(r.ours_first)} / "
             f"{fmt_time(r.ours_warm)}"]
    if r.np_time is not None:
        parts.append(f"numpy {'~' if r.np_extrapolated else ''}{fmt_time(r.np_time)} "
                     f"({fmt_speedup(r)} the warm attndsl time)")
    if r.flex_first is not None:
        parts.append(f"flex {fmt_time(r.flex_first)} / {fmt_time(r.flex_warm)}")
    elif r.flex_note:
        parts.append(f"flex: {r.flex_note[:60]}")
    if r.flexc_first is not None:
        parts.append(f"flex compiled {fmt_time(r.flexc_first)} / {fmt_time(r.flexc_warm)} "
                     f"({fmt_ratio(r.compiled_ratio)} attndsl's first call)")
    elif r.flexc_note:
        parts.append(f"flex compiled: {r.flexc_note[:60]}")
    parts.append(check_cell(r))
    return "  ".join(parts)


def check_cell(r: Row) -> str:
    cmps = [(name, c) for name, c in (("np", r.np_cmp), ("flex", r.flex_cmp), ("flexc", r.flexc_cmp))
            if c is not None]
    if not cmps:
        return "not checked"
    bad = [(name, c) for name, c in cmps if not c["sound"]]
    if bad:
        return "**UNSOUND** " + ", ".join(
            f"vs {name}: {c['unsound_empty']} empty, {c['unsound_full']} full" for name, c in bad)
    names = "+".join(name for name, _ in cmps)
    loose = max(c["loose"] for _, c in cmps)
    return f"exact ({names})" if all(c["exact"] for _, c in cmps) else \
        f"sound, {loose} tiles partial-not-exact ({names})"


def results_table(rows: list[Row]) -> str:
    compiled = any(r.flexc_first is not None or r.flexc_note for r in rows)
    head = ("| pattern | H | N | attndsl first | attndsl warm (median of 5) | NumPy brute force | "
            "NumPy / attndsl warm | Flex first | Flex warm (median) | "
            + ("Flex compiled first | Flex compiled warm (median) | compiled Flex warm / attndsl "
               "first | " if compiled else "")
            + "tiles empty/partial/full % | check vs brute force |")
    lines = [head, "|" + "---|" * (14 if compiled else 11)]
    for r in rows:
        if r.np_time is None:
            npc = "—"
        elif r.np_extrapolated:
            npc = f"~{fmt_time(r.np_time)} (extrapolated)"
        else:
            npc = fmt_time(r.np_time)
        flex_first = fmt_time(r.flex_first) if r.flex_first is not None else \
            ("skipped" if r.flex_note.startswith("skipped") else "failed" if r.flex_note else "—")
        extra = ""
        if compiled:
            first_c = fmt_time(r.flexc_first) if r.flexc_first is not None else \
                ("skipped" if r.flexc_note.startswith("skipped") else "failed" if r.flexc_note else "—")
            extra = f"{first_c} | {fmt_time(r.flexc_warm)} | {fmt_ratio(r.compiled_ratio)} | "
        lines.append(f"| {r.case.key} | {r.case.heads} | {r.n} | {fmt_time(r.ours_first)} | "
                     f"{fmt_time(r.ours_warm)} | {npc} | {fmt_speedup(r)} | {flex_first} | "
                     f"{fmt_time(r.flex_warm)} | {extra}{r.stats} | {check_cell(r)} |")
    return "\n".join(lines)


def notes(rows: list[Row]) -> list[str]:
    out = []
    skipped: dict = {}          # (N, reason) -> cases, so that one reason is one line
    for r in rows:
        if r.flex_note and r.flex_first is None:
            skipped.setdefault((r.n, r.flex_note), []).append(r.case.key)
        if r.flexc_note:
            out.append(f"- compiled FlexAttention, {r.case.key} at N={r.n}: {r.flexc_note}")
    for (n, reason), keys in skipped.items():
        out.append(f"- FlexAttention at N={n}, {', '.join(keys)}: {reason}")
    for r in rows:
        if r.flex_vs_np is False:
            out.append(f"- FlexAttention's map differs from the NumPy brute force for {r.case.key} at "
                       f"N={r.n} (the hand-written mask_mod or the interpreter is wrong)")
        for name, c in (("NumPy", r.np_cmp), ("FlexAttention", r.flex_cmp),
                        ("compiled FlexAttention", r.flexc_cmp)):
            if c is not None and not c["exact"]:
                kind = "UNSOUND" if not c["sound"] else "inexact (sound)"
                out.append(f"- attndsl vs {name}, {r.case.key} at N={r.n}, H={r.case.heads}: {kind}: "
                           f"{c['unsound_empty']} tiles wrongly empty, {c['unsound_full']} wrongly full, "
                           f"{c['loose']} partial where the pairs say empty/full; first differing tile "
                           f"[h, qt, kt] = {c['first_diff']}. Repro: `p = attndsl.load('examples/"
                           f"{r.case.file}')['{r.case.pattern}'].bind(**{r.case.params!r}); "
                           f"p.block_map({r.n}, {r.n}, {r.case.heads})` vs `attndsl.blocks."
                           f"block_map_by_tiles(p.grid({r.n}, {r.n}, {r.case.heads}, {r.case.heads}, "
                           "tensors), (128, 128))`")
    return out


# ----------------------------------------------------------------------- all examples at 131072
def score_can_be_minus_inf(pattern) -> bool:
    """Whether the score clause holds the literal inf: block maps describe the mask clause only."""
    score = pattern.ir.score
    return score is not None and any(
        e.op is Op.CONST and isinstance(e.value, float) and e.value == float("inf") for e in score.walk())


def all_examples(n: int, log) -> tuple[list[tuple], float]:
    """[(file, pattern, heads, seconds or reason)], total seconds of first calls."""
    out, total = [], 0.0
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "*.attn"))):
        prog = attndsl.load(path)
        for pattern in prog:
            name = os.path.basename(path)
            if pattern.uses_selectors():
                out.append((name, pattern.name, None, "skipped: data-dependent selector"))
                continue
            heads = TOTAL_HEADS if pattern.ir.mask.uses(Op.H) else 1
            tensors = demo_tensors(pattern, n, heads) if pattern.tensor_params else {}
            if tensors is None:
                out.append((name, pattern.name, heads, "skipped: no demo tensors"))
                continue
            gc.collect()
            t0 = time.perf_counter()
            m = pattern.block_map(n, n, heads, block=(BLOCK, BLOCK), **tensors)
            dt = time.perf_counter() - t0
            total += dt
            stats = tile_stats(m)
            if score_can_be_minus_inf(pattern):
                stats += " (mask clause only: the score clause can be -inf)"
            out.append((name, pattern.name, heads, dt, stats))
            log(f"all examples: {name}:{pattern.name} H={heads} {fmt_time(dt)}")
    return out, total


def examples_table(entries, total, n) -> str:
    lines = [f"Every static example at N = {n} (first call on a freshly loaded pattern; H = {TOTAL_HEADS} "
             "where the mask reads `h`, else 1; tensor inputs: demo tensors — 16 packed documents, "
             "a 3/8 source segment, zero bias tables):", "",
             "| example | pattern | H | block_map first call | tiles empty/partial/full % |",
             "|---|---|---|---|---|"]
    for e in entries:
        if isinstance(e[3], str):
            lines.append(f"| {e[0]} | {e[1]} | {e[2] if e[2] is not None else '—'} | {e[3]} | |")
        else:
            lines.append(f"| {e[0]} | {e[1]} | {e[2]} | {fmt_time(e[3])} | {e[4]} |")
    timed = sum(1 for e in entries if not isinstance(e[3], str))
    lines.append(f"| **total** ({timed} patterns) | | | **{fmt_time(total)}** | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the report
def shown_argv(argv: list[str]) -> list[str]:
    """The command line without the text of --note (printed on its own line)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            out += ["--note", "..."]
            skip = True
        elif a.startswith("--note="):
            out.append("--note=...")
        else:
            out.append(a)
    return out


def report(rows, entries, total, info, args, sizes) -> str:
    flex_ran = any(r.flex_first is not None for r in rows)
    lines = [
        f"## Block maps: attndsl vs brute force — {info['date']}",
        "",
        f"Machine: {info['nproc']} CPU(s), {info['cpu']}; Python {info['python']}, NumPy {info['numpy']}, "
        f"torch {info['torch']}." + (f" {info['mem_gib']:.0f} GiB memory available at the start."
                                    if info['mem_gib'] else ""),
        f"Command: `{shlex.join(['python', 'bench/bench_block_map.py'] + shown_argv(args.argv))}`.",
    ]
    if args.note:
        lines.append(f"Note: {args.note}")
    lines += [
        "",
        f"Method: q_len = kv_len = N, batch 1, tiles {BLOCK} x {BLOCK}; H = 1 except for the per-head "
        f"patterns (H = {PER_HEAD_HEADS}, enough for every class of heads of those examples). Wall-clock "
        "times.",
        "",
        "- attndsl: `pattern.block_map(N, N, H, block=(128, 128), **tensors)` -- the first call on a "
        "freshly bound pattern (includes solving the mask) and the median of 5 warm calls (solved row "
        "sets are cached on the pattern).",
        "- NumPy brute force: `attndsl.blocks.block_map_by_tiles(pattern.grid(...), (128, 128))`, the "
        "reference interpreter on every pair, reduced to tiles one row of tiles at a time; median of "
        f"up to {1 + args.np_reps} calls (extra calls only within {args.np_budget:g} s). When the time "
        f"predicted by pair count from a smaller N is over {args.np_limit:g} s it is not run: the "
        "prediction is shown as `~… (extrapolated)` and that size is not checked against it.",
        "- Flex: `create_block_mask(mask_mod, 1, H, N, N, device=\"cpu\", BLOCK_SIZE=128, "
        "_compile=False)` with a hand-written mask_mod (`FULL` and partial blocks both read back); "
        f"first call and the median of up to {args.flex_reps} warm calls within {args.flex_budget:g} s, "
        f"in a worker process limited to {getattr(args, 'flex_mem_used', 0):.0f} GiB of address space "
        "beyond its start-up size. At each N after the first, the first pattern (the probe) runs when "
        f"its own pair-count prediction is under {args.limit:g} s; the others run when their time "
        "at the smaller N, scaled by the probe's growth, is under that limit.",
        "- Flex compiled (with `--flex-compiled`): `torch.compile(create_block_mask)(mask_mod, 1, H, N, "
        "N, device=\"cpu\", BLOCK_SIZE=128)` (inductor, C++ on the CPU; dynamo reset before each "
        "case, so the first call includes compiling), first call and the median of the warm calls, "
        "in the same worker. `compiled Flex warm / attndsl first` is the target's ratio "
        f"(at least {TARGET:.0f}x): attndsl's first call on a fresh pattern, solving included.",
        "- check vs brute force: soundness (a tile attndsl marks empty holds no allowed pair; one it "
        "marks full, only allowed pairs) and exactness (the same three-valued map) against each brute "
        "force that ran; `tiles` is attndsl's map.",
        "",
        results_table(rows),
        "",
    ]
    used = [CASES_BY_KEY[k] for k in dict.fromkeys(r.case.key for r in rows)]
    case_notes = [f"- {c.key}: `examples/{c.file}` `{c.pattern}`"
                  + (f"({', '.join(f'{k}={v}' for k, v in c.params.items())})" if c.params else "")
                  + (f"; {c.note}" if c.note else "")
                  for c in used]
    lines += ["Patterns:", ""] + case_notes + [""]
    extra = notes(rows)
    targets = target_lines(rows)
    if targets:
        lines += [f"Target (compiled create_block_mask at least {TARGET:.0f}x slower than block_map):",
                  ""] + targets + [""]
    if not args.no_flex:
        extra.insert(0, ("- FlexAttention ran on the CPU in eager mode (`_compile=False`)" if flex_ran
                         else "- FlexAttention did not run (see below); in eager mode on the CPU") +
                     ": create_block_mask evaluates mask_mod (under vmap) on the whole dense "
                     "[B, H, N, N] grid, so its time and memory grow with N².")
    if extra:
        lines += ["Notes:", ""] + extra + [""]
    if entries is not None:
        lines += [examples_table(entries, total, TOTAL_SIZE), ""]
    return "\n".join(lines)


DOC_HEADER = """# Benchmarks

Results of `bench/bench_block_map.py` (see `bench/README.md`): attndsl's block-sparsity analysis
(`Pattern.block_map`) against brute-force evaluation of every (query, key) pair, with the NumPy
reference interpreter and with PyTorch FlexAttention's `create_block_mask`. Each run appends a
dated section; timings depend on the machine and its load, so compare numbers within a section.

"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8192,32768,131072", help="comma-separated N (default: %(default)s)")
    ap.add_argument("--patterns", default="", help="comma-separated case names (default: all); "
                    "--list shows them")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--quick", action="store_true", help="N = 8192 only: a smoke run")
    ap.add_argument("--write", metavar="FILE",
                    help="append a dated section to FILE (e.g. docs/benchmarks.md)")
    ap.add_argument("--note", default="", help="a line added to the written section (e.g. machine load)")
    ap.add_argument("--no-flex", action="store_true", help="skip eager FlexAttention")
    ap.add_argument("--flex-compiled", action="store_true",
                    help="also time torch.compile(create_block_mask) and check the 100x target")
    ap.add_argument("--no-numpy", action="store_true", help="skip the NumPy brute force")
    ap.add_argument("--no-examples", action="store_true", help="skip the all-examples total at 131072")
    ap.add_argument("--limit", type=float, default=60.0,
                    help="seconds: a Flex call predicted to take longer is skipped, a Flex job "
                         "running past limit + 2 x flex-budget + 5 is killed (default: %(default)s)")
    ap.add_argument("--np-limit", type=float, default=20.0,
                    help="seconds: a NumPy brute force predicted (by pair count from a smaller N) to "
                         "take longer is extrapolated instead of run (default: %(default)s)")
    ap.add_argument("--np-reps", type=int, default=2, help="extra NumPy calls (default: %(default)s)")
    ap.add_argument("--np-budget", type=float, default=5.0, help="seconds for extra NumPy calls")
    ap.add_argument("--flex-reps", type=int, default=5, help="warm Flex calls (default: %(default)s)")
    ap.add_argument("--flex-budget", type=float, default=10.0, help="seconds for warm Flex calls")
    ap.add_argument("--flex-mem-gib", type=float, default=None,
                    help="memory limit of the Flex worker (default: 60%% of MemAvailable, at most 16)")
    ap.add_argument("--flex-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--flex-mem-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = argv

    if args.flex_worker:
        flex_worker(args.flex_mem_bytes, args.flex_reps, args.flex_budget)
        return 0
    if args.list:
        for c in CASES:
            print(f"{c.key:<20} examples/{c.file}:{c.pattern} {c.params} H={c.heads}")
        return 0
    sizes = [8192] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.patterns:
        unknown = [p for p in args.patterns.split(",") if p and p not in CASES_BY_KEY]
        if unknown:
            ap.error(f"unknown pattern(s) {', '.join(unknown)}; known: {', '.join(CASES_BY_KEY)}")
        cases = [CASES_BY_KEY[p] for p in args.patterns.split(",") if p]
    else:
        cases = list(CASES)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    info = machine_info()
    t0 = time.perf_counter()
    rows = bench(cases, sizes, args, log)
    entries, total = (None, 0.0) if args.no_examples else all_examples(TOTAL_SIZE, log)
    log(f"benchmark took {time.perf_counter() - t0:.0f} s")
    for line in target_lines(rows):
        log("target: " + line[2:])
    text = report(rows, entries, total, info, args, sizes)
    print(text)
    if args.write:
        new = not os.path.exists(args.write) or os.path.getsize(args.write) == 0
        with open(args.write, "a", encoding="utf-8") as f:
            if new:
                f.write(DOC_HEADER)
            else:
                f.write("\n")
            f.write(text)
    bad = [r for r in rows for c in (r.np_cmp, r.flex_cmp) if c is not None and not c["sound"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

