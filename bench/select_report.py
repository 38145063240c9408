"""The report of bench/bench_select.py: the block-selection run's targets (as data), its row
types and the Markdown it prints (tables, targets marked PASS/FAIL, checks, method, machine).

Import it after ``forward_cases.ensure_attndsl()`` (bench_select.py does): cpu_report imports
bench_block_map, which imports attndsl."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from bench_block_map import shown_argv
from cpu_report import HEAD_DIM, HEADS, commit, fmt_e, fmt_ms, fmt_s, fmt_x

# The targets of the issue "data-dependent block selection":
# on the CPU, MoBA top-2 of 32 blocks at 4K (block = N / 32 = 128) costs at most
# CPU_TARGET x attndsl's dense causal on the same backend;
# on a GPU, attndsl (selection + attention, one call) costs at most GPU_TARGET x the Flex way
# (torch selection + BlockMask + compiled flex_attention), on every selection row.
CPU_TARGET = 0.4
CPU_TARGET_CASE = "moba_top2_of_32"
CPU_TARGET_N = 4096
GPU_TARGET = 0.7
NO_GPU = "not measured: no GPU"


@dataclass
class DenseRef:
    """Dense causal at one length, on the run's backend: attndsl's `causal_lm` and SDPA."""
    n: int
    attndsl_first: float | None = None
    attndsl: float | None = None        # attndsl causal_lm, warm median (s)
    sdpa: float | None = None           # SDPA is_causal=True, warm median (s)
    diff: float | None = None           # max |attndsl causal - SDPA|
    predicted: float | None = None      # predicted seconds per dense call before the length ran
    skipped: str = ""                   # why the length was not run
    errors: list = field(default_factory=list)


@dataclass
class SelRow:
    key: str
    label: str
    n: int
    block: int = 0                      # the selector's block
    flex_block: int = 0                 # the BlockMask's BLOCK_SIZE (q and kv)
    heads: int = HEADS
    kept: int | None = None             # allowed (h, q, k) pairs over all heads
    mean_blocks: float | None = None    # selected earlier blocks per (head, query block), mean
    attndsl_first: float | None = None
    attndsl: float | None = None
    sel_first: float | None = None      # Flex way: torch selection + BlockMask
    sel: float | None = None
    flex_first: float | None = None     # compile + first call of compiled flex_attention
    flex: float | None = None
    flex_na: str = ""                   # why the Flex way has no time
    flex_q_blocks: bool = False         # BlockMask built with compute_q_blocks=True (a retry)
    diff: float | None = None           # max |attndsl - the check's output|
    diff_where: str = ""                # head, row and query block of the largest difference
    check_kind: str = ""                # what attndsl was compared with
    skipped: str = ""                   # why the row was not run
    errors: list = field(default_factory=list)
    dense: DenseRef | None = None
    paired: tuple | None = None         # bench_select.paired_ratio: attndsl vs dense causal

    @property
    def flex_total(self):
        return None if self.sel is None or self.flex is None else self.sel + self.flex

    @property
    def vs_causal(self):
        d = self.dense.attndsl if self.dense else None
        return None if self.attndsl is None or not d else self.attndsl / d

    @property
    def vs_sdpa(self):
        d = self.dense.sdpa if self.dense else None
        return None if self.attndsl is None or not d else self.attndsl / d

    @property
    def vs_flex(self):
        t = self.flex_total
        return None if self.attndsl is None or not t else self.attndsl / t

    @property
    def of_causal(self):
        return None if self.kept is None else self.kept / (self.heads * self.n * (self.n + 1) / 2)


def mark(value, bound) -> str:
    if value is None:
        return "n/a"
    return "PASS" if value <= bound else "FAIL"


def diff_ok(r: SelRow, tol: float) -> bool:
    return r.diff is None or r.diff <= tol          # NaN fails


def results_table(rows: list[SelRow], tol: float) -> str:
    lines = ["| pattern | N | selected blocks | of causal pairs | attndsl ms | Flex selection ms | "
             "Flex attention ms | Flex total ms | attndsl causal ms | SDPA causal ms | attndsl / causal | "
             "attndsl / SDPA | attndsl / Flex | max \\|attndsl − check\\| |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.label} | {r.n} | skipped: {r.skipped} |" + " |" * 11)
            continue
        blocks = "—" if r.mean_blocks is None else f"{r.mean_blocks:.1f} of {r.n // r.block}"
        flex_ms = f"n/a ({r.flex_na})" if r.flex is None and r.flex_na else fmt_ms(r.flex)
        d = r.dense or DenseRef(r.n)
        lines.append(f"| {r.label} | {r.n} | {blocks} | {fmt_f(r.of_causal)} | {fmt_ms(r.attndsl)} | "
                     f"{fmt_ms(r.sel)} | {flex_ms} | {fmt_ms(r.flex_total)} | {fmt_ms(d.attndsl)} | "
                     f"{fmt_ms(d.sdpa)} | {fmt_x(r.vs_causal)} | {fmt_x(r.vs_sdpa)} | {fmt_x(r.vs_flex)} | "
                     f"{fmt_e(r.diff) if diff_ok(r, tol) else f'**{fmt_e(r.diff)} FAIL**'} |")
    return "\n".join(lines)


def dense_table(dense: list[DenseRef]) -> str:
    lines = ["| N | attndsl causal ms | attndsl causal first call ms | SDPA is_causal ms | "
             "max \\|attndsl causal − SDPA\\| | predicted s per dense call |",
             "|---|---|---|---|---|---|"]
    for d in dense:
        pred = "—" if d.predicted is None else f"{d.predicted:.2g}"
        if d.skipped:
            lines.append(f"| {d.n} | skipped: {d.skipped} | | | | {pred} |")
            continue
        lines.append(f"| {d.n} | {fmt_ms(d.attndsl)} | {fmt_ms(d.attndsl_first)} | {fmt_ms(d.sdpa)} | "
                     f"{fmt_e(d.diff)} | {pred} |")
    return "\n".join(lines)


def details_table(rows: list[SelRow]) -> str:
    lines = ["| pattern | N | block | Flex BLOCK_SIZE | kept pairs | attndsl first call ms | "
             "Flex selection first ms | Flex compile + first call | checked against | "
             "largest difference at |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.skipped:
            continue
        kept = "—" if r.kept is None else f"{r.kept / 1e6:.2f}M"
        lines.append(f"| {r.label} | {r.n} | {r.block} | {r.flex_block} | {kept} | "
                     f"{fmt_ms(r.attndsl_first)} | {fmt_ms(r.sel_first)} | {fmt_s(r.flex_first)} | "
                     f"{r.check_kind or '—'} | {r.diff_where or '—'} |")
    return "\n".join(lines)


def fmt_f(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def targets(rows: list[SelRow], on_gpu: bool) -> list[str]:
    """The CPU target (one row) and the GPU target (every selection row), PASS/FAIL where
    measured; "not measured" otherwise (with the reason)."""
    out = []
    cpu_rows = [r for r in rows if r.key == CPU_TARGET_CASE and r.n == CPU_TARGET_N]
    cpu_line = (f"attndsl / attndsl dense causal on the same backend, MoBA top-2 of 32 blocks at "
                f"N={CPU_TARGET_N} (target ≤ {CPU_TARGET:g}x)")
    if on_gpu:
        out.append(f"- not measured: CPU target, this run is on a GPU: {cpu_line}")
    elif not cpu_rows or cpu_rows[0].skipped or cpu_rows[0].vs_causal is None:
        why = ("the run has no such row (--cases, --lengths)" if not cpu_rows
               else cpu_rows[0].skipped or "a time is missing (see Errors)")
        out.append(f"- not measured: {cpu_line}: {why}")
    else:
        r = cpu_rows[0]
        if r.paired:                # the two timed in alternation: the steadier ratio
            ratio = r.paired[0] / r.paired[1]
            out.append(f"- {mark(ratio, CPU_TARGET)} {cpu_line}: {fmt_ms(r.paired[0])} ms / "
                       f"{fmt_ms(r.paired[1])} ms = {ratio:.3f}x (the fastest of 15 alternating "
                       f"calls of each; their medians {fmt_ms(r.paired[2])} ms / "
                       f"{fmt_ms(r.paired[3])} ms = {r.paired[2] / r.paired[3]:.3f}x; the "
                       f"table's medians, taken apart: {r.vs_causal:.3f}x)")
        else:
            out.append(f"- {mark(r.vs_causal, CPU_TARGET)} {cpu_line}: {fmt_ms(r.attndsl)} ms / "
                       f"{fmt_ms(r.dense.attndsl)} ms = {r.vs_causal:.3f}x")
    if not on_gpu:
        out.append(f"- {NO_GPU}: GPU target, attndsl / (Flex selection + Flex attention) ≤ {GPU_TARGET:g}x "
                   f"on every selection row ({len(rows)} rows here; the ratios on this CPU are in the "
                   "table)")
    for r in rows if on_gpu else []:
        line = (f"{r.label}, N={r.n}: attndsl / (Flex selection + Flex attention) "
                f"(GPU target ≤ {GPU_TARGET:g}x)")
        if r.skipped or r.vs_flex is None:
            why = r.skipped or r.flex_na or "a time is missing (see Errors)"
            out.append(f"- not measured: {line}: {why}")
        else:
            out.append(f"- {mark(r.vs_flex, GPU_TARGET)} {line}: {fmt_ms(r.attndsl)} ms / "
                       f"{fmt_ms(r.flex_total)} ms = {r.vs_flex:.3f}x")
    n_pass = sum(line.startswith("- PASS") for line in out)
    n_fail = sum(line.startswith("- FAIL") for line in out)
    return [f"{n_pass} target(s) met, {n_fail} failed, {len(out) - n_pass - n_fail} not measured.", ""] + out


def failed_targets(rows: list[SelRow], on_gpu: bool) -> int:
    return sum(line.startswith("- FAIL") for line in targets(rows, on_gpu))


def checks_section(sem: dict, rows: list[SelRow], args) -> list[str]:
    out = []
    if sem:
        cells = [f"{key} ({c['what']}): {c['differ']} of {c['pairs']} pairs differ"
                 + (" **FAIL**" if c["differ"] else "") for key, c in sem.items()]
        out.append(f"- the Flex way's torch selection (float32) vs attndsl's float64 reference "
                   f"`dense_mask(query=, key=)` at N={args.mask_n}, every pair, CPU: "
                   + "; ".join(cells) + ".")
    bad = [r for r in rows if not diff_ok(r, args.tol)]
    unchecked = [r for r in rows if not r.skipped and r.diff is None]
    failures = ", ".join(f"{r.key} N={r.n} ({fmt_e(r.diff)} at {r.diff_where})" for r in bad)
    out.append("- attndsl's output vs the Flex way's on every row (same q, k, v; where the Flex way could "
               "not run, SDPA with its selection as a dense mask: \"checked against\"; tolerance "
               f"{args.tol:g}): "
               + (f"**FAIL** {failures}" if bad
                  else "max |diff| within tolerance on every checked row (column above)") + "."
               + (" Not checked: " + ", ".join(f"{r.key} N={r.n}" for r in unchecked) + "."
                  if unchecked else ""))
    return out


METHOD = """\
Method: q_len = kv_len = N, B = 1, {heads} heads (kv heads {heads}), head_dim {d}, {dtype}, \
{device}, {threads}. Each method: a first call (reported on its own: analysis, compile, \
autotune), {warm}then the median of up to {reps} timed calls (further calls stop after \
{budget:g} s){sync}. q, k, v standard normal (seed + N), the same tensors for every method.

- attndsl: `pat(q, k, v{backend_arg})` on a bound pattern (`examples/moba.attn:moba` with \
`top_k`, `block`; `examples/topp_selection.attn:topp_causal` with `p`, `block`): one call does \
the selection (on the device, float32) and the attention.
- attndsl causal: `examples/causal.attn:causal_lm`, the same backend; SDPA: \
`scaled_dot_product_attention(q, k, v, is_causal=True)`.
- The Flex way: selection in torch, {sel_how}: per (head, block) the mean of q and of k over \
the block (float32), block scores `S = pooled q · pooled k`, candidates J < I, `torch.topk` \
(MoBA) or top-p (`softmax(scale · S)` over the candidates, stable descending sort, the shortest \
prefix whose mass reaches p, at least one block; scale = 1/sqrt(head_dim)), then \
`BlockMask.from_kv_blocks` (not `create_block_mask`: no mask_mod evaluated over the N² pairs) \
with BLOCK_SIZE = min(block, {fb}) when that divides the block: the selected blocks and the own \
block's earlier tiles as full blocks, the diagonal tile as the one partial block with the \
mask_mod `q_idx >= kv_idx` (`compute_q_blocks=False`: forward only). "Flex selection" times \
that whole step (selection + BlockMask); "Flex attention" times \
`torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm)` (compiled per row after \
`torch._dynamo.reset()`; its compile is in the first call, not in the median); \
"Flex total" is their sum.
- Dense causal lengths predicted (from the largest length measured, or a probe at 2048, scaled \
by N²) to take longer than --dense-budget ({dense_budget}) per dense call are skipped, with \
every row at that length ("skipped: ...")."""


def report(rows, dense, sem, info, args, threads, on_gpu: bool) -> str:
    device = f"CUDA GPU ({info.get('gpu', '?')})" if on_gpu else "CPU"
    backend_arg = f', backend="{args.backend}"' if args.backend else ""
    lines = [f"## {'GPU' if on_gpu else 'CPU'} block selection: attndsl vs the Flex way vs dense causal — "
             f"{info['date']}", "",
             f"Device: {device}. Machine: {info['nproc']} CPU(s), {info['cpu']}; Python {info['python']}, "
             f"torch {info['torch']}, {threads} torch threads; attndsl backend {args.backend_name}; "
             f"commit {commit()}.",
             f"Command: `{shlex.join(['python', 'bench/bench_select.py'] + shown_argv(args.argv))}` "
             f"({info['seconds']:.0f} s; 1-minute load average {info['load'][0]:.1f} at the start, "
             f"{info['load'][1]:.1f} at the end)."]
    if args.note:
        lines.append(f"Note: {args.note}")
    lines += ["", METHOD.format(
        heads=HEADS, d=HEAD_DIM, dtype="bfloat16" if on_gpu else "float32", device=device,
        threads=f"torch's default threads ({threads})" if not on_gpu else f"{threads} CPU threads",
        warm=f"{args.warmup - 1} more warm-up call(s), " if args.warmup > 1 else "",
        reps=args.reps, budget=args.budget,
        sync=", `torch.cuda.synchronize()` after each call" if on_gpu else "",
        backend_arg=backend_arg, sel_how="eager (not compiled)", fb=args.flex_block,
        dense_budget=f"{args.dense_budget:g} s" if args.dense_budget > 0 else "off")]
    lines += ["", results_table(rows, args.tol), "", "Dense causal per length:", "", dense_table(dense),
              "", details_table(rows), "", "Targets:", ""] + targets(rows, on_gpu)
    lines += ["", "Checks:", ""] + checks_section(sem, rows, args)
    lines += ["", "Notes:", "",
              "- \"selected blocks\" is the mean number of earlier key blocks selected per (head, query "
              "block), out of N / block blocks; the own block is always attended (causally). \"of causal "
              "pairs\" is the kept pairs over the causal pairs.",
              "- With standard normal q and k the pooled block scores are close together, so top-p "
              "selects most candidate blocks (its softmax is nearly uniform): that row is near dense "
              "causal by construction, on both sides.",
              "- Compile and autotune times depend on on-disk caches; they are in the first calls, never "
              "in a ratio."]
    retried = [f"{r.key} N={r.n}" for r in rows if r.flex_q_blocks]
    if retried:
        lines.append("- Flex failed with `compute_q_blocks=False` and was retried (and timed) with the "
                     "transposed indices built (`compute_q_blocks=True`, in the Flex selection time): "
                     + ", ".join(retried) + ".")
    na = sorted({r.flex_na for r in rows if r.flex is None and r.flex_na})
    if na:
        lines += ["", "The Flex way not measured: " + "; ".join(na) + "."]
    errors = [f"- {r.key} N={r.n}: {e}" for r in rows for e in r.errors]
    errors += [f"- dense causal N={d.n}: {e}" for d in dense for e in d.errors]
    if errors:
        lines += ["", "Errors:", ""] + errors
    return "\n".join(lines) + "\n"
