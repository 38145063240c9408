"""Ahead-of-time compilation of generated kernels for GPU targets, without a GPU.

Standalone: this file needs only ``triton`` (no torch, no attndsl), so that it runs under the
Python of any environment that has the Triton version to check (3.6 and 3.9 are supported; the
``ASTSource(fn, signature, constexprs, attrs)`` API of Triton >= 3.3 is required). It must run in
a process where ``TRITON_INTERPRET`` is unset when triton is first imported: run as a script it
removes the variable itself before importing triton.

Input: a JSON file holding a list of *jobs* (written by :mod:`codegen.aot`), each::

    {"name": "causal.attn:causal_lm bf16 d128",      # free text for reports
     "skeleton": "/path/skeleton.py", "kernel": "attn_fwd",   # or attn_bwd_dq, ... (backward)
     "hooks_module": "/path/attndsl_gen_<hash>.py",
     "hooks": {"MASK_FN": "mask_hook", ...},          # constexpr arguments that are hook functions
     "signature": {"Q": "*bf16", "sqb": "i32", "sqd": "constexpr", ...},   # every argument
     "constexprs": {"sqd": 1, "BLOCK_M": 32, ...},    # values of the other constexpr arguments
     "divisible_by_16": ["Q", "sqb", ...],            # arguments the launcher marks tt.divisibility
     "options": {"num_warps": 4, "num_stages": 1},
     "targets": ["sm_80", "sm_90"],
     "keep": ["ttir"]}                                # optional: IR texts to return ("asm")

Output: for each job, a list with one report per target (see :func:`compile_job`): ``ok``
(False also when the kernel needs more shared memory than the target has: :data:`SHARED_LIMITS`),
``error`` (text, on failure), ``seconds``, ``registers``, ``spill_stores`` / ``spill_loads``
(bytes; from the ptxas log, None when Triton's cache answered), ``local_bytes`` (from cuobjdump),
``shared_bytes`` (Triton's dynamic shared memory), ``dots`` / ``tensor_core_dots`` (``tt.dot``
operations in the TTGIR and those with an MMA result layout) and ``mma`` (``"wgmma"``,
``"mma.sync"`` or None: the tensor-core instructions found in the PTX), and ``asm`` (the IR
texts named by the job's ``keep``, if any).

Usage: ``python aot_runner.py JOBS.json [-o RESULTS.json]`` (results on stdout without -o);
exit status 0 when the runner worked, whatever the kernels did, 2 on a bad jobs file, 3 when
triton cannot be imported.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings

JOB_FORMAT = 1
MAX_ERROR_CHARS = 6000
_MODULES: dict[str, object] = {}


class JobError(Exception):
    """A job that cannot be compiled for a reason outside the kernel (bad file, bad target)."""


def parse_target(text: str) -> tuple[str, int, int]:
    """``sm_80`` / ``sm_90`` / ``sm_90a`` -> (backend, capability, warp size) of a GPUTarget."""
    m = re.fullmatch(r"sm_?(\d{2,3})a?", text.strip())
    if not m:
        raise JobError(f"unknown target {text!r}: expected sm_<capability>, e.g. sm_80 or sm_90")
    return "cuda", int(m.group(1)), 32


def _import_file(path: str):
    """Import a Python file under a name derived from its path (once per process)."""
    if path in _MODULES:
        return _MODULES[path]
    if not os.path.isfile(path):
        raise JobError(f"no such file: {path}")
    name = "attndsl_aot_" + hashlib.sha256(path.encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _MODULES[path] = module
    return module


def _jit_function(module, name: str, what: str):
    import triton

    fn = getattr(module, name, None)
    if fn is None:
        raise JobError(f"{what} '{name}' not found in {module.__file__}")
    if not isinstance(fn, triton.runtime.JITFunction):
        raise JobError(f"{what} '{name}' is a {type(fn).__name__}, not a triton.JITFunction: "
                       "TRITON_INTERPRET must be unset before triton is imported")
    return fn


def ast_source(fn, signature: dict, constexprs: dict, divisible: list):
    """The ASTSource of a kernel: ``signature`` maps every argument name to its Triton type,
    ``constexprs`` argument names to values, ``divisible`` names the arguments known to be
    multiples of 16 (the launcher's ``tt.divisibility`` attribute)."""
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in params:
        import triton

        raise JobError(f"Triton {triton.__version__} is not supported by the ahead-of-time check "
                       "(it needs the ASTSource(fn, signature, constexprs, attrs) API of "
                       "Triton >= 3.3)")
    names = list(fn.arg_names)
    unknown = sorted(set(signature) ^ set(names))
    if unknown:
        raise JobError(f"the signature and the kernel's arguments differ: {', '.join(unknown)}")
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in divisible}
    return ASTSource(fn, dict(signature), constexprs=consts, attrs=attrs)


# the most shared memory one block may use (opt-in), bytes, by compute capability: Triton refuses
# to launch a kernel that needs more (OutOfResources), so the check reports it as a failure
SHARED_LIMITS = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376,
                 90: 232448, 100: 232448, 103: 232448, 120: 101376}
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CUOBJDUMP = re.compile(r"REG:(\d+).*?LOCAL:(\d+)")


def _cuobjdump(cubin: bytes):
    """(registers, local bytes) of the cubin's kernel from ``cuobjdump --dump-resource-usage``
    (None, None when the tool is not available)."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except Exception:
        return None, None
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                  text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    m = _CUOBJDUMP.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _count_dots(ttgir: str) -> tuple[int, int]:
    """(dot operations, those producing an MMA layout) in a TTGIR module."""
    mma_names = set(re.findall(r"^(#[\w]+) = #ttg\.nvidia_mma<", ttgir, flags=re.M))
    dots = tensor_core = 0
    for line in ttgir.splitlines():
        if not re.search(r"= (tt\.dot|ttng\.warp_group_dot)\b", line):
            continue
        dots += 1
        result = line.rsplit("->", 1)[-1]
        if any(re.search(re.escape(n) + r"\b", result) for n in mma_names):
            tensor_core += 1
    return dots, tensor_core


def analyse(kernel, ptxas_log: str) -> dict:
    """Resource and tensor-core facts of a CompiledKernel (see the module docstring)."""
    asm = kernel.asm
    ptx = asm.get("ptx", "")
    dots, tensor_core = _count_dots(asm.get("ttgir", ""))
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else None
    regs = _PTXAS_REGS.search(ptxas_log)
    spill = _PTXAS_SPILL.search(ptxas_log)
    cu_regs, local = _cuobjdump(asm["cubin"]) if "cubin" in asm else (None, None)
    return {"registers": int(regs.group(1)) if regs else cu_regs,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None,
            "local_bytes": local,
            "shared_bytes": getattr(kernel.metadata, "shared", None),
            "dots": dots, "tensor_core_dots": tensor_core, "mma": mma}


def _function_name(err) -> str:
    m = re.search(r"def\s+(\w+)", getattr(err, "src", None) or "")
    return m.group(1) if m else "?"


def _error_text(exc: BaseException) -> str:
    """The error of a failed compile: for Triton's nested CompilationErrors (kernel -> _tile ->
    hook), the innermost one with its source excerpt, then the calls that led there."""
    chain, seen = [], set()
    err = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    located = [e for e in chain if hasattr(e, "src") and hasattr(e, "node")]
    if not located:
        text = f"{type(exc).__name__}: {exc}"
    else:
        inner = located[-1]
        text = f"{type(inner).__name__} in {_function_name(inner)} {inner}"
        root = chain[-1]
        if root is not inner and str(root) not in text:
            text += f"\n{type(root).__name__}: {root}"
        calls = [f"{_function_name(e)} (line {getattr(e.node, 'lineno', '?')} of the function)"
                 for e in reversed(located[:-1])]
        if calls:
            text += "\ncalled from " + ", from ".join(calls)
    text = text.strip()
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + f"\n... ({len(text) - MAX_ERROR_CHARS} more characters)"
    return text


def compile_job(job: dict) -> list[dict]:
    """Compile one job for each of its targets; one report per target (never raises for a
    kernel that does not compile: the report holds ``ok`` False and the error text)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if job.get("format", JOB_FORMAT) != JOB_FORMAT:
        raise JobError(f"job format {job.get('format')} (this runner reads {JOB_FORMAT})")
    reports = []
    try:
        skeleton = _import_file(job["skeleton"])
        fn = _jit_function(skeleton, job.get("kernel", "attn_fwd"), "kernel")
        hooks = _import_file(job["hooks_module"])
        constexprs = dict(job.get("constexprs", {}))
        for arg, hook in job.get("hooks", {}).items():
            constexprs[arg] = _jit_function(hooks, hook, "hook")
        src = ast_source(fn, job["signature"], constexprs, job.get("divisible_by_16", []))
        setup_error = None
    except Exception as exc:            # the files, the kernel's front end or the job itself
        setup_error = _error_text(exc)
    for name in job.get("targets", ["sm_80", "sm_90"]):
        report = {"target": name, "ok": False, "error": None, "seconds": 0.0,
                  "triton": triton.__version__}
        reports.append(report)
        if setup_error:
            report["error"] = setup_error
            continue
        start = time.perf_counter()
        log = io.StringIO()
        try:
            target = GPUTarget(*parse_target(name))
            with contextlib.redirect_stdout(log), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kernel = triton.compile(src, target=target, options=dict(job.get("options", {})))
            report.update(analyse(kernel, log.getvalue()), ok=True)
            if job.get("keep"):
                report["asm"] = {k: kernel.asm[k] for k in job["keep"] if isinstance(
                    kernel.asm.get(k), str)}
            limit = SHARED_LIMITS.get(target.arch)
            if limit is not None and (report["shared_bytes"] or 0) > limit:
                report.update(ok=False, error=f"needs {report['shared_bytes']} B of shared memory; "
                                              f"{name} gives a block at most {limit} B (Triton "
                                              "would refuse to launch it: OutOfResources)")
        except Exception as exc:
            report["error"] = _error_text(exc)
        report["seconds"] = round(time.perf_counter() - start, 3)
    return reports


def run_jobs(jobs: list) -> list[list[dict]]:
    """Reports of every job (a job whose files cannot be read reports that for each target)."""
    return [compile_job(job) for job in jobs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile attndsl kernel jobs for GPU targets.")
    parser.add_argument("jobs", help="JSON file: a list of jobs")
    parser.add_argument("-o", "--output", help="write the JSON results here (default stdout)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")       # registers and spills, printed
    try:
        import triton  # noqa: F401 - after TRITON_INTERPRET is removed
    except ImportError as exc:
        print(f"aot_runner: cannot import triton with {sys.executable}: {exc}", file=sys.stderr)
        return 3
    try:
        with open(args.jobs, encoding="utf-8") as f:
            jobs = json.load(f)
        if not isinstance(jobs, list):
            raise ValueError("expected a JSON list of jobs")
    except (OSError, ValueError) as exc:
        print(f"aot_runner: cannot read {args.jobs}: {exc}", file=sys.stderr)
        return 2
    results = json.dumps(run_jobs(jobs), indent=1)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(results)
    else:
        print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
