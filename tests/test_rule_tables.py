"""The per-op tables stay complete: every IR op has an interpreter rule, a printer rule that
round-trips, and the torch namespace offers every function the rules call; the example node
of each op follows its signature in the registry, and the checker's typing rule rebuilds it.
(tests/test_op_registry.py checks that every pass has exactly one rule per op.)
"""

from __future__ import annotations

import numpy as np
import pytest

import attndsl
from attndsl import interp, printer
from attndsl.checker import TYPING, Checker
from attndsl.constants import CONSTANT_OPS
from attndsl.ir import (
    BUILTIN_LEAVES,
    DATA_SELECTOR_OPS,
    LEAF_OPS,
    SELECTOR_OPS,
    Expr,
    Op,
    Param,
    PatternIR,
    TensorType,
    Type,
)
from attndsl.ops import ANY, ELEM_TYPE, NUM, OPS, PARAM_TYPE, VALUE_TYPE

Ti, Tf, Tb = Type.INT, Type.FLOAT, Type.BOOL
q = Expr(Op.Q, Ti)
k = Expr(Op.K, Ti)
h = Expr(Op.H, Ti)
f1 = Expr(Op.CONST, Tf, (), 1.5)
f2 = Expr(Op.CONST, Tf, (), 0.25)
tru = Expr(Op.CONST, Tb, (), True)
fals = Expr(Op.CONST, Tb, (), False)
three = Expr(Op.CONST, Ti, (), 3)
i0 = Expr(Op.VAR, Ti, (), 0)          # the loop variable of the reduction around it (depth 0)


def one_node(op: Op) -> Expr:
    """A well-typed node of each op (its children as simple as possible)."""
    table = {
        Op.CONST: three,
        Op.PARAM: Expr(Op.PARAM, Ti, (), "w"),
        Op.Q: q, Op.K: k, Op.H: h,
        Op.Q_LEN: Expr(Op.Q_LEN, Ti), Op.KV_LEN: Expr(Op.KV_LEN, Ti),
        Op.HEADS: Expr(Op.HEADS, Ti), Op.KV_HEADS: Expr(Op.KV_HEADS, Ti),
        Op.SCORE: Expr(Op.SCORE, Tf),
        Op.NEG: Expr(Op.NEG, Ti, (q,)),
        Op.ADD: Expr(Op.ADD, Ti, (q, k)), Op.SUB: Expr(Op.SUB, Ti, (q, k)), Op.MUL: Expr(Op.MUL, Ti, (q, k)),
        Op.DIV: Expr(Op.DIV, Tf, (f1, f2)), Op.POW: Expr(Op.POW, Tf, (f1, f2)),
        Op.FLOORDIV: Expr(Op.FLOORDIV, Ti, (q, three)), Op.MOD: Expr(Op.MOD, Ti, (q, three)),
        Op.LT: Expr(Op.LT, Tb, (q, k)), Op.LE: Expr(Op.LE, Tb, (q, k)), Op.GT: Expr(Op.GT, Tb, (q, k)),
        Op.GE: Expr(Op.GE, Tb, (q, k)), Op.EQ: Expr(Op.EQ, Tb, (q, k)), Op.NE: Expr(Op.NE, Tb, (q, k)),
        Op.NOT: Expr(Op.NOT, Tb, (tru,)),
        Op.AND: Expr(Op.AND, Tb, (tru, fals)), Op.OR: Expr(Op.OR, Tb, (tru, fals)),
        Op.IF: Expr(Op.IF, Ti, (tru, q, k)),
        Op.ABS: Expr(Op.ABS, Ti, (q,)),
        Op.MIN: Expr(Op.MIN, Ti, (q, k, h)), Op.MAX: Expr(Op.MAX, Ti, (q, k, h)),
        Op.FLOAT: Expr(Op.FLOAT, Tf, (q,)),
        Op.EXP: Expr(Op.EXP, Tf, (f1,)), Op.LOG: Expr(Op.LOG, Tf, (f1,)), Op.SQRT: Expr(Op.SQRT, Tf, (f1,)),
        Op.TANH: Expr(Op.TANH, Tf, (f1,)), Op.SIGMOID: Expr(Op.SIGMOID, Tf, (f1,)),
        Op.INDEX: Expr(Op.INDEX, Ti, (k,), "t"),
        Op.TOPK_BLOCKS: Expr(Op.TOPK_BLOCKS, Tb, (Expr(Op.CONST, Ti, (), 2), Expr(Op.CONST, Ti, (), 4), tru)),
        Op.TOPP_BLOCKS: Expr(Op.TOPP_BLOCKS, Tb, (Expr(Op.CONST, Tf, (), 0.5), Expr(Op.CONST, Ti, (), 4),
                                                 fals)),
        Op.ROUTE: Expr(Op.ROUTE, Tb, (), "c"),
        Op.RANDOM_BLOCKS: Expr(Op.RANDOM_BLOCKS, Tb, (Expr(Op.CONST, Ti, (), 1), Expr(Op.CONST, Ti, (), 4),
                                                     Expr(Op.CONST, Ti, (), 7))),
        Op.ERF: Expr(Op.ERF, Tf, (f1,)), Op.EXP2: Expr(Op.EXP2, Tf, (f1,)),
        Op.LOG2: Expr(Op.LOG2, Tf, (f1,)),
        Op.FLOOR: Expr(Op.FLOOR, Ti, (f1,)), Op.CEIL: Expr(Op.CEIL, Ti, (f1,)),
        Op.ROUND: Expr(Op.ROUND, Ti, (f1,)), Op.ILOG2: Expr(Op.ILOG2, Ti, (q,)),
        Op.BIT_AND: Expr(Op.BIT_AND, Ti, (q, k)), Op.BIT_OR: Expr(Op.BIT_OR, Ti, (q, k)),
        Op.BIT_XOR: Expr(Op.BIT_XOR, Ti, (q, k)), Op.LSHIFT: Expr(Op.LSHIFT, Ti, (q, three)),
        Op.RSHIFT: Expr(Op.RSHIFT, Ti, (q, three)), Op.INVERT: Expr(Op.INVERT, Ti, (q,)),
        Op.ANY: Expr(Op.ANY, Tb, (three, Expr(Op.EQ, Tb, (i0, k))), 0),
        Op.ALL: Expr(Op.ALL, Tb, (three, Expr(Op.NE, Tb, (i0, k))), 0),
        Op.SUM: Expr(Op.SUM, Ti, (three, Expr(Op.ADD, Ti, (i0, q))), 0),
        Op.REDUCE_MAX: Expr(Op.REDUCE_MAX, Ti, (three, Expr(Op.SUB, Ti, (q, i0))), 0),
        Op.REDUCE_MIN: Expr(Op.REDUCE_MIN, Ti, (three, Expr(Op.SUB, Ti, (k, i0))), 0),
        Op.VAR: i0,
    }
    return table[op]


PARAMS = (Param("w", Ti, 2), Param("t", TensorType(Ti, 1)), Param("c", TensorType(Tf, 3)))


def as_pattern(node: Expr) -> PatternIR:
    """A pattern using ``node``: the mask when bool, compared with itself when int, the score when
    float (so that ``score`` is legal); a loop variable inside a reduction binding it."""
    if node.op is Op.VAR:
        node = Expr(Op.ANY, Tb, (three, Expr(Op.EQ, Tb, (node, q))), 0)
    if node.type is Tb:
        return PatternIR("p", PARAMS, node, None)
    if node.type is Ti:
        return PatternIR("p", PARAMS, Expr(Op.EQ, Tb, (node, node)), None)
    return PatternIR("p", PARAMS, tru, Expr(Op.ADD, Tf, (Expr(Op.SCORE, Tf), node)))


def test_every_op_has_an_example_here():
    for op in Op:
        assert one_node(op).op is op


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.name)
def test_every_op_has_an_interpreter_rule(op):
    assert op in interp.EVAL_RULES and callable(interp.EVAL_RULES[op])


def test_rule_table_has_no_extra_entries():
    assert set(interp.EVAL_RULES) == set(Op)


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.name)
def test_every_op_prints_and_round_trips(op):
    ir = as_pattern(one_node(op))
    text = printer.print_pattern(ir)
    again = attndsl.compile(text, filename="<printed>")["p"]
    assert again.ir == ir, text
    assert printer.print_pattern(again.ir) == text


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.name)
def test_every_op_evaluates(op):
    pat = attndsl.Pattern(as_pattern(one_node(op)))
    rng = np.random.default_rng(0)
    query, key = rng.standard_normal((2, 8, 4)), rng.standard_normal((1, 8, 4))
    m = pat.dense_mask(8, 8, heads=2, kv_heads=1, query=query, key=key, t=np.arange(8),
                       c=rng.standard_normal((2, 3, 4)))
    assert m.shape == (2, 8, 8) and m.dtype == np.bool_
    v = rng.standard_normal((1, 1, 8, 4))
    out, lse = pat.reference(query[None], key[None], v, t=np.arange(8), c=rng.standard_normal((2, 3, 4)))
    assert out.shape == (1, 2, 8, 4) and not np.isnan(out).any()


def test_op_values_of_the_examples():
    # spot checks of what each example node means, through the interpreter
    def value(node):
        return interp.evaluate_scalar(node, {"w": 2})
    assert value(Expr(Op.FLOORDIV, Ti, (Expr(Op.NEG, Ti, (Expr(Op.CONST, Ti, (), 7),)),
                                       Expr(Op.CONST, Ti, (), 2)))) == -4
    assert value(Expr(Op.MOD, Ti, (Expr(Op.NEG, Ti, (Expr(Op.CONST, Ti, (), 7),)),
                                  Expr(Op.CONST, Ti, (), 2)))) == 1
    assert value(Expr(Op.POW, Tf, (f1, f2))) == pytest.approx(1.5 ** 0.25)
    assert value(Expr(Op.SIGMOID, Tf, (f1,))) == pytest.approx(1 / (1 + np.exp(-1.5)))
    assert value(Expr(Op.MIN, Ti, (three, Expr(Op.PARAM, Ti, (), "w"), Expr(Op.CONST, Ti, (), 9)))) == 2
    assert value(Expr(Op.IF, Ti, (fals, three, Expr(Op.PARAM, Ti, (), "w")))) == 2


def test_op_groups_are_consistent():
    assert set(BUILTIN_LEAVES.values()) <= LEAF_OPS
    assert DATA_SELECTOR_OPS <= SELECTOR_OPS
    assert not (CONSTANT_OPS & SELECTOR_OPS)
    assert Op.INDEX not in CONSTANT_OPS and Op.SCORE not in CONSTANT_OPS
    assert not (CONSTANT_OPS & set(BUILTIN_LEAVES.values()))
    for op in LEAF_OPS:
        node = one_node(op)
        assert node.args == () and node.op is op


def test_printer_output_depends_only_on_the_ir():
    a = attndsl.compile("pattern p(w = 2):   # comment\n    let x = q-k\n    mask = (0 <= x) and (x < w)\n")
    b = attndsl.compile("pattern p(w=2):\n    mask = 0 <= q - k < w\n")
    assert a["p"].ir == b["p"].ir
    assert str(a["p"]) == str(b["p"])
    assert "#" not in str(a["p"]) and "let" not in str(a["p"])


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.name)
def test_every_example_follows_its_signature_in_the_registry(op):
    node, info = one_node(op), OPS[op]
    n = len(node.args)
    assert n == info.arity or (info.variadic and n > info.arity)
    kinds = [info.kind(i) for i in range(n)]
    bound = {}                      # type variable -> the type of its operands
    for x, kind in zip(node.args, kinds):
        if kind in (NUM, ANY):
            assert bound.setdefault(kind, x.type) is x.type
            assert kind is ANY or x.type in (Tf, Ti)
        else:
            assert x.type is kind
    params = {p.name: p for p in PARAMS}
    want = {VALUE_TYPE: {bool: Tb, int: Ti, float: Tf}.get(type(node.value)),
            PARAM_TYPE: params[node.value].type if op is Op.PARAM else None,
            ELEM_TYPE: params[node.value].type.elem if op is Op.INDEX else None}
    assert node.type is bound.get(info.result, want.get(info.result, info.result))


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.name)
def test_every_typing_rule_rebuilds_its_example(op):
    node = one_node(op)
    params = {p.name: p for p in PARAMS}
    value = params.get(node.value) if op in (Op.PARAM, Op.INDEX, Op.ROUTE) else node.value
    spans = [a.span for a in node.args]
    ck = Checker((), "")
    assert TYPING[op](ck, op, list(node.args), spans, node.span, value) == node
