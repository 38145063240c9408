"""The torch entry point ``pat(q, k, v, ...)`` (LANGUAGE.md section 6).

Validates every argument (shapes, GQA divisibility, head_dim, dtypes, devices, tensor inputs),
proves or checks the call's tensor indices in range, then runs a backend: ``"torch"``
(:mod:`attndsl.torch_backend`, blockwise over the analysis's tiles, differentiable) or the
generated Triton kernels (``"triton"`` on CUDA, ``"triton-interpret"`` under Triton's CPU
interpreter; :mod:`attndsl.codegen.kernel`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .analysis.intervals import indices_in_range
from .errors import AttnCallError
from .inputs import (
    call_tensor_inputs,
    check_max_length,
    check_scale,
    check_torch_tensor,
    short_repr,
)
from .reference import check_indices
from .torch_backend import blockwise_attention

BACKENDS = ("torch", "triton", "triton-interpret")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q_shape, k_shape, v_shape):
    """Validate the shapes of q [B,H,Lq,D], k [B,KVH,Lkv,D], v [B,KVH,Lkv,Dv].

    Returns (batch, heads, kv_heads, q_len, kv_len).
    """
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            raise AttnCallError(f"argument '{name}' must have 4 dimensions [batch, heads, length, "
                                f"head_dim], got shape {list(shape)}")
    check_max_length("q", q_shape[2])
    check_max_length("k", k_shape[2])
    b, h, lq, d = q_shape
    if k_shape[0] != b or v_shape[0] != b:
        raise AttnCallError(f"arguments 'q', 'k' and 'v' must have one batch size, got {b}, "
                            f"{k_shape[0]} and {v_shape[0]}")
    if k_shape[1] != v_shape[1]:
        raise AttnCallError(f"arguments 'k' and 'v' must have the same number of heads, got "
                            f"{k_shape[1]} and {v_shape[1]}")
    kvh = k_shape[1]
    if kvh < 1 or h < 1 or h % kvh:
        raise AttnCallError(f"argument 'q' has {h} heads, which must be a positive multiple of the "
                            f"{kvh} heads of 'k' and 'v' (grouped-query attention)")
    if k_shape[3] != d:
        raise AttnCallError(f"argument 'k' must have the head_dim of 'q' ({d}), got {k_shape[3]}")
    if k_shape[2] != v_shape[2]:
        raise AttnCallError(f"arguments 'k' and 'v' must have one length, got {k_shape[2]} and "
                            f"{v_shape[2]}")
    return b, h, kvh, lq, k_shape[2]


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


def _check_backend(backend, q, needs_grad: list) -> str:
    """The backend a call runs on: the given one, checked, or the default for q's device."""
    if backend is None:         # the generated kernels are forward-only for now
        return "triton" if q.is_cuda and not needs_grad else "torch"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise AttnCallError(f"argument 'backend' must be one of {', '.join(map(repr, BACKENDS))}, "
                            f"got {short_repr(backend)}")
    if backend in ("triton", "triton-interpret") and needs_grad:
        raise AttnCallError(f"argument '{needs_grad[0]}' requires grad, but backend {backend!r} "
                            "has no backward pass yet: use backend='torch' (or torch.no_grad())")
    return str(backend)


def run(pattern, q, k, v, return_lse=False, scale=None, backend=None, tensors=None):
    _check_tensors(q, k, v)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise AttnCallError(f"argument 'return_lse' must be a bool, got "
                            f"{type(return_lse).__name__} {short_repr(return_lse)}")
    shapes = check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    for name, t in (tensors or {}).items():
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise AttnCallError(f"tensor input '{name}' is on {t.device}, but 'q' is on {q.device}")
    needs_grad = [n for n, t in (("q", q), ("k", k), ("v", v))
                  if t.requires_grad and torch.is_grad_enabled()]
    backend = _check_backend(backend, q, needs_grad)
    # readable, gradient-free tensor inputs; float32 range where the kernels store them so
    tensors = call_tensor_inputs(pattern.ir, tensors or {}, float32=backend != "torch")
    if backend == "triton" and not q.is_cuda:
        raise AttnCallError("argument 'backend': 'triton' runs on CUDA tensors; on the CPU use "
                            "backend='triton-interpret' (Triton's interpreter) or 'torch'")
    if backend == "triton-interpret" and q.is_cuda:
        raise AttnCallError("argument 'backend': 'triton-interpret' runs on CPU tensors")
    scale = check_scale(scale, q.shape[-1])
    need_qk = pattern.uses_selectors()
    qn = q.detach().float().cpu().numpy().astype(np.float64) if need_qk else None
    kn = k.detach().float().cpu().numpy().astype(np.float64) if need_qk else None
    grids = pattern.grids(shapes, qn, kn, scale, tensors or {})
    # before any tile runs (section 3): proved by intervals in O(length), else pair by pair
    unproved = [g for g in grids if not indices_in_range(g)]
    if unproved:
        check_indices(unproved)
    if backend == "torch":
        with _one_thread(q.device.type == "cpu"):
            out, lse = blockwise_attention(pattern, grids, q, k, v, scale, tensors or {})
    else:
        from .codegen.kernel import forward

        out, lse = forward(pattern, q, k, v, scale, tensors or {},
                           interpret=backend == "triton-interpret", grids=grids)
    return (out, lse) if return_lse else out


@contextlib.contextmanager
def _one_thread(active: bool):
    """Run torch's CPU ops on one thread for the duration. The blockwise backend issues many
    small operations; with several OpenMP threads and a busy machine each one can wait out
    the others' spinning (measured: 7.6 s on 2 threads against 0.08 s on one for 4 x 1024^2)."""
    if not active:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
