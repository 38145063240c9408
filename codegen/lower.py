"""Lowering: a checked mask or score expression -> the source of a small ``@triton.jit`` hook.

Input: an IR expression (from attndsl.ir), the pattern's parameter values and the slot of each
tensor input. Output: Python source of one hook function with the fixed signature
:data:`HOOK_ARGS`, called by the kernel skeleton (codegen/skeleton.py) on a tile:
``q`` ``[BLOCK_M, 1]`` and ``k`` ``[1, BLOCK_N]`` are absolute positions (int64), ``h`` the
query head, ``s`` the scaled scores (float32, score hooks only), ``tI`` / ``tI_nD`` / ``tI_sD``
the pointer, sizes and strides of tensor slot I.

One rule per op in :data:`TRITON_RULES`. The source comes from the IR only: parameter values
become literals, tensors become slots, and no user identifier is ever written out. Constant
subexpressions are folded by the interpreter (its int64 / float64 semantics), never left to
Triton's typing of Python numbers.
Equal sub-expressions are computed once: the IR is hash-consed first (:func:`share_equal`), then
each node gets one local.

Floats are float32 in a hook (the scores, float tensor inputs, ``float(...)``), except the operand
of ``floor``, ``ceil`` and ``round``: it is computed in float64 (:data:`TRITON_F64_RULES`, a second
mode of :class:`Context`), so that the integer it gives is the reference's wherever float32
would round differently (``floor(float(q) * 0.1)``). Ints are int64 (int32 in the ``*_hook32``
variants); bool tensor inputs arrive as int8 (codegen/args.py) and are read as ``!= 0``.
Reductions and their loop variables (``ops.EXPANDED_OPS``) are expanded before lowering
(attndsl/expand.py): their rule refuses them (:func:`needs_expansion`).

:func:`module_hooks` gives a pattern's hooks (``mask_hook``, ``mask_hook32`` and, with a score
clause, ``score_hook``, ``score_hook32`` and the backward pass's ``score_grad_hook``,
``score_grad_hook32``: d(score clause)/d(score) from attndsl/derivative.py) preceded by the
helpers of codegen/tlhelpers.py they call (and those call), copied as written: no import lines,
no other module-level names.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

from attndsl.constants import CONSTANT_OPS
from attndsl.derivative import score_derivative
from attndsl.errors import AttnError
from attndsl.interp import evaluate_scalar
from attndsl.ir import Expr, Op, Type
from attndsl.ops import EXPANDED_OPS, FLOAT_TO_INT_OPS

MAX_TENSORS = 4
MAX_RANK = 3
TENSOR_ARGS = tuple(
    f"t{i}{suffix}" for i in range(MAX_TENSORS)
    for suffix in ("",) + tuple(f"_n{d}" for d in range(MAX_RANK)) + tuple(f"_s{d}" for d in range(MAX_RANK)))
HOOK_ARGS = ("s", "q", "k", "h", "q_len", "kv_len", "heads", "kv_heads") + TENSOR_ARGS


class LoweringError(Exception):
    """An expression this backend cannot lower (reported to the user as an AttnError)."""


def _literal(value, kind: Type) -> str:
    if kind is Type.BOOL:
        return f"tl.full((1, 1), {1 if value else 0}, tl.int1)"
    if kind is Type.INT:
        return f"({int(value)})"
    v = float(value)
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else '(-float("inf"))'
    return f"({v!r})"


def _literal64(value, kind: Type) -> str:
    """A literal of the float64 mode: floats as float64 tiles (a Python float would be typed
    float32 by ``tl.cast``, rounding it), ints and bools as in float32 mode."""
    if kind is not Type.FLOAT:
        return _literal(value, kind)
    v = float(value)
    text = repr(v) if math.isfinite(v) else f'float("{v}")'
    return f"tl.full((1, 1), {text}, tl.float64)"


# rule makers shared with the torch lowering (codegen/torch_lower.py)
def binary(sym):
    return lambda ctx, node, a: f"({a[0]} {sym} {a[1]})"


def call(fn):
    return lambda ctx, node, a: f"{fn}({', '.join(a)})"


def fold(fn):
    def rule(ctx, node, a):
        out = a[0]
        for x in a[1:]:
            out = f"{fn}({out}, {x})"
        return out
    return rule


def const_rule(ctx, node, a):
    return ctx.literal(node.value, node.type)


def param_rule(ctx, node, a):
    return ctx.literal(ctx.values[node.value], node.type)


def leaf(name):
    return lambda ctx, node, a: name


def _not(ctx, node, a):
    return f"({a[0]} == 0)"


def _if(ctx, node, a):
    return f"tl.where({a[0]}, {a[1]}, {a[2]})"


def _float(ctx, node, a):
    # tl.cast, not .to(): the operand may be a Python int (a constant or parameter expression)
    return f"tl.cast({a[0]}, tl.float32)"


def _load(ctx, node, a) -> str:
    """The raw load of a tensor read: its indices clamped into the tensor."""
    slot = ctx.slots[node.value]
    terms = [f"tl.minimum(tl.maximum({x}, 0), t{slot}_n{d} - 1) * t{slot}_s{d}"
             for d, x in enumerate(a)]
    return f"tl.load(t{slot} + {' + '.join(terms)})"


def _index(ctx, node, a):
    # a bool tensor's slot holds int8 (codegen/args.py slot_dtype); a float tensor's float32,
    # or float64 when a floor/ceil/round argument reads it (wide_reads): read as float32 here
    load = _load(ctx, node, a)
    if node.type is Type.BOOL:
        return f"({load} != 0)"
    return f"tl.cast({load}, tl.float32)" if node.value in ctx.wide else load


def _index64(ctx, node, a):
    # the float64 mode: a float tensor's read in float64 (exact from a wide slot; an int or bool
    # read lands here only when an index depends on a float64 value)
    if node.type is not Type.FLOAT:
        return _index(ctx, node, a)
    return f"tl.cast({_load(ctx, node, a)}, tl.float64)"


def wide_reads(roots) -> frozenset:
    """The float tensor inputs read inside the argument of a floor/ceil/round of ``roots``:
    both backends hold them in float64 (the Triton slots, codegen/args.py; the torch score
    functions, codegen/torch_lower.py), so that argument is the reference's."""
    return frozenset(n.value for root in roots if root is not None for e in root.walk()
                     if e.op in FLOAT_TO_INT_OPS for n in e.args[0].walk()
                     if n.op is Op.INDEX and n.type is Type.FLOAT)


def _as_int(ctx, text: str) -> str:
    """An int64 helper's result in the hook's int type (int32 in a narrowed hook: the value
    is proved to fit, codegen/narrow.py)."""
    return text if ctx.int_type == "tl.int64" else f"tl.cast({text}, {ctx.int_type})"


def int_helper(fn, inner=None):
    """The rule calling the int64 helper ``fn`` (codegen/tlhelpers.py) on the operands, or on
    ``inner(operand)`` for one operand."""
    def rule(ctx, node, a):
        args = ", ".join(a) if inner is None else inner.format(*a)
        return _as_int(ctx, f"{fn}({args})")
    return rule


def size(name):
    # the sizes arrive as int32 kernel arguments (or constexpr 1); the language's int is 64-bit
    return lambda ctx, node, a: f"tl.cast({name}, {ctx.int_type})"


def needs_table(ctx, node, a):
    """The rule of a selector: it is read from a table (codegen/tables.py), never lowered."""
    raise LoweringError(f"{node.op.value} must be replaced by a table before lowering")


def needs_expansion(ctx, node, a):
    """The rule of a reduction and its loop variable: a call expands them into and/or/+/max/min
    chains over constants (attndsl/expand.py) before lowering, so no lowering meets them."""
    raise LoweringError(f"{node.op.value} must be expanded before lowering (attndsl/expand.py)")


# the rules both lowerings share (the torch lowering, codegen/torch_lower.py, too): literals,
# positions, the score, and Python's operators, which mean the language's on tiles of both
COMMON_RULES = {
    Op.CONST: const_rule,
    Op.PARAM: param_rule,
    Op.Q: leaf("q"),
    Op.K: leaf("k"),
    Op.H: leaf("h"),
    Op.SCORE: leaf("s"),
    Op.NEG: lambda ctx, node, a: f"(-{a[0]})",
    **{op: binary(sym) for op, sym in ((Op.ADD, "+"), (Op.SUB, "-"), (Op.MUL, "*"), (Op.DIV, "/"),
                                       (Op.LT, "<"), (Op.LE, "<="), (Op.GT, ">"), (Op.GE, ">="),
                                       (Op.EQ, "=="), (Op.NE, "!="), (Op.AND, "&"), (Op.OR, "|"))},
}

TRITON_RULES = {
    Op.Q_LEN: size("q_len"),
    Op.KV_LEN: size("kv_len"),
    Op.HEADS: size("heads"),
    Op.KV_HEADS: size("kv_heads"),
    **COMMON_RULES,
    Op.FLOORDIV: call("floordiv"),
    Op.MOD: call("floormod"),
    Op.POW: call("powf"),
    Op.NOT: _not,
    Op.IF: _if,
    Op.ABS: call("tl.abs"),
    Op.MIN: fold("tl.minimum"),
    Op.MAX: fold("tl.maximum"),
    Op.FLOAT: _float,
    Op.EXP: call("tl.exp"),
    Op.LOG: call("tl.log"),
    Op.SQRT: call("tl.sqrt"),
    Op.TANH: call("tanh"),
    Op.SIGMOID: call("tl.sigmoid"),
    Op.ERF: call("tl.erf"),
    Op.EXP2: call("tl.exp2"),
    Op.LOG2: call("tl.log2"),
    # the operand is float64 (the float64 mode, below); the helpers give int64
    Op.FLOOR: int_helper("to_int64", "tl.floor({})"),
    Op.CEIL: int_helper("to_int64", "tl.ceil({})"),
    Op.ROUND: int_helper("to_int64", "round_even({})"),
    Op.ILOG2: int_helper("ilog2"),
    # Triton's & | ^ ~ on ints are two's complement, as Python's; int32 operands of a narrowed
    # hook widen where they meet an int64 (sign-extended: the same value)
    **{op: binary(sym) for op, sym in ((Op.BIT_AND, "&"), (Op.BIT_OR, "|"), (Op.BIT_XOR, "^"))},
    Op.INVERT: lambda ctx, node, a: f"(~{a[0]})",
    Op.LSHIFT: int_helper("shl"),
    Op.RSHIFT: int_helper("shr"),
    Op.INDEX: _index,
    Op.TOPK_BLOCKS: needs_table,
    Op.TOPP_BLOCKS: needs_table,
    Op.ROUTE: needs_table,
    Op.RANDOM_BLOCKS: needs_table,
    **{op: needs_expansion for op in EXPANDED_OPS},
}

# the float64 mode: the operand of floor/ceil/round and every float it is computed from
TRITON_F64_RULES = {
    **TRITON_RULES,
    Op.FLOAT: lambda ctx, node, a: f"tl.cast({a[0]}, tl.float64)",
    Op.INDEX: _index64,
}


def share_equal(root: Expr) -> Expr:
    """``root`` with its structurally equal sub-expressions made one node (common-subexpression
    elimination by hash-consing, bottom-up and iterative: trees may be deep, and DAGs whose
    expansion is exponential cost their number of distinct nodes).

    Two nodes are equal when op, type, value (with its Python type: ``1``, ``1.0`` and ``True``
    differ, and ``-0.0`` is not ``0.0``) and children are; spans are ignored. The result means
    the same as ``root`` and has one node object per distinct sub-expression: the first one met,
    left to right and children first, keeps its span.
    """
    canonical: dict[int, Expr] = {}     # id(node of root) -> its canonical node
    table: dict[tuple, Expr] = {}       # key -> canonical node (keeps them alive: ids stay unique)
    stack = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in canonical:
            continue
        if not ready:
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(node.args) if id(c) not in canonical)
            continue
        args = tuple(canonical[id(c)] for c in node.args)
        key = (node.op, node.type, type(node.value), repr(node.value), tuple(map(id, args)))
        if key not in table:
            same = all(a is c for a, c in zip(args, node.args))
            table[key] = node if same else Expr(node.op, node.type, args, node.value, node.span)
        canonical[id(node)] = table[key]
    return canonical[id(root)]


class Context:
    """The state of one lowering: parameter values, tensor slots, the op rule table and literal
    spelling of the target, its int type (``int_type``: the text of a Triton dtype, for the
    rules that name it), and the locals emitted so far (one per inner node).

    ``f64``: (rules, literal) of a float64 mode, or None. With it, the operands of
    ``floor``/``ceil``/``round`` (``ops.FLOAT_TO_INT_OPS``) are emitted in a second context,
    :meth:`float64`, sharing this one's lines: there every float node, and every node computed
    from one (but not through a float-to-int op), gets a local of its own, while the other nodes
    (ints and bools from ints: their value is the same in both modes) are this context's
    (``base``), computed once for both."""

    def __init__(self, values: dict, slots: dict, rules: dict | None = None, literal=None,
                 int_type: str = "tl.int64", f64: tuple | None = None,
                 wide: frozenset = frozenset()):
        self.values = values
        self.slots = slots
        self.wide = wide                    # float tensor slots that hold float64 (wide_reads)
        self.rules = TRITON_RULES if rules is None else rules
        self.literal = _literal if literal is None else literal
        self.int_type = int_type
        self.lines: list[str] = []
        self.names: dict[int, str] = {}
        self.keep: list[Expr] = []          # keeps nodes alive so their ids stay unique
        self.constant: dict[int, bool] = {}
        self.base = self                    # the context of the nodes both modes share
        self.own: set[int] = set()          # float64 mode: the nodes with locals of their own
        self._f64 = f64
        self._mode64: Context | None = None

    def float64(self) -> Context:
        """The float64 mode of this lowering (made on first use)."""
        if self._mode64 is None:
            rules, literal = self._f64
            mode = Context(self.values, self.slots, rules, literal, self.int_type,
                           wide=self.wide)
            mode.lines, mode.keep, mode.base = self.lines, self.keep, self
            self._mode64 = mode
        return self._mode64

    def operand_context(self, node: Expr) -> Context:
        """The context that computes the operands of ``node``."""
        if node.op in FLOAT_TO_INT_OPS and self.base._f64 is not None:
            return self.base.float64()
        return self

    def owner(self, node: Expr) -> Context:
        """The context that computes ``node`` (its operands done): this one, or in the float64
        mode the shared base context for a node whose value does not depend on the mode."""
        if self.base is self or node.type is Type.FLOAT:
            return self
        if node.op not in FLOAT_TO_INT_OPS and any(id(a) in self.own for a in node.args):
            return self
        return self.base


def emit(ctx: Context, root: Expr) -> str:
    """Locals for every inner node (children first, iteratively; ``ctx.lines``), constant
    sub-expressions folded with the interpreter's semantics; the root's local name (or its
    literal). Shared by the Triton lowering and the torch lowering (codegen/torch_lower.py).

    A constant that the interpreter refuses to compute (``floor`` of NaN, a shift count out of
    range) is one no evaluated pair reaches: the runtime checks every such value at the pairs a
    call evaluates before any kernel runs. Its local is then any value of its type."""
    stack = [(ctx, root, False)]
    while stack:
        c, node, ready = stack.pop()
        if id(node) in c.names:
            continue
        if not ready:
            stack.append((c, node, True))
            inner = c.operand_context(node)
            stack.extend((inner, a, False) for a in reversed(node.args) if id(a) not in inner.names)
            continue
        inner, owner = c.operand_context(node), c.owner(node)
        if id(node) not in owner.names:
            _emit_node(owner, node, inner)
        if owner is not c:
            c.names[id(node)], c.constant[id(node)] = owner.names[id(node)], owner.constant[id(node)]
    return ctx.names[id(root)]


def _emit_node(ctx: Context, node: Expr, inner: Context) -> None:
    """The text (a literal, a leaf, or a new local) of ``node`` in ``ctx``, its operands' in
    ``inner``."""
    constant = node.op in CONSTANT_OPS and all(inner.constant[id(a)] for a in node.args)
    ctx.constant[id(node)] = constant
    if constant and node.args:
        # folded with the interpreter's semantics: Python numbers inside the jit code would
        # be typed by Triton (int32 overflow, no .to(), ...), not by the language
        try:
            value = evaluate_scalar(node, ctx.values)
        except AttnError:
            value = {Type.INT: 0, Type.FLOAT: 0.0, Type.BOOL: False}[node.type]
        text = ctx.literal(value, node.type)
    else:
        text = ctx.rules[node.op](ctx, node, [inner.names[id(a)] for a in node.args])
    if node.args and not constant:
        name = f"v{len(ctx.lines)}"
        ctx.lines.append(f"    {name} = {text}")
        text = name
    ctx.names[id(node)] = text
    if ctx.base is not ctx:
        ctx.own.add(id(node))
    ctx.keep.append(node)


def hook_source(name: str, expr: Expr, values: dict, slots: dict, narrow: bool = False,
                wide: frozenset = frozenset()) -> str:
    """``@triton.jit def NAME(HOOK_ARGS): ...`` computing expr (values: parameters; ``wide``:
    the float tensor slots holding float64, :func:`wide_reads` of the pattern's clauses).

    ``narrow``: the positions, head and sizes are taken as int32, so that integer arithmetic
    runs in 32 bits (a GPU does 64-bit integer operations in several instructions and twice the
    registers). Only for calls where every integer the expression computes is proved to fit
    (codegen/narrow.py); values read from int64 tensors still promote what they meet to int64.
    """
    if len(slots) > MAX_TENSORS:
        raise LoweringError(f"the Triton backend takes at most {MAX_TENSORS} tensor inputs")
    expr = share_equal(expr)
    ctx = Context(values, slots, int_type="tl.int32" if narrow else "tl.int64",
                  f64=(TRITON_F64_RULES, _literal64), wide=wide)
    result = emit(ctx, expr)
    if narrow:
        ctx.lines[:0] = [f"    {v} = {v}.to(tl.int32)" for v in ("q", "k", "h")]
    if expr.type is Type.FLOAT and not expr.uses(Op.SCORE):
        # a constant, parameter or per-head value is no tile (a Python float or a scalar)
        result = f"tl.zeros_like(s) + {result}"
    elif expr.type is Type.BOOL and ctx.constant[id(expr)]:
        result = f"(q == q) & (k == k) & {result}"         # a whole tile of it
    args = ",\n        ".join(", ".join(HOOK_ARGS[i:i + 8]) for i in range(0, len(HOOK_ARGS), 8))
    body = "\n".join(ctx.lines + [f"    return {result}"])
    return f"@triton.jit\ndef {name}(\n        {args}):\n{body}\n"


def _read_helpers() -> dict[str, tuple[str, frozenset]]:
    """name -> (text, names of the helpers it calls) of each function in codegen/tlhelpers.py,
    in file order; the text runs from the decorator to the end of the function."""
    text = (Path(__file__).parent / "tlhelpers.py").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    funcs = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)]
    names = {f.name for f in funcs}
    out = {}
    for f in funcs:
        first = min([d.lineno for d in f.decorator_list] + [f.lineno])
        out[f.name] = ("".join(lines[first - 1:f.end_lineno]), frozenset(_called(f) & names))
    return out


def _called(tree) -> set[str]:
    """The plain names called in ``tree`` (``f(...)``, not ``tl.f(...)``)."""
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


HELPERS = _read_helpers()


def used_helpers(source: str) -> list[str]:
    """The helpers that the code ``source`` calls, directly or through other helpers, in the
    order of codegen/tlhelpers.py."""
    todo, used = list(_called(ast.parse(source)) & set(HELPERS)), set()
    while todo:
        name = todo.pop()
        if name not in used:
            used.add(name)
            todo.extend(HELPERS[name][1])
    return [name for name in HELPERS if name in used]


def module_hooks(mask_ir: Expr, score_ir: Expr | None, values: dict, slots: dict) -> str:
    """The helpers and hooks of a pattern's module: ``mask_hook`` and ``mask_hook32`` (int32,
    see :func:`hook_source`), and when ``score_ir`` is not None ``score_hook`` /
    ``score_hook32`` and ``score_grad_hook`` / ``score_grad_hook32``, preceded by the helpers they
    call (no import lines: the module imports ``triton`` and ``triton.language as tl``). Raises
    LoweringError as :func:`hook_source` does.

    The grad hooks take the score hook's arguments (:data:`HOOK_ARGS`, ``s`` the raw scaled
    scores) and return d(score clause)/d(score) on the tile, float32 ``[BLOCK_M, BLOCK_N]`` (a
    constant derivative is broadcast to the tile), meaningful at allowed pairs only. The
    derivative computes no integer the clause does not, so the clause's int32 proof covers
    ``score_grad_hook32``."""
    hooks = []
    grad_ir = None if score_ir is None else score_derivative(score_ir, values)
    wide = wide_reads((mask_ir, score_ir))
    for suffix, narrow in (("", False), ("32", True)):     # int64, and int32 where proved
        hooks.append(hook_source(f"mask_hook{suffix}", mask_ir, values, slots, narrow, wide))
        if score_ir is not None:
            hooks.append(hook_source(f"score_hook{suffix}", score_ir, values, slots, narrow,
                                     wide))
            hooks.append(hook_source(f"score_grad_hook{suffix}", grad_ir, values, slots, narrow,
                                     wide))
    return with_helpers(hooks)


def with_helpers(hooks: list[str]) -> str:
    """Hook sources preceded by the helpers they call (no import lines)."""
    helpers = [HELPERS[name][0] for name in used_helpers("\n".join(hooks))]
    return "\n\n".join(helpers + hooks)
