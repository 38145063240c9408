"""The ahead-of-time compile check (codegen/aot.py, codegen/aot_runner.py): generated kernels
compiled for GPU targets without a GPU, in subprocesses without TRITON_INTERPRET.

With this environment's Triton: every pattern of every example for sm_90 in bf16 with head_dim
128 (both dot products on tensor cores), a sample for sm_80, fp16, fp32, head_dim 64/80, a
decoding call (sizes specialised to the constexpr 1), residue-class steps and the ``SAFE_V``
launch that redoes rows which met a non-finite value; a sabotaged hook
and a tile configuration that needs more shared memory than sm_80 has are reported as failures;
the offsets of the operands' base pointers are int64 (read in the TTIR).
With Triton 3.6 (``.venv-triton36``, ``make triton36``; skipped without it): every example for
sm_90 and a sample for sm_80. The backward pass's kernels, with both Triton versions: a sample
of patterns (every launch strategy) for sm_90 bf16 and sm_80 fp16 (tensor cores) and fp32.
All compiles of one Triton version run as one batch in two runner processes; the tests read its
reports.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from attndsl.codegen import aot
from attndsl.codegen.aot_runner import SHARED_LIMITS
from attndsl.codegen.config import Config
from conftest import EXAMPLES, ROOT

import attndsl
from attndsl.cli import main

TRITON36 = Path(os.environ.get("ATTNDSL_TRITON36_PYTHON", ROOT / ".venv-triton36" / "bin" / "python"))
PROCESSES = 2
SAMPLE = ("causal:causal_lm", "softcap:gemma2_local", "packed_documents:packed",
          "relative_bias:clipped_relative_bias", "topp_selection:topp_causal")


SELECTORS = ("bigbird:bigbird", "moba:moba", "topp_selection:topp_causal", "routing:routing")


def _patterns() -> dict:
    return {f"{path.stem}:{pat.name}": pat
            for path in sorted(EXAMPLES.glob("*.attn")) for pat in attndsl.load(path)}


PATTERNS = _patterns()
BF16 = aot.Call(dtype="bf16", head_dim=128)
# (label, call, targets, config, constexpr overrides, patterns)
CASES = [
    ("sm90-bf16-d128", BF16, ["sm_90"], None, {}, list(PATTERNS)),
    ("sm80-bf16-d128", BF16, ["sm_80"], None, {}, SAMPLE[:4]),
    ("fp16-d80", aot.Call(dtype="fp16", head_dim=80), ["sm_90"], None, {}, SAMPLE[1:4]),
    ("fp32-d64", aot.Call(dtype="fp32", head_dim=64), ["sm_80"], None, {}, SAMPLE[:3]),
    ("decode", aot.Call(dtype="bf16", head_dim=64, q_len=1, kv_len=300, heads=1, batch=1),
     ["sm_90"], None, {}, SAMPLE[:2]),
    ("steps3", aot.Call(dtype="fp16", head_dim=64), ["sm_80"], None,
     {"STEP_Q": 3, "STEP_K": 3}, SAMPLE[:1]),
    # the launch that redoes rows which met a non-finite value (a third dot per loop, on tensor
    # cores for half types: the exact count of non-finite V entries at allowed pairs)
    ("safe-v-bf16", BF16, ["sm_90", "sm_80"], None, {"SAFE_V": True}, SAMPLE[:3]),
    ("fp32-safe-v", aot.Call(dtype="fp32", head_dim=64), ["sm_80"], None, {"SAFE_V": True},
     SAMPLE[:1]),
]


def _jobs(python_label: str, cases) -> dict:
    """{(case label, pattern): its jobs (one per launch of the call)}."""
    jobs = {}
    for label, call, targets, config, overrides, names in cases:
        for name in names:
            mine = aot.pattern_jobs(PATTERNS[name], call, targets, config or Config(),
                                    name=f"{python_label} {label} {name}")
            for job in mine:
                job["constexprs"].update(overrides)
            jobs[(label, name)] = mine
    return jobs


def _compile(jobs: dict, python=None) -> dict:
    """{key: the reports of all its jobs and targets}, every job compiled in one batch."""
    flat = [(key, job) for key, mine in jobs.items() for job in mine]
    results = aot.compile_jobs([job for _, job in flat], python=python, processes=PROCESSES)
    out = {key: [] for key in jobs}
    for (key, _), reports in zip(flat, results):
        out[key] += reports
    return out


def _broken_hook(job: dict, folder: Path) -> dict:
    """The job with its hook module copied and its mask hook made to load from an int."""
    text = Path(job["hooks_module"]).read_text(encoding="utf-8")
    hook = job["hooks"]["MASK_FN"]              # the width the call runs (mask_hook32 or mask_hook)
    text, n = re.subn(rf"(def {hook}\(.*?\):\n)", r"\1    bad = tl.load(q_len)\n", text,
                      count=1, flags=re.S)
    assert n == 1
    path = folder / f"broken_{Path(job['hooks_module']).name}"
    path.write_text(text, encoding="utf-8")
    return dict(job, hooks_module=str(path), name="broken mask hook")


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    """A fresh Triton cache, so every kernel is compiled here (and ptxas reports spills)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        mp.setenv("ATTNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))
        yield


# one batch of every compile below (~40 s on 2 cores): the tests that read it are marked slow; the
# CLI tests at the end compile one pattern each and stay in the fast lane
@pytest.fixture(scope="module")
def current(triton_cache, tmp_path_factory):
    """Reports of every case with this environment's Triton, plus the two negative controls."""
    jobs = _jobs("current", CASES)
    for job in jobs[("sm90-bf16-d128", SAMPLE[0])]:
        job["keep"] = ["ttir"]
    causal = _jobs("current", [("broken", BF16, ["sm_90"], None, {}, SAMPLE[:1])])
    jobs[("broken", SAMPLE[0])] = [_broken_hook(job, tmp_path_factory.mktemp("broken"))
                                   for job in causal[("broken", SAMPLE[0])]]
    jobs[("big-tiles", "causal:causal_lm")] = aot.pattern_jobs(
        PATTERNS["causal:causal_lm"], BF16, ["sm_80"], Config(128, 128, 8, 4))
    for name in SELECTORS:      # the configuration autotuning ranks first on an H100
        jobs[("h100-pick", name)] = aot.pattern_jobs(PATTERNS[name], BF16, ["sm_90", "sm_80"],
                                                     Config(128, 64, 8, 3))
    return _compile(jobs)


def _ok(reports):
    assert reports and all(r["ok"] for r in reports), "\n".join(aot.report_lines(reports))


def _tensor_cores(r) -> bool:
    """Every dot product of the kernel (two per loop over key tiles) on tensor cores."""
    return r["dots"] >= 4 and r["dots"] % 2 == 0 and r["tensor_core_dots"] == r["dots"] and bool(
        r["mma"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PATTERNS))
def test_every_example_compiles_for_sm90_bf16_on_tensor_cores(current, name):
    reports = current[("sm90-bf16-d128", name)]
    _ok(reports)
    for r in reports:
        assert _tensor_cores(r), r
        assert r["registers"] and r["spill_stores"] is not None and r["shared_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("label", [c[0] for c in CASES[1:]])
def test_sampled_targets_dtypes_and_head_dims_compile(current, label):
    names = next(c[5] for c in CASES if c[0] == label)
    for name in names:
        reports = current[(label, name)]
        _ok(reports)
        for r in reports:
            if label.startswith("fp32"):     # exact fp32 products: no tensor cores
                assert r["tensor_core_dots"] == 0 and r["mma"] is None, r
            else:
                assert _tensor_cores(r), r


@pytest.mark.slow
def test_operand_offsets_are_int64(current):
    """``Q + b * sqb + ...``: int32 products would wrap around for 2**31 elements or more."""
    (r,) = current[("sm90-bf16-d128", SAMPLE[0])]
    adds = re.findall(r"tt\.addptr %(Q|K|V|O|LSE), [^:]*: !tt\.ptr<\w+>, (i\d+)", r["asm"]["ttir"])
    assert {name for name, _ in adds} == {"Q", "K", "V", "O", "LSE"}, adds
    assert {bits for _, bits in adds} == {"i64"}, adds


@pytest.mark.slow
def test_a_broken_hook_is_reported_with_its_source(current):
    (r,) = current[("broken", SAMPLE[0])]
    assert not r["ok"]
    assert "in mask_hook" in r["error"] and "tl.load(q_len)" in r["error"], r["error"]
    assert "called from _tile" in r["error"]


@pytest.mark.slow
def test_tiles_that_need_more_shared_memory_than_the_target_fail(current):
    (r,) = current[("big-tiles", "causal:causal_lm")]
    assert not r["ok"] and r["shared_bytes"] > SHARED_LIMITS[80]
    assert "OutOfResources" in r["error"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SELECTORS)
def test_selector_tables_leave_room_for_large_pipelined_tiles(current, name):
    """128 x 64 tiles, 3 stages: the selector tables' tile-sized gathers are staged in shared
    memory by the pipeline, so they are int8 / int32 (int64 tables needed 229-262 KB)."""
    _ok(current[("h100-pick", name)])


def test_the_signature_follows_the_launcher():
    from triton.runtime.jit import mangle_type

    for value in (0, 1, 2, 16, 48, 2**31 - 1, 2**31, -5, -2**31, 2**40):
        kind, div = aot.arg_type(value)
        assert kind == mangle_type(value, True), value
        assert div == (value % 16 == 0 and kind != "constexpr")
    assert aot.arg_type(0.5) == ("fp32", False)
    (job,) = aot.pattern_jobs(PATTERNS["causal:causal_lm"], aot.Call(q_len=1, kv_len=64, batch=1))
    sig = job["signature"]
    assert sig["Q"] == "*bf16" and sig["LSE"] == "*fp32" and sig["FULL_IDX"] == "*i32"
    assert sig["q_len"] == "constexpr" and job["constexprs"]["q_len"] == 1
    assert sig["kv_len"] == "i32" and "kv_len" in job["divisible_by_16"]
    assert job["constexprs"]["NATIVE_DOT"] is True and job["hooks"] == {"MASK_FN": "mask_hook32",
                                                                        "SCORE_FN": "mask_hook32"}
    assert list(sig) == aot.kernel_arguments()


def test_the_runner_needs_only_triton():
    text = Path(aot.RUNNER).read_text(encoding="utf-8")
    imported = set(re.findall(r"^\s*(?:from|import) (\w+)", text, flags=re.M))
    assert imported <= {"__future__", "argparse", "contextlib", "hashlib", "importlib", "inspect",
                        "io", "json", "os", "re", "subprocess", "sys", "tempfile", "time",
                        "warnings", "triton"}, imported


@pytest.mark.slow
@pytest.mark.skipif(not TRITON36.exists(), reason=f"no Triton 3.6 environment at {TRITON36} "
                                                  "(`make triton36` creates it)")
def test_every_example_compiles_with_triton_3_6(triton_cache):
    cases = [("sm90-bf16-d128", BF16, ["sm_90"], None, {}, list(PATTERNS)),
             ("sm80-fp16-d64", aot.Call(dtype="fp16", head_dim=64), ["sm_80"], None, {}, SAMPLE),
             ("safe-v-bf16", BF16, ["sm_90"], None, {"SAFE_V": True}, SAMPLE[:2])]
    results = _compile(_jobs("triton36", cases), python=str(TRITON36))
    failed = [f"{key}:\n" + "\n".join(aot.report_lines(reports))
              for key, reports in results.items() if not all(r["ok"] for r in reports)]
    assert not failed, "\n".join(failed)
    assert {r["triton"] for reports in results.values() for r in reports} == {"3.6.0"}
    assert all(_tensor_cores(r) for reports in results.values() for r in reports)


# ----------------------------------------------------------------------------- the backward
# a sample of the backward pass's kernels (attn_bwd_preprocess once, then attn_bwd_dq and
# attn_bwd_dkdv per launch): the plain walk, a score clause with its derivative hook, tensor
# inputs, a selector's tables, a residue-class gather (dilated) and a run-3 gather (strided)
BACKWARD_SAMPLE = SAMPLE + ("dilated:dilated_window", "sparse_transformer:strided_attention")


def _backward_jobs(label: str, call, targets, names) -> dict:
    return {(label, name): aot.backward_jobs(PATTERNS[name], call, targets, Config(),
                                             name=f"{label} {name}", preprocess=i == 0)
            for i, name in enumerate(names)}


def _check_backward(results: dict, half: set) -> None:
    """Every backward job compiled; in the ``half`` cases (bf16/fp16) every dot product of
    the dQ and dK/dV kernels on tensor cores."""
    failed = [f"{key}:\n" + "\n".join(aot.report_lines(reports))
              for key, reports in results.items() if not all(r["ok"] for r in reports)]
    assert not failed, "\n".join(failed)
    reports = [r for (label, _), mine in results.items() if label in half for r in mine]
    kernels = [r for r in reports if r["dots"]]
    # one report without a dot product per case and target: attn_bwd_preprocess (a row sum)
    assert len(reports) - len(kernels) == len(half)
    assert kernels and all(r["dots"] >= 3 and r["tensor_core_dots"] == r["dots"] for r in kernels)


@pytest.mark.slow
def test_backward_kernels_compile(triton_cache):
    jobs = _backward_jobs("bwd-sm90-bf16", BF16, ["sm_90"], BACKWARD_SAMPLE)
    jobs.update(_backward_jobs("bwd-sm80-fp16", aot.Call(dtype="fp16", head_dim=64), ["sm_80"],
                               SAMPLE[:3]))
    jobs.update(_backward_jobs("bwd-sm80-fp32", aot.Call(dtype="fp32", head_dim=64), ["sm_80"],
                               SAMPLE[:2]))
    _check_backward(_compile(jobs), {"bwd-sm90-bf16", "bwd-sm80-fp16"})


@pytest.mark.slow
@pytest.mark.skipif(not TRITON36.exists(), reason=f"no Triton 3.6 environment at {TRITON36} "
                                                  "(`make triton36` creates it)")
def test_backward_kernels_compile_with_triton_3_6(triton_cache):
    jobs = _backward_jobs("bwd-sm90-bf16", BF16, ["sm_90"], BACKWARD_SAMPLE)
    jobs.update(_backward_jobs("bwd-sm80-fp16", aot.Call(dtype="fp16", head_dim=64), ["sm_80"],
                               SAMPLE[:2]))
    results = _compile(jobs, python=str(TRITON36))
    _check_backward(results, {"bwd-sm90-bf16", "bwd-sm80-fp16"})
    assert {r["triton"] for reports in results.values() for r in reports} == {"3.6.0"}


# ----------------------------------------------------------------------------- the CLI


def test_emit_compile_prints_a_report_per_target(triton_cache, capsys):
    path = str(EXAMPLES / "softcap.attn")
    assert main(["emit", path, "-p", "gemma2_local", "--compile", "sm_80,sm_90", "--dtype", "bf16",
                 "--head-dim", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# pattern gemma2_local(cap=50.0, window=4096): bfloat16 d64, triton ")
    assert [line.split()[:2] for line in out[1:]] == [["sm_80", "ok"], ["sm_90", "ok"]]
    assert all("4/4 dots on tensor cores" in line for line in out[1:])


def test_emit_compile_failure_exits_1_without_traceback(triton_cache, tmp_path, monkeypatch, capsys):
    real = aot.pattern_jobs
    monkeypatch.setattr(aot, "pattern_jobs",
                        lambda *a, **k: [_broken_hook(job, tmp_path) for job in real(*a, **k)])
    assert main(["emit", str(EXAMPLES / "causal.attn"), "--compile", "sm_90"]) == 1
    captured = capsys.readouterr()
    assert "sm_90  FAILED" in captured.out and "tl.load(q_len)" in captured.out
    assert "error: the kernel does not compile: causal_lm for sm_90" in captured.err
    assert "Traceback" not in captured.out + captured.err


def test_emit_compile_user_errors(tmp_path, capsys):
    path = str(EXAMPLES / "causal.attn")
    assert main(["emit", path, "--compile", "sm_9x"]) == 2
    assert "unknown target 'sm_9x'" in capsys.readouterr().err
    assert main(["emit", path, "--dtype", "fp16"]) == 1
    assert "--dtype is an option of --compile" in capsys.readouterr().err
    assert main(["emit", path, "--compile", "sm_90", "--python", str(tmp_path / "nope")]) == 1
    assert "no Python interpreter at" in capsys.readouterr().err
    fake = tmp_path / "python"                  # a Python without triton: a clear message
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    fake.chmod(0o755)
    assert main(["emit", path, "--compile", "sm_90", "--python", str(fake)]) == 1
    err = capsys.readouterr().err
    assert "cannot import triton" in err and "Traceback" not in err


def test_runner_refuses_a_bad_jobs_file(tmp_path):
    import subprocess

    bad = tmp_path / "jobs.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, str(aot.RUNNER), str(bad)], capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                       if k != "TRITON_INTERPRET"})
    assert proc.returncode == 2 and "cannot read" in proc.stderr
