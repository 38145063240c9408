"""Benchmark: data-dependent block selection (MoBA top-k, VMoBA-style top-p), attndsl against
the Flex way and dense causal.

For each selection pattern and length N (q_len = kv_len = N; B = 1, 4 heads, kv heads 4,
head_dim 64; float32 on the CPU, bfloat16 on CUDA) it times, in one run:

* ``attndsl``: ``pat(q, k, v)`` on the bound pattern: selection and attention in one call
  (backend "torch" on the CPU, "triton" on CUDA);
* the Flex way: the selection in torch (pooled block means, block scores, ``torch.topk`` or
  top-p, candidates J < I) turned into a ``BlockMask.from_kv_blocks`` (selected blocks full,
  the diagonal tile partial with a causal mask_mod), then ``torch.compile(flex_attention)``;
  the selection + BlockMask and the attention are timed separately, and their sum;
* dense causal on the same backend: attndsl's ``causal_lm`` (examples/causal.attn) and SDPA
  with ``is_causal=True``, once per length.

Patterns (``--list``): MoBA top-2 of 32 blocks (block = N / 32; the CPU target row at 4K),
MoBA top-8 with block 512 (the issue's "MoBA top-8 at 32K"), top-p 0.9 with block 512
(``examples/topp_selection.attn:topp_causal``). Every row checks attndsl's output against the
Flex way's (or, where Flex cannot run, SDPA with the Flex way's selection as a dense mask);
before timing, the Flex way's selection is checked against attndsl's float64 reference
``dense_mask`` at a small N. Targets, PASS/FAIL: on the CPU, MoBA top-2 of 32 at 4K costs at
most 0.4x attndsl's dense causal; on a GPU, attndsl at most 0.7x the Flex way (selection +
attention). Exit status 0 whatever the targets (1 with ``--check`` when one fails); 1 when a
check fails or a method errs.

    .venv/bin/python bench/bench_select.py --quick       # N = 4096 only (~15 s on 2 cores)
    .venv/bin/python bench/bench_select.py               # N = 4K, 8K, 32K, 128K; too slow: skipped (~2-3 min)
    .venv/bin/python bench/bench_select.py --out auto --note "quiet machine"

See bench/README.md for the options.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

# inductor compiles in this process: no pool of compile worker processes (started in the
# background by a torch.compile) competes with the timed calls on a small CPU; set before torch
# is imported
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import forward_cases as fc  # noqa: E402

fc.ensure_attndsl()         # before anything imports attndsl (the GPU machine has no install)

from bench_block_map import machine_info  # noqa: E402
from bench_cpu import make_qkv as cpu_qkv  # noqa: E402
from bench_cpu import synced  # noqa: E402
from bench_cpu import timed as timed_calls  # noqa: E402
from cpu_report import HEAD_DIM, HEADS, fmt_e, fmt_ms, fmt_s  # noqa: E402
from flex_select import (  # noqa: E402
    block_mask_of,
    dense_of_selection,
    flex_block_of,
    kept_pairs,
    select_blocks,
)
from forward_cases import write_section  # noqa: E402
from select_report import (  # noqa: E402
    CPU_TARGET_CASE,
    CPU_TARGET_N,
    DenseRef,
    SelRow,
    diff_ok,
    failed_targets,
    report,
)

LENGTHS = "4096,8192,32768,131072"
QUICK_LENGTHS = "4096"
PROBE_N = 2048              # dense causal probe for the first length's prediction


@dataclass(frozen=True)
class SelCase:
    key: str
    file: str               # in examples/
    pattern: str
    kind: str               # "topk" or "topp"
    value: float            # top_k or p
    block: int = 0          # the selector's block; 0: N // blocks
    blocks: int = 0

    def block_at(self, n: int) -> int:
        return self.block or max(1, n // self.blocks)

    def params(self, n: int) -> dict:
        name = "top_k" if self.kind == "topk" else "p"
        value = int(self.value) if self.kind == "topk" else float(self.value)
        return {name: value, "block": self.block_at(n)}

    def label(self, n: int) -> str:
        b = self.block_at(n)
        if self.kind == "topk" and self.blocks:
            return f"MoBA top-{int(self.value)} of {self.blocks} blocks (block {b})"
        if self.kind == "topk":
            return f"MoBA top-{int(self.value)}, block {b}"
        return f"top-p {self.value:g}, block {b}"

    def load(self, n: int):
        import attndsl

        return attndsl.load(os.path.join(ROOT, "examples", self.file))[self.pattern].bind(**self.params(n))


CASES = [
    SelCase("moba_top2_of_32", "moba.attn", "moba", "topk", 2, blocks=32),
    SelCase("moba_top8_b512", "moba.attn", "moba", "topk", 8, block=512),
    SelCase("topp_p90_b512", "topp_selection.attn", "topp_causal", "topp", 0.9, block=512),
]
CASES_BY_KEY = {c.key: c for c in CASES}


# ------------------------------------------------------------------------------- timing
def timed(fn, args):
    """(result of the first call, first call s, median of the timed calls s): the first call,
    args.warmup - 1 further untimed calls, then up to args.reps timed calls, stopping once they
    have used args.budget seconds (at least one is made). Synchronises CUDA after each call."""
    return timed_calls(synced(fn, args.device), args.reps, args.budget, max(0, args.warmup - 1))


def make_qkv(n: int, args):
    """bench_cpu's q, k, v at length n (seed + n), on the run's device and dtype."""
    return tuple(t.to(args.device, args.dtype) for t in cpu_qkv(n, args.seed + n))


def where_max(a, b, block: int) -> tuple[float, str]:
    """max |a - b| (NaN when either has a NaN) and where: head, row, query block."""
    import torch

    diff = (a.float() - b.float()).abs()
    if torch.isnan(diff).any():
        h, row = [int(x) for x in torch.nonzero(torch.isnan(diff[0]))[0][:2]]
        return math.nan, f"head {h}, row {row} (NaN), query block {row // block}"
    per = diff[0].amax(dim=-1)                              # [H, n]
    flat = int(per.argmax())
    h, row = divmod(flat, per.shape[1])
    return float(per.max()), f"head {h}, row {row}, query block {row // block}"


def call_of(pat, args):
    if args.backend:
        return lambda q, k, v: pat(q, k, v, backend=args.backend)
    return lambda q, k, v: pat(q, k, v)


def run_dense(n: int, args, log) -> DenseRef:
    import torch.nn.functional as F

    import attndsl

    d = DenseRef(n)
    q, k, v = make_qkv(n, args)
    causal = call_of(attndsl.load(os.path.join(ROOT, "examples", "causal.attn"))["causal_lm"], args)
    out_a = out_s = None
    try:
        out_a, d.attndsl_first, d.attndsl = timed(lambda: causal(q, k, v), args)
    except Exception as exc:            # recorded; the length goes on without it
        d.errors.append(f"attndsl causal: {first_line(exc)}")
        log(f"    attndsl causal failed: {d.errors[-1]}")
    try:
        out_s, _, d.sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args)
    except Exception as exc:
        d.errors.append(f"SDPA: {first_line(exc)}")
        log(f"    SDPA failed: {d.errors[-1]}")
    if out_a is not None and out_s is not None:
        d.diff = float((out_a.float() - out_s.float()).abs().max())
    log(f"  dense causal N={n}: attndsl {fmt_ms(d.attndsl)} ms (first {fmt_ms(d.attndsl_first)} ms), "
        f"SDPA {fmt_ms(d.sdpa)} ms, max |diff| {fmt_e(d.diff)}")
    return d


def first_line(exc) -> str:
    return f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0][:200]


def causal_call(args, q, k, v):
    """attndsl's dense causal call on (q, k, v), the same backend."""
    import attndsl

    causal = call_of(attndsl.load(os.path.join(ROOT, "examples", "causal.attn"))["causal_lm"], args)
    return lambda: causal(q, k, v)


def paired_ratio(fn, other, args, rounds: int = 15) -> tuple[float, float, float, float]:
    """(fastest seconds of ``fn``, of ``other``, median of ``fn``, of ``other``) over
    ``rounds`` alternating calls of the two (after one of each). Alternating, load that drifts
    during the run reaches both alike; the fastest call of each is its cost with the least
    disturbance from the rest of a shared machine (timeit's estimator), the steadier ratio."""
    fn, other = synced(fn, args.device), synced(other, args.device)
    fn()
    other()
    a, b = [], []
    for _ in range(rounds):
        for f, into in ((fn, a), (other, b)):
            t0 = time.perf_counter()
            f()
            into.append(time.perf_counter() - t0)
    return min(a), min(b), statistics.median(a), statistics.median(b)


def run_row(case: SelCase, n: int, dense: DenseRef, args, log) -> SelRow:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    block = case.block_at(n)
    row = SelRow(case.key, case.label(n), n, block=block, dense=dense)
    if n % block:
        row.skipped = f"N is not a multiple of the block {block}"
        return row
    fb = flex_block_of(block, args.flex_block)
    row.flex_block = fb
    q, k, v = make_qkv(n, args)
    scale = 1.0 / math.sqrt(HEAD_DIM)

    # attndsl: selection + attention in one call
    out_a = None
    try:
        attend = call_of(case.load(n), args)
        out_a, row.attndsl_first, row.attndsl = timed(lambda: attend(q, k, v), args)
    except Exception as exc:            # recorded; the row goes on without it
        row.errors.append(f"attndsl: {first_line(exc)}")
        log(f"    attndsl failed: {row.errors[-1]}")
    log(f"    attndsl {fmt_ms(row.attndsl)} ms (first {fmt_ms(row.attndsl_first)} ms)")
    if out_a is not None and args.device.type == "cpu" and case.key == CPU_TARGET_CASE \
            and n == CPU_TARGET_N:
        row.paired = paired_ratio(lambda: attend(q, k, v), causal_call(args, q, k, v), args)
        log(f"    paired with dense causal: fastest {row.paired[0] * 1e3:.1f} ms / "
            f"{row.paired[1] * 1e3:.1f} ms, median {row.paired[2] * 1e3:.1f} ms / "
            f"{row.paired[3] * 1e3:.1f} ms")

    # the Flex way: selection + BlockMask, then compiled flex_attention
    try:
        idx, count = select_blocks(q, k, case, block, scale)
    except Exception as exc:            # recorded; nothing to compare with
        row.errors.append(f"Flex selection: {first_line(exc)}")
        log(f"    Flex selection failed: {row.errors[-1]}")
        return row
    row.kept = kept_pairs(count, block, n)
    row.mean_blocks = float(count.float().mean())
    out_f = None
    torch._dynamo.reset()
    try:
        def build(q_blocks=False):
            i, c = select_blocks(q, k, case, block, scale)
            return block_mask_of(i, c, block, n, fb, q_blocks)

        bm, row.sel_first, row.sel = timed(build, args)
        flex = flex_attention if args.eager else torch.compile(flex_attention, dynamic=False)
        try:
            out_f, row.flex_first, row.flex = timed(lambda: flex(q, k, v, block_mask=bm), args)
        except Exception as exc:        # retry once with the transposed (q-block) indices built
            log(f"    flex failed with compute_q_blocks=False ({first_line(exc)}); retrying with True")
            first_error = exc
            torch._dynamo.reset()
            flex = flex_attention if args.eager else torch.compile(flex_attention, dynamic=False)
            try:
                bm, row.sel_first, row.sel = timed(lambda: build(True), args)
                row.flex_q_blocks = True
                out_f, row.flex_first, row.flex = timed(lambda: flex(q, k, v, block_mask=bm), args)
            except Exception:
                row.sel = row.sel_first = None
                raise first_error from None
    except Exception as exc:            # e.g. no compiled flex_attention on this device: the reason
        row.flex_na = first_line(exc)
        log(f"    Flex way failed: {row.flex_na}")
    torch._dynamo.reset()
    log(f"    Flex selection {fmt_ms(row.sel)} ms (first {fmt_ms(row.sel_first)} ms), Flex attention "
        f"{fmt_ms(row.flex)} ms (compile + first {fmt_s(row.flex_first)}); "
        f"{row.mean_blocks:.1f} of {n // block} blocks selected on average")

    # the check: attndsl vs the Flex way (or SDPA with the Flex way's selection as a dense mask)
    if out_a is not None:
        other = None
        if out_f is not None:
            other, row.check_kind = out_f, "Flex way"
        elif n <= args.sdpa_max_n:
            try:
                mask = dense_of_selection(idx, count, block, n)[None]
                other = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                row.check_kind = "SDPA, dense mask of the Flex way's selection"
                del mask
            except Exception as exc:
                row.errors.append(f"SDPA check: {first_line(exc)}")
        if other is not None:
            row.diff, row.diff_where = where_max(out_a, other, block)
            if not diff_ok(row, args.tol):
                bar = "!" * 100
                log(f"{bar}\n!!! MISMATCH {row.label} N={n}: max |attndsl - {row.check_kind}| = "
                    f"{row.diff:.3e} > tolerance {args.tol:g}, at {row.diff_where}\n{bar}")
    log(f"    max |attndsl - {row.check_kind or 'check'}| {fmt_e(row.diff)}")
    return row


# ----------------------------------------------------------------------- the semantic check
def check_semantics(case: SelCase, n: int, args) -> dict:
    """At length n (CPU, float32 q and k; a block of n // 16, top-k or p as the case): the Flex
    way's selection as a dense mask against attndsl's float64 reference dense_mask."""
    import torch

    import attndsl

    block = max(1, n // 16)
    params = dict(case.params(n), block=block)
    pat = attndsl.load(os.path.join(ROOT, "examples", case.file))[case.pattern].bind(**params)
    gen = torch.Generator().manual_seed(args.seed + 3 * n + 1)
    q, k = (torch.randn((1, HEADS, n, HEAD_DIM), generator=gen) for _ in range(2))
    idx, count = select_blocks(q, k, case, block, 1.0 / math.sqrt(HEAD_DIM))
    ours = dense_of_selection(idx, count, block, n).numpy()
    theirs = pat.dense_mask(n, n, HEADS, query=q[0].double().numpy(), key=k[0].double().numpy())
    what = ", ".join(f"{a} {b:g}" for a, b in params.items())
    return {"differ": int((ours != theirs).sum()), "pairs": int(ours.size), "what": what}


# ------------------------------------------------------------------------------------ main
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default=None,
                    help=f"comma-separated N (default: {LENGTHS}; --quick: {QUICK_LENGTHS})")
    ap.add_argument("--cases", default="", help="comma-separated cases (default: all; --list)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--quick", action="store_true",
                    help=f"N = {QUICK_LENGTHS} only, 3 timed calls, 5 s budget")
    ap.add_argument("--backend", default=None,
                    help='attndsl backend (default: the call\'s: "triton" on CUDA, "torch" on the CPU); '
                         '"torch" runs on the CPU even where CUDA is available')
    ap.add_argument("--eager", action="store_true", help="eager flex_attention (no torch.compile)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed calls (default: 9 on the CPU, 7 with --quick, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="calls before the timed ones, the first included (default: 1 on the CPU, 3 on CUDA)")
    ap.add_argument("--budget", type=float, default=10.0,
                    help="seconds: no further timed call of one method once they took this long")
    ap.add_argument("--dense-budget", type=float, default=20.0,
                    help="seconds: skip a length whose dense causal call is predicted longer (0: never skip; "
                         "default: %(default)s)")
    ap.add_argument("--flex-block", type=int, default=128,
                    help="the Flex BlockMask's BLOCK_SIZE when it divides the selector's block, else the "
                         "block itself (0: always the block; default: %(default)s)")
    ap.add_argument("--sdpa-max-n", type=int, default=16384,
                    help="largest N for the SDPA dense-mask check used where Flex cannot run")
    ap.add_argument("--mask-n", type=int, default=1024,
                    help="N of the selection check against attndsl's dense_mask (0: skip; "
                         "default: %(default)s)")
    ap.add_argument("--tol", type=float, default=None,
                    help="max |attndsl - Flex way| allowed (default: 1e-4 in float32, 2e-2 in bfloat16)")
    ap.add_argument("--check", action="store_true", help="exit status 1 when a target fails")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", metavar="FILE",
                    help="write the report to FILE; 'auto': bench/results/<date>-<device>-select.md")
    ap.add_argument("--write", metavar="FILE",
                    help="append the report to FILE as a dated section (docs/benchmarks.md)")
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    ap.add_argument("--note", default="", help="a line in the report (machine, load, commit)")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.lengths is None:
        args.lengths = QUICK_LENGTHS if args.quick else LENGTHS
    if args.quick:
        args.reps = 7 if args.reps is None else args.reps
        args.budget = min(args.budget, 5.0)
    return ap, args


def device_slug(on_gpu: bool, info: dict) -> str:
    if on_gpu:
        name = info.get("gpu", "gpu").lower()
        for word in ("nvidia", "tensor core", "-sxm", "sxm", "pcie"):
            name = name.replace(word, " ")
        return "cuda-" + "-".join(name.split())
    return f"cpu-{info['nproc']}core"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap, args = parse(argv)
    if args.list:
        for c in CASES:
            print(f"{c.key:<18} examples/{c.file}:{c.pattern} {c.params(4096)} at N=4096  {c.label(4096)}")
        return 0
    keys = [c for c in args.cases.split(",") if c] or [c.key for c in CASES]
    unknown = [c for c in keys if c not in CASES_BY_KEY]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES_BY_KEY)}")
    try:
        lengths = sorted({int(s) for s in args.lengths.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--lengths takes comma-separated integers, got {args.lengths!r}")

    import torch

    warnings.filterwarnings("ignore", message=".*flex_attention.*")
    on_gpu = torch.cuda.is_available() and args.backend in (None, "triton")
    args.device = torch.device("cuda" if on_gpu else "cpu")
    args.dtype = torch.bfloat16 if on_gpu else torch.float32
    args.backend_name = args.backend or ("triton" if on_gpu else "torch")
    args.reps = args.reps if args.reps is not None else (20 if on_gpu else 9)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    args.tol = args.tol if args.tol is not None else (2e-2 if on_gpu else 1e-4)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    info = machine_info()
    if on_gpu:
        info["gpu"] = torch.cuda.get_device_name()
    info["load"] = [os.getloadavg()[0]]
    threads = torch.get_num_threads()
    t_start = time.perf_counter()

    rows: list[SelRow] = []
    dense: list[DenseRef] = []
    ref = None                          # (n, seconds per dense call) to scale from
    for n in lengths:
        predicted = None
        if args.dense_budget > 0:
            if ref is None:             # a probe: one warm call of each dense method at PROBE_N
                probe = argparse.Namespace(**{**vars(args), "reps": 1, "warmup": 1, "budget": 0.0})
                p = min(n, PROBE_N)
                pd = run_dense(p, probe, lambda m: None)
                ref = (p, max(t for t in (pd.attndsl, pd.sdpa, 1e-6) if t is not None))
            predicted = ref[1] * (n / ref[0]) ** 2
        if predicted is not None and predicted > args.dense_budget:
            why = (f"dense causal predicted {predicted:.0f} s per call > --dense-budget "
                   f"{args.dense_budget:g} s (scaled by N² from N={ref[0]})")
            log(f"N={n}: skipped: {why}")
            d = DenseRef(n, predicted=predicted, skipped=why)
            dense.append(d)
            rows += [SelRow(key, CASES_BY_KEY[key].label(n), n, block=CASES_BY_KEY[key].block_at(n),
                            skipped=why, dense=d) for key in keys]
            continue
        log(f"N={n}")
        d = run_dense(n, args, log)
        d.predicted = predicted
        dense.append(d)
        measured = [t for t in (d.attndsl, d.sdpa) if t is not None]
        if measured:
            ref = (n, max(measured))
        for key in keys:
            case = CASES_BY_KEY[key]
            log(f"  {case.label(n)} N={n}")
            rows.append(run_row(case, n, d, args, log))
    # the selection checks run after the timings: their NumPy reference (float64 BLAS) left
    # the timed calls after it measurably slower on a 2-core machine
    sem = {}
    if args.mask_n:
        for key in keys:
            try:
                sem[key] = check_semantics(CASES_BY_KEY[key], args.mask_n, args)
            except Exception as exc:        # recorded as a failed check
                sem[key] = {"differ": -1, "pairs": 0, "what": f"raised {first_line(exc)}"}
            log(f"selection check {key} N={args.mask_n} ({sem[key]['what']}): "
                f"{sem[key]['differ']} pairs differ")

    info["load"].append(os.getloadavg()[0])
    info["seconds"] = time.perf_counter() - t_start
    log(f"benchmark took {info['seconds']:.0f} s")

    text = report(rows, dense, sem, info, args, threads, on_gpu)
    print(text)
    if args.out:
        path = args.out
        if path == "auto":
            date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d")
            path = os.path.join(HERE, "results", f"{date}-{device_slug(on_gpu, info)}-select.md")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        log(f"wrote {path}")
    if args.write:
        write_section(args.write, text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"info": info, "device": str(args.device), "backend": args.backend_name,
                       "semantics": sem, "dense": [asdict(d) for d in dense],
                       "rows": [{**{k: v for k, v in asdict(r).items() if k != "dense"},
                                 "flex_total": r.flex_total, "vs_causal": r.vs_causal,
                                 "vs_sdpa": r.vs_sdpa, "vs_flex": r.vs_flex} for r in rows]},
                      f, indent=1, default=str)
    failed = (any(s["differ"] != 0 for s in sem.values())
              or any(not diff_ok(r, args.tol) for r in rows)
              or any(r.errors for r in rows) or any(d.errors for d in dense))
    if failed:
        log("a check failed or a method raised: exit status 1 (see Checks and Errors in the report)")
        return 1
    if args.check and failed_targets(rows, on_gpu):
        log("--check: a target failed: exit status 1")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
