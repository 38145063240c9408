"""The proof that spares a call the pair-by-pair check of its values.

Input: a :class:`~attndsl.reference.CallGrid` (the pattern's mask and score clause after
expansion, parameter values, sizes, this batch element's tensor inputs). Output:
:func:`call_values_proved` is True when interval analysis over one tile spanning the whole call
shows that no pair can raise an AttnCallError: every tensor index lies in its tensor, every
shift count in ``0..62``, and every argument of ``floor``/``ceil``/``round`` is a float (not
NaN) that converts to int64. Guards are ignored (every node counts as evaluated at every pair),
so this over-approximates; False means "not proved", and the caller runs the exact check
(``attndsl.reference.check_indices``: the interpreter over every pair, which raises the located
error of the first bad value). The work is O(length) per tensor read, never O(pairs).
"""

from __future__ import annotations

import numpy as np

from ..ir import Op
from ..ops import FLOAT_TO_INT_OPS, MAX_SHIFT, SHIFT_OPS
from .bitwise import float_converts
from .intervals import whole_call, within

_CHECKED = FLOAT_TO_INT_OPS | SHIFT_OPS | {Op.INDEX}


def call_values_proved(grid) -> bool:
    """Whether no tensor index, shift count or float-to-int argument of the call's mask and
    score clause can be out of range at any pair (see the module docstring)."""
    roots = [grid.ir.mask] + ([grid.ir.score] if grid.ir.score is not None else [])
    nodes = [n for r in roots for n in r.walk() if n.op in _CHECKED]
    if not nodes or grid.q_len == 0 or grid.kv_len == 0:
        return True
    an = whole_call(grid.q_len, grid.kv_len, grid.heads, grid.kv_heads, grid.params, grid.tensors)
    for node in nodes:
        if node.op is Op.INDEX:
            shape = np.shape(grid.tensors[node.value])
            if len(node.args) > len(shape) or not all(
                    within(an.value(index), 0, shape[axis] - 1) for axis, index in enumerate(node.args)):
                return False
        elif node.op in SHIFT_OPS:
            if not within(an.value(node.args[1]), 0, MAX_SHIFT):
                return False
        else:
            arg = an.value(node.args[0])
            if not float_converts(arg.lo, arg.hi, arg.nan):
                return False
    return True
