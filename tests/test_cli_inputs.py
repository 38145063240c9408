"""Tensor inputs from files on the command line: ``--input NAME=PATH`` (.npy, .pt) on ``show``,
``run``, ``analyze``, ``emit --q-len`` and ``testgen`` (attndsl/cli_common.py), checked like call
arguments, with demo values for the inputs not given, derived from the given ones where a demo
value depends on them (a document's first positions, a table indexed by a given tensor)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pattern, write_file

from attndsl import AttnCallError
from attndsl.cli import main
from attndsl.cli_common import Given, call_inputs

DOCS = """\
pattern doc_window(doc: int[], doc_start: int[], window = 3):
    mask = doc[q] == doc[k] and at(sliding(window), q = q - doc_start[doc[q]],
                                   k = k - doc_start[doc[k]])

pattern packed(doc: int[]):
    mask = causal and doc[q] == doc[k]
"""

BUCKETS = """\
pattern t5(bucket: int[], rel: float[][]):
    mask = causal
    score = score + rel[h, bucket[abs(q - k)]]
"""

BIAS = """\
pattern bias(rel: float[][], max_dist = 4):
    mask = causal
    score = score + rel[h, clamp(q - k, 0, max_dist)]
"""

DOC = np.repeat([0, 1, 2], [5, 7, 4])            # 16 positions, three documents


pytestmark = pytest.mark.usefixtures("wide_terminal")


def _npy(tmp_path: Path, name: str, array) -> str:
    path = tmp_path / name
    np.save(path, np.asarray(array))
    return str(path)


def _starts(doc) -> np.ndarray:
    """Each document's first position, written here from the definition."""
    return np.array([i for i in range(len(doc)) if i == 0 or doc[i] != doc[i - 1]])


def _expected_window(doc, window: int) -> np.ndarray:
    """[1, L, L] the doc_window mask, from its definition: same document, 0 <= q - k < window."""
    n = len(doc)
    return np.array([[[doc[i] == doc[j] and 0 <= i - j < window for j in range(n)]
                      for i in range(n)]])


def _error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    return err


# ----------------------------------------------------------------------------- show


def test_show_draws_the_given_documents_with_their_derived_starts(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    doc = _npy(tmp_path, "doc.npy", DOC)
    assert main(["show", src, "-p", "doc_window", "--q-len", "16", "--view", "cells",
                 "--input", f"doc={doc}"]) == 0
    out = capsys.readouterr().out
    want = _expected_window(DOC, 3)
    assert f"density {want.mean():.3f} ({int(want.sum())} of 256 pairs)" in out
    assert f"doc: from {doc} (int64, shape [16])" in out
    assert "doc_start: the first position of each document of doc" in out
    rows = [line[1:-1] for line in out.splitlines() if line.startswith("│")]
    assert rows == ["".join("█" if x else "·" for x in row) for row in want[0]]


def test_show_without_input_keeps_the_demo_documents(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    assert main(["show", src, "-p", "packed", "--q-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "random documents covering 16 positions" in out and "from " not in out


# ----------------------------------------------------------------------------- run


def test_run_with_a_pt_input_passes_and_says_where_it_came_from(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    path = tmp_path / "doc.pt"
    torch.save(torch.tensor(DOC, dtype=torch.int32), path)
    assert main(["run", src, "--q-len", "16", "--heads", "2", "--head-dim", "8",
                 "--input", f"doc={path}"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"doc: from {path} (int32, shape [16])") == 2      # both patterns
    assert "PASS doc_window" in out and "PASS packed" in out
    want = _expected_window(DOC, 3)
    assert f"density {want.mean():.3f} ({2 * int(want.sum())} of 512 pairs)" in out


def test_run_with_a_dict_pt_file_and_per_batch_inputs(tmp_path, capsys):
    src = write_file(tmp_path, "bias.attn", BIAS)
    rel = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))   # [batch, heads, 5]
    path = tmp_path / "tables.pt"
    torch.save({"rel": rel, "other": torch.zeros(2)}, path)
    assert main(["run", src, "--q-len", "12", "--heads", "3", "--batch", "2", "--head-dim", "8",
                 "--input", f"rel={path}"]) == 0
    out = capsys.readouterr().out
    assert "rel: from" in out and "shape [2, 3, 5]" in out and "PASS bias" in out
    # a batch dimension that does not match the call's batch size
    assert main(["run", src, "--q-len", "12", "--heads", "3", "--batch", "3",
                 "--input", f"rel={path}"]) == 1
    captured = capsys.readouterr()
    assert "has a batch dimension of size 2, but the call's batch size is 3" in captured.err
    assert "FAIL bias" in captured.out


def test_a_per_batch_input_needs_the_others_given_too(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    doc = _npy(tmp_path, "doc.npy", np.stack([DOC, DOC[::-1]]))
    err = _error(capsys, ["run", src, "-p", "doc_window", "--q-len", "16", "--batch", "2",
                          "--input", f"doc={doc}"])
    assert "needs every tensor input given with --input (missing: doc_start)" in err
    starts = _npy(tmp_path, "starts.npy", np.stack([_starts(DOC), _starts(DOC[::-1])]))
    assert main(["run", src, "-p", "doc_window", "--q-len", "16", "--batch", "2",
                 "--head-dim", "8", "--input", f"doc={doc}", "--input",
                 f"doc_start={starts}"]) == 0
    assert "(batch element 0)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- analyze, emit


def test_analyze_uses_the_given_input(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    doc = _npy(tmp_path, "doc.npy", DOC)
    assert main(["analyze", src, "-p", "doc_window", "--q-len", "16", "--block", "4", "--json",
                 "--input", f"doc={doc}"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    want = _expected_window(DOC, 3)
    assert result["cost"]["kept_pairs"] == int(want.sum())
    assert f"doc: from {doc} (int64, shape [16])" in result["notes"]


def test_emit_takes_inputs_with_q_len_only(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    doc = _npy(tmp_path, "doc.npy", DOC)
    assert main(["emit", src, "-p", "packed", "--q-len", "16", "--input", f"doc={doc}"]) == 0
    assert "# pattern packed(doc: int[])" in capsys.readouterr().out
    assert "--input is an option of --q-len" in _error(capsys, ["emit", src, "--input",
                                                                f"doc={doc}"])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case", ["float", "rank", "unknown", "scalar", "missing", "junk",
                                  "extension", "npz", "pt-list", "pt-dict", "twice", "size"])
def test_input_errors_are_rendered_with_exit_status_1(tmp_path, capsys, case):
    src = write_file(tmp_path, "docs.attn", DOCS)
    doc = _npy(tmp_path, "doc.npy", DOC)
    args = {
        "float": (f"doc={_npy(tmp_path, 'f.npy', DOC.astype(float))}",
                  "tensor input 'doc' is declared int[] and needs integers, got dtype float64"),
        "rank": (f"doc={_npy(tmp_path, 'r.npy', DOC[None, None])}",
                 "is declared int[] (1 dimension, plus an optional batch dimension), got shape "
                 "[1, 1, 16]"),
        "unknown": (f"dox={doc}", "--input dox: no tensor input 'dox' in patterns doc_window, "
                                  "packed (tensor inputs: doc, doc_start)"),
        "scalar": (f"window={doc}", "'window' is a compile-time parameter of pattern "
                                    "'doc_window'; set it with --set window=VALUE"),
        "missing": (f"doc={tmp_path / 'nope.npy'}", "cannot read"),
        "junk": (f"doc={write_file(tmp_path, 'junk.npy', 'not an array')}",
                 "is not a .npy file (no NumPy header)"),
        "extension": (f"doc={write_file(tmp_path, 'doc.csv', '0,1')}",
                      "expected a .npy file (numpy.save) or a .pt file (torch.save), got a .csv "
                      "file"),
        "npz": (f"doc={tmp_path / 'a.npy'}", "is not a .npy file (a zip archive (.npz?))"),
        "pt-list": (f"doc={tmp_path / 'l.pt'}", "holds a list; save one tensor"),
        "pt-dict": (f"doc={tmp_path / 'd.pt'}", "holds a dict without a tensor 'doc' (keys: "
                                                "starts)"),
        "twice": (f"doc={doc}", "--input doc: given more than once"),
        "size": (f"doc={_npy(tmp_path, 's.npy', DOC[:8])}",
                 "index 8 is out of range for tensor input 'doc' of size 8"),
    }
    np.savez(tmp_path / "a.npz", doc=DOC)
    os.replace(tmp_path / "a.npz", tmp_path / "a.npy")
    torch.save([1, 2], tmp_path / "l.pt")
    torch.save({"starts": torch.zeros(3)}, tmp_path / "d.pt")
    given, message = args[case]
    argv = ["show", src, "--q-len", "16", "--input", given]
    argv += ["--input", given] if case == "twice" else []
    err = _error(capsys, argv)
    assert message in err
    if case not in ("unknown", "scalar", "twice"):
        assert f"--input doc={given.partition('=')[2]}" in err or case == "size"


def test_a_malformed_option_is_a_usage_error(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    for bad in ("doc", "=x.npy", "doc=", "1x=a.npy"):
        assert main(["show", src, "--input", bad]) == 2
        assert "expected NAME=PATH" in capsys.readouterr().err


# ----------------------------------------------------------------------------- demo values around given ones


def test_a_demo_table_takes_its_shape_from_a_given_index_tensor():
    pat = pattern(BUCKETS)
    bucket = np.minimum(np.arange(20), 6)           # values 0..6: rel needs 7 columns
    inputs = call_inputs(pat, {"bucket": Given("b.npy", bucket)}, (20, 20, 2, 2), 8,
                         np.random.default_rng(0))
    assert inputs.values["rel"].shape == (2, 7)
    assert inputs.values["bucket"] is bucket
    bigger = np.minimum(np.arange(20), 11)
    inputs = call_inputs(pat, {"bucket": Given("b.npy", bigger)}, (20, 20, 2, 2), 8,
                         np.random.default_rng(0))
    assert inputs.values["rel"].shape == (2, 12)


def test_a_given_start_table_is_kept_and_demo_documents_fill_the_rest():
    pat = pattern(DOCS, "doc_window")
    starts = np.array([0, 6, 11, 16])
    inputs = call_inputs(pat, {"doc_start": Given("s.npy", starts)}, (16, 16, 1, 1), 8,
                         np.random.default_rng(0))
    assert inputs.values["doc_start"] is starts
    assert inputs.values["doc"].shape == (16,) and "random documents" in inputs.notes[1]
    derived = call_inputs(pat, {"doc": Given("d.npy", DOC)}, (16, 16, 1, 1), 8,
                          np.random.default_rng(0))
    assert derived.values["doc_start"][:3].tolist() == _starts(DOC).tolist()
    with pytest.raises(AttnCallError, match="do not fit q_len 16"):
        call_inputs(pat, {"doc": Given("d.npy", DOC[:10])}, (16, 16, 1, 1), 8,
                    np.random.default_rng(0))


# ----------------------------------------------------------------------------- testgen


def _load(path: Path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")      # the generated file sets it otherwise
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_testgen_embeds_the_given_inputs_and_uses_them_at_every_shape(tmp_path, capsys,
                                                                       monkeypatch):
    src = write_file(tmp_path, "docs.attn", DOCS)
    doc = np.repeat(np.arange(5), [30, 20, 40, 10, 30])       # 130 positions: every kv_len
    path = _npy(tmp_path, "doc.npy", doc.astype(np.int16))
    out = tmp_path / "gen" / "test_generated_docs.py"
    out.parent.mkdir()
    assert main(["testgen", src, "-p", "doc_window", "-o", str(out), "--input",
                 f"doc={path}"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out
    # q_len > kv_len reads doc[q] at q < 0: those shapes are named, and will be skipped
    assert "the --input tensors (doc) do not fit 2 of the 8 shapes" in captured.err
    assert "q_len 45, kv_len 37" in captured.err
    os.remove(path)                                    # the values are embedded
    module = _load(out, monkeypatch)
    assert f"--input doc={path}" in module.COMMAND
    assert module.INPUTS["doc_window"]["doc"].dtype == np.int64     # the declared type
    assert np.array_equal(module.INPUTS["doc_window"]["doc"], doc)
    for shape in module.SHAPES[2:5]:
        _, _, _, tensors = module._call("doc_window", {"window": 3}, shape)
        assert np.array_equal(tensors["doc"], doc)
        assert tensors["doc_start"][:5].tolist() == _starts(doc).tolist()
    env = dict(os.environ, TRITON_INTERPRET="1", ATTNDSL_CACHE_DIR=str(tmp_path / "kernels"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-k", "kernel and 1x50-d16", str(out)], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr


def test_testgen_refuses_an_input_too_large_to_embed(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    path = _npy(tmp_path, "doc.npy", np.zeros(20000, np.int64))
    out = tmp_path / "test_x.py"
    err = _error(capsys, ["testgen", src, "-p", "packed", "-o", str(out), "--input",
                          f"doc={path}"])
    assert "20000 values are too many to embed" in err and not out.exists()


# ----------------------------------------------------------------------------- bench


def test_bench_times_the_pattern_and_dense_attention_with_a_given_input(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    doc = _npy(tmp_path, "doc.npy", DOC)
    assert main(["bench", src, "-p", "packed", "--q-len", "16", "--heads", "2", "--kv-heads", "1",
                 "--head-dim", "8", "--repeat", "1", "--backward", "--input", f"doc={doc}"]) == 0
    out = capsys.readouterr().out
    assert "packed: torch on cpu, float32, q [1, 2, 16, 8], k and v [1, 1, 16, 8], forward and " \
           "backward, median of 1" in out
    assert f"doc: from {doc} (int64, shape [16])" in out
    assert "ms, dense causal SDPA" in out and "x its time" in out


def test_bench_checks_its_inputs_like_a_call(tmp_path, capsys):
    src = write_file(tmp_path, "docs.attn", DOCS)
    bad = _npy(tmp_path, "doc.npy", np.zeros((2, 3, 4), np.int64))
    err = _error(capsys, ["bench", src, "-p", "packed", "--q-len", "16", "--repeat", "1",
                          "--input", f"doc={bad}"])
    assert "doc" in err and "error" in err


def test_dense_baseline_is_bottom_right_causal():
    from attndsl.cli_bench import _dense

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 8, generator=gen) for n in (5, 9, 9))
    k, v = k[:, :2], v[:, :2]                           # GQA: 4 query heads, 2 key heads
    want = pattern("pattern c:\n    mask = causal\n")(q, k, v, backend="torch")
    assert torch.allclose(_dense(q, k, v, causal=True), want, atol=1e-5)
