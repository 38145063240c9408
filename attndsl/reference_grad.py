"""The gradient oracle: a dense float64 torch definition of a call, differentiated by autograd.

Input: a pattern (an ``attndsl.Pattern`` or a :class:`~attndsl.bound.BoundPattern`), q [B, H,
Lq, D], k [B, KVH, Lkv, D], v [B, KVH, Lkv, Dv] (torch tensors), the scale and the tensor
inputs. Output: :func:`reference_call` -> (out [B, H, Lq, Dv], lse [B, H, Lq]) in float64,
differentiable in q, k, v and the float tensor inputs; :func:`reference_grads` -> the
gradients of a loss ``<out, dout> + <lse, dlse>`` by name.

It follows the contract of docs/language.md independently of both backends' kernels:

* the mask is the NumPy interpreter's (:meth:`attndsl.reference.CallGrid.mask`, selectors
  included, built by :func:`attndsl.bound.call_grids` from q and k read as the runtime reads
  them: through float32), and it is not differentiated;
* the score clause is evaluated by the interpreter's own rules (``interp.EVAL_RULES``) on
  :class:`TorchOps`, a torch float64 namespace, so autograd differentiates it with respect to
  ``score`` and to the float tensor inputs it reads (a tensor input without a batch dimension
  is shared by the batch, so its gradient sums over the batch); it is differentiated at the
  allowed pairs only (found with the NumPy interpreter's scores), so a derivative that is not
  finite at a disallowed pair (``sqrt(float(q - k))`` where k > q) never reaches a gradient:
  dS_raw is exactly 0 there, as the contract says;
* a masked softmax over the allowed pairs (mask true and score != -inf); a row without an
  allowed key has out 0, lse -inf and gets a zero gradient: every quantity that could be
  non-finite at a disallowed pair or an empty row goes through ``torch.where`` with a safe
  substitute, whose backward routes exactly zero (never 0 * inf) to the unused side.

Invariant: for finite inputs and a score clause whose derivative is finite at allowed pairs,
every gradient is finite. Dense: O(B * H * Lq * Lkv) memory; meant for tests.
"""

from __future__ import annotations

import numpy as np
import torch

from .bound import as_bound, call_grids
from .inputs import check_qkv, check_scale
from .interp import Env, Evaluator
from .ir import Type

_F64 = torch.float64


def _t(x):
    """``x`` (a torch tensor, NumPy array or NumPy/Python scalar) as a torch tensor; NumPy
    float64 stays float64 and int64 stays int64 (never torch's default float32)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.array(x, copy=True))


class TorchOps:
    """The interpreter's array namespace on torch: int64, bool and float64 tensors, so that
    ``interp.EVAL_RULES`` build an autograd graph (mirrors :class:`attndsl.interp.NumpyOps`)."""

    float_dtype = _F64

    @staticmethod
    def where(c, a, b):
        return torch.where(_t(c).to(torch.bool), _t(a), _t(b))

    @staticmethod
    def minimum(a, b):
        return torch.minimum(_t(a), _t(b))

    @staticmethod
    def maximum(a, b):
        return torch.maximum(_t(a), _t(b))

    @staticmethod
    def abs(x):
        return torch.abs(_t(x))

    @staticmethod
    def exp(x):
        return torch.exp(_t(x))

    @staticmethod
    def log(x):
        return torch.log(_t(x))

    @staticmethod
    def sqrt(x):
        return torch.sqrt(_t(x))

    @staticmethod
    def tanh(x):
        return torch.tanh(_t(x))

    @staticmethod
    def power(a, b):
        return torch.pow(_t(a), _t(b))

    @staticmethod
    def sigmoid(x):
        return 0.5 * (1.0 + torch.tanh(0.5 * _t(x)))

    @staticmethod
    def erf(x):
        return torch.special.erf(_t(x))

    @staticmethod
    def exp2(x):
        return torch.exp2(_t(x))

    @staticmethod
    def log2(x):
        return torch.log2(_t(x))

    @staticmethod
    def floor(x):
        return torch.floor(_t(x))

    @staticmethod
    def ceil(x):
        return torch.ceil(_t(x))

    @staticmethod
    def round(x):
        return torch.round(_t(x))           # half to even

    @staticmethod
    def to_int(x):
        return _t(x).to(torch.int64)

    @staticmethod
    def left_shift(a, c):
        return torch.bitwise_left_shift(_t(a), _t(c))      # int64: wraps

    @staticmethod
    def right_shift(a, c):
        return torch.bitwise_right_shift(_t(a), _t(c))     # arithmetic

    @staticmethod
    def scalar(v):
        if isinstance(v, bool):
            return torch.tensor(v)
        return torch.tensor(v, dtype=torch.int64 if isinstance(v, int) else _F64)

    @staticmethod
    def to_float(x):
        return _t(x).to(_F64)

    @staticmethod
    def to_numpy(x):
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    @staticmethod
    def from_numpy(x):
        return _t(x)

    @staticmethod
    def any(x) -> bool:
        return bool(torch.any(_t(x)))


def _float_inputs(bound, tensors: dict) -> dict:
    """name -> float64 torch tensor (graph kept) of the float tensor inputs given as tensors or
    arrays; the ones the oracle can differentiate."""
    out = {}
    for p in bound.ir.params:
        if p.is_tensor and p.type.elem is Type.FLOAT and tensors.get(p.name) is not None:
            x = tensors[p.name]
            out[p.name] = x.to(_F64) if isinstance(x, torch.Tensor) else _t(np.asarray(x, np.float64))
    return out


def _numpy(x) -> np.ndarray:
    """q or k as the runtime's selectors read them (through float32), in float64."""
    return x.detach().float().cpu().numpy().astype(np.float64)


def reference_call(pat, q, k, v, scale=None, **tensor_inputs):
    """float64 (out [B, H, Lq, Dv], lse [B, H, Lq]) of the call ``pat(q, k, v, scale=scale,
    **tensor_inputs)``, differentiable in q, k, v and the float tensor inputs (torch)."""
    bound = as_bound(pat)
    shapes = check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    batch, heads, kv_heads, q_len, kv_len = shapes
    scale = check_scale(scale, q.shape[-1])
    given = {n: (x.detach() if isinstance(x, torch.Tensor) else x)
             for n, x in tensor_inputs.items()}
    need_qk = bound.uses_selectors()
    grids = call_grids(bound, shapes, _numpy(q) if need_qk else None,
                       _numpy(k) if need_qk else None, scale, given)
    floats = _float_inputs(bound, tensor_inputs)
    ranks = {p.name: p.type.rank for p in bound.ir.params if p.is_tensor}
    q64, k64, v64 = (x.to(_F64) for x in (q, k, v))
    kvh = torch.arange(heads) // (heads // kv_heads)
    outs, lses = [], []
    rows, cols = np.arange(q_len), np.arange(kv_len)
    for b, grid in enumerate(grids):
        s0 = scale * torch.einsum("hid,hjd->hij", q64[b], k64[b][kvh])
        allowed = np.array(grid.mask(np.arange(heads), rows, cols))
        s = s0
        if bound.ir.score is not None:
            # the allowed pairs from the NumPy interpreter's scores; the score clause is then
            # differentiated at those pairs only, so that a derivative that is not finite at
            # a disallowed pair cannot reach a gradient (0 * inf)
            s_np = grid.score(np.arange(heads), rows, cols, s0.detach().cpu().numpy())
            allowed &= s_np != -np.inf
            tensors = dict(grid.tensors)
            for name, x in floats.items():      # batch element b's slice, in the graph
                tensors[name] = x[b if x.shape[0] > 1 else 0] if x.dim() > ranks[name] else x
            s = _score_clause(bound, grid, s0, tensors, torch.from_numpy(allowed))
        out, lse = masked_softmax(torch.from_numpy(allowed), s, v64[b][kvh])
        outs.append(out)
        lses.append(lse)
    if not grids:
        return (torch.zeros(0, heads, q_len, v.shape[-1], dtype=_F64),
                torch.zeros(0, heads, q_len, dtype=_F64))
    return torch.stack(outs), torch.stack(lses)


def _score_clause(bound, grid, s0, tensors: dict, allowed):
    """The score clause of one batch element by the interpreter's rules on :class:`TorchOps`
    (``score`` = s0 [H, Lq, Lkv]), evaluated at the ``allowed`` pairs as a list of points
    (every rule is elementwise) and -inf at the others."""
    heads, q_len, kv_len = s0.shape
    h, i, j = allowed.nonzero(as_tuple=True)
    env = Env(h=h, q=i + (kv_len - q_len), k=j, q_len=q_len, kv_len=kv_len, heads=heads,
              kv_heads=grid.kv_heads, params=dict(bound.values), tensors=tensors,
              selectors=grid.selectors, score=s0[h, i, j], xp=TorchOps)
    with np.errstate(all="ignore"):
        value = TorchOps.to_float(Evaluator(env).sub(bound.ir.score)).expand(h.shape)
    return torch.full_like(s0, -torch.inf).index_put((h, i, j), value)


def masked_softmax(mask, s, v):
    """(out [H, Lq, Dv], lse [H, Lq]) of one batch element from the mask (bool, broadcastable
    to s), the final scores s [H, Lq, Lkv] and V [H, Lkv, Dv] (already per query head)."""
    allowed = mask & (s.detach() != -torch.inf)
    row_has = allowed.any(-1)
    top = torch.where(allowed, s.detach(), -torch.inf).amax(-1, keepdim=True) \
        if s.shape[-1] else torch.zeros(s.shape[:-1] + (1,), dtype=_F64)
    top = torch.where(row_has[..., None], top, 0.0)     # a constant: lse's value is exact
    w = torch.where(allowed, torch.exp(torch.where(allowed, s, top) - top), 0.0)
    total = torch.where(row_has, w.sum(-1), 1.0)
    out = (w / total[..., None]) @ v
    lse = torch.where(row_has, torch.log(total) + top[..., 0], -torch.inf)
    return out, lse


def reference_grads(pat, q, k, v, dout, dlse=None, scale=None, **tensor_inputs) -> dict:
    """name -> float64 gradient (or None) of ``<out, dout> + <lse, dlse>`` for 'q', 'k', 'v'
    and each tensor input: None for int/bool inputs and for float inputs the score clause does
    not read (used only by the mask or selectors). Inputs are not modified."""
    leaves = {n: x.detach().to(_F64).requires_grad_(True)
              for n, x in (("q", q), ("k", k), ("v", v))}
    given = dict(tensor_inputs)
    bound = as_bound(pat)
    for name in _float_inputs(bound, tensor_inputs):
        x = tensor_inputs[name]
        x = x.detach() if isinstance(x, torch.Tensor) else _t(np.asarray(x, np.float64))
        given[name] = leaves[name] = x.to(_F64).requires_grad_(True)
    out, lse = reference_call(bound, leaves["q"], leaves["k"], leaves["v"], scale, **given)
    outputs, grads_in = [out], [dout.detach().to(_F64)]
    if dlse is not None:
        outputs.append(lse)
        grads_in.append(dlse.detach().to(_F64))
    names = list(leaves)
    got = [None] * len(names)
    if out.requires_grad:                   # not in a call with batch 0
        got = torch.autograd.grad(outputs, [leaves[n] for n in names], grads_in,
                                  allow_unused=True)
    result = {n: g for n, g in zip(names, got)}
    for n in ("q", "k", "v"):
        if result[n] is None:               # a call without rows or keys: zero gradients
            result[n] = torch.zeros_like(leaves[n])
    for n in bound.tensor_params:
        result.setdefault(n, None)
    return result
