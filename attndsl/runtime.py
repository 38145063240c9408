"""The torch entry point ``pat(q, k, v, ...)`` (LANGUAGE.md section 6).

Validates every argument (shapes, GQA divisibility, head_dim, dtypes, devices, tensor inputs),
then runs a backend. ``backend="torch"`` is the blockwise reference semantics in torch: query
tiles x key tiles with an online softmax, the mask evaluated per tile by the NumPy interpreter
(empty tiles skipped), the score clause evaluated in torch so that gradients flow through it.
Memory is O((q_len + kv_len) x block); no dense [q_len, kv_len] matrix is built.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .errors import AttnCallError
from .interp import Env, Evaluator
from .ir import Op
from .program import _scale

BACKENDS = ("torch", "triton", "triton-interpret")
BLOCK_Q = 64
BLOCK_K = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q_shape, k_shape, v_shape):
    """Validate the shapes of q [B,H,Lq,D], k [B,KVH,Lkv,D], v [B,KVH,Lkv,Dv].

    Returns (batch, heads, kv_heads, q_len, kv_len).
    """
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            raise AttnCallError(f"argument '{name}' must have 4 dimensions [batch, heads, length, "
                                f"head_dim], got shape {list(shape)}")
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


class TorchOps:
    """The interpreter's array namespace on torch tensors (for the score clause)."""

    def __init__(self, device, float_dtype):
        self.device = device
        self.float_dtype = float_dtype

    where = staticmethod(torch.where)
    minimum = staticmethod(torch.minimum)
    maximum = staticmethod(torch.maximum)
    abs = staticmethod(torch.abs)
    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    sqrt = staticmethod(torch.sqrt)
    tanh = staticmethod(torch.tanh)
    sigmoid = staticmethod(torch.sigmoid)
    power = staticmethod(torch.pow)

    def to_float(self, x):
        return x.to(self.float_dtype)

    @staticmethod
    def to_numpy(x):
        return x.detach().cpu().numpy()

    def from_numpy(self, x):
        arr = np.asarray(x)
        t = torch.as_tensor(arr, device=self.device)
        return t.to(self.float_dtype) if t.is_floating_point() else t

    @staticmethod
    def any(x) -> bool:
        return bool(x.any())


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


def run(pattern, q, k, v, return_lse=False, scale=None, backend=None, tensors=None):
    _check_tensors(q, k, v)
    shapes = check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    for name, t in (tensors or {}).items():
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise AttnCallError(f"tensor input '{name}' is on {t.device}, but 'q' is on {q.device}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend is None:         # the generated kernels are forward-only for now
        backend = "triton" if q.is_cuda and not needs_grad else "torch"
    if backend in ("triton", "triton-interpret") and needs_grad:
        raise AttnCallError(f"backend {backend!r} has no backward pass yet; q, k or v requires "
                            "grad: use backend='torch' (or torch.no_grad())")
    if backend not in BACKENDS:
        raise AttnCallError(f"argument 'backend' must be one of {', '.join(map(repr, BACKENDS))}, "
                            f"got {backend!r}")
    if backend == "triton" and not q.is_cuda:
        raise AttnCallError("backend 'triton' runs on CUDA tensors; on the CPU use "
                            "backend='triton-interpret' (Triton's interpreter) or 'torch'")
    if backend == "triton-interpret" and q.is_cuda:
        raise AttnCallError("backend 'triton-interpret' runs on CPU tensors")
    scale = _scale(scale, q.shape[-1])
    need_qk = pattern.uses_selectors()
    qn = q.detach().float().cpu().numpy().astype(np.float64) if need_qk else None
    kn = k.detach().float().cpu().numpy().astype(np.float64) if need_qk else None
    grids = pattern.grids(shapes, qn, kn, scale, tensors or {})
    if backend == "torch":
        with _one_thread(q.device.type == "cpu"):
            out, lse = blockwise_attention(grids, q, k, v, scale)
    else:
        from .analysis.intervals import indices_in_range
        from .codegen.kernel import forward
        from .reference import check_indices

        # before any kernel runs (section 3): proved by intervals in O(length), else pair by pair
        unproved = [g for g in grids if not indices_in_range(g)]
        if unproved:
            check_indices(unproved)
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


def blockwise_attention(grids, q, k, v, scale, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """Online-softmax attention over (query tile, key tile) pairs, skipping empty tiles."""
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv_index = torch.arange(heads, device=q.device) // (heads // kv_heads)
    all_heads = np.arange(heads)
    xp = TorchOps(q.device, acc_dtype)
    outs, lses = [], []
    for b, grid in enumerate(grids):
        score_indexes = grid.ir.score is not None and grid.ir.score.uses(Op.INDEX)
        kb = k[b].index_select(0, kv_index).to(acc_dtype)
        vb = v[b].index_select(0, kv_index).to(acc_dtype)
        qb = q[b].to(acc_dtype)
        row_outs, row_lses = [], []
        for r0 in range(0, q_len, block_q):
            rows = np.arange(r0, min(q_len, r0 + block_q))
            m_i = torch.full((heads, len(rows)), -torch.inf, dtype=acc_dtype, device=q.device)
            l_i = torch.zeros_like(m_i)
            acc = torch.zeros((heads, len(rows), v.shape[-1]), dtype=acc_dtype, device=q.device)
            for c0 in range(0, kv_len, block_k):
                cols = np.arange(c0, min(kv_len, c0 + block_k))
                mask_np = grid.mask(all_heads, rows, cols)
                if not mask_np.any():
                    if score_indexes:
                        # an index out of range is an error wherever the reference evaluates it,
                        # skipped tiles included (the score clause is defined at every pair)
                        grid.score(all_heads, rows, cols, np.zeros((heads, len(rows), len(cols))))
                    continue
                mask = torch.as_tensor(np.array(mask_np, dtype=bool), device=q.device)
                s = scale * (qb[:, r0:r0 + len(rows)] @ kb[:, c0:c0 + len(cols)].transpose(-1, -2))
                s = _score(grid, xp, all_heads, rows, cols, s)
                allowed = mask & (s != -torch.inf)
                s = torch.where(allowed, s, -torch.inf)
                m_new = torch.maximum(m_i, s.amax(dim=-1))
                safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                alpha = torch.where(torch.isfinite(m_i), torch.exp(m_i - safe), torch.zeros_like(m_i))
                p = torch.where(allowed, torch.exp(s - safe[..., None]), torch.zeros_like(s))
                l_i = l_i * alpha + p.sum(dim=-1)
                acc = acc * alpha[..., None] + p @ vb[:, c0:c0 + len(cols)]
                m_i = m_new
            has = l_i > 0
            denom = torch.where(has, l_i, torch.ones_like(l_i))
            row_outs.append(torch.where(has[..., None], acc / denom[..., None], torch.zeros_like(acc)))
            row_lses.append(torch.where(has, m_i + torch.log(denom), torch.full_like(m_i, -torch.inf)))
        if q_len:
            outs.append(torch.cat(row_outs, dim=1))
            lses.append(torch.cat(row_lses, dim=1))
        else:
            outs.append(q.new_zeros((heads, 0, v.shape[-1]), dtype=acc_dtype))
            lses.append(q.new_zeros((heads, 0), dtype=acc_dtype))
    out = torch.stack(outs).to(q.dtype)
    lse = torch.stack(lses).to(torch.float32 if acc_dtype == torch.float32 else acc_dtype)
    return out, lse


def _score(grid, xp, heads, rows, cols, s0):
    if grid.ir.score is None:
        return s0
    numpy_env = grid.env(heads, rows, cols)
    env: Env = grid.env(heads, rows, cols, score=s0, xp=xp)
    with np.errstate(all="ignore"):
        value = Evaluator(env, delegate=Evaluator(numpy_env)).sub(grid.ir.score)
    if not isinstance(value, torch.Tensor):
        value = xp.from_numpy(value)
    return torch.broadcast_to(value.to(s0.dtype), s0.shape)
