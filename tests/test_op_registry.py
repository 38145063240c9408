"""The operator registry (attndsl/ops.py) is the one declaration of the IR's operators, and every
pass keeps exactly one rule per op: typing, printing, the interpreter, tile intervals, closed-form
sums, solving for k, Triton lowering, the torch backend and the score clause's derivative.

``table_gaps`` is the check: an op added to :class:`~attndsl.ir.Op` without an entry in the
registry or in any pass's table makes these tests fail, naming the op and the table.
"""

from __future__ import annotations

import pytest
from attndsl.codegen import lower, torch_lower

from attndsl import checker, derivative, interp, ir, ops, printer
from attndsl.analysis import cost, intervals, solve
from attndsl.constants import CONSTANT_OPS
from attndsl.ops import ANY, ELEM_TYPE, FORMS, NUM, OPS, PARAM_TYPE, VALUE_TYPE, Op, Prec, Type, table_gaps

TABLES = {
    "registry (ops.OPS)": OPS,
    "typing (checker.TYPING)": checker.TYPING,
    "printer (printer.PRINT_RULES)": printer.PRINT_RULES,
    "interpreter (interp.EVAL_RULES)": interp.EVAL_RULES,
    "intervals (analysis.intervals.INTERVAL_RULES)": intervals.INTERVAL_RULES,
    "closed forms (analysis.cost.SYMPY_RULES)": cost.SYMPY_RULES,
    "solver (analysis.solve.SOLVE_RULES)": solve.SOLVE_RULES,
    "triton (codegen.lower.TRITON_RULES)": lower.TRITON_RULES,
    "torch (codegen.torch_lower.TORCH_RULES)": torch_lower.TORCH_RULES,
    "derivative (derivative.DERIVATIVE_RULES)": derivative.DERIVATIVE_RULES,
}


@pytest.mark.parametrize("name", list(TABLES))
def test_every_table_has_exactly_one_entry_per_op(name):
    missing, extra = table_gaps(TABLES[name])
    assert not missing, f"{name} has no entry for {missing}"
    assert not extra, f"{name} has entries that are no op: {extra}"


@pytest.mark.parametrize("name", list(TABLES))
def test_a_table_without_an_op_is_reported(name):
    table = TABLES[name]
    for op in Op:
        fewer = {k: v for k, v in table.items() if k is not op}
        assert table_gaps(fewer) == ([op], [])
    assert table_gaps({**table, "route2": None}) == ([], ["route2"])


def test_an_op_added_to_the_enum_is_reported():
    # the ops the tables must cover, with one more: every table lacks it
    more = [*Op, "NEW_OP"]
    for name, table in TABLES.items():
        assert table_gaps(table, more) == (["NEW_OP"], []), name


def test_registry_entries_are_well_formed():
    kinds = {NUM, ANY, *Type}
    for op, info in OPS.items():
        assert info.op is op
        assert info.form in FORMS, op
        assert info.arity >= 0 and (info.arity >= 1 or not info.variadic), op
        assert info.result in {NUM, ANY, VALUE_TYPE, PARAM_TYPE, ELEM_TYPE, *Type}, op
        assert all(k in kinds for k in info.operands), op
        if info.form == "route":        # the tensor named by its argument is the node's value
            assert info.arity == 0 and len(info.params) == 1
        else:
            assert len(info.operands) == info.arity, op
        assert all(0 <= i < info.arity for i in info.constant_args), op
        if info.result in (NUM, ANY):               # a type variable comes from the operands
            assert info.result in info.operands, op
        if info.selector and info.form == "call":
            assert tuple(p[1] for p in info.params) == info.operands
            assert info.constant_args == tuple(range(info.arity)) and not info.constant
        assert info.data_selector <= info.selector
        assert (info.spelling is None) == (info.form in ("literal", "param", "index", "var")), op
        if info.form in ("infix", "prefix"):
            assert info.level < Prec.ATOM, op
        else:
            assert info.form == "if" or info.level is Prec.ATOM, op


def test_spellings_are_unique_within_a_syntax():
    # infix operators, and names (functions, selectors, builtin leaves), are each one op
    for forms in (("infix",), ("call", "route", "name"), ("reduce",)):
        spellings = [i.spelling for i in OPS.values() if i.form in forms]
        assert len(spellings) == len(set(spellings)), forms


def test_groups_derive_from_the_registry_and_ir_re_exports_them():
    assert ops.LEAF_OPS == {op for op in Op if OPS[op].arity == 0 and not OPS[op].variadic}
    assert ops.SELECTOR_OPS == {Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.ROUTE, Op.RANDOM_BLOCKS}
    assert ops.DATA_SELECTOR_OPS == {Op.TOPK_BLOCKS, Op.TOPP_BLOCKS, Op.ROUTE}
    assert ops.ARITH_OPS == {Op.ADD, Op.SUB, Op.MUL}
    assert ops.COMPARE_OPS == {Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}
    assert ops.UNARY_FLOAT_FUNCS == {Op.EXP, Op.LOG, Op.SQRT, Op.TANH, Op.SIGMOID, Op.ERF, Op.EXP2,
                                     Op.LOG2}
    assert ops.REDUCE_OPS == {Op.ANY, Op.ALL, Op.SUM, Op.REDUCE_MAX, Op.REDUCE_MIN}
    assert ops.EXPANDED_OPS == ops.REDUCE_OPS | {Op.VAR}
    assert ops.BUILTIN_LEAVES == {"q": Op.Q, "k": Op.K, "h": Op.H, "q_len": Op.Q_LEN,
                                  "kv_len": Op.KV_LEN, "heads": Op.HEADS, "kv_heads": Op.KV_HEADS}
    # the pure ops: every op but the grid's leaves, score, tensor reads and selectors
    impure = {Op.Q, Op.K, Op.H, Op.Q_LEN, Op.KV_LEN, Op.HEADS, Op.KV_HEADS, Op.SCORE, Op.INDEX,
              Op.VAR}
    assert CONSTANT_OPS == set(Op) - impure - ops.SELECTOR_OPS
    for name in ("Op", "Type", "LEAF_OPS", "BUILTIN_LEAVES", "ARITH_OPS", "COMPARE_OPS",
                 "UNARY_FLOAT_FUNCS", "SELECTOR_OPS", "DATA_SELECTOR_OPS"):
        assert getattr(ir, name) is getattr(ops, name), name


def test_checker_surface_names_come_from_the_registry():
    assert checker.SELECTORS == {i.spelling: (op, i.params) for op, i in OPS.items() if i.selector}
    assert checker.FUNCTIONS == {"abs", "min", "max", "clamp", "float", "exp", "log", "sqrt",
                                 "tanh", "sigmoid", "erf", "exp2", "log2", "floor", "ceil",
                                 "round", "ilog2"}
    assert checker.REDUCTIONS == {"any": Op.ANY, "all": Op.ALL, "sum": Op.SUM,
                                  "max": Op.REDUCE_MAX, "min": Op.REDUCE_MIN}


def test_the_lowerings_refuse_only_the_selectors_and_the_reductions():
    """Selectors are replaced by tables before lowering (codegen/tables.py), reductions and
    their loop variables expanded (attndsl/expand.py): both lowerings refuse them, and only
    them; so do the analyses and the derivative for the reductions."""
    for table in (lower.TRITON_RULES, torch_lower.TORCH_RULES):
        refusing = {op for op, rule in table.items() if rule is lower.needs_table}
        assert refusing == set(ops.SELECTOR_OPS)
        expanding = {op for op, rule in table.items() if rule is lower.needs_expansion}
        assert expanding == ops.EXPANDED_OPS
    for table in (intervals.INTERVAL_RULES, cost.SYMPY_RULES):
        assert {op for op, rule in table.items() if rule is intervals.needs_expansion} == \
            ops.EXPANDED_OPS


@pytest.mark.parametrize("name", ["triton", "torch", "intervals", "derivative"])
def test_a_refused_reduction_says_it_needs_expansion(name):
    node = ir.Expr(Op.ANY, Type.BOOL, (ir.const(2), ir.const(True)), 0)
    rule = {"triton": lower.TRITON_RULES, "torch": torch_lower.TORCH_RULES,
            "intervals": intervals.INTERVAL_RULES,
            "derivative": derivative.DERIVATIVE_RULES}[name][Op.ANY]
    with pytest.raises(Exception, match="expand"):
        rule(None, node, [])
