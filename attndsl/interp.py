"""The reference interpreter: the meaning of an IR expression over a grid of (h, q, k).

Input: a checked :class:`~attndsl.ir.Expr` and an :class:`Env` giving the grid (``h`` shaped
``[H,1,1]``, ``q`` ``[1,Nq,1]``, ``k`` ``[1,1,Nk]``: absolute positions), the lengths, the
parameter values, this batch element's tensor inputs, the selector tables and, for the score
clause, the score. Output: an array broadcastable to ``[H, Nq, Nk]``.

One rule per :class:`~attndsl.ir.Op` in :data:`EVAL_RULES`. Rules compute with the array
namespace ``env.xp`` (:class:`NumpyOps`: int64 and float64; the gradient oracle
:mod:`attndsl.reference_grad` runs the same rules on torch float64 tensors, its ``TorchOps``,
so that autograd differentiates the score clause). The backends do not interpret:
they run code generated from the IR (codegen/lower.py for Triton, codegen/torch_lower.py for
torch), checked against this interpreter. ``and``/``or``/``if`` narrow the set of *live* grid
points for their right-hand/branch operands, so that a tensor index is only required to be in
range where it is actually used (``doc[q - 1] if q > 0 else -1`` is valid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from .errors import AttnCallError, source_for
from .ir import Expr, Op


class NumpyOps:
    """The array namespace of the reference: int64 and float64, IEEE float semantics."""

    float_dtype = np.float64
    where = staticmethod(np.where)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    abs = staticmethod(np.abs)
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    sqrt = staticmethod(np.sqrt)
    tanh = staticmethod(np.tanh)
    power = staticmethod(np.power)

    @staticmethod
    def sigmoid(x):
        return 0.5 * (1.0 + np.tanh(0.5 * x))

    @staticmethod
    def scalar(v):
        """A literal or parameter value (bool, int or float) as a value of this namespace."""
        if isinstance(v, bool):
            return np.bool_(v)
        return np.int64(v) if isinstance(v, int) else np.float64(v)

    @staticmethod
    def to_float(x):
        return np.asarray(x, dtype=np.float64)

    @staticmethod
    def to_numpy(x):
        return np.asarray(x)

    @staticmethod
    def from_numpy(x):
        return x

    @staticmethod
    def any(x) -> bool:
        return bool(np.any(x))


@dataclass
class Env:
    """Everything the leaves of an expression can mean at one evaluation."""

    h: object
    q: object
    k: object
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    params: dict
    tensors: dict = field(default_factory=dict)     # name -> numpy array of this batch element
    selectors: object = None                        # SelectorTables (see selectors.py)
    score: object = None
    xp: object = NumpyOps
    # None: an index out of range raises. A list: such indices are clipped and the bool array
    # of grid points where it happened is appended (the analysis then treats them as unknown).
    out_of_range: list | None = None


class Evaluator:
    """Evaluates IR expressions against one Env; results of shared sub-trees are memoised."""

    def __init__(self, env: Env):
        self.env = env
        self.xp = env.xp
        self._memo: dict[int, object] = {}
        self._has_index: dict[int, bool] = {}
        # whether this evaluates the score clause (an Env with a score): only for the message
        # of an index out of range
        self.score_clause = env.score is not None

    def _flag(self, cache: dict, node: Expr, op: Op) -> bool:
        got = cache.get(id(node))
        if got is None:
            got = node.uses(op)
            cache[id(node)] = got
        return got

    def needs_live(self, node: Expr) -> bool:
        return self._flag(self._has_index, node, Op.INDEX)

    def sub(self, node: Expr, live=None):
        """The value of ``node`` where ``live`` (a bool array or None for everywhere) holds."""
        if live is None:
            key = id(node)
            if key not in self._memo:
                self._memo[key] = EVAL_RULES[node.op](self, node, None)
            return self._memo[key]
        return EVAL_RULES[node.op](self, node, live)


def _and_live(live, cond):
    return cond if live is None else (live & cond)


# ----------------------------------------------------------------------------- rules


def _const(ev, node, live):
    return ev.xp.scalar(node.value)


def _param(ev, node, live):
    return ev.xp.scalar(ev.env.params[node.value])


def _leaf(attr):
    def rule(ev, node, live):
        return getattr(ev.env, attr)
    return rule


def _scalar_leaf(attr):
    def rule(ev, node, live):
        return np.int64(getattr(ev.env, attr))
    return rule


def _score(ev, node, live):
    if ev.env.score is None:
        raise AttnCallError("'score' has no value outside the score clause")  # pragma: no cover
    return ev.env.score


def _binary(fn):
    def rule(ev, node, live):
        a, b = node.args
        return fn(ev.xp, ev.sub(a, live), ev.sub(b, live))
    return rule


def _unary(fn):
    def rule(ev, node, live):
        return fn(ev.xp, ev.sub(node.args[0], live))
    return rule


def _and(ev, node, live):
    a = ev.sub(node.args[0], live)
    b_live = _and_live(live, a) if ev.needs_live(node.args[1]) else live
    return a & ev.sub(node.args[1], b_live)


def _or(ev, node, live):
    a = ev.sub(node.args[0], live)
    b_live = _and_live(live, ~a) if ev.needs_live(node.args[1]) else live
    return a | ev.sub(node.args[1], b_live)


def _if(ev, node, live):
    cond, then, other = node.args
    c = ev.sub(cond, live)
    t = ev.sub(then, _and_live(live, c) if ev.needs_live(then) else live)
    e = ev.sub(other, _and_live(live, ~c) if ev.needs_live(other) else live)
    return ev.xp.where(c, t, e)


def _nary(fn_name):
    def rule(ev, node, live):
        fn = getattr(ev.xp, fn_name)
        return reduce(fn, (ev.sub(a, live) for a in node.args))
    return rule


def _index(ev, node, live):
    """Gather from a tensor input; an index out of range where it is live is an error."""
    tensor = ev.env.tensors[node.value]
    xp = ev.xp
    idx = [np.asarray(xp.to_numpy(ev.sub(a, live)), dtype=np.int64) for a in node.args]
    shape = np.broadcast_shapes(*(i.shape for i in idx))
    live_np = None if live is None else np.asarray(xp.to_numpy(live), dtype=bool)
    clipped = []
    for axis, i in enumerate(idx):
        size = tensor.shape[axis]
        bad = (i < 0) | (i >= size)
        if live_np is not None:
            bad = bad & live_np
        if np.any(bad):
            if ev.env.out_of_range is None:
                _raise_out_of_range(ev, node, axis, i, bad, size)
            ev.env.out_of_range.append(bad)
        clipped.append(np.broadcast_to(np.clip(i, 0, max(size - 1, 0)), shape))
    if 0 in tensor.shape:       # NumPy arrays, or torch tensors (reference_grad's namespace)
        zeros = tensor.new_zeros(shape) if hasattr(tensor, "new_zeros") else \
            np.zeros(shape, dtype=tensor.dtype)
        return xp.from_numpy(zeros)
    if not isinstance(tensor, np.ndarray):      # torch indexes with writable arrays only
        clipped = [np.array(i) for i in clipped]
    return xp.from_numpy(tensor[tuple(clipped)])


def _raise_out_of_range(ev, node, axis, idx, bad, size):
    """Raise the AttnCallError of an index out of range: the tensor, its size, the index
    expression and its value at the first (h, q, k) where it is evaluated, and why it is
    evaluated there (the score clause at every pair, masked ones included; the mask wherever
    no enclosing and/or/if rules the operand out)."""
    from .printer import print_expr  # local: keeps this module's imports light

    env = ev.env
    full = np.broadcast_shapes(bad.shape, np.shape(env.h), np.shape(env.q), np.shape(env.k))
    where = np.argwhere(np.broadcast_to(bad, full))[0]
    h = int(np.broadcast_to(env.h, full)[tuple(where)])
    q = int(np.broadcast_to(env.q, full)[tuple(where)])
    k = int(np.broadcast_to(env.k, full)[tuple(where)])
    value = int(np.broadcast_to(idx, full)[tuple(where)])
    dim = f" (dimension {axis})" if len(node.args) > 1 else ""
    expr = print_expr(node.args[axis])
    if len(expr) > 60:
        expr = expr[:57] + "..."
    row = q - (env.kv_len - env.q_len)
    at = f"h={h}, q={q}, k={k}" + (f" (query row {row})" if row != q else "")
    guard = f"{expr} >= 0" if value < 0 else f"{expr} < {size}"
    if ev.score_clause:
        why = ("the score clause is evaluated at every (h, q, k) pair, masked pairs included "
               "(LANGUAGE.md sections 1 and 3), so its indices must be in range at every pair")
    else:
        why = ("the mask evaluates an index at every pair that no enclosing 'and', 'or' or "
               "'if' rules out")
    raise AttnCallError(f"index {value} is out of range for tensor input '{node.value}'{dim} of "
                        f"size {size}: the index '{expr}' is {value} at {at}; {why}; guard it "
                        f"('... if {guard} else ...') or clamp the index", node.span,
                        _source_of(node))


def _source_of(node: Expr):
    return source_for(node.span.filename)


def _selector(ev, node, live):
    return ev.xp.from_numpy(ev.env.selectors.lookup(node, ev.env))


def _floordiv(xp, a, b):
    return a // b


def _mod(xp, a, b):
    return a % b


EVAL_RULES = {
    Op.CONST: _const,
    Op.PARAM: _param,
    Op.Q: _leaf("q"),
    Op.K: _leaf("k"),
    Op.H: _leaf("h"),
    Op.Q_LEN: _scalar_leaf("q_len"),
    Op.KV_LEN: _scalar_leaf("kv_len"),
    Op.HEADS: _scalar_leaf("heads"),
    Op.KV_HEADS: _scalar_leaf("kv_heads"),
    Op.SCORE: _score,
    Op.NEG: _unary(lambda xp, a: -a),
    Op.ADD: _binary(lambda xp, a, b: a + b),
    Op.SUB: _binary(lambda xp, a, b: a - b),
    Op.MUL: _binary(lambda xp, a, b: a * b),
    Op.DIV: _binary(lambda xp, a, b: a / b),
    Op.FLOORDIV: _binary(_floordiv),
    Op.MOD: _binary(_mod),
    Op.POW: _binary(lambda xp, a, b: xp.power(a, b)),
    Op.LT: _binary(lambda xp, a, b: a < b),
    Op.LE: _binary(lambda xp, a, b: a <= b),
    Op.GT: _binary(lambda xp, a, b: a > b),
    Op.GE: _binary(lambda xp, a, b: a >= b),
    Op.EQ: _binary(lambda xp, a, b: a == b),
    Op.NE: _binary(lambda xp, a, b: a != b),
    Op.NOT: _unary(lambda xp, a: ~a),
    Op.AND: _and,
    Op.OR: _or,
    Op.IF: _if,
    Op.ABS: _unary(lambda xp, a: xp.abs(a)),
    Op.MIN: _nary("minimum"),
    Op.MAX: _nary("maximum"),
    Op.FLOAT: _unary(lambda xp, a: xp.to_float(a)),
    Op.EXP: _unary(lambda xp, a: xp.exp(a)),
    Op.LOG: _unary(lambda xp, a: xp.log(a)),
    Op.SQRT: _unary(lambda xp, a: xp.sqrt(a)),
    Op.TANH: _unary(lambda xp, a: xp.tanh(a)),
    Op.SIGMOID: _unary(lambda xp, a: xp.sigmoid(a)),
    Op.INDEX: _index,
    Op.TOPK_BLOCKS: _selector,
    Op.TOPP_BLOCKS: _selector,
    Op.ROUTE: _selector,
    Op.RANDOM_BLOCKS: _selector,
}


def evaluate(expr: Expr, env: Env):
    """The value of ``expr`` on the grid of ``env`` (NumPy), with float warnings silenced."""
    with np.errstate(all="ignore"):
        return Evaluator(env).sub(expr)


def evaluate_scalar(expr: Expr, params: dict, sizes: dict | None = None):
    """A compile-time constant expression's Python value (leaves: literals and parameters), or
    with ``sizes`` (q_len, kv_len, heads, kv_heads) a call constant's."""
    sizes = sizes or {}
    env = Env(h=0, q=0, k=0, q_len=sizes.get("q_len", 0), kv_len=sizes.get("kv_len", 0),
              heads=sizes.get("heads", 1), kv_heads=sizes.get("kv_heads", 1), params=params)
    value = evaluate(expr, env)
    return np.asarray(value).item()
