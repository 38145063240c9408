"""FlexAttention's create_block_mask run in a worker process with memory and time limits, so
that running out of memory or hanging is recorded rather than ending the benchmark.

A job runs create_block_mask in eager mode (``_compile=False``: mask_mod under vmap on the dense
grid) or, with ``"compiled": true``, as ``torch.compile(create_block_mask)`` (inductor on the
CPU: the first call includes compiling, warm calls run the generated C++ kernel). Dynamo is
reset before each compiled job, so that every case is compiled afresh and none falls back to
eager after hitting the recompile limit."""

from __future__ import annotations

import gc
import json
import os
import selectors
import statistics
import subprocess
import sys
import time

import numpy as np
from cases import BLOCK, CASES_BY_KEY, EMPTY, FULL, PARTIAL, Case, _flex_causal, measure

TARGET = 100.0              # compiled create_block_mask (warm) / attndsl block_map (first call)


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def compare(ours: np.ndarray, brute: np.ndarray) -> dict:
    """Soundness and exactness of ours against an exact map."""
    unsound_empty = int(((ours == EMPTY) & (brute != EMPTY)).sum())
    unsound_full = int(((ours == FULL) & (brute != FULL)).sum())
    loose = int(((ours == PARTIAL) & (brute != PARTIAL)).sum())
    return {"sound": unsound_empty == 0 and unsound_full == 0 and ours.shape == brute.shape,
            "exact": bool(ours.shape == brute.shape and (ours == brute).all()),
            "unsound_empty": unsound_empty, "unsound_full": unsound_full, "loose": loose,
            "first_diff": None if ours.shape != brute.shape or (ours == brute).all()
            else [int(x) for x in np.argwhere(ours != brute)[0]]}


def run_compiled(runner, row, ours, brute, failed: set) -> None:
    """Times torch.compile(create_block_mask) for row's case (not again once it failed)."""
    case, n = row.case, row.n
    if isinstance(case.flex, str) or case.flex is None:
        row.flexc_note = case.flex or "no mask_mod"
        return
    if case.key in failed:
        row.flexc_note = "skipped: failed at a smaller size"
        return
    ans = runner.run(case, n, compiled=True)
    if "error" in ans:
        row.flexc_note = ans["error"]
        failed.add(case.key)
        return
    row.flexc_first = ans["first"]
    row.flexc_warm = statistics.median(ans["warm"]) if ans["warm"] else None
    if not ans["warm"]:
        row.flexc_note = "no warm call (first call over the time budget)"
    fmap = np.load(ans["map"])
    os.unlink(ans["map"])
    row.flexc_cmp = compare(ours, fmap)
    if brute is not None and not (fmap == brute).all():
        row.flexc_note = "compiled Flex's map differs from the NumPy brute force"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}x" if x >= 10 else f"{x:.1f}x"


def target_lines(rows: list) -> list[str]:
    """Which cases meet the target (compiled Flex warm >= TARGET x attndsl's first call)."""
    out = []
    for r in rows:
        ratio = r.compiled_ratio
        if ratio is None:
            if r.flexc_note:
                out.append(f"- {r.case.key} at N={r.n}: not measured ({r.flexc_note[:80]})")
            continue
        verdict = "meets" if ratio >= TARGET else "**misses**"
        out.append(f"- {r.case.key} at N={r.n}: {verdict} the {TARGET:.0f}x target: compiled Flex "
                   f"{fmt_time(r.flexc_warm)} / attndsl {fmt_time(r.ours_first)} = {fmt_ratio(ratio)} "
                   f"(warm attndsl {fmt_time(r.ours_warm)}: "
                   f"{fmt_ratio(r.flexc_warm / r.ours_warm if r.ours_warm else None)})")
    return out


# ------------------------------------------------------------------------- FlexAttention worker
def flex_block_map(bm, heads: int, n_q: int, n_k: int) -> np.ndarray:
    """A FlexAttention BlockMask as an int8 [heads, nQT, nKT] map: 0 empty, 1 partial, 2 full."""
    out = np.zeros((heads, n_q, n_k), dtype=np.int8)

    def fill(num, idx, value):
        num = num[0].cpu().numpy()
        idx = idx[0].cpu().numpy()
        num = np.broadcast_to(num, (heads,) + num.shape[1:])
        idx = np.broadcast_to(idx, (heads,) + idx.shape[1:])
        live = np.arange(idx.shape[-1]) < num[..., None]
        h, r, c = np.nonzero(live)
        out[h, r, idx[h, r, c]] = value

    fill(bm.kv_num_blocks, bm.kv_indices, PARTIAL)
    if bm.full_kv_num_blocks is not None:
        fill(bm.full_kv_num_blocks, bm.full_kv_indices, FULL)
    return out


def _vm_size() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def flex_worker(mem_bytes: int, reps: int, budget_s: float) -> None:
    """Reads jobs (JSON lines) on stdin, answers one JSON line per job on stdout."""
    import resource

    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 1 << 12)
    # one-time costs (lazy imports, first vmap, first large allocations) outside the timings
    create_block_mask(_flex_causal(1024, 1, torch), 1, 1, 1024, 1024, device="cpu", BLOCK_SIZE=BLOCK,
                      _compile=False)
    if mem_bytes > 0:
        limit = _vm_size() + mem_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        case, n = CASES_BY_KEY[job["case"]], job["n"]
        answer: dict = {"case": case.key, "n": n}
        try:
            mask_mod = case.flex(n, case.heads, torch)
            heads = case.heads
            if job.get("compiled"):
                torch._dynamo.reset()
                compiled = torch.compile(create_block_mask)

                def run(mask_mod=mask_mod, heads=heads, n=n, compiled=compiled):
                    return compiled(mask_mod, 1, heads, n, n, device="cpu", BLOCK_SIZE=BLOCK)
            else:
                def run(mask_mod=mask_mod, heads=heads, n=n):
                    return create_block_mask(mask_mod, 1, heads, n, n, device="cpu",
                                             BLOCK_SIZE=BLOCK, _compile=False)

            bm, first, warm = measure(run, reps, budget_s)
            nt = -(-n // BLOCK)
            m = flex_block_map(bm, heads, nt, nt)
            del bm
            path = os.path.join(job["dir"], f"flex_{case.key}_{n}_{int(bool(job.get('compiled')))}.npy")
            np.save(path, m)
            answer.update(first=first, warm=warm, map=path)
        except Exception as exc:   # out of memory, unsupported op under vmap, ...
            answer["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        gc.collect()
        print(json.dumps(answer), flush=True)


class FlexRunner:
    """Runs create_block_mask jobs in a worker process with a memory limit and a time limit."""

    def __init__(self, mem_bytes: int, reps: int, budget_s: float, timeout_s: float, workdir: str):
        self.mem_bytes, self.reps, self.budget_s = mem_bytes, reps, budget_s
        self.timeout_s, self.workdir = timeout_s, workdir
        self.proc: subprocess.Popen | None = None
        self.start_error: str | None = None

    def _start(self) -> bool:
        main_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_block_map.py")
        cmd = [sys.executable, main_script, "--flex-worker", "--flex-mem-bytes",
               str(self.mem_bytes), "--flex-reps", str(self.reps), "--flex-budget", str(self.budget_s)]
        self.stderr_path = os.path.join(self.workdir, "flex_worker.stderr")
        with open(self.stderr_path, "a", encoding="utf-8") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, bufsize=1)
        ready = self._read(120.0)
        if ready is None or not ready.get("ready"):
            self.stop()
            self.start_error = f"the FlexAttention worker did not start: {self.stderr_tail()}"
            return False
        return True

    def _read(self, timeout: float) -> dict | None:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                return None
            line = self.proc.stdout.readline()
        finally:
            sel.close()
        return json.loads(line) if line else None

    def stderr_tail(self) -> str:
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return " ".join(f.read()[-300:].split())
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, case: Case, n: int, compiled: bool = False) -> dict:
        if self.start_error is not None:
            return {"error": self.start_error}
        if self.proc is None and not self._start():
            return {"error": self.start_error}
        job = {"case": case.key, "n": n, "dir": self.workdir, "compiled": compiled}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        t0 = time.perf_counter()
        answer = self._read(self.timeout_s)
        if answer is None:
            died = self.proc.poll() is not None
            self.stop()
            if died:
                return {"error": f"the worker died (killed for memory?): {self.stderr_tail()}"}
            return {"error": f"timed out after {time.perf_counter() - t0:.0f} s "
                             f"(limit {self.timeout_s:.0f} s)"}
        return answer


