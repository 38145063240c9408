"""Validation of a call's runtime inputs: tensor inputs, lengths and the positions they cover.

Every problem is an :class:`~attndsl.errors.AttnCallError` naming the argument.
"""

from __future__ import annotations

import numpy as np

from .errors import AttnCallError
from .ir import PatternIR, TensorType, Type


def to_numpy(x, name: str) -> np.ndarray:
    """A NumPy view or copy of an array-like (NumPy array, torch tensor, nested list)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the caller's input
        raise AttnCallError(f"argument '{name}' cannot be read as an array: {exc}") from None
    if arr.dtype == object:
        raise AttnCallError(f"argument '{name}' is not a numeric array")
    return arr


def _convert(name: str, arr: np.ndarray, ttype: TensorType) -> np.ndarray:
    kind = arr.dtype.kind
    if ttype.elem is Type.INT:
        if kind not in "iub":
            raise AttnCallError(f"tensor input '{name}' is declared {ttype} and needs integers, "
                                f"got dtype {arr.dtype}")
        return arr.astype(np.int64, copy=False)
    if kind not in "iubf":
        raise AttnCallError(f"tensor input '{name}' is declared {ttype} and needs numbers, "
                            f"got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def tensor_inputs(ir: PatternIR, given: dict, batch: int | None) -> list[dict]:
    """Check the tensor inputs of a call and split them per batch element.

    ``batch`` is the call's batch size, or None for a call without one (``dense_mask``):
    then a leading batch dimension is accepted only with size 1. Returns one dict per batch
    element (a single dict when ``batch`` is None) of name -> NumPy array of the declared rank.
    """
    declared = {p.name: p for p in ir.params if p.is_tensor}
    scalars = {p.name for p in ir.params if not p.is_tensor}
    for name in given:
        if name in scalars:
            raise AttnCallError(f"'{name}' is a compile-time parameter of pattern '{ir.name}'; "
                                f"set it with pat.bind({name}=...)")
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise AttnCallError(f"pattern '{ir.name}' has no tensor input '{name}' "
                                f"(its tensor inputs: {known})")
    n = 1 if batch is None else batch
    per_batch: list[dict] = [{} for _ in range(n)]
    for name, p in declared.items():
        if name not in given or given[name] is None:
            raise AttnCallError(f"missing tensor input '{name}' ({p.type}) of pattern '{ir.name}'")
        arr = _convert(name, to_numpy(given[name], name), p.type)
        rank = p.type.rank
        if arr.ndim == rank:
            for d in per_batch:
                d[name] = arr
        elif arr.ndim == rank + 1:
            if batch is None and arr.shape[0] != 1:
                raise AttnCallError(f"tensor input '{name}' has a batch dimension of size "
                                    f"{arr.shape[0]}; this call describes one batch element, so "
                                    "pass it without one (or with size 1)")
            if batch is not None and arr.shape[0] not in (1, batch):
                raise AttnCallError(f"tensor input '{name}' has a batch dimension of size "
                                    f"{arr.shape[0]}, but the call's batch size is {batch}")
            for b, d in enumerate(per_batch):
                d[name] = arr[b if arr.shape[0] > 1 else 0]
        else:
            raise AttnCallError(f"tensor input '{name}' is declared {p.type} ({rank} dimension"
                                f"{'s' if rank > 1 else ''}, plus an optional batch dimension), "
                                f"got shape {list(arr.shape)}")
    return per_batch


def check_lengths(q_len: int, kv_len: int, heads: int, kv_heads: int) -> None:
    for name, v in (("q_len", q_len), ("kv_len", kv_len), ("heads", heads), ("kv_heads", kv_heads)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise AttnCallError(f"argument '{name}' must be an int, got {type(v).__name__}")
        if v < 0 or (name in ("heads", "kv_heads") and v < 1):
            need = "positive" if "heads" in name else "non-negative"
            raise AttnCallError(f"argument '{name}' must be {need}, got {v}")
    if heads % kv_heads:
        raise AttnCallError(f"argument 'heads' ({heads}) must be a multiple of 'kv_heads' ({kv_heads})")
