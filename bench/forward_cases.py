"""The forward benchmark's cases (bench_forward.py), the checks that need no GPU, the report.

The nine patterns of the issue "Generated Triton forward kernels" (item 6), taken from
bench/cases.py (example file, parameters, demo tensors and the hand-written FlexAttention
``mask_mod``); helpers that evaluate a ``mask_mod`` row block by row block on any device (kept-pair
counts, SDPA's dense boolean mask); and ``dry_run``, which builds every case on the CPU and checks
the mask_mods and attndsl against each other before anyone spends GPU time; and the Markdown
report of measured rows (also used by ``--merge``, which needs no GPU).

Import this module only after :func:`ensure_attndsl` (bench_forward.py does): on the GPU machine
``python3`` has torch and triton but not this checkout's editable install.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

HEADS = 16
HEAD_DIM = 128
SIZES = (8192, 32768, 131072)
MASK_BLOCK = 128                    # FlexAttention's BLOCK_SIZE
PAIRS_PER_CHUNK = 1 << 26           # mask_mod pairs evaluated at once (int64 temporaries: 512 MiB)

LARK_HELP = """attndsl needs the 'lark' package, which this Python does not have.
On the GPU machine, carry it as a wheel: here, in the repository root,
    echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl lark==1.3.1
then name .whl in carry and start the command with
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site;"""


def ensure_attndsl() -> None:
    """Make ``import attndsl`` work from this checkout on a bare interpreter.

    pyproject.toml maps the packages ``attndsl.codegen`` and ``attndsl.grammar`` to the folders
    codegen/ and grammar/; without an (editable) install they are registered here from those
    folders. Exits with status 2 and instructions when lark is missing."""
    if importlib.util.find_spec("lark") is None:
        print(LARK_HELP, file=sys.stderr)
        raise SystemExit(2)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import attndsl

    for sub, folder in (("grammar", "grammar"), ("codegen", "codegen")):
        name = f"attndsl.{sub}"
        try:
            if importlib.util.find_spec(name) is not None:
                continue
        except ModuleNotFoundError:
            pass
        path = os.path.join(ROOT, folder)
        spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(attndsl, sub, module)


@dataclass(frozen=True)
class FwdCase:
    key: str                        # the case of bench/cases.py
    label: str                      # the name for it
    flex_bound: float | None = None  # a stricter target than 0.9x FlexAttention (dilated, strided)
    sdpa_bound: float | None = None  # target: attndsl <= sdpa_bound x SDPA (causal only)


FORWARD = [
    FwdCase("causal", "causal", sdpa_bound=1.3),
    FwdCase("sliding_1024", "sliding window 1024"),
    FwdCase("streaming_4_1024", "sinks 4 + window 1024"),
    FwdCase("longformer_512_64", "Longformer (w 512, g 64)"),
    FwdCase("bigbird", "BigBird (block 64, 1 window, 2 global, 3 random blocks)"),
    FwdCase("dilated_256_4", "dilated (256, 4)", flex_bound=0.3),
    FwdCase("strided_128", "Sparse Transformer strided 128", flex_bound=0.3),
    FwdCase("chunked_8192", "chunked 8192 (causal)"),
    FwdCase("packed_16_docs", "document mask (16 docs, causal)"),
]
FORWARD_BY_KEY = {c.key: c for c in FORWARD}
QUICK = ("causal", "dilated_256_4", "packed_16_docs")


def case_of(key: str):
    from cases import CASES_BY_KEY

    return CASES_BY_KEY[key]


# ------------------------------------------------------------------------ mask_mod evaluation
class TorchOn:
    """The torch module, except that ``from_numpy`` puts the array on ``device``: the mask_mod
    makers of bench/cases.py build their lookup tables (BigBird's random blocks, the document
    ids) with ``torch.from_numpy`` from the module they are given."""

    def __init__(self, device):
        import torch

        self._torch, self._device = torch, device

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def from_numpy(self, array):
        import numpy as np

        return self._torch.from_numpy(np.ascontiguousarray(array)).to(self._device)


def mask_mod_for(key: str, n: int, device):
    return case_of(key).flex(n, HEADS, TorchOn(device))


def mask_rows(mask_mod, rows, n: int, device):
    """bool [len(rows), n]: mask_mod at (b 0, h 0, q = rows, kv = 0..n-1)."""
    import torch

    zero = torch.zeros((), dtype=torch.int64, device=device)
    q = torch.as_tensor(rows, dtype=torch.int64, device=device)[:, None]
    kv = torch.arange(n, dtype=torch.int64, device=device)[None, :]
    return torch.broadcast_to(mask_mod(zero, zero, q, kv), (q.shape[0], n))


def row_blocks(n: int):
    step = max(1, PAIRS_PER_CHUNK // max(1, n))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def count_pairs(mask_mod, n: int, device) -> int:
    """Allowed (q, k) pairs of one head (none of the benchmark's mask_mods reads h)."""
    import torch

    total = 0
    for lo, hi in row_blocks(n):
        total += int(mask_rows(mask_mod, torch.arange(lo, hi), n, device).sum().item())
    return total


def dense_mask(mask_mod, n: int, device):
    """bool [n, n] (SDPA's attn_mask), filled row block by row block."""
    import torch

    out = torch.empty((n, n), dtype=torch.bool, device=device)
    for lo, hi in row_blocks(n):
        out[lo:hi] = mask_rows(mask_mod, torch.arange(lo, hi), n, device)
    return out


def make_qkv(n: int, heads: int, d: int, dtype, device, seed: int):
    """Fresh standard-normal q, k, v [1, heads, n, d] (never zeros: they hide indexing bugs)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn((1, heads, n, d), generator=gen, device=device, dtype=torch.float32)
                 .to(dtype) for _ in range(3))


def sample_rows(n: int, seed: int = 0):
    """Query rows for a mask check at length n: the ends, both sides of the boundaries the nine
    patterns have (64, 128, 512, 1024, 8192, n/2) and 24 random rows."""
    import numpy as np

    rows = {0, 1, 2, n - 2, n - 1}
    for m in (64, 128, 256, 512, 1024, 4096, 8192, n // 2):
        rows.update((m - 1, m, m + 1))
    rows.update(np.random.default_rng(seed).integers(0, n, 24).tolist())
    return sorted(r for r in rows if 0 <= r < n)


# ------------------------------------------------------------------------------- dry run (CPU)
def tile_list_bytes(desc) -> int:
    """Bytes of tile lists that one kernel call copies to the device (codegen/kernel.py pads the
    full and the partial lists to one width)."""
    t = desc.tiles
    width = max(t.full_idx.shape[-1], t.partial_idx.shape[-1])
    rows = t.full_idx.shape[0] * t.full_idx.shape[1]
    return t.full_num.nbytes + t.partial_num.nbytes + 2 * rows * width * t.full_idx.itemsize


def _tile_stats(desc) -> str:
    import numpy as np

    nonempty = float(np.mean(desc.block_map != 0))
    return f"{100 * nonempty:.1f}% tiles non-empty, {tile_list_bytes(desc) / 2 ** 10:.0f} KiB tile lists"


GPU_CAPABILITY = (9, 0)             # the lent GPUs (H100, H200): sm90, 227 KiB shared memory
GPU_SMEM = 227 * 1024


def tuning_blocks(n: int) -> list[tuple[int, int]]:
    """The tile shapes autotuning may try for the benchmark's calls at length n on the lent GPUs
    (codegen/autotune.py candidates for bf16, head_dim 128, sm90), prior's first."""
    import torch
    from attndsl.codegen import autotune

    found = autotune.candidates(n, n, HEAD_DIM, HEAD_DIM, torch.bfloat16, GPU_CAPABILITY, GPU_SMEM)
    return list(dict.fromkeys(c.block for c in found))


def check_build(key: str, n: int) -> tuple[list[str], str]:
    """Every CPU-side piece of a case at length n: the bound pattern, its tensor inputs, the
    analysis with every tile shape autotuning may try on the GPU (:func:`tuning_blocks`), the
    generated hooks, q/k/v, the mask_mod, Flex's BlockMask, and the mask_mod against attndsl's
    dense mask on every pair."""
    import numpy as np
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    problems = []
    case = case_of(key)
    pat = case.load()
    tensors = case.inputs(n)
    blocks = tuning_blocks(n)
    descs = [pat.describe(n, n, HEADS, block, **tensors) for block in blocks]
    desc = descs[0]
    if "def mask_hook" not in pat.triton_source():
        problems.append(f"{key}: generated source has no mask_hook")
    q, k, v = make_qkv(n, HEADS, HEAD_DIM, torch.bfloat16, "cpu", 0)
    mask_mod = mask_mod_for(key, n, "cpu")
    create_block_mask(mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=MASK_BLOCK)
    ours = pat.dense_mask(n, n, 1, **tensors)[0]
    theirs = dense_mask(mask_mod, n, "cpu").numpy()
    bad = int(np.count_nonzero(ours != theirs))
    if bad:
        problems.append(f"{key} at N={n}: mask_mod and attndsl differ on {bad} pairs")
    kept = count_pairs(mask_mod, n, "cpu")
    if kept != int(ours.sum()):
        problems.append(f"{key} at N={n}: count_pairs {kept} != dense count {int(ours.sum())}")
    for block, d in zip(blocks, descs):
        if d.block_map.shape[1:] != (-(-n // block[0]), -(-n // block[1])):
            problems.append(f"{key} at N={n}: block map {d.block_map.shape} for tiles {block}")
    shapes = ", ".join("{}x{}".format(*b) for b in blocks)
    return problems, (f"{_tile_stats(desc)} at {blocks[0][0]}x{blocks[0][1]} (described at {shapes}), "
                      f"kept {100 * kept / n / n:.1f}%")


def check_rows(key: str, n: int) -> list[str]:
    """The mask_mod against attndsl's interpreter on sampled rows at a benchmark length."""
    import numpy as np

    from attndsl.inputs import tensor_inputs

    case = case_of(key)
    pat = case.load()
    tensors = tensor_inputs(pat.ir, case.inputs(n), None)[0]
    grid = pat.grid(n, n, 1, 1, tensors)
    rows = np.asarray(sample_rows(n))
    ours = np.asarray(grid.mask(np.arange(1), rows, np.arange(n)))[0]
    theirs = mask_rows(mask_mod_for(key, n, "cpu"), rows, n, "cpu").numpy()
    bad = np.argwhere(ours != theirs)
    if len(bad):
        i, j = bad[0]
        return [f"{key} at N={n}: mask_mod and attndsl differ on {len(bad)} sampled pairs, "
                f"first at q={rows[i]}, k={j} (attndsl {ours[i, j]}, mask_mod {theirs[i, j]})"]
    return []


def check_numbers(key: str, n: int, heads: int, d: int, tol: float, interpret: bool):
    """attndsl's reference (float64) against FlexAttention eager and SDPA on the CPU in fp32;
    with ``interpret``, the generated kernel under Triton's interpreter too. (problems, text)"""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    case = case_of(key)
    pat = case.load()
    tensors = case.inputs(n)
    q, k, v = make_qkv(n, heads, d, torch.float32, "cpu", 1)
    ref, _lse = pat.reference(q, k, v, **tensors)
    mask_mod = mask_mod_for(key, n, "cpu")
    bm = create_block_mask(mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=MASK_BLOCK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = {"flex": flex_attention(q, k, v, block_mask=bm)}
    if key == "causal":
        outs["sdpa"] = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        outs["sdpa"] = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(mask_mod, n, "cpu"))
    if interpret:
        given = {name: torch.as_tensor(a) for name, a in tensors.items()}
        outs["kernel"] = pat(q, k, v, backend="triton-interpret", **given)
    problems, parts = [], []
    for name, out in outs.items():
        diff = float(np.max(np.abs(out.double().numpy() - ref)))
        parts.append(f"{name} {diff:.1e}")
        if not diff <= tol:                 # NaN fails too
            problems.append(f"{key} at N={n}: {name} differs from attndsl's reference by {diff:.2e}")
    return problems, "max |diff| vs reference: " + ", ".join(parts)


def dry_run(keys, sizes, log, build_n=1024, tiny_n=256, interpret=True) -> list[str]:
    """Run every check on the CPU; returns the problems found (empty: all passed)."""
    problems: list[str] = []
    for key in keys:
        t0 = time.perf_counter()
        found, text = check_build(key, build_n)
        for n in sizes:
            found += check_rows(key, n)
        more, numbers = check_numbers(key, tiny_n, 2, 64, 1e-4, interpret)
        found += more
        problems += found
        log(f"  {key:18s} {'ok ' if not found else 'BAD'} N={build_n}: {text}; N={tiny_n}, 2 heads, "
            f"d 64, fp32, {numbers}; rows sampled at N={','.join(map(str, sizes))} "
            f"({time.perf_counter() - t0:.1f} s)")
        for p in found:
            log(f"    {p}")
    return problems


# ------------------------------------------------------------------------------- the report
def tflops(row, which):
    t = row.get(which)
    if not t or not row.get("kept_pairs"):
        return None
    return 4 * row["head_dim"] * row["kept_pairs"] / (t["ms"] * 1e-3) / 1e12


def ms(row, which):
    t = row.get(which)
    return t["ms"] if t else None


def targets(row, fwd) -> list[tuple[str, bool | None]]:
    """[(target, met)]: met is None when a side is missing."""
    ok = row.get("check") == "ok"
    a, f, s = ms(row, "attndsl"), ms(row, "flex"), ms(row, "sdpa")
    def met(other, bound):
        return None if a is None or other is None else ok and a <= bound * other

    out = [("<= 0.9x Flex", met(f, 0.9))]
    if fwd.flex_bound is not None:
        out.append((f"<= {fwd.flex_bound}x Flex", met(f, fwd.flex_bound)))
    if fwd.sdpa_bound is not None:
        out.append((f"<= {fwd.sdpa_bound}x SDPA", met(s, fwd.sdpa_bound)))
    return out


def f_ms(x):
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def f_s(x):
    return "—" if x is None else f"{x:.2f} s"


def target_cell(row, fwd):
    return "; ".join(f"{name}: {'—' if met is None else ('met' if met else 'not met')}"
                     for name, met in targets(row, fwd))


def config_cell(row) -> str:
    """The tile configuration of a row and how it was chosen (rows from before autotuning have
    none)."""
    if not row.get("config"):
        return "—"
    tuned = row.get("autotune")
    if row.get("config_source") == "tuned" and tuned:
        return f"{row['config']} (best of {len(tuned.get('ms', {}))} timed)"
    return f"{row['config']} ({row.get('config_source', '?')})"


def tables(rows) -> str:
    main = ["| pattern | N | attndsl ms | Flex ms | SDPA ms | attndsl/Flex | attndsl TFLOP/s | "
            "attndsl analysis ms | Flex mask ms (first call, compiling) | check | targets |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    more = ["| pattern | N | kept pairs | attndsl tiles non-empty | tile lists / call | "
            "attndsl first call | Flex first call (compile) | Flex TFLOP/s | SDPA TFLOP/s | "
            "max abs diff vs Flex | rel L2 | attndsl ms, host work cached | attndsl tiles | strategy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fwd = FORWARD_BY_KEY[r["pattern"]]
        a, f, s = ms(r, "attndsl"), ms(r, "flex"), ms(r, "sdpa")
        a_cell = f_ms(a) if a is not None else ("skipped" if r.get("attndsl_skipped") else "—")
        s_cell = f_ms(s) if s is not None else ("skipped" if r.get("sdpa_skipped") else "—")
        ratio = f"{a / f:.2f}x" if a and f else "—"
        tf = tflops(r, "attndsl")
        mask = (f"{f_ms(r.get('flex_mask_ms'))} ({f_s(r.get('flex_mask_first_s'))})"
                if r.get("flex_mask_ms") is not None else "—")
        main.append(f"| {r['pattern']} | {r['n']} | {a_cell} | {f_ms(f)} | {s_cell} | {ratio} | "
                    f"{'—' if tf is None else f'{tf:.1f}'} | {f_ms(r.get('attndsl_analysis_ms'))} | "
                    f"{mask} | {r.get('check', '—')} | {target_cell(r, fwd)} |")
        kept = r.get("kept_pairs")
        kept_cell = f"{100 * kept / (r['heads'] * r['n'] ** 2):.2f}%" if kept else "—"
        tfl, tsd = tflops(r, "flex"), tflops(r, "sdpa")
        diff = r.get("max_abs_diff")
        tiles = "—" if r.get("tiles_nonempty") is None else f"{100 * r['tiles_nonempty']:.1f}%"
        lists = "—" if r.get("tile_list_mib") is None else f"{r['tile_list_mib']:.1f} MiB"
        more.append(f"| {r['pattern']} | {r['n']} | {kept_cell} | {tiles} | {lists} | "
                    f"{f_s(r.get('attndsl_first_s'))} | "
                    f"{f_s(r.get('flex_first_s'))} | {'—' if tfl is None else f'{tfl:.1f}'} | "
                    f"{'—' if tsd is None else f'{tsd:.1f}'} | {'—' if diff is None else f'{diff:.2e}'} | "
                    f"{'—' if r.get('rel_l2') is None else format(r['rel_l2'], '.1e')} | "
                    f"{f_ms(ms(r, 'attndsl_cached'))} | {config_cell(r)} | {r.get('strategy', '—')} |")
    text = "\n".join(main) + "\n\nDetails and one-time costs:\n\n" + "\n".join(more)
    return text + redo_table(rows)


def redo_table(rows) -> str:
    """The non-finite machinery (docs/kernels.md): main launches, the SAFE_V launches every
    call adds (programs read their flag and exit), and the SAFE_V launches with every flag set."""
    lines = ["| pattern | N | main launches ms | redo launch, no flag ms | overhead | "
             "redo launch, every flag ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        main, none, every = ms(r, "attndsl_main"), ms(r, "attndsl_redo_none"), ms(r, "attndsl_redo_all")
        if main is None:
            continue
        share = f"{100 * none / main:.1f}%" if none is not None and main else "—"
        lines.append(f"| {r['pattern']} | {r['n']} | {f_ms(main)} | {f_ms(none)} | {share} | "
                     f"{f_ms(every)} |")
    if len(lines) == 2:
        return ""
    return "\n\nNon-finite values (the redo launch; docs/kernels.md):\n\n" + "\n".join(lines)


def summary(rows) -> list[str]:
    tally: dict = {}
    for r in rows:
        for name, met in targets(r, FORWARD_BY_KEY[r["pattern"]]):
            t = tally.setdefault(name, [0, 0, 0, []])
            t[0 if met else (2 if met is None else 1)] += 1
            if met is False:
                t[3].append(f"{r['pattern']}@{r['n']}")
    out = []
    for name, (met, missed, unknown, which) in tally.items():
        line = f"- `{name}`: met on {met} of {met + missed + unknown} rows"
        line += f" (not met: {', '.join(which)})" if missed else ""
        line += f"; {unknown} not measured" if unknown else ""
        out.append(line)
    return out


def notes(rows) -> list[str]:
    out = []
    for r in rows:
        tag = f"{r['pattern']} at N={r['n']}"
        for e in r.get("errors", []):
            out.append(f"- {tag}: {e}")
        if r.get("attndsl_skipped"):
            out.append(f"- {tag}: attndsl not timed: {r['attndsl_skipped']}")
        if r.get("sdpa_skipped"):
            out.append(f"- {tag}: SDPA not run: {r['sdpa_skipped']}")
        if (r.get("sdpa_vs_flex") or 0) > 2e-2:
            out.append(f"- {tag}: SDPA's output differs from Flex's by {r['sdpa_vs_flex']:.2e}")
        for which in ("attndsl", "attndsl_cached", "flex", "sdpa"):
            t = r.get(which)
            if t and t["reps"] == 1:
                out.append(f"- {tag}: {which} timed once (a call slower than the slow-call limit)")
    return out


METHOD = """Method: q_len = kv_len = N, B = 1, {heads} heads, head_dim {d}, {dtype}, random normal q, k, v.
Times are medians of CUDA-event timings after warm-up (the L2 flushed before each call);
`attndsl/Flex` < 1 means attndsl is faster. TFLOP/s count kept pairs only:
4 x head_dim x kept pairs / time. `check`: attndsl's output against FlexAttention's, max |diff| <= {tol}.

- attndsl: `pat(q, k, v, backend="triton", **tensors)`, the whole call, host work included, with
  the tile configuration autotuning chose for the case (`attndsl tiles`; codegen/autotune.py: on
  its first call a key times a few candidates, so `attndsl first call` includes the tuning).
  Analysis: the host planning of the call on a freshly bound pattern with that configuration
  (`attndsl.runtime.launches`, caches cleared: the analysis, residue-class gathers and the tile tables on the
  device); kernel calls reuse it for patterns without tensor inputs. `strategy`, per launch:
  `tiles` or `gather` (a residue-class group launch), with `band` (arithmetic tile runs) or
  `lists` (tile index lists).
  `host work cached` (a diagnostic, document mask only): the same call with `describe` memoised
  and the per-call index check skipped.
- Non-finite values: the planned kernel launches timed alone (`main`), the second launch every
  call adds (`SAFE_V`, its programs read their flag and exit: `overhead` is its share of `main`),
  and that launch with every flag set (every row redone: a call whose rows all met a NaN or an
  infinity).
- Flex: `torch.compile(flex_attention)` with a BlockMask from `torch.compile(create_block_mask)(
  mask_mod, 1, 1, N, N, BLOCK_SIZE=128)` (H = 1, broadcast over heads) and the hand-written
  mask_mods of bench/cases.py; `torch._dynamo.reset()` before each case, so `Flex first call`
  includes the compilation. Mask ms: the second `create_block_mask` call (in brackets the first,
  which compiles it).
- SDPA: `scaled_dot_product_attention`, `is_causal=True` for causal, else a dense boolean
  `[N, N]` attn_mask, not run above N = {sdpa_max} (the mask alone is N^2 bytes: 16 GiB at 128K).
- Targets (issue "Generated Triton forward kernels"): attndsl <= 0.9x Flex on every pattern,
  <= 0.3x on dilated and strided, causal within 1.3x of SDPA; not met when the check failed."""


def report(rows, meta, note: str = "") -> str:
    order = {c.key: i for i, c in enumerate(FORWARD)}
    rows = sorted(rows, key=lambda r: (r["n"], order[r["pattern"]]))
    lines = [f"## Forward kernels: attndsl vs FlexAttention vs SDPA — {meta['date']}", "",
             f"Device: {meta['device']}; torch {meta['torch']}, Triton {meta['triton']}, CUDA "
             f"{meta['cuda']}; attndsl tiles: {meta.get('tiles') or meta.get('block')}, "
             f"commit {meta['commit']}.",
             f"Command: `{meta['command']}`."]
    if note:
        lines.append(f"Note: {note}")
    lines += ["", METHOD.format(tol=meta["tol"], sdpa_max=meta["sdpa_max_n"], heads=meta["heads"],
                                 d=meta["head_dim"], dtype=meta["dtype"]), "", tables(rows), "",
              "Targets:", ""] + summary(rows)
    extra = notes(rows) + [f"- not run (deadline): {x}" for x in meta.get("not_run", [])]
    if extra:
        lines += ["", "Notes:", ""] + extra
    return "\n".join(lines) + "\n"


def write_section(path: str, text: str) -> None:
    head = ""
    if not os.path.exists(path):
        head = "# Benchmarks\n\nResults of the scripts in bench/ (see bench/README.md).\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(head + "\n" + text)
