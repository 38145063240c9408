"""A bound pattern: checked IR with a value for every scalar parameter, identified by content.

Input: a :class:`~attndsl.ir.PatternIR` and the values of its scalar parameters (all of them:
:class:`attndsl.Pattern` checks that before it makes one). Output: :class:`BoundPattern`, the
value every stage below the API takes (analysis, planning, code generation, both backends).

Its :attr:`~BoundPattern.key` is a digest of the canonical IR (every node's op, type, value and
children; spans do not count) and of the parameter values, computed once in linear time in
the number of distinct nodes (a shared sub-tree is hashed once). Two bound patterns are equal
when their keys are, so the pipeline's caches (:mod:`attndsl.caches`) are keyed by content:
binding the same values again, or compiling the same text twice, finds the same entries.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field, replace
from functools import partial
from types import MappingProxyType

from .caches import LRUCache
from .constants import call_constant_sites
from .errors import AttnCallError, source_for
from .expand import expand_reductions, has_reductions
from .inputs import tensor_inputs
from .interp import call_sizes_text, evaluate_scalar
from .ir import DATA_SELECTOR_OPS, Expr, PatternIR
from .reference import CallGrid

CALL_CONSTANT_SITES = LRUCache("bound.call_constant_sites", 256)
EXPANDED = LRUCache("bound.expanded", 64)      # (pattern key, sizes) -> expanded BoundPattern


def _atom(value) -> str:
    return f"{type(value).__name__}:{value!r}"


def expr_digest(root: Expr, memo: dict | None = None) -> str:
    """A digest of the expression's content (op, type, value, children), iterative and linear
    in its distinct nodes. ``memo`` (id -> digest) may be shared between roots of one IR while
    the nodes are alive."""
    memo = {} if memo is None else memo
    stack = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in memo:
            continue
        if not ready:
            stack.append((node, True))
            stack.extend((c, False) for c in node.args if id(c) not in memo)
            continue
        text = "|".join([node.op.name, node.type.name, _atom(node.value),
                         *(memo[id(c)] for c in node.args)])
        memo[id(node)] = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return memo[id(root)]


def ir_digest(ir: PatternIR) -> str:
    """A digest of a whole pattern IR: name, parameters (names, types, defaults), the clauses."""
    memo: dict = {}
    parts = [ir.name, *(f"{p.name}:{p.type}:{_atom(p.default)}" for p in ir.params),
             expr_digest(ir.mask, memo), "-" if ir.score is None else expr_digest(ir.score, memo)]
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=20).hexdigest()


# every bound pattern alive, by content key: weak references (an entry goes with its pattern)
_LIVE: dict[str, list] = {}


@dataclass(frozen=True, eq=False)
class BoundPattern:
    """A pattern with every scalar parameter bound; equal (and hashed) by :attr:`key`."""

    ir: PatternIR
    values: MappingProxyType
    source: str | None = field(default=None, repr=False)
    key: str = field(default="", repr=False)
    reduces: bool = field(default=False, repr=False)      # has a reduction to expand per call

    @classmethod
    def make(cls, ir: PatternIR, values: dict, source: str | None = None) -> BoundPattern:
        vals = MappingProxyType(dict(sorted(values.items())))
        digest = hashlib.blake2b(
            "\n".join([ir_digest(ir), *(f"{n}={_atom(v)}" for n, v in vals.items())]).encode(),
            digest_size=20).hexdigest()
        made = cls(ir, vals, source, digest, has_reductions(ir))
        _LIVE.setdefault(digest, []).append(weakref.ref(made, partial(_forget, digest)))
        return made

    def __eq__(self, other) -> bool:
        return isinstance(other, BoundPattern) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def tensor_params(self) -> list[str]:
        return [p.name for p in self.ir.params if p.is_tensor]

    def uses_selectors(self) -> bool:
        """Whether the pattern reads the call's query and key vectors (topk/topp/route)."""
        return any(r.uses(*DATA_SELECTOR_OPS) for r in self.ir.roots())

    def with_clauses(self, mask: Expr, score: Expr | None, params=None) -> BoundPattern:
        """The same parameters over other clauses (a restriction, a relaxation, a gather)."""
        ir = replace(self.ir, mask=mask, score=score,
                     params=self.ir.params if params is None else tuple(params))
        values = {n: v for n, v in self.values.items() if any(p.name == n for p in ir.params)}
        return BoundPattern.make(ir, values, self.source)

    def for_sizes(self, q_len, kv_len, heads, kv_heads) -> BoundPattern:
        """The pattern every stage below the API runs at a call of these sizes: itself, or with
        its reductions expanded (attndsl/expand.py; cached by content and sizes in
        ``bound.expanded``)."""
        if not self.reduces:
            return self
        sizes = {"q_len": q_len, "kv_len": kv_len, "heads": heads, "kv_heads": kv_heads}

        def make() -> BoundPattern:
            ir = expand_reductions(self.ir, dict(self.values), sizes)
            return BoundPattern.make(ir, dict(self.values), self.source)
        return EXPANDED.get((self.key, tuple(sizes.values())), make)

    def check_sizes(self, q_len, kv_len, heads, kv_heads) -> None:
        """Every divisor of ``//`` and ``%`` that reads the call's sizes is greater than 0 at
        these sizes (LANGUAGE.md section 3), else an AttnCallError at the divisor's line and
        column. The divisors are found once per pattern (``bound.call_constant_sites``)."""
        sizes = {"q_len": q_len, "kv_len": kv_len, "heads": heads, "kv_heads": kv_heads}
        for expr, ok, message in CALL_CONSTANT_SITES.get(
                self.key, lambda: tuple(call_constant_sites(self.ir))):
            value = evaluate_scalar(expr, dict(self.values), sizes)
            if not ok(value):
                raise AttnCallError(f"{message}, got {value} at this call "
                                    f"({call_sizes_text(sizes)})", expr.span,
                                    source_for(expr.span.filename))

    def grid(self, q_len, kv_len, heads, kv_heads, tensors, query=None, key=None,
             scale=None) -> CallGrid:
        """The reference's evaluation grid of one call (one batch element), its sizes checked
        (:meth:`check_sizes`); its IR is the pattern's at these sizes (:meth:`for_sizes`)."""
        self.check_sizes(q_len, kv_len, heads, kv_heads)
        ir = self.for_sizes(q_len, kv_len, heads, kv_heads).ir
        return CallGrid(ir, dict(self.values), q_len, kv_len, heads, kv_heads, tensors,
                        query, key, scale)


def by_key(key: str) -> BoundPattern | None:
    """A live bound pattern with this content key, or None (the torch custom operator names
    patterns by key, attndsl/op.py)."""
    for ref in _LIVE.get(key, ()):
        pattern = ref()
        if pattern is not None:
            return pattern
    return None


def _forget(key: str, dead: weakref.ref) -> None:
    refs = _LIVE.get(key)
    if refs is not None:
        refs[:] = [r for r in refs if r is not dead]
        if not refs:
            del _LIVE[key]


def as_bound(pattern) -> BoundPattern:
    """A BoundPattern as it is, or the bound value of a user-facing ``attndsl.Pattern`` (its
    ``bound()``, an AttnCallError naming a parameter without a value): the analysis reports
    that users call directly (``cost_report``, ``graph_report``, ``empty_rows``) take either."""
    return pattern if isinstance(pattern, BoundPattern) else pattern.bound()


def call_grids(pattern: BoundPattern, shapes, q, k, scale, given_tensors: dict) -> list[CallGrid]:
    """One CallGrid per batch element of a call (``shapes``: batch, heads, kv_heads, q_len,
    kv_len; ``q``, ``k``: NumPy float64, read only by selectors, or None: the grids' selectors
    then refuse to evaluate)."""
    batch, heads, kv_heads, q_len, kv_len = shapes
    per_batch = tensor_inputs(pattern.ir, given_tensors, batch)
    need_qk = q is not None and k is not None
    return [pattern.grid(q_len, kv_len, heads, kv_heads, t,
                         q[b] if need_qk else None, k[b] if need_qk else None, scale)
            for b, t in enumerate(per_batch)]
