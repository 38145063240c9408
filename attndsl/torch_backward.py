"""The torch backend's backward: attention recomputed tile by tile from the saved lse.

Input: a bound call (:class:`~attndsl.call.BoundCall`, :class:`~attndsl.call.CallData`), its
q, k, v, the forward's final (out, lse), the gradients flowing into them (dout, dlse), the
call's tensor inputs as given (torch tensors) and the names of those to differentiate. Output:
(dq, dk, dv) in the dtypes of q, k, v (None when ``qkv`` is False) and {name: gradient} in each
input's shape and dtype.

FlashAttention-2's recurrence, on the forward's plan (codegen/torch_plan.py: the same parts,
row tiles and key segments, so empty tiles are never visited and full steps evaluate no mask):
``delta = rowsum(dout * out) - dlse``; per step of a row tile ``P = exp(S - lse)`` at allowed
pairs, ``dV += P^T dout``, ``dS = P * (dout V^T - delta)``, then through the score clause
(autograd over the generated ``score()`` of that step alone, :func:`recording`, which also
gives the tensor inputs' gradients, summed tile by tile), ``dQ += scale dS K``, ``dK += scale dS^T Q``.
Memory is O((q_len + kv_len) x tile): no autograd graph outlives a step. Rows with no allowed
key (lse -inf) get exact zeros; a row the forward flags (lse NaN or +inf) gets NaN, as the
derivative of a NaN output. Grouped-query heads sum into their key/value head in the step's
matrix product, so the result is deterministic.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .call import BoundCall, CallData, acc_dtype
from .codegen import torch_plan
from .codegen.torch_lower import torch_hooks
from .torch_backend import all_finite, fused_engine, hook_args, segment_steps, step_bias

NEG_INF = float("-inf")
# torch's fused CPU attention backward: (dq, dk, dv) of q [B, H, R, D] against k, v [B, KVH,
# C, D] with an additive mask, from the given out and log-sum-exp: with the call's final out
# and lse it gives exactly one step's share of the gradients
FUSED_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                         None)


def tile_backward(call: BoundCall, data: CallData, q, k, v, out, lse, dout, dlse, tensors: dict,
                  wanted: tuple, qkv: bool = True):
    """(dq, dk, dv, {input: gradient}) of one call; see the module docstring."""
    s, wide = call.shape, acc_dtype(q.dtype)
    grads = {n: torch.zeros(tensors[n].shape, dtype=wide, device=q.device) for n in wanted}
    acc = [torch.zeros(t.shape, dtype=wide, device=q.device) for t in (q, k, v)] if qkv else None
    if s.batch and s.q_len and s.kv_len:
        planned = torch_plan.plan(torch_plan.analyse(call, data))
        fused = acc is not None and fused_backward(call, q, k, v, lse, dout, dlse)
        delta = None            # the fused operator computes it from out itself
        if not fused:
            delta = (dout.to(wide) * out.to(wide)).sum(-1)
            if dlse is not None:
                delta = delta - dlse.to(wide)
        for b in range(s.batch):
            for part in planned.rows[min(b, len(planned.rows) - 1)]:
                step = _Step(call, part, (data, b), wanted, (q[b], k[b], v[b]), dout[b],
                             (out[b], lse[b].to(wide)), None if fused else delta[b], wide,
                             None if acc is None else [t[b] for t in acc], fused)
                step.walk(planned.block[1])
                for name, g in step.leaf_grads.items():
                    _add_batch(grads[name], g, b, tensors[name].dim() > g.dim(), s.batch)
    out_grads = {n: g.to(tensors[n].dtype) for n, g in grads.items()}
    if acc is None:
        return None, None, None, out_grads
    return (*(g.to(t.dtype) for g, t in zip(acc, (q, k, v))), out_grads)


def fused_backward(call: BoundCall, q, k, v, lse, dout, dlse) -> bool:
    """Whether a call's backward steps may run on torch's fused CPU attention backward
    (:data:`FUSED_BACKWARD`): where the forward may run fused (:func:`fused_engine`: CPU, no
    score clause, one head size, finite q and k), with a finite V and dout, no gradient into
    lse, and no row the forward flagged (lse NaN or +inf)."""
    return (FUSED_BACKWARD is not None and fused_engine(call, q, k) and all_finite(v)
            and all_finite(dout) and (dlse is None or not bool(dlse.any()))
            and not bool((torch.isnan(lse) | (lse == torch.inf)).any()))


def _add_batch(total, g, b: int, batched: bool, batch: int) -> None:
    """Add batch element ``b``'s gradient of a tensor input to its total: at ``b`` for an input
    with a batch dimension of the call's size, at 0 for one of size 1, everywhere shared."""
    if not batched:
        total.add_(g)
    else:
        total[b if total.shape[0] == batch and batch > 1 else 0].add_(g)


@contextmanager
def recording():
    """Autograd on for the block: inside a custom operator's implementation the dispatcher
    excludes the autograd keys (attndsl/op.py), so a step's score clause would record
    nothing; they are included again here (and gradients enabled) for one step's graph."""
    keys = torch._C.DispatchKey
    with torch.enable_grad(), \
            torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False), \
            torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False):
        yield


class _Step:
    """The backward of one part of one batch element: its operands and accumulators."""

    def __init__(self, call: BoundCall, part, element, wanted, qkv, dout, result, delta, wide, acc,
                 fused: bool):
        s = call.shape
        q, k, v = qkv
        out, lse = result
        self.part, self.wide, self.scale = part, wide, call.scale
        first, count = part.heads if part.heads is not None else (0, s.heads)
        group = s.heads // s.kv_heads
        kv_first, kv_count = first // group, max(1, count // group)
        self.n_kv = kv_count
        hs, kvs = slice(first, first + count), slice(kv_first, kv_first + kv_count)
        self.q, self.k, self.v, self.dout = q[hs], k[kvs], v[kvs], dout[hs]
        self.lse = lse[hs]
        self.delta = None if delta is None else delta[hs]
        self.fused = fused
        if fused:       # rows with no allowed key: P = exp(s - inf) = 0 in the fused operator
            self.out = out[hs]
            self.fused_lse = torch.where(self.lse == NEG_INF, torch.inf, self.lse)
        self.acc = None if acc is None else (acc[0][hs], acc[1][kvs], acc[2][kvs])
        self.offset = s.kv_len - s.q_len
        dev = q.device
        self.h = torch.arange(first, first + count, device=dev).view(-1, 1, 1)
        self.sizes = tuple(torch.tensor(n, dtype=torch.int64, device=dev)
                           for n in (s.q_len, s.kv_len, s.heads, s.kv_heads))
        self.module, self.mask_t, score_t = hook_args(part.pattern, *element, dev, wide)
        slots = torch_hooks(part.pattern).slots
        self.slot_names = sorted(slots, key=slots.get)      # of the hook's tensor arguments
        self.score_args = score_t
        self.leaves = {n: score_t[slots[n]] for n in wanted if n in slots}
        # the tensor inputs' gradients of this batch element, summed step by step
        self.leaf_grads = {n: torch.zeros_like(t) for n, t in self.leaves.items()}
        self.has_score = hasattr(self.module, "score")
        self.sparse = part.pattern.uses_selectors()

    def grouped(self, a, b):
        """[H, R, X] @ [KVH, X, Y] -> [H, R, Y]: each key/value head serves its query heads."""
        h, r, x = a.shape
        return (a.reshape(self.n_kv, -1, x) @ b).reshape(h, r, b.shape[-1])

    def summed(self, a, b):
        """[H, R, C]^T @ [H, R, Y] -> [KVH, C, Y], summed over each key/value head's group."""
        return a.reshape(self.n_kv, -1, a.shape[-1]).transpose(-1, -2) @ \
            b.reshape(self.n_kv, -1, b.shape[-1])

    def walk(self, bk: int) -> None:
        for g in self.part.groups:
            for tile in g.tiles:
                rows = slice(g.q_row0 + g.q_step * tile.r0,
                             g.q_row0 + g.q_step * (tile.r1 - 1) + 1, g.q_step)
                cap = torch_plan.segment_cap(self.q.shape[0], tile.r1 - tile.r0, bk)
                for a, b, partial in segment_steps(tile.segments, cap, self.fused):
                    keys = slice(g.k_row0 + g.k_step * a, g.k_row0 + g.k_step * (b - 1) + 1,
                                 g.k_step)
                    if self.fused:
                        self.fused_step(rows, keys, partial)
                    else:
                        self.step(rows, keys, bool(partial))

    def fused_step(self, rows: slice, keys: slice, partial: tuple) -> None:
        """One step on torch's fused backward (no score clause: only q, k, v have gradients)."""
        wide = self.wide
        qpos = torch.arange(rows.start, rows.stop, rows.step, device=self.q.device).view(1, -1, 1) \
            + self.offset
        bias, some = step_bias(self.module, qpos, keys, partial, self.h, self.sizes, self.mask_t,
                               lambda shape: torch.zeros(shape, dtype=wide, device=qpos.device))
        if self.sparse and some is not None and not bool(some.any()):
            return
        dq, dk, dv = FUSED_BACKWARD(
            self.dout[:, rows].to(wide)[None], self.q[:, rows].to(wide)[None],
            self.k[:, keys].to(wide)[None], self.v[:, keys].to(wide)[None],
            self.out[:, rows].to(wide)[None], self.fused_lse[:, rows][None], 0.0, False,
            attn_mask=bias, scale=self.scale)
        acc_q, acc_k, acc_v = self.acc
        acc_q[:, rows] += dq[0]
        acc_k[:, keys] += dk[0]
        acc_v[:, keys] += dv[0]

    def input_step(self, raw, ok, ds, qpos, kpos) -> None:
        """Add one block's share to the tensor inputs' gradients: autograd through the score
        clause evaluated at the allowed pairs only, as a list of points (every rule is
        elementwise), so that a derivative that is not finite at a disallowed pair (``sqrt`` of
        a negative distance) never meets its zero."""
        h, i, j = ok.nonzero(as_tuple=True)
        if not h.numel():
            return
        leaves = {n: t.detach().requires_grad_() for n, t in self.leaves.items()}
        with recording():
            value = self.module.score(raw[h, i, j], qpos.reshape(-1)[i], kpos.reshape(-1)[j],
                                      self.h.reshape(-1)[h], *self.sizes, self.wide,
                                      *(leaves.get(n, t) for n, t in
                                        zip(self.slot_names, self.score_args)))
            got = torch.autograd.grad(value.expand(h.shape), list(leaves.values()), ds[h, i, j],
                                      allow_unused=True)
        for name, g in zip(leaves, got):
            if g is not None:
                self.leaf_grads[name] += g

    def step(self, rows: slice, keys: slice, partial: bool) -> None:
        """One block of rows against one block of keys (``partial``: the mask decides)."""
        dev, wide = self.q.device, self.wide
        qpos = torch.arange(rows.start, rows.stop, rows.step, device=dev).view(1, -1, 1) \
            + self.offset
        kpos = torch.arange(keys.start, keys.stop, keys.step, device=dev).view(1, 1, -1)
        allowed = None
        if partial:
            allowed = self.module.mask(qpos, kpos, self.h, *self.sizes, torch.float64,
                                       *self.mask_t)
            if self.sparse and not bool(allowed.any()):
                return
        qt, kt, vt = self.q[:, rows].to(wide), self.k[:, keys].to(wide), self.v[:, keys].to(wide)
        raw = self.grouped(qt, kt.transpose(-1, -2)) * self.scale
        value = raw
        args = (qpos, kpos, self.h, *self.sizes, wide)
        if self.has_score:
            value = self.module.score(raw, *args, *self.score_args).to(wide).expand(raw.shape)
        ok = value != NEG_INF if allowed is None else allowed & (value != NEG_INF)
        lse = self.lse[:, rows]
        ok = ok & (lse > NEG_INF)[..., None]
        p = torch.where(ok, torch.exp(value - lse[..., None]), 0.0)
        dout = self.dout[:, rows].to(wide)
        ds = p * (self.grouped(dout, vt.transpose(-1, -2)) - self.delta[:, rows, None])
        if self.leaves:
            self.input_step(raw, ok, ds, qpos, kpos)
        if self.has_score:          # the clause's derivative, from the IR (attndsl/derivative.py)
            ds = torch.where(ok, ds * self.module.score_grad(raw, *args, *self.score_args), 0.0)
        if self.acc is not None:
            dq, dk, dv = self.acc
            dq[:, rows] += self.grouped(ds, kt) * self.scale
            dk[:, keys] += self.summed(ds, qt) * self.scale
            dv[:, keys] += self.summed(p, dout)
