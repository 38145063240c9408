"""Benchmark: attndsl's torch backend against compiled FlexAttention and SDPA on the CPU.

Issue 12, point 4. For each pattern (causal, sliding window, dilated, packed documents,
Longformer, BigBird, MoBA) and length N (q_len = kv_len = N; B = 1, 4 heads, head_dim 64,
float32) it times, in one run:

* ``attndsl``: ``pat(q, k, v, backend="torch", **tensors)``;
* ``flex``: ``torch.compile(flex_attention)(q, k, v, block_mask=bm)`` with ``bm`` from
  ``create_block_mask`` (compiled) and the hand-written ``mask_mod`` of bench/cases.py (MoBA's,
  which needs q and k, is here); compile time and mask time are kept out of the Flex time, the
  mask time is reported on its own;
* ``sdpa``: ``scaled_dot_product_attention`` with ``is_causal=True`` for causal and a dense
  boolean ``attn_mask`` (built from the mask_mod) for the others, up to ``--sdpa-max-n``;

and checks that the outputs agree (attndsl vs Flex at every size; the float64 reference vs
attndsl and eager Flex at ``--check-n``; attndsl's ``dense_mask`` vs each mask_mod at
``--mask-n``). Targets, marked PASS/MISS: attndsl <= 1.0x Flex on every pattern, causal <= 1.5x
SDPA, and time linear in kept pairs (sliding window of ``--lin-window`` keys: 4x the length costs
at most 5x).

    .venv/bin/python bench/bench_cpu.py --smoke                    # a few seconds, no torch.compile
    .venv/bin/python bench/bench_cpu.py                            # N = 2048, 8192
    .venv/bin/python bench/bench_cpu.py --write docs/benchmarks.md --note "quiet machine"

See bench/README.md for the options.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_block_map import machine_info  # noqa: E402
from cases import CASES_BY_KEY, Case, _flex_sliding  # noqa: E402
from cpu_report import (  # noqa: E402
    HEAD_DIM,
    HEADS,
    MASK_BLOCK,
    Row,
    fmt_e,
    fmt_ms,
    fmt_s,
    ok,
    report,
)
from forward_cases import write_section  # noqa: E402

PAIRS_PER_CHUNK = 1 << 24       # mask_mod pairs evaluated at once (int64 temporaries: 128 MiB)

MOBA = Case("moba", "moba.attn", "moba", {"top_k": 3, "block": 256},
            note="top 3 earlier key blocks plus the own block, causal; selection from the call's q and k")


@dataclass(frozen=True)
class CpuCase:
    key: str                    # a case of bench/cases.py, or MOBA
    label: str


BENCH = [
    CpuCase("causal", "causal"),
    CpuCase("sliding_1024", "sliding window 1024"),
    CpuCase("dilated_256_4", "dilated (256, 4)"),
    CpuCase("packed_16_docs", "packed documents (16)"),
    CpuCase("longformer_512_64", "Longformer (w 512, g 64)"),
    CpuCase("bigbird", "BigBird (block 64; 1, 2, 3)"),
    CpuCase(MOBA.key, "MoBA (top 3 of 256-token blocks)"),     # --moba-block changes the block
]
BENCH_BY_KEY = {c.key: c for c in BENCH}


def case_of(key: str) -> Case:
    return MOBA if key == MOBA.key else CASES_BY_KEY[key]


def lin_case(window: int) -> Case:
    return Case(f"sliding_{window}", "sliding_window.attn", "mistral_swa", {"window": window},
                flex=_flex_sliding(window))


# ------------------------------------------------------------------------------------ masks
def moba_selection(q, k, top_k: int, block: int):
    """bool [heads, nb, nb]: MoBA's top-k key blocks per (head, query block), as topk_blocks in
    LANGUAGE.md section 4 (q_len == kv_len): mean-pooled query and key blocks, float64 block
    scores, candidates J < I, the top_k highest (torch.topk; exact ties are not ordered by J)."""
    import torch

    heads, kv_heads, n = q.shape[1], k.shape[1], q.shape[2]
    nb = -(-n // block)
    ids = torch.arange(n) // block
    counts = torch.bincount(ids, minlength=nb).to(torch.float64)[:, None]

    def pooled(x):                  # [G, n, D] -> [G, nb, D]
        sums = torch.zeros(x.shape[0], nb, x.shape[-1], dtype=torch.float64)
        return sums.index_add_(1, ids, x.to(torch.float64)) / counts

    pq = pooled(q[0])
    pk = pooled(k[0]).repeat_interleave(heads // kv_heads, dim=0)
    s = torch.einsum("hid,hjd->hij", pq, pk)
    cand = torch.arange(nb)[None, :] < torch.arange(nb)[:, None]
    s = s.masked_fill(~cand, -math.inf)
    idx = torch.topk(s, min(top_k, nb), dim=-1).indices
    sel = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, idx, True)
    return sel & cand


def moba_mask_mod(sel, block: int):
    def mask_mod(b, h, q, kv):
        qb, kb = q // block, kv // block
        return (q >= kv) & (sel[h, qb, kb] | (qb == kb))
    return mask_mod


class MaskSource:
    """One pattern at one length: its mask_mod (MoBA's from q and k) and the heads it varies over."""

    def __init__(self, case: Case, n: int, q=None, k=None):
        import torch

        self.case, self.n = case, n
        if case.key == MOBA.key:
            self.select = lambda: moba_selection(q, k, case.params["top_k"], case.params["block"])
            self.heads = q.shape[1]     # the selection differs per head
        else:
            self.select = None
            self.heads = 1
            self.fixed = case.flex(n, HEADS, torch)

    def mask_mod(self):
        if self.select is None:
            return self.fixed
        return moba_mask_mod(self.select(), self.case.params["block"])


def mask_rows(mask_mod, h: int, lo: int, hi: int, n: int):
    import torch

    q = torch.arange(lo, hi)[:, None]
    kv = torch.arange(n)[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    return torch.broadcast_to(mask_mod(zero, torch.tensor(h), q, kv), (hi - lo, n))


def row_chunks(n: int):
    step = max(1, PAIRS_PER_CHUNK // max(1, n))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def dense_mask(mask_mod, heads: int, n: int):
    """bool [heads, n, n] of a mask_mod, row block by row block."""
    import torch

    out = torch.empty((heads, n, n), dtype=torch.bool)
    for h in range(heads):
        for lo, hi in row_chunks(n):
            out[h, lo:hi] = mask_rows(mask_mod, h, lo, hi, n)
    return out


def count_pairs(mask_mod, heads: int, n: int) -> int:
    return sum(int(mask_rows(mask_mod, h, lo, hi, n).sum()) for h in range(heads) for lo, hi in row_chunks(n))


# ------------------------------------------------------------------------------------ timing
def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def synced(fn, device):
    """``fn`` followed by :func:`sync` (what a timed call on a device must measure)."""
    def call():
        out = fn()
        sync(device)
        return out
    return call


def timed(fn, reps: int, budget_s: float, warmup: int = 0):
    """(result of the first call, first call s, median of up to reps further calls s): the
    first call, ``warmup`` untimed calls (none once the first took budget_s), then the timed
    calls, which stop once they have used budget_s (at least one is made)."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        if first > budget_s:
            break
        fn()
    times: list[float] = []
    while len(times) < max(1, reps) and (not times or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times)


def make_qkv(n: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((1, HEADS, n, HEAD_DIM), generator=gen) for _ in range(3))


def run_case(cc: CpuCase, n: int, args, log) -> Row:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    case = case_of(cc.key)
    row = Row(cc.key, cc.label, n)

    def step(name, fn):
        try:
            return fn()
        except Exception as exc:        # recorded; the case goes on without it
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            row.errors.append(f"{name}: {type(exc).__name__}: {first}")
            log(f"    {name} failed: {row.errors[-1]}")
            return None

    q, k, v = make_qkv(n, args.seed + n)
    tensors = case.inputs(n)
    given = {name: torch.as_tensor(a) for name, a in tensors.items()}
    pat = case.load()
    src = MaskSource(case, n, q, k)

    # attndsl: the first call (analysis, plan: cached on the pattern for static patterns), then warm
    got = step("attndsl", lambda: timed(lambda: pat(q, k, v, backend="torch", **given),
                                        args.reps, args.budget))
    out_a = None
    if got is not None:
        out_a, row.attndsl_first, row.attndsl = got
    log(f"    attndsl {fmt_ms(row.attndsl)} ms (first {fmt_ms(row.attndsl_first)} ms)")

    # Flex: the BlockMask (compiled create_block_mask; its first call compiles), then the kernel
    torch._dynamo.reset()
    if args.eager:
        def build(mm):
            return create_block_mask(mm, 1, src.heads, n, n, device="cpu", BLOCK_SIZE=MASK_BLOCK)
        flex = flex_attention
    else:
        cbm = torch.compile(create_block_mask)

        def build(mm):
            return cbm(mm, 1, src.heads, n, n, device="cpu", BLOCK_SIZE=MASK_BLOCK)
        flex = torch.compile(flex_attention, dynamic=False)
    got = step("create_block_mask", lambda: timed(lambda: build(src.mask_mod()), 3, args.budget / 4))
    out_f = None
    if got is not None:
        bm, row.mask_first, row.mask = got
        got = step("flex", lambda: timed(lambda: flex(q, k, v, block_mask=bm), args.reps, args.budget))
        if got is not None:
            out_f, row.flex_first, row.flex = got
    log(f"    flex {fmt_ms(row.flex)} ms (compile + first {fmt_s(row.flex_first)}), "
        f"create_block_mask {fmt_ms(row.mask)} ms (compile + first {fmt_s(row.mask_first)})")
    if out_a is not None and out_f is not None:
        row.diff_flex = float((out_a - out_f).abs().max())

    # SDPA: is_causal for causal, else a dense boolean mask where it fits
    mm = src.mask_mod()
    mask = None
    if cc.key == "causal":
        row.sdpa_kind = "is_causal"
        row.kept = HEADS * n * (n + 1) // 2
    else:
        row.kept = count_pairs(mm, src.heads, n) * (HEADS // src.heads)
        if n <= args.sdpa_max_n:
            mask = step("SDPA mask", lambda: dense_mask(mm, src.heads, n)[None])
            row.sdpa_kind = f"bool mask [1, {src.heads}, N, N]"
        else:
            row.sdpa_kind = f"skipped (N > --sdpa-max-n {args.sdpa_max_n})"
    if row.sdpa_kind == "is_causal" or mask is not None:
        def sdpa():
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        got = step("SDPA", lambda: timed(sdpa, args.reps, args.budget))
        if got is not None:
            out_s, _, row.sdpa = got
            if out_a is not None:
                row.diff_sdpa = float((out_a - out_s).abs().max())
    log(f"    sdpa {fmt_ms(row.sdpa)} ms ({row.sdpa_kind}); max |attndsl - flex| {fmt_e(row.diff_flex)}")
    torch._dynamo.reset()
    return row


# ------------------------------------------------------------------------------- the checks
def check_reference(cc: CpuCase, n: int, args) -> dict:
    """At length n: the float64 reference against attndsl's torch backend and eager Flex."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    case = case_of(cc.key)
    q, k, v = make_qkv(n, args.seed + 7 * n + 1)
    tensors = case.inputs(n)
    given = {name: torch.as_tensor(a) for name, a in tensors.items()}
    pat = case.load()
    ref = torch.as_tensor(pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                        **tensors)[0])
    out_a = pat(q, k, v, backend="torch", **given)
    src = MaskSource(case, n, q, k)
    bm = create_block_mask(src.mask_mod(), 1, src.heads, n, n, device="cpu", BLOCK_SIZE=MASK_BLOCK)
    out_f = flex_attention(q, k, v, block_mask=bm)
    return {"attndsl": float((out_a.double() - ref).abs().max()),
            "flex": float((out_f.double() - ref).abs().max())}


def check_mask(cc: CpuCase, n: int, args) -> dict:
    """At length n: attndsl's dense_mask against the mask_mod on every pair."""
    case = case_of(cc.key)
    pat = case.load()
    q, k, _ = make_qkv(n, args.seed + 11 * n + 3)
    src = MaskSource(case, n, q, k)
    if src.select is not None:
        ours = pat.dense_mask(n, n, HEADS, query=q[0].double().numpy(), key=k[0].double().numpy())
    else:
        ours = pat.dense_mask(n, n, 1, **case.inputs(n))
    theirs = dense_mask(src.mask_mod(), src.heads, n).numpy()
    differ = int(np.count_nonzero(ours != theirs))
    return {"differ": differ, "pairs": int(ours.size), "density": float(ours.mean())}


def run_linearity(n0: int, args, log) -> dict:
    """attndsl's sliding window of --lin-window keys at n0 and 4 n0."""
    import torch

    case = lin_case(args.lin_window)
    out = {"window": args.lin_window, "n": n0}
    for n in (n0, 4 * n0):
        q, k, v = make_qkv(n, args.seed + n)
        pat = case.load()
        _, _, t = timed(lambda pat=pat, q=q, k=k, v=v: pat(q, k, v, backend="torch"), args.reps, args.budget)
        out[n] = t
        out[f"kept_{n}"] = count_pairs(case.flex(n, HEADS, torch), 1, n)
        log(f"  linearity: sliding {args.lin_window} at N={n}: attndsl {fmt_ms(t)} ms")
    out["ratio"] = out[4 * n0] / out[n0]
    out["kept_ratio"] = out[f"kept_{4 * n0}"] / out[f"kept_{n0}"]
    return out


# --------------------------------------------------------------------------------------- main
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,8192", help="comma-separated N (default: %(default)s)")
    ap.add_argument("--patterns", default="", help="comma-separated cases (default: all; --list)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny run without torch.compile: N = 256, reference check at 256, one timed call")
    ap.add_argument("--eager", action="store_true", help="eager Flex and create_block_mask (no compile)")
    ap.add_argument("--reps", type=int, default=5,
                    help="timed calls after the warm-up (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds: no further timed call of one method once they took this long")
    ap.add_argument("--sdpa-max-n", type=int, default=16384, help="largest N for SDPA's dense mask")
    ap.add_argument("--lin-window", type=int, default=256, help="window of the linearity check")
    ap.add_argument("--no-lin", action="store_true", help="skip the linearity check")
    ap.add_argument("--check-n", type=int, default=2048,
                    help="N of the float64 reference check (0: skip; default: %(default)s)")
    ap.add_argument("--mask-n", type=int, default=2048,
                    help="N of the mask_mod vs dense_mask check (0: skip; default: %(default)s)")
    ap.add_argument("--moba-block", type=int, default=256, help="MoBA's block (default: %(default)s)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs difference allowed (float32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", metavar="FILE", help="append a dated section to FILE (docs/benchmarks.md)")
    ap.add_argument("--note", default="", help="a line in the written section (machine, load, commit)")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.smoke:
        args.sizes, args.eager, args.reps, args.budget = "256", True, 1, 1.0
        args.check_n, args.lin_window, args.moba_block = 256, 32, 32
    MOBA.params["block"] = args.moba_block
    if args.moba_block != 256:
        BENCH_BY_KEY[MOBA.key] = CpuCase(MOBA.key, f"MoBA (top 3 of {args.moba_block}-token blocks)")
    return ap, args


def chosen_keys(ap, args, cases) -> list[str] | None:
    """The keys of the cases a run names (``--patterns``; all of ``cases`` by default; an
    unknown one is a usage error), or None once ``--list`` has printed them."""
    if args.list:
        for c in cases:
            case = case_of(c.key)
            print(f"{c.key:<20} examples/{case.file}:{case.pattern} {case.params}  {c.label}")
        return None
    known = [c.key for c in cases]
    keys = [p for p in args.patterns.split(",") if p] or known
    unknown = [p for p in keys if p not in known]
    if unknown:
        ap.error(f"unknown pattern(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return keys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap, args = parse(argv)
    keys = chosen_keys(ap, args, BENCH)
    if keys is None:
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    import torch

    warnings.filterwarnings("ignore", message=".*flex_attention.*")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    info = machine_info()
    threads = torch.get_num_threads()
    t_start = time.perf_counter()
    masks, refs = {}, {}
    for key in keys:
        cc = BENCH_BY_KEY[key]
        if args.mask_n:
            masks[key] = check_mask(cc, args.mask_n, args)
            log(f"mask check {key} N={args.mask_n}: {masks[key]['differ']} pairs differ")
        if args.check_n:
            refs[key] = check_reference(cc, args.check_n, args)
            log(f"reference check {key} N={args.check_n}: attndsl {fmt_e(refs[key]['attndsl'])}, "
                f"flex {fmt_e(refs[key]['flex'])}")
    rows = []
    for n in sizes:
        for key in keys:
            log(f"{key} N={n}")
            rows.append(run_case(BENCH_BY_KEY[key], n, args, log))
    lin = None if args.no_lin else run_linearity(min(sizes), args, log)
    log(f"benchmark took {time.perf_counter() - t_start:.0f} s")

    text = report(rows, lin, refs, masks, info, args, threads)
    print(text)
    if args.write:
        write_section(args.write, text)
    failed = (any(m["differ"] for m in masks.values()) or any(not ok(r, args) for r in refs.values())
              or any(r.diff_flex is not None and not r.diff_flex <= args.tol for r in rows)
              or any(r.errors for r in rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
