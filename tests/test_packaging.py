"""Both `pip install .` (a wheel) and `pip install -e .` must find the grammar, prelude and codegen;
the folders codegen/ and grammar/ are the packages attndsl.codegen / attndsl.grammar and nothing else
(imported as `codegen` from a checkout, each module would load twice)."""

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


# The repository root on sys.path (a checkout: `python -c` or `python -m pytest` run there) makes
# the folders importable as top-level packages; their __init__ refuses.
FOREIGN = """
import importlib, sys
for name in ("codegen", "codegen.kernel", "grammar"):
    try:
        importlib.import_module(name)
    except ImportError as exc:
        print(name, "|", exc)
    else:
        print(name, "| imported")
print(sorted(n for n in sys.modules if n.split(".")[0] in ("codegen", "grammar")))
"""

# After a tiny pattern ran (and the command-line tool, which imports the most, is loaded): every
# loaded module whose file is in the folder of attndsl.codegen / attndsl.grammar has that name.
IDENTITY = """
import sys
from pathlib import Path
import torch
import attndsl, attndsl.cli, attndsl.codegen, attndsl.grammar
pat = attndsl.compile("pattern p(w = 4):\\n    mask = causal and sliding(w)\\n")["p"]
q = torch.randn(1, 2, 8, 16)
out = pat(q, q, q, backend="torch")
assert out.shape == (1, 2, 8, 16)
assert "def " in pat.triton_source()
folders = [(pkg, Path(folder).resolve()) for pkg, folder in (
    ("attndsl.codegen", Path(attndsl.codegen.__file__).parent),
    ("attndsl.grammar", Path(attndsl.grammar.__file__).parent),
    ("attndsl.codegen", sys.argv[1]), ("attndsl.grammar", sys.argv[2]))]
bad = []
for name, module in list(sys.modules.items()):
    path = getattr(module, "__file__", None)
    if not path:
        continue
    path = Path(path).resolve()
    for pkg, folder in folders:
        if path.is_relative_to(folder) and name != pkg and not name.startswith(pkg + "."):
            bad.append(f"{name} ({path})")
print(sorted(set(bad)))
print(sorted(n for n in sys.modules if n.startswith("attndsl.codegen.")))
"""


def _in_checkout(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_codegen_and_grammar_folders_cannot_be_imported_as_top_level_packages():
    out = _in_checkout(FOREIGN)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("codegen | import attndsl.codegen, not codegen: "), lines[0]
    assert lines[1].startswith("codegen.kernel | import attndsl.codegen, not codegen: "), lines[1]
    assert lines[2].startswith("grammar | import attndsl.grammar, not grammar: "), lines[2]
    assert lines[3] == "[]"                         # nothing of them stays loaded


def test_codegen_modules_load_once_under_one_name_from_a_checkout():
    out = _in_checkout(IDENTITY, str(ROOT / "codegen"), str(ROOT / "grammar"))
    assert out.returncode == 0, out.stderr
    bad, loaded = out.stdout.splitlines()[-2:]
    assert bad == "[]", f"modules of codegen/ or grammar/ under a second name: {bad}"
    for name in ("attndsl.codegen.kernel", "attndsl.codegen.emit"):   # not vacuous
        assert repr(name) in loaded, loaded


def test_this_test_process_loaded_codegen_under_one_name():
    import attndsl.codegen

    folders = {Path(attndsl.codegen.__file__).resolve().parent, (ROOT / "codegen").resolve(),
               (ROOT / "grammar").resolve()}
    bad = sorted(n for n, m in list(sys.modules.items())
                 if getattr(m, "__file__", None) and not n.startswith(("attndsl.codegen",
                                                                       "attndsl.grammar"))
                 and any(Path(m.__file__).resolve().is_relative_to(f) for f in folders))
    assert not bad, bad
