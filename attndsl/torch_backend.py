"""The torch backend: blockwise online-softmax attention over the tiles the analysis keeps.

Input: a :class:`~attndsl.call.BoundCall` and its :class:`~attndsl.call.CallData`, q
[B, H, Lq, D] and k/v [B, KVH, Lkv, D/Dv] torch tensors. Output: (out [B, H, Lq, Dv] in q's
dtype, lse [B, H, Lq] float32, float64 for float64 inputs). It records no autograd graph: a
call with gradients runs it inside the custom operator (attndsl/op.py), whose backward
recomputes tile by tile (attndsl/torch_backward.py).

:func:`blockwise_attention` reads as its stages: analyse and plan (codegen/torch_plan.py: the
tile classes at the CPU tile shape, then parts, merged row tiles and key segments), generate
(the mask and score clause lowered to torch functions, codegen/torch_lower.py, cached by
content), run (each part's row tiles, step by step), merge (a gathered call's parts by
log-sum-exp; parts of disjoint head sets side by side).

* Empty tiles are never visited; a step of full tiles evaluates no mask; a partial step
  evaluates the generated mask on its [H or 1, rows, keys] block only. Runs of keys are slices
  of k and v and residue-class gathers strided views: nothing is copied but a visited tile's
  conversion to the accumulation type (float32, float64 for float64 inputs), and memory is
  O((q_len + kv_len) x block), never a dense [q_len, kv_len] matrix.
* Two engines run a row tile. The fused one (:class:`_FusedRows`: torch's CPU attention
  operator per step, results merged by log-sum-exp) where there is no score
  clause, one head size and finite q, k and v; the general one (:class:`_Rows`: matmuls and an
  online softmax, differentiable) elsewhere, and for any row tile whose fused result is not
  finite.
* Grouped-query attention reads each key/value head once for its group of query heads, from a
  view (an expanded, stride-0 K stays unexpanded).
* Non-finite values follow docs/language.md ("Non-finite values"), as the reference
  (:func:`attndsl.reference.attend`): a NaN or +inf score at an allowed pair flags its row, the
  softmax runs over the finite allowed scores, and a non-finite V entry counts only at the
  rows whose allowed keys include it. The general engine takes a fast step when a block's row
  maxima are finite (or -inf) and V is finite (checked once per call). Calls with a
  non-finite V are planned without gathers (one part over all pairs).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .call import BoundCall, CallData, acc_dtype
from .codegen import torch_plan
from .codegen.torch_lower import torch_hooks
from .dump import dump

NEG_INF = float("-inf")
# torch's fused CPU attention: (out, lse) of q [B, H, R, D] against k, v [B, KVH, C, D] with an
# additive float mask; a row with no allowed key gets out 0 and lse 0 (fixed by the caller)
FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def blockwise_attention(call: BoundCall, data: CallData, q, k, v):
    """(out, lse) of one call; see the module docstring."""
    s = call.shape
    wide = acc_dtype(q.dtype)
    if s.batch == 0 or s.q_len == 0:
        return (q.new_zeros((s.batch, s.heads, s.q_len, s.v_dim)),
                q.new_zeros((s.batch, s.heads, s.q_len), dtype=wide))
    finite_v = all_finite(v)
    analysis = dump("analysis", torch_plan.analyse(call, data, gathers=finite_v),
                    lambda a: a.describe())
    planned = dump("plan", torch_plan.plan(analysis), lambda p: p.describe())
    for pattern in _patterns(planned.rows[0]):
        dump("source", torch_hooks(pattern).source)
    fused = fused_engine(call, q, k) and finite_v
    outs, lses = [], []
    for b in range(s.batch):
        parts = planned.rows[min(b, len(planned.rows) - 1)]   # one entry serves every row
        args = {p.key: hook_args(p, data, b, q.device, wide)
                for p in _patterns(parts)}
        results = [_Call(call, q[b], k[b], v[b], wide, finite_v, fused, planned.block[1],
                         part.heads).part(part, args[part.pattern.key]) for part in parts]
        if parts[0].heads is not None:          # parts of disjoint heads, in head order
            out, lse = (torch.cat([r[i] for r in results]) for i in (0, 1))
        else:                                   # parts of disjoint pairs of all heads
            out, lse = results[0] if len(results) == 1 else merge(results)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs).to(q.dtype), torch.stack(lses)


def _patterns(parts) -> list:
    """The distinct patterns of a plan's parts (parts of several head sets share one)."""
    return list({part.pattern.key: part.pattern for part in parts}.values())


def fused_engine(call: BoundCall, q, k) -> bool:
    """Whether a call's tiles may run on torch's fused CPU attention operator (:data:`FUSED`,
    a private aten operator returning the log-sum-exp; ``ATTNDSL_TORCH_FUSED=0`` turns it off):
    CPU tensors, no score clause, one head size for q, k and v, finite q and k
    (V is checked by the caller)."""
    return (FUSED is not None and os.environ.get("ATTNDSL_TORCH_FUSED", "1") != "0"
            and q.device.type == "cpu" and call.pattern.ir.score is None
            and call.shape.head_dim == call.shape.v_dim
            and all_finite(q) and all_finite(k))


def all_finite(t) -> bool:
    """Whether every value of ``t`` is finite, each stored value read once (an expanded,
    stride-0 dimension is read at one index: a K broadcast to 2**31 keys costs one row)."""
    distinct = t[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]
    if distinct.numel() == 0:
        return True
    # two reductions, no temporary: max and min propagate NaN and meet any infinity
    return bool(torch.isfinite(distinct.amax()) & torch.isfinite(distinct.amin()))


def hook_args(pattern, data: CallData, b: int, device, wide):
    """(module, mask tensors in float64, score tensors in the accumulation type) of a part's
    pattern for batch element ``b`` of a call: the generated functions and their tensor
    arguments, user inputs then the call's selector tables, in slot order. A float input that
    a floor/ceil/round argument of the score clause reads is a score tensor in float64 (the
    module computes those arguments in float64: ``TorchHooks.wide_inputs``)."""
    hooks = torch_hooks(pattern)
    values = dict(data.grids[b].tensors)
    values.update({n: (data.selection[n][b] if d.batched else data.selection[n])
                   for n, d in hooks.derived.items()})
    names = sorted(hooks.slots, key=hooks.slots.get)

    def convert(fdt, wide_inputs=frozenset()):
        out = []
        for n in names:
            t = values[n]
            t = t.to(device) if isinstance(t, torch.Tensor) else \
                torch.as_tensor(np.asarray(t), device=device)
            out.append(t.to(torch.float64 if n in wide_inputs else fdt) if t.is_floating_point()
                       else (t if t.dtype == torch.bool else t.to(torch.int64)))
        return tuple(out)

    return hooks.module, convert(torch.float64), convert(wide, hooks.wide_inputs)


def merge(results):
    """One (out [H, L, Dv], lse [H, L]) of several disjoint parts' results, by log-sum-exp.
    A row that any part flags (lse NaN or +inf) stays flagged, its output NaN."""
    out, lse = results[0]
    for o, l2 in results[1:]:
        total = torch.logaddexp(lse, l2)
        safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
        mixed = (torch.exp(lse - safe)[..., None] * out + torch.exp(l2 - safe)[..., None] * o)
        out = torch.where((total == NEG_INF)[..., None], torch.zeros_like(out),
                          torch.where(torch.isfinite(total)[..., None], mixed, torch.nan))
        lse = total
    return out, lse


class _Call:
    """One batch element of a call for one set of heads: its operands and the walk of a part."""

    def __init__(self, call: BoundCall, q, k, v, wide, finite_v, fused: bool, bk: int,
                 heads: tuple[int, int] | None):
        s = call.shape
        self.fused, self.bk = fused, bk
        self.s, self.wide = s, wide
        self.finite_v = finite_v
        first, count = heads if heads is not None else (0, s.heads)
        group = s.heads // s.kv_heads
        kv_first, kv_count = first // group, max(1, count // group)
        self.q, self.k, self.v = (q[first:first + count], k[kv_first:kv_first + kv_count],
                                  v[kv_first:kv_first + kv_count])
        self.n_heads, self.n_kv, self.group = count, kv_count, count // kv_count
        self.scale = call.scale
        self.offset = s.kv_len - s.q_len
        self.h = torch.arange(first, first + count, device=q.device).view(-1, 1, 1)
        self.sizes = tuple(torch.tensor(n, dtype=torch.int64, device=q.device)
                           for n in (s.q_len, s.kv_len, s.heads, s.kv_heads))
        self._v_finite: dict[tuple, bool] = {}
        self._scratch = None

    # ------------------------------------------------------------------ operands
    def scratch(self, shape: tuple):
        """A float block of ``shape`` in the accumulation type, reused from step to step (a
        fresh large tensor per step costs its page faults); its contents are undefined."""
        n = int(np.prod(shape))
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=self.wide, device=self.q.device)
        return self._scratch[:n].view(shape)

    def grouped(self, a, b):
        """[H, R, X] @ [KVH, X, Y] -> [H, R, Y]: each key/value head serves its query heads."""
        h, r, x = a.shape
        out = a.reshape(self.n_kv, self.group * r, x) @ b
        return out.reshape(h, r, b.shape[-1])

    def v_tile(self, keys: slice):
        """(V[keys] in the accumulation type with non-finite entries zeroed, the raw tile when
        it holds a non-finite entry, else None)."""
        vt = self.v[:, keys].to(self.wide)
        if self.finite_v:
            return vt, None
        span = (keys.start, keys.stop, keys.step)
        if span not in self._v_finite:
            self._v_finite[span] = bool(torch.isfinite(vt).all())
        if self._v_finite[span]:
            return vt, None
        return torch.where(torch.isfinite(vt), vt, torch.zeros_like(vt)), vt

    # ------------------------------------------------------------------ walk
    def part(self, part: torch_plan.Part, hooks):
        """(out [H, Lq, Dv], lse [H, Lq]) of one part (rows it never visits: 0 and -inf), with
        its :func:`hook_args`: each row tile's result is written into the part's output."""
        sparse = part.pattern.uses_selectors()      # candidate tiles may hold no selected pair
        s, dv = self.s, self.v.shape[-1]
        out = self.q.new_zeros((self.n_heads, s.q_len, dv), dtype=self.wide)
        lse = self.q.new_full((self.n_heads, s.q_len), NEG_INF, dtype=self.wide)
        for g in part.groups:
            for tile in g.tiles:
                rows = slice(g.q_row0 + g.q_step * tile.r0,
                             g.q_row0 + g.q_step * (tile.r1 - 1) + 1, g.q_step)
                out[:, rows], lse[:, rows] = self.row_tile(rows, g, tile, hooks, sparse)
        return out, lse

    def row_tile(self, rows: slice, g, tile, hooks, sparse: bool):
        """(out [H, R, Dv], lse [H, R]) of one tile of rows: the fused engine where it applies
        and its result is finite, else the general one."""
        if self.fused:
            state = _FusedRows(self, rows, hooks[0], hooks[1], sparse)
            done = self.walk(state, g, tile, fused=True)
            if done is not None:
                return done
        return self.walk(_Rows(self, rows, *hooks, sparse), g, tile, fused=False)

    def walk(self, state, g, tile, fused: bool):
        """Every segment of a row tile through ``state``, step by step (:func:`segment_steps`). A
        step is its key slice and the ranges, in step offsets, where the mask decides (none:
        every pair of the step is allowed)."""
        cap = torch_plan.segment_cap(self.n_heads, tile.r1 - tile.r0, self.bk)
        for a, b, partial in segment_steps(tile.segments, cap, fused):
            state.tile(slice(g.k_row0 + g.k_step * a, g.k_row0 + g.k_step * (b - 1) + 1,
                             g.k_step), partial)
        return state.finish()


def segment_steps(segments, cap: int, fused: bool):
    """(first key, end key, partial ranges in step offsets) of the steps over a row tile's
    segments. A step holds at most ``cap`` keys where it evaluates the mask; the fused engine
    also joins adjacent segments into one step (one operator call) while they fit in ``cap``,
    and takes a longer full segment whole (it holds no block of mask values)."""
    steps: list[list] = []          # [first, end, partial ranges (absolute), joinable]
    for seg in segments:
        n = seg.c1 - seg.c0
        if fused and seg.full and n > cap:
            steps.append([seg.c0, seg.c1, [], False])
            continue
        for a in range(seg.c0, seg.c1, cap):
            b = min(seg.c1, a + cap)
            ranges = [] if seg.full else [(a, b)]
            last = steps[-1] if steps else None
            if fused and last and last[3] and last[1] == a and b - last[0] <= cap:
                last[1] = b
                last[2].extend(ranges)
            else:
                steps.append([a, b, ranges, fused])
    return [(a, b, tuple((x - a, y - a) for x, y in ranges)) for a, b, ranges, _ in steps]


def step_bias(module, qpos, keys: slice, partial: tuple, h, sizes, mask_t, zeros):
    """(additive mask [1, H or 1, R, C] of a fused step: -inf at the pairs its partial ranges'
    mask rules out, else 0; whether each row has an allowed key [H or 1, R], None when a full
    segment is in the step) — (None, None) for a step without partial ranges. ``zeros(shape)``
    gives a zeroed block (a scratch buffer is reused step to step)."""
    if not partial:
        return None, None
    n_rows, n_keys = qpos.shape[1], len(range(keys.start, keys.stop, keys.step))
    masks = []
    for a, b in partial:
        kpos = torch.arange(keys.start + keys.step * a, keys.start + keys.step * b, keys.step,
                            device=qpos.device).view(1, 1, -1)
        m = module.mask(qpos, kpos, h, *sizes, torch.float64, *mask_t)
        masks.append(m.expand(m.shape[0] if m.dim() == 3 else 1, n_rows, b - a))
    covered = sum(b - a for a, b in partial) == n_keys    # no full segment in the step
    some = torch.stack([m.any(dim=-1) for m in masks]).any(dim=0) if covered else None
    bias = zeros((max(m.shape[0] for m in masks), n_rows, n_keys))
    for (a, b), m in zip(partial, masks):
        bias[:, :, a:b].masked_fill_(~m, NEG_INF)
    return bias[None], some


class _FusedRows:
    """The state of one tile of rows on torch's fused CPU attention operator, one call per
    step, results merged by log-sum-exp. For finite inputs without a score clause; ``finish``
    returns None when a row's result is not finite (the general engine then runs the tile)."""

    def __init__(self, call: _Call, rows: slice, module, mask_t, sparse: bool):
        self.c, self.module, self.mask_t, self.sparse = call, module, mask_t, sparse
        dev = call.q.device
        self.qpos = torch.arange(rows.start, rows.stop, rows.step, device=dev).view(1, -1, 1) \
            + call.offset
        self.qt = call.q[:, rows].to(call.wide)[None]
        self.acc = self.lse = None              # no step yet

    def tile(self, keys: slice, partial: tuple) -> None:
        c = self.c
        bias, some = step_bias(self.module, self.qpos, keys, partial, c.h, c.sizes, self.mask_t,
                               lambda shape: c.scratch(shape).zero_())
        if self.sparse and some is not None and not bool(some.any()):
            return
        out, lse = FUSED(self.qt, c.k[:, keys].to(c.wide)[None], c.v[:, keys].to(c.wide)[None],
                         attn_mask=bias, scale=c.scale)
        out, lse = out[0], lse[0].to(c.wide)
        if some is not None:                    # a row with no allowed key: lse -inf, not 0
            lse = torch.where(some, lse, NEG_INF)
        if self.acc is None:                    # the first step: its result as it is
            self.acc, self.lse = out, lse
            return
        total = torch.logaddexp(self.lse, lse)
        safe = total.masked_fill(total == NEG_INF, 0.0)
        self.acc.mul_(torch.exp(self.lse - safe)[..., None])     # in place: no fresh pages
        self.acc.addcmul_(out, torch.exp(lse - safe)[..., None])
        self.lse = total

    def finish(self):
        """(out [H, R, Dv], lse [H, R]), or None when a row's lse is NaN or +inf."""
        if self.acc is None:                    # every step skipped (no selected pair)
            c = self.c
            shape = (c.n_heads, self.qt.shape[2])
            return (torch.zeros(shape + (c.v.shape[-1],), dtype=c.wide, device=c.q.device),
                    torch.full(shape, NEG_INF, dtype=c.wide, device=c.q.device))
        if not bool((self.lse < torch.inf).all()):
            return None
        return self.acc, self.lse


class _Rows:
    """The online-softmax state of one tile of query rows across its key segments."""

    def __init__(self, call: _Call, rows: slice, module, mask_t, score_t, sparse: bool):
        self.c, self.module, self.mask_t, self.score_t = call, module, mask_t, score_t
        self.sparse = sparse
        dev = call.q.device
        self.qpos = torch.arange(rows.start, rows.stop, rows.step, device=dev).view(1, -1, 1) \
            + call.offset
        self.qt = call.q[:, rows].to(call.wide)
        shape = (call.n_heads, self.qt.shape[1])
        self.m = torch.full(shape, NEG_INF, dtype=call.wide, device=dev)
        self.l = torch.zeros_like(self.m)
        self.acc = self.qt.new_zeros(shape + (call.v.shape[-1],))
        self.nan_row = torch.zeros(shape, dtype=torch.bool, device=dev)
        self.inf_row = torch.zeros_like(self.nan_row)
        self.poison = None                  # (+inf, -inf, NaN) counts [H, R, Dv] once needed

    def tile(self, keys: slice, partial: tuple) -> None:
        c = self.c
        kpos = torch.arange(keys.start, keys.stop, keys.step, device=c.q.device).view(1, 1, -1)
        mask = None
        if partial:                             # a segment's step: all of it decided by the mask
            mask = self.module.mask(self.qpos, kpos, c.h, *c.sizes, torch.float64, *self.mask_t)
            if self.sparse and not bool(mask.any()):
                return
        s = c.grouped(self.qt, c.k[:, keys].to(c.wide).transpose(-1, -2))
        s = s.mul_(c.scale)
        if hasattr(self.module, "score"):
            value = self.module.score(s, self.qpos, kpos, c.h, *c.sizes, c.wide, *self.score_t)
            value = value.to(s.dtype)
            if value.shape != s.shape:      # a broadcast value (or a module constant): the
                value = value.expand(s.shape).clone()  # in-place steps below need a block
            s = value
        if mask is not None:
            s = s.masked_fill(~mask, NEG_INF)
        top = s.amax(dim=-1)
        vt, raw = c.v_tile(keys)
        if raw is not None or not bool((top < torch.inf).all()):
            allowed = s != NEG_INF              # NaN and +inf scores included
            self.nan_row |= (allowed & torch.isnan(s)).any(-1)
            self.inf_row |= (s == torch.inf).any(-1)
            s = torch.where(torch.isfinite(s), s, NEG_INF)
            top = s.amax(dim=-1)
            if raw is not None:
                self._count_poison(allowed, raw)
        self._update(s, top, vt)

    def _update(self, s, top, vt) -> None:
        """Fold a block of scores (finite or -inf) into the state."""
        m_new = torch.maximum(self.m, top)
        safe = torch.where(m_new == NEG_INF, torch.zeros_like(m_new), m_new)
        alpha = torch.exp(self.m - safe)
        p = s.sub_(safe[..., None]).exp_()      # in place: s is this tile's own block
        self.l.mul_(alpha).add_(p.sum(dim=-1))
        self.acc.mul_(alpha[..., None]).add_(self.c.grouped(p, vt))
        self.m = m_new

    def _count_poison(self, allowed, raw) -> None:
        a = allowed.to(raw.dtype)
        counts = [self.c.grouped(a, kind.to(raw.dtype)) for kind in
                  (raw == torch.inf, raw == -torch.inf, torch.isnan(raw))]
        self.poison = counts if self.poison is None else \
            [old + new for old, new in zip(self.poison, counts)]

    def finish(self):
        """(out [H, R, Dv], lse [H, R]) of the rows."""
        has = self.l > 0
        denom = torch.where(has, self.l, torch.ones_like(self.l))
        out = torch.where(has[..., None], self.acc / denom[..., None], torch.zeros_like(self.acc))
        lse = torch.where(has, self.m + torch.log(denom), torch.full_like(self.m, NEG_INF))
        if self.poison is not None:
            pos, neg, nan = (c > 0 for c in self.poison)
            out = torch.where(nan | (pos & neg), torch.nan,
                              torch.where(pos, torch.inf, torch.where(neg, -torch.inf, out)))
        lse = torch.where(self.nan_row, torch.nan, torch.where(self.inf_row, torch.inf, lse))
        out = torch.where((self.nan_row | self.inf_row)[..., None], torch.nan, out)
        return out, lse
