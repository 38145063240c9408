"""The report of bench/bench_cpu.py: the run's fixed settings and targets, and the Markdown
it prints (tables, targets marked PASS/MISS, checks, method and machine)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

from bench_block_map import shown_argv

HEADS = 4
HEAD_DIM = 64
MASK_BLOCK = 128                # FlexAttention's BLOCK_SIZE
FLEX_TARGET = 1.0               # attndsl <= 1.0x compiled Flex, every pattern
SDPA_TARGET = 1.5               # causal: attndsl <= 1.5x SDPA
LIN_TARGET = 5.0                # time(4N) / time(N) at a fixed window


class Ratios:
    """attndsl's time over Flex's and over SDPA's, of a row with ``attndsl``, ``flex`` and
    ``sdpa`` times (None where one is missing)."""

    @property
    def vs_flex(self):
        return None if self.attndsl is None or not self.flex else self.attndsl / self.flex

    @property
    def vs_sdpa(self):
        return None if self.attndsl is None or not self.sdpa else self.attndsl / self.sdpa


@dataclass
class Row(Ratios):
    key: str
    label: str
    n: int
    heads: int = HEADS
    kept: int | None = None         # allowed (h, q, k) pairs over all heads
    attndsl_first: float | None = None
    attndsl: float | None = None
    flex_first: float | None = None     # compile + first call
    flex: float | None = None
    mask_first: float | None = None     # create_block_mask: compile + build (MoBA: + selection)
    mask: float | None = None           # create_block_mask, warm
    sdpa: float | None = None
    sdpa_kind: str = ""
    diff_flex: float | None = None      # max |attndsl - flex|
    diff_sdpa: float | None = None      # max |attndsl - sdpa|
    errors: list = field(default_factory=list)


def fmt_ms(s) -> str:
    if s is None:
        return "—"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_s(s) -> str:
    return "—" if s is None else f"{s:.1f} s"


def fmt_e(x) -> str:
    return "—" if x is None else f"{x:.1e}"


def fmt_x(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def mark(value, bound) -> str:
    if value is None:
        return "n/a"
    return "PASS" if value <= bound else "MISS"


def results_table(rows: list[Row]) -> str:
    lines = ["| pattern | N | density | attndsl ms | Flex ms | SDPA ms | attndsl/Flex | target ≤ "
             f"{FLEX_TARGET:g}x Flex | attndsl/SDPA | max \\|attndsl − Flex\\| |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sdpa_ratio = fmt_x(r.vs_sdpa)
        if r.key == "causal":
            sdpa_ratio += f" (≤ {SDPA_TARGET:g}x: {mark(r.vs_sdpa, SDPA_TARGET)})"
        density = "—" if r.kept is None else f"{r.kept / (r.heads * r.n * r.n):.3f}"
        lines.append(f"| {r.label} | {r.n} | {density} | {fmt_ms(r.attndsl)} | {fmt_ms(r.flex)} | "
                     f"{fmt_ms(r.sdpa)} | {fmt_x(r.vs_flex)} | {mark(r.vs_flex, FLEX_TARGET)} | "
                     f"{sdpa_ratio} | {fmt_e(r.diff_flex)} |")
    return "\n".join(lines)


def details_table(rows: list[Row]) -> str:
    lines = ["| pattern | N | kept pairs | attndsl first call ms | Flex compile + first call | "
             "create_block_mask ms | create_block_mask compile + first | SDPA | max \\|attndsl − SDPA\\| |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = "—" if r.kept is None else f"{r.kept / 1e6:.2f}M"
        lines.append(f"| {r.label} | {r.n} | {kept} | {fmt_ms(r.attndsl_first)} | {fmt_s(r.flex_first)} | "
                     f"{fmt_ms(r.mask)} | {fmt_s(r.mask_first)} | {r.sdpa_kind} | {fmt_e(r.diff_sdpa)} |")
    return "\n".join(lines)


def targets(rows: list[Row], lin: dict | None) -> list[str]:
    out = []
    for r in rows:
        out.append(f"- {mark(r.vs_flex, FLEX_TARGET)} {r.label}, N={r.n}: attndsl/Flex {fmt_x(r.vs_flex)} "
                   f"(target ≤ {FLEX_TARGET:g}x)")
    for r in rows:
        if r.key == "causal":
            out.append(f"- {mark(r.vs_sdpa, SDPA_TARGET)} causal, N={r.n}: attndsl/SDPA {fmt_x(r.vs_sdpa)} "
                       f"(target ≤ {SDPA_TARGET:g}x)")
    if lin is not None:
        n0 = lin["n"]
        out.append(f"- {mark(lin['ratio'], LIN_TARGET)} linearity, sliding window {lin['window']}: attndsl "
                   f"{fmt_ms(lin[4 * n0])} ms at N={4 * n0} / {fmt_ms(lin[n0])} ms at N={n0} = "
                   f"{lin['ratio']:.2f}x (target ≤ {LIN_TARGET:g}x; kept pairs grow "
                   f"{lin['kept_ratio']:.2f}x)")
    n_pass = sum(line.startswith("- PASS") for line in out)
    return [f"{n_pass} of {len(out)} targets met."] + [""] + out


def checks_section(refs: dict, masks: dict, rows: list[Row], args) -> list[str]:
    out = []
    if masks:
        bad = {k: m for k, m in masks.items() if m["differ"]}
        out.append(f"- mask_mod vs attndsl `dense_mask` at N={args.mask_n}, every pair: "
                   + ("**" + ", ".join(f"{k}: {m['differ']} pairs differ" for k, m in bad.items()) + "**"
                      if bad else "identical for " + ", ".join(masks)) + ".")
    if refs:
        cells = [f"{k} {fmt_e(r['attndsl'])} / {fmt_e(r['flex'])}" + ("" if ok(r, args) else " **FAIL**")
                 for k, r in refs.items()]
        out.append(f"- float64 reference vs attndsl (torch backend) / vs eager Flex at N={args.check_n} "
                   f"(tolerance {args.tol:g}): " + "; ".join(cells) + ".")
    bad = [r for r in rows if r.diff_flex is not None and not r.diff_flex <= args.tol]
    out.append("- attndsl vs Flex at every measured size: "
               + ("**FAIL** " + ", ".join(f"{r.key} N={r.n} ({fmt_e(r.diff_flex)})" for r in bad)
                  if bad else f"max |diff| ≤ {args.tol:g} everywhere (column above)") + ".")
    return out


def ok(ref: dict, args) -> bool:
    return all(ref[w] <= args.tol for w in ("attndsl", "flex"))   # NaN fails


METHOD = """\
Method: q_len = kv_len = N, B = 1, {heads} heads (kv heads {heads}), head_dim {d}, float32, CPU, \
torch's default threads ({threads}). Each call: one warm-up call, then the median of up to {reps} \
timed calls (further calls stop after {budget:g} s). q, k, v standard normal.

- attndsl: `pat(q, k, v, backend="torch", **tensors)`; the warm-up call includes the analysis \
(cached on the pattern for static patterns; packed documents and MoBA read the call's tensors).
- Flex: {flex}; a hand-written mask_mod per pattern (bench/cases.py; MoBA's in bench_cpu.py: \
top-k key blocks from mean-pooled q and k blocks in float64, plus the own block, causal), \
BLOCK_SIZE {block}. Compile time and the BlockMask are outside the Flex time; \
`create_block_mask` (MoBA: with the selection) is timed on its own (median of up to 3 calls \
after the first).
- SDPA: `scaled_dot_product_attention` with `is_causal=True` for causal, else with the \
mask_mod's dense boolean `attn_mask` (N ≤ {sdpa_max}); the causal SDPA time is the reference \
speed (target: attndsl ≤ {sdpa_t:g}x).
- Linearity: attndsl on a causal sliding window of {lin_w} keys at N and 4N (the target \
"time linear in kept pairs": ≤ {lin_t:g}x)."""


def commit() -> str:
    """The checkout's short commit, marked when the tree has uncommitted changes."""
    import subprocess

    def git(*a):
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = head != "unknown" and git("status", "--porcelain", "--untracked-files=no")
        return head + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(rows, lin, refs, masks, info, args, threads) -> str:
    flex = ("eager `flex_attention` and eager `create_block_mask` (--eager: numbers not comparable)"
            if args.eager else "`torch.compile(flex_attention, dynamic=False)` with a BlockMask from "
            "`torch.compile(create_block_mask)`")
    lines = [f"## CPU forward: attndsl torch backend vs compiled FlexAttention vs SDPA — {info['date']}", "",
             f"Machine: {info['nproc']} CPU(s), {info['cpu']}; Python {info['python']}, torch "
             f"{info['torch']}, {threads} torch threads; commit {commit()}.",
             f"Command: `{shlex.join(['python', 'bench/bench_cpu.py'] + shown_argv(args.argv))}`."]
    if args.note:
        lines.append(f"Note: {args.note}")
    lines += ["", METHOD.format(heads=HEADS, d=HEAD_DIM, threads=threads, reps=args.reps, budget=args.budget,
                                flex=flex, block=MASK_BLOCK, sdpa_max=args.sdpa_max_n, sdpa_t=SDPA_TARGET,
                                lin_w=args.lin_window, lin_t=LIN_TARGET),
              "", results_table(rows), "", details_table(rows), "", "Targets:", ""] + targets(rows, lin)
    lines += ["", "Checks:", ""] + checks_section(refs, masks, rows, args)
    lines += ["", "Notes:", "",
              "- Packed documents and MoBA depend on the call's tensors: attndsl's time includes its "
              "per-call analysis (document runs; MoBA's block selection), Flex's time leaves out the "
              "BlockMask (and MoBA's selection), which is in the `create_block_mask ms` column.",
              "- Compile times depend on inductor's on-disk cache (a second run on the same machine "
              "reuses it); they are reported, never part of a ratio."]
    errors = [f"- {r.key} N={r.n}: {e}" for r in rows for e in r.errors]
    if errors:
        lines += ["", "Errors:", ""] + errors
    return "\n".join(lines) + "\n"
