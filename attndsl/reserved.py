"""Names a file may not declare: the language's builtins and the keywords of the Python API.

A scalar parameter is passed by name to ``Pattern.bind(**values)``; a tensor input by name to
each call (``pat(q, k, v, doc=...)``, ``dense_mask``, ``block_map``, ``reference``,
``describe``, ``to_flex``, the analyses behind ``attndsl analyze``: ``cost_report``,
``graph_report``, and ``attndsl.hf.register``, ``attndsl.nn.Attention``).
A name that is also a keyword of that function could never be passed. So:

* :data:`BUILTIN_NAMES` cannot name anything a file declares (a def, a pattern, a parameter, a
  def parameter, a let): it would hide the builtin;
* :data:`PARAM_API_NAMES` (``self``) cannot name a scalar parameter;
* :data:`TENSOR_API_NAMES` cannot name a tensor input.

:data:`RESERVED_NAMES` is all of them. tests/test_limits.py checks these tuples against the
checker's builtins and the signatures of the public methods.
"""

from __future__ import annotations

BUILTIN_NAMES: tuple[str, ...] = (
    "q", "k", "h", "q_len", "kv_len", "heads", "kv_heads", "kv_head", "score", "inf",
    "abs", "min", "max", "clamp", "float", "exp", "log", "sqrt", "tanh", "sigmoid",
    "topk_blocks", "topp_blocks", "random_blocks", "route",
    "erf", "exp2", "log2", "floor", "ceil", "round", "ilog2", "any", "all", "sum", "range", "at",
)

PARAM_API_NAMES: tuple[str, ...] = ("self",)          # Pattern.bind(self, **values)

# the keywords of Pattern.__call__, dense_mask, block_map, reference, describe, to_flex
# (LANGUAGE.md section 6) and of analysis.cost.cost_report, analysis.graph.graph_report /
# empty_rows / warn_empty_rows, attndsl.hf.register and attndsl.nn.Attention, which take the
# tensor inputs as keyword arguments too
TENSOR_API_NAMES: tuple[str, ...] = (
    "self", "q", "k", "v", "return_lse", "scale", "backend", "q_len", "kv_len", "heads",
    "kv_heads", "query", "key", "rows", "cols", "block", "head_dim", "dense", "sizes", "layers",
    "max_tokens", "BLOCK_SIZE", "name", "pat",        # ("pattern" is a keyword of the language)
)

RESERVED_NAMES: tuple[str, ...] = tuple(dict.fromkeys(BUILTIN_NAMES + TENSOR_API_NAMES))


def why_reserved(name: str, tensor: bool) -> str:
    """Why a parameter (a tensor input when ``tensor``) cannot be ``name`` ('' when it can)."""
    if name in BUILTIN_NAMES:
        return "is a builtin name"
    if name in PARAM_API_NAMES:
        return "is reserved (Pattern.bind(self, **values))"
    if tensor and name in TENSOR_API_NAMES:
        return (f"is reserved for tensor inputs: '{name}' is an argument of the Pattern API "
                "(pat(q, k, v, return_lse, scale, backend), dense_mask, block_map, reference, "
                "describe)")
    return ""
