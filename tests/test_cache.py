"""The kernel cache (codegen/cache.py): what runs is the verified generated text (no cached
bytecode, no file read after the check), and an unusable cache folder falls back to a private
temporary folder with one warning instead of raising."""

from __future__ import annotations

import importlib.util
import inspect
import os
import stat
import sys
import tempfile
import threading
import warnings
from importlib._bootstrap_external import _code_to_timestamp_pyc

import numpy as np
import pytest
import torch
from attndsl.codegen import autotune, cache

import attndsl

CUDA = torch.cuda.is_available()
INTERPRET = not CUDA
BACKEND = "triton" if CUDA else "triton-interpret"
DEVICE = "cuda" if CUDA else "cpu"
BODY = "LOG2E = 1.4426950408889634\n\ndef log2e():\n    return LOG2E\n"
ALTERED = BODY.replace("1.44", "2.44")


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """Every test its own configured folder and a process state that has loaded nothing."""
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(cache, "_LOADED", {})
    monkeypatch.setattr(cache, "_DIRS", {})
    monkeypatch.setattr(cache, "_FALLBACK", [])
    autotune.forget()
    yield
    autotune.forget()


def _entry(body: str = BODY):
    """The module of ``body`` and its cache file."""
    module = cache.load_module(body, INTERPRET, prefix="attndsl_test")
    return module, cache.cache_dir() / f"{module.__name__}.py"


def _reload(body: str = BODY):
    """Load ``body`` again as a new process would (nothing loaded yet in memory)."""
    cache._LOADED.clear()
    for name in [n for n in sys.modules if n.startswith("attndsl_test_")]:
        del sys.modules[name]
    return cache.load_module(body, INTERPRET, prefix="attndsl_test")


def _plant_pyc(path, text: str) -> None:
    """A timestamp pyc of ``text`` beside ``path`` that importlib accepts for the file on disk
    (same mtime and size): what a corrupt or swapped cached bytecode file looks like."""
    st = path.stat()
    code = compile(text, str(path), "exec")
    pyc = importlib.util.cache_from_source(str(path))
    os.makedirs(os.path.dirname(pyc), exist_ok=True)
    with open(pyc, "wb") as f:
        f.write(_code_to_timestamp_pyc(code, st.st_mtime, st.st_size))


# ------------------------------------------------------------------ what runs is what was checked
def test_an_altered_pyc_does_not_change_module_constants():
    module, path = _entry()
    assert module.log2e() == 1.4426950408889634
    _plant_pyc(path, cache._header(ALTERED) + ALTERED)
    again = _reload()
    assert again is not module and again.log2e() == 1.4426950408889634
    assert again.__file__ == str(path)


def test_no_bytecode_is_written_beside_the_cache_files(monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)      # as by default
    _, path = _entry()
    assert not (path.parent / "__pycache__").exists()


def test_a_file_swapped_after_the_check_does_not_run(monkeypatch):
    """A concurrent writer that swaps the file between the check and the load."""
    _, path = _entry()
    valid = cache._valid

    def swapped_after_check(p, text):
        ok = valid(p, text)
        p.write_text(cache._header(ALTERED) + ALTERED)
        return ok

    monkeypatch.setattr(cache, "_valid", swapped_after_check)
    assert _reload().log2e() == 1.4426950408889634


def test_a_swapped_or_truncated_file_is_rewritten():
    _, path = _entry()
    for bad in (cache._header(ALTERED) + ALTERED, cache._header(BODY) + ALTERED, BODY[:7], ""):
        path.write_text(bad)
        assert _reload().log2e() == 1.4426950408889634
        assert path.read_text() == cache._header(BODY) + BODY


def test_a_concurrent_writer_never_changes_what_is_loaded():
    _, path = _entry()
    stop = threading.Event()

    def scribble():
        while not stop.is_set():
            cache.write_atomically(path, cache._header(ALTERED) + ALTERED)

    writer = threading.Thread(target=scribble)
    writer.start()
    try:
        values = {_reload().log2e() for _ in range(50)}
    finally:
        stop.set()
        writer.join()
    assert values == {1.4426950408889634}


def test_source_lookup_reads_the_text_that_runs():
    """inspect (and so Triton's @jit) sees the checked text even when the file changes later."""
    module, path = _entry()
    path.write_text(cache._header(ALTERED) + ALTERED)
    assert "1.4426950408889634" in inspect.getsource(module)
    assert inspect.getsource(module.log2e) == "def log2e():\n    return LOG2E\n"


JIT = ("import triton\nimport triton.language as tl\n\nVALUE = tl.constexpr(3.0)\n\n\n"
       "@triton.jit\ndef put(out_ptr):\n    tl.store(out_ptr, VALUE)\n")


def test_a_jit_kernel_runs_the_checked_source():
    """Triton reads a @jit function's source through inspect (at decoration in compiled mode, at
    the first run under the interpreter): a file altered after the load does not reach it."""
    module, path = _entry(JIT)
    path.write_text(cache._header(JIT) + JIT.replace("VALUE)", "VALUE + 1.0)"))
    out = torch.zeros(1, device=DEVICE)
    module.put[(1,)](out)
    assert out.item() == 3.0


def test_an_altered_skeleton_pyc_does_not_change_the_lse():
    pat = attndsl.compile("pattern p:\n    mask = causal\n")["p"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 20, 16, generator=g).to(DEVICE) for _ in range(3))
    _, lse = pat(q, k, v, return_lse=True, backend=BACKEND)
    skel = cache.load_module(pat.triton_source(), INTERPRET)    # the skeleton is in the module
    path = cache.cache_dir() / f"{skel.__name__}.py"
    text = path.read_text()
    assert "LN2 = tl.constexpr(0.6931471805599453)" in text
    _plant_pyc(path, text.replace("LN2 = tl.constexpr(0.6931471805599453)",
                                  "LN2 = tl.constexpr(0.5931471805599453)"))
    cache._LOADED.clear()
    _, again = pat(q, k, v, return_lse=True, backend=BACKEND)
    _, ref = pat.reference(q.cpu(), k.cpu(), v.cpu())
    assert np.allclose(again.cpu().double().numpy(), ref, atol=1e-4)
    assert torch.equal(again, lse)


# ------------------------------------------------------------------ an unusable cache folder
def _load_warns_once():
    """Load two modules: both run, from files in a private (0700) fallback folder, after exactly
    one warning that names the unusable folder and the one used instead."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        module, path = _entry()
        other, _ = _entry(JIT)
    assert module.log2e() == 1.4426950408889634 and hasattr(other, "put")
    ours = [w for w in seen if "kernel cache folder" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in seen]
    folder = path.parent
    assert str(folder) != os.environ["ATTNDSL_CACHE_DIR"] and path.is_file()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert str(folder) in str(ours[0].message)
    assert os.environ["ATTNDSL_CACHE_DIR"] in str(ours[0].message)


def test_a_cache_folder_that_is_a_file_falls_back(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "file"))
    _load_warns_once()


def test_a_cache_folder_whose_mkdir_fails_falls_back(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "file" / "kernels"))
    _load_warns_once()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_falls_back(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(folder))
    try:
        _load_warns_once()
    finally:
        folder.chmod(0o700)


def _refuse_writes_in(monkeypatch, folder):
    """Writing a file in ``folder`` fails as in a read-only folder (also for root)."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        where = kwargs.get("dir", args[2] if len(args) > 2 else None)
        if where is not None and os.path.abspath(where) == str(folder):
            raise PermissionError(13, "Permission denied", str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_a_cache_folder_that_refuses_writes_falls_back(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(folder))
    _refuse_writes_in(monkeypatch, folder)
    _load_warns_once()


def test_a_folder_that_stops_taking_writes_falls_back(tmp_path, monkeypatch):
    """Usable at first (already resolved), then a write fails: the fallback, one warning."""
    folder = tmp_path / "kernels"
    assert cache.cache_dir() == folder
    _refuse_writes_in(monkeypatch, folder)
    _load_warns_once()


def test_an_entry_path_taken_by_a_folder_falls_back(tmp_path):
    name = f"attndsl_test_{cache.module_key(BODY, INTERPRET)}.py"
    (cache.cache_dir() / name).mkdir()
    with pytest.warns(UserWarning, match="kernel cache folder"):
        module, path = _entry()
    assert module.log2e() == 1.4426950408889634 and path.is_file()


def test_no_folder_at_all_is_an_attn_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "file"))

    def mkdtemp(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/tmp")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(attndsl.AttnCallError, match="ATTNDSL_CACHE_DIR"):
        cache.load_module(BODY, INTERPRET, prefix="attndsl_test")


def test_a_call_with_an_unusable_cache_runs_and_warns(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "file"))
    pat = attndsl.compile("pattern p(w = 5):\n    mask = causal and sliding(w)\n")["p"]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
    with pytest.warns(UserWarning, match="kernel cache folder") as seen:
        out = pat(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), backend=BACKEND)
    assert len([w for w in seen if "kernel cache folder" in str(w.message)]) == 1
    ref, _ = pat.reference(q, k, v)
    assert np.allclose(out.cpu().double().numpy(), ref, atol=1e-4)


def test_the_autotune_store_follows_the_fallback(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="kernel cache folder"):
        path = autotune.store_path()
    assert path.parent == cache.cache_dir() and path.parent != tmp_path / "file"
    entry = {"config": {"chosen": "16x16"}}
    autotune._save("key", entry)
    assert autotune._read(path)["key"] == entry


def test_the_compile_runner_reads_no_bytecode_from_the_cache(monkeypatch):
    """The ahead-of-time runner imports the cached hook module in a process of its own: its
    bytecode goes to a folder of that run, never to (or from) the cache's __pycache__ (with
    bytecode writing on, as it is by default)."""
    from attndsl.codegen import aot

    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)

    pat = attndsl.compile("pattern c:\n    mask = causal\n")["c"]
    jobs = aot.pattern_jobs(pat, aot.Call(dtype="fp16", head_dim=16), targets=["sm_80"])
    assert jobs and all(str(cache.cache_dir()) in job["hooks_module"] for job in jobs)
    reports = aot.compile_jobs(jobs)
    assert [len(r) for r in reports] == [1] * len(jobs)
    assert not (cache.cache_dir() / "__pycache__").exists()
