"""The call as a torch custom operator: autograd, ``torch.compile`` and ``opcheck``.

Input: a :class:`~attndsl.bound.BoundPattern` and the call's arguments (``pat(q, k, v, ...)``,
LANGUAGE.md section 6). Output: out (and lse), differentiable in q, k, v and the float tensor
inputs of the score clause.

:func:`call` is the public entry. A call that needs no gradient and is not being traced by
``torch.compile`` runs the backend pipeline directly (:func:`attndsl.runtime.run`). Otherwise
it goes through two operators registered with ``torch.library``:

    attndsl::attention(key, names, q, k, v, inputs, scale, backend) -> (out, lse)
    attndsl::attention_backward(key, names, q, k, v, inputs, out, lse, dout, dlse, scale,
                                backend) -> (dq, dk, dv, dinputs)

A pattern cannot be an operator argument: the operators name it by its content key (every live
bound pattern is found by key, :func:`attndsl.bound.by_key`), and the tensor inputs travel as a list
with their names joined in ``names``. Both operators have fake (meta) implementations, so a
compiled graph holds them without a break, forward and backward. The autograd formula saves
q, k, v, the tensor inputs, out and lse; the backward recomputes attention tile by tile on the
call's backend (:func:`attndsl.runtime.backward`). ``dinputs`` holds one tensor per tensor
input: its gradient for a float input the score clause reads, an empty tensor for the others
(their ``grad`` stays None: the mask and the selectors are not differentiated).
"""

from __future__ import annotations

import torch

from .bound import BoundPattern, by_key
from .call import acc_dtype
from .errors import AttnCallError
from .inputs import to_numpy
from .ir import SELECTOR_OPS, Op, Type
from .runtime import backward, check_arguments, forward, run


def _pattern(key: str) -> BoundPattern:
    pattern = by_key(key)
    if pattern is None:
        raise AttnCallError(f"no live attndsl pattern has key {key!r} (a compiled function "
                            "calling a pattern needs the pattern kept alive)")
    return pattern


def differentiable_inputs(pattern: BoundPattern) -> frozenset:
    """The float tensor inputs whose values the score clause reads outside any selector: the
    ones that get a gradient."""
    score = pattern.ir.score
    if score is None:
        return frozenset()
    floats = {p.name for p in pattern.ir.params if p.is_tensor and p.type.elem is Type.FLOAT}
    found, todo = set(), [score]
    while todo:
        node = todo.pop()
        if node.op in SELECTOR_OPS:         # selectors are not differentiated
            continue
        if node.op is Op.INDEX and node.value in floats:
            found.add(node.value)
        todo.extend(node.args)
    return frozenset(found)


def _wants_op(q, k, v, tensors: dict) -> bool:
    """Whether a call goes through the custom operator: it is being traced by
    ``torch.compile``, or a gradient may flow into one of its tensors."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad
               for t in (q, k, v, *tensors.values()))


def call(pattern: BoundPattern, q, k, v, return_lse=False, scale=None, backend=None,
         tensors=None):
    """``pat(q, k, v, ...)``: see the module docstring."""
    tensors = dict(tensors or {})
    if not _wants_op(q, k, v, tensors) or any(t is None for t in tensors.values()):
        return run(pattern, q, k, v, return_lse, scale, backend, tensors)
    scale, backend, _ = check_arguments(pattern, q, k, v, return_lse, scale, backend, tensors)
    names = sorted(tensors)
    inputs = [t if isinstance(t, torch.Tensor) else
              torch.from_numpy(to_numpy(t, n)).to(q.device) for n, t in
              ((n, tensors[n]) for n in names)]
    out, lse = torch.ops.attndsl.attention(pattern.key, ",".join(names), q, k, v, inputs,
                                           scale, backend)
    return (out, lse) if return_lse else out


def _tensors(names: str, inputs) -> dict:
    return dict(zip(names.split(","), inputs)) if names else {}


# ----------------------------------------------------------------------------- the operators
@torch.library.custom_op("attndsl::attention", mutates_args=())
def attention(key: str, names: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              inputs: list[torch.Tensor], scale: float,
              backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out, lse = forward(_pattern(key), q, k, v, scale, backend, _tensors(names, inputs))
    # outputs never alias inputs (an operator's contract)
    return out.clone() if out._base is not None else out, lse


@attention.register_fake
def _attention_fake(key, names, q, k, v, inputs, scale, backend):
    batch, heads, q_len = q.shape[:3]
    out = q.new_empty((batch, heads, q_len, v.shape[-1]))
    return out, q.new_empty((batch, heads, q_len), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("attndsl::attention_backward", mutates_args=())
def attention_backward(key: str, names: str, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, inputs: list[torch.Tensor], out: torch.Tensor,
                       lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor, scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              list[torch.Tensor]]:
    pattern = _pattern(key)
    given = _tensors(names, inputs)
    wanted = tuple(n for n in given if n in differentiable_inputs(pattern))
    with torch.no_grad():
        dq, dk, dv, dt = backward(pattern, q, k, v, scale, backend, given, out, lse, dout, dlse,
                                  wanted)
    return dq, dk, dv, [dt[n] if n in dt else t.new_empty(0) for n, t in given.items()]


@attention_backward.register_fake
def _attention_backward_fake(key, names, q, k, v, inputs, out, lse, dout, dlse, scale, backend):
    wanted = differentiable_inputs(_pattern(key))
    given = _tensors(names, inputs)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            [torch.empty_like(t) if n in wanted else t.new_empty(0) for n, t in given.items()])


def _setup_context(ctx, inputs, output):
    key, names, q, k, v, tensor_inputs, scale, backend = inputs
    ctx.save_for_backward(q, k, v, *tensor_inputs, *output)
    ctx.key, ctx.names, ctx.scale, ctx.backend = key, names, scale, backend


def _backward(ctx, dout, dlse):
    q, k, v, *rest = ctx.saved_tensors
    tensor_inputs, (out, lse) = rest[:-2], rest[-2:]
    dq, dk, dv, dinputs = torch.ops.attndsl.attention_backward(
        ctx.key, ctx.names, q, k, v, list(tensor_inputs), out, lse, dout, dlse, ctx.scale,
        ctx.backend)
    wanted = differentiable_inputs(_pattern(ctx.key))
    names = ctx.names.split(",") if ctx.names else []
    dinputs = [g if n in wanted else None for n, g in zip(names, dinputs)]
    return None, None, dq, dk, dv, dinputs, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
