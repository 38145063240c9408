"""Both `pip install .` (a wheel) and `pip install -e .` must find the grammar, prelude and codegen."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import attndsl, attndsl.codegen, sys
from importlib import resources
prog = attndsl.compile("pattern p(w = 4):\\n    mask = causal and sliding(w)\\n")
print(attndsl.__file__)
print(resources.files("attndsl.grammar").joinpath("prelude.attn").is_file())
print(int(prog["p"].dense_mask(6, 6).sum()))
print(int(prog["p"].block_map(6, 6, block=(2, 2)).sum()))
"""


def _probe(env: dict, cwd: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_editable_or_installed_package_finds_grammar_and_prelude(tmp_path):
    lines = _probe(dict(os.environ), tmp_path)
    assert lines[1] == "True" and lines[3] == "8"
    assert lines[2] == "18"          # 6x6 causal, window 4: 1+2+3+4+4+4


@pytest.mark.skipif(os.environ.get("ATTNDSL_SKIP_WHEEL") == "1", reason="wheel build disabled")
def test_wheel_contains_grammar_prelude_and_codegen_and_works(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("attndsl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("attndsl/grammar/attn.lark", "attndsl/grammar/prelude.attn",
                   "attndsl/codegen/__init__.py", "attndsl/program.py",
                   "attndsl/analysis/api.py", "attndsl/analysis/solve.py"):
        assert needed in names
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    env = dict(os.environ, PYTHONPATH=str(target))
    lines = _probe(env, tmp_path)
    assert lines[0].startswith(str(target)), lines[0]      # the installed copy, not the source tree
    assert lines[1] == "True" and lines[2] == "18" and lines[3] == "8"          # tiles 1,2,1,1,2,1
