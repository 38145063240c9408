"""The torch backend on a selector call: every head walks its own selected key tiles.

Input: a :class:`~attndsl.call.BoundCall` whose pattern uses selectors, its
:class:`~attndsl.call.CallData` (the selection on the call's device), q [B, H, Lq, D] and k/v
[B, KVH, Lkv, D/Dv]. Output: (out [B, H, Lq, Dv] in q's dtype, lse [B, H, Lq]), as
:func:`attndsl.torch_backend.blockwise_attention`, which it falls back to for what it does not
take (non-finite q, k or v, or a row whose scores reach NaN or +inf) and where the heads' lists
are alike (:func:`_heads_differ`).

Heads select different key blocks, so a walk over key tiles shared by every head (the plan of
codegen/torch_plan.py) visits the union of their selections. Here the analysis's tile classes
of the call (codegen/select_tiles.py: the static part united with the selection, at the tile of
:func:`~attndsl.codegen.torch_plan.selection_block`) give each (head, tile of query rows) its
lists of full and partial key tiles. A group of consecutive tiles of rows gathers each head's
listed key and value tiles (``index_select``; GQA: from the head's key/value head) into one
[H, tiles, keys, D] block and scores it in one batched step — torch's fused CPU attention
operator where the pattern has no score clause (without a mask when every listed key is allowed,
else with the step's mask materialised), else matmuls, the generated score and an exact
softmax. The mask is evaluated on the partial tiles only, as the pattern with the selectors that
are constant on those tiles substituted (the diagonal tile of a causal selection reads no
table); full tiles' keys are allowed outright and empty tiles are in no list. A step holds at
most :data:`STEP_ELEMENTS` scores (a longer list is split, the parts merged by log-sum-exp), so
memory stays bounded per step, never [q_len, kv_len].
"""

from __future__ import annotations

import numpy as np
import torch

from .call import BoundCall, CallData, acc_dtype
from .codegen import torch_plan
from .codegen.select_tiles import constant_atoms, with_constants
from .dump import dump
from .torch_backend import FUSED, all_finite, blockwise_attention, fused_engine, hook_args

NEG_INF = float("-inf")
# elements of one step's [heads, tiles of rows, rows, keys] block of scores or mask values
# (float32: 4 MiB): steps over several tiles of rows amortise each torch call's overhead
STEP_ELEMENTS = 1 << 20


def selected_attention(call: BoundCall, data: CallData, q, k, v):
    """(out, lse) of a selector call (see the module)."""
    s = call.shape
    if s.batch == 0 or s.q_len == 0 or not all_finite(v):
        return blockwise_attention(call, data, q, k, v)
    block = torch_plan.selection_block(call.pattern, s.q_len, s.kv_len)
    analysis = dump("analysis", torch_plan.analyse(call, data, block=block),
                    lambda a: a.describe())
    launch = analysis.launches[0]
    fused = fused_engine(call, q, k)
    if _heads_differ(launch.maps) and (fused or (all_finite(q) and all_finite(k))):
        dump("plan", analysis, lambda a: _describe(a.block, launch.maps[0]))
        done = _Walk(call, data, q, k, v, analysis.block, fused, launch.selected).run(
            launch.maps)
        if done is not None:
            return done
    return blockwise_attention(call, data, q, k, v)     # its own analysis, at its own tile


def _heads_differ(maps) -> bool:
    """Whether the heads' tile lists differ enough for the gathered walk: their own tiles are
    fewer than 3/4 of what the plan's walk over every head's union would visit (heads that
    select alike, or nearly every block, are walked faster as contiguous slices)."""
    own = union = 0
    for classes in {id(m): m for m in maps}.values():
        kept = classes != 0
        own += int(kept.sum())
        union += int(kept.any(axis=0).sum()) * kept.shape[0]
    return own < 0.75 * union


def _describe(block, classes: np.ndarray) -> str:
    kept = (classes != 0).sum(axis=-1)
    return (f"torch backend: selection walk, tile {block[0]}x{block[1]}, per head its own key "
            f"tiles (batch row 0: {int((classes == 2).sum())} full and "
            f"{int((classes == 1).sum())} partial tiles of {classes.size}; "
            f"widest row {int(kept.max(initial=0))} key tiles)")


class _Walk:
    """One selector call on the gathered walk."""

    def __init__(self, call: BoundCall, data: CallData, q, k, v, block, fused: bool,
                 selected=None):
        s = call.shape
        self.call, self.data, self.s = call, data, s
        self.selected = selected
        self.q, self.k, self.v = q, k, v
        self.bq, self.bk = block
        self.fused = fused
        self.wide = acc_dtype(q.dtype)
        dev = q.device
        self.h = torch.arange(s.heads, device=dev).view(-1, 1, 1, 1)
        self.kv_of = torch.arange(s.heads, device=dev) // (s.heads // s.kv_heads)
        self.sizes = tuple(torch.tensor(n, dtype=torch.int64, device=dev)
                           for n in (s.q_len, s.kv_len, s.heads, s.kv_heads))
        self._scratch = None

    def run(self, maps):
        """(out, lse), or None when a row's scores are not finite (the caller falls back)."""
        outs, lses = [], []
        for b in range(self.s.batch):
            done = self.element(b, torch.as_tensor(np.asarray(maps[b]), device=self.q.device))
            if done is None:
                return None
            outs.append(done[0])
            lses.append(done[1])
        return torch.stack(outs).to(self.q.dtype), torch.stack(lses)

    def element(self, b: int, classes):
        """(out [H, Lq, Dv], lse [H, Lq]) of batch element ``b`` with its classes [H or 1,
        nQT, nKT]: tiles of rows in groups of similar list widths, one step per group."""
        s, bq, bk, wide = self.s, self.bq, self.bk, self.wide
        classes = classes.expand(s.heads, *classes.shape[1:])
        n_qt, n_kt = classes.shape[1:]
        module, mask_t, score_t = hook_args(self.call.pattern, self.data, b, self.q.device, wide)

        def tiles(x, n, size):      # [G, n, size, D]: rows padded to n tiles of ``size``
            x = x.to(wide)          # (a copy only where the type or the length needs one)
            if n * size != x.shape[1]:
                x = torch.nn.functional.pad(x, (0, 0, 0, n * size - x.shape[1]))
            return x.reshape(x.shape[0], n, size, x.shape[-1])

        keys, values = tiles(self.k[b], n_kt, bk), tiles(self.v[b], n_kt, bk)
        queries = tiles(self.q[b], n_qt, bq)                            # [H, nQT, BQ, D]
        lists = []              # per class: (counts [H, nQT], ascending tiles first, widths)
        for cls in (2, 1):
            sel = classes == cls
            counts = sel.sum(-1)
            lists.append((counts, torch.argsort((~sel).to(torch.int8), dim=-1, stable=True),
                          counts.amax(0).tolist()))
        out = torch.zeros((s.heads, n_qt, bq, self.v.shape[-1]), dtype=wide,
                          device=self.q.device)
        lse = torch.full((s.heads, n_qt, bq), NEG_INF, dtype=wide, device=self.q.device)
        (n_full, full, full_w), (n_part, part, part_w) = lists
        for i0, i1 in _groups(full_w, part_w, s.heads * bq * bk, STEP_ELEMENTS):
            wf, wp = max(full_w[i0:i1]), max(part_w[i0:i1])
            part_tiles = (part[:, i0:i1, :wp], n_part[:, i0:i1])
            mask = (module, mask_t)
            if wp and self.selected is not None:
                mask = self.partial_mask(b, i0, i1, part_tiles, mask)
            done = self.group(i0, i1, queries[:, i0:i1],
                              (full[:, i0:i1, :wf], n_full[:, i0:i1]), part_tiles,
                              keys, values, *mask, score_t, module)
            if done is None:
                return None
            out[:, i0:i1], lse[:, i0:i1] = done
        return (out.view(s.heads, n_qt * bq, -1)[:, :s.q_len],
                lse.view(s.heads, n_qt * bq)[:, :s.q_len])

    def partial_mask(self, b, i0, i1, part, default):
        """(module, mask tensors) deciding the listed partial tiles of rows ``i0 .. i1 - 1``:
        the pattern with the selectors that are constant on all of them substituted (a partial
        tile on the diagonal of a causal selection reads no selector table), else
        ``default``."""
        idx, counts = part
        listed = torch.arange(idx.shape[2], device=idx.device) < counts[..., None]
        rows = torch.arange(i0, i1, device=idx.device).view(1, -1, 1)
        heads = torch.arange(idx.shape[0], device=idx.device).view(-1, 1, 1)

        def at_tiles(state):        # [H or 1, nQT, nKT] -> [H, G, Wp], unlisted slots True
            got = state[heads.clamp(max=state.shape[0] - 1), rows, idx.to(torch.int64)]
            return got | ~listed

        chosen = constant_atoms(self.selected, b, at_tiles)
        if not chosen:
            return default
        fixed = with_constants(self.call.pattern, chosen)
        module, mask_t, _ = hook_args(fixed, self.data, b, self.q.device, self.wide)
        return module, mask_t

    def group(self, i0, i1, qt, full, part, keys, values, mask_module, mask_t, score_t,
              module):
        """(out [H, G, BQ, Dv], lse [H, G, BQ]) of the tiles of rows ``i0 .. i1 - 1`` (queries
        ``qt`` [H, G, BQ, D]) over each head's listed full and partial key tiles (``full``,
        ``part``: tiles [H, G, W] of which the first ``counts`` [H, G] are listed); the mask is
        evaluated on the partial ones only. Steps of at most ``STEP_ELEMENTS`` scores."""
        s, bq, bk = self.s, self.bq, self.bk
        heads, n_tiles = qt.shape[:2]
        qpos = (torch.arange(i0 * bq, i1 * bq, device=qt.device).view(1, n_tiles, bq, 1)
                + (s.kv_len - s.q_len))
        slots = torch.cat([full[0], part[0]], dim=2)                    # [H, G, Wf + Wp]
        width_full = full[0].shape[2]
        listed = torch.cat([torch.arange(t.shape[2], device=t.device) < n[..., None]
                            for t, n in (full, part)], dim=2)
        per_slot = heads * n_tiles * bq * bk
        step_slots = max(1, STEP_ELEMENTS // per_slot)
        acc = None
        for c0 in range(0, slots.shape[2], step_slots):
            c1 = min(slots.shape[2], c0 + step_slots)
            ii = slots[..., c0:c1]
            n = ii.shape[2] * bk
            rows_of = (self.kv_of.view(-1, 1, 1) * keys.shape[1] + ii).view(-1)
            kg = keys.flatten(0, 1).index_select(0, rows_of).view(heads, n_tiles, n, -1)
            vg = values.flatten(0, 1).index_select(0, rows_of).view(heads, n_tiles, n, -1)
            kpos = (ii[..., None] * bk + torch.arange(bk, device=ii.device)) \
                .reshape(heads, n_tiles, n)
            inside = (kpos < s.kv_len) & listed[..., c0:c1, None].expand(-1, -1, -1, bk) \
                .reshape(heads, n_tiles, n)
            kpos = kpos.clamp(max=s.kv_len - 1)[:, :, None, :]
            split = min(n, max(0, width_full - c0) * bk)       # columns from here: partial
            decided = None
            if split < n:
                decided = mask_module.mask(qpos, kpos[..., split:], self.h, *self.sizes,
                                           torch.float64, *mask_t)
            allowed = _Allowed(inside, split, decided)
            step = self.fused_step(qt, kg, vg, allowed) if self.fused else \
                self.general_step(qt, kg, vg, allowed, qpos, kpos, module, score_t)
            if step is None:
                return None
            acc = step if acc is None else _merge(acc, step)
        return acc

    def fused_step(self, qt, kg, vg, allowed):
        """(out, lse) of a step on the fused operator, in one call: no mask when every listed
        key of every row is allowed, else the step's additive mask materialised (the operator
        is slower on a mask broadcast over the rows)."""
        if allowed.decided is None and bool(allowed.inside.all()):
            out, lse = FUSED(qt, kg, vg, scale=self.call.scale)
            return out, lse.to(self.wide)
        bias = self.scratch(qt.shape[:3] + (kg.shape[2],))
        allowed.bias(bias)
        out, lse = FUSED(qt, kg, vg, attn_mask=bias, scale=self.call.scale)
        # a row with no allowed key: lse -inf, not the operator's 0
        return out, torch.where(allowed.some(), lse.to(self.wide), NEG_INF)

    def general_step(self, qt, kg, vg, allowed, qpos, kpos, module, score_t):
        scores = (qt @ kg.transpose(-1, -2)).mul_(self.call.scale)
        if hasattr(module, "score"):
            scores = module.score(scores, qpos, kpos, self.h, *self.sizes, self.wide,
                                  *score_t).to(self.wide).expand(scores.shape).clone()
        allowed.fill(scores)
        top = scores.amax(dim=-1)
        if not bool((top < torch.inf).all()):   # NaN or +inf at an allowed pair
            return None
        safe = torch.where(top == NEG_INF, 0.0, top)
        p = torch.exp(scores - safe[..., None])
        total = p.sum(-1)
        has = total > 0
        out = (p @ vg) / torch.where(has, total, 1.0)[..., None]
        return out, torch.where(has, safe + torch.log(torch.where(has, total, 1.0)), NEG_INF)

    def scratch(self, shape: tuple):
        """A block of ``shape`` in the accumulation type, reused step to step (contents
        undefined)."""
        n = int(np.prod(shape))
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=self.wide, device=self.q.device)
        return self._scratch[:n].view(shape)


def _groups(full_w: list, part_w: list, per_slot: int, cap: int) -> list[tuple[int, int]]:
    """Runs ``[i0, i1)`` of consecutive tiles of rows with a listed tile, grouped while the
    group's scores (tiles x widest list x ``per_slot``) stay within ``cap`` (a wider tile
    alone forms a group; its step then splits its list)."""
    out, start, widest = [], None, 0
    for i, width in enumerate(w + p for w, p in zip(full_w, part_w)):
        if start is not None and (width == 0 or
                                  (i + 1 - start) * max(widest, width) * per_slot > cap):
            out.append((start, i))
            start = None
        if width and start is None:
            start, widest = i, 0
        widest = max(widest, width)
    if start is not None:
        out.append((start, len(full_w)))
    return out


class _Allowed:
    """The allowed pairs of a step: listed in-range keys ``inside`` [H, G, C]; from column
    ``split`` on, the mask's values ``decided`` [H or 1, G, R, C - split] too (None: no
    partial column)."""

    def __init__(self, inside, split: int, decided):
        self.inside, self.split, self.decided = inside, split, decided

    def fill(self, block) -> None:
        """-inf into the scores ``block`` [H, G, R, C] at the pairs not allowed."""
        block.masked_fill_(~self.inside[:, :, None, :], NEG_INF)
        if self.decided is not None:
            block[..., self.split:].masked_fill_(~self.decided, NEG_INF)

    def bias(self, block) -> None:
        """The additive mask into ``block`` [H, G, R, C]: 0 at allowed pairs, else -inf (each
        entry written once)."""
        zero = torch.zeros((), dtype=block.dtype, device=block.device)
        low = torch.full((), NEG_INF, dtype=block.dtype, device=block.device)
        full, split = block[..., :self.split], self.split
        if bool(self.inside[..., :split].all()):
            full.zero_()
        else:
            full.copy_(torch.where(self.inside[..., :split], zero, low)[:, :, None, :]
                       .expand(full.shape))
        if self.decided is not None:
            torch.where(self.decided & self.inside[:, :, None, split:], zero, low,
                        out=block[..., split:])

    def some(self):
        """bool [H, G, R or 1]: rows with an allowed key in the step."""
        some = self.inside[..., :self.split].any(-1)[..., None]
        if self.decided is not None and not bool(some.all()):
            some = some | (self.decided & self.inside[:, :, None, self.split:]).any(-1)
        return some


def _merge(a, b):
    """(out, lse) of two disjoint key sets' (out, lse), by log-sum-exp (finite or -inf)."""
    (o1, l1), (o2, l2) = a, b
    total = torch.logaddexp(l1, l2)
    safe = total.masked_fill(total == NEG_INF, 0.0)
    return (torch.exp(l1 - safe)[..., None] * o1 + torch.exp(l2 - safe)[..., None] * o2), total
