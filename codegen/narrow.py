"""Whether a call's hooks may compute their integers in 32 bits.

Input: the lowered mask and score IR of a pattern (codegen/tables.py ``with_tables``), its
parameter values, a call's sizes and the NumPy values of its tensor slots (user inputs per
batch element, derived selector tables). Output: True when interval analysis over the whole
call (one tile spanning every head, query and key: attndsl/analysis/intervals.py) bounds every
integer the expressions compute inside int32, and every tensor slot has fewer than 2**31
elements (its offsets are computed from those integers). Then the ``*_hook32`` variants of the
hooks run (codegen/lower.py ``narrow``); otherwise the int64 ones. The language's integers
are 64-bit; narrowing changes no value because nothing it computes leaves int32. The interval
rules of the bit operators, shifts, ``ilog2`` and ``floor``/``ceil``/``round`` bound their
results (analysis/bitwise.py), so those are covered like any int node; a shift count must
also be below 32 (an int32 shift by 32 or more is no int64 shift: ``x >> 40`` of an int32 is
no longer 0 or -1 on every target), so calls with larger counts keep int64.
"""

from __future__ import annotations

import os

import numpy as np

from attndsl.analysis.intervals import whole_call, within
from attndsl.ir import Expr, Type
from attndsl.ops import SHIFT_OPS

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
MAX_SHIFT32 = 31            # the largest shift count an int32 hook shifts by


def enabled() -> bool:
    """``ATTNDSL_NARROW=0`` keeps every hook in int64 (for tests and comparisons)."""
    return os.environ.get("ATTNDSL_NARROW", "1") != "0"


def fits_int32(roots: list[Expr], values: dict, sizes: tuple[int, int, int, int],
               tensor_sets: list[dict]) -> bool:
    """True when every int node of ``roots`` lies in int32 at every pair of the call, for each
    dict of slot tensors in ``tensor_sets`` (one per batch element)."""
    q_len, kv_len, heads, kv_heads = sizes
    if not enabled() or q_len == 0 or kv_len == 0:
        return False
    nodes = {id(n): n for r in roots for n in r.walk() if n.type is Type.INT}
    counts = [n.args[1] for n in nodes.values() if n.op in SHIFT_OPS]
    for tensors in tensor_sets:
        if any(np.size(t) >= 2 ** 31 for t in tensors.values()):
            return False
        analyzer = whole_call(q_len, kv_len, heads, kv_heads, values, tensors)
        try:
            if not all(within(analyzer.value(node), INT32_MIN, INT32_MAX) for node in nodes.values()):
                return False
            if not all(within(analyzer.value(c), 0, MAX_SHIFT32) for c in counts):
                return False
        except (KeyError, IndexError, ValueError, TypeError, OverflowError):
            return False                    # not analysable here: stay in 64 bits
    return True
