"""The derivative of the score clause (attndsl/derivative.py) and its lowerings.

For every example pattern with a score clause and hand-written clauses covering every float op,
the derivative d(clause)/d(score) is checked where the clause is finite, at random float32
scores away from kinks: evaluated by the interpreter against a central finite difference of the
clause in float64; the generated torch ``score_grad`` against the interpreter and against torch
autograd through the generated ``score``; the Triton ``score_grad_hook`` / ``score_grad_hook32``
(called from a probe kernel, under Triton's interpreter without a GPU) against the interpreter.
The derivative prints and checks back to the same IR, and the identity is recognised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attndsl.codegen import emit
from attndsl.codegen.cache import load_module
from attndsl.codegen.lower import HOOK_ARGS, module_hooks
from attndsl.codegen.torch_lower import module_source
from conftest import EXAMPLES, pattern

import attndsl
from attndsl import interp
from attndsl.derivative import DERIVATIVE_RULES, is_identity_derivative, score_derivative
from attndsl.ir import Expr, Op, PatternIR, Type
from attndsl.printer import print_pattern

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.cuda.is_available()
L, H = 16, 2                     # q_len = kv_len = L (one 16 x 16 tile), heads
REL = 17                         # the width of the 'rel' tables (2 * max_dist + 1 for max_dist 8)

HEADER = "pattern p(cap = 5.0, w = 0.75, rel: float[][]):\n    mask = k <= q\n"
# clause -> whether the torch / Triton lowerings are checked (selectors need tables per call)
CLAUSES = {
    "cap * tanh(score / cap)": True,
    "exp(score) - 1.0": True,
    "sqrt(abs(score)) + 1.0": True,
    "max(score, 0.0) ** 2.0": True,
    "score ** 1.5": True,
    "2.0 ** score": True,
    "log(sigmoid(score))": True,
    "min(score, -score)": True,
    "score * 2.0 if q - k > 3 else -inf": True,
    "score if q >= k + 2 else score * 0.5 - float(k - q)": True,
    "min(score, 1.0, score * 0.5 + 0.2)": True,
    "score ** score": True,
    "clamp(score, -cap, cap) * w + score / (1.0 + score * score)": True,
    "score + rel[h, clamp(q - k, 0, 8)] * score": True,
    "score * rel[h, q - k] if q >= k else -inf": True,     # the index is guarded by the if
    "-(score * score) / cap + exp(-abs(score)) * float(h + 1)": True,
    "score ** w * 2.0 ** (score / cap) if score > 0.0 else -inf": True,
    "(score if score < 2.0 else 2.0 + log(score - 1.0)) * w": True,
    "score * 2.0 if random_blocks(1, 4) else score - 1.0": False,
}
FLOAT_OPS = {Op.CONST, Op.PARAM, Op.SCORE, Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.IF,
             Op.ABS, Op.MIN, Op.MAX, Op.FLOAT, Op.EXP, Op.LOG, Op.SQRT, Op.TANH, Op.SIGMOID,
             Op.INDEX}


def hand(clause: str) -> attndsl.Pattern:
    return pattern(HEADER + f"    score = {clause}\n")


def example_patterns() -> list[tuple[str, attndsl.Pattern]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.attn")):
        prog = attndsl.load(path)
        out += [(f"{path.stem}:{n}", prog[n]) for n in prog.patterns if prog[n].ir.score is not None]
    return out


EXAMPLE_PATTERNS = example_patterns()
CASES = [(f"hand:{c}", hand(c), lowered) for c, lowered in CLAUSES.items()] + [
    (name, pat, True) for name, pat in EXAMPLE_PATTERNS]
IDS = [c[0] for c in CASES]


def tensors_of(pat) -> dict:
    """A table for every tensor input (float [H, REL] for 'rel', the only kind used here)."""
    rng = np.random.default_rng(1)
    out = {}
    for p in pat.ir.params:
        if p.is_tensor:
            assert p.type.rank == 2 and p.type.elem is Type.FLOAT, p
            out[p.name] = rng.standard_normal((H, REL))
    return out


def draw_scores(seed: int) -> np.ndarray:
    """Scores of float32 values (so the float32 hooks see the same ones), magnitudes in
    [0.1, 0.9] or [1.1, 3]: away from the kinks at 0 and +-1 of the clauses here."""
    rng = np.random.default_rng(seed)
    mag = np.where(rng.random((H, L, L)) < 0.5, rng.uniform(0.1, 0.9, (H, L, L)),
                   rng.uniform(1.1, 3.0, (H, L, L)))
    return (mag * rng.choice([-1.0, 1.0], (H, L, L))).astype(np.float32).astype(np.float64)


class Setup:
    """One case on one tile: the interpreter's Env maker, scores, the clause's value and the
    derivative's (by the interpreter), and where the clause is finite."""

    def __init__(self, pat, seed=0):
        self.pat = pat
        self.tensors = tensors_of(pat)
        grid = pat.grid(L, L, H, H, self.tensors, query=np.ones((H, L, 4)),
                        key=np.ones((H, L, 4)), scale=0.5)
        self.make_env = lambda s: grid.env(np.arange(H), np.arange(L), np.arange(L), score=s)
        self.s = draw_scores(seed)
        self.value = self.clause(self.s)
        self.grad_ir = score_derivative(pat.ir.score, dict(pat.values))
        self.grad = self.evaluate(self.grad_ir, self.s)
        self.live = np.isfinite(self.value)

    def evaluate(self, expr, s):
        return np.broadcast_to(interp.evaluate(expr, self.make_env(s)), s.shape).astype(np.float64)

    def clause(self, s):
        return self.evaluate(self.pat.ir.score, s)


@pytest.mark.parametrize("name, pat, lowered", CASES, ids=IDS)
def test_the_derivative_is_the_finite_difference_of_the_clause(name, pat, lowered):
    st = Setup(pat)
    step = 1e-6 * np.maximum(1.0, np.abs(st.s))
    with np.errstate(all="ignore"):         # -inf - -inf where a pair is dropped
        fd = (st.clause(st.s + step) - st.clause(st.s - step)) / (2 * step)
    live = st.live & np.isfinite(fd)
    assert live.sum() >= L * L // 4, "too few finite pairs to check"
    np.testing.assert_allclose(st.grad[live], fd[live], rtol=1e-6, atol=1e-6)
    assert st.grad_ir.type is Type.FLOAT
    assert not np.isnan(st.grad[live]).any()


def test_the_hand_written_clauses_cover_every_float_op():
    used = {n.op for name, pat, _lowered in CASES if name.startswith("hand")
            for n in pat.ir.score.walk() if n.type is Type.FLOAT}
    assert used == FLOAT_OPS, FLOAT_OPS ^ used


def test_every_op_has_one_derivative_rule():
    assert set(DERIVATIVE_RULES) == set(Op)


# ----------------------------------------------------------------------------- simplification


@pytest.mark.parametrize("name", ["alibi:alibi", "relative_bias:clipped_relative_bias",
                                  "relative_bias:windowed_relative_bias"])
def test_bias_clauses_have_the_identity_derivative(name):
    pat = dict(EXAMPLE_PATTERNS)[name]
    for values in (None, dict(pat.values)):
        d = score_derivative(pat.ir.score, values)
        assert is_identity_derivative(d), d
        assert d.op is Op.CONST and d.value == 1.0 and d.type is Type.FLOAT


@pytest.mark.parametrize("clause, want", [
    ("score + float(q - k) * w", "1.0"),
    ("score - w * float(q - k)", "1.0"),
    ("score * 0.0 + 1.0", "0.0"),
    ("score * (2.0 - 1.0)", "1.0"),
    ("score * w", "w"),
    ("-score", "-1.0"),
    ("score / 4.0 + 1.0", "0.25"),
    ("float(q - k) * w", "0.0"),
    ("rel[h, clamp(q - k, 0, 8)]", "0.0"),
])
def test_the_derivative_is_simplified_as_it_is_built(clause, want):
    from attndsl.printer import print_expr
    pat = hand(clause)
    assert print_expr(score_derivative(pat.ir.score)) == want
    assert is_identity_derivative(score_derivative(pat.ir.score)) == (want == "1.0")


def test_values_fold_parameters():
    pat = hand("score * (w + w)")
    from attndsl.printer import print_expr
    assert print_expr(score_derivative(pat.ir.score)) == "w + w"
    assert print_expr(score_derivative(pat.ir.score, {"cap": 5.0, "w": 0.75})) == "1.5"
    assert is_identity_derivative(score_derivative(hand("score * w").ir.score, {"w": 1.0}))


def test_spans_come_from_the_differentiated_nodes():
    pat = hand("cap * tanh(score / cap)")
    d = score_derivative(pat.ir.score)
    spans = {n.span.filename for n in d.walk()}
    assert spans == {"<test>"}
    assert all(n.span.line == pat.ir.score.span.line for n in d.walk())


def test_a_shared_sub_tree_is_differentiated_once():
    # 2 ** 12 copies of score when expanded: the derivative's distinct nodes grow linearly
    text = "score"
    src = "pattern p:\n    mask = k <= q\n"
    for i in range(12):
        src += f"    let x{i} = tanh({text}) * {text}\n"
        text = f"x{i}"
    pat = pattern(src + f"    score = {text}\n")
    d = score_derivative(pat.ir.score)
    assert len({id(n) for n in d.walk()}) < 12 * 10


# ----------------------------------------------------------------------------- printing


@pytest.mark.parametrize("name, pat, lowered", CASES, ids=IDS)
def test_the_derivative_prints_and_checks_back(name, pat, lowered):
    for values in (None, dict(pat.values)):
        d = score_derivative(pat.ir.score, values)
        ir = PatternIR("d", pat.ir.params, pat.ir.mask, d)
        text = print_pattern(ir, dict(pat.values))
        again = attndsl.compile(text, filename="<printed>")["d"].ir
        assert again.score == d and again.score.type is Type.FLOAT, text


# ----------------------------------------------------------------------------- torch


def torch_functions(pat) -> dict:
    slots = {p.name: i for i, p in enumerate(p for p in pat.ir.params if p.is_tensor)}
    namespace: dict = {}
    source = module_source(pat.ir.mask, pat.ir.score, dict(pat.values), slots)
    exec(compile(source, "<lowered>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name, pat, lowered", [c for c in CASES if c[2]], ids=[c[0] for c in CASES if c[2]])
def test_the_torch_score_grad_is_the_interpreter_s_and_autograd_s(name, pat, lowered):
    st = Setup(pat, seed=1)
    fns = torch_functions(pat)
    pos = torch.arange(L)
    args = (pos.view(1, -1, 1), pos.view(1, 1, -1), torch.arange(H).view(-1, 1, 1),
            *(torch.tensor(n) for n in (L, L, H, H)), torch.float64,
            *(torch.from_numpy(t) for t in st.tensors.values()))
    s = torch.from_numpy(st.s).requires_grad_(True)
    value = fns["score"](s, *args)
    (auto,) = torch.autograd.grad(value.sum(), s)
    grad = fns["score_grad"](s.detach(), *args)
    assert grad.dtype == torch.float64 and torch.broadcast_shapes(grad.shape, s.shape) == s.shape
    grad = np.broadcast_to(grad.numpy(), st.s.shape)
    live = st.live
    np.testing.assert_allclose(grad[live], st.grad[live], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(auto.numpy()[live], st.grad[live], rtol=1e-10, atol=1e-12)


def test_a_constant_torch_score_grad_has_the_tile_s_shape():
    fns = torch_functions(dict(EXAMPLE_PATTERNS)["alibi:alibi"])
    s = torch.full((H, L, 3), -float("inf"), dtype=torch.float32)
    pos = torch.arange(L)
    grad = fns["score_grad"](s, pos.view(1, -1, 1), torch.arange(3).view(1, 1, -1),
                             torch.arange(H).view(-1, 1, 1), *(torch.tensor(n) for n in (L, L, H, H)),
                             torch.float32)
    assert grad.shape == s.shape and grad.dtype == torch.float32 and bool((grad == 1.0).all())


# ----------------------------------------------------------------------------- Triton

SLOT_ARGS = ", ".join(HOOK_ARGS[8:])
PROBE = f'''

@triton.jit
def probe(S, OUT, q_len, kv_len, heads, kv_heads, {SLOT_ARGS},
          BM: tl.constexpr, BN: tl.constexpr, FN: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    at = h * BM * BN + rm[:, None] * BN + rn[None, :]
    s = tl.load(S + at)
    q = (rm + (kv_len - q_len)).to(tl.int64)[:, None]
    k = rn.to(tl.int64)[None, :]
    d = FN(s, q, k, h, q_len, kv_len, heads, kv_heads, {SLOT_ARGS})
    tl.store(OUT + at, d)
'''


@pytest.fixture
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def slot_args(tensors: dict, device) -> list:
    args = []
    for t in tensors.values():
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        args += [t, *t.shape, 1, *t.stride(), 0]
    dummy = torch.zeros(1, dtype=torch.int64, device=device)
    for _ in range(len(tensors), 4):
        args += [dummy, 1, 1, 1, 0, 0, 0]
    return args


@pytest.mark.usefixtures("_kernel_cache")
@pytest.mark.parametrize("name, pat, lowered", [c for c in CASES if c[2]], ids=[c[0] for c in CASES if c[2]])
def test_the_triton_score_grad_hooks_are_the_interpreter_s(name, pat, lowered):
    st = Setup(pat, seed=2)
    slots = {p.name: i for i, p in enumerate(p for p in pat.ir.params if p.is_tensor)}
    source = module_hooks(pat.ir.mask, pat.ir.score, dict(pat.values), slots)
    module = load_module("import triton\nimport triton.language as tl\n\n\n" + source + PROBE,
                         interpret=not CUDA, prefix="attndsl_test_grad")
    device = "cuda" if CUDA else "cpu"
    s = torch.from_numpy(st.s.astype(np.float32)).to(device)
    live = st.live & np.isfinite(st.grad)
    for hook in (module.score_grad_hook, module.score_grad_hook32):
        out = torch.full_like(s, float("nan"))
        with np.errstate(all="ignore"):     # the interpreter's NumPy: log of a negative score
            module.probe[(H,)](s, out, L, L, H, H, *slot_args(st.tensors, device), BM=L, BN=L,
                               FN=hook)
        got = out.cpu().numpy().astype(np.float64)
        assert np.isfinite(got[live]).all()
        np.testing.assert_allclose(got[live], st.grad[live], rtol=3e-5, atol=3e-6)


def test_the_module_of_a_pattern_has_the_grad_hooks_with_the_score_hook_s_signature():
    import ast

    for name, pat, _ in CASES:
        tree = ast.parse(emit.module_source(pat.bound()))
        funcs = {f.name: [a.arg for a in f.args.args] for f in tree.body
                 if isinstance(f, ast.FunctionDef)}
        for suffix in ("", "32"):
            assert funcs[f"score_grad_hook{suffix}"] == funcs["score_hook"] == list(HOOK_ARGS), name
    bare = pattern("pattern p:\n    mask = k <= q\n")
    assert "score_grad" not in emit.module_source(bare.bound())
    assert "score_grad" not in module_source(bare.ir.mask, None, {}, {})


def test_a_constant_derivative_fills_the_tile():
    pat = dict(EXAMPLE_PATTERNS)["alibi:alibi"]
    text = module_hooks(pat.ir.mask, pat.ir.score, dict(pat.values), {})
    body = text.split("def score_grad_hook(")[1].split("@triton.jit")[0]
    assert "return tl.zeros_like(s) + (1.0)" in body


def test_zero_derivative_of_a_clause_without_score():
    pat = hand("float(q - k) * w")
    d = score_derivative(pat.ir.score)
    assert d == Expr(Op.CONST, Type.FLOAT, (), 0.0)
