"""The torch backend's pipeline (attndsl/torch_backend.py, codegen/torch_plan.py,
codegen/torch_lower.py): the generated torch functions compute what the interpreter does, op by
op; the plan skips empty tiles, evaluates no mask on full ones and gathers residue classes as
strided views; both engines (torch's fused CPU operator and the general one) and the gradient
path agree with the reference on small tiles, where every call crosses many tiles and steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attndsl.codegen import torch_plan
from attndsl.codegen.torch_lower import module_source, torch_hooks
from conftest import pattern
from test_rule_tables import PARAMS, one_node
from torch.overrides import TorchFunctionMode

import attndsl
from attndsl import interp, torch_backend
from attndsl.ir import SELECTOR_OPS, Expr, Op, Type
from attndsl.ops import EXPANDED_OPS

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the lowering
H, Q, K = 3, np.arange(-5, 9), np.arange(0, 8)
T = np.array([5, -3, 7, 2, 0, 9, -1, 4], dtype=np.int64)          # 't': int[], read at k


def _lowered(expr, as_score: bool):
    """The generated module of ``expr`` (as the mask function, or as the score clause)."""
    slots = {p.name: i for i, p in enumerate(p for p in PARAMS if p.is_tensor)}
    mask, score = (Expr(Op.CONST, Type.BOOL, (), True), expr) if as_score else (expr, None)
    namespace: dict = {}
    exec(compile(module_source(mask, score, {"w": 2}, slots), "<lowered>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("op", [op for op in Op if op not in SELECTOR_OPS | EXPANDED_OPS],
                         ids=lambda o: o.name)
def test_the_torch_lowering_computes_what_the_interpreter_does(op):
    node = one_node(op)
    score = np.random.default_rng(0).standard_normal((H, len(Q), len(K))) * 3
    env = interp.Env(h=np.arange(H)[:, None, None], q=Q[None, :, None], k=K[None, None, :],
                     q_len=len(Q), kv_len=len(K), heads=H, kv_heads=1, params={"w": 2},
                     tensors={"t": T, "c": np.zeros((1, 1, 1))}, score=score)
    want = np.broadcast_to(interp.evaluate(node, env), score.shape)
    as_score = node.uses(Op.SCORE)
    fn = _lowered(node, as_score)["score" if as_score else "mask"]
    args = (torch.arange(H).view(-1, 1, 1),) + tuple(torch.tensor(n) for n in (len(Q), len(K), H, 1))
    got = fn(*((torch.from_numpy(score),) if as_score else ()), torch.from_numpy(Q).view(1, -1, 1),
             torch.from_numpy(K).view(1, 1, -1), *args, torch.float64, torch.from_numpy(T),
             torch.zeros((1, 1, 1), dtype=torch.float64))
    got = np.broadcast_to(got.numpy(), score.shape)
    assert got.dtype.kind == want.dtype.kind, (got.dtype, want.dtype)
    if node.type is Type.FLOAT:
        np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    else:
        assert np.array_equal(got, want)


def test_the_generated_module_names_no_user_identifier_and_shares_subexpressions():
    pat = pattern("pattern secret_name(secret_w = 5, secret_t: int[]):\n"
                  "    mask = secret_t[q] == secret_t[k] and (q - k) % 3 == 0 and (q - k) % 3 < 2\n")
    src = torch_hooks(pat.bound()).source
    assert "secret" not in src
    assert src.count("torch.remainder(") == 1          # (q - k) % 3 computed once
    assert "def mask(q, k, h, q_len, kv_len, heads, kv_heads, fdt, t0):" in src


# ----------------------------------------------------------------------------- the plan
def _call(pat, n, heads=2, kv_heads=1, d=8, dtype=torch.float64, seed=0, **tensors):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, d, generator=g, dtype=dtype)
    k = torch.randn(1, kv_heads, n, d, generator=g, dtype=dtype)
    v = torch.randn(1, kv_heads, n, d, generator=g, dtype=dtype)
    return q, k, v


class _Calls(TorchFunctionMode):
    """Records the names of the torch functions a call runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_full_tiles_evaluate_no_mask_and_empty_tiles_are_skipped(monkeypatch):
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", "16x8")
    pat = pattern("pattern t:\n    mask = causal\n")
    q, k, v = _call(pat, 100)
    shapes = []
    real = torch_backend.torch_hooks

    class Spy:
        def __init__(self, module):
            self.module = module

        def mask(self, qpos, kpos, *rest):
            shapes.append((int(qpos.min()), int(qpos.max()), int(kpos.min()), int(kpos.max())))
            return self.module.mask(qpos, kpos, *rest)

    monkeypatch.setattr(torch_backend, "torch_hooks", lambda p: _with_module(real(p), Spy))
    out = pat(q, k, v)
    ref = pat.reference(q.numpy(), k.numpy(), v.numpy())[0]
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)
    # the mask runs on the diagonal tiles only: keys from the first tile of 16 of the rows
    # (which hold the diagonal) on, never on the full tiles left of it
    assert shapes and all(k0 >= q0 - q0 % 16 and k1 <= q1 - q1 % 16 + 15
                          for q0, q1, k0, k1 in shapes), shapes


def _with_module(hooks, spy):
    from dataclasses import replace
    return replace(hooks, module=spy(hooks.module))


def test_a_dilated_window_runs_as_strided_views_of_its_residue_classes(monkeypatch):
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", "8x8")
    pat = pattern("pattern t:\n    mask = dilated(6, 4)\n")
    q, k, v = _call(pat, 90, dtype=torch.float32)
    from attndsl.runtime import bind
    call, data = bind(pat.bound(), q, k, v, False, None, "torch", {})
    planned = torch_plan.plan(torch_plan.analyse(call, data))
    gathered = [p for p in planned.rows[0] if p.gathered]
    assert gathered and all(g.q_step == 4 and g.k_step == 4 for p in gathered for g in p.groups)
    with _Calls() as rec:
        out = pat(q, k, v)
    assert not {"index_select", "gather", "take", "index"} & set(rec.names), set(rec.names)
    ref = pat.reference(*(x.double().numpy() for x in (q, k, v)))[0]
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-6)


def test_the_backend_leaves_torch_threads_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    pat = pattern("pattern t:\n    mask = causal\n")
    pat(*_call(pat, 40))
    assert calls == []


# ----------------------------------------------------------------------------- agreement
PATTERNS = {
    "causal": ("pattern t:\n    mask = causal\n", {}),
    "window_sinks": ("pattern t:\n    mask = sliding(9) or sinks(3)\n", {}),
    "dilated": ("pattern t:\n    mask = dilated(5, 3)\n", {}),
    "per_head": ("pattern t:\n    mask = causal and ((k - h) % 2 == 0 or k == q)\n", {}),
    "docs": ("pattern t(doc: int[]):\n    mask = doc[q] == doc[k]\n",
             {"doc": np.sort(np.random.default_rng(1).integers(0, 4, 70))}),
    "moba": ("pattern t:\n    mask = causal and (topk_blocks(2, 8) or q // 8 == k // 8)\n", {}),
    "alibi": ("pattern t:\n    mask = causal\n    score = score - 0.5 * float(h + 1) * "
              "float(q - k)\n", {}),
    "bias": ("pattern t(b: float[]):\n    mask = sliding(20)\n    score = score + b[k]\n",
             {"b": np.random.default_rng(2).uniform(-2, 2, 70)}),
}


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_both_engines_match_the_reference_on_small_tiles(name, fused, monkeypatch):
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", "16x8")
    monkeypatch.setenv("ATTNDSL_TORCH_FUSED", fused)
    monkeypatch.setattr(torch_plan, "SEGMENT_ELEMENTS", 4 * 16 * 16)   # steps of 16 keys
    src, tensors = PATTERNS[name]
    pat = pattern(src)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        q, k, v = _call(pat, 70, heads=4, kv_heads=2, dtype=dtype)
        out, lse = pat(q, k, v, return_lse=True, **tensors)
        ref, ref_lse = pat.reference(*(x.double().numpy() for x in (q, k, v)), **tensors)
        np.testing.assert_allclose(out.double().numpy(), ref, atol=tol, rtol=tol)
        np.testing.assert_allclose(lse.double().numpy(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["causal", "dilated", "alibi", "bias"])
def test_gradients_on_small_tiles_match_a_dense_computation(name, monkeypatch):
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", "16x8")
    src, tensors = PATTERNS[name]
    pat = pattern(src)
    q, k, v = (x.requires_grad_() for x in _call(pat, 50, heads=2, kv_heads=1))
    out = pat(q, k, v, **tensors)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    # dense: the reference mask and score, autograd through plain torch
    allowed = torch.from_numpy(np.broadcast_to(pat.dense_mask(50, 50, 2, 1, **tensors),
                                               (2, 50, 50)).copy())
    s = (q[0] @ k[0].repeat_interleave(2, 0).transpose(-1, -2)) / np.sqrt(8)
    if "score" in src:
        h = torch.arange(2).view(-1, 1, 1).double()
        qq = torch.arange(50).view(1, -1, 1).double()
        kk = torch.arange(50).view(1, 1, -1).double()
        s = s - 0.5 * (h + 1) * (qq - kk) if name == "alibi" else \
            s + torch.from_numpy(tensors["b"][:50]).view(1, 1, -1)
    p = torch.softmax(s.masked_fill(~allowed, -torch.inf), -1)
    dense = (p @ v[0].repeat_interleave(2, 0))[None]
    (dense * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    for a, x in zip(got, (q, k, v)):
        torch.testing.assert_close(a, x.grad, atol=1e-9, rtol=1e-7)


def test_a_non_finite_value_falls_back_to_the_exact_engine(monkeypatch):
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", "16x8")
    pat = pattern("pattern t:\n    mask = causal\n")
    q, k, v = _call(pat, 40)
    k[0, 0, 3] = 1e308                        # scores overflow to +-inf on some rows
    out, lse = pat(q, k, v, return_lse=True)
    ref, ref_lse = pat.reference(q.numpy(), k.numpy(), v.numpy())
    assert np.array_equal(np.isnan(out.numpy()), np.isnan(ref))
    assert np.array_equal(np.isnan(lse.numpy()), np.isnan(ref_lse))
    assert np.array_equal(np.isposinf(lse.numpy()), np.isposinf(ref_lse))
    fine = ~np.isnan(ref)
    np.testing.assert_allclose(out.numpy()[fine], ref[fine], atol=1e-10)


# ----------------------------------------------------------------------------- per call, per head
def _plan_of(pat, q, k, v, **tensors):
    from attndsl.runtime import bind
    call, data = bind(pat.bound(), q, k, v, False, None, "torch", tensors)
    return torch_plan.plan(torch_plan.analyse(call, data))


def _visited(plan, heads: int, n: int) -> np.ndarray:
    """bool [H, n, n]: the pairs the plan's segments cover, per head."""
    seen = np.zeros((heads, n, n), dtype=bool)
    for part in plan.rows[0]:
        first, count = part.heads or (0, heads)
        for g in part.groups:
            for t in g.tiles:
                rows = g.q_row0 + g.q_step * np.arange(t.r0, t.r1)
                for s in t.segments:
                    cols = g.k_row0 + g.k_step * np.arange(s.c0, s.c1)
                    seen[first:first + count, rows[:, None], cols[None, :]] = True
    return seen


def test_heads_with_their_own_tiles_are_planned_apart(monkeypatch):
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", "32x32")
    pat = pattern("pattern t:\n    mask = causal and (h < 2 or q - k < 32 or k < 4)\n")
    q, k, v = _call(pat, 1024, heads=4, kv_heads=2, d=64)
    planned = _plan_of(pat, q, k, v)
    assert [p.heads for p in planned.rows[0]] == [(0, 2), (2, 2)]
    seen = _visited(planned, 4, 1024)
    allowed = np.broadcast_to(pat.dense_mask(1024, 1024, 4, 2), seen.shape)
    assert (seen >= allowed).all()                          # every allowed pair is visited
    assert seen[2:].sum() < 0.6 * seen[:2].sum()            # the window heads walk less
    out = pat(q, k, v)
    np.testing.assert_allclose(out.numpy(), pat.reference(q.numpy(), k.numpy(), v.numpy())[0],
                               atol=1e-12)


def test_a_selection_is_analysed_from_the_calls_own_tables(monkeypatch):
    """The torch backend's tile classes of a selector pattern are the call's exact ones: a
    tile of unselected blocks is empty, a selected block's tile full (no mask), only the own
    block's diagonal tiles partial."""
    from attndsl.runtime import bind
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", "16x16")
    pat = pattern("pattern t:\n    mask = causal and (topk_blocks(2, 32) or q // 32 == k // 32)\n")
    q, k, v = _call(pat, 320, heads=2, kv_heads=1)
    call, data = bind(pat.bound(), q, k, v, False, None, "torch", {})
    bm = torch_plan.analyse(call, data).launches[0].maps[0]
    allowed = np.broadcast_to(pat.dense_mask(320, 320, 2, 1, query=q[0].numpy(),
                                             key=k[0].numpy()), (2, 320, 320))
    tiles = allowed.reshape(2, 20, 16, 20, 16)
    want = np.where(tiles.all(axis=(2, 4)), 2, np.where(tiles.any(axis=(2, 4)), 1, 0))
    assert np.array_equal(bm, want)
    assert (want == 2).sum() > 2 * (want == 1).sum()        # mostly full: the selected blocks
    out = pat(q, k, v)
    np.testing.assert_allclose(out.numpy(), pat.reference(q.numpy(), k.numpy(), v.numpy())[0],
                               atol=1e-12)


@pytest.mark.parametrize("spec", ["64", "0x64", "ax8", "64x64x2", "-8x8"])
def test_a_malformed_tile_setting_is_a_clear_error(spec, monkeypatch):
    from attndsl import AttnCallError
    monkeypatch.setenv("ATTNDSL_TORCH_BLOCK", spec)
    pat = pattern("pattern t:\n    mask = causal\n")
    with pytest.raises(AttnCallError, match="ATTNDSL_TORCH_BLOCK must be ROWSxKEYS"):
        pat(*_call(pat, 8))


def test_a_score_derivative_of_constants_keeps_the_call_dtype():
    """d max(score, 0.0)/d score is where(c, 1.0, 0.0) of two float literals: the backward
    multiplies it into float32 tiles (it once came back float64 and failed)."""
    pat = attndsl.compile("pattern p:\n    mask = causal\n    score = max(score, 0.0)\n")["p"]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64) for _ in range(4)]
    grads = []
    for dtype in (torch.float32, torch.float64):
        q, k, v = (x.to(dtype).clone().requires_grad_() for x in base[:3])
        (pat(q, k, v, backend="torch") * base[3].to(dtype)).sum().backward()
        assert q.grad.dtype == dtype
        grads.append(q.grad.double())
    assert torch.allclose(grads[0], grads[1], atol=1e-4)
