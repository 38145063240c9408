"""`attndsl analyze` and the compile-time warnings of `attndsl check`."""

from __future__ import annotations

import json

import numpy as np

import attndsl
from attndsl.cli import main


def _write(tmp_path, text: str, name: str = "p.attn"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_analyze_table_reports_cost_tiles_closed_form_and_depth(tmp_path, capsys):
    path = _write(tmp_path, "pattern win(w = 64):\n    mask = causal and sliding(w)\n")
    assert main(["analyze", path, "--q-len", "1024", "--block", "128"]) == 0
    out = capsys.readouterr().out
    n, w = 1024, 64
    kept = n * w - w * (w - 1) // 2
    assert f"{kept / 1e3:.3g}K of {n * n / 1e6:.3g}M" in out
    assert "closed form     w*(2*N - w + 1)/2" in out or "N*w - w*(w - 1)/2" in out
    assert "O(N*w)" in out
    assert "descriptor      band" in out
    # a window of w needs ceil((N - 1) / (w - 1)) layers to reach the first key from the last
    assert f"reach depth     {-(-(n - 1) // (w - 1))} layers" in out
    tiles = attndsl.compile(open(path).read())["win"].block_map(n, n, block=(128, 128))
    counts = np.bincount(tiles.ravel(), minlength=3)
    assert f"{counts[2]} full, {counts[1]} partial, {counts[0]} empty" in out
    assert f"kernel          tiles (band tables, {counts[1] + counts[2]} tiles, {counts[2]} full)" in out


def test_analyze_json_is_machine_readable_and_exact(tmp_path, capsys):
    path = _write(tmp_path, "pattern d(w = 8, d = 4):\n    mask = dilated(w, d)\n")
    assert main(["analyze", path, "--q-len", "500", "--kv-len", "700", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 1 and data[0]["pattern"] == "d"
    pat = attndsl.compile(open(path).read())["d"]
    assert data[0]["cost"]["kept_pairs"] == int(pat.dense_mask(500, 700).sum())
    assert data[0]["descriptor"] == ["residue"]
    (launch,) = data[0]["kernel"]         # one launch: 4 residue groups over compressed indices
    assert (launch["kind"], launch["groups"], launch["step_q"], launch["step_k"]) == ("gather", 4, 4, 4)
    assert "reach" not in data[0]["graph"] or data[0]["graph"]["reach"] is None


def test_analyze_rejects_selector_patterns_cleanly(tmp_path, capsys):
    path = _write(tmp_path, "pattern m:\n    mask = causal and topk_blocks(2, 16)\n")
    assert main(["analyze", path]) == 1
    err = capsys.readouterr().err
    assert "selects blocks from the query and key" in err and "Traceback" not in err


def test_check_warns_about_rows_without_keys_at_compile_time(tmp_path, capsys):
    path = _write(tmp_path, "# strictly earlier keys\npattern t:\n    mask = k < q\n")
    assert main(["check", path]) == 0          # a warning, not an error
    captured = capsys.readouterr()
    assert f"{path}: ok (1 pattern: t)" in captured.out
    assert f"{path}:2:9: warning: pattern 't': 1 of 64 query rows have no allowed key" in captured.err
    assert main(["check", "--no-warnings", path]) == 0
    assert "warning" not in capsys.readouterr().err


def test_check_has_no_warnings_for_the_examples(capsys):
    import glob

    files = sorted(glob.glob("examples/*.attn"))
    assert files
    assert main(["check", *files]) == 0
    assert "warning" not in capsys.readouterr().err
