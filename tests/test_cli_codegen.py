"""`attndsl emit` (generated Triton source) and `attndsl testgen` (generated pytest files),
including running a generated file in a fresh pytest process, and a negative control that
runs it against a sabotaged backend."""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tokenize

from conftest import EXAMPLES

from attndsl.cli import main
from attndsl.cli_codegen import BACKWARD_SHAPES, SHAPES

LOCAL = "pattern local(w = 16):\n    mask = causal and (sinks(2) or sliding(w))\n"
DOCS = ("pattern docs(doc: int[], slope = 0.1):\n    mask = causal and doc[q] == doc[k]\n"
        "    score = score - slope * float(q - k)\n")


def _write(tmp_path, text: str, name: str = "p.attn") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _names(code: str) -> list[tuple[str, str]]:
    """(identifier, the token after it) for every identifier outside comments and strings."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(code).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                              tokenize.DEDENT, tokenize.STRING)]
    return [(t.string, toks[i + 1].string if i + 1 < len(toks) else "")
            for i, t in enumerate(toks) if t.type == tokenize.NAME]


# ----------------------------------------------------------------------------- emit


def test_emit_prints_the_hooks_after_a_header(capsys):
    assert main(["emit", str(EXAMPLES / "streaming_llm.attn"), "--set", "window=8"]) == 0
    out = capsys.readouterr().out
    header, body = out.split("\n", 1)
    assert header == "# pattern streaming_llm(n_sinks=4, window=8)"
    assert "def mask_hook(" in body and "def score_hook(" not in body
    ast.parse(body)                                      # a valid Python module
    hook = body[body.index("def mask_hook("):]
    assert "(8)" in hook and "(4)" in hook               # the bound values, as literals


def test_emit_of_several_patterns_and_a_score_hook(tmp_path, capsys):
    path = _write(tmp_path, LOCAL + DOCS)
    assert main(["emit", path]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("# pattern ")]
    assert headers == ["# pattern local(w=16)",
                       "# pattern docs(slope=0.1, doc: int[]); tensor inputs: doc -> t0"]
    assert out.count("def mask_hook(") == 2 and out.count("def score_hook(") == 1


def test_emit_writes_no_user_identifier(tmp_path, capsys):
    path = _write(tmp_path, "pattern p(tl = 3, torch = 2, acc = 1, BLOCK_M = 4, doc: int[]):\n"
                            "    mask = causal and q - k < tl + torch + acc + BLOCK_M "
                            "and doc[q] == doc[k]\n")
    assert main(["emit", path]) == 0
    header, body = capsys.readouterr().out.split("\n", 1)
    assert header.startswith("# pattern p(tl=3, torch=2, acc=1, BLOCK_M=4, doc: int[])")
    # the module is what the IR generated (helpers, hooks), then the fixed kernel skeleton,
    # which is the same text for every pattern (its own names, BLOCK_M among them, are not ours)
    from attndsl.codegen.emit import SKELETON_MARKER, skeleton_text

    body, skeleton = body.split(SKELETON_MARKER)
    assert skeleton.strip("\n") == skeleton_text().strip("\n")
    names = _names(body)
    used = {n for n, _ in names}
    assert not used & {"torch", "acc", "BLOCK_M", "doc", "p"}
    # `tl` is only ever triton.language: imported as such, then used as `tl.something`
    assert all(after == "." or before == "as"
               for (before, _), (n, after) in zip([("", "")] + names, names) if n == "tl")
    hook = body[body.index("def mask_hook("):]
    assert "tl.load(t0 " in hook                         # the tensor input is slot t0
    assert "(10)" in hook         # tl + torch + acc + BLOCK_M, folded to one literal


def test_emit_errors_exit_1_without_traceback(tmp_path, capsys):
    assert main(["emit", str(tmp_path / "missing.attn")]) == 1
    assert "error: cannot read" in capsys.readouterr().err
    bad = _write(tmp_path, "pattern p:\n    mask = causal and windw(4)\n", "bad.attn")
    assert main(["emit", bad]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:23: error: unknown name 'windw'" in err and "Traceback" not in err
    need = _write(tmp_path, "pattern p(w: int):\n    mask = sliding(w)\n", "need.attn")
    assert main(["emit", need]) == 1
    assert "needs a value for parameter 'w'" in capsys.readouterr().err
    assert main(["emit", need, "--set", "x=1"]) == 1
    assert "--set x: no parameter 'x'" in capsys.readouterr().err
    assert main(["emit", need, "-p", "nope"]) == 1
    assert "no pattern 'nope'" in capsys.readouterr().err
    # one bad pattern among good ones: the others are still printed, exit status 1
    both = _write(tmp_path, LOCAL + "pattern p(w: int):\n    mask = sliding(w)\n", "both.attn")
    assert main(["emit", both]) == 1
    captured = capsys.readouterr()
    assert "# pattern local(w=16)" in captured.out and "parameter 'w'" in captured.err


# ----------------------------------------------------------------------------- testgen


def _run_pytest(path, tmp_path, *extra) -> tuple[int, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", ATTNDSL_CACHE_DIR=str(tmp_path / "kernels"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *extra, str(path)], cwd=path.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _count(word: str, text: str) -> int:
    found = re.search(rf"(\d+) {word}", text)
    return int(found.group(1)) if found else 0


def test_testgen_writes_a_self_contained_file_that_passes(tmp_path, capsys):
    src = _write(tmp_path, LOCAL + DOCS)
    gen = tmp_path / "gen"
    gen.mkdir()
    out = gen / "test_generated_p.py"
    assert main(["testgen", src, "-o", str(out), "--set", "w=5"]) == 0
    n = 2 * (len(SHAPES) + len(BACKWARD_SHAPES))
    assert capsys.readouterr().out.strip() == (f"wrote {out}: {n} test cases (2 patterns x "
                                               f"({len(SHAPES)} shapes + "
                                               f"{len(BACKWARD_SHAPES)} backward))")
    os.remove(src)                                       # the source is embedded
    text = out.read_text()
    assert "('local', {'w': 5})" in text and "('docs', {'slope': 0.1})" in text
    rc, log = _run_pytest(out, tmp_path)
    assert rc == 0, log
    assert _count("passed", log) == n and _count("failed", log) == 0, log
    assert _count("skipped", log) == 0, log


def test_generated_file_fails_against_a_sabotaged_backend(tmp_path):
    """Negative control: a conftest.py next to the generated file (test-only, nothing in the
    product) shifts every kernel output by 0.5 and every kernel gradient into q by 0.5; every
    generated case, forward and backward, must then fail."""
    src = _write(tmp_path, LOCAL)
    gen = tmp_path / "gen"
    gen.mkdir()
    out = gen / "test_generated_local.py"
    assert main(["testgen", src, "-o", str(out)]) == 0
    (gen / "conftest.py").write_text(
        "import attndsl.codegen.backend as kernel\n\n"
        "_forward = kernel.forward\n\n\n"
        "def _sabotaged(*args, **kwargs):\n"
        "    out, lse = _forward(*args, **kwargs)\n"
        "    return out + 0.5, lse\n\n\n"
        "kernel.forward = _sabotaged\n\n"
        "_backward = kernel.backward\n\n\n"
        "def _sabotaged_backward(*args, **kwargs):\n"
        "    dq, *rest = _backward(*args, **kwargs)\n"
        "    return (dq + 0.5, *rest)\n\n\n"
        "kernel.backward = _sabotaged_backward\n")
    rc, log = _run_pytest(out, tmp_path)
    assert rc == 1, log
    n = len(SHAPES) + len(BACKWARD_SHAPES)
    assert _count("failed", log) == n and _count("passed", log) == 0, log
    assert "out: max |err|" in log or "rows without keys must have output 0" in log
    assert "dq: max |err|" in log


def test_testgen_embeds_any_source_text_as_literals(tmp_path, capsys):
    tricky = ('# quotes \'\'\' """ and a backslash \\ and {braces} and ünïcode\n' + LOCAL)
    src = _write(tmp_path, tricky)
    out = tmp_path / "test_tricky.py"
    assert main(["testgen", src, "-o", str(out)]) == 0
    tree = ast.parse(out.read_text())
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id in ("SOURCE", "FILENAME", "COMMAND")}
    assert values["SOURCE"] == tricky
    assert values["FILENAME"] == os.path.abspath(src)
    assert values["COMMAND"].startswith("attndsl testgen ")


def test_testgen_errors_write_nothing(tmp_path, capsys):
    need = _write(tmp_path, "pattern p(w: int):\n    mask = sliding(w)\n")
    out = tmp_path / "test_x.py"
    assert main(["testgen", need, "-o", str(out)]) == 1
    assert "needs a value for parameter 'w'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["testgen", need, "-o", str(tmp_path / "x.txt"), "--set", "w=3"]) == 1
    assert "must end in .py" in capsys.readouterr().err
    mine = tmp_path / "test_mine.py"
    mine.write_text("def test_mine():\n    pass\n")
    assert main(["testgen", need, "-o", str(mine), "--set", "w=3"]) == 1
    assert "was not written by attndsl testgen" in capsys.readouterr().err
    assert mine.read_text().startswith("def test_mine")
    assert main(["testgen", need, "-o", str(mine), "--set", "w=3", "--force"]) == 0
    assert main(["testgen", need, "-o", str(mine), "--set", "w=4"]) == 0   # ours: rewritten
    assert "{'w': 4}" in mine.read_text()
