"""The command-line tool: ``attndsl check | show | run`` (attndsl/cli.py, attndsl/render.py)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_file

import attndsl
from attndsl import cli, render

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

TWO = """\
def near(w) = abs(q - k) <= w

pattern a:
    mask = causal

pattern b(w = 2):
    mask = near(w)
"""

BAD = """\
pattern a(w = 4):
    mask = causal and windw(128)

pattern b:
    mask = k <= q + 1.0
"""

CAUSAL = "pattern causal_lm:\n    mask = causal\n"

HEADS = "pattern duo(n = 1):\n    mask = causal if h < n else sliding(2)\n"

REQUIRED = "pattern win(w: int):\n    mask = sliding(w)\n"

PACKED = "pattern packed(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n"

BIAS = """\
pattern bias(rel: float[][], max_dist = 8):
    mask = causal
    score = score + rel[h, clamp(q - k, 0, max_dist)]
"""

SELECTORS = """\
pattern moba(n = 2, b = 16):
    mask = causal and (topk_blocks(n, b) or q // b == k // b)

pattern routing(c: float[][][]):
    mask = causal and route(c)
"""


pytestmark = pytest.mark.usefixtures("wide_terminal")


def console_script() -> str:
    here = Path(sys.executable).parent / "attndsl"
    found = str(here) if here.exists() else shutil.which("attndsl")
    if not found:
        pytest.skip("the attndsl console script is not installed")
    return found


# ----------------------------------------------------------------------------- check


def test_check_ok_lists_patterns(tmp_path, capsys):
    path = write_file(tmp_path, "two.attn", TWO)
    assert cli.main(["check", path]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: ok (2 patterns: a, b)"
    assert err == ""


def test_check_reports_every_error_with_caret(tmp_path, capsys):
    path = write_file(tmp_path, "bad.attn", BAD)
    assert cli.main(["check", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert f"{path}:2:23: error: unknown name 'windw'" in lines
    assert "    mask = causal and windw(128)" in lines
    assert "                      ^" in lines
    assert any(line.startswith(f"{path}:5:") and ": error: " in line for line in lines)
    assert "Traceback" not in err


def test_check_several_files_and_missing_file(tmp_path, capsys):
    good = write_file(tmp_path, "good.attn", CAUSAL)
    bad = write_file(tmp_path, "bad.attn", BAD)
    missing = str(tmp_path / "missing.attn")
    assert cli.main(["check", good, bad, missing, str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == f"{good}: ok (1 pattern: causal_lm)"
    assert "missing.attn" in err and "error:" in err
    assert err.count("error: cannot read") == 2
    assert "Traceback" not in err


def test_check_examples_if_present(capsys):
    files = sorted(EXAMPLES.glob("*.attn"))
    if not files:
        pytest.skip("no examples/*.attn")
    assert cli.main(["check", *map(str, files)]) == 0
    out, _ = capsys.readouterr()
    assert out.count(": ok (") == len(files)


def test_console_script_check_bad_file(tmp_path):
    path = write_file(tmp_path, "bad.attn", BAD)
    proc = subprocess.run([console_script(), "check", path], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert f"{path}:2:23: error: unknown name 'windw'" in lines
    assert "                      ^" in lines
    for leak in ("Traceback", "attndsl.", "lark", 'File "'):
        assert leak not in proc.stderr


def test_python_dash_m(tmp_path):
    path = write_file(tmp_path, "two.attn", TWO)
    proc = subprocess.run([sys.executable, "-m", "attndsl", "check", path], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok (2 patterns: a, b)" in proc.stdout


# ----------------------------------------------------------------------------- help, version


def test_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "show" in out and "run" in out
    for sub in ("check", "show", "run"):
        assert cli.main([sub, "--help"]) == 0
        assert "usage: attndsl " + sub in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"attndsl {attndsl.__version__}"
    assert cli.main([]) == 2                       # a command is required
    assert cli.main(["show", "x.attn", "--set", "w"]) == 2


def test_parse_assignment():
    assert cli.parse_assignment("w=64") == ("w", 64)
    assert cli.parse_assignment(" cap = 50.5 ") == ("cap", 50.5)
    assert cli.parse_assignment("flag=true") == ("flag", True)
    assert cli.parse_assignment("flag=False") == ("flag", False)
    for bad in ("w", "=3", "w=abc", "1x=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_assignment(bad)


# ----------------------------------------------------------------------------- show


def test_show_causal_4x4_exact(tmp_path, capsys):
    path = write_file(tmp_path, "causal.attn", CAUSAL)
    assert cli.main(["show", path, "--q-len", "4", "--kv-len", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("causal_lm(): q_len=4 kv_len=4 heads=1 kv_heads=1, "
                        "density 0.625 (10 of 16 pairs)")
    assert lines[-7:] == ["head 0", "┌────┐", "│█···│", "│██··│", "│███·│", "│████│", "└────┘"]


def test_show_half_blocks(tmp_path, capsys):
    path = write_file(tmp_path, "causal.attn", CAUSAL)
    assert cli.main(["show", path, "--q-len", "4", "--kv-len", "4", "--view", "half"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4:] == ["┌────┐", "│█▄  │", "│███▄│", "└────┘"]


def test_show_groups_identical_heads(tmp_path, capsys):
    path = write_file(tmp_path, "duo.attn", HEADS)
    assert cli.main(["show", path, "--q-len", "6", "--kv-len", "6"]) == 0
    out = capsys.readouterr().out
    assert "heads=4" in out                       # the mask uses h: 4 heads by default
    assert "head 0, density" in out and "heads 1-3, density" in out


def test_show_falls_back_to_block_map(tmp_path, capsys):
    path = write_file(tmp_path, "causal.attn", CAUSAL)
    assert cli.main(["show", path, "--q-len", "4096", "--kv-len", "4096", "--block", "64"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "full tile" in out and "tiles of 64 queries x 64 keys" in out
    assert len(lines) < 80 and max(map(len, lines)) <= 120
    body = [line[1:-1] for line in lines if line.startswith("│")]
    assert len(body) == 64
    assert body[0] == "▒" + "·" * 63 and body[-1] == "█" * 63 + "▒"


def test_show_enlarges_block_to_fit(tmp_path, capsys):
    path = write_file(tmp_path, "causal.attn", CAUSAL)
    assert cli.main(["show", path, "--q-len", "2048", "--kv-len", "2048", "--width", "40"]) == 0
    out = capsys.readouterr().out
    assert "tiles of 64 queries x 64 keys (--block 16 enlarged to fit)" in out


def test_show_png(tmp_path, capsys):
    path = write_file(tmp_path, "two.attn", TWO + HEADS)
    png = tmp_path / "out.png"
    assert cli.main(["show", path, "--q-len", "16", "--kv-len", "16", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out
    assert cli.main(["show", path, "--png", str(tmp_path / "no" / "such" / "dir.png")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_show_tensor_input_and_selectors(tmp_path, capsys):
    path = write_file(tmp_path, "packed.attn", PACKED)
    assert cli.main(["show", path, "--q-len", "32", "--kv-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "random documents covering 32 positions" in out
    path = write_file(tmp_path, "sel.attn", SELECTORS)
    assert cli.main(["show", path, "--q-len", "64", "--kv-len", "64", "--view", "blocks"]) == 0
    out = capsys.readouterr().out
    assert out.count("random Gaussian vectors") == 2
    assert "route centroids [4, 4, 16]" in out
    assert "full tile" in out


def test_show_set_and_required_parameter(tmp_path, capsys):
    path = write_file(tmp_path, "win.attn", REQUIRED)
    assert cli.main(["show", path]) == 1
    err = capsys.readouterr().err
    assert "needs a value for parameter 'w'" in err and "--set w=VALUE" in err
    assert cli.main(["show", path, "--set", "w=2", "--q-len", "3", "--kv-len", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-4:-1] == ["│█··│", "│██·│", "│·██│"]
    assert cli.main(["show", path, "--set", "nope=1"]) == 1
    assert "no parameter 'nope'" in capsys.readouterr().err


def test_show_errors_without_traceback(tmp_path, capsys):
    assert cli.main(["show", str(tmp_path / "missing.attn")]) == 1
    assert "cannot read" in capsys.readouterr().err
    path = write_file(tmp_path, "causal.attn", CAUSAL)
    assert cli.main(["show", path, "-p", "nope"]) == 1
    assert "no pattern 'nope'" in capsys.readouterr().err
    assert cli.main(["show", path, "--heads", "4", "--kv-heads", "3"]) == 1
    assert "kv_heads" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run

SMALL = ["--q-len", "48", "--kv-len", "64", "--heads", "2", "--head-dim", "16"]


def test_run_pass_causal(tmp_path, capsys):
    path = write_file(tmp_path, "causal.attn", CAUSAL)
    assert cli.main(["run", path, *SMALL]) == 0
    out = capsys.readouterr().out
    last = out.splitlines()[-1]
    assert last.startswith("PASS causal_lm: max |err| ") and "(tolerance " in last
    assert "density 0." in last and last.endswith(" ms")
    assert "q [1, 2, 48, 16], k and v [1, 2, 64, 16]" in out


def test_run_tensor_inputs(tmp_path, capsys):
    path = write_file(tmp_path, "inputs.attn", PACKED + "\n" + BIAS)
    assert cli.main(["run", path, *SMALL, "--batch", "2", "--kv-heads", "1"]) == 0
    out = capsys.readouterr().out
    assert "PASS packed:" in out and "PASS bias:" in out
    assert "random documents" in out
    assert "rel: random Gaussian float[][] of shape [2, 9]" in out


def test_run_selectors_and_half_precision(tmp_path, capsys):
    path = write_file(tmp_path, "sel.attn", SELECTORS)
    assert cli.main(["run", path, *SMALL, "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "PASS moba:" in out and "PASS routing:" in out
    assert "route centroids [2, 4, 16]" in out


def test_run_fail_exit_code(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli.TOLERANCE, "float32", -1.0)
    path = write_file(tmp_path, "causal.attn", CAUSAL)
    assert cli.main(["run", path, *SMALL]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAIL causal_lm:")


def test_run_errors_are_reported(tmp_path, capsys):
    path = write_file(tmp_path, "bad.attn", BAD)
    assert cli.main(["run", path]) == 1
    out, err = capsys.readouterr()
    assert "error: unknown name 'windw'" in err and "Traceback" not in err
    path = write_file(tmp_path, "win.attn", REQUIRED + "\n" + CAUSAL)
    assert cli.main(["run", path, *SMALL]) == 1         # win fails, causal_lm still runs
    out, err = capsys.readouterr()
    assert "--set w=VALUE" in err
    assert "FAIL win: pattern 'win' needs a value" in out and "PASS causal_lm" in out


# ----------------------------------------------------------------------------- render


def test_format_and_group_heads():
    assert render.format_heads([2]) == "head 2"
    assert render.format_heads([0, 1, 2, 3]) == "heads 0-3"
    assert render.format_heads([0, 2, 5, 6, 7]) == "heads 0, 2, 5-7"
    arr = np.array([[1, 0], [0, 1], [1, 0], [1, 0]])
    groups = render.group_heads(arr)
    assert [hs for hs, _ in groups] == [[0, 2, 3], [1]]


def test_tiles_from_mask_agrees_with_block_map():
    pat = attndsl.compile("pattern p(w = 5):\n    mask = sliding(w) or k < 3\n")["p"]
    for bq, bk in ((4, 4), (3, 5), (16, 16)):
        dense = pat.dense_mask(13, 21, heads=1)
        ours = render.tiles_from_mask(dense, bq, bk)
        assert np.array_equal(ours, pat.block_map(13, 21, heads=1, block=(bq, bk)))
        lo, hi = render.density_bounds(ours, 13, 21, bq, bk)
        assert lo <= dense.mean() <= hi


def test_layout_wraps_panels():
    panel = render.frame(["██", "··"], "t")
    assert render.layout([panel, panel], 20) == [
        "t     t", "┌──┐  ┌──┐", "│██│  │██│", "│··│  │··│", "└──┘  └──┘"]
    assert len(render.layout([panel, panel], 6)) == 2 * len(panel) + 1


def test_console_script_exists_for_path():
    assert os.path.basename(console_script()).startswith("attndsl")
