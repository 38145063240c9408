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
points for their right-hand/branch operands, and ``any``/``all`` each item to the points the
earlier items did not decide, so that what can fail at a pair is only required to be valid
where it is actually used (``doc[q - 1] if q > 0 else -1`` is valid): a tensor index in range,
a shift count in 0..62, a finite ``floor``/``ceil``/``round`` argument whose result fits int64.
Each is an :class:`~attndsl.errors.AttnCallError` at the failing operand (the index, the count,
the function) naming the value and the first (h, q, k) where it is evaluated; with
``Env.out_of_range`` a list, the analysis' mode, such values are clipped instead and the bool
array of the pairs where it happened is appended.

Integers are int64 (``<<`` wraps as two's complement, ``>>`` is arithmetic), ``round`` is half
to even, ``ilog2`` is exact (``floor(log2(n))`` for n >= 1, -1 below). The reductions
(``any``, ``all``, ``sum``, ``max``, ``min`` over ``range(n)``) loop for real: ``Env.vars``
holds the loop variables (binder depth -> value) and every iteration re-evaluates the nodes that
read them. Their bound n, a call constant, must lie in 0..MAX_RANGE and ``max``/``min`` of an
empty range is an error: both wherever the reduction is evaluated at all, whatever the live
points (as attndsl/expand.py's expansion, which every backend runs, checks them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce

import numpy as np

from .errors import AttnCallError, source_for
from .ir import Expr, Op, Type
from .ops import FLOAT_TO_INT_OPS, MAX_RANGE, MAX_SHIFT, REDUCE_OPS, SHIFT_OPS

# the ops whose operands can fail at a pair: evaluated only at live points
_LIVE_OPS = (Op.INDEX, *SHIFT_OPS, *FLOAT_TO_INT_OPS)
_ERF = np.frompyfunc(math.erf, 1, 1)


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
    exp2 = staticmethod(np.exp2)
    log2 = staticmethod(np.log2)
    floor = staticmethod(np.floor)
    ceil = staticmethod(np.ceil)
    round = staticmethod(np.rint)           # half to even
    left_shift = staticmethod(np.left_shift)        # int64: wraps
    right_shift = staticmethod(np.right_shift)      # int64: arithmetic

    @staticmethod
    def sigmoid(x):
        return 0.5 * (1.0 + np.tanh(0.5 * x))

    @staticmethod
    def erf(x):
        """Python's ``math.erf`` elementwise (NumPy has none; SciPy is no dependency)."""
        return np.asarray(_ERF(np.asarray(x, dtype=np.float64)), dtype=np.float64)

    @staticmethod
    def to_int(x):
        """Integral float64 values within int64 as int64."""
        return np.asarray(x).astype(np.int64)

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
    # None: an index out of range (a bad shift count, a float -> int conversion that fails)
    # raises. A list: such values are clipped and the bool array of grid points where it
    # happened is appended (the analysis then treats them as unknown).
    out_of_range: list | None = None
    vars: dict = field(default_factory=dict)        # reduction binder depth -> loop value


class Evaluator:
    """Evaluates IR expressions against one Env; results of shared sub-trees are memoised
    (those that read a reduction's loop variable per iteration: one memo per binder depth,
    emptied when a loop at that depth or outside it moves on)."""

    def __init__(self, env: Env):
        self.env = env
        self.xp = env.xp
        self._memo: dict[int, object] = {}
        self._var_memo: dict[int, dict] = {}        # depth -> memo of nodes reading var depth
        self._live: dict[int, bool] = {}
        self._free: dict[int, int] = {}             # id -> bit mask of the free loop depths
        self._keep: list[Expr] = []                 # keeps the nodes of _free alive
        # whether this evaluates the score clause (an Env with a score): only for the messages
        # of the errors at a pair
        self.score_clause = env.score is not None

    def needs_live(self, node: Expr) -> bool:
        """Whether ``node`` reads something that can fail at a pair (a tensor index, a shift,
        a float -> int conversion): it is then evaluated at live points only."""
        got = self._live.get(id(node))
        if got is None:
            got = node.uses(*_LIVE_OPS)
            self._live[id(node)] = got
        return got

    def free_vars(self, node: Expr) -> int:
        """The loop variables ``node`` reads but does not bind, as a bit mask of depths."""
        stack = [(node, False)]
        while stack:
            n, ready = stack.pop()
            if id(n) in self._free:
                continue
            if not ready:
                stack.append((n, True))
                stack.extend((c, False) for c in n.args if id(c) not in self._free)
                continue
            if n.op is Op.VAR:
                mask = 1 << n.value
            else:
                mask = reduce(lambda m, c: m | self._free[id(c)], n.args, 0)
                if n.op in REDUCE_OPS:
                    mask = self._free[id(n.args[0])] | \
                        (self._free[id(n.args[1])] & ~(1 << n.value))
            self._free[id(n)] = mask
            self._keep.append(n)
        return self._free[id(node)]

    def forget(self, depth: int) -> None:
        """Drop the memoised values of the nodes that read a loop variable of ``depth`` or
        deeper (a loop at ``depth`` moves on)."""
        for d in [d for d in self._var_memo if d >= depth]:
            del self._var_memo[d]

    def sub(self, node: Expr, live=None):
        """The value of ``node`` where ``live`` (a bool array or None for everywhere) holds."""
        if live is None:
            free = self.free_vars(node) if self.env.vars else 0
            memo = self._memo if not free else \
                self._var_memo.setdefault(free.bit_length() - 1, {})
            key = id(node)
            if key not in memo:
                memo[key] = EVAL_RULES[node.op](self, node, None)
            return memo[key]
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
    clipped = []
    for axis, i in enumerate(idx):
        size = tensor.shape[axis]
        bad = (i < 0) | (i >= size)
        if _failed(ev, bad, live):
            _raise_out_of_range(ev, node, axis, i, bad & _live_np(ev, live), size)
        clipped.append(np.broadcast_to(np.clip(i, 0, max(size - 1, 0)), shape))
    if 0 in tensor.shape:       # NumPy arrays, or torch tensors (reference_grad's namespace)
        zeros = tensor.new_zeros(shape) if hasattr(tensor, "new_zeros") else \
            np.zeros(shape, dtype=tensor.dtype)
        return xp.from_numpy(zeros)
    if not isinstance(tensor, np.ndarray):      # torch indexes with writable arrays only
        clipped = [np.array(i) for i in clipped]
    return xp.from_numpy(tensor[tuple(clipped)])


def _live_np(ev, live):
    return True if live is None else np.asarray(ev.xp.to_numpy(live), dtype=bool)


def _failed(ev, bad: np.ndarray, live) -> bool:
    """Whether ``bad`` (a NumPy bool array over the grid) holds at a live point: then the
    caller raises, unless the Env collects such points (``out_of_range`` is a list: they are
    appended and False is returned, the caller clips)."""
    bad = bad & _live_np(ev, live)
    if not np.any(bad):
        return False
    if ev.env.out_of_range is None:
        return True
    ev.env.out_of_range.append(bad)
    return False


def _first(ev, bad, value):
    """(the value at, the text of) the first (h, q, k) where ``bad`` holds."""
    env = ev.env
    full = np.broadcast_shapes(np.shape(bad), np.shape(value), np.shape(env.h), np.shape(env.q),
                               np.shape(env.k))
    where = tuple(np.argwhere(np.broadcast_to(bad, full))[0])
    h, q, k = (int(np.broadcast_to(np.asarray(x), full)[where]) for x in (env.h, env.q, env.k))
    row = q - (env.kv_len - env.q_len)
    at = f"h={h}, q={q}, k={k}" + (f" (query row {row})" if row != q else "")
    return np.broadcast_to(value, full)[where], at


def _why(ev, what: str, plural: str) -> str:
    """Why ``what`` (e.g. 'an index') is evaluated at the pair of an error."""
    if ev.score_clause:
        return ("the score clause is evaluated at every (h, q, k) pair, masked pairs included "
                f"(LANGUAGE.md sections 1 and 3), so {plural} at every pair")
    return (f"the mask evaluates {what} at every pair that no enclosing 'and', 'or' or 'if' "
            "rules out (nor an 'any' or 'all' that an earlier item decided)")


def _short(node: Expr) -> str:
    from .printer import print_expr  # local: keeps this module's imports light

    text = print_expr(node)
    return text if len(text) <= 60 else text[:57] + "..."


def _raise_out_of_range(ev, node, axis, idx, bad, size):
    """Raise the AttnCallError of an index out of range: the tensor, its size, the index
    expression and its value at the first (h, q, k) where it is evaluated, and why it is
    evaluated there (the score clause at every pair, masked ones included; the mask wherever
    no enclosing and/or/if rules the operand out)."""
    value, at = _first(ev, bad, idx)
    value = int(value)
    dim = f" (dimension {axis})" if len(node.args) > 1 else ""
    expr = _short(node.args[axis])
    guard = f"{expr} >= 0" if value < 0 else f"{expr} < {size}"
    why = _why(ev, "an index", "its indices must be in range")
    raise AttnCallError(f"index {value} is out of range for tensor input '{node.value}'{dim} of "
                        f"size {size}: the index '{expr}' is {value} at {at}; {why}; guard it "
                        f"('... if {guard} else ...') or clamp the index", node.span,
                        _source_of(node))


def _shift(name):
    """``<<`` (int64, wrapping) or ``>>`` (arithmetic); a count outside 0..MAX_SHIFT where it
    is live is an error at the count."""
    def rule(ev, node, live):
        xp = ev.xp
        a, count = node.args
        x, c = ev.sub(a, live), ev.sub(count, live)
        c_np = np.asarray(xp.to_numpy(c), dtype=np.int64)
        bad = (c_np < 0) | (c_np > MAX_SHIFT)
        if _failed(ev, bad, live):
            value, at = _first(ev, bad & _live_np(ev, live), c_np)
            expr = _short(count)
            why = _why(ev, "a shift", f"its shift counts must be in 0..{MAX_SHIFT}")
            raise AttnCallError(
                f"shift count {int(value)} is out of range: the count '{expr}' of "
                f"'{node.op.value}' is {int(value)} at {at}, and a shift count must lie in "
                f"0..{MAX_SHIFT}; {why}; guard it ('... if 0 <= {expr} <= {MAX_SHIFT} else "
                "...') or clamp the count", count.span, _source_of(count))
        if np.any(bad):         # clipped (where not live, or collected): any value will do
            c = xp.from_numpy(np.clip(c_np, 0, MAX_SHIFT))
        return getattr(xp, name)(x, c)
    return rule


_INT64_LIMIT = 2.0 ** 63


def _to_int(name):
    """``floor``, ``ceil`` or ``round`` (half to even) of a float64 as an int64; NaN, an
    infinity or a result beyond int64 where it is live is an error at the call."""
    def rule(ev, node, live):
        xp = ev.xp
        r = getattr(xp, name)(ev.sub(node.args[0], live))
        ok = (r >= -_INT64_LIMIT) & (r < _INT64_LIMIT)          # NaN is neither
        bad = ~np.asarray(xp.to_numpy(ok), dtype=bool)
        if _failed(ev, bad, live):
            x = np.asarray(xp.to_numpy(ev.sub(node.args[0], live)), dtype=np.float64)
            value, at = _first(ev, bad & _live_np(ev, live), x)
            expr = _short(node.args[0])
            why = _why(ev, f"'{name}'", f"the arguments of its '{name}' must be valid")
            raise AttnCallError(
                f"{name} of {float(value)!r} is not an int64: the argument '{expr}' is "
                f"{float(value)!r} at {at}, and {name} needs a finite argument whose result "
                f"lies in [-2**63, 2**63 - 1]; {why}; guard it ('... if ... else ...') so "
                "that it is not evaluated there", node.span, _source_of(node))
        return xp.to_int(xp.where(ok, r, 0.0))
    return rule


def _ilog2(ev, node, live):
    """floor(log2(n)) for n >= 1, -1 for n <= 0, exactly (halving by shifts: no float)."""
    xp = ev.xp
    n = ev.sub(node.args[0], live)
    x, out = xp.maximum(n, 1), 0
    for step in (32, 16, 8, 4, 2, 1):
        big = x >= (1 << step)
        out = out + xp.where(big, step, 0)
        x = xp.where(big, x >> step, x)
    return xp.where(n >= 1, out, -1)


def call_sizes_text(sizes: dict) -> str:
    """``q_len=8, kv_len=8, heads=2, kv_heads=2``: the sizes an error at a call names."""
    return ", ".join(f"{n}={v}" for n, v in sizes.items())


def checked_bound(n, count: Expr, sizes: dict) -> int:
    """The bound ``n`` of a reduction's range(n) (``count``: its expression), 0 <= n <=
    MAX_RANGE, else the AttnCallError at ``count`` naming the call's ``sizes`` (the interpreter
    and the expansion, attndsl/expand.py, check it alike)."""
    n = int(n)
    if not 0 <= n <= MAX_RANGE:
        raise AttnCallError(f"range(N): N must be between 0 and {MAX_RANGE}, got {n} at this "
                            f"call ({call_sizes_text(sizes)})", count.span, _source_of(count))
    return n


def empty_range_error(node: Expr) -> AttnCallError:
    """The error of max/min (``node``) over an empty range."""
    name = "max" if node.op is Op.REDUCE_MAX else "min"
    return AttnCallError(f"{name}() of an empty range: range(N) has N = 0 at this call",
                         node.span, _source_of(node))


def _bound(ev, node) -> int:
    """The bound n of a reduction's range(n) (a call constant: checked wherever the reduction
    is evaluated, whatever the live points)."""
    env = ev.env
    sizes = {"q_len": env.q_len, "kv_len": env.kv_len, "heads": env.heads,
             "kv_heads": env.kv_heads}
    return checked_bound(np.asarray(ev.xp.to_numpy(ev.sub(node.args[0]))).item(), node.args[0],
                         sizes)


def _reduction(ev, node, live):
    """any/all (or/and chains: an item is live where the earlier ones did not decide), sum
    (0 or 0.0, then the items added in order) and max/min (folded like MAX/MIN) over
    ``body[var := i]`` for i in range(n)."""
    n = _bound(ev, node)
    op, body, depth, xp = node.op, node.args[1], node.value, ev.xp
    if n == 0:
        if op in (Op.REDUCE_MAX, Op.REDUCE_MIN):
            raise empty_range_error(node)
        if op is Op.SUM:
            return xp.scalar(0.0 if node.type is Type.FLOAT else 0)
        return xp.scalar(op is Op.ALL)
    narrow = op in (Op.ANY, Op.ALL) and ev.needs_live(body)
    acc = xp.scalar(0.0 if node.type is Type.FLOAT else 0) if op is Op.SUM else None
    item_live = live
    env = ev.env
    try:
        for i in range(n):
            env.vars[depth] = i
            ev.forget(depth)
            v = ev.sub(body, item_live)
            if op is Op.SUM:
                acc = acc + v
            elif acc is None:
                acc = v
            elif op in (Op.ANY, Op.ALL):
                acc = (acc | v) if op is Op.ANY else (acc & v)
            else:
                acc = (xp.maximum if op is Op.REDUCE_MAX else xp.minimum)(acc, v)
            if narrow:
                item_live = _and_live(item_live, ~v if op is Op.ANY else v)
    finally:
        env.vars.pop(depth, None)
        ev.forget(depth)
    return acc


def _var(ev, node, live):
    return ev.xp.scalar(ev.env.vars[node.value])


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
    Op.ERF: _unary(lambda xp, a: xp.erf(a)),
    Op.EXP2: _unary(lambda xp, a: xp.exp2(a)),
    Op.LOG2: _unary(lambda xp, a: xp.log2(a)),
    Op.FLOOR: _to_int("floor"),
    Op.CEIL: _to_int("ceil"),
    Op.ROUND: _to_int("round"),
    Op.ILOG2: _ilog2,
    Op.BIT_AND: _binary(lambda xp, a, b: a & b),
    Op.BIT_OR: _binary(lambda xp, a, b: a | b),
    Op.BIT_XOR: _binary(lambda xp, a, b: a ^ b),
    Op.LSHIFT: _shift("left_shift"),
    Op.RSHIFT: _shift("right_shift"),
    Op.INVERT: _unary(lambda xp, a: ~a),
    Op.ANY: _reduction,
    Op.ALL: _reduction,
    Op.SUM: _reduction,
    Op.REDUCE_MAX: _reduction,
    Op.REDUCE_MIN: _reduction,
    Op.VAR: _var,
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
