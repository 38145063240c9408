"""The ahead-of-time compile check: a generated kernel compiled for GPU targets without a GPU.

Input: a bound Pattern and a described call (:class:`Call`: dtype, head_dim, sizes), or a
:class:`~codegen.args.Launch` from :func:`codegen.backend.prepare` (a call may make several).
Output: a *job* per launch (a JSON-ready dict: the generated module file, which holds the
skeleton's ``attn_fwd``, the backward skeleton's ``attn_bwd_preprocess`` / ``attn_bwd_dq`` /
``attn_bwd_dkdv`` and the hooks, the kernel's name, which constexpr arguments are hook
functions, the Triton signature, the constexpr values, launch options and targets) and, from
:func:`compile_jobs`, one report per target (see codegen/aot_runner.py: ``ok``, ``error``,
registers, spills, shared memory, tensor-core dots).

The jobs are compiled by codegen/aot_runner.py in subprocesses: Triton fixes interpreter or
compiled mode at its first import (the test suite runs with ``TRITON_INTERPRET=1``), so the
runner runs with that variable removed, under the current Python or another one (e.g. a
virtual environment holding Triton 3.6), and needs nothing but triton.

The signature is what Triton's launcher would specialise for the described call:

* tensors -> pointers to their dtype (``*bf16``, ``*fp32``, ``*i32``, ``*i64``), marked
  ``tt.divisibility=16`` when their address is a multiple of 16 (torch's CUDA allocator always
  gives that; so do the CPU tensors built here);
* Python ints -> ``i32`` when in ``[-2**31, 2**31)``, else ``i64`` (``u64`` from ``2**63``),
  marked ``tt.divisibility=16`` when a multiple of 16; an int equal to 1 becomes the constexpr 1,
  as the launcher specialises it (the skeleton takes no ``do_not_specialize``). So the check
  compiles the kernel that a call of these sizes would launch; calls with more than ``2**31``
  elements in a tensor get i64 strides, a variant this check does not build;
* Python floats -> ``fp32``, bools -> ``u1``;
* the launch's ``constants`` -> constexpr, with ``NATIVE_DOT`` True (compiled mode; the launch
  sets it to ``not interpret``, and the test suite's process plans in interpreter mode); for the
  backward kernels, whose ``NATIVE_DOT`` means 16-bit operands on tensor cores, True for bf16
  and fp16 calls only.

The backward pass's launches (:func:`describe` with ``backward``: codegen/backend.py
``prepare_backward``, for a call with a gradient into lse too) are compiled the same way;
``make aot`` compiles both passes of every example (the kernel with no hook,
``attn_bwd_preprocess``, once per run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attndsl.bound import call_grids
from attndsl.call import BoundCall, CallData, CallShape
from attndsl.errors import AttnCallError
from attndsl.inputs import check_qkv
from attndsl.render import demo_inputs

from .args import Launch
from .backend import prepare, prepare_backward
from .config import DEFAULT_CONFIG, Config
from .selection import selection_tables

SKELETON = Path(__file__).absolute().parent / "skeleton.py"
SKELETON_BWD = Path(__file__).absolute().parent / "skeleton_bwd.py"
BACKWARD_KERNELS = ("attn_bwd_preprocess", "attn_bwd_dq", "attn_bwd_dkdv")
RUNNER = Path(__file__).absolute().parent / "aot_runner.py"
DEFAULT_TARGETS = ("sm_80", "sm_90")
# The NVIDIA GPU architectures a target may name: Turing and later, as the ptxas that Triton
# ships knows them (CUDA 12.9 and 13); the architecture-specific 'a' form exists from sm_90.
CAPABILITIES = (75, 80, 86, 87, 88, 89, 90, 100, 101, 103, 107, 110, 120, 121)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32,
          "fp64": torch.float64, "float64": torch.float64}
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                 torch.float64: "*fp64", torch.int8: "*i8", torch.int32: "*i32",
                 torch.int64: "*i64", torch.bool: "*i1"}


@dataclass(frozen=True)
class Call:
    """The call a kernel is compiled for: dtype of q/k/v, head dims and sizes. The sizes matter
    through their specialisation (1, a multiple of 16, another int32) and through the launches
    the plan makes for them (tile tables in band or list form, gathered components)."""

    dtype: str = "bf16"
    head_dim: int = 128
    head_dim_v: int | None = None
    q_len: int = 512
    kv_len: int | None = None
    heads: int = 4
    kv_heads: int | None = None
    batch: int = 2

    def label(self) -> str:
        dv = f"/{self.head_dim_v}" if self.head_dim_v not in (None, self.head_dim) else ""
        return f"{str(DTYPES.get(self.dtype, self.dtype)).removeprefix('torch.')} d{self.head_dim}{dv}"


def _interpret_mode() -> bool:
    """The mode the process can still plan in: interpreter when triton is imported under
    TRITON_INTERPRET (the test suite), else compiled (triton imported by the plan itself)."""
    return "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") in ("1", "true", "True")


def describe(pattern, call: Call = Call(), config: Config = DEFAULT_CONFIG,
             backward: bool = False) -> list[Launch]:
    """The launches of ``pattern`` (an :class:`attndsl.Pattern`) for ``call``: one, or one per
    gathered component (codegen/backend.py ``prepare``); with ``backward`` those of its backward
    pass instead (``prepare_backward``: the preprocess, then a dQ and a dK/dV launch per forward
    launch). q/k/v are CPU tensors that only describe the call; tensor inputs and selector
    tables are demo values (attndsl.render.demo_inputs)."""
    dtype = DTYPES[call.dtype] if call.dtype in DTYPES else None
    if dtype is None:
        raise AttnCallError(f"dtype {call.dtype!r}: expected one of bf16, fp16, fp32")
    kv_len = call.q_len if call.kv_len is None else call.kv_len
    kv_heads = call.kv_heads or call.heads
    bound = pattern.bound().for_sizes(call.q_len, kv_len, call.heads, kv_heads)
    dv = call.head_dim_v or call.head_dim
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(call.batch, call.heads, call.q_len, call.head_dim, generator=gen).to(dtype)
    k = torch.randn(call.batch, kv_heads, kv_len, call.head_dim, generator=gen).to(dtype)
    v = torch.randn(call.batch, kv_heads, kv_len, dv, generator=gen).to(dtype)
    shapes = check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    selectors = bound.uses_selectors()
    qn, kn = (x.double().numpy() for x in (q, k)) if selectors else (None, None)
    tensors, _ = demo_inputs(pattern, (call.q_len, kv_len, call.heads, kv_heads), call.head_dim,
                             np.random.default_rng(0), qn[0] if selectors else None,
                             kn[0] if selectors else None)
    scale = 1.0 / float(np.sqrt(call.head_dim))
    grids = call_grids(bound, shapes, qn, kn, scale, tensors) if selectors else []
    interpret = _interpret_mode()
    bound_call = BoundCall(bound, CallShape(call.batch, call.heads, kv_heads, call.q_len, kv_len,
                                            call.head_dim, dv),
                           str(dtype).removeprefix("torch."), "cpu",
                           "triton-interpret" if interpret else "triton", scale)
    data = CallData(tensors, tuple(grids), selection_tables(bound, q, k, scale, tensors))
    if not backward:
        return prepare(bound_call, data, q, k, v, config)[0]
    out = torch.zeros(q.shape[:-1] + (dv,), dtype=dtype)
    lse = torch.zeros(q.shape[:-1], dtype=torch.float32)
    return prepare_backward(bound_call, data, q, k, v, out, lse, torch.zeros_like(out),
                            torch.zeros_like(lse), config)[0]


def arg_type(value) -> tuple[str, bool]:
    """(Triton type, divisible by 16) of one runtime argument, as the launcher specialises it;
    the type is ``"constexpr"`` for the int 1."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in POINTER_TYPES:
            raise AttnCallError(f"no Triton pointer type for a {value.dtype} tensor")
        return POINTER_TYPES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, (bool, np.bool_)):
        return "u1", False
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if v == 1:
            return "constexpr", False
        kind = "i32" if -2**31 <= v < 2**31 else "i64" if -2**63 <= v < 2**63 else "u64"
        return kind, v % 16 == 0
    if isinstance(value, (float, np.floating)):
        return "fp32", False
    raise AttnCallError(f"no Triton type for an argument of type {type(value).__name__}")


def _hook_name(fn) -> tuple[str, str]:
    """(file, function name) of a hook: a constexpr argument that is a function (a JITFunction,
    or Triton's interpreted function), passed to the runner by name and module file."""
    func = getattr(fn, "fn", fn)
    module = sys.modules.get(getattr(func, "__module__", ""), None)
    path = getattr(module, "__file__", None)
    if path is None:
        raise AttnCallError(f"hook {func!r} does not come from a module file")
    return os.path.abspath(path), func.__name__


def kernel_arguments(skeleton: Path | None = None, kernel_name: str = "attn_fwd") -> list[str]:
    """The argument names of a skeleton's kernel, read from its source (no import); by default
    from skeleton.py, or skeleton_bwd.py for a backward kernel."""
    import ast

    if skeleton is None:
        skeleton = SKELETON_BWD if kernel_name in BACKWARD_KERNELS else SKELETON
    tree = ast.parse(Path(skeleton).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == kernel_name:
            return [a.arg for a in node.args.args]
    raise AttnCallError(f"no function {kernel_name} in {skeleton}")


def check_targets(targets) -> list[str]:
    """The target names (``sm_80``, ``sm_90a``; stripped, duplicates dropped), checked before
    anything compiles: AttnCallError for a malformed name, an architecture outside
    :data:`CAPABILITIES` (``sm_42``) or an ``a`` form below sm_90, and for no target at all."""
    from .aot_runner import JobError, parse_target

    names = list(dict.fromkeys(str(t).strip() for t in targets if str(t).strip()))
    if not names:
        raise AttnCallError("no target given (e.g. sm_80,sm_90)")
    known = ", ".join(f"sm_{c}" for c in CAPABILITIES)
    for name in names:
        try:
            _, capability, _ = parse_target(name)
        except JobError as exc:
            raise AttnCallError(str(exc)) from None
        if capability not in CAPABILITIES:
            raise AttnCallError(f"unknown target {name!r}: sm_{capability} is no NVIDIA GPU "
                                f"architecture that Triton compiles for (known: {known})")
        if name.endswith("a") and capability < 90:
            raise AttnCallError(f"unknown target {name!r}: the architecture-specific 'a' form "
                                "exists from sm_90 (sm_90a, sm_100a, ...)")
    return names


def make_job(launch: Launch, name: str, targets=DEFAULT_TARGETS,
             skeleton: Path | None = None) -> dict:
    """The job of one Launch (see the module docstring and codegen/aot_runner.py): its kernel
    (``attn_fwd`` or a backward kernel) from the module its hooks come from."""
    kernel = "attn_fwd"
    if launch.kernel is not None:
        kernel = getattr(getattr(launch.kernel, "fn", launch.kernel), "__name__", kernel)
    names = kernel_arguments(skeleton, kernel)
    skeleton = skeleton or (SKELETON_BWD if kernel in BACKWARD_KERNELS else SKELETON)
    if len(names) != len(launch.args) + len(launch.constants):
        raise AttnCallError(f"the launch has {len(launch.args)} arguments and "
                            f"{len(launch.constants)} constants; the skeleton takes {len(names)}")
    signature, constexprs, divisible, hooks, module = {}, {}, [], {}, None
    for arg, value in zip(names, launch.args):
        kind, div = arg_type(value)
        signature[arg] = kind
        if kind == "constexpr":
            constexprs[arg] = int(value)
        if div:
            divisible.append(arg)
    for arg, value in launch.constants.items():
        if arg not in names[len(launch.args):]:
            raise AttnCallError(f"launch constant {arg!r} is no constexpr argument of the skeleton")
        signature[arg] = "constexpr"
        if not isinstance(value, (bool, int, float, str, type(None), np.generic)):
            path, hook = _hook_name(value)
            if module not in (None, path):
                raise AttnCallError("the hooks of one launch come from two modules")
            module, hooks[arg] = path, hook
        else:
            constexprs[arg] = value.item() if isinstance(value, np.generic) else value
    if kernel == "attn_fwd":
        constexprs["NATIVE_DOT"] = True
    elif "NATIVE_DOT" in constexprs:        # the backward's: 16-bit operands on tensor cores
        constexprs["NATIVE_DOT"] = signature.get("Q") in ("*bf16", "*fp16")
    if module is None and launch.kernel is not None:    # no hook: the kernel's own module
        module = _hook_name(launch.kernel)[0]
    # the generated module holds the skeletons' kernels next to its hooks
    return {"format": 1, "name": name, "skeleton": module or str(skeleton), "kernel": kernel,
            "hooks_module": module, "hooks": hooks, "signature": signature,
            "constexprs": constexprs, "divisible_by_16": divisible,
            "options": dict(launch.options), "targets": list(targets)}


def pattern_jobs(pattern, call: Call = Call(), targets=DEFAULT_TARGETS,
                 config: Config = DEFAULT_CONFIG, name: str | None = None) -> list[dict]:
    """describe + make_job: one job per launch of the call; named ``name`` (default
    ``pattern label``), with ``[launch i/n]`` added when the call makes several launches."""
    name = name or f"{pattern.name} {call.label()}"
    targets = check_targets(targets)
    plans = describe(pattern, call, config)
    return [make_job(launch, name if len(plans) == 1 else f"{name} [launch {i + 1}/{len(plans)}]",
                     targets) for i, launch in enumerate(plans)]


def backward_jobs(pattern, call: Call = Call(), targets=DEFAULT_TARGETS,
                  config: Config = DEFAULT_CONFIG, name: str | None = None,
                  preprocess: bool = True) -> list[dict]:
    """The jobs of the call's backward pass: ``attn_bwd_preprocess`` (unless not
    ``preprocess``: it has no hook, so one compile serves every pattern), then ``attn_bwd_dq``
    and ``attn_bwd_dkdv`` per forward launch; named ``name backward <kernel>`` with ``[launch
    i/n]`` added when the call makes several launches."""
    name = name or f"{pattern.name} {call.label()}"
    targets = check_targets(targets)
    launches = describe(pattern, call, config, backward=True)
    pre, rest = launches[:1], launches[1:]
    n = len(rest) // 2
    jobs = [make_job(pre[0], f"{name} backward attn_bwd_preprocess", targets)] if preprocess \
        else []
    for i, launch in enumerate(rest):
        what = "attn_bwd_dq" if i % 2 == 0 else "attn_bwd_dkdv"
        tail = f" [launch {i // 2 + 1}/{n}]" if n > 1 else ""
        jobs.append(make_job(launch, f"{name} backward {what}{tail}", targets))
    return jobs


def _runner_env(pycache: str | None = None) -> dict:
    """The runner's environment: no TRITON_INTERPRET, the ptxas log on, and (``pycache``) its
    bytecode kept in a folder of its own, so that it never reads a ``.pyc`` from the kernel
    cache's ``__pycache__`` (the hook modules are imported from their checked source)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    if pycache is not None:
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def compile_jobs(jobs: list[dict], python: str | None = None, processes: int = 1,
                 timeout: float = 900.0) -> list[list[dict]]:
    """Compile every job for each of its targets with codegen/aot_runner.py under ``python``
    (default: this interpreter), in ``processes`` runner processes (the (job, target) units are
    dealt round-robin); one report per target, in the order of the jobs and their targets.
    Raises AttnCallError when a runner itself fails (no Python there, no triton, a timeout)."""
    python = python or sys.executable
    if os.sep not in python:                # a command name, looked up on PATH
        python = shutil.which(python) or python
    python = os.path.abspath(python)        # (not resolved: a venv's python is a symlink)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise AttnCallError(f"no Python interpreter at {python}")
    units = [(i, t) for i, job in enumerate(jobs) for t in job["targets"]]
    processes = max(1, min(processes, len(units)))
    shares = [units[p::processes] for p in range(processes)]
    results: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="attndsl-aot-") as tmp:
        running = []
        for p, share in enumerate(shares):
            path = Path(tmp) / f"jobs{p}.json"
            path.write_text(json.dumps([dict(jobs[i], targets=[t]) for i, t in share]),
                            encoding="utf-8")
            log = open(Path(tmp) / f"log{p}.txt", "w+", encoding="utf-8")     # noqa: SIM115
            cmd = [python, str(RUNNER), str(path), "-o", str(Path(tmp) / f"out{p}.json")]
            running.append((share, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                         env=_runner_env(str(Path(tmp) / "pyc")),
                                                         cwd=tmp)))
        try:
            for p, (share, log, proc) in enumerate(running):
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    raise AttnCallError(f"the compile runner ({python}) took more than "
                                        f"{timeout:.0f} s") from None
                out = Path(tmp) / f"out{p}.json"
                log.seek(0)
                tail = "\n".join(log.read().strip().splitlines()[-15:])
                tail = f":\n{tail}" if tail else ""
                if rc != 0 or not out.exists():
                    what = f"failed with exit status {rc}" if rc else \
                        "exited without writing its results (is it a Python with triton?)"
                    raise AttnCallError(f"the compile runner ({python}) {what}{tail}")
                try:
                    got = json.loads(out.read_text(encoding="utf-8"))
                    pairs = [(unit, reports[0]) for unit, reports in zip(share, got, strict=True)]
                except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
                    raise AttnCallError(f"the compile runner ({python}) wrote unreadable "
                                        f"results ({exc}){tail}") from None
                results.update(pairs)
        finally:
            for _share, log, proc in running:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
    return [[results[(i, t)] for t in job["targets"]] for i, job in enumerate(jobs)]


def report_lines(reports: list[dict]) -> list[str]:
    """One line per target (the error text indented below a failure)."""
    lines = []
    for r in reports:
        if not r["ok"]:
            lines.append(f"  {r['target']:<6} FAILED (triton {r.get('triton', '?')})")
            lines += [f"      {line}" for line in (r["error"] or "").splitlines()]
            continue
        regs = "?" if r["registers"] is None else r["registers"]
        if r["spill_stores"] is not None:
            spills = f"{r['spill_stores'] + r['spill_loads']} B spilled"
        else:
            spills = f"{'?' if r['local_bytes'] is None else r['local_bytes']} B local"
        tc = f"{r['tensor_core_dots']}/{r['dots']} dots on tensor cores"
        tc += f" ({r['mma']})" if r["mma"] else ""
        lines.append(f"  {r['target']:<6} ok  {r['seconds']:.1f} s, {regs} registers, {spills}, "
                     f"{r['shared_bytes']} B shared, {tc}")
    return lines


def main(argv=None) -> int:
    """``python -m attndsl.codegen.aot FILE... [--targets sm_80,sm_90] [--dtype bf16]
    [--head-dim 128] [--python PY] [--processes N] [--no-backward]``: compile the forward and
    (unless ``--no-backward``) backward kernels of every pattern of the files in one batch
    (``make aot``, ``make aot36``), print a report per pattern; exit status 1 when a pattern
    fails to compile (or to plan), 0 otherwise."""
    import argparse

    from attndsl.errors import AttnError
    from attndsl.program import load

    parser = argparse.ArgumentParser(prog="python -m attndsl.codegen.aot",
                                     description="Compile the kernels of .attn files for GPU "
                                                 "targets ahead of time (no GPU needed).")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--python", help="the Python that compiles (default: this one)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-backward", action="store_true",
                        help="compile the forward kernels only")
    args = parser.parse_args(argv)
    call = Call(dtype=args.dtype, head_dim=args.head_dim)
    jobs, failed = [], 0
    try:
        targets = check_targets(args.targets.split(","))
        for path in args.files:
            for pat in load(path):
                try:
                    jobs += pattern_jobs(pat, call, targets, name=f"{path}:{pat.name}")
                    if not args.no_backward:
                        jobs += backward_jobs(pat, call, targets, name=f"{path}:{pat.name}",
                                              preprocess=not any(
                                                  j["kernel"] == "attn_bwd_preprocess"
                                                  for j in jobs))
                except AttnError as err:
                    print(f"# {path}:{pat.name}: cannot plan the call\n{err}")
                    failed += 1
        results = compile_jobs(jobs, python=args.python, processes=args.processes)
    except AttnError as err:
        print(err, file=sys.stderr)
        return 1
    for job, reports in zip(jobs, results):
        print(f"# {job['name']}: {call.label()}, triton {reports[0].get('triton', '?')}")
        print("\n".join(report_lines(reports)))
        failed += any(not r["ok"] for r in reports)
    print(f"{len(jobs)} launches x {len(targets)} targets: "
          f"{'all compiled' if not failed else f'{failed} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
