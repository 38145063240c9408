"""The backward pass of the Triton backend: gradients of one call, FlashAttention-2 style.

Input: the forward's :class:`~codegen.plan.Plan` (the same analysis, tile configuration and
tile tables: codegen/backend.py ``backward`` runs the forward's analyse, plan and generate
stages), the modules compiled from its sources (they hold the backward skeleton,
codegen/skeleton_bwd.py, next to the forward's), the call's q, k, v, the forward's *final*
out and lse (merged over launches), the gradient ``dout`` of out and ``dlse`` of lse (None when
lse is unused). Output: (dq, dk, dv) in the dtypes of q, k, v.

    transpose  each launch's tile tables by key tile    :func:`key_side`        DeviceTiles
    bind       preprocess, then per launch dQ, dK/dV    :func:`bind_backward`   [Launch]
    run        the kernels, in order                    :func:`run`
    reduce     sums of the partial gradients            :func:`reduce`          (dq, dk, dv)

Every launch uses the final lse and ``Dm = rowsum(dO * O) - dlse``, so ``P = exp(score -
lse)`` is exactly that launch's share of the softmax and the launches' gradients add up. Each
output element is written by one program once: dQ rows by the program of their query tile and
group (the groups of a launch hold disjoint query rows); dK/dV rows by the program of their key
tile and group, into one buffer when the host proves the groups' key rows disjoint
(:func:`disjoint_keys`), else into one slice per group; per-launch and per-group partials are
summed with torch in a fixed order. No atomics: repeated runs are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from attndsl.caches import LRUCache
from attndsl.derivative import is_identity_derivative, score_derivative
from attndsl.errors import AttnCallError

from . import gather, narrow
from .args import Launch, tensor_args
from .config import launch_grid, padded
from .tables import with_tables
from .tile_tables import DeviceTiles, transposed

TRANSPOSED = LRUCache("codegen.key_side", 32)      # (call, config, switches, launch) -> tables


@dataclass(frozen=True)
class Buffers:
    """The partial gradients the launches write (fp32): ``dq`` one [B, H, Lq, D] per launch,
    ``dk`` / ``dv`` one [G or 1, B, KVH, Lkv, D / Dv] per launch."""

    dq: tuple
    dk: tuple
    dv: tuple


def zero_grads(q, k, v):
    """(dq, dk, dv) of a call with no output row or no key: zeros."""
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def n_key_tiles(tiles: DeviceTiles, block_n: int) -> int:
    """Key tiles per row of a launch's tables: those of its classes, else enough for the
    longest group (reads the groups back from the device)."""
    if tiles.classes is not None:
        return tiles.classes.shape[-1]
    counts = tiles.key_counts or tuple(int(n) for n in tiles.groups[:, 3].cpu())
    return max(1, -(-max(counts) // block_n))


def disjoint_keys(groups, step_k: int, run_k: int, kv_len: int) -> bool:
    """Whether no key row belongs to two groups (rows ``k_row0 + step_k * (j // run_k) + j %
    run_k``, ``j`` < key count, inside [0, kv_len)): then the dK/dV programs of different groups
    never write the same row."""
    rows = np.asarray(groups, dtype=np.int64).reshape(-1, 4)
    if len(rows) <= 1:
        return True
    seen = np.zeros(kv_len, dtype=np.int64)
    for _q0, _nq, k0, nk in rows:
        j = np.arange(nk, dtype=np.int64)
        cols = gather.key_rows(k0, step_k, run_k, j)
        cols = cols[(cols >= 0) & (cols < kv_len)]
        np.add.at(seen, cols, 1)
    return bool((seen <= 1).all())


def key_side(planned, index: int, static: bool) -> tuple[DeviceTiles, int]:
    """(transposed tables, dK/dV slices) of launch ``index``: the slices are 1 when its groups'
    key rows are disjoint, else one per group. Kept per call when ``static`` (its tables read no
    data, as the plan's)."""
    lp = planned.launches[index]
    tiles, kv_len = lp.tiles, planned.call.shape.kv_len

    def compute():
        disjoint = tiles.n_groups == 1 or disjoint_keys(tiles.groups.cpu().numpy(),
                                                        tiles.step_k, tiles.run_k, kv_len)
        return (transposed(tiles, n_key_tiles(tiles, planned.config.block_n)),
                1 if disjoint else tiles.n_groups)

    if not static:
        return compute()
    key = (planned.call.key, planned.config, gather.enabled(), narrow.enabled(), index)
    return TRANSPOSED.get(key, compute)


def _strides(t: torch.Tensor) -> list:
    """(batch, group, head, tile) strides of a tile table; 0 where it broadcasts."""
    return [0 if n == 1 else st for n, st in zip(t.shape[:4], t.stride()[:4])]


def _hooks(lp, module) -> dict:
    """The hook constants of one launch: mask, score and the score's derivative (int32 forms
    when the launch is narrow); HAS_SCORE_GRAD is False when the derivative is 1."""
    mask_fn = module.mask_hook32 if lp.narrow else module.mask_hook
    score_ir = with_tables(lp.pattern)[1]
    has_score = lp.pattern.ir.score is not None and score_ir is not None
    has_grad = has_score and not is_identity_derivative(
        score_derivative(score_ir, dict(lp.pattern.values)))
    score_fn = (module.score_hook32 if lp.narrow else module.score_hook) if has_score else mask_fn
    grad_fn = mask_fn
    if has_grad:
        grad_fn = getattr(module, "score_grad_hook32" if lp.narrow else "score_grad_hook", None)
        if grad_fn is None:
            raise AttnCallError(f"pattern '{lp.pattern.name}': the generated module has no "
                                "derivative hook for its score clause")
    return dict(MASK_FN=mask_fn, SCORE_FN=score_fn, SCORE_GRAD_FN=grad_fn,
                HAS_SCORE=has_score, HAS_SCORE_GRAD=has_grad)


def bind_backward(planned, modules, data, q, k, v, out, lse, dout, dlse, interpret: bool,
                  static: bool = False):
    """The launches of the backward pass (preprocess first, then per forward launch its dQ and
    its dK/dV launch) and ``finish()`` giving (dq, dk, dv) once they have run. ``static``: the
    call's tables read no data, so the transposed tables are kept per call."""
    config = planned.config
    batch, heads, q_len, d = q.shape
    kv_heads, kv_len, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
    dev = q.device
    lse = lse.contiguous()
    dm = torch.empty((batch, heads, q_len), dtype=torch.float32, device=dev)
    has_dlse = dlse is not None
    dlse_t = dlse.contiguous() if has_dlse else dm
    native = (not interpret) and q.dtype in (torch.float16, torch.bfloat16)
    common = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, D=d, DV=dv_dim,
                  D_PAD=padded(d), DV_PAD=padded(dv_dim), NATIVE_DOT=native)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    n_qt = -(-q_len // config.block_m)
    launches = [Launch(
        (n_qt * batch * heads, 1, 1),
        [out, dout, dlse_t, dm, *out.stride(), *dout.stride(), dm.stride(0), dm.stride(1),
         q_len, heads, n_qt],
        dict(HAS_DLSE=has_dlse, BLOCK_M=config.block_m, DV=dv_dim, DV_PAD=padded(dv_dim)),
        options, modules[0].attn_bwd_preprocess)]
    dqs, dks, dvs = [], [], []
    head = [q, k, v, dout, lse, dm]
    sizes = [*q.stride(), *k.stride(), *v.stride(), *dout.stride(), dm.stride(0), dm.stride(1)]
    for index, (lp, module) in enumerate(zip(planned.launches, modules)):
        tiles = lp.tiles
        hooks = _hooks(lp, module)
        slots = tensor_args(lp.pattern, data.tensors, lp.derived_values, dev)
        steps = dict(STEP_Q=tiles.step_q, STEP_K=tiles.step_k, RUN_K=tiles.run_k)
        dq = torch.zeros((batch, heads, q_len, d), dtype=torch.float32, device=dev)
        launches.append(Launch(
            lp.grid,
            [*head, dq, *sizes, *dq.stride(), q_len, kv_len, heads, kv_heads,
             float(planned.call.scale), tiles.n_query_tiles,
             tiles.groups, tiles.full_num, tiles.full_idx, tiles.part_num, tiles.part_idx,
             *_strides(tiles.full_num), *_strides(tiles.full_idx), *slots],
            dict(**hooks, **common, **steps, BAND=tiles.band), options, module.attn_bwd_dq))
        tt, slices = key_side(planned, index, static)
        dk = torch.zeros((slices, batch, kv_heads, kv_len, d), dtype=torch.float32, device=dev)
        dv = torch.zeros((slices, batch, kv_heads, kv_len, dv_dim), dtype=torch.float32,
                         device=dev)
        group_k, group_v = (0, 0) if slices == 1 else (dk.stride(0), dv.stride(0))
        launches.append(Launch(
            launch_grid(tt.n_query_tiles, batch * kv_heads, tt.n_groups),
            [*head, dk[0], dv[0], *sizes, group_k, *dk.stride()[1:], group_v, *dv.stride()[1:],
             q_len, kv_len, heads, kv_heads, float(planned.call.scale), tt.n_query_tiles,
             tt.groups, tt.full_num, tt.full_idx, tt.part_num, tt.part_idx,
             *_strides(tt.full_num), *_strides(tt.full_idx), *slots],
            dict(**hooks, **common, **steps, BAND=tt.band), options, module.attn_bwd_dkdv))
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
    return launches, partial(reduce, Buffers(tuple(dqs), tuple(dks), tuple(dvs)),
                             (q.dtype, k.dtype, v.dtype))


def run(launch: Launch) -> None:
    """Run one backward launch (its outputs are its buffers)."""
    if launch.grid[0] and launch.grid[1]:
        launch.kernel[launch.grid](*launch.args, **launch.constants, **launch.options)


def reduce(buffers: Buffers, dtypes) -> tuple:
    """(dq, dk, dv): the launches' partials (and a launch's per-group slices) summed in a fixed
    order, in the dtypes of q, k, v."""
    dq = buffers.dq[0]
    for part in buffers.dq[1:]:
        dq = dq + part
    dk = sum(part.sum(0) for part in buffers.dk)
    dv = sum(part.sum(0) for part in buffers.dv)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])
