"""Property tests (hypothesis): random well-typed expressions against a Python evaluator, and the
printer round trip on random patterns.

The generator builds a small typed AST, renders it as .attn text with the fewest parentheses the
precedence table of LANGUAGE.md section 3 allows (plus, at random, redundant ones), and evaluates
it in Python with Python semantics (floor division, modulo, chains, short-circuit conditionals).
The compiled pattern is then evaluated by ``dense_mask`` at every (h, q, k) of a small call and
compared point by point: exactly for int and bool, and for float exactly unless a
transcendental function (whose last bit may differ between implementations) is involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attndsl

# call geometry for the evaluation: bottom-right aligned, so q runs over [KV - Q, KV)
Q_LEN, KV_LEN, HEADS, KV_HEADS = 4, 6, 2, 1
PARAMS = {"a": 3, "n": -2, "f": 0.5, "g": -1.25, "b": True, "c": False}
PARAM_TEXT = "a = 3, n = -2, f = 0.5, g = -1.25, b = true, c = false"
TI = np.array([3, -1, 0, 7, 2, 5])                   # ti: int[], indexed by k (or q)
TF = np.array([0.5, -2.0, 1.25, 3.0, -0.75, 10.0])   # tf: float[]
TENSOR_TEXT = "ti: int[], tf: float[]"

IF, OR, AND, NOT, CMP, BOR, BXOR, BAND, SHIFT, ADD, MUL, UNARY, POW, ATOM = range(14)
INT, FLOAT, BOOL = "int", "float", "bool"
BIG = 2 ** 53


class NearTie(Exception):
    """A float comparison too close to call across implementations: the example is skipped."""


class Overflow(Exception):
    """A value outside the range where both implementations agree (int64 wrap, float overflow)."""


@dataclass(frozen=True)
class V:
    """A Python value; whether every float operation leading to it is correctly rounded (so that
    any IEEE implementation gets the same bits); the largest magnitude met on the way."""

    v: object
    exact: bool = True
    mag: float = 0.0


def mk(value, *parts: V, exact: bool = True) -> V:
    """The V of ``value`` computed from ``parts``."""
    mag = max([abs(float(value))] + [p.mag for p in parts]) if not isinstance(value, bool) else \
        max([0.0] + [p.mag for p in parts])
    return V(value, exact and all(p.exact for p in parts), mag)


@dataclass(frozen=True)
class Node:
    text: str            # rendered text
    level: int           # precedence level of the text
    typ: str
    fn: object           # env -> V

    def at(self, min_level: int, paren: bool = False) -> str:
        return f"({self.text})" if self.level < min_level or paren else self.text


def _float(x) -> float:
    x = float(x)
    if not math.isfinite(x) or abs(x) > 1e150:
        raise Overflow(x)
    return x


def _int(x) -> int:
    if abs(x) > BIG:
        raise Overflow(x)
    return int(x)


def _checked(typ, x):
    return _int(x) if typ == INT else _float(x) if typ == FLOAT else bool(x)


# ----------------------------------------------------------------------------- the generator

INT_LITS = st.integers(0, 12)
FLOAT_LITS = st.sampled_from(["0.5", "1.0", "2.0", "0.25", "1e-3", "3.5", "10.0", "1.5e1", "0.1", "7."])


def leaf(typ: str, allow_score: bool):
    if typ == INT:
        names = ["q", "k", "h", "q_len", "kv_len", "heads", "kv_heads", "a", "n"]
        return st.one_of(
            INT_LITS.map(lambda v: Node(str(v), ATOM, INT, lambda env, v=v: V(v))),
            st.sampled_from(names).map(lambda s: Node(s, ATOM, INT, lambda env, s=s: V(env[s]))),
            st.sampled_from(["k", "q - (kv_len - 6)"]).map(lambda i: Node(
                f"ti[{i}]", ATOM, INT,
                lambda env, i=i: V(int(TI[env["k"] if i == "k" else env["q"] - (env["kv_len"] - 6)])))),
        )
    if typ == FLOAT:
        opts = [
            FLOAT_LITS.map(lambda t: Node(t, ATOM, FLOAT, lambda env, t=t: V(float(t)))),
            st.sampled_from(["f", "g"]).map(lambda s: Node(s, ATOM, FLOAT, lambda env, s=s: V(env[s]))),
            st.just(Node("tf[k]", ATOM, FLOAT, lambda env: V(float(TF[env["k"]])))),
        ]
        if allow_score:
            # the score comes from a matrix product whose summation order is the implementation's
            opts.append(st.just(Node("score", ATOM, FLOAT, lambda env: mk(env["score"], exact=False))))
        return st.one_of(*opts)
    return st.one_of(
        st.sampled_from(["true", "false"]).map(
            lambda t: Node(t, ATOM, BOOL, lambda env, t=t: V(t == "true"))),
        st.sampled_from(["b", "c"]).map(lambda s: Node(s, ATOM, BOOL, lambda env, s=s: V(env[s]))),
    )


def _binary(sym, level, lmin, rmin, typ, a, b, py, extra_parens=(False, False)):
    text = f"{a.at(lmin, extra_parens[0])} {sym} {b.at(rmin, extra_parens[1])}"

    def fn(env):
        x, y = a.fn(env), b.fn(env)
        with np.errstate(all="ignore"):
            return mk(_checked(typ, py(x.v, y.v)), x, y)
    return Node(text, level, typ, fn)


def _call(name, args, typ, py, exact=True):
    text = f"{name}({', '.join(x.text for x in args)})"

    def fn(env):
        vals = [x.fn(env) for x in args]
        with np.errstate(all="ignore"):
            out = py(*[x.v for x in vals])
        return mk(_checked(typ, out), *vals, exact=exact)
    return Node(text, ATOM, typ, fn)


def _cmp_fn(ops, operands):
    pyops = {"<": lambda x, y: x < y, "<=": lambda x, y: x <= y, ">": lambda x, y: x > y,
             ">=": lambda x, y: x >= y, "==": lambda x, y: x == y, "!=": lambda x, y: x != y}

    def fn(env):
        vals = [o.fn(env) for o in operands]
        result = True
        for op, x, y in zip(ops, vals, vals[1:]):
            if operands[0].typ == FLOAT and not (x.exact and y.exact):
                if abs(x.v - y.v) <= 1e-9 * (1 + x.mag + y.mag):
                    raise NearTie()
            result = result and pyops[op](x.v, y.v)     # Python chains short-circuit too
        return V(bool(result))
    return fn


@st.composite
def expr(draw, typ: str, depth: int, allow_score: bool = False) -> Node:
    if depth <= 0 or draw(st.integers(0, 4)) == 0:
        return draw(leaf(typ, allow_score))
    sub = lambda t, d=depth - 1: expr(t, d, allow_score)  # noqa: E731
    par = lambda: draw(st.integers(0, 7)) == 0             # noqa: E731 - a redundant parenthesis
    if typ == INT:
        kind = draw(st.sampled_from(["+", "-", "*", "neg", "//", "%", "abs", "min", "max", "clamp", "if",
                                     "&", "|", "^", "<<", ">>", "~", "ilog2", "floor", "ceil", "round",
                                     "sum", "max_of"]))
        if kind in _BITS or kind in ("<<", ">>", "~", "ilog2"):
            return _int_bits(draw, kind, sub, par)
        if kind in ("floor", "ceil", "round"):      # (of no score: the checker refuses it)
            return _to_int(kind, draw(expr(FLOAT, depth - 1)))
        if kind in ("sum", "max_of"):
            return _int_reduction(draw, kind, depth, sub)
        if kind in ("+", "-"):
            a, b = draw(sub(INT)), draw(sub(INT))
            return _binary(kind, ADD, ADD, MUL, INT, a, b, (lambda x, y: x + y) if kind == "+" else
                           (lambda x, y: x - y), (par(), par()))
        if kind == "*":
            a, b = draw(sub(INT)), draw(leaf(INT, False))       # a leaf keeps ints small
            if draw(st.booleans()):
                a, b = b, a
            return _binary("*", MUL, MUL, UNARY, INT, a, b, lambda x, y: x * y, (par(), par()))
        if kind in ("//", "%"):
            a = draw(sub(INT))
            d = draw(st.integers(1, 7))
            dnode = Node(str(d), ATOM, INT, lambda env, d=d: V(d))
            if draw(st.integers(0, 3)) == 0:                   # a constant divisor expression
                dnode = Node(f"a + {d}", ADD, INT, lambda env, d=d: V(env["a"] + d))   # a == 3
            return _binary(kind, MUL, MUL, UNARY, INT, a, dnode,
                           (lambda x, y: x // y) if kind == "//" else (lambda x, y: x % y), (par(), False))
        if kind == "neg":
            a = draw(sub(INT))
            return Node(f"-{a.at(UNARY, par())}", UNARY, INT, lambda env: mk(_int(-a.fn(env).v)))
        if kind == "abs":
            return _call("abs", [draw(sub(INT))], INT, abs)
        if kind in ("min", "max"):
            args = [draw(sub(INT)) for _ in range(draw(st.integers(2, 4)))]
            return _call(kind, args, INT, min if kind == "min" else max)
        if kind == "clamp":
            x, lo, hi = draw(sub(INT)), draw(sub(INT)), draw(sub(INT))
            return _call("clamp", [x, lo, hi], INT, lambda x, lo, hi: min(max(x, lo), hi))
        return _if(draw, INT, sub, par)
    if typ == FLOAT:
        kind = draw(st.sampled_from(["+", "-", "*", "/", "**", "square", "neg", "float", "abs", "min",
                                     "max", "clamp", "if", "exp", "log", "sqrt", "tanh", "sigmoid",
                                     "erf", "exp2", "log2"]))
        if kind in ("+", "-", "*"):
            a, b = draw(sub(FLOAT)), draw(sub(FLOAT))
            py = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}[kind]
            level, rmin = (ADD, MUL) if kind != "*" else (MUL, UNARY)
            return _binary(kind, level, level, rmin, FLOAT, a, b, py, (par(), par()))
        if kind == "/":
            a, g = draw(sub(FLOAT)), draw(sub(FLOAT))
            den = Node(f"abs({g.text}) + 1.0", ADD, FLOAT,
                       lambda env: (lambda y: mk(abs(y.v) + 1.0, y))(g.fn(env)))
            return _binary("/", MUL, MUL, UNARY, FLOAT, a, den, lambda x, y: x / y, (par(), False))
        if kind == "**":
            a = draw(sub(FLOAT))
            base = Node(f"abs({a.text}) + 0.5", ADD, FLOAT,
                        lambda env: (lambda y: mk(abs(y.v) + 0.5, y))(a.fn(env)))
            e = draw(st.one_of(FLOAT_LITS.map(lambda t: Node(t, ATOM, FLOAT, lambda env, t=t: V(float(t)))),
                               sub(FLOAT).map(lambda x: _call("tanh", [x], FLOAT, np.tanh, exact=False))))
            if draw(st.booleans()):                       # a negative exponent: unary minus binds looser
                e = Node(f"-{e.at(UNARY)}", UNARY, FLOAT, lambda env, e=e: (lambda y: mk(-y.v, y))(e.fn(env)))
            node = _binary("**", POW, ATOM, UNARY, FLOAT, base, e, lambda x, y: np.power(x, y))
            return Node(node.text, POW, FLOAT, lambda env: mk(node.fn(env).v, node.fn(env), exact=False))
        if kind == "square":                  # any base, including a power or a negation
            a = draw(sub(FLOAT))
            two = Node("2.0", ATOM, FLOAT, lambda env: V(2.0))
            node = _binary("**", POW, ATOM, UNARY, FLOAT, a, two, lambda x, y: np.power(x, y), (par(), False))
            return Node(node.text, POW, FLOAT, lambda env: mk(node.fn(env).v, node.fn(env), exact=False))
        if kind == "neg":
            a = draw(sub(FLOAT))
            return Node(f"-{a.at(UNARY, par())}", UNARY, FLOAT,
                        lambda env: (lambda y: mk(-y.v, y))(a.fn(env)))
        if kind == "float":
            return _call("float", [draw(sub(INT))], FLOAT, float)
        if kind == "abs":
            return _call("abs", [draw(sub(FLOAT))], FLOAT, abs)
        if kind in ("min", "max"):
            args = [draw(sub(FLOAT)) for _ in range(draw(st.integers(2, 3)))]
            return _call(kind, args, FLOAT, min if kind == "min" else max)
        if kind == "clamp":
            x, lo, hi = draw(sub(FLOAT)), draw(sub(FLOAT)), draw(sub(FLOAT))
            return _call("clamp", [x, lo, hi], FLOAT, lambda x, lo, hi: min(max(x, lo), hi))
        if kind == "if":
            return _if(draw, FLOAT, sub, par)
        x = draw(sub(FLOAT))
        if kind == "exp":                       # keep exp's argument from overflowing
            inner = _call("min", [x, Node("5.0", ATOM, FLOAT, lambda env: V(5.0))], FLOAT, min)
            return _call("exp", [inner], FLOAT, np.exp, exact=False)
        if kind == "log":
            inner = Node(f"abs({x.text}) + 1.0", ADD, FLOAT,
                         lambda env: (lambda y: mk(abs(y.v) + 1.0, y))(x.fn(env)))
            return _call("log", [inner], FLOAT, np.log, exact=False)
        if kind == "sqrt":
            inner = _call("abs", [x], FLOAT, abs)
            return _call("sqrt", [inner], FLOAT, math.sqrt)   # correctly rounded everywhere
        if kind == "tanh":
            return _call("tanh", [x], FLOAT, np.tanh, exact=False)
        if kind == "erf":
            return _call("erf", [x], FLOAT, math.erf, exact=False)
        if kind == "exp2":                      # keep its argument from overflowing
            inner = _call("min", [x, Node("5.0", ATOM, FLOAT, lambda env: V(5.0))], FLOAT, min)
            return _call("exp2", [inner], FLOAT, lambda v: 2.0 ** v, exact=False)
        if kind == "log2":
            inner = Node(f"abs({x.text}) + 1.0", ADD, FLOAT,
                         lambda env: (lambda y: mk(abs(y.v) + 1.0, y))(x.fn(env)))
            return _call("log2", [inner], FLOAT, math.log2, exact=False)
        return _call("sigmoid", [x], FLOAT, lambda v: 1.0 / (1.0 + np.exp(-v)), exact=False)
    # bool
    kind = draw(st.sampled_from(["and", "or", "not", "cmp_int", "cmp_float", "chain", "eq_bool", "if",
                                 "any", "all"]))
    if kind in ("any", "all"):
        return _bool_reduction(draw, kind, depth, sub)
    if kind in ("and", "or"):
        a, b = draw(sub(BOOL)), draw(sub(BOOL))
        level, rmin = (AND, NOT) if kind == "and" else (OR, AND)
        text = f"{a.at(level, par())} {kind} {b.at(rmin, par())}"
        if kind == "and":
            return Node(text, AND, BOOL, lambda env: V(a.fn(env).v and b.fn(env).v))
        return Node(text, OR, BOOL, lambda env: V(a.fn(env).v or b.fn(env).v))
    if kind == "not":
        a = draw(sub(BOOL))
        return Node(f"not {a.at(NOT, par())}", NOT, BOOL, lambda env: V(not a.fn(env).v))
    if kind in ("cmp_int", "cmp_float", "chain"):
        t = FLOAT if kind == "cmp_float" else draw(st.sampled_from([INT, INT, FLOAT]))
        n = draw(st.integers(3, 4)) if kind == "chain" else 2
        operands = [draw(sub(t)) for _ in range(n)]
        ops = [draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="])) for _ in range(n - 1)]
        text = operands[0].at(ADD, par()) + "".join(
            f" {op} {o.at(ADD, par())}" for op, o in zip(ops, operands[1:]))
        return Node(text, CMP, BOOL, _cmp_fn(ops, operands))
    if kind == "eq_bool":
        a, b = draw(sub(BOOL)), draw(sub(BOOL))
        op = draw(st.sampled_from(["==", "!="]))
        return Node(f"{a.at(ADD)} {op} {b.at(ADD)}", CMP, BOOL, _cmp_fn([op], [a, b]))
    return _if(draw, BOOL, sub, par)


_BITS = {"&": (BAND, lambda x, y: x & y), "|": (BOR, lambda x, y: x | y),
         "^": (BXOR, lambda x, y: x ^ y)}


def _int_bits(draw, kind, sub, par) -> Node:
    """A bit operator, a shift by a small count (a literal, or a sub-expression made small), ~
    or ilog2, with Python's semantics."""
    if kind in _BITS:
        level, py = _BITS[kind]
        a, b = draw(sub(INT)), draw(sub(INT))
        return _binary(kind, level, level, level + 1, INT, a, b, py, (par(), par()))
    if kind == "~":
        a = draw(sub(INT))
        return Node(f"~{a.at(UNARY, par())}", UNARY, INT, lambda env: mk(_int(~a.fn(env).v)))
    if kind == "ilog2":
        return _call("ilog2", [draw(sub(INT))], INT,
                     lambda n: n.bit_length() - 1 if n >= 1 else -1)
    a = draw(sub(INT))
    if draw(st.booleans()):
        c = draw(st.integers(0, 6))
        count = Node(str(c), ATOM, INT, lambda env, c=c: V(c))
    else:                                   # a computed count in 0..4
        x = draw(sub(INT))
        count = Node(f"abs({x.text}) % 5", MUL, INT,
                     lambda env: (lambda y: mk(abs(y.v) % 5, y))(x.fn(env)))
    py = (lambda x, y: x << y) if kind == "<<" else (lambda x, y: x >> y)
    return _binary(kind, SHIFT, SHIFT, ADD, INT, a, count, py, (par(), par()))


def _to_int(kind: str, x: Node) -> Node:
    """floor / ceil / round (half to even) of a float, skipped (NearTie) where an inexact
    argument is too close to the boundary where the result changes."""
    py = {"floor": math.floor, "ceil": math.ceil, "round": round}[kind]

    def fn(env):
        y = x.fn(env)
        if not math.isfinite(y.v) or abs(y.v) > BIG:
            raise Overflow(y.v)
        edge = y.v - 0.5 if kind == "round" else y.v
        if not y.exact and abs(edge - round(edge)) <= 1e-9 * (1 + y.mag):
            raise NearTie()
        return mk(_int(py(y.v)), y)
    return Node(f"{kind}({x.text})", ATOM, INT, fn)


def _loop(depth: int) -> str:
    """The loop variable of a reduction at this generator depth (names differ when nested)."""
    return f"i{depth}"


def _int_reduction(draw, kind, depth, sub) -> Node:
    """sum(A * i + B for i in range(N)) or max(A - i * B ...), N in 0..3 (max: 1..3)."""
    name = _loop(depth)
    n = draw(st.integers(0 if kind == "sum" else 1, 3))
    a, b = draw(sub(INT)), draw(sub(INT))
    if kind == "sum":
        body = f"{a.at(MUL)} * {name} + {b.at(MUL)}"
        item = lambda env: a.fn(env).v * env[name] + b.fn(env).v       # noqa: E731
    else:
        body = f"{a.at(ADD)} - {name} * {b.at(UNARY)}"
        item = lambda env: a.fn(env).v - env[name] * b.fn(env).v       # noqa: E731
    spell = "sum" if kind == "sum" else "max"

    def fn(env):
        vals = [item({**env, name: i}) for i in range(n)]
        return mk(_int(sum(vals) if kind == "sum" else max(vals)))
    return Node(f"{spell}({body} for {name} in range({n}))", ATOM, INT, fn)


def _bool_reduction(draw, kind, depth, sub) -> Node:
    """any/all(C for i in range(N)) with C a bool expression of i, N in 0..3, short-circuit."""
    name = _loop(depth)
    n = draw(st.integers(0, 3))
    a = draw(sub(INT))
    c = draw(sub(BOOL))
    text_body = f"({a.text}) % 4 == {name} or {c.at(OR)}"

    def fn(env):
        items = ((a.fn({**env, name: i}).v % 4 == i) or c.fn({**env, name: i}).v for i in range(n))
        return V(any(items) if kind == "any" else all(items))
    return Node(f"{kind}({text_body} for {name} in range({n}))", ATOM, BOOL, fn)


def _if(draw, typ, sub, par) -> Node:
    then, cond, other = draw(sub(typ)), draw(sub(BOOL)), draw(sub(typ))
    text = f"{then.at(OR, par())} if {cond.at(OR, par())} else {other.at(IF, par())}"

    def fn(env):
        return then.fn(env) if cond.fn(env).v else other.fn(env)
    return Node(text, IF, typ, fn)


# ----------------------------------------------------------------------------- evaluation


def _envs():
    for h in range(HEADS):
        for i in range(Q_LEN):
            for j in range(KV_LEN):
                env = dict(PARAMS, h=h, q=i + KV_LEN - Q_LEN, k=j, q_len=Q_LEN, kv_len=KV_LEN,
                           heads=HEADS, kv_heads=KV_HEADS, score=None)
                yield (h, i, j), env


def python_values(node: Node):
    """(values, exact, magnitude), each [H, Lq, Lkv], by the Python evaluator.

    Examples with a near tie or an out-of-range value are skipped (``assume``)."""
    dtype = {INT: np.int64, FLOAT: np.float64, BOOL: bool}[node.typ]
    out = np.zeros((HEADS, Q_LEN, KV_LEN), dtype)
    exact = np.ones((HEADS, Q_LEN, KV_LEN), bool)
    mag = np.zeros((HEADS, Q_LEN, KV_LEN))
    try:
        for idx, env in _envs():
            r = node.fn(env)
            out[idx], exact[idx], mag[idx] = r.v, r.exact, r.mag
    except (NearTie, Overflow):
        assume(False)
    return out, exact, mag


def compile_mask(mask: str) -> attndsl.Pattern:
    src = f"pattern t({PARAM_TEXT}, {TENSOR_TEXT}, want: float[][][], tol: float[][][], wi: int[][][]):\n" \
          f"    mask = {mask}\n"
    return attndsl.compile(src)["t"]


def _full(values: np.ndarray) -> np.ndarray:
    """values [H, Lq, Lkv] placed at absolute query rows: [H, KV_LEN, KV_LEN] for want[h, q, k]."""
    full = np.zeros((HEADS, KV_LEN, KV_LEN), values.dtype)
    full[:, KV_LEN - Q_LEN:] = values
    return full


def run_mask(mask: str, want=None, tol=None, wi=None) -> np.ndarray:
    zeros_f = np.zeros((HEADS, KV_LEN, KV_LEN))
    pat = compile_mask(mask)
    return pat.dense_mask(Q_LEN, KV_LEN, heads=HEADS, kv_heads=KV_HEADS, ti=TI, tf=TF,
                          want=zeros_f if want is None else _full(want),
                          tol=zeros_f if tol is None else _full(tol),
                          wi=np.zeros((HEADS, KV_LEN, KV_LEN), np.int64) if wi is None else _full(wi))


SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=True)


@SETTINGS
@given(expr(BOOL, 4))
def test_bool_expressions_match_python(node):
    want, _, _ = python_values(node)
    got = run_mask(node.text)
    assert np.array_equal(got, want), (node.text, np.argwhere(got != want)[:3])


@SETTINGS
@given(expr(INT, 4))
def test_int_expressions_match_python(node):
    want, _, _ = python_values(node)
    got = run_mask(f"({node.text}) == wi[h, q, k]", wi=want)
    assert got.all(), (node.text, np.argwhere(~got)[:3])


@SETTINGS
@given(expr(FLOAT, 4))
def test_float_expressions_match_python(node):
    want, exact, mag = python_values(node)
    tol = np.where(exact, 0.0, 1e-9 * (1.0 + mag))
    got = run_mask(f"abs(({node.text}) - want[h, q, k]) <= tol[h, q, k]", want=want, tol=tol)
    assert got.all(), (node.text, np.argwhere(~got)[:3])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(expr(FLOAT, 3, allow_score=True))
def test_score_clause_expressions_match_python(node):
    # one key per call: lse == s exactly, so the score clause's value can be read back
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, HEADS, Q_LEN, 4))
    k = rng.standard_normal((1, KV_HEADS, 1, 4))
    v = rng.standard_normal((1, KV_HEADS, 1, 4))
    src = f"pattern t({PARAM_TEXT}, {TENSOR_TEXT}):\n    mask = true\n    score = {node.text}\n"
    pat = attndsl.compile(src)["t"]
    s0 = np.einsum("hid,jd->hij", q[0], k[0, 0]) / 2.0
    want = np.zeros((HEADS, Q_LEN))
    mag = np.zeros((HEADS, Q_LEN))
    try:
        for h in range(HEADS):
            for i in range(Q_LEN):
                env = dict(PARAMS, h=h, q=i + 1 - Q_LEN, k=0, q_len=Q_LEN, kv_len=1, heads=HEADS,
                           kv_heads=KV_HEADS, score=float(s0[h, i, 0]))
                r = node.fn(env)
                want[h, i], mag[h, i] = r.v, r.mag
    except (NearTie, Overflow):
        assume(False)
    _, lse = pat.reference(q, k, v, ti=TI, tf=TF)
    assert np.isfinite(lse).all(), node.text
    assert np.all(np.abs(lse[0] - want) <= 1e-9 * (1.0 + mag)), (node.text, lse[0], want)


# ----------------------------------------------------------------------------- printer round trip


@st.composite
def random_pattern(draw):
    """Source text of a pattern with random parameters, lets, a mask and maybe a score."""
    params = ["a = 3", "n = -2", "f = 0.5", "g = -1.25", "b = true", "c = false"]
    extra = draw(st.lists(st.sampled_from(["r1: int", "r2: float", "r3: bool", "x: int[][]",
                                           "y: float[][][]", "big = 9007199254740993",
                                           "tiny = 1e-300", "neg_inf = -inf", "pinf = inf"]),
                          unique=True, max_size=4))
    params += [TENSOR_TEXT] + extra
    mask = draw(expr(BOOL, 4))
    lines = [f"pattern p({', '.join(params)}):"]
    if draw(st.booleans()):
        lines.append(f"    let m0 = {draw(expr(INT, 2)).text}")
        mask_text = f"({mask.text}) and m0 == m0"
    else:
        mask_text = mask.text
    if "r3: bool" in extra:
        mask_text = f"({mask_text}) or r3"
    if "r1: int" in extra:
        mask_text = f"({mask_text}) and k % 3 != r1"
    if "x: int[][]" in extra:
        mask_text = f"({mask_text}) and x[q, k] >= 0"
    lines.append(f"    mask = {mask_text}")
    if draw(st.booleans()):
        score = draw(expr(FLOAT, 3, allow_score=True)).text
        if "r2: float" in extra:
            score = f"{score} * r2"
        if "y: float[][][]" in extra:
            score = f"{score} + y[h, q, k]"
        lines.append(f"    score = {score}")
    return "\n".join(lines) + "\n"


def _assert_round_trip(pat: attndsl.Pattern):
    text = str(pat)
    again = attndsl.compile(text, filename="<printed>")[pat.name]
    assert again.ir == pat.ir, text
    assert again.params == pat.params
    assert str(again) == text


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(random_pattern())
def test_printer_round_trip(src):
    pat = attndsl.compile(src)["p"]
    _assert_round_trip(pat)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(random_pattern(), st.integers(-5, 5), st.floats(-1e6, 1e6, allow_nan=False), st.booleans())
def test_printer_round_trip_of_bound_patterns(src, iv, fv, bv):
    pat = attndsl.compile(src)["p"]
    bound = pat.bind(a=iv + 10, f=fv, b=bv)
    text = str(bound)
    again = attndsl.compile(text)["p"]
    assert again.ir.mask == pat.ir.mask and again.ir.score == pat.ir.score
    assert again.params == bound.params
    assert str(again) == text
