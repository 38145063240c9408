"""The pipeline as a reader sees it (issue 9): named stages that ATTNDSL_DUMP prints, a bound
call keyed by content with explicit bounded caches, the whole kernel in ``triton_source``, and
modules of readable size."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import attndsl
from attndsl import caches
from attndsl.bound import BoundPattern, expr_digest
from attndsl.caches import LRUCache
from attndsl.dump import STAGES

ROOT = Path(__file__).resolve().parents[1]
WINDOW = "pattern p(w = 6):\n    mask = causal and sliding(w)\n"
DILATED = "pattern d(w = 6, g = 3):\n    mask = dilated(w, g)\n"


def _qkv(q_len=40, heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, q_len, d, generator=g) for _ in range(3))


def _headers(text: str) -> list[str]:
    return re.findall(r"^--- attndsl: (\w+) ---$", text, flags=re.M)


# ------------------------------------------------------------------------------ ATTNDSL_DUMP
def test_dump_prints_every_stage_of_a_kernel_call(monkeypatch, capfd, tmp_path):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNDSL_DUMP", "all")
    pat = attndsl.compile(DILATED)["d"]
    capfd.readouterr()
    q, k, v = _qkv()
    pat(q, k, v, backend="triton-interpret")
    err = capfd.readouterr().err
    assert _headers(err) == ["bind", "analysis", "plan", "source", "launch"]
    assert "gather: 3 groups" in err and "merge:" in err and "def attn_fwd(" in err
    assert "launch 1: attn_fwd[(" in err


def test_dump_prints_the_front_end_and_the_torch_backend(monkeypatch, capfd):
    monkeypatch.setenv("ATTNDSL_DUMP", "ast,ir,analysis,plan,source")
    pat = attndsl.compile(WINDOW)["p"]
    pat(*_qkv(), backend="torch")
    err = capfd.readouterr().err
    assert _headers(err) == ["ast", "ir", "analysis", "plan", "source"]
    assert "mask = " in err and "torch backend: tile 64x64" in err
    assert "def mask(q, k, h, q_len, kv_len, heads, kv_heads, fdt):" in err


def test_dump_names_only_the_stages_asked_for(monkeypatch, capfd):
    monkeypatch.setenv("ATTNDSL_DUMP", "plan")
    pat = attndsl.compile(WINDOW)["p"]
    pat(*_qkv(), backend="triton-interpret")
    assert _headers(capfd.readouterr().err) == ["plan"]


def test_an_unknown_dump_stage_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ATTNDSL_DUMP", "ir,plans")
    with pytest.raises(attndsl.AttnCallError, match="unknown stage 'plans'.*" + ", ".join(STAGES)):
        attndsl.compile(WINDOW)


# ------------------------------------------------------------------- the bound call, caches
def test_a_bound_pattern_is_identified_by_its_content():
    a = attndsl.compile(WINDOW)["p"]
    b = attndsl.compile("pattern p(w = 6):   # the same pattern, written otherwise\n"
                        "    mask = sliding(w) and causal\n")["p"]
    c = attndsl.compile(WINDOW)["p"]
    assert a.bound() == c.bound() and hash(a.bound()) == hash(c.bound())
    assert a.bound() is not c.bound()
    assert a.bound() != b.bound()                       # operands in another order
    assert a.bind(w=6).bound() == a.bound() and a.bind(w=7).bound() != a.bound()
    with pytest.raises(attndsl.AttnCallError, match="needs a value for parameter 'w'"):
        attndsl.compile("pattern p(w: int):\n    mask = sliding(w)\n")["p"].bound()


def test_the_digest_walks_shared_subtrees_once():
    # 16 nested lets, each used twice: 2**16 paths through 20-odd distinct nodes
    lets = "".join(f"    let x{i} = x{i - 1} + x{i - 1}\n" for i in range(1, 16))
    pat = attndsl.compile(f"pattern p:\n    let x0 = q - k\n{lets}    mask = x15 >= 0\n")["p"]
    memo: dict = {}
    expr_digest(pat.ir.mask, memo)
    assert len(memo) == len(list(pat.ir.mask.walk())) < 40
    assert len(pat.bound().key) == 40


def test_calls_share_analysis_and_plan_through_content_keyed_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    from attndsl.codegen.plan import PLANS

    caches.clear()
    q, k, v = _qkv()
    first = attndsl.compile(WINDOW)["p"]
    before = dict(vars(first))
    out = first(q, k, v, backend="triton-interpret")
    assert PLANS.misses == 1 and PLANS.hits == 0
    again = attndsl.compile(WINDOW)["p"]                 # another object, the same content
    assert torch.equal(again(q, k, v, backend="triton-interpret"), out)
    assert PLANS.misses == 1 and PLANS.hits == 1
    assert vars(first) == before                         # nothing is stored on the pattern
    first.bind(w=7)(q, k, v, backend="triton-interpret")
    assert PLANS.misses == 2


def test_calls_with_tensor_inputs_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    from attndsl.codegen.plan import PLANS

    caches.clear()
    pat = attndsl.compile("pattern p(doc: int[]):\n    mask = doc[q] == doc[k]\n")["p"]
    q, k, v = _qkv(q_len=20)
    for split in (5, 15):                                # same sizes, other documents
        doc = (np.arange(20) >= split).astype(np.int64)
        out = pat(q, k, v, backend="triton-interpret", doc=doc)
        ref = pat.reference(q.double().numpy(), k.double().numpy(), v.double().numpy(), doc=doc)[0]
        assert np.abs(out.double().numpy() - ref).max() < 1e-5
    assert len(PLANS) == 0


def test_lru_caches_are_bounded_and_named():
    c = LRUCache("test.lru_bound", 2)
    try:
        for i in range(3):
            assert c.get(i, lambda i=i: i * i) == i * i
        assert 0 not in c and 1 in c and 2 in c and len(c) == 2
        assert c.get(1, lambda: -1) == 1                 # a hit: not computed again
        assert c.stats() == {"name": "test.lru_bound", "size": 2, "maxsize": 2, "hits": 1,
                             "misses": 3}
        with pytest.raises(ValueError, match="exists already"):
            LRUCache("test.lru_bound", 2)
        assert c in caches.all_caches()
    finally:
        caches._REGISTRY.pop("test.lru_bound")


def test_no_memo_is_stored_on_user_objects_or_keyed_by_id():
    """Caches are module-level LRUCaches: no ``obj.__dict__`` memo and no ``id()`` cache key in
    the package (traversal memos keyed by ``id`` of nodes kept alive are local to one pass)."""
    offenders = []
    for path in sorted((ROOT / "attndsl").rglob("*.py")) + sorted((ROOT / "codegen").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            if re.search(r"\b(?!module\b)\w+\.__dict__\b", line) or "_memo[id(" in line \
                    and "self._memo" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_bound_patterns_are_frozen():
    bound = attndsl.compile(WINDOW)["p"].bound()
    assert isinstance(bound, BoundPattern)
    with pytest.raises(AttributeError):
        bound.ir = None
    with pytest.raises(TypeError):
        bound.values["w"] = 3


# --------------------------------------------------------------------- the generated module
def test_triton_source_is_the_whole_module_that_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path))
    pat = attndsl.compile(WINDOW)["p"]
    text = pat.triton_source()
    for name in ("def attn_fwd(", "def _tile(", "def mask_hook(", "def mask_hook32("):
        assert name in text
    pat(*_qkv(), backend="triton-interpret")
    files = [p for p in tmp_path.glob("attndsl_gen_*.py") if p.read_text().endswith(text)]
    assert len(files) == 1                               # the file the launch ran from


def test_triton_source_of_a_call_shows_every_launch_and_the_plan():
    pat = attndsl.compile("pattern s(w = 4, t = 5):\n    mask = causal and (sliding(w) or "
                          "k % t == t - 1)\n")["s"]
    text = pat.triton_source(q_len=60, heads=2)
    assert text.startswith("# attndsl plan: 2 launch(es) of attn_fwd")
    assert "# merge: log-sum-exp" in text
    assert text.count("def attn_fwd(") == 2
    assert re.search(r"launch 1 of 2: tiles", text) and re.search(r"launch 2 of 2: gather", text)
    with pytest.raises(attndsl.AttnCallError, match="give q_len"):
        pat.triton_source(kv_len=60)


def test_emit_shows_every_launch_of_a_call(tmp_path, capsys):
    from attndsl.cli import main

    path = tmp_path / "s.attn"
    path.write_text("pattern s(w = 4, t = 5):\n    mask = causal and (sliding(w) or k % t == t - 1)\n")
    assert main(["emit", str(path), "--q-len", "60", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "# attndsl plan: 2 launch(es) of attn_fwd" in out and out.count("def attn_fwd(") == 2
    assert "heads 2/2, q_len 60, kv_len 60" in out
    assert main(["emit", str(path), "--heads", "2"]) == 1
    assert "--heads is an option of --q-len" in capsys.readouterr().err


def test_modules_stay_readable_in_size():
    big = [f"{p.relative_to(ROOT)}: {n}" for p in
           sorted((ROOT / "attndsl").rglob("*.py")) + sorted((ROOT / "codegen").glob("*.py"))
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600]
    assert not big, big
