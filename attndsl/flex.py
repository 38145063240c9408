"""Export a pattern to PyTorch's FlexAttention: ``pat.to_flex(q, k, ...)``.

Input: a :class:`~attndsl.bound.BoundPattern`, the call's ``q`` ``[B, H, q_len, D]`` and ``k``
``[B, KVH, kv_len, D]`` (torch tensors, one dtype, one device), Flex's ``BLOCK_SIZE`` (an int
or a pair ``(Q, KV)``), an optional softmax scale and the tensor inputs. Output:
:class:`FlexExport` whose ``block_mask``, ``mask_mod`` and ``score_mod`` make
``flex_attention(q, k, v, score_mod=fx.score_mod, block_mask=fx.block_mask, scale=fx.scale,
enable_gqa=fx.enable_gqa)`` compute ``pat(q, k, v, scale=fx.scale, **tensor_inputs)`` (finite
inputs; a row with no allowed key gives 0 in both).

How, stage by stage (every stage is the torch backend's own):

* bind: the call is checked and bound as ``pat(q, k, k, backend="torch")`` would be
  (attndsl/runtime.py: shapes, GQA, tensor inputs and their batch dimension, reductions
  expanded at the call's sizes, the selection of a selector pattern computed from ``q`` and
  ``k`` on their device); its tensor indices, shift counts and float-to-int arguments are
  proved or checked valid (``runtime.check_call_values``), because the generated functions
  clamp indices rather than fail.
* analyse: the tile classes at ``BLOCK_SIZE`` (codegen/plan.py ``analyse``, on the host for
  static patterns and tensor inputs — ``attndsl.analysis`` — and from the selection on the
  device for selector patterns, codegen/select_tiles.py). Nothing evaluates the mask per pair.
* lists: full tiles become Flex's full blocks (``mask_mod`` skipped), partial tiles its
  partial blocks, empty tiles are in no list; ``BlockMask.from_kv_blocks`` with the call's
  ``seq_lengths`` (lengths need not be multiples of the block). The batch (head) dimension is
  1, broadcast, when the analysis gives every batch row (head) the same classes.
* mods: the pattern's generated torch module (codegen/torch_lower.py, selectors read as derived
  tables, codegen/tables.py) wrapped for Flex's ``(b, h, q_idx, kv_idx)``: ``q_idx`` is
  top-left, so the contract's bottom-right position is ``q_idx + kv_len - q_len``; ``kv_idx``
  is ``k``; ``h`` the query head; positions become int64; a tensor input (or selector table)
  with a batch dimension is read at row ``b``. ``score_mod`` is None without a score clause.

Invariants: the block lists are sound (a full block has every in-range pair allowed, an
unlisted one none), so Flex's block-sparse kernels and its dense reference agree; the mods are
plain torch functions of 0-d tensors, traceable by ``torch.vmap`` and ``torch.compile``. The
export holds the call's data (tensor inputs, the selection): a selector pattern's export must
be rebuilt for every call's ``q`` and ``k``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask

from .blocks import tile_shape
from .bound import BoundPattern
from .call import acc_dtype
from .codegen.plan import analyse
from .codegen.tile_tables import index_lists
from .codegen.torch_lower import torch_hooks
from .errors import AttnCallError
from .inputs import short_repr
from .runtime import bind, check_call_values
from .torch_backend import hook_args

DEFAULT_BLOCK_SIZE = 128        # Flex's default sparse block size


@dataclass(frozen=True)
class FlexExport:
    """What ``flex_attention`` takes to compute a pattern's call (see the module).

    ``classes``: the tile classes the block mask was built from, int8 ``[B or 1, H or 1, nQB,
    nKB]`` (0 empty, 1 partial, 2 full) on the call's device."""

    block_mask: BlockMask
    mask_mod: Callable
    score_mod: Callable | None
    enable_gqa: bool
    scale: float | None
    classes: torch.Tensor

    @property
    def kwargs(self) -> dict:
        """The keyword arguments of ``flex_attention(q, k, v, **fx.kwargs)``."""
        return {"score_mod": self.score_mod, "block_mask": self.block_mask,
                "scale": self.scale, "enable_gqa": self.enable_gqa}


def flex_block(size) -> tuple[int, int]:
    """``BLOCK_SIZE`` as (Q, KV): an int for both, or a pair of positive ints."""
    scalar = isinstance(size, (int, np.integer)) and not isinstance(size, (bool, np.bool_))
    try:
        return tile_shape((size, size) if scalar else size)
    except AttnCallError:
        raise AttnCallError(f"argument 'BLOCK_SIZE' must be a positive int or a pair (Q, KV) "
                            f"of positive ints, got {short_repr(size)}") from None


def to_flex(pattern: BoundPattern, q, k, block_size=DEFAULT_BLOCK_SIZE, scale=None,
            tensors: dict | None = None) -> FlexExport:
    """The FlexAttention export of one call of ``pattern`` (see the module)."""
    block = flex_block(block_size)
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        bad = "q" if not isinstance(q, torch.Tensor) else "k"
        raise AttnCallError(f"to_flex(): argument '{bad}' must be a torch.Tensor, got "
                            f"{type(q if bad == 'q' else k).__name__}")
    call, data = bind(pattern, q, k, k, False, scale, "torch", dict(tensors or {}))
    check_call_values(data)
    s = call.shape
    if s.q_len == 0 or s.kv_len == 0:
        raise AttnCallError(f"to_flex(): FlexAttention needs q_len and kv_len of at least 1, "
                            f"got q_len={s.q_len}, kv_len={s.kv_len}")
    classes = _classes(call, data, block, q.device)
    full_num, full_idx = index_lists(classes == 2, classes.shape[-1])
    part_num, part_idx = index_lists(classes == 1, classes.shape[-1])
    mask_mod, score_mod = _mods(call, data, q.device)
    block_mask = BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx,
                                          BLOCK_SIZE=block, mask_mod=mask_mod,
                                          seq_lengths=(s.q_len, s.kv_len))
    return FlexExport(block_mask, mask_mod, score_mod, s.heads != s.kv_heads, scale, classes)


def _classes(call, data, block, device) -> torch.Tensor:
    """The call's tile classes int8 [B or 1, H or 1, nQB, nKB] on ``device``."""
    launch = analyse(call, data, block, gathers=False, host=True).launches[0]
    if launch.kind == "select":
        return launch.selected.classes.to(device)
    maps = list(launch.maps)                # per batch row [H or 1, nQB, nKB]
    if all(m is maps[0] for m in maps):
        maps = maps[:1]
    heads = max(m.shape[0] for m in maps)
    stacked = np.stack([np.broadcast_to(m, (heads,) + m.shape[1:]) for m in maps])
    return torch.as_tensor(np.ascontiguousarray(stacked, dtype=np.int8), device=device)


def _batched(call, data, hooks) -> set:
    """The tensor slots with a batch dimension of more than one row (read at Flex's ``b``)."""
    out = set()
    for name in hooks.slots:
        if name in hooks.derived:
            if hooks.derived[name].batched and call.shape.batch > 1:
                out.add(name)
            continue
        rank = call.pattern.ir.param(name).type.rank
        shape = tuple(data.tensors[name].shape)
        if len(shape) == rank + 1 and shape[0] > 1:
            out.add(name)
    return out


def _mods(call, data, device) -> tuple[Callable, Callable | None]:
    """(mask_mod, score_mod or None): the generated module wrapped for Flex."""
    s = call.shape
    hooks = torch_hooks(call.pattern)
    module = hooks.module
    names = sorted(hooks.slots, key=hooks.slots.get)
    batched = _batched(call, data, hooks)
    wide = acc_dtype(getattr(torch, call.dtype))
    rows = [hook_args(call.pattern, data, b, device, wide)
            for b in range(s.batch if batched else 1)]
    # per slot: (tensor, whether it has a batch dimension read at b), for mask and score
    mask_t = tuple(_slot(rows, 1, i, n in batched) for i, n in enumerate(names))
    score_t = tuple(_slot(rows, 2, i, n in batched) for i, n in enumerate(names))
    sizes = tuple(torch.tensor(n, dtype=torch.int64, device=device)
                  for n in (s.q_len, s.kv_len, s.heads, s.kv_heads))
    offset = s.kv_len - s.q_len

    def positions(b, h, q_idx, kv_idx):
        return (q_idx.to(torch.int64) + offset, kv_idx.to(torch.int64), h.to(torch.int64))

    def mask_mod(b, h, q_idx, kv_idx):
        qpos, kpos, hh = positions(b, h, q_idx, kv_idx)
        return module.mask(qpos, kpos, hh, *sizes, torch.float64, *_read(mask_t, b))

    if not hasattr(module, "score"):
        return mask_mod, None

    def score_mod(score, b, h, q_idx, kv_idx):
        qpos, kpos, hh = positions(b, h, q_idx, kv_idx)
        out = module.score(score, qpos, kpos, hh, *sizes, score.dtype, *_read(score_t, b))
        return out.to(score.dtype)

    return mask_mod, score_mod


def _slot(rows, which: int, i: int, batched: bool):
    """(tensor, batched) of slot ``i`` from :func:`hook_args` rows (1: mask, 2: score)."""
    if not batched:
        return rows[0][which][i], False
    return torch.stack([r[which][i] for r in rows]), True


def _read(slots, b) -> list:
    return [t[b] if batched else t for t, batched in slots]
