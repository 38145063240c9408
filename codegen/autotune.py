"""Per-GPU autotuning of the kernel's tile configuration, with a persistent cache.

Input: one call (a BoundPattern, torch q, k, v) and ``prepare(config)``, which makes the call's
launches for a configuration and returns a function running them (codegen/backend.py).
Output: the :class:`codegen.config.Config` to launch it with (:func:`choose_config`).

On CUDA, the first call of a *tuning key* (the pattern's generated source, lengths rounded up to
powers of two, batch, heads, head dims, dtype, device, Triton and codegen versions) runs each of a
few candidate configurations (:func:`candidates`: tile shapes, warps and pipeline stages that fit
the device's shared memory, ordered by a prior) on the call's own tensors, checks that their
outputs agree, times them with CUDA events (warm-up, median of a few runs, a bounded budget) and
keeps the fastest. Candidates that fail (out of resources, a compile error) are skipped. The
result is kept in memory and written atomically to ``autotune.json`` in the kernel cache folder
(:func:`codegen.cache.cache_dir`); the file is read once per process, and a corrupt one is ignored
and written again with the next result.

Under Triton's interpreter and on the CPU the default configuration is returned without timing
(times there say nothing about a GPU), unless ``force=True`` (tests). ``ATTNDSL_AUTOTUNE=0``
turns tuning off (the default configuration everywhere); ``ATTNDSL_AUTOTUNE_BUDGET`` (seconds,
default 2) bounds the timed runs of one key.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch

from attndsl.errors import AttnCallError

from . import cache, emit
from .config import DEFAULT_CONFIG, Config, padded

ENV = "ATTNDSL_AUTOTUNE"
ENV_BUDGET = "ATTNDSL_AUTOTUNE_BUDGET"
DEFAULT_BUDGET_S = 2.0
DEADLINE_FACTOR = 10        # no new candidate is tried after this many budgets (compiles included)
MAX_CANDIDATES = 8          # from the prior's ranking; the default configuration is added to them
WARMUP_RUNS = 2
MAX_REPS = 25
FILE_NAME = "autotune.json"
FILE_FORMAT = 1
_CHUNK = 1 << 24            # elements compared at once when candidate outputs are checked

# shared memory per block (opt-in maximum, KiB) by compute capability, when torch does not say
_SMEM_KIB = {(7, 0): 96, (7, 2): 96, (7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 7): 163,
             (8, 9): 99, (9, 0): 227, (10, 0): 227, (12, 0): 99}

Timer = Callable[[Config, Callable[[], object], float], float]
Prepare = Callable[[Config], Callable[[], tuple]]

_LOCK = threading.Lock()            # the stores and the file
_TUNE_LOCK = threading.RLock()      # one tuning at a time in a process
_STORES: dict[str, dict] = {}       # file path -> {key: entry}, each file read once
_DEVICES: dict[str, tuple[str, str]] = {}


# ------------------------------------------------------------------------------ environment
def enabled() -> bool:
    """Whether tuning is on: ``ATTNDSL_AUTOTUNE`` unset, ``1`` (the default) or ``0``."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise AttnCallError(f"{ENV} must be 0 (off) or 1 (on), got {os.environ[ENV]!r}")


def budget_seconds() -> float:
    """Seconds of timed runs per tuning key: ``ATTNDSL_AUTOTUNE_BUDGET`` or 2."""
    raw = os.environ.get(ENV_BUDGET, "").strip()
    if not raw:
        return DEFAULT_BUDGET_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise AttnCallError(f"{ENV_BUDGET} must be a positive number of seconds, got {raw!r}")
    return value


# ------------------------------------------------------------------------------------- keys
def bucket(n: int) -> int:
    """The power of two at or above ``n`` (1 for 0 and 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pattern_id(pattern) -> str:
    """Hash of the pattern's generated module (hooks with bound parameter values, skeleton)."""
    return hashlib.sha256(emit.module_source(pattern).encode()).hexdigest()[:20]


def device_info(device, interpret: bool) -> tuple[str, str]:
    """(device name, architecture tag) of a call: ``("NVIDIA H100 ...", "sm90")`` on CUDA,
    ``("triton-interpreter", "interpret")`` under the interpreter, ``("cpu", "cpu")`` else."""
    if interpret:
        return "triton-interpreter", "interpret"
    device = torch.device(device)
    if device.type != "cuda":
        return device.type, device.type
    slot = str(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
    if slot not in _DEVICES:
        major, minor = torch.cuda.get_device_capability(slot)
        _DEVICES[slot] = (torch.cuda.get_device_name(slot), f"sm{major}{minor}")
    return _DEVICES[slot]


def tuning_key(pattern, q, k, v, interpret: bool) -> str:
    """The key a tuning result is stored under (a readable ``name=value|...`` string)."""
    batch, heads, q_len, d = q.shape
    name, arch = device_info(q.device, interpret)
    parts = [("pattern", pattern_id(pattern)), ("q", bucket(q_len)), ("kv", bucket(k.shape[2])),
             ("batch", bucket(batch)), ("heads", heads), ("kv_heads", k.shape[1]), ("d", d),
             ("dv", v.shape[-1]), ("dtype", str(q.dtype).replace("torch.", "")), ("device", name),
             ("arch", arch), ("triton", cache.triton_version()), ("codegen", cache.CODEGEN_VERSION)]
    return "|".join(f"{k_}={v_}" for k_, v_ in parts)


def label(config) -> str:
    """A short name of a configuration: ``128x64 w8 s3``."""
    return f"{config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}"


# ------------------------------------------------------------------------------- candidates
def shared_memory_limit(device) -> int:
    """Bytes of shared memory one program may use on a CUDA device (opt-in maximum)."""
    props = torch.cuda.get_device_properties(device)
    value = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    if value:
        return value
    cap = (props.major, props.minor)
    return 1024 * _SMEM_KIB.get(cap, 99 if cap[0] >= 8 else 48)


def shared_memory_estimate(config, d: int, dv: int, elem_size: int) -> int:
    """Bytes of shared memory a configuration needs, roughly: the query tile and ``num_stages``
    buffers of a key and a value tile."""
    return (config.block_m * padded(d)
            + max(1, config.num_stages) * config.block_n * (padded(d) + padded(dv))) * elem_size


def candidates(q_len: int, kv_len: int, d: int, dv: int, dtype: torch.dtype,
               capability: tuple[int, int], smem_limit: int, limit: int = MAX_CANDIDATES) -> list:
    """The configurations tried for a call, best prior first, then the default configuration.

    Inputs: lengths, head dims, the dtype of q, the device's compute capability and its shared
    memory per block. Tiles are 64 or 128 query rows (16 to 64 for short queries) by 32 to 128
    keys, 4 or 8 warps, 1 to 4 stages (1 or 2 before sm80); combinations whose shared memory
    estimate exceeds ``smem_limit`` or whose accumulators would not fit in registers are left
    out. The rest are ranked by closeness to a prior (128 x 64 tiles in fp16/bf16, 64 x 32 in
    fp32, 8 warps for wide accumulators, 3 stages); the best of every tile shape comes first, then
    the other variants, ``limit`` in all."""
    elem = torch.empty((), dtype=dtype).element_size()
    half = dtype in (torch.float16, torch.bfloat16)
    qb, kvb = bucket(q_len), bucket(kv_len)
    block_ms = (64, 128) if qb >= 128 else tuple(m for m in (16, 32, 64) if m <= max(16, qb))
    block_ns = tuple(n for n in (32, 64, 128) if n <= max(32, kvb))
    stages = (1, 2, 3, 4) if capability >= (8, 0) else (1, 2)
    pref_m = min(128 if half else 64, max(block_ms))
    pref_n = min(64 if half else 32, max(block_ns))
    pref_s = 3 if capability >= (8, 0) else 2
    found = []
    for bm in block_ms:
        for bn in block_ns:
            for warps in (4, 8):
                if warps == 8 and (bm < 64 or bm * bn < 8192):
                    continue                # too little work for 8 warps
                # fp32 registers per thread: the accumulator and the query tile
                if bm * (padded(dv) + padded(d) * elem / 4) / (32 * warps) > 256:
                    continue
                pref_w = 8 if bm * padded(dv) >= 128 * 128 else 4
                for s in stages:
                    c = Config(bm, bn, warps, s)
                    if shared_memory_estimate(c, d, dv, elem) > smem_limit:
                        continue
                    score = (abs(math.log2(bm / pref_m)) + abs(math.log2(bn / pref_n))
                             + (warps != pref_w) + 0.5 * abs(s - pref_s))
                    found.append((score, -bm, -bn, warps, s, c))
    found.sort(key=lambda t: t[:5])
    ranked = [t[-1] for t in found]
    # every tile shape first (its best warps and stages), then the other variants by the prior:
    # the tile shape matters most on sparse patterns (how many partial tiles there are)
    shapes: dict = {}
    for c in ranked:
        shapes.setdefault(c.block, c)
    out = (list(shapes.values()) + [c for c in ranked if c not in shapes.values()])[:limit]
    if DEFAULT_CONFIG not in out:
        out.append(DEFAULT_CONFIG)
    return out


def candidates_for(q, k, v, interpret: bool) -> list:
    """:func:`candidates` for a call's tensors and device (under the interpreter: a generous
    shared memory limit and sm80 rules; only used when tuning is forced there)."""
    if q.device.type == "cuda" and not interpret:
        cap = torch.cuda.get_device_capability(q.device)
        smem = shared_memory_limit(q.device)
    else:
        cap, smem = (8, 0), 1 << 20
    return candidates(q.shape[2], k.shape[2], q.shape[3], v.shape[3], q.dtype, cap, smem)


# ---------------------------------------------------------------------------------- timing
def _calls_within(seconds: float, est_ms: float) -> tuple[int, int]:
    """(warm-up runs, timed runs) that fit in ``seconds`` for a run of ``est_ms``."""
    total = int(seconds * 1e3 / max(est_ms, 1e-3))
    warm = min(WARMUP_RUNS, max(0, total - 3))
    return warm, max(1, min(MAX_REPS, total - warm))


def event_timer(config, fn: Callable[[], object], seconds: float) -> float:
    """Milliseconds of ``fn`` on the current CUDA device: one estimate, warm-up runs, then the
    median of runs between CUDA events, all within about ``seconds``."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    est = start.elapsed_time(end)
    if est >= seconds * 1e3:
        return est
    warm, reps = _calls_within(seconds, est)
    for _ in range(warm):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)


def host_timer(config, fn: Callable[[], object], seconds: float) -> float:
    """Milliseconds of ``fn`` by the host clock (forced tuning on the CPU), like
    :func:`event_timer`."""
    t0 = time.perf_counter()
    fn()
    est = (time.perf_counter() - t0) * 1e3
    if est >= seconds * 1e3:
        return est
    warm, reps = _calls_within(seconds, est)
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------- checking candidates
def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float] | None:
    """(largest |a - b|, largest |a|) over the entries finite in both, chunk by chunk; None when
    the two are non-finite at different places or with different values (NaN, +-inf)."""
    worst = largest = 0.0
    for x, y in zip(a.reshape(-1).split(_CHUNK), b.reshape(-1).split(_CHUNK)):
        x, y = x.float(), y.float()
        fx = torch.isfinite(x)
        if not torch.equal(fx, torch.isfinite(y)):
            return None
        odd = ~fx
        if bool(odd.any()) and not torch.equal(x[odd].nan_to_num(0.0), y[odd].nan_to_num(0.0)):
            return None                     # -inf against +inf, or NaN against an infinity
        if bool(fx.any()):
            worst = max(worst, float((x[fx] - y[fx]).abs().max()))
            largest = max(largest, float(x[fx].abs().max()))
    return worst, largest


def disagreement(base, got, dtype: torch.dtype) -> str | None:
    """Why a candidate's (out, lse) disagrees with the first candidate's, or None when they
    agree: non-finite at the same places, and within the dtype's tolerance relative to the
    largest |value| + 1 elsewhere."""
    tol = _tolerance(dtype)
    for name, a, b in (("out", base[0], got[0]), ("lse", base[1], got[1])):
        if a.shape != b.shape:
            return f"{name} has shape {list(b.shape)}, not {list(a.shape)}"
        found = _compare(a, b)
        if found is None:
            return f"{name} is non-finite at other places"
        diff, largest = found
        if diff > tol * (largest + 1.0):
            return f"{name} differs by {diff:.3g} (tolerance {tol * (largest + 1.0):.3g})"
    return None


# ---------------------------------------------------------------------------- the store
def store_path() -> Path:
    """The JSON file of tuning results: ``autotune.json`` in the kernel cache folder."""
    return cache.cache_dir() / FILE_NAME


def _read(path: Path) -> dict:
    """The entries of a results file; {} when it is missing, unreadable or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT \
            or not isinstance(data.get("entries"), dict):
        return {}
    return {k: e for k, e in data["entries"].items() if isinstance(k, str) and isinstance(e, dict)}


def _entries() -> dict:
    path = str(store_path())
    with _LOCK:
        if path not in _STORES:
            _STORES[path] = _read(Path(path))
        return _STORES[path]


def _save(key: str, entry: dict) -> None:
    """Record an entry in memory and in the file (merged with what other processes wrote)."""
    path = store_path()
    with _LOCK:
        entries = _STORES.setdefault(str(path), {})
        entries[key] = entry
        for k, e in _read(path).items():
            entries.setdefault(k, e)
        text = json.dumps({"format": FILE_FORMAT, "entries": entries}, indent=1, sort_keys=True)
        try:
            cache.write_atomically(path, text + "\n")
        except OSError as exc:      # an unwritable cache: the result still serves this process
            warnings.warn(f"attndsl: could not write {path}: {exc}", stacklevel=3)


def forget() -> None:
    """Drop the in-memory copies of the results files (the next lookup reads them again)."""
    with _LOCK:
        _STORES.clear()


def config_of(entry) -> Config | None:
    """The configuration an entry records, or None when the entry is malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        return None
    raw = entry["config"]
    names = {f.name for f in fields(Config)}
    if set(raw) != names or not all(type(raw[n]) is int and raw[n] > 0 for n in names):
        return None
    return Config(**raw)


# ---------------------------------------------------------------------------- choosing
def _tuning_applies(q, interpret: bool, force: bool) -> bool:
    if not enabled():
        return False
    return force or (not interpret and q.device.type == "cuda")


def stored_entry(pattern, q, k, v, interpret: bool) -> dict | None:
    """The stored tuning entry of a call's key (``config``, ``ms``, ``skipped``, ...), or None."""
    entry = _entries().get(tuning_key(pattern, q, k, v, interpret))
    return entry if config_of(entry) is not None else None


def lookup(pattern, q, k, v, interpret: bool, force: bool = False) -> Config | None:
    """The configuration a call would run with now, without tuning: the default one when
    tuning does not apply (off, interpreter or CPU unless ``force``), the stored one when this
    key was tuned, else None."""
    if not _tuning_applies(q, interpret, force) or q.shape[2] == 0 or k.shape[2] == 0:
        return DEFAULT_CONFIG
    return config_of(_entries().get(tuning_key(pattern, q, k, v, interpret)))


def choose_config(pattern, q, k, v, prepare: Prepare, interpret: bool, *,
                  force: bool = False, candidates: list | None = None, timer: Timer | None = None,
                  budget_s: float | None = None) -> Config:
    """The tile configuration for one call (``prepare(config)``: a function running the call's
    launches with that configuration, codegen/backend.py).

    Returns ``DEFAULT_CONFIG`` when ``ATTNDSL_AUTOTUNE=0``, under the interpreter or on
    the CPU (unless ``force``), and for empty calls; else the stored result for the call's
    tuning key, tuning it first when there is none. Keyword arguments for tests and tools:
    ``candidates`` (configurations to try, in order; default :func:`candidates_for`),
    ``timer(config, fn, seconds) -> ms`` (default CUDA events, or the host clock off CUDA),
    ``budget_s`` (default ``ATTNDSL_AUTOTUNE_BUDGET``). Raises AttnCallError when no candidate
    runs."""
    if not _tuning_applies(q, interpret, force) or q.shape[2] == 0 or k.shape[2] == 0:
        return DEFAULT_CONFIG
    key = tuning_key(pattern, q, k, v, interpret)
    found = config_of(_entries().get(key))
    if found is not None:
        return found
    with _TUNE_LOCK:
        found = config_of(_entries().get(key))     # another thread may have tuned it meanwhile
        if found is not None:
            return found
        if candidates is None:
            candidates = candidates_for(q, k, v, interpret)
        if timer is None:
            timer = event_timer if q.device.type == "cuda" and not interpret else host_timer
        budget = budget_seconds() if budget_s is None else budget_s
        on_gpu = q.device.type == "cuda"
        with torch.cuda.device(q.device) if on_gpu else contextlib.nullcontext():
            entry = tune(pattern, q, prepare, candidates, timer, budget)
        _save(key, entry)
    return config_of(entry)


def _sync(q) -> None:
    if q.device.type == "cuda":
        torch.cuda.synchronize(q.device)


def tune(pattern, q, prepare: Prepare, configs: list, timer: Timer, budget_s: float) -> dict:
    """Run and time every configuration (``prepare(config)`` does the host work of the call's
    launches and returns a function that runs them, so only kernels are timed); returns the
    entry to store: ``config`` (the fastest), ``ms`` (median milliseconds by :func:`label`),
    ``skipped`` (label -> why), ``pattern``, ``tuned`` (UTC time). A configuration is skipped
    when it fails, when its output disagrees with the first one that ran (with a RuntimeWarning:
    one of the two kernels is wrong), and, once one has been timed, when ``DEADLINE_FACTOR``
    budgets have passed. Raises AttnCallError when none ran."""
    if not configs:
        raise AttnCallError("autotune: no candidate tile configurations")
    share = budget_s / len(configs)
    deadline = time.perf_counter() + DEADLINE_FACTOR * budget_s
    times: dict[str, float] = {}
    skipped: dict[str, str] = {}
    base = base_label = None
    for config in configs:
        name = label(config)
        if name in times or name in skipped:
            continue
        if times and time.perf_counter() > deadline:
            skipped[name] = "not tried: tuning deadline"
            continue
        try:
            fn = prepare(config)
        except AttnCallError:
            raise                           # about the call, not the configuration
        except Exception as exc:            # any failure skips the candidate
            skipped[name] = _reason(exc)
            continue
        try:
            result = fn()                   # compiles; its output is checked
            _sync(q)
        except Exception as exc:            # out of resources, compile errors
            skipped[name] = _reason(exc)
            continue
        if base is None:
            base, base_label = result, name
        else:
            why = disagreement(base, result, q.dtype)
            if why is not None:         # one of the two is wrong: say so, don't pick this one
                skipped[name] = f"output disagrees with {base_label}: {why}"
                warnings.warn(f"attndsl autotune: pattern '{pattern.name}', configuration {name} "
                              f"{skipped[name]}; skipped (one of the two kernels is wrong)",
                              RuntimeWarning, stacklevel=2)
                continue
        del result
        try:
            times[name] = float(timer(config, fn, share))
        except Exception as exc:            # a failing timer skips the candidate
            skipped[name] = _reason(exc)
    if not times:
        detail = "; ".join(f"{n}: {r}" for n, r in skipped.items())
        raise AttnCallError(f"autotune: none of the {len(configs)} tile configurations ran for "
                            f"pattern '{pattern.name}' (q {list(q.shape)}, {q.dtype}): {detail}")
    order = {label(c): i for i, c in enumerate(configs)}
    best = min(times, key=lambda n: (times[n], order[n]))
    config = next(c for c in configs if label(c) == best)
    return {"config": asdict(config), "ms": times, "skipped": skipped, "pattern": pattern.name,
            "tuned": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
