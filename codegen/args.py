"""Kernel launches as data: :class:`Launch`, and the tensor-slot arguments of a call.

Every generated kernel (the attention skeleton, the device tile classifier) takes the tensor
inputs of a pattern as four *slots* of pointer, sizes, strides and batch stride, in the order of
:func:`codegen.tables.with_tables` (the user's tensor inputs, then the derived selector tables);
unused slots get a dummy. :func:`tensor_args` builds that argument list on a device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attndsl.errors import AttnCallError
from attndsl.ir import Type

from .lower import MAX_RANK, MAX_TENSORS, wide_reads
from .tables import with_tables


@dataclass(frozen=True)
class Launch:
    """Everything one kernel launch needs: the grid, positional arguments, the compile-time
    constants and launch options (also read by the ahead-of-time compile check, codegen/aot.py).
    The launch stage's output: frozen (its output tensors, ``args[3]`` and ``args[4]``, are
    what the kernel writes)."""

    grid: tuple[int, int, int]
    args: list
    constants: dict
    options: dict
    kernel: object = None           # the @triton.jit function launched (attn_fwd, classify_tiles)

    def describe(self) -> str:
        """The launch in words (``ATTNDSL_DUMP=launch``): grid, constants, options; hook
        functions by name, tensors by shape and dtype."""
        def word(x):
            if isinstance(x, torch.Tensor):
                return f"tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')}"
            return getattr(x, "__name__", None) or getattr(getattr(x, "fn", None), "__name__", None) \
                or repr(x)
        consts = ", ".join(f"{k}={word(v)}" for k, v in self.constants.items())
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        name = word(self.kernel) if self.kernel is not None else "?"
        return f"{name}[{self.grid}]; {consts}; {opts}"


def tensor_args(pattern, given: dict, derived_values: dict, device) -> list:
    """Pointer, sizes, strides and batch stride of every tensor slot (user inputs, then the
    derived selector tables), and dummies for the unused slots. A float input that the argument
    of a floor/ceil/round reads is held in float64 (``lower.wide_reads``; the hooks read it in
    float32 elsewhere), the others as :func:`slot_dtype` says."""
    mask, score, slots, derived = with_tables(pattern)
    wide = wide_reads((mask, score))
    if len(slots) > MAX_TENSORS:
        raise AttnCallError(f"the Triton backend takes at most {MAX_TENSORS} tensor inputs "
                            "(selector tables included)")
    declared = {p.name: p for p in pattern.ir.params if p.is_tensor}
    values = {**given, **derived_values}
    args = []
    dummy = torch.zeros(1, dtype=torch.int64, device=device)
    for name in sorted(slots, key=slots.get):
        p = declared.get(name)
        rank = p.type.rank if p is not None else derived[name].rank
        t = torch.as_tensor(values[name], device=device)
        t = t.to(torch.float64 if name in wide else slot_dtype(p, derived.get(name)))
        batched = t.dim() == rank + 1
        sizes = list(t.shape[1:] if batched else t.shape) + [1] * (MAX_RANK - rank)
        strides = list(t.stride()[1:] if batched else t.stride()) + [0] * (MAX_RANK - rank)
        batch_stride = t.stride(0) if batched and t.shape[0] > 1 else 0
        args += [t] + sizes + strides + [batch_stride]
    for _ in range(len(slots), MAX_TENSORS):
        args += [dummy] + [1] * MAX_RANK + [0] * MAX_RANK + [0]
    return args


_USER_SLOT_DTYPES = {Type.INT: torch.int64, Type.FLOAT: torch.float32, Type.BOOL: torch.int8}


def slot_dtype(param, derived) -> torch.dtype:
    """The dtype a tensor slot holds: int64 for the language's ints, float32 for floats and
    int8 for bools (0/1, read as ``!= 0`` by the hooks, codegen/lower.py: a plain byte load on
    every Triton version and in the interpreter, not an ``*i1`` pointer) from the user; the selector
    tables are narrow (their [tile x tile] gathers are staged in shared memory by the software
    pipeline, so width is what limits the tile configuration): 0/1 selections int8, cluster ids
    int32."""
    if param is not None:
        return _USER_SLOT_DTYPES[param.type.elem]
    return torch.int8 if derived.kind in ("random", "blocks") else torch.int32
