"""Torch lowering: a pattern's mask and score clause -> a generated module of torch functions.

Input: the mask and score IR of a :class:`~attndsl.bound.BoundPattern` with its selectors
replaced by table reads (codegen/tables.py), its parameter values and the slot of each tensor
input. Output (:func:`torch_hooks`): a module, written to the kernel cache like the Triton
modules (codegen/cache.py, keyed by its source and the torch version), with

* ``mask(q, k, h, q_len, kv_len, heads, kv_heads, fdt, t0, ...)``: a bool tensor broadcastable
  to ``[H, R, C]`` for query positions ``q`` ``[1, R, 1]``, key positions ``k`` ``[1, 1, C]``
  and heads ``h`` ``[H, 1, 1]`` (int64 tensors), the sizes as 0-d int64 tensors, the float type
  ``fdt`` of float arithmetic, and the tensor inputs ``tI`` of this batch element (int64, bool,
  or ``fdt``, float64 for the inputs in :attr:`TorchHooks.wide_inputs`);
* ``score(s, q, k, h, ...)`` when the pattern has a score clause: the new scores (float,
  broadcastable to ``s``'s shape), ``s`` the scaled dot products;
* ``score_grad(s, q, k, h, ...)`` with it: d(score clause)/d(score) (attndsl/derivative.py), a
  float tensor broadcastable to ``s`` (``s``'s shape when the derivative does not read the
  score), meaningful at allowed pairs only.

One rule per op in :data:`TORCH_RULES` (the op registry's torch table; tests/test_op_registry.py
checks it). Semantics are the interpreter's (attndsl/interp.py): integers are int64 tensors (every
literal is a module-level 0-d tensor, so nothing is computed in Python's unbounded ints),
``//``/``%`` floor, ``sigmoid`` is ``(1 + tanh(x / 2)) / 2``, bit operators and shifts are
torch's on int64 (``<<`` wraps, ``>>`` is arithmetic), ``round`` is ``torch.round`` (half to
even), ``ilog2`` is exact (a halving ladder of shifts, the module's ``ilog2``), and a tensor
index is clamped into range (the runtime has proved or checked every live index in range, and
every live shift count and float -> int argument valid, before a tile runs, so the clamp, or a
count or NaN out of range, changes only values that ``and``/``or``/``if`` discard).

The argument of every ``floor``/``ceil``/``round`` is computed in float64 whatever ``fdt`` is
(the float64 mode of codegen/lower.py's Context, :data:`TORCH_F64_RULES`: ``float(...)`` and
float tensor reads in float64), so the integer it gives is the reference's, also in a score
clause evaluated in float32; the float inputs such an argument reads
(:attr:`TorchHooks.wide_inputs`, :func:`wide_reads`) are passed to the score functions in
float64, every float read outside float64 mode being cast to ``fdt``. Reductions never reach
this pass (a call expands them, attndsl/expand.py): their rule refuses. Constant
sub-expressions are folded with the interpreter, equal sub-expressions computed once
(codegen/lower.py), and no user identifier is written out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attndsl.bound import BoundPattern
from attndsl.caches import LRUCache
from attndsl.derivative import score_derivative
from attndsl.ir import Expr, Op, Type
from attndsl.ops import EXPANDED_OPS

from .cache import load_torch_module
from .lower import (
    COMMON_RULES,
    Context,
    binary,
    call,
    emit,
    fold,
    leaf,
    needs_expansion,
    needs_table,
    share_equal,
    wide_reads,
)
from .tables import with_tables

SIZE_ARGS = ("q", "k", "h", "q_len", "kv_len", "heads", "kv_heads", "fdt")

_GATHER = '''def gather(t, *index):
    """t[index...] with every index clamped into range (broadcast like the indices)."""
    index = [torch.as_tensor(i) for i in index]
    if t.numel() == 0:
        return torch.zeros(torch.broadcast_shapes(*(i.shape for i in index)), dtype=t.dtype)
    return t[tuple(i.clamp(0, n - 1) for i, n in zip(index, t.shape))]
'''

_ILOG2 = '''def ilog2(n):
    """floor(log2(n)) for n >= 1, -1 for n <= 0 (int64, exact: a halving ladder of shifts)."""
    x, out = torch.clamp(n, min=1), torch.zeros_like(n)
    for step in (32, 16, 8, 4, 2, 1):
        big = x >= (1 << step)
        out = out + big * step
        x = torch.where(big, x >> step, x)
    return torch.where(n >= 1, out, -1)
'''


class _Literals:
    """Module-level 0-d tensors for the literals of a module, one per distinct value."""

    def __init__(self):
        self.names: dict[tuple, str] = {}

    def __call__(self, value, kind: Type) -> str:
        if kind is Type.BOOL:
            key, text = (kind, bool(value)), f"torch.tensor({bool(value)})"
        elif kind is Type.INT:
            key, text = (kind, int(value)), f"torch.tensor({int(value)}, dtype=torch.int64)"
        else:
            v = float(value)
            spelled = repr(v) if math.isfinite(v) else f'float("{v}")'
            key, text = (kind, repr(v)), f"torch.tensor({spelled}, dtype=torch.float64)"
        if key not in self.names:
            self.names[key] = (f"C{len(self.names)}", text)
        return self.names[key][0]

    def lines(self) -> list[str]:
        return [f"{name} = {text}" for name, text in self.names.values()]


def _gather(ctx, node, a) -> str:
    return f"gather(t{ctx.slots[node.value]}, {', '.join(a)})"


def _index(ctx, node, a):
    # a float input may arrive in float64 (TorchHooks.wide_inputs): read in fdt
    return f"{_gather(ctx, node, a)}.to(fdt)" if node.type is Type.FLOAT else _gather(ctx, node, a)


def _index64(ctx, node, a):
    # float64 mode (reached by float reads only): the input's float64 values where it
    # arrives in float64, else its fdt values widened
    return f"{_gather(ctx, node, a)}.to(torch.float64)"


def _to_int(fn):
    return lambda ctx, node, a: f"{fn}({a[0]}).to(torch.int64)"


TORCH_RULES = {
    **COMMON_RULES,
    Op.Q_LEN: leaf("q_len"),
    Op.KV_LEN: leaf("kv_len"),
    Op.HEADS: leaf("heads"),
    Op.KV_HEADS: leaf("kv_heads"),
    Op.FLOORDIV: lambda ctx, node, a: f'torch.div({a[0]}, {a[1]}, rounding_mode="floor")',
    Op.MOD: call("torch.remainder"),
    Op.POW: call("torch.pow"),
    Op.NOT: call("torch.logical_not"),
    Op.IF: call("torch.where"),
    Op.ABS: call("torch.abs"),
    Op.MIN: fold("torch.minimum"),
    Op.MAX: fold("torch.maximum"),
    Op.FLOAT: lambda ctx, node, a: f"{a[0]}.to(fdt)",
    Op.EXP: call("torch.exp"),
    Op.LOG: call("torch.log"),
    Op.SQRT: call("torch.sqrt"),
    Op.TANH: call("torch.tanh"),
    Op.SIGMOID: lambda ctx, node, a: f"(0.5 * (1.0 + torch.tanh(0.5 * {a[0]})))",
    Op.ERF: call("torch.special.erf"),
    Op.EXP2: call("torch.exp2"),
    Op.LOG2: call("torch.log2"),
    Op.FLOOR: _to_int("torch.floor"),
    Op.CEIL: _to_int("torch.ceil"),
    Op.ROUND: _to_int("torch.round"),          # half to even
    Op.ILOG2: call("ilog2"),
    Op.BIT_AND: binary("&"),
    Op.BIT_OR: binary("|"),
    Op.BIT_XOR: binary("^"),
    Op.LSHIFT: call("torch.bitwise_left_shift"),
    Op.RSHIFT: call("torch.bitwise_right_shift"),
    Op.INVERT: call("torch.bitwise_not"),
    Op.INDEX: _index,
    Op.TOPK_BLOCKS: needs_table,
    Op.TOPP_BLOCKS: needs_table,
    Op.ROUTE: needs_table,
    Op.RANDOM_BLOCKS: needs_table,
    **{op: needs_expansion for op in EXPANDED_OPS},
}

# the float64 mode of the lowering (codegen/lower.py Context): the argument of every
# floor/ceil/round, so that the integer it gives is the reference's whatever fdt is
TORCH_F64_RULES = {
    **TORCH_RULES,
    Op.FLOAT: lambda ctx, node, a: f"{a[0]}.to(torch.float64)",
    Op.INDEX: _index64,
}


def _function(name: str, expr: Expr, first: tuple, values: dict, slots: dict,
              literals: _Literals, tile: bool = False) -> str:
    """``def NAME(*first, *SIZE_ARGS, t0, ...)`` returning ``expr`` (a float result in ``fdt``);
    ``tile``: a float result that does not read the score is added to ``zeros_like(s)`` (the
    shape and type of ``s``)."""
    ctx = Context(values, slots, TORCH_RULES, literals, f64=(TORCH_F64_RULES, literals))
    expr = share_equal(expr)
    result = emit(ctx, expr)
    if tile and expr.type is Type.FLOAT and not expr.uses(Op.SCORE):
        result = f"torch.zeros_like(s) + {result}"
    if expr.type is Type.FLOAT:     # (literals are float64 0-d tensors: where(c, C1, C0) is one)
        result = f"{result}.to(fdt)"
    args = ", ".join(first + SIZE_ARGS + tuple(f"t{i}" for i in range(len(slots))))
    body = "\n".join(ctx.lines + [f"    return {result}"])
    return f"def {name}({args}):\n{body}\n"


def module_source(mask: Expr, score: Expr | None, values: dict, slots: dict) -> str:
    """The text of the torch module for a mask and an optional score clause (see the module)."""
    literals = _Literals()
    functions = [_function("mask", mask, (), values, slots, literals)]
    if score is not None:
        functions.append(_function("score", score, ("s",), values, slots, literals))
        functions.append(_function("score_grad", score_derivative(score, values), ("s",), values,
                                   slots, literals, tile=True))
    used = {e.op for root in (mask, score) if root is not None for e in root.walk()}
    helpers = [text for op, text in ((Op.INDEX, _GATHER), (Op.ILOG2, _ILOG2)) if op in used]
    head = "\n".join(["import torch", ""] + literals.lines())
    return "\n\n".join([head] + helpers + functions)


@dataclass(frozen=True)
class TorchHooks:
    """A pattern's generated torch module, its source, and the tensor slots it reads (user
    inputs first, then the derived selector tables, codegen/tables.py); ``wide_inputs``: the
    float tensor inputs the score functions take in float64 (every float input of ``mask``
    is float64)."""

    module: object
    source: str
    slots: dict
    derived: dict
    wide_inputs: frozenset = frozenset()


TORCH_MODULES = LRUCache("codegen.torch_modules", 128)


def torch_hooks(pattern: BoundPattern) -> TorchHooks:
    """The loaded torch module of a pattern's mask and score clause (selectors as tables),
    kept per pattern content."""
    def build():
        mask, score, slots, derived = with_tables(pattern)
        source = module_source(mask, score, dict(pattern.values), slots)
        return TorchHooks(load_torch_module(source), source, slots, derived,
                          wide_reads((score,)))

    return TORCH_MODULES.get(pattern.key, build)
