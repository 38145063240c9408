"""The launch and merge stages of the Triton backend.

Input: a :class:`codegen.plan.LaunchPlan`, the module compiled from its generated source
(codegen/emit.py, codegen/cache.py) and the call's tensors. Output: :class:`~codegen.args.Launch`
(:func:`bind_launch`: the grid, arguments, constants and options of the skeleton ``attn_fwd``),
its result (:func:`run`: out, lse) and the result of the call (:func:`finish`: one launch's
result, or the log-sum-exp merge of a gathered call's launches, :func:`merge`).
"""

from __future__ import annotations

import torch

from attndsl.call import acc_dtype

from .args import Launch, tensor_args
from .config import Config, padded


def bind_launch(lp, module, q, k, v, scale: float, given: dict, config: Config,
                interpret: bool) -> Launch:
    """The launch of one planned launch; its output tensors are ``args[3]`` (in q's dtype, or
    the accumulation dtype when the launch is merged) and ``args[4]`` (lse)."""
    batch, heads, q_len, d = q.shape
    kv_heads, kv_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    dev, tiles = q.device, lp.tiles
    out = torch.empty((batch, heads, q_len, dv), dtype=acc_dtype(q.dtype) if lp.wide_out
                      else q.dtype, device=dev)
    lse = torch.empty((batch, heads, q_len), dtype=acc_dtype(q.dtype), device=dev)
    has_score = lp.pattern.ir.score is not None

    def strides(t):         # (batch, group, head, query tile); 0 where a table broadcasts
        return [0 if n == 1 else st for n, st in zip(t.shape[:4], t.stride()[:4])]

    redo = torch.empty(tiles.n_query_tiles * batch * heads * tiles.n_groups, dtype=torch.int8,
                       device=dev)
    args = [q, k, v, out, lse, redo,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0), lse.stride(1),
            q_len, kv_len, heads, kv_heads, float(scale), tiles.n_query_tiles,
            tiles.groups, tiles.full_num, tiles.full_idx, tiles.part_num, tiles.part_idx,
            *strides(tiles.full_num), *strides(tiles.full_idx),
            *tensor_args(lp.pattern, given, lp.derived_values, dev)]
    mask_fn = module.mask_hook32 if lp.narrow else module.mask_hook
    score_fn = (module.score_hook32 if lp.narrow else module.score_hook) if has_score else mask_fn
    constants = dict(MASK_FN=mask_fn, SCORE_FN=score_fn,
                     HAS_SCORE=has_score, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                     D=d, DV=dv, D_PAD=padded(d), DV_PAD=padded(dv), NATIVE_DOT=not interpret,
                     STEP_Q=tiles.step_q, STEP_K=tiles.step_k, BAND=tiles.band,
                     EVEN_N=tiles.even_keys(config.block_n), RUN_K=tiles.run_k, SAFE_V=False)
    return Launch(lp.grid, args, constants,
                  dict(num_warps=config.num_warps, num_stages=config.num_stages),
                  module.attn_fwd)


def run(launch: Launch, interpret: bool):
    """Launch the skeleton, then again with ``SAFE_V``: the programs whose rows met a
    non-finite value redo them reading V at allowed keys only, the others exit at once (on a
    GPU always launched, so nothing waits for the host; under the interpreter, whose launches
    cost per program, only when a flag is set). Returns (out, lse)."""
    out, lse, redo = launch.args[3], launch.args[4], launch.args[5]
    if out.shape[2] and launch.grid[0]:
        kernel = launch.kernel[launch.grid]
        kernel(*launch.args, **launch.constants, **launch.options)
        if not interpret or bool(redo.any()):
            kernel(*launch.args, **{**launch.constants, "SAFE_V": True}, **launch.options)
    return out, lse


def merge(parts: list, dtype: torch.dtype):
    """One attention result from results over disjoint key sets: the softmax of the union is
    the lse-weighted sum of the parts (fp32, fp64 for float64), and its lse their log-sum-exp.

    Non-finite values as one launch gives them: an lse of NaN or +inf in any part makes the
    row NaN (lse NaN wins over +inf, as logsumexp gives); a part with allowed keys adds its
    infinite output entries even when its weight underflows (weights are floored at the
    smallest normal number, far below one ulp of the sum)."""
    wide = acc_dtype(dtype)
    lses = torch.stack([lse.to(wide) for _, lse in parts])
    lse = torch.logsumexp(lses, dim=0)
    finite = torch.isfinite(lse)
    weights = torch.where(finite, torch.exp(lses - torch.where(finite, lse, 0.0)), 0.0)
    weights = torch.where(lses > -torch.inf, weights.clamp_min(torch.finfo(wide).tiny), 0.0)
    out = sum(w[..., None] * o.to(wide) for w, (o, _) in zip(weights, parts))
    out = torch.where((torch.isnan(lse) | (lse == torch.inf))[..., None], torch.nan, out)
    return out.to(dtype), lse


def finish(results: list, dtype: torch.dtype):
    """The call's (out, lse) from its launches' results: the only one, or their merge."""
    return results[0] if len(results) == 1 else merge(results, dtype)
