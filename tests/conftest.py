"""Shared helpers for the language tests (parser, checker, diagnostics, interpreter, runtime).

Everything here uses only the public API of LANGUAGE.md section 6 plus ``pattern.ir`` and the
error classes, so that the tests state the contract, not the implementation.
"""

from __future__ import annotations

import os
import pathlib

# Without a GPU the generated kernels run under Triton's interpreter, which Triton fixes when it
# is first imported: set it before anything imports triton.
try:
    import torch as _torch
    _cuda = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from hypothesis import settings

import attndsl

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PRELUDE = ROOT / "grammar" / "prelude.attn"

# The test lane: "full" (``make test``, CI: every test, every property example) or "fast"
# (``make test-fast``, the edit loop: ``-m "not slow"`` and fewer hypothesis examples).
LANE = os.environ.get("ATTNDSL_TEST_LANE", "full")
if LANE not in ("full", "fast"):
    raise ValueError(f"ATTNDSL_TEST_LANE must be 'full' or 'fast', got {LANE!r}")
# the profile sets the defaults of tests without their own max_examples; tests with their own
# count pass it through examples()
settings.register_profile("full", settings.get_profile("default"))
settings.register_profile("fast", max_examples=20)
settings.load_profile(LANE)


def examples(n: int) -> int:
    """``max_examples`` of a hypothesis test that runs ``n`` in the full lane: a sixth of them
    (at least 10) in the fast lane."""
    return n if LANE == "full" else max(10, n // 6)


def example_files() -> list[pathlib.Path]:
    """The examples/*.attn files (written concurrently: may be empty)."""
    return sorted(EXAMPLES.glob("*.attn")) if EXAMPLES.is_dir() else []


def pattern(src: str, name: str | None = None, filename: str = "<test>") -> attndsl.Pattern:
    """Compile ``src`` and return the pattern ``name`` (the only/first one by default)."""
    prog = attndsl.compile(src, filename=filename)
    if name is None:
        name = prog.patterns[0]
    return prog[name]


def mask_pattern(expr: str, params: str = "", lets: tuple[str, ...] = ()) -> attndsl.Pattern:
    """A pattern whose mask is ``expr`` (a bool expression)."""
    head = f"pattern t({params}):" if params else "pattern t:"
    body = "".join(f"    let {x}\n" for x in lets)
    return pattern(f"{head}\n{body}    mask = {expr}\n")


def eval_bool(expr: str, params: str = "", q_len: int = 1, kv_len: int = 1, **tensors) -> np.ndarray:
    """The value of a bool expression at every (h=0, i, j): dense_mask of ``mask = expr``."""
    return mask_pattern(expr, params).dense_mask(q_len, kv_len, **tensors)[0]


def constant_true(expr: str, params: str = "") -> bool:
    """The value of a position-independent bool expression (a 1x1 dense mask)."""
    return bool(eval_bool(expr, params)[0, 0])


def errors_of(src: str, filename: str = "<test>") -> attndsl.AttnError:
    """The AttnError that compiling ``src`` raises (fails the test when it compiles)."""
    with pytest.raises(attndsl.AttnError) as info:
        attndsl.compile(src, filename=filename)
    return info.value


def grid(q_len: int, kv_len: int, heads: int = 1):
    """h [H,1,1], q [1,Lq,1] (bottom-right aligned absolute positions), k [1,1,Lkv]."""
    h = np.arange(heads)[:, None, None]
    q = (np.arange(q_len) + kv_len - q_len)[None, :, None]
    k = np.arange(kv_len)[None, None, :]
    return h, q, k


def naive_attention(q, k, v, allowed, s):
    """Hand-written float64 attention of LANGUAGE.md section 1 with explicit loops over rows.

    q [B,H,Lq,D], k/v [B,KVH,Lkv,D]; ``allowed`` bool and ``s`` float, both [B,H,Lq,Lkv]
    (already the final scores, i.e. after the score clause). Returns (out, lse).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, heads, q_len, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = np.zeros((batch, heads, q_len, v.shape[-1]))
    lse = np.full((batch, heads, q_len), -np.inf)
    for b in range(batch):
        for h in range(heads):
            kh = h // group
            for i in range(q_len):
                ok = allowed[b, h, i] & (s[b, h, i] != -np.inf)
                if not ok.any():
                    continue
                row = s[b, h, i][ok]
                m = row.max()
                w = np.exp(row - m)
                out[b, h, i] = (w[:, None] * v[b, kh][ok]).sum(0) / w.sum()
                lse[b, h, i] = m + np.log(w.sum())
    return out, lse


def raw_scores(q, k, scale=None):
    """score0 [B,H,Lq,Lkv] = scale * Q K^T with key/value head h // (heads // kv_heads)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    heads, kv_heads = q.shape[1], k.shape[1]
    kvh = np.arange(heads) // (heads // kv_heads)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    return scale * np.einsum("bhid,bhjd->bhij", q, k[:, kvh])


def qkv(rng, batch, heads, kv_heads, q_len, kv_len, d=8, dv=None):
    dv = d if dv is None else dv
    return (rng.standard_normal((batch, heads, q_len, d)),
            rng.standard_normal((batch, kv_heads, kv_len, d)),
            rng.standard_normal((batch, kv_heads, kv_len, dv)))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def assert_same_values(ref: np.ndarray, got, tol: float = 2e-5) -> None:
    """``got`` (array or tensor) is NaN where ``ref`` is NaN, holds the same infinities, and is
    within ``tol * (max |ref| + 1)`` of the finite values (docs/language.md, non-finite values)."""
    if hasattr(got, "detach"):
        got = got.detach().double().cpu().numpy()
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    fin = np.isfinite(ref)
    assert np.all(np.abs(got[fin] - ref[fin]) <= tol * (np.abs(ref[fin]).max(initial=0) + 1))


def largest_tensor():
    """A torch function mode recording, in ``.largest``, the number of elements of the largest
    tensor any torch function returns while it is active (``with largest_tensor() as rec``)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class LargestTensor(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return result

    return LargestTensor()


@pytest.fixture
def wide_terminal(monkeypatch):
    """A 120 x 50 terminal for the command line's pictures (``usefixtures("wide_terminal")``)."""
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("LINES", "50")


def write_file(tmp_path, name: str, text: str) -> str:
    """``text`` written to ``tmp_path / name`` (UTF-8); its path as a str."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """torch's CPU thread pool thrashes on a loaded 2-core machine; one thread is much faster
    for the many small operations of these tests (``pytestmark = usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def no_host_sync():
    """A torch function mode failing any read of a tensor's values on the host while it is
    active (``with no_host_sync():``): ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``,
    ``bool()`` / ``int()`` / ``float()`` / ``index`` of a tensor, ``torch.Tensor.__array__``
    (NumPy reading a tensor), and the operations whose result's shape depends on values
    (``nonzero``, ``masked_select``, ``unique``). On CUDA each is a device-to-host
    synchronisation; on the CPU the same code path would be one there. (``.to(device)`` is
    not caught: on the CPU a move to the call's device cannot be told from a copy to the host;
    what a copy to the host is for, reading values, is.)"""
    import torch
    from torch.overrides import TorchFunctionMode

    banned = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
              torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
              torch.Tensor.__index__, torch.Tensor.__array__, torch.Tensor.nonzero,
              torch.nonzero, torch.Tensor.masked_select, torch.masked_select,
              torch.Tensor.unique, torch.unique}

    class NoHostSync(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", repr(func))
            if func in banned:
                raise AssertionError(f"host synchronisation: Tensor.{name}")
            return func(*args, **kwargs)

    return NoHostSync()
