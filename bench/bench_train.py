"""Benchmark: forward+backward of attndsl against FlexAttention and SDPA (issue 10, training).

The patterns and shapes of the forward CPU benchmark (bench/bench_cpu.py: causal, sliding
window, dilated, packed documents, Longformer, BigBird, MoBA; q_len = kv_len = N, B = 1,
4 heads, head_dim 64, float32), plus the strided pattern of the Sparse Transformer (a GPU target
names it). For each pattern and N it times one forward call and ``torch.autograd.grad(out,
(q, k, v), dout)``:

* ``attndsl``: ``pat(q, k, v, backend=..., **tensors)`` ("torch" on the CPU, "triton" on CUDA),
  and its forward alone under ``torch.no_grad()``;
* ``flex``: ``torch.compile(flex_attention)`` with a BlockMask from ``create_block_mask`` and the
  mask_mods of bench/cases.py; where Flex has no backward (the CPU), "n/a" with its reason;
* ``sdpa``: ``scaled_dot_product_attention``, ``is_causal=True`` for causal, else the
  mask_mod's dense boolean mask (N <= ``--sdpa-max-n``).

Before timing, the gradients are checked at ``--check-n`` against float64 SDPA with the
mask_mod's dense mask (dq, dk, dv and out, relative to the largest value, ``--grad-tol``);
while timing, attndsl's gradients are compared with SDPA's and Flex's at every size. The GPU
targets (fwd+bwd <= 0.9x Flex on every pattern, <= 0.3x on dilated and strided ones;
bench/train_report.py) are marked PASS/MISS on a GPU and "not measured: no GPU" on the CPU.
Exit status 1 when a check fails or a method errs.

    .venv/bin/python bench/bench_train.py --quick        # seconds: N = 256, eager Flex, one timed call
    .venv/bin/python bench/bench_train.py                # N = 2048, 8192
    .venv/bin/python bench/bench_train.py --write docs/benchmarks.md --note "quiet machine"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_block_map import machine_info  # noqa: E402
from bench_cpu import (  # noqa: E402
    BENCH,
    MOBA,
    CpuCase,
    MaskSource,
    case_of,
    chosen_keys,
    count_pairs,
    dense_mask,
    make_qkv,
    synced,
    timed,
)
from cpu_report import HEADS, MASK_BLOCK, fmt_e, fmt_ms, fmt_s  # noqa: E402
from forward_cases import write_section  # noqa: E402
from train_report import TrainRow, grad_ok, report  # noqa: E402

# bench_cpu's patterns, then the Sparse Transformer's strided one (a GPU target names strided)
TRAIN_BENCH = list(BENCH) + [CpuCase("strided_128", "strided (stride 128)")]
TRAIN_BY_KEY = {c.key: c for c in TRAIN_BENCH}


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (in float64; NaN when got has a NaN)."""
    got, want = got.double(), want.double().to(got.device)
    scale = float(want.abs().max()) or 1.0
    return float((got - want).abs().max()) / scale


def worst(grads, others) -> float:
    errs = [rel_err(g, o) for g, o in zip(grads, others)]
    return max(errs, key=lambda e: (e != e, e))         # NaN is the worst


def leaves(tensors, device, dtype=None):
    return tuple(t.to(device=device, dtype=dtype or t.dtype).detach().requires_grad_() for t in tensors)


def fwd_bwd(attend, q, k, v, dout):
    """(out, dq, dk, dv) of one call: attend(q, k, v), then autograd.grad into q, k, v."""
    import torch

    out = attend(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def dense_sdpa(mask):
    """attend() with SDPA: is_causal when mask is None, else the boolean mask [1, H or 1, N, N]."""
    import torch.nn.functional as F

    if mask is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def inputs_of(case, n: int, device):
    import torch

    return {name: torch.as_tensor(a).to(device) for name, a in case.inputs(n).items()}


# ------------------------------------------------------------------------------ the checks
def check_grads(cc: CpuCase, n: int, args) -> dict:
    """At length n: attndsl's (out, dq, dk, dv) in float32 against float64 SDPA with the
    mask_mod's dense mask, each as max |difference| / max |SDPA value|."""
    import torch

    case = case_of(cc.key)
    q, k, v = make_qkv(n, args.seed + 7 * n + 1)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(args.seed + 5))
    src = MaskSource(case, n, q, k)
    mask = dense_mask(src.mask_mod(), src.heads, n)[None].to(args.device)
    want = fwd_bwd(dense_sdpa(mask), *leaves((q, k, v), args.device, torch.float64),
                   dout.to(args.device, torch.float64))
    pat, given = case.load(), inputs_of(case, n, args.device)
    got = fwd_bwd(lambda a, b, c: pat(a, b, c, backend=args.backend_name, **given),
                  *leaves((q, k, v), args.device), dout.to(args.device))
    return {name: rel_err(g, w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}


# ------------------------------------------------------------------------------- timing
def run_case(cc: CpuCase, n: int, args, log) -> TrainRow:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    case = case_of(cc.key)
    row = TrainRow(cc.key, cc.label, n)
    device = args.device

    def record(name, exc):
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        row.errors.append(f"{name}: {type(exc).__name__}: {first}")
        log(f"    {name} failed: {row.errors[-1]}")

    def step(name, fn):
        try:
            return fn()
        except Exception as exc:        # recorded; the case goes on without it
            record(name, exc)
            return None

    def timed_sync(fn, reps=args.reps, budget=args.budget):
        return timed(synced(fn, device), reps, budget)

    q0, k0, v0 = make_qkv(n, args.seed + n)
    q, k, v = leaves((q0, k0, v0), device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(args.seed + 3)).to(device)
    pat, given = case.load(), inputs_of(case, n, device)
    src = MaskSource(case, n, q0, k0)

    def attndsl(a, b, c):
        return pat(a, b, c, backend=args.backend_name, **given)

    def forward_only():
        with torch.no_grad():
            return attndsl(q, k, v)

    got = step("attndsl forward", lambda: timed_sync(forward_only))
    if got is not None:
        row.fwd = got[2]
    got = step("attndsl", lambda: timed_sync(lambda: fwd_bwd(attndsl, q, k, v, dout)))
    grads_a = None
    if got is not None:
        grads_a, row.attndsl_first, row.attndsl = got[0][1:], got[1], got[2]
    if grads_a is not None:             # the backward alone: one forward, its graph kept
        out = attndsl(q, k, v)
        got = step("attndsl backward", lambda: timed_sync(
            lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)))
        if got is not None:
            row.bwd = got[2]
        del out
    log(f"    attndsl fwd+bwd {fmt_ms(row.attndsl)} ms (first {fmt_ms(row.attndsl_first)} ms), "
        f"fwd {fmt_ms(row.fwd)} ms, bwd {fmt_ms(row.bwd)} ms")

    # Flex: BlockMask outside the timed call; no backward on some devices (recorded as n/a)
    torch._dynamo.reset()
    flex = flex_attention if args.eager else torch.compile(flex_attention, dynamic=False)
    bm = step("create_block_mask", lambda: create_block_mask(src.mask_mod(), 1, src.heads, n, n,
                                                             device=str(device), BLOCK_SIZE=MASK_BLOCK))
    if bm is not None:
        try:
            got = timed_sync(lambda: fwd_bwd(lambda a, b, c: flex(a, b, c, block_mask=bm), q, k, v, dout))
            row.flex_first, row.flex = got[1], got[2]
            if grads_a is not None:
                row.grad_flex = worst(grads_a, got[0][1:])
        except NotImplementedError as exc:
            row.flex_na = (str(exc).strip().splitlines() or ["not implemented"])[0][:160].rstrip(".")
        except Exception as exc:        # recorded; the case goes on without it
            record("flex", exc)
    log(f"    flex fwd+bwd n/a: {row.flex_na}" if row.flex_na else
        f"    flex fwd+bwd {fmt_ms(row.flex)} ms (compile + first {fmt_s(row.flex_first)})")
    torch._dynamo.reset()

    # SDPA: is_causal for causal, else the dense boolean mask where it fits
    mm = src.mask_mod()
    mask, run_sdpa = None, True
    if cc.key == "causal":
        row.sdpa_kind = "is_causal"
        row.kept = HEADS * n * (n + 1) // 2
    else:
        row.kept = count_pairs(mm, src.heads, n) * (HEADS // src.heads)
        if n <= args.sdpa_max_n:
            mask = step("SDPA mask", lambda: dense_mask(mm, src.heads, n)[None].to(device))
            run_sdpa = mask is not None
            row.sdpa_kind = f"bool mask [1, {src.heads}, N, N]"
        else:
            run_sdpa = False
            row.sdpa_kind = f"skipped (N > --sdpa-max-n {args.sdpa_max_n})"
    if run_sdpa:
        got = step("SDPA", lambda: timed_sync(lambda: fwd_bwd(dense_sdpa(mask), q, k, v, dout)))
        if got is not None:
            row.sdpa = got[2]
            if grads_a is not None:
                row.grad_sdpa = worst(grads_a, got[0][1:])
    log(f"    sdpa fwd+bwd {fmt_ms(row.sdpa)} ms ({row.sdpa_kind}); grad error vs SDPA "
        f"{fmt_e(row.grad_sdpa)}, vs Flex {fmt_e(row.grad_flex)}")
    return row


# ------------------------------------------------------------------------------------ main
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,8192", help="comma-separated N (default: %(default)s)")
    ap.add_argument("--patterns", default="", help="comma-separated cases (default: all; --list)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--quick", action="store_true",
                    help="tiny run for tests: N = 256, eager Flex, gradient check at 128, one timed call")
    ap.add_argument("--backend", default=None,
                    help='attndsl backend (default: "triton" when CUDA is available, else "torch")')
    ap.add_argument("--eager", action="store_true", help="eager flex_attention (no torch.compile)")
    ap.add_argument("--reps", type=int, default=5,
                    help="timed calls after the warm-up (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=10.0,
                    help="seconds: no further timed call of one method once they took this long")
    ap.add_argument("--sdpa-max-n", type=int, default=8192, help="largest N for SDPA's dense mask")
    ap.add_argument("--check-n", type=int, default=512,
                    help="N of the gradient check against float64 SDPA (0: skip; default: %(default)s)")
    ap.add_argument("--grad-tol", type=float, default=1e-4,
                    help="largest relative gradient difference allowed (default: %(default)s)")
    ap.add_argument("--moba-block", type=int, default=256, help="MoBA's block (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", metavar="FILE", help="append a dated section to FILE (docs/benchmarks.md)")
    ap.add_argument("--note", default="", help="a line in the written section (machine, load)")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.sizes, args.eager, args.reps, args.budget = "256", True, 1, 1.0
        args.check_n, args.moba_block = 128, 32
    return ap, args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap, args = parse(argv)
    keys = chosen_keys(ap, args, TRAIN_BENCH)
    if keys is None:
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    import torch

    warnings.filterwarnings("ignore", message=".*flex_attention.*")
    on_gpu = torch.cuda.is_available() and args.backend in (None, "triton")
    args.device = torch.device("cuda" if on_gpu else "cpu")
    args.backend_name = args.backend or ("triton" if on_gpu else "torch")
    MOBA.params["block"] = args.moba_block
    moba_label = f"MoBA (top 3 of {args.moba_block}-token blocks)"
    TRAIN_BY_KEY[MOBA.key] = CpuCase(MOBA.key, moba_label)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    info = machine_info()
    info["load"] = [os.getloadavg()[0]]
    threads = torch.get_num_threads()
    t_start = time.perf_counter()
    checks = {}
    try:
        if args.check_n:
            for key in keys:
                checks[key] = check_grads(TRAIN_BY_KEY[key], args.check_n, args)
                log(f"gradient check {key} N={args.check_n}: "
                    + ", ".join(f"{w} {fmt_e(e)}" for w, e in checks[key].items()))
        rows = []
        for n in sizes:
            for key in keys:
                log(f"{key} N={n}")
                rows.append(run_case(TRAIN_BY_KEY[key], n, args, log))
    finally:
        MOBA.params["block"] = 256          # bench_cpu's default, for whoever imports it next
    info["load"].append(os.getloadavg()[0])
    info["seconds"] = time.perf_counter() - t_start
    log(f"benchmark took {info['seconds']:.0f} s")

    text = report(rows, checks, info, args, threads, on_gpu)
    print(text)
    if args.write:
        write_section(args.write, text)
    failed = (any(not grad_ok(c, args) for c in checks.values())
              or any(g is not None and not g <= args.grad_tol
                     for r in rows for g in (r.grad_sdpa, r.grad_flex))
              or any(r.errors for r in rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
