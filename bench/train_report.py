"""The report of bench/bench_train.py: the forward+backward run's targets (as data), its row
type and the Markdown it prints (tables, GPU targets, gradient checks, method and machine)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from bench_block_map import shown_argv
from cpu_report import (
    HEAD_DIM,
    HEADS,
    MASK_BLOCK,
    Ratios,
    commit,
    fmt_e,
    fmt_ms,
    fmt_s,
    fmt_x,
    mark,
)

# The GPU targets of issue 10 (fwd+bwd time of attndsl / compiled FlexAttention, on a GPU with
# the Triton backend): at most GPU_FLEX_TARGET on every pattern, at most GPU_SPARSE_TARGET on
# the dilated and strided ones (keys of a pattern in STRIDED_KEYS).
GPU_FLEX_TARGET = 0.9
GPU_SPARSE_TARGET = 0.3
STRIDED_KEYS = frozenset({"dilated_256_4", "strided_128"})
NO_GPU = "not measured: no GPU"


def gpu_target(key: str) -> float:
    return GPU_SPARSE_TARGET if key in STRIDED_KEYS else GPU_FLEX_TARGET


@dataclass
class TrainRow(Ratios):
    key: str
    label: str
    n: int
    heads: int = HEADS
    kept: int | None = None             # allowed (h, q, k) pairs over all heads
    fwd: float | None = None            # attndsl forward alone (no gradient), warm
    bwd: float | None = None            # attndsl backward alone (autograd.grad, graph retained)
    attndsl_first: float | None = None  # first fwd+bwd call (analysis, plan)
    attndsl: float | None = None        # fwd+bwd, warm
    flex_first: float | None = None     # compile + first fwd+bwd
    flex: float | None = None
    flex_na: str = ""                   # why Flex has no fwd+bwd time
    sdpa: float | None = None
    sdpa_kind: str = ""
    grad_flex: float | None = None      # max |attndsl grad - Flex grad| / max |Flex grad|
    grad_sdpa: float | None = None      # the same against SDPA
    errors: list = field(default_factory=list)

    @property
    def train_over_fwd(self):
        return None if self.attndsl is None or not self.fwd else self.attndsl / self.fwd


def flex_cell(r: TrainRow) -> str:
    return "n/a (below)" if r.flex is None and r.flex_na else fmt_ms(r.flex)


def results_table(rows: list[TrainRow]) -> str:
    lines = ["| pattern | N | density | attndsl fwd ms | attndsl bwd ms | attndsl fwd+bwd ms | (fwd+bwd)/fwd "
             "| Flex fwd+bwd ms | SDPA fwd+bwd ms | attndsl/Flex | attndsl/SDPA | grad err vs SDPA "
             "| grad err vs Flex |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        density = "—" if r.kept is None else f"{r.kept / (r.heads * r.n * r.n):.3f}"
        lines.append(f"| {r.label} | {r.n} | {density} | {fmt_ms(r.fwd)} | {fmt_ms(r.bwd)} | "
                     f"{fmt_ms(r.attndsl)} | {fmt_x(r.train_over_fwd)} | {flex_cell(r)} | {fmt_ms(r.sdpa)} | "
                     f"{fmt_x(r.vs_flex)} | {fmt_x(r.vs_sdpa)} | {fmt_e(r.grad_sdpa)} | "
                     f"{fmt_e(r.grad_flex)} |")
    return "\n".join(lines)


def details_table(rows: list[TrainRow]) -> str:
    lines = ["| pattern | N | kept pairs | attndsl first fwd+bwd ms | Flex compile + first fwd+bwd | SDPA |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kept = "—" if r.kept is None else f"{r.kept / 1e6:.2f}M"
        lines.append(f"| {r.label} | {r.n} | {kept} | {fmt_ms(r.attndsl_first)} | {fmt_s(r.flex_first)} | "
                     f"{r.sdpa_kind} |")
    return "\n".join(lines)


def targets(rows: list[TrainRow], on_gpu: bool) -> list[str]:
    """One line per (pattern, size): the GPU target, PASS/MISS on a GPU, else not measured."""
    out = []
    for r in rows:
        bound = gpu_target(r.key)
        if on_gpu:
            out.append(f"- {mark(r.vs_flex, bound)} {r.label}, N={r.n}: fwd+bwd attndsl/Flex "
                       f"{fmt_x(r.vs_flex)} (GPU target ≤ {bound:g}x)")
        else:
            out.append(f"- {NO_GPU}: {r.label}, N={r.n}: fwd+bwd attndsl/Flex (GPU target ≤ {bound:g}x)")
    if not on_gpu:
        return [f"GPU targets ({len(out)}): {NO_GPU} (this run is on the CPU, backend \"torch\").", ""] + out
    n_pass = sum(line.startswith("- PASS") for line in out)
    return [f"{n_pass} of {len(out)} GPU targets met.", ""] + out


def checks_section(checks: dict, rows: list[TrainRow], args) -> list[str]:
    out = []
    if checks:
        cells = []
        for key, c in checks.items():
            bad = not grad_ok(c, args)
            cells.append(f"{key} out {fmt_e(c['out'])}, dq/dk/dv {fmt_e(c['dq'])}/{fmt_e(c['dk'])}/"
                         f"{fmt_e(c['dv'])}" + (" **FAIL**" if bad else ""))
        out.append(f"- attndsl (float32, {args.backend_name}) vs float64 SDPA with the mask_mod's dense mask "
                   f"at N={args.check_n}, max |difference| / max |SDPA value| (tolerance {args.grad_tol:g}): "
                   + "; ".join(cells) + ".")
    bad = [r for r in rows for g in (r.grad_sdpa, r.grad_flex) if g is not None and not g <= args.grad_tol]
    out.append("- attndsl vs SDPA / Flex gradients at every timed size: "
               + ("**FAIL** " + ", ".join(f"{r.key} N={r.n}" for r in bad) if bad
                  else f"relative difference ≤ {args.grad_tol:g} everywhere (columns above)") + ".")
    return out


def grad_ok(check: dict, args) -> bool:
    return all(check[w] <= args.grad_tol for w in ("out", "dq", "dk", "dv"))     # NaN fails


METHOD = """\
Method: q_len = kv_len = N, B = 1, {heads} heads (kv heads {heads}), head_dim {d}, float32, \
{device}, torch's default threads ({threads}). One fwd+bwd is the forward call and \
`torch.autograd.grad(out, (q, k, v), dout)` with a fixed standard normal `dout` (q, k, v \
standard normal leaves). Each: one warm-up call, then the median of up to {reps} timed calls \
(further calls stop after {budget:g} s).

- attndsl: `pat(q, k, v, backend="{backend}", **tensors)`; the backward recomputes the \
attention tile by tile from the saved log-sum-exp on the forward's plan. "attndsl fwd" is the \
forward alone under `torch.no_grad()` (the fused CPU path), for the (fwd+bwd)/fwd column; \
"attndsl bwd" is `torch.autograd.grad` alone on one forward's graph (`retain_graph=True`).
- Flex: {flex}, the mask_mods of bench/cases.py and bench/bench_cpu.py (MoBA), BLOCK_SIZE \
{block}; BlockMask built outside the timed call.
- SDPA: `scaled_dot_product_attention` with `is_causal=True` for causal, else the mask_mod's \
dense boolean `attn_mask` (N ≤ {sdpa_max}).
- Gradient error: max over dq, dk, dv of max |attndsl − other| / max |other|."""


def report(rows, checks, info, args, threads, on_gpu: bool) -> str:
    flex = ("eager `flex_attention` (--eager)" if args.eager
            else "`torch.compile(flex_attention, dynamic=False)`")
    device = "CUDA GPU" if on_gpu else "CPU"
    lines = [f"## {device} forward+backward: attndsl vs FlexAttention vs SDPA — {info['date']}", "",
             f"Machine: {info['nproc']} CPU(s), {info['cpu']}; Python {info['python']}, torch "
             f"{info['torch']}, {threads} torch threads; commit {commit()}.",
             f"Command: `{shlex.join(['python', 'bench/bench_train.py'] + shown_argv(args.argv))}` "
             f"({info['seconds']:.0f} s; 1-minute load average {info['load'][0]:.1f} at the start, "
             f"{info['load'][1]:.1f} at the end: times include other jobs' share of the CPUs "
             "when it exceeds the core count)."]
    if args.note:
        lines.append(f"Note: {args.note}")
    lines += ["", METHOD.format(heads=HEADS, d=HEAD_DIM, device=device, threads=threads, reps=args.reps,
                                budget=args.budget, backend=args.backend_name, flex=flex, block=MASK_BLOCK,
                                sdpa_max=args.sdpa_max_n),
              "", results_table(rows), "", details_table(rows), "", "Targets:", ""] + targets(rows, on_gpu)
    lines += ["", "Checks:", ""] + checks_section(checks, rows, args)
    reasons = sorted({r.flex_na for r in rows if r.flex is None and r.flex_na})
    if reasons:
        lines += ["", "Flex fwd+bwd not measured: " + "; ".join(reasons) + "."]
    errors = [f"- {r.key} N={r.n}: {e}" for r in rows for e in r.errors]
    if errors:
        lines += ["", "Errors:", ""] + errors
    return "\n".join(lines) + "\n"
