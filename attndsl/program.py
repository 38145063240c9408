"""The compiler pipeline and the user-facing objects: :func:`compile`, :func:`load`,
:class:`Program` and :class:`Pattern` (LANGUAGE.md section 6).

``compile`` is the front end's list of stages: parse (text -> declarations), resolve (names,
defs, recursion: the :class:`~attndsl.checker.Checker` built over the declarations), check and
lower (types are checked while defs and lets are inlined into IR, in one walk: ``check()``);
``ATTNDSL_DUMP=ast,ir`` prints a stage's output to stderr (attndsl/dump.py). A :class:`Pattern`
with every scalar parameter bound holds its :class:`~attndsl.bound.BoundPattern`, the
content-keyed value the analysis and both backends take; a call runs the backend pipeline of
:func:`attndsl.runtime.run`.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from types import MappingProxyType

import numpy as np

from . import reference as ref
from .analysis import api
from .analysis.relax import relaxed_mask
from .bound import BoundPattern, call_grids
from .checker import PRELUDE_FILENAME, Checker
from .constants import check_constants
from .dump import dump
from .errors import AttnCallError, ErrorSink, remember_source
from .inputs import (
    as_float64,
    check_dense_size,
    check_lengths,
    check_qkv,
    check_scale,
    check_window,
    out_of_memory,
    real_array,
    short_repr,
    tensor_inputs,
)
from .ir import DATA_SELECTOR_OPS, PatternIR, Type
from .parser import parse
from .printer import print_pattern


@lru_cache(maxsize=1)
def prelude_decls() -> tuple:
    text = resources.files("attndsl.grammar").joinpath("prelude.attn").read_text(encoding="utf-8")
    remember_source(PRELUDE_FILENAME, text)
    return parse(text, PRELUDE_FILENAME)


def _render_decls(decls) -> str:
    return "\n".join(map(repr, decls))


def _render_ir(patterns: dict) -> str:
    return "\n".join(print_pattern(p) for p in patterns.values())


def compile(source: str, filename: str = "<string>") -> Program:  # noqa: A001 - the API's name
    """Compile .attn source text into a Program; raises AttnError on any error in it."""
    if not isinstance(source, str):
        raise AttnCallError("compile() takes the source text as a str")
    if not isinstance(filename, str):
        raise AttnCallError(f"compile(): filename must be a str, got {type(filename).__name__}")
    remember_source(filename, source)
    # every stage reports into one sink, so a file's errors come out together; no stage
    # recurses without bound (nesting beyond limits.MAX_DEPTH and files beyond
    # limits.MAX_SOURCE_CHARS are errors at the offending node)
    sink, broken = ErrorSink(source), set()
    # parse: text -> declarations (the AST)
    decls = dump("ast", parse(source, filename, sink, broken), _render_decls)
    # resolve: names, defs and recursion, over the file's declarations and the prelude's defs
    scope = Checker(decls, source, prelude_decls(), sink, broken)
    # check and lower: types are checked as defs and lets are inlined into IR (one walk)
    patterns = dump("ir", scope.check(), _render_ir)
    return Program(filename, {name: Pattern(ir, source) for name, ir in patterns.items()})


def _rebuilt(source: str | None, filename: str, name: str, values: dict, printed: str) -> Pattern:
    """The pattern :meth:`Pattern.__reduce__` describes."""
    if source is not None:
        pat = compile(source, filename)[name]
        if print_pattern(pat.ir) == printed:
            return Pattern(pat.ir, pat.source, values)
    pat = compile(printed, f"<{name}, printed>")[name]
    return Pattern(pat.ir, None, values)


def load(path) -> Program:
    """Compile a .attn file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AttnCallError(f"cannot read '{path}': {reason}") from None
    return compile(text, path)


class Program:
    """The patterns of one file, by name."""

    def __init__(self, filename: str, patterns: dict):
        self.filename = filename
        self._patterns = patterns

    @property
    def patterns(self) -> list[str]:
        return list(self._patterns)

    def __getitem__(self, name: str) -> Pattern:
        if not isinstance(name, str):
            raise AttnCallError(f"a pattern name must be a str, got {type(name).__name__} "
                                f"{short_repr(name)}")
        try:
            return self._patterns[name]
        except KeyError:
            known = ", ".join(self._patterns) or "none"
            raise AttnCallError(f"no pattern '{name}' in {self.filename} (patterns: {known})") from None

    def __contains__(self, name: str) -> bool:
        return isinstance(name, str) and name in self._patterns

    def __iter__(self):
        return iter(self._patterns.values())

    def __len__(self) -> int:
        return len(self._patterns)

    def __repr__(self) -> str:
        return f"<attndsl.Program {self.filename}: {', '.join(self._patterns)}>"


def _bind_value(param, value):
    t = param.type
    if t is Type.BOOL and isinstance(value, (bool, np.bool_)):
        return bool(value)
    if t is Type.INT and isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if not -(2 ** 63) <= int(value) < 2 ** 63:
            raise AttnCallError(f"parameter '{param.name}' is int (64-bit), got {value!r}, which is "
                                "out of range")
        return int(value)
    if t is Type.FLOAT and isinstance(value, (int, float, np.integer, np.floating)) \
            and not isinstance(value, (bool, np.bool_)):
        try:
            out = float(value)
        except OverflowError:
            out = math.inf
        if math.isinf(out) and not (isinstance(value, (float, np.floating)) and np.isinf(value)):
            # a huge int, or a longdouble beyond float64's range
            raise AttnCallError(f"parameter '{param.name}' is float, got {short_repr(value)}, which "
                                "is out of range")
        return out
    raise AttnCallError(f"parameter '{param.name}' is {t.value}, got {type(value).__name__} "
                        f"{value!r}")


class Pattern:
    """A checked pattern with values for its compile-time parameters."""

    def __init__(self, ir: PatternIR, source: str | None = None, values: dict | None = None):
        self.ir = ir
        self.source = source
        self.values = MappingProxyType(dict(values) if values is not None else {
            p.name: p.default for p in ir.params if not p.is_tensor and p.default is not None})
        missing = [p.name for p in ir.params if not p.is_tensor and p.name not in self.values]
        self._missing = missing[0] if missing else None
        self._bound = None if missing else BoundPattern.make(ir, dict(self.values), source)

    @property
    def name(self) -> str:
        return self.ir.name

    def __reduce__(self):
        """Pickling and ``copy.deepcopy``: a pattern is rebuilt from text (its source when the
        source compiles to this IR, else its printed IR, which compiles back to the same IR)
        with its values, so nothing process-specific (hashes, spans) is stored."""
        return (_rebuilt, (self.source, self.ir.span.filename, self.name, dict(self.values),
                           print_pattern(self.ir)))

    @property
    def params(self) -> dict:
        """Scalar parameter values (required ones that are unbound are absent)."""
        return dict(self.values)

    @property
    def tensor_params(self) -> list[str]:
        return [p.name for p in self.ir.params if p.is_tensor]

    def bind(self, **values) -> Pattern:
        """A new Pattern with the given compile-time parameters replaced."""
        new = dict(self.values)
        for name, value in values.items():
            try:
                param = self.ir.param(name)
            except KeyError:
                raise AttnCallError(f"pattern '{self.name}' has no parameter '{name}'") from None
            if param.is_tensor:
                raise AttnCallError(f"'{name}' is a tensor input of pattern '{self.name}'; pass it "
                                    "at each call, not to bind()")
            new[name] = _bind_value(param, value)
        check_constants(self.ir, new, self.source, partial=True)
        return Pattern(self.ir, self.source, new)

    def bound(self) -> BoundPattern:
        """The content-keyed value of this pattern with its parameters (what the analysis and
        the backends take); an AttnCallError when a required parameter has no value."""
        if self._bound is None:
            raise AttnCallError(f"pattern '{self.name}' needs a value for parameter "
                                f"'{self._missing}'; bind it with pat.bind({self._missing}=...)")
        return self._bound

    def uses_selectors(self) -> bool:
        return any(r.uses(*DATA_SELECTOR_OPS) for r in self.ir.roots())

    def without_selectors(self) -> Pattern:
        """The static part: data-dependent selectors relaxed away from the mask, and a score
        clause that reads them dropped (a superset of the allowed pairs that reads no query or
        key vectors); the pattern itself when it has none."""
        if not self.uses_selectors():
            return self
        score = self.ir.score
        if score is not None and score.uses(*DATA_SELECTOR_OPS):
            score = None
        ir = replace(self.ir, mask=relaxed_mask(self.ir.mask), score=score)
        return Pattern(ir, self.source, self.values)

    def grid(self, q_len, kv_len, heads, kv_heads, tensors, query=None, key=None, scale=None):
        """The reference's evaluation grid of one call (one batch element)."""
        return self.bound().grid(q_len, kv_len, heads, kv_heads, tensors, query, key, scale)

    # ------------------------------------------------------------------ the interpreter
    def dense_mask(self, q_len: int, kv_len: int, heads: int = 1, kv_heads: int | None = None,
                   query=None, key=None, rows=None, cols=None, **tensor_inputs_) -> np.ndarray:
        """numpy bool [heads, q_len, kv_len]: the mask clause at every (h, i, j); with ``rows``
        and/or ``cols`` (``range(start, stop)`` or ``(start, stop)``) only that window of query
        rows and key columns, [heads, len(rows), len(cols)] (a window of a call of any length)."""
        kv_heads = heads if kv_heads is None else kv_heads
        q_len, kv_len, heads, kv_heads = check_lengths(q_len, kv_len, heads, kv_heads)
        window = check_window("rows", rows, q_len) + check_window("cols", cols, kv_len)
        check_dense_size(heads, window[1] - window[0], window[3] - window[2])
        tensors = tensor_inputs(self.ir, tensor_inputs_, None)[0]
        query, key = self._selector_inputs(query, key, q_len, kv_len, heads, kv_heads)
        try:
            return ref.dense_mask(self.grid(q_len, kv_len, heads, kv_heads, tensors, query, key),
                                  *window)
        except MemoryError:
            raise out_of_memory("the dense mask", {"heads": heads, "q_len": q_len,
                                                   "kv_len": kv_len}) from None

    def _selector_inputs(self, query, key, q_len, kv_len, heads, kv_heads):
        if query is None and key is None:
            if self.uses_selectors():
                raise AttnCallError(f"pattern '{self.name}' selects blocks from the query and key "
                                    "vectors: pass query= [heads, q_len, D] and key= "
                                    "[kv_heads, kv_len, D]")
            return None, None
        if query is None or key is None:
            raise AttnCallError("arguments 'query' and 'key' go together: pass both, or neither")
        query, key = real_array(query, "query"), real_array(key, "key")
        if query.ndim != 3 or query.shape[:2] != (heads, q_len):
            raise AttnCallError(f"argument 'query' must have shape [heads={heads}, q_len={q_len}, D], "
                                f"got {list(query.shape)}")
        if key.ndim != 3 or key.shape[:2] != (kv_heads, kv_len) or key.shape[2] != query.shape[2]:
            raise AttnCallError(f"argument 'key' must have shape [kv_heads={kv_heads}, kv_len="
                                f"{kv_len}, D={query.shape[2]}], got {list(key.shape)}")
        return as_float64(query, "query"), as_float64(key, "key")

    def reference(self, q, k, v, scale: float | None = None, **tensor_inputs_):
        """The interpreter of LANGUAGE.md section 1: float64 (out [B,H,Lq,Dv], lse [B,H,Lq])."""
        q, k, v = (real_array(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
        shapes = check_qkv(q.shape, k.shape, v.shape)
        q, k, v = (as_float64(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
        scale = check_scale(scale, q.shape[-1])
        grids = self.grids(shapes, q, k, scale, tensor_inputs_)
        return ref.reference_attention(grids, q, k, v, scale)

    def grids(self, shapes, q, k, scale, given_tensors) -> list:
        """One CallGrid per batch element (q, k: NumPy float64, needed only by selectors)."""
        return call_grids(self.bound(), shapes, q, k, scale, given_tensors)

    def block_map(self, q_len: int, kv_len: int, heads: int = 1, block=(128, 128),
                  kv_heads: int | None = None, **tensor_inputs_) -> np.ndarray:
        """int8 [heads, ceil(q_len/BQ), ceil(kv_len/BK)]: 0 empty, 1 partial, 2 full.

        Sound for every pattern (empty: no allowed pair; full: every in-bounds pair allowed),
        exact on the band family; see attndsl.analysis.
        """
        return api.block_map(self.bound(), q_len, kv_len, heads, block, kv_heads, tensor_inputs_)

    def describe(self, q_len: int, kv_len: int, heads: int = 1, block=(128, 128),
                 kv_heads: int | None = None, **tensor_inputs_):
        """The kernel-facing Description (block map, tile lists, key intervals) of a call."""
        return api.describe(self.bound(), q_len, kv_len, heads, block, kv_heads, tensor_inputs_)

    # ------------------------------------------------------------------ torch
    def __call__(self, q, k, v, return_lse: bool = False, scale: float | None = None,
                 backend: str | None = None, **tensor_inputs_):
        from .op import call  # lazily: `import attndsl` does not load torch

        return call(self.bound(), q, k, v, return_lse=return_lse, scale=scale, backend=backend,
                    tensors=tensor_inputs_)

    def to_flex(self, q, k, BLOCK_SIZE=128, scale: float | None = None,  # noqa: N803 - Flex's name
                **tensor_inputs_):
        """This pattern's call on ``q`` [B, H, q_len, D] and ``k`` [B, KVH, kv_len, D] exported
        to PyTorch's FlexAttention (docs/flex.md): an object with ``block_mask`` (a ``BlockMask``
        of the analysis's full and partial tiles at ``BLOCK_SIZE``, an int or a pair (Q, KV)),
        ``mask_mod`` and ``score_mod`` (generated torch functions; ``score_mod`` is None without
        a score clause), ``enable_gqa`` and ``scale``, so that ``flex_attention(q, k, v,
        score_mod=fx.score_mod, block_mask=fx.block_mask, scale=fx.scale,
        enable_gqa=fx.enable_gqa)`` equals ``pat(q, k, v, scale=scale, **tensor_inputs)``. It
        holds the call's tensor inputs and, for selector patterns, the selection computed from
        ``q`` and ``k``: rebuild it for each call."""
        from .flex import to_flex  # lazily, like torch

        return to_flex(self.bound(), q, k, BLOCK_SIZE, scale, tensor_inputs_)

    def triton_source(self, q_len: int | None = None, kv_len: int | None = None, heads: int = 1,
                      kv_heads: int | None = None, head_dim: int = 64, **tensor_inputs_) -> str:
        """The complete generated Triton module of this pattern, as compiled: the language
        helpers its hooks call, its mask and score hooks, and the kernel skeleton ``attn_fwd``
        (attndsl/codegen/skeleton.py) that calls them on each tile.

        With ``q_len`` (and optionally ``kv_len``, ``heads``, ``kv_heads``, ``head_dim``, tensor
        inputs): the modules of every launch of a call at those sizes, under a
        header comment with the call's plan (grid, tile tables, residue-class gathers, launches
        and their merge); nothing is compiled or run."""
        if q_len is None:
            if kv_len is not None or tensor_inputs_:
                raise AttnCallError("triton_source(): give q_len to see the plan of a call")
            from .codegen.emit import module_source  # lazily, like torch

            return module_source(self.bound())
        from .runtime import planned_source

        kv_len = q_len if kv_len is None else kv_len
        kv_heads = heads if kv_heads is None else kv_heads
        q_len, kv_len, heads, kv_heads = check_lengths(q_len, kv_len, heads, kv_heads)
        return planned_source(self.bound(), q_len, kv_len, heads, kv_heads, head_dim, "float16",
                              tensor_inputs_)

    # ------------------------------------------------------------------ display
    def __str__(self) -> str:
        return print_pattern(self.ir, self.values)

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"<attndsl.Pattern {self.name}({vals})>"
