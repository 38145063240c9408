"""Benchmark: attndsl's generated Triton forward kernels against FlexAttention and SDPA.

For each pattern and length N (q_len = kv_len = N, B = 1, 16 heads, head_dim 128, bf16, CUDA):

* attndsl: ``pat(q, k, v, backend="triton", **tensors)``, whose first call chooses the tile
  configuration (codegen/autotune.py; recorded per case); its analysis time is the host
  planning of the call on a freshly bound pattern with that configuration
  (``attndsl.runtime.launches``: analysis, residue-class gathers, tile tables on the device:
  what later calls of that size reuse), and its strategy is recorded per launch;
* FlexAttention: ``torch.compile(flex_attention)`` with a BlockMask from
  ``torch.compile(create_block_mask)(mask_mod, 1, 1, N, N, BLOCK_SIZE=128)`` (the mask_mods of
  bench/cases.py); mask construction and compilation are reported apart, not timed;
* SDPA: ``scaled_dot_product_attention`` with ``is_causal`` for causal, a dense boolean
  ``attn_mask`` for the others up to ``--sdpa-max-n`` (32K; the mask alone is N^2 bytes).

Each case first checks attndsl against FlexAttention (max |diff| in bf16), then times the three
(CUDA events, warm-up, median; the L2 is flushed before each call). Effective TFLOP/s count the
kept pairs only: 4 * head_dim * kept / time. Without a GPU: ``--dry-run`` checks every case on
the CPU (mask_mods against attndsl, attndsl's reference against FlexAttention eager), and
``--smoke`` runs this script's GPU path on the CPU at toy sizes (Triton's interpreter, eager Flex).

    .venv/bin/python bench/bench_forward.py --dry-run --smoke  # CPU: check the cases and the script
    python3 bench/bench_forward.py --quick                     # GPU: 8K, 3 patterns
    python3 bench/bench_forward.py --sizes 8192 --json $OUT/fwd_8k.json --deadline 420
    .venv/bin/python bench/bench_forward.py --merge a.json b.json --write docs/benchmarks.md

See bench/README.md for the options and how to run it on the lent GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

NO_CUDA = ("bench_forward.py times CUDA kernels, and this machine has no CUDA device "
           "(torch.cuda.is_available() is False). Run it on a GPU machine; without one, "
           "--dry-run checks the cases and --smoke the script on the CPU.")


# ------------------------------------------------------------------------------------- timing
class Timer:
    """do_bench-style timing: one estimate call, warm-up calls within ``warmup_ms``, then reps
    within ``rep_ms`` (at least ``min_reps``, at most ``max_reps``), each between CUDA events with
    the L2 flushed before it; a call slower than ``slow_s`` is timed once (its estimate). On the
    CPU (--smoke) host clocks replace the events."""

    def __init__(self, args, device):
        import torch

        self.torch, self.args, self.cuda = torch, args, device == "cuda"
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if self.cuda else None

    def _once(self, fn) -> float:
        torch = self.torch
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush.zero_()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def __call__(self, fn) -> dict:
        a = self.args
        sync(self.cuda)
        est = self._once(fn)
        if est > a.slow_s * 1e3:
            return {"ms": est, "reps": 1, "spread": 0.0}
        for _ in range(min(50, int(a.warmup_ms / max(est, 1e-3)))):
            self._once(fn)
        reps = max(a.min_reps, min(a.max_reps, int(a.rep_ms / max(est, 1e-3))))
        times = [self._once(fn) for _ in range(reps)]
        dec = statistics.quantiles(times, n=10) if reps > 1 else [times[0]] * 9
        return {"ms": statistics.median(times), "reps": reps, "spread": (dec[8] - dec[0]) / 2}


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def sync_time(fn, cuda: bool):
    """(result, seconds) of one call, the device synchronized on both sides."""
    sync(cuda)
    t0 = time.perf_counter()
    out = fn()
    sync(cuda)
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def host_work_cached(pat):
    """Diagnostic only: while open, the analysis of ``pat``'s calls (attndsl.analysis.api
    ``describe``, not cached for calls with tensor inputs) is memoised and the per-call index
    check (attndsl.runtime ``check_indices``, O(N^2) on the CPU) is skipped, so that a call of a
    pattern with tensor inputs costs about its kernel. The inputs never change inside it."""
    import attndsl.runtime as runtime
    from attndsl.analysis import api

    memo: dict = {}
    original, check = api.describe, runtime.check_indices

    def describe(pattern, *sizes, **kwargs):
        key = (pattern.key, sizes[:5])              # the tensor inputs never change inside
        if key not in memo:
            memo[key] = original(pattern, *sizes, **kwargs)
        return memo[key]

    api.describe, runtime.check_indices = describe, (lambda grids: None)
    try:
        yield
    finally:
        api.describe, runtime.check_indices = original, check


def host_check_s(case, n: int, heads: int) -> float:
    """Predicted seconds of attndsl's per-call index check at N (timed at <= 8192, x N^2)."""
    from attndsl.ir import Op
    from attndsl.reference import check_indices

    pat = case.load()
    if not pat.ir.mask.uses(Op.INDEX):
        return 0.0
    m = min(n, 8192)
    t0 = time.perf_counter()
    check_indices(pat.grids((1, heads, heads, m, m), None, None, 1.0, case.inputs(m)))
    return (time.perf_counter() - t0) * (n / m) ** 2


# ----------------------------------------------------------------------------------- one case
def run_case(fwd, n: int, args, timer, log) -> dict:
    import forward_cases as fc
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev, cuda = args.device, args.device == "cuda"
    H, D = args.heads, args.head_dim
    row = {"pattern": fwd.key, "label": fwd.label, "n": n, "heads": H, "head_dim": D, "errors": []}
    case = fc.case_of(fwd.key)

    def step(name, fn):
        try:
            return fn()
        except Exception as exc:        # recorded, and the case goes on without it
            row["errors"].append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            log(f"    {name} failed: {row['errors'][-1]}")
            if cuda:
                torch.cuda.empty_cache()
            return None

    # attndsl: the first call (autotuning on its first key, Triton's JIT), the configuration it
    # chose, then the analysis with that tile shape on a freshly bound pattern
    pat = case.load()
    tensors = case.inputs(n)
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = fc.make_qkv(n, H, D, dtype, dev, args.seed + n)
    given = {name: torch.as_tensor(a, device=dev) for name, a in tensors.items()}
    backend = "triton" if cuda else "triton-interpret"

    def call():
        return pat(q, k, v, backend=backend, **given)

    with host_work_cached(pat) if given else contextlib.nullcontext():
        got = step("attndsl first call", lambda: sync_time(call, cuda))
    out_a = None
    if got is not None:
        out_a, row["attndsl_first_s"] = got
    config = record_config(row, pat, q, k, v, not cuda)
    fresh = case.load()
    from attndsl import caches
    from attndsl.runtime import launches

    def host_plan():        # analysis, gathers, tile tables on the device: all but the kernels
        caches.clear()                          # cold: analysed and planned again
        planned, _ = launches(fresh.bound(), q, k, v, D ** -0.5, given, config=config)
        if cuda:
            torch.cuda.synchronize()
        return planned

    t0 = time.perf_counter()
    planned = step("attndsl planning", host_plan)
    row["attndsl_analysis_ms"] = (time.perf_counter() - t0) * 1e3
    if planned is not None:
        row["strategy"] = "+".join(
            ("gather" if launch.constants["STEP_K"] > 1 else "tiles")
            + ("/band" if launch.constants["BAND"] else "/lists") for launch in planned)
    desc = fresh.describe(n, n, H, config.block, **tensors)
    row["tile_list_mib"] = fc.tile_list_bytes(desc) / 2 ** 20
    row["tiles_nonempty"] = float((desc.block_map != 0).mean())
    if planned is not None and not args.no_redo:
        time_redo(row, planned, not cuda, timer, step)
    del desc, planned

    # FlexAttention: mask construction (the first call compiles it), then the compiled kernel
    mask_mod = fc.mask_mod_for(fwd.key, n, dev)
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    block_mask = torch.compile(create_block_mask) if cuda else create_block_mask

    def make_mask():
        return block_mask(mask_mod, 1, 1, n, n, device=dev, BLOCK_SIZE=fc.MASK_BLOCK)

    got = step("Flex create_block_mask", lambda: sync_time(make_mask, cuda))
    out_f = bm = None
    if got is not None:
        row["flex_mask_first_s"] = got[1]
        bm, second = sync_time(make_mask, cuda)
        row["flex_mask_ms"] = second * 1e3

        def flex_call():
            return flex(q, k, v, block_mask=bm)

        got = step("Flex first call", lambda: sync_time(flex_call, cuda))
        if got is not None:
            out_f, row["flex_first_s"] = got

    # correctness, before any timing
    row["check"] = "not run"
    if out_a is not None and out_f is not None:
        diff = out_a.float() - out_f.float()
        row["max_abs_diff"] = float(diff.abs().max().item())
        row["rel_l2"] = float((diff.norm() / out_f.float().norm()).item())
        row["check"] = "ok" if row["max_abs_diff"] <= args.tol else "FAIL"   # NaN fails
        if row["check"] == "FAIL":      # where: (head, query row) of the largest difference
            worst = int(diff.nan_to_num(float("inf")).abs().amax(-1).flatten().argmax().item())
            row["errors"].append(f"check: largest |diff| at head {worst // n}, query row {worst % n}")
        del diff
    row["kept_pairs"] = H * fc.count_pairs(mask_mod, n, dev)

    # timings
    if out_a is not None:
        del out_a
        predicted = host_check_s(case, n, H) if given else 0.0
        if predicted > args.max_call_s:
            row["attndsl_skipped"] = f"~{predicted:.0f} s per call predicted (host index check)"
        else:
            row["attndsl"] = step("attndsl timing", lambda: timer(call))
        if given:
            with host_work_cached(pat):
                row["attndsl_cached"] = step("attndsl timing (host work cached)", lambda: timer(call))
    if out_f is not None:
        row["flex"] = step("Flex timing", lambda: timer(flex_call))
    if not args.no_sdpa:
        run_sdpa(row, fwd.key, n, (q, k, v), out_f, mask_mod, args, timer, step)
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return row


def time_redo(row, planned, interpret: bool, timer, step) -> None:
    """The cost of the non-finite machinery (docs/kernels.md, "Non-finite values"): the main
    launches alone (``attndsl_main``), the SAFE_V launches whose programs read their flag and
    exit (``attndsl_redo_none``: what every call adds), and the SAFE_V launches with every flag
    set (``attndsl_redo_all``: a call whose every program met a non-finite value)."""
    fns = [launch.kernel[launch.grid] for launch in planned]

    def launch_all(safe: bool):
        for fn, launch in zip(fns, planned):
            fn(*launch.args, **{**launch.constants, "SAFE_V": safe}, **launch.options)

    def redo_all():
        for launch in planned:
            launch.args[5].fill_(1)
        launch_all(True)

    row["attndsl_main"] = step("attndsl main launches", lambda: timer(lambda: launch_all(False)))
    row["attndsl_redo_none"] = step("attndsl redo launches (no flag)",
                                    lambda: timer(lambda: launch_all(True)))
    row["attndsl_redo_all"] = step("attndsl redo launches (every flag)", lambda: timer(redo_all))


def record_config(row, pat, q, k, v, interpret: bool):
    """The tile configuration attndsl's calls use (codegen/autotune.py), into the row:
    ``config`` (its label), ``config_source`` (tuned, or why the default) and, when tuned,
    ``autotune`` (ms per candidate, skipped ones). Returns the Config."""
    from attndsl.codegen import autotune
    from attndsl.codegen.config import DEFAULT_CONFIG

    found = autotune.lookup(pat.bound(), q, k, v, interpret)
    entry = autotune.stored_entry(pat.bound(), q, k, v, interpret)
    if found is None:
        found, source = DEFAULT_CONFIG, "default: not tuned (autotune not called?)"
    elif entry is not None and autotune.config_of(entry) == found:
        source = "tuned"
        row["autotune"] = {"ms": entry.get("ms", {}), "skipped": entry.get("skipped", {})}
    elif not autotune.enabled():
        source = f"default: {autotune.ENV}=0"
    else:
        source = "default: interpreter" if interpret else "default"
    row["config"], row["config_source"] = autotune.label(found), source
    return found


def run_sdpa(row, key, n, qkv, out_f, mask_mod, args, timer, step):
    import forward_cases as fc
    import torch
    import torch.nn.functional as F

    mask = None
    if key != "causal":
        need = 3 * n * n            # the bool mask, and the bf16 bias SDPA makes of it
        free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else need * 2
        if n > args.sdpa_max_n or need > 0.6 * free:
            why = f"N > --sdpa-max-n {args.sdpa_max_n}" if n > args.sdpa_max_n else \
                f"only {free / 2 ** 30:.0f} GiB free"
            row["sdpa_skipped"] = (f"its dense mask needs {n * n / 2 ** 30:.1f} GiB as bool and "
                                   f"{2 * n * n / 2 ** 30:.1f} GiB more as SDPA's bf16 bias ({why})")
            return
        mask = step("SDPA dense mask", lambda: fc.dense_mask(mask_mod, n, args.device))
        if mask is None:
            return

    def sdpa():
        if mask is None:
            return F.scaled_dot_product_attention(*qkv, is_causal=True)
        return F.scaled_dot_product_attention(*qkv, attn_mask=mask)

    out = step("SDPA first call", sdpa)
    if out is None:
        return
    if out_f is not None:       # a cross-check of the mask_mod's dense form, not a target
        row["sdpa_vs_flex"] = float((out.float() - out_f.float()).abs().max().item())
    del out
    row["sdpa"] = step("SDPA timing", lambda: timer(sdpa))


# --------------------------------------------------------------------------------------- main
def meta_info(args, argv) -> dict:
    import torch
    import triton
    from attndsl.codegen import autotune

    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = (f"{torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs, "
                  f"{props.total_memory / 2 ** 30:.0f} GiB)")
    else:
        device = f"CPU ({platform.processor() or platform.machine()}), --smoke: no GPU, numbers mean nothing"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "tiles": tiles_note(autotune, args.device == "cuda"), "commit": commit, "heads": args.heads,
            "head_dim": args.head_dim, "dtype": "bf16" if args.device == "cuda" else "fp32",
            "command": " ".join(["python", "bench/bench_forward.py"] + argv), "tol": args.tol,
            "sdpa_max_n": args.sdpa_max_n, "not_run": []}


def tiles_note(autotune, cuda: bool) -> str:
    """How attndsl's tile configuration is chosen in this run (the report's header)."""
    if not autotune.enabled():
        return f"default configuration ({autotune.ENV}=0)"
    if not cuda:
        return "default configuration (interpreter: not tuned)"
    return (f"autotuned per case (budget {autotune.budget_seconds():g} s; results in "
            f"{autotune.store_path()})")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--sizes", default="8192,32768,131072", help="comma-separated N (default: %(default)s)")
    add("--patterns", default="", help="comma-separated cases (default: all nine; --list)")
    add("--quick", action="store_true", help="N = 8192 and causal, dilated_256_4, packed_16_docs")
    add("--list", action="store_true", help="list the cases and exit")
    add("--dry-run", action="store_true", help="check every case on the CPU (no GPU needed)")
    add("--no-interpret", action="store_true", help="dry run: skip the triton-interpret kernel")
    add("--smoke", action="store_true", help="run the GPU path on the CPU: N = 256, 2 heads, d 64, "
        "fp32, Triton's interpreter, eager Flex (checks the script; times mean nothing)")
    add("--write", metavar="FILE", help="append the report to FILE as a dated section")
    add("--note", default="", help="a line added to the report (load, machine)")
    add("--json", metavar="FILE", help="also save the raw rows, after every case (for --merge)")
    add("--merge", nargs="+", metavar="JSON", help="report rows saved by --json (no GPU needed)")
    add("--deadline", type=float, default=0.0, help="seconds: start no case after this many")
    add("--tol", type=float, default=2e-2, help="max |attndsl - Flex| (default: %(default)s)")
    add("--warmup-ms", type=float, default=100.0, help="warm-up budget (default: %(default)s)")
    add("--rep-ms", type=float, default=500.0, help="timed-calls budget (default: %(default)s)")
    add("--min-reps", type=int, default=3, help="(default: %(default)s)")
    add("--max-reps", type=int, default=50, help="(default: %(default)s)")
    add("--slow-s", type=float, default=5.0, help="a call slower than this is timed once")
    add("--max-call-s", type=float, default=20.0,
        help="don't time attndsl when its host index check is predicted longer (document mask)")
    add("--sdpa-max-n", type=int, default=32768, help="largest N for SDPA's dense mask")
    add("--no-sdpa", action="store_true", help="leave SDPA out")
    add("--no-redo", action="store_true", help="don't time the non-finite machinery's launches")
    add("--seed", type=int, default=0, help="q, k, v are drawn with seed + N")
    args = ap.parse_args(argv)
    args.device, args.heads, args.head_dim = "cuda", 16, 128
    if args.smoke:
        args.device, args.heads, args.head_dim = "cpu", 2, 64
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if (args.dry_run and not args.no_interpret) or args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")      # before anything imports triton
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
    try:
        import torch
    except ImportError:
        print("bench_forward.py needs torch.", file=sys.stderr)
        return 2
    import forward_cases as fc

    fc.ensure_attndsl()
    keys = list(fc.QUICK) if args.quick else [k for k in args.patterns.split(",") if k] or \
        [c.key for c in fc.FORWARD]
    unknown = [k for k in keys if k not in fc.FORWARD_BY_KEY]
    if unknown:
        print(f"unknown pattern(s) {', '.join(unknown)}; --list names them", file=sys.stderr)
        return 2
    sizes = [8192] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    if args.list:
        for c in fc.FORWARD:
            print(f"{c.key:18s} {c.label}")
        return 0
    if args.merge:
        data = []
        for path in args.merge:
            with open(path, encoding="utf-8") as f:
                data.append(json.load(f))
        merged = {(r["pattern"], r["n"]): r for d in data for r in d["rows"]}
        done = {f"{k}@{n}" for k, n in merged}
        meta = dict(data[0]["meta"], not_run=[x for d in data for x in d["meta"].get("not_run", [])
                                              if x not in done])
        meta["command"] = "`; `".join(dict.fromkeys(d["meta"]["command"] for d in data))
        devices = sorted({d["meta"]["device"] for d in data})
        note = args.note + (f" Merged from several devices: {devices}." if len(devices) > 1 else "")
        return emit(list(merged.values()), meta, note, args)
    status = 0
    if args.dry_run:
        log(f"dry run on the CPU: {len(keys)} case(s); rows sampled at N = {sizes}")
        problems = fc.dry_run(keys, sizes, log, interpret=not args.no_interpret)
        log("dry run: all checks passed" if not problems else f"dry run: {len(problems)} problem(s)")
        status = 1 if problems else 0
        if not args.smoke:
            return status
    if args.smoke:
        sizes = [256]
    elif not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    meta = meta_info(args, argv)
    log(f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}")
    timer, rows, start = Timer(args, args.device), [], time.perf_counter()
    for n in sizes:
        for key in keys:
            if args.deadline and time.perf_counter() - start > args.deadline:
                meta["not_run"].append(f"{key}@{n}")
                continue
            t0 = time.perf_counter()
            log(f"{key} N={n} ...")
            try:
                row = run_case(fc.FORWARD_BY_KEY[key], n, args, timer, log)
            except Exception as exc:        # recorded; the next case still runs
                row = {"pattern": key, "n": n, "heads": args.heads, "head_dim": args.head_dim,
                       "check": "not run", "errors": [f"{type(exc).__name__}: {exc}"[:300]]}
                log(f"  failed: {row['errors'][0]}")
            rows.append(row)
            log(f"  attndsl {fc.f_ms(fc.ms(row, 'attndsl'))} ms, Flex {fc.f_ms(fc.ms(row, 'flex'))} ms, "
                f"SDPA {fc.f_ms(fc.ms(row, 'sdpa'))} ms, check {row['check']} (max |diff| "
                f"{row.get('max_abs_diff', float('nan')):.2e}); {time.perf_counter() - t0:.0f} s")
            if args.json:       # after every case: a run killed at its time limit keeps its rows
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
    bad = emit(rows, meta, args.note, args)
    if meta["not_run"]:
        left = [k for k in keys if any(x.startswith(k + "@") for x in meta["not_run"])]
        left_n = sorted({int(x.rsplit("@", 1)[1]) for x in meta["not_run"]})
        log(f"deadline: {len(meta['not_run'])} case(s) not run; run them with --sizes "
            f"{','.join(map(str, left_n))} --patterns {','.join(left)}, then --merge the JSON files")
    if args.smoke and any(r["errors"] or r["check"] != "ok" for r in rows):
        log("smoke: the GPU path failed on the CPU (see the errors above)")
        return 1
    return max(status, bad)


def emit(rows, meta, note, args) -> int:
    """Print the report (and append it to --write); 1 if an output check failed."""
    import forward_cases as fc

    text = fc.report(rows, meta, note)
    print(text)
    if args.write:
        fc.write_section(args.write, text)
    return 1 if any(r.get("check") == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
