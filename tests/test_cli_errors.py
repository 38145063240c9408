"""The command-line tool on odd arguments and the reports a newcomer reads: every failure is a
rendered error (exit status 1, or argparse's usage error, 2), never a traceback; analyze's reach
and asymptotic lines say what kind of bound they are; testgen's cases exercise the pattern's
parameters (attndsl/cli.py, cli_analyze.py, cli_codegen.py)."""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest

import attndsl
from attndsl import cli
from attndsl.cli import main
from attndsl.cli_codegen import SCALE_TO, SHAPES

T5 = ("pattern t5(bucket: int[], rel: float[][]):\n    mask = causal\n"
      "    score = score + rel[h, bucket[abs(q - k)]]\n")
SLIDING = "pattern s(w = 512):\n    mask = causal and q - k < w\n"


def _write(tmp_path, text: str, name: str = "p.attn") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _no_traceback(captured) -> str:
    text = captured.out + captured.err
    assert "Traceback" not in text and "internal error" not in text, text
    return text


# ------------------------------------------------------------------ odd arguments
@pytest.mark.parametrize("command", ["show", "run", "analyze"])
@pytest.mark.parametrize("seed", ["-1", str(1 << 63), "x"])
def test_a_bad_seed_is_a_usage_error(tmp_path, capsys, command, seed):
    path = _write(tmp_path, SLIDING)
    assert main([command, path, "--q-len", "8", "--seed", seed]) == 2
    assert "argument --seed" in _no_traceback(capsys.readouterr())


def test_an_allocation_failure_is_a_rendered_error(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path, SLIDING)

    def huge(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(cli, "show_one", huge)
    assert main(["show", path]) == 1
    captured = capsys.readouterr()
    assert "error: not enough memory for these sizes" in captured.err
    assert "Traceback" not in captured.out + captured.err


def test_an_internal_error_is_one_rendered_line(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path, SLIDING)

    def broken(*args, **kwargs):
        raise IndexError("argmax of an empty axis")

    monkeypatch.setattr("attndsl.cli_analyze.analyze_one", broken)
    monkeypatch.delenv("ATTNDSL_TRACEBACK", raising=False)
    assert main(["analyze", path]) == 1
    captured = capsys.readouterr()
    assert "error: internal error (a bug in attndsl" in captured.err
    assert "IndexError: argmax of an empty axis" in captured.err
    assert "Traceback" not in captured.out + captured.err
    monkeypatch.setenv("ATTNDSL_TRACEBACK", "1")
    with pytest.raises(IndexError):
        main(["analyze", path])


@pytest.mark.parametrize("argv", [
    ["analyze", "{p}", "--q-len", "0"],
    ["analyze", "{p}", "--q-len", "8", "--kv-len", "0"],
    ["show", "{p}", "--q-len", "0", "--kv-len", "5"],
    ["run", "{p}", "--q-len", "5", "--kv-len", "0", "--heads", "1", "--head-dim", "8"],
])
def test_empty_calls_run(tmp_path, capsys, argv):
    path = _write(tmp_path, SLIDING)
    assert main([a.format(p=path) for a in argv]) == 0
    _no_traceback(capsys.readouterr())


def test_emit_compile_refuses_an_unknown_target_before_compiling(tmp_path, capsys, monkeypatch):
    from attndsl.codegen import aot

    def never(*args, **kwargs):
        raise AssertionError("compiled for an unknown target")

    monkeypatch.setattr(aot, "compile_jobs", never)
    path = _write(tmp_path, SLIDING)
    for target in ("sm_42", "sm_80,sm_42", "sm_75a"):
        assert main(["emit", path, "--compile", target]) == 2
        err = _no_traceback(capsys.readouterr())
        assert "argument --compile: unknown target 'sm_4" in err or "'sm_75a'" in err


def test_a_cache_folder_that_is_a_file_falls_back_with_one_warning(tmp_path, capsys,
                                                                     monkeypatch):
    from attndsl.codegen import cache

    monkeypatch.setattr(cache, "_LOADED", {})
    monkeypatch.setattr(cache, "_DIRS", {})
    monkeypatch.setattr(cache, "_FALLBACK", [])
    (tmp_path / "kernels").write_text("not a folder")
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "kernels"))
    path = _write(tmp_path, SLIDING)
    with pytest.warns(UserWarning, match="kernel cache folder") as seen:
        assert main(["run", path, "--q-len", "20", "--heads", "2", "--head-dim", "16",
                     "--backend", "triton-interpret"]) == 0
    assert len([w for w in seen if "kernel cache folder" in str(w.message)]) == 1
    assert "PASS s:" in _no_traceback(capsys.readouterr())


# ------------------------------------------------------------------ demo inputs
@pytest.mark.parametrize("command", ["show", "run", "analyze"])
def test_demo_inputs_of_a_tensor_indexed_by_another(tmp_path, capsys, command):
    path = _write(tmp_path, T5)
    assert main([command, path, "--q-len", "16", "--heads", "2"]) == 0
    out = _no_traceback(capsys.readouterr())
    if command != "show":
        shape = [line for line in out.splitlines() if "rel: random Gaussian" in line][0]
        assert "of shape [2, 1]" not in shape        # probed after bucket got its values
    if command == "run":
        assert "PASS t5:" in out


# ------------------------------------------------------------------ analyze
REACH = """\
pattern anti:
    mask = k >= q
pattern blocks:
    mask = q // 8 == k // 8
pattern window(w = 3):
    mask = abs(q - k) <= w
"""


def _line(out: str, pattern: str, key: str) -> str:
    block = out.split(f"{pattern}(")[1]
    return [line for line in block.splitlines() if line.strip().startswith(key)][0]


def test_reach_line_of_non_causal_patterns(tmp_path, capsys):
    path = _write(tmp_path, REACH)
    assert main(["analyze", path, "--q-len", "64"]) == 0
    out = capsys.readouterr().out
    for name in ("anti", "blocks"):
        line = _line(out, name, "reach depth")
        assert "earlier key" not in line
        assert "never: some query never reaches some key (earlier or later)" in line
        assert "all pairs (bidirectional" in line and "at most" not in line
    line = _line(out, "window", "reach depth")
    assert "reach depth     21 layers; all pairs" in line


def test_reach_line_of_the_tile_graph_says_which_way_each_bound_goes(tmp_path, capsys):
    path = _write(tmp_path, REACH)
    assert main(["analyze", path, "-p", "window", "--q-len", "4096",
                 "--graph-tokens", "1024"]) == 0
    line = _line(capsys.readouterr().out, "window", "reach depth")
    assert line.split("reach depth")[1].strip().startswith("at least ")
    assert "reached at most L=1:" in line and "tile graph of 128-token tiles" in line


def test_a_two_point_growth_estimate_is_labelled(tmp_path, capsys):
    path = _write(tmp_path, "pattern sq:\n    mask = causal and (q - k) * (q - k) <= q\n")
    assert main(["analyze", path, "--q-len", "1024"]) == 0
    line = _line(capsys.readouterr().out, "sq", "asymptotic")
    assert "O(N**1." in line
    assert "two-point estimate from the kept pairs at N=1024 and N=2048" in line
    path = _write(tmp_path, SLIDING, "s.attn")         # a closed form: no estimate label
    assert main(["analyze", path, "--q-len", "1024"]) == 0
    line = _line(capsys.readouterr().out, "s", "asymptotic")
    assert "O(N*w)" in line and "estimate" not in line


def test_analyze_prints_the_graph_notes(tmp_path, capsys):
    path = _write(tmp_path, T5)
    assert main(["analyze", path, "--q-len", "32"]) == 0
    assert "note: the score clause is not analysed" in capsys.readouterr().out


# ------------------------------------------------------------------ testgen
def _patterns(path) -> list:
    tree = ast.parse(path.read_text())
    return next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and node.targets[0].id == "PATTERNS")


def test_testgen_scales_parameters_to_the_generated_lengths(tmp_path, capsys):
    """A window of 512 is never exercised at lengths of at most 130: the generated cases use
    a window the lengths exceed, say so, and the mask then differs from plain causal."""
    src = _write(tmp_path, SLIDING + "pattern two(w = 256, g = 64, s = 3):\n"
                                     "    mask = causal and (q - k < w or k < g) or k == q + s\n")
    out = tmp_path / "test_gen.py"
    assert main(["testgen", src, "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "s: w 512 -> 32" in captured.out and "two: w 256 -> 32, g 64 -> 8" in captured.out
    assert dict(_patterns(out)) == {"s": {"w": 32}, "two": {"w": 32, "g": 8, "s": 3}}
    assert "scaled to the test lengths from w 512 -> 32" in out.read_text()
    assert max(max(s[3], s[4]) for s in SHAPES) > SCALE_TO
    pat = attndsl.compile(SLIDING)["s"].bind(w=32)
    n = max(s[4] for s in SHAPES)
    assert not np.array_equal(pat.dense_mask(n, n), np.tril(np.ones((1, n, n), bool)))
    assert "warning" not in captured.err


def test_testgen_names_a_parameter_that_changes_nothing(tmp_path, capsys):
    src = _write(tmp_path, "pattern f(frame = 30):\n"
                           "    mask = causal and q // (frame * frame) == k // (frame * frame)\n")
    out = tmp_path / "test_f.py"
    assert main(["testgen", src, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: pattern 'f': parameter frame = 30 changes nothing at the generated shapes" \
        in err
    src = _write(tmp_path, SLIDING, "s.attn")
    assert main(["testgen", src, "-o", str(out), "--keep-params"]) == 0
    captured = capsys.readouterr()
    assert dict(_patterns(out)) == {"s": {"w": 512}} and "scaled" not in captured.out
    assert "parameter w = 512 changes nothing" in captured.err
    assert "--keep-params" in ast.literal_eval(
        [line for line in out.read_text().splitlines() if line.startswith("COMMAND = ")][0]
        .split(" = ", 1)[1])
    assert os.path.exists(out)
