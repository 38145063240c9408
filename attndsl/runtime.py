"""The torch entry point ``pat(q, k, v, ...)`` (LANGUAGE.md section 6): the backend pipeline.

Input: a :class:`~attndsl.bound.BoundPattern` and the call's arguments. Output: out (and lse).
:func:`run` reads as the list of stages: ``bind`` validates every argument (shapes, GQA
divisibility, head_dim, dtypes, devices, tensor inputs) into a
:class:`~attndsl.call.BoundCall` and its :class:`~attndsl.call.CallData`; the call's tensor
indices are proved or checked in range; then a backend runs the rest: ``"torch"``
(:mod:`attndsl.torch_backend`, blockwise over the analysis's tiles, differentiable) or the
generated Triton kernels (``"triton"`` on CUDA, ``"triton-interpret"`` under Triton's CPU
interpreter: analyse, plan, generate, compile, launch, merge in
:func:`attndsl.codegen.backend.forward`).
"""

from __future__ import annotations

import numpy as np
import torch

from .analysis.call_checks import call_values_proved
from .bound import BoundPattern, call_grids
from .call import BoundCall, CallData, CallShape
from .codegen import backend as triton_backend
from .codegen.config import DEFAULT_CONFIG
from .codegen.selection import selection_tables
from .dump import dump
from .errors import AttnCallError
from .inputs import (
    call_tensor_inputs,
    check_qkv,
    check_scale,
    check_torch_tensor,
    short_repr,
)
from .ir import SELECTOR_OPS, Op
from .reference import check_indices
from .torch_backend import blockwise_attention
from .torch_backward import tile_backward
from .torch_select import selected_attention

BACKENDS = ("torch", "triton", "triton-interpret")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensors(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttnCallError(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__} "
                                "(use pat.reference for NumPy arrays)")
        if t.dtype not in _FLOAT_DTYPES:
            raise AttnCallError(f"argument '{name}' must be float16, bfloat16, float32 or float64, "
                                f"got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttnCallError(f"arguments 'q', 'k' and 'v' must have one dtype, got {q.dtype}, "
                            f"{k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttnCallError(f"arguments 'q', 'k' and 'v' must be on one device, got {q.device}, "
                            f"{k.device} and {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_torch_tensor(t, name)         # sparse layouts, the meta device


def _check_backend(backend, q) -> str:
    """The backend a call runs on: the given one, checked, or the default for q's device (the
    generated kernels on CUDA, the torch backend elsewhere; both have a backward)."""
    if backend is None:
        return "triton" if q.is_cuda else "torch"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise AttnCallError(f"argument 'backend' must be one of {', '.join(map(repr, BACKENDS))}, "
                            f"got {short_repr(backend)}")
    if backend == "triton" and not q.is_cuda:
        raise AttnCallError("argument 'backend': 'triton' runs on CUDA tensors; on the CPU use "
                            "backend='triton-interpret' (Triton's interpreter) or 'torch'")
    if backend == "triton-interpret" and q.is_cuda:
        raise AttnCallError("argument 'backend': 'triton-interpret' runs on CPU tensors")
    return str(backend)


def check_arguments(pattern: BoundPattern, q, k, v, return_lse, scale, backend, tensors: dict):
    """The checks of a call that read no tensor's values (so ``torch.compile`` traces them):
    types, shapes, dtypes, devices, the backend and the scale; returns (scale, backend,
    shapes: batch, heads, kv_heads, q_len, kv_len)."""
    _check_tensors(q, k, v)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise AttnCallError(f"argument 'return_lse' must be a bool, got "
                            f"{type(return_lse).__name__} {short_repr(return_lse)}")
    shapes = check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise AttnCallError(f"tensor input '{name}' is on {t.device}, but 'q' is on {q.device}")
    backend = _check_backend(backend, q)
    return float(check_scale(scale, q.shape[-1])), backend, shapes


def run(pattern: BoundPattern, q, k, v, return_lse=False, scale=None, backend=None,
        tensors=None):
    """``pat(q, k, v, ...)`` without gradients: the backend pipeline of one call, stage by
    stage (attndsl/op.py routes calls with gradients, and traced ones, through the custom
    operator, which runs :func:`forward` and :func:`backward`)."""
    call, data = dump("bind", bind(pattern, q, k, v, return_lse, scale, backend, tensors or {}),
                      lambda cd: cd[0].describe())
    out, lse = _forward(call, data, q, k, v)
    return (out, lse) if return_lse else out


def forward(pattern: BoundPattern, q, k, v, scale: float, backend: str, tensors: dict):
    """(out, lse) of one call whose shape-level arguments are checked (the custom operator)."""
    call, data = dump("bind", bind(pattern, q, k, v, False, scale, backend, tensors),
                      lambda cd: cd[0].describe())
    return _forward(call, data, q, k, v)


def _forward(call: BoundCall, data: CallData, q, k, v):
    check_call_values(data)
    if call.backend == "torch":
        if call.pattern.uses_selectors():       # every head walks its own selected tiles
            return selected_attention(call, data, q, k, v)
        return blockwise_attention(call, data, q, k, v)
    return triton_backend.forward(call, data, q, k, v)


def backward(pattern: BoundPattern, q, k, v, scale: float, backend: str, tensors: dict, out,
             lse, dout, dlse, wanted: tuple):
    """(dq, dk, dv, {tensor input: gradient}) of one call from its forward's (out, lse) and the
    gradients flowing into them; ``wanted``: the tensor inputs to differentiate (float inputs
    read by the score clause). The call is bound again (selections are recomputed from the
    same q and k, so they are the forward's). The torch backend recomputes tile by tile
    (attndsl/torch_backward.py); the Triton backends run the generated backward kernels for
    q, k and v, and the torch tile loop for the tensor inputs' gradients."""
    call, data = bind(pattern, q, k, v, False, scale, backend, tensors)
    if call.backend == "torch":
        return tile_backward(call, data, q, k, v, out, lse, dout, dlse, tensors, wanted)
    dq, dk, dv = triton_backend.backward(call, data, q, k, v, out, lse, dout, dlse)
    grads = {}
    if wanted:
        grads = tile_backward(call, data, q, k, v, out, lse, dout, dlse, tensors, wanted,
                              qkv=False)[3]
    return dq, dk, dv, grads


def bind(pattern: BoundPattern, q, k, v, return_lse, scale, backend, tensors: dict):
    """The bind stage: every argument checked; (BoundCall, CallData)."""
    scale, backend, shapes = check_arguments(pattern, q, k, v, return_lse, scale, backend,
                                             tensors)
    batch, heads, kv_heads, q_len, kv_len = shapes
    pattern = pattern.for_sizes(q_len, kv_len, heads, kv_heads)     # reductions expanded
    # readable tensor inputs; float32 range where the kernels store them so
    tensors = call_tensor_inputs(pattern.ir, tensors, float32=backend != "torch")
    # the reference grids read q and k only to check tensor indices pair by pair, where
    # intervals cannot prove them (a selector pattern that also indexes a tensor): a host copy
    indexed = {e.value for r in pattern.ir.roots() for e in r.walk() if e.op is Op.INDEX}
    need_qk = pattern.uses_selectors() and bool(indexed)
    qn = q.detach().float().cpu().numpy().astype(np.float64) if need_qk else None
    kn = k.detach().float().cpu().numpy().astype(np.float64) if need_qk else None
    grids = call_grids(pattern, shapes, qn, kn, scale, _for_grids(indexed, tensors or {}))
    shape = CallShape(batch, heads, kv_heads, q_len, kv_len, q.shape[-1], v.shape[-1])
    call = BoundCall(pattern, shape, str(q.dtype).replace("torch.", ""), str(q.device), backend,
                     float(scale))
    # the selector tables (random_blocks' too), on the call's device (float32, no host
    # synchronisation)
    selection = selection_tables(pattern, q.detach(), k.detach(), float(scale), tensors or {}) \
        if any(r.uses(*SELECTOR_OPS) for r in pattern.ir.roots()) else {}
    return call, CallData(tensors or {}, tuple(grids), selection)


def _for_grids(indexed: set, tensors: dict) -> dict:
    """The tensor inputs as the reference grids take them (NumPy copies on the host): those
    the clauses do not index (``indexed``: the names they do), read only by selectors
    (``route``'s centroids, used on the device by codegen/selection.py, which checks them),
    become placeholders of their rank, so no tensor is read on the host."""
    return {n: (t if n in indexed or not isinstance(t, torch.Tensor) else
                np.zeros((1,) * t.dim(), dtype=np.float32 if t.is_floating_point() else
                         np.bool_ if t.dtype == torch.bool else np.int64))
            for n, t in tensors.items()}


def launches(pattern: BoundPattern, q, k, v, scale=None, tensors=None, backend=None,
             config=DEFAULT_CONFIG):
    """(launches, finish): the kernel launches a Triton call would make and the function that
    merges their results, every stage before ``launch`` done and nothing launched (for tools,
    benchmarks and tests; ``codegen.kernel.run`` runs a launch)."""
    backend = backend or ("triton" if q.is_cuda else "triton-interpret")
    call, data = bind(pattern, q, k, v, False, scale, backend, tensors or {})
    return triton_backend.prepare(call, data, q, k, v, config)


def planned_source(pattern: BoundPattern, q_len: int, kv_len: int, heads: int, kv_heads: int,
                   head_dim: int, dtype: str, tensors: dict, config=DEFAULT_CONFIG) -> str:
    """The generated modules of a call at these sizes, each under a comment with the call's plan
    (launches, grids, tile tables, gathers, merge): what ``Pattern.triton_source(q_len=...)``
    and ``attndsl emit --q-len`` show. Nothing is compiled or launched; the tile configuration
    is ``config`` (on a GPU, autotuning may choose another). Selector patterns are planned on
    random query and key vectors (seed 0)."""
    names = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in names:
        raise AttnCallError(f"argument 'dtype' must be one of {', '.join(names)}, got "
                            f"{short_repr(dtype)}")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, q_len, head_dim, generator=gen).to(names[dtype])
    k = torch.randn(1, kv_heads, kv_len, head_dim, generator=gen).to(names[dtype])
    call, data = bind(pattern, q, k, k, False, None, "triton-interpret", tensors)
    planned, sources = triton_backend.generate(call, data, q, k, config)
    parts = ["".join(f"# {line}\n" for line in planned.describe())]
    for i, (lp, text) in enumerate(zip(planned.launches, sources)):
        parts.append(f"# {'=' * 24} launch {i + 1} of {len(sources)}: {lp.kind} {'=' * 24}\n"
                     + text)
    return "\n".join(parts)


def check_call_values(data: CallData) -> None:
    """Every tensor index of the call in range, every shift count in 0..62 and every argument of
    floor/ceil/round convertible to int64, before any tile runs (section 3): proved by intervals
    in O(length) (analysis/call_checks.py), else checked pair by pair (the interpreter raises
    the located error of the first bad value)."""
    unproved = [g for g in data.grids if not call_values_proved(g)]
    if unproved:
        check_indices(unproved)
