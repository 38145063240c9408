"""Property tests of the generated Triton forward kernels against the float64 reference.

Hypothesis draws random *well-typed* patterns as .attn source text: a bool mask built from
comparisons of linear forms of ``q``, ``k`` and ``h`` with small constants, ``//`` and ``%`` by
positive constants (negative dividends included: ``q_len > kv_len`` makes positions negative),
``abs``/``min``/``max``/``clamp``, conditionals, ``not``/``and``/``or``, prelude calls,
``random_blocks``, document tensors (``doc[q] == doc[k]``, ``doc: int[]`` and ``tab: int[][]`` read
at computed indices, with or without a batch dimension) and products past int32 (the language's
int is 64-bit); and optionally a float score clause
built from ``score``, ``float(...)`` of int expressions, constants, a float tensor input, the
transcendental functions guarded to stay finite, ``**``, ``min``/``max`` and ``-inf`` branches.
Each pattern runs through the generated kernel (``pat(..., return_lse=True,
backend="triton-interpret")``, natively where a GPU is present) on random shapes (batch 1-2,
heads 1-4 with kv_heads dividing them, q_len 1-40, kv_len 1-48, head_dim 16 or 24, fp32) and is
compared with ``pat.reference``: out and finite lse within 2e-5 * (max|ref| + 1); rows without an
allowed key have lse -inf and out 0 in both; no NaN anywhere.

Float values stay in a range where fp32 and float64 agree to the tolerance: every float node
carries a bound of its magnitude and is rescaled by an exact power of two when it grows past
:data:`FLOAT_BOUND`. Float comparisons in the score clause compare ``score`` (exact on the
quantised inputs of that test: query and key entries are multiples of 1/2, the scale 1/4 or 1/8)
with thresholds that lie between representable scores, so no comparison is a near tie.

Random masks are often all true or all false; most such examples are discarded (``assume``).
A deterministic test reads the kernel's mask back exactly on floor division and modulo of
negative values, and the regressions at the end are the minimal cases the properties found.

``ATTNDSL_CODEGEN_EXAMPLES`` (a multiplier, default 1) runs more examples, with random seeds,
when hunting bugs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import examples
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attndsl

CUDA = torch.cuda.is_available()
BACKEND = "triton" if CUDA else "triton-interpret"
DEVICE = "cuda" if CUDA else "cpu"
TOL = 2e-5
FLOAT_BOUND = 32.0
SCALE = max(1, int(os.environ.get("ATTNDSL_CODEGEN_EXAMPLES", "1")))
DERANDOMIZE = SCALE == 1


def _settings(n: int):
    return settings(max_examples=examples(n) * SCALE, deadline=None, derandomize=DERANDOMIZE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def _kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))
        yield


# ----------------------------------------------------------------------------- the generator

# bounds of |value| over every call the tests make: q in (-40, 48), k in [0, 48), h < 4
INT_ATOMS = {"q": 48, "k": 48, "h": 3, "q_len": 40, "kv_len": 48, "heads": 4, "kv_heads": 4,
             "w": 9, "c": 6}


@dataclass(frozen=True)
class E:
    """Rendered source text (parenthesised wherever it could bind wrongly) and a bound of
    |value|."""

    text: str
    bound: float = 0.0


@dataclass(frozen=True)
class Ctx:
    """What one pattern may use: its random_blocks call and whether its tensors exist."""

    random_blocks: str
    doc: bool
    bias: bool
    negative: bool          # some query positions are negative (q_len > kv_len)

    def index(self):
        """An index of ``doc``, ``tab`` or ``bias`` (length max(q_len, kv_len)) in range for
        every call made: ``q`` only where no position is negative."""
        return st.sampled_from(["k", "max(q, 0)", "abs(q)", "k // 2", "max(q - 5, 0)",
                                "min(k + 2, kv_len - 1)", "clamp(q + h, 0, kv_len - 1)"]
                               + ([] if self.negative else ["q", "q", "q"]))


@st.composite
def linear(draw) -> E:
    """``a*q + b*k + c*h + d`` over one to three of q, k, h with small coefficients."""
    atoms = draw(st.lists(st.sampled_from(["q", "k", "h"]), min_size=1, max_size=3, unique=True))
    parts, bound = [], 0
    for atom in atoms:
        coef = draw(st.sampled_from([1, 1, 1, -1, -1, 2, -2, 3]))
        term = atom if abs(coef) == 1 else f"{abs(coef)} * {atom}"
        sign = "-" if coef < 0 else "+"
        parts.append(f"{'-' if coef < 0 else ''}{term}" if not parts else f"{sign} {term}")
        bound += abs(coef) * INT_ATOMS[atom]
    const = draw(st.integers(-6, 6))
    if const:
        parts.append(f"{'-' if const < 0 else '+'} {abs(const)}")
    return E(f"({' '.join(parts)})", bound + abs(const))


def int_leaf(ctx: Ctx):
    options = [
        linear(),
        st.sampled_from([E("(q - k)", 87), E("(k - q)", 87)]),
        st.sampled_from(sorted(INT_ATOMS)).map(lambda a: E(a, INT_ATOMS[a])),
        st.integers(-7, 12).map(lambda v: E(f"({v})", abs(v))),
    ]
    if ctx.doc:             # document ids (0..3) of doc [L] and tab [heads, L]
        options.append(ctx.index().map(lambda i: E(f"doc[{i}]", 3)))
        options.append(ctx.index().map(lambda i: E(f"tab[h, {i}]", 3)))
    return st.one_of(*options)


def divisor():
    """A compile-time constant > 0, its largest value: a literal or the parameter c (1..6)."""
    return st.one_of(st.integers(1, 7).map(lambda d: E(str(d), d)),
                     st.sampled_from([E("c", 6), E("(c + 2)", 8)]))


@st.composite
def int_expr(draw, ctx: Ctx, depth: int) -> E:
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return draw(int_leaf(ctx))
    sub = lambda: draw(int_expr(ctx, depth - 1))  # noqa: E731
    kind = draw(st.sampled_from(["//", "%", "//", "%", "abs", "min", "max", "clamp", "if", "+", "-",
                                 "*", "neg"]))
    if kind in ("//", "%"):
        a, d = sub(), draw(divisor())
        if kind == "//":
            return E(f"({a.text} // {d.text})", a.bound + 1)
        return E(f"({a.text} % {d.text})", d.bound - 1)
    if kind == "abs":
        a = sub()
        return E(f"abs({a.text})", a.bound)
    if kind in ("min", "max", "clamp"):
        args = [sub() for _ in range(3 if kind == "clamp" else draw(st.integers(2, 3)))]
        return E(f"{kind}({', '.join(a.text for a in args)})", max(a.bound for a in args))
    if kind == "if":
        a, cond, b = sub(), draw(bool_expr(ctx, depth - 1)), sub()
        return E(f"({a.text} if {cond.text} else {b.text})", max(a.bound, b.bound))
    if kind in ("+", "-"):
        a, b = sub(), sub()
        return E(f"({a.text} {kind} {b.text})", a.bound + b.bound)
    if kind == "*" and draw(st.integers(0, 3)) == 0:     # past int32: the language's int is 64-bit
        a, m = sub(), draw(st.sampled_from([1000003, 100000007, 3000000019]))
        if a.bound * m < 2 ** 61:
            if draw(st.booleans()):
                d = draw(divisor())
                return E(f"(({a.text} * {m}) % {d.text})", d.bound - 1)
            return E(f"({a.text} * {m})", a.bound * m)
    if kind == "*":
        a, m = sub(), draw(st.integers(-3, 3))
        return E(f"({a.text} * {m})" if m >= 0 else f"({a.text} * ({m}))", a.bound * abs(m))
    a = sub()
    return E(f"(-{a.text})", a.bound)


SIZE = st.one_of(st.integers(-2, 10).map(str), st.just("w"))
POSITIVE = st.one_of(st.integers(1, 8).map(str), st.just("c"))


@st.composite
def prelude_call(draw, ctx: Ctx) -> E:
    name = draw(st.sampled_from(["causal", "full", "sliding", "band", "sinks", "globals", "chunked",
                                 "dilated", "strided", "fixed", "prefix", "random_blocks"]))
    if name in ("causal", "full"):
        return E(name)
    if name == "random_blocks":
        return E(ctx.random_blocks)
    if name in ("sliding", "band", "sinks", "globals", "prefix"):
        return E(f"{name}({draw(SIZE)})")
    if name in ("chunked", "strided"):
        return E(f"{name}({draw(POSITIVE)})")
    if name == "dilated":
        return E(f"dilated({draw(SIZE)}, {draw(POSITIVE)})")
    return E(f"fixed({draw(POSITIVE)}, {draw(SIZE)})")


CMP = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])


@st.composite
def bool_leaf(draw, ctx: Ctx) -> E:
    kinds = ["cmp", "cmp", "cmp", "chain", "prelude", "prelude", "prelude", "const"]
    if ctx.doc:
        kinds += ["doc", "doc"]
    kind = draw(st.sampled_from(kinds))
    if kind == "cmp":
        a, b = draw(int_expr(ctx, 1)), draw(int_expr(ctx, 1))
        return E(f"({a.text} {draw(CMP)} {b.text})")
    if kind == "chain":
        parts = [draw(int_expr(ctx, 1)).text for _ in range(3)]
        return E(f"({parts[0]} {draw(CMP)} {parts[1]} {draw(CMP)} {parts[2]})")
    if kind == "prelude":
        return draw(prelude_call(ctx))
    if kind == "doc":
        a, b = draw(ctx.index()), draw(ctx.index())
        if draw(st.integers(0, 3)) == 0:
            return E(f"(doc[{a}] {draw(CMP)} {draw(st.integers(-1, 3))})")
        return E(f"(doc[{a}] {draw(st.sampled_from(['==', '==', '!=', '<=']))} doc[{b}])")
    return E(draw(st.sampled_from(["true", "false", "flag", "(not flag)"])))


@st.composite
def bool_expr(draw, ctx: Ctx, depth: int) -> E:
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return draw(bool_leaf(ctx))
    sub = lambda: draw(bool_expr(ctx, depth - 1))  # noqa: E731
    kind = draw(st.sampled_from(["and", "and", "or", "or", "not", "if", "eq"]))
    if kind in ("and", "or"):
        return E(f"({sub().text} {kind} {sub().text})")
    if kind == "not":
        return E(f"(not {sub().text})")
    if kind == "if":
        a, cond, b = sub(), sub(), sub()
        return E(f"({a.text} if {cond.text} else {b.text})")
    return E(f"({sub().text} {draw(st.sampled_from(['==', '!=']))} {sub().text})")


@st.composite
def mask_clause(draw, ctx: Ctx) -> E:
    """A mask: any bool expression, or one around a prelude call or a window of ``q - k``
    (which are seldom all true or all false)."""
    kind = draw(st.sampled_from(["any", "any", "prelude", "window"]))
    if kind == "any":
        return draw(bool_expr(ctx, 3))
    op = draw(st.sampled_from(["and", "or", "and not"]))
    if kind == "prelude":
        return E(f"({draw(prelude_call(ctx)).text} {op} {draw(bool_expr(ctx, 2)).text})")
    lo, hi = draw(st.integers(-8, 20)), draw(st.integers(-4, 30))
    rel = draw(st.sampled_from(["q - k", "k - q", "q - k + h", "q - 2 * k", "q // 2 - k"]))
    return E(f"({lo} <= {rel} < {hi} {op} {draw(bool_expr(ctx, 2)).text})")


def _rescaled(text: str, bound: float) -> E:
    """``text`` multiplied by an exact power of two that brings its bound under FLOAT_BOUND."""
    if bound <= FLOAT_BOUND:
        return E(text, bound)
    shift = math.ceil(math.log2(bound / FLOAT_BOUND))
    return E(f"({text} * {2.0 ** -shift!r})", bound * 2.0 ** -shift)


FLOAT_CONSTS = st.sampled_from(["0.5", "-1.0", "2.0", "0.25", "1.5", "-0.75", "3.0", "0.1", "1e-3"])
SCORE_BOUND = 8.0            # |score| of the quantised inputs, comfortably (a loose bound)


@st.composite
def float_leaf(draw, ctx: Ctx) -> E:
    kinds = ["score", "score", "score", "int", "int", "h", "const", "f"]
    if ctx.bias:
        kinds.append("bias")
    kind = draw(st.sampled_from(kinds))
    if kind == "score":
        return E("score", SCORE_BOUND)
    if kind == "int":
        a = draw(st.one_of(st.just(E("(q - k)", 96)), int_expr(ctx, 1)))
        return _rescaled(f"float({a.text})", a.bound)
    if kind == "h":
        return E("float(h)", 3)
    if kind == "const":
        t = draw(FLOAT_CONSTS)
        return E(f"({t})", abs(float(t)))
    if kind == "f":
        return E("f", 2.0)
    return E(f"bias[{draw(ctx.index())}]", 4.0)


@st.composite
def float_expr(draw, ctx: Ctx, depth: int) -> E:
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return draw(float_leaf(ctx))
    sub = lambda: draw(float_expr(ctx, depth - 1))  # noqa: E731
    kind = draw(st.sampled_from(["+", "-", "*k", "*", "/", "exp", "log", "sqrt", "tanh", "sigmoid",
                                 "min", "max", "abs", "neg", "clamp", "if", "pow", "odd_pow",
                                 "exp2"]))
    if kind in ("+", "-"):
        a, b = sub(), sub()
        return _rescaled(f"({a.text} {kind} {b.text})", a.bound + b.bound)
    if kind == "*k":
        a, m = sub(), draw(st.sampled_from(["0.5", "-1.5", "2.0", "0.75", "-0.125"]))
        return _rescaled(f"({a.text} * {m})", a.bound * abs(float(m)))
    if kind == "*":
        a, b = sub(), sub()
        return _rescaled(f"({a.text} * {b.text})", a.bound * b.bound)
    if kind == "/":
        a, b = sub(), sub()
        return E(f"({a.text} / (abs({b.text}) + 1.0))", a.bound)
    if kind == "exp":
        a = sub()
        return E(f"exp(min({a.text}, 3.0))", math.exp(3.0))
    if kind == "log":
        a = sub()
        return E(f"log(abs({a.text}) + 1.0)", math.log(a.bound + 1.0))
    if kind == "sqrt":      # + 0.25 keeps the derivative bounded where the argument is near 0
        a = sub()
        return E(f"sqrt(abs({a.text}) + 0.25)", math.sqrt(a.bound + 0.25))
    if kind in ("tanh", "sigmoid"):
        return E(f"{kind}({sub().text})", 1.0)
    if kind in ("min", "max"):
        args = [sub() for _ in range(draw(st.integers(2, 3)))]
        return E(f"{kind}({', '.join(a.text for a in args)})", max(a.bound for a in args))
    if kind == "abs":
        a = sub()
        return E(f"abs({a.text})", a.bound)
    if kind == "neg":
        a = sub()
        return E(f"(-{a.text})", a.bound)
    if kind == "clamp":
        x, lo, hi = sub(), sub(), sub()
        return E(f"clamp({x.text}, {lo.text}, {hi.text})", max(x.bound, lo.bound, hi.bound))
    if kind == "if":
        a, cond, b = sub(), draw(score_cond(ctx)), sub()
        return E(f"({a.text} if {cond.text} else {b.text})", max(a.bound, b.bound))
    if kind == "pow":       # a positive base, any exponent
        a, e = sub(), draw(st.sampled_from(["2.0", "0.5", "-1.0", "1.5", "-0.5", "3.0"]))
        return _rescaled(f"((min(abs({a.text}), 3.0) + 0.5) ** {e})", 3.5 ** max(float(e), 0.0))
    if kind == "odd_pow":   # a base of either sign, an integral exponent (IEEE pow keeps the sign)
        a, e = sub(), draw(st.sampled_from(["2.0", "3.0", "-2.0", "-3.0"]))
        if e.startswith("-"):       # keep the base away from 0, its sign from an exact test
            sign = f"(1.0 if {draw(score_cond(ctx)).text} else -1.0)"
            return E(f"((abs({a.text}) + 1.0) * {sign}) ** {e}", 1.0)
        return E(f"clamp({a.text}, -3.0, 3.0) ** {e}", 27.0)
    a = sub()
    return E(f"2.0 ** clamp({a.text}, -4.0, 4.0)", 16.0)


@st.composite
def score_cond(draw, ctx: Ctx) -> E:
    """A condition of the score clause: a mask-like bool (exact) or ``score`` against a
    threshold halfway between two representable scores (no near ties)."""
    if draw(st.booleans()):
        return draw(bool_expr(ctx, 1))
    t = (2 * draw(st.integers(-96, 96)) + 1) / 128.0
    return E(f"(score {draw(st.sampled_from(['<', '<=', '>', '>=']))} {t!r})")


@st.composite
def score_clause(draw, ctx: Ctx, depth: int = 3) -> E:
    """A float expression, maybe with -inf where only max/min/+ can meet it (never NaN)."""
    kind = draw(st.sampled_from(["plain", "plain", "ninf", "ninf", "max", "min", "add"]))
    if kind == "plain" or depth <= 1:
        return draw(float_expr(ctx, depth))
    if kind == "ninf":
        a, cond = draw(float_expr(ctx, depth - 1)), draw(score_cond(ctx))
        if draw(st.booleans()):
            return E(f"({a.text} if {cond.text} else -inf)", a.bound)
        return E(f"(-inf if {cond.text} else {a.text})", a.bound)
    a, b = draw(score_clause(ctx, depth - 1)), draw(float_expr(ctx, depth - 1))
    if kind == "max":
        return E(f"max({a.text}, {draw(score_clause(ctx, depth - 1)).text})", max(a.bound, b.bound))
    if kind == "min":
        return E(f"min({a.text}, {b.text})", max(a.bound, b.bound))
    return E(f"({a.text} + {b.text})", a.bound + b.bound)


@dataclass(frozen=True)
class Case:
    source: str
    bind: dict
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    d: int
    seed: int
    doc_batched: bool
    uniform_ok: bool        # keep the example when its mask is all true or all false


@st.composite
def shapes(draw):
    batch = draw(st.integers(1, 2))
    heads = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([g for g in range(1, heads + 1) if heads % g == 0]))
    kv_len = draw(st.integers(1, 48))
    if draw(st.integers(0, 3)) == 0:               # negative positions: more queries than keys
        q_len = draw(st.integers(min(kv_len + 1, 40), 40))
    else:
        q_len = draw(st.integers(1, 40))
    return batch, heads, kv_heads, q_len, kv_len, draw(st.sampled_from([16, 24]))


@st.composite
def cases(draw, with_score: bool):
    r, b, seed = draw(st.integers(0, 3)), draw(st.integers(1, 20)), draw(st.integers(0, 5))
    shape = draw(shapes())
    ctx = Ctx(f"random_blocks({r}, {b}, {seed})", doc=draw(st.booleans()), bias=with_score,
              negative=shape[3] > shape[4])
    mask = draw(mask_clause(ctx)).text
    score = draw(score_clause(ctx)).text if with_score else None
    body = mask + (score or "")
    params = [f"w = {draw(st.integers(-3, 9))}", "c: int", "flag: bool", "f = 0.5"]
    params += [p for p, used in (("doc: int[]", "doc["), ("tab: int[][]", "tab["),
                                 ("bias: float[]", "bias[")) if used in body]
    lines = [f"pattern p({', '.join(params)}):", f"    mask = {mask}"]
    if score is not None:
        lines.append(f"    score = {score}")
    bind = {"c": draw(st.integers(1, 6)), "flag": draw(st.booleans()),
            "f": draw(st.sampled_from([0.5, -1.25, 2.0]))}
    return Case("\n".join(lines) + "\n", bind, *shape, seed=draw(st.integers(0, 2 ** 16)),
                doc_batched=draw(st.booleans()), uniform_ok=draw(st.integers(0, 4)) == 0)


# ----------------------------------------------------------------------------- the comparison


def _inputs(case: Case, quantised: bool):
    rng = np.random.default_rng(case.seed)
    qs = (case.batch, case.heads, case.q_len, case.d)
    ks = (case.batch, case.kv_heads, case.kv_len, case.d)
    if quantised:           # multiples of 1/2: every score is exact in fp32 and float64
        q, k = (rng.integers(-3, 4, s) * 0.5 for s in (qs, ks))
    else:
        q, k = rng.standard_normal(qs), rng.standard_normal(ks)
    v = rng.standard_normal(ks)
    length = max(case.q_len, case.kv_len)
    tensors = {}
    if "doc[" in case.source:
        n = case.batch if case.doc_batched else 1
        docs = [np.sort(rng.integers(0, 4, length)) if rng.integers(0, 2) else
                rng.integers(0, 3, length) for _ in range(n)]
        tensors["doc"] = np.stack(docs) if case.doc_batched else docs[0]
    if "tab[" in case.source:
        tensors["tab"] = rng.integers(0, 4, (case.heads, length))
    if "bias[" in case.source:
        tensors["bias"] = rng.uniform(-4.0, 4.0, length)
    return (np.asarray(x, np.float32) for x in (q, k, v)), tensors


def check_kernel(pat, q, k, v, tensors, scale=None, what="", backend=BACKEND):
    """Kernel against the reference on one call (q, k, v: fp32 NumPy arrays)."""
    out, lse = pat(*(torch.from_numpy(x).to(DEVICE) for x in (q, k, v)), return_lse=True,
                   scale=scale, backend=backend, **tensors)
    out, lse = out.double().cpu().numpy(), lse.double().cpu().numpy()
    ref, ref_lse = pat.reference(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                                 scale=scale, **tensors)
    assert not np.isnan(out).any() and not np.isnan(lse).any(), f"NaN from the kernel{what}"
    assert not np.isnan(ref).any() and not np.isnan(ref_lse).any(), f"NaN from the reference{what}"
    empty = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), empty), \
        f"rows without keys differ at {np.argwhere(np.isneginf(lse) != empty)[:4].tolist()}{what}"
    assert not np.isposinf(lse).any() and not np.isposinf(ref_lse).any()
    assert (out[empty] == 0).all() and (ref[empty] == 0).all(), f"an empty row is not 0{what}"
    err = np.abs(out - ref)
    tol = TOL * (np.abs(ref).max(initial=0.0) + 1)
    assert err.max(initial=0.0) <= tol, \
        f"out differs by {err.max()} > {tol} at {np.unravel_index(err.argmax(), err.shape)}{what}"
    fin = ~empty
    lerr = np.abs(lse[fin] - ref_lse[fin]).max(initial=0.0)
    ltol = TOL * (np.abs(ref_lse[fin]).max(initial=0.0) + 1)
    assert lerr <= ltol, f"lse differs by {lerr} > {ltol}{what}"
    return out, ref, ref_lse


def run_case(case: Case, quantised: bool, scale=None, backend=BACKEND):
    pat = attndsl.compile(case.source)["p"].bind(**case.bind)
    (q, k, v), tensors = _inputs(case, quantised)
    # random masks are often all true or all false: keep only some of those
    first = {n: (t[0] if n == "doc" and case.doc_batched else t) for n, t in tensors.items()}
    density = pat.dense_mask(case.q_len, case.kv_len, case.heads, case.kv_heads, **first).mean()
    assume(0 < density < 1 or case.uniform_ok)
    what = (f"\n{case.source}bind={case.bind} B={case.batch} H={case.heads}/{case.kv_heads} "
            f"Lq={case.q_len} Lkv={case.kv_len} D={case.d} seed={case.seed} scale={scale} "
            f"doc_batched={case.doc_batched}")
    check_kernel(pat, q, k, v, tensors, scale, what, backend)


@_settings(150)
@given(cases(with_score=False))
def test_random_masks_match_the_reference(case):
    run_case(case, quantised=False)


@_settings(150)
@given(cases(with_score=True), st.sampled_from([None, 0.25, 0.125]))
def test_random_masks_and_scores_match_the_reference(case, scale):
    if scale is None and case.d != 16:          # the default 1/sqrt(24) is no exact multiple
        scale = 0.25
    run_case(case, quantised=True, scale=scale)


@_settings(80)
@given(st.booleans().flatmap(lambda s: cases(with_score=s)), st.sampled_from(["8x4", "16x8"]),
       st.sampled_from(["1", "0"]))
def test_random_patterns_match_the_reference_on_the_torch_backend(case, block, fused):
    """The torch backend's generated functions, plans and both engines on tiles small enough
    that every call crosses several (codegen/torch_plan.py, codegen/torch_lower.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNDSL_TORCH_BLOCK", block)
        mp.setenv("ATTNDSL_TORCH_FUSED", fused)
        run_case(case, quantised=True, scale=0.25, backend="torch")


# ----------------------------------------------------------------------------- integer edge cases

INTEGER_CASES = [
    ("q // 3", lambda q, k: q // 3),
    ("q % 3", lambda q, k: q % 3),
    ("(q - k) // 4", lambda q, k: (q - k) // 4),
    ("(q - k) % 4", lambda q, k: (q - k) % 4),
    ("(k - q) % 5", lambda q, k: (k - q) % 5),
    ("(2 * k - q) // 3", lambda q, k: (2 * k - q) // 3),
    ("-q // 2", lambda q, k: -q // 2),
    ("(q - k) % 4 - (q - k) // 7", lambda q, k: (q - k) % 4 - (q - k) // 7),
]


@pytest.mark.parametrize("q_len,kv_len", [(40, 13), (37, 30)])
@pytest.mark.parametrize("expr,python", INTEGER_CASES, ids=[c[0] for c in INTEGER_CASES])
def test_integer_division_is_floored_in_the_kernel(expr, python, q_len, kv_len):
    """``EXPR == h - offset``: each head is one value of EXPR (and one head each side matches
    nothing). With equal scores (q = 0) and one-hot values, the kernel's out is 1/n at every
    allowed key of a row, so its mask is read back exactly and compared with Python's floor
    semantics; rows without keys give lse -inf in both."""
    pos_q = np.arange(q_len) + kv_len - q_len
    assert (pos_q < 0).any()
    values = np.array([[python(int(a), b) for b in range(kv_len)] for a in pos_q])
    offset, heads = 1 - values.min(), values.max() - values.min() + 3
    pat = attndsl.compile(f"pattern p:\n    mask = {expr} == h - {offset}\n")["p"]
    d = 48
    q = np.zeros((1, heads, q_len, d), np.float32)
    k = np.zeros((1, 1, kv_len, d), np.float32)
    v = np.eye(kv_len, d, dtype=np.float32)[None, None]
    out, _ref, ref_lse = check_kernel(pat, q, k, v, {}, what=f" ({expr})")
    want = values[None] == (np.arange(heads) - offset)[:, None, None]
    assert np.array_equal(pat.dense_mask(q_len, kv_len, heads=heads, kv_heads=1), want)
    got = out[0, :, :, :kv_len] > 0.5 / kv_len
    assert np.array_equal(got, want), np.argwhere(got != want)[:4]
    assert np.array_equal(np.isneginf(ref_lse[0]), ~want.any(-1))
    assert want[:, pos_q < 0].any(), "negative positions should have keys"


# ----------------------------------------------------------------------------- regressions
# minimal cases of what the properties found


@pytest.mark.parametrize("score", ["float(h)", "f", "float(12)", "exp(f) + float(w * 2)",
                                   "float(kv_len - q_len) * 0.25", "-inf"])
def test_score_clauses_that_do_not_read_the_score(score):
    # the hook returned a Python number or a per-head scalar instead of a tile, and float() of a
    # constant was lowered to ``(12).to(...)``: the kernel raised under the interpreter
    pat = attndsl.compile(f"pattern p(f = 0.5, w = 3):\n    mask = causal\n    score = {score}\n")["p"]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((1, 2, 9, 16), (1, 1, 11, 16), (1, 1, 11, 16)))
    check_kernel(pat, q, k, v, {}, what=f" (score = {score})")


@pytest.mark.parametrize("mask", ["doc[q] == doc[k] and doc[k] >= 0",
                                  "doc[q] == doc[k] and doc[k] >= 0 and topk_blocks(2, 8)"])
@pytest.mark.parametrize("first,second", [(0, 1), (1, 0), (2, 0), (1, 2)])
def test_batched_tensor_inputs_are_described_per_batch_element(mask, first, second):
    # the tile lists were computed from batch element 0's tensors only: tiles empty or full there
    # were skipped or left unmasked for the other elements. Rows: one document (every tile
    # full), documents aligned with the 32-key tiles (off-diagonal tiles empty), no document
    n = 70
    rows = [np.zeros(n, np.int64), np.arange(n) // 32, np.full(n, -1)]
    pat = attndsl.compile(f"pattern p(doc: int[]):\n    mask = {mask}\n")["p"]
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((2, 2, n, 16), (2, 1, n, 16), (2, 1, n, 16)))
    check_kernel(pat, q, k, v, {"doc": np.stack([rows[first], rows[second]])},
                 what=f" ({mask}, rows {first}, {second})")


@pytest.mark.parametrize("mask", ["(k + kv_len * 1000000000 > q) != (k % 2 == 0)",
                                  "(q_len * 1000000000 + k) % 7 == 3 or k < q_len - 3",
                                  "(k + heads * 1500000000 > q + kv_heads * 1500000000) != (k % 2 == 0)",
                                  # a constant past int32, as Python numbers in the jit code:
                                  # the interpreter raised 'out of range for type int32'
                                  "q - k < (-1 * 3000000019) // 1000000000 + 5",
                                  "q - k < (-1 * 3000000019) % 7"])
def test_sizes_are_64_bit_ints_in_the_hooks(mask):
    # q_len, kv_len, heads and kv_heads reached the hooks as the kernel's int32 arguments:
    # kv_len * 1000000000 wrapped around; constant subexpressions were left to Triton's typing
    pat = attndsl.compile(f"pattern p:\n    mask = {mask}\n")["p"]
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((1, 2, 9, 16), (1, 1, 11, 16), (1, 1, 11, 16)))
    check_kernel(pat, q, k, v, {}, what=f" ({mask})")
