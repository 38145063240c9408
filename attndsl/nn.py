"""``attndsl.nn``: an attention pattern as a ``torch.nn.Module``.

    import attndsl, attndsl.nn
    pat = attndsl.load("examples/relative_bias.attn")["clipped_relative_bias"].bind(max_dist=8)
    attn = attndsl.nn.Attention(pat, rel=(heads, 9))     # rel: a learned [heads, 9] table of zeros
    out = attn(q, k, v)                                    # q [B, H, Lq, D], k and v [B, KVH, Lk, D]

:class:`Attention` holds a bound :class:`~attndsl.Pattern` and, as module state, the tensor
inputs given to its constructor:

* a ``float`` input that the score clause reads outside selectors
  (:func:`attndsl.op.differentiable_inputs`), such as a learned bias table, is an
  ``nn.Parameter``: it appears in ``parameters()`` (so an optimizer trains it), gets
  gradients, and is cast by ``.to(dtype)``;
* every other tensor input (``int`` and ``bool`` inputs, and ``float`` inputs only the mask or a
  selector reads, which get no gradient) is a buffer;

both are registered under the input's own name (``attn.rel``), so they move with
``.to(device)``, appear in ``state_dict()`` and load back with ``load_state_dict``. A constructor
value is either the initial value (a torch tensor or a NumPy array, copied) or a shape (a
``tuple`` of ints or a ``torch.Size``) for zeros: float inputs in torch's default dtype, int
inputs int64, bool inputs False. Values are checked like a call's arguments (declared element
type, rank with an optional batch dimension of size 1).

The tensor inputs not given to the constructor (a document-id tensor that changes with every
batch) are passed to each call: ``attn(q, k, v, doc=doc)``. ``forward`` calls the pattern
(``pat(q, k, v, return_lse=..., scale=..., backend=..., **inputs)``), so everything a call does
holds: the backend defaults by the device of ``q`` (``"torch"`` on the CPU, ``"triton"`` on
CUDA), the call is differentiable, and it runs as a torch custom operator that
``torch.compile(fullgraph=True)`` traces without a graph break (attndsl/op.py).

The module pickles and deep-copies (the pattern travels as text and values and is compiled
again: :meth:`attndsl.Pattern.__reduce__`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from .errors import AttnCallError
from .inputs import short_repr, tensor_inputs
from .ir import Type
from .op import differentiable_inputs
from .program import Pattern

_ZERO_DTYPES = {Type.INT: torch.int64, Type.BOOL: torch.bool}


class Attention(nn.Module):
    """Attention with an attndsl pattern whose constructor-given tensor inputs are module state
    (see the module docstring).

    ``pattern``: a :class:`~attndsl.Pattern` with every scalar parameter bound. ``backend`` and
    ``scale``: as in a call (None: by the device of ``q``, and ``1/sqrt(head_dim)``).
    ``inputs``: tensor input name -> initial value (tensor or NumPy array) or shape (tuple of
    ints, ``torch.Size``) of zeros.
    """

    def __init__(self, pattern: Pattern, *, backend: str | None = None,
                 scale: float | None = None, **inputs):
        super().__init__()
        if not isinstance(pattern, Pattern):
            raise AttnCallError(f"attndsl.nn.Attention takes an attndsl.Pattern, got "
                                f"{type(pattern).__name__} {short_repr(pattern)}")
        bound = pattern.bound()           # every scalar parameter has a value, or an error
        self.pattern = pattern
        self.backend = backend
        self.scale = scale
        self.state_inputs: tuple[str, ...] = ()
        learned = differentiable_inputs(bound)
        names = []
        for name, value in inputs.items():
            param = _tensor_param(pattern, name)
            tensor = _initial(pattern, param, value)
            if hasattr(self, name):
                raise AttnCallError(f"tensor input '{name}' of pattern '{pattern.name}' cannot "
                                    f"be module state: Attention already has an attribute "
                                    f"'{name}'; pass it to each call instead")
            if name in learned:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)
            names.append(name)
        self.state_inputs = tuple(names)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                return_lse: bool = False, **inputs):
        """``pattern(q, k, v, ...)`` with the module's tensor inputs and those of ``inputs``:
        out [B, H, Lq, Dv] (and lse [B, H, Lq] with ``return_lse``)."""
        for name in inputs:
            if name in self.state_inputs:
                raise AttnCallError(f"tensor input '{name}' is state of this module "
                                    f"(attention.{name}); it is not passed to a call")
        state = {name: getattr(self, name) for name in self.state_inputs}
        return self.pattern(q, k, v, return_lse=return_lse, scale=self.scale,
                            backend=self.backend, **state, **inputs)

    def extra_repr(self) -> str:
        values = ", ".join(f"{k}={v!r}" for k, v in self.pattern.values.items())
        call = [f"{self.pattern.name}({values})"]
        call += [f"backend={self.backend!r}"] if self.backend is not None else []
        call += [f"scale={self.scale!r}"] if self.scale is not None else []
        runtime = [n for n in self.pattern.tensor_params if n not in self.state_inputs]
        call += [f"call inputs: {', '.join(runtime)}"] if runtime else []
        return ", ".join(call)


def _tensor_param(pattern: Pattern, name: str):
    """The declaration of tensor input ``name`` of ``pattern``, or an AttnCallError."""
    try:
        param = pattern.ir.param(name)
    except KeyError:
        known = ", ".join(pattern.tensor_params) or "none"
        raise AttnCallError(f"pattern '{pattern.name}' has no tensor input '{name}' (its tensor "
                            f"inputs: {known})") from None
    if not param.is_tensor:
        raise AttnCallError(f"'{name}' is a compile-time parameter of pattern '{pattern.name}'; "
                            f"set it with pat.bind({name}=...)")
    return param


def _initial(pattern: Pattern, param, value) -> torch.Tensor:
    """The initial tensor of tensor input ``param``: a copy of a tensor or array (checked like a
    call argument), or zeros of a shape given as a tuple of ints or a torch.Size."""
    ttype, name = param.type, param.name
    if isinstance(value, (tuple, torch.Size)):
        if len(value) != ttype.rank or any(isinstance(n, bool) or not isinstance(n, (int, np.integer))
                                           or n < 0 for n in value):
            raise AttnCallError(f"tensor input '{name}' is declared {ttype}: its shape must be "
                                f"{ttype.rank} non-negative int{'s' if ttype.rank > 1 else ''}, "
                                f"got {short_repr(value)}")
        dtype = _ZERO_DTYPES.get(ttype.elem, torch.get_default_dtype())
        return torch.zeros(tuple(int(n) for n in value), dtype=dtype)
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise AttnCallError(f"tensor input '{name}': pass a torch tensor or a NumPy array (its "
                            f"initial value) or a tuple of ints (a shape of zeros), got "
                            f"{type(value).__name__} {short_repr(value)}")
    declared = tuple(p for p in pattern.ir.params if p.name == name)
    tensor_inputs(replace(pattern.ir, params=declared), {name: value}, None)   # type and rank
    tensor = torch.as_tensor(value).detach().clone()
    if ttype.elem is Type.FLOAT and not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor
