"""Validation of a call's runtime inputs: tensor inputs, lengths and the positions they cover.

Every problem is an :class:`~attndsl.errors.AttnCallError` naming the argument, raised before
any kernel runs: sizes are ints (not bools or floats) up to :data:`MAX_LENGTH`, arrays are read
only from readable tensors (dense, not quantized, not on the meta device) of real dtypes, and
values that a conversion would change silently (uint64 beyond int64, a wide float beyond
float64) are rejected.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .errors import AttnCallError
from .ir import PatternIR, TensorType, Type

MAX_LENGTH = 2 ** 40
"""The supported maximum of q_len and kv_len (also of heads, kv_heads and a tile's side)."""

_INT64_MAX = np.iinfo(np.int64).max


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about arbitrary junk values."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_max_length(name: str, length: int, noun: str = "length") -> None:
    """Raise an AttnCallError naming ``name`` when ``length`` exceeds :data:`MAX_LENGTH`."""
    if length > MAX_LENGTH:
        raise AttnCallError(f"argument '{name}' has {noun} {length}, more than the supported "
                            f"maximum 2**40 = {MAX_LENGTH}")


def check_size(name: str, value, minimum: int = 0) -> int:
    """``value`` as a Python int: a Python or NumPy integer (not a bool), at least ``minimum``
    and at most :data:`MAX_LENGTH`; otherwise an AttnCallError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise AttnCallError(f"argument '{name}' must be an int, got {type(value).__name__} "
                            f"{short_repr(value)}")
    value = int(value)
    if value < minimum:
        need = "positive" if minimum == 1 else f"at least {minimum}"
        raise AttnCallError(f"argument '{name}' must be {need}, got {value}")
    check_max_length(name, value, "length" if name.endswith("_len") else "value")
    return value


def _torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")      # a torch tensor exists only once torch is imported
    return torch is not None and isinstance(x, torch.Tensor)


def check_torch_tensor(t, name: str) -> None:
    """Reject torch tensors whose values cannot be read: quantized, sparse or nested layouts,
    and the meta device (no data)."""
    if t.is_quantized:
        raise AttnCallError(f"argument '{name}' is a quantized tensor ({t.dtype}); pass "
                            f"{name}.dequantize()")
    if t.is_nested or t.layout != sys.modules["torch"].strided:
        layout = "nested" if t.is_nested else str(t.layout).replace("torch.", "")
        raise AttnCallError(f"argument '{name}' is a {layout} tensor; pass a dense (strided) "
                            f"tensor, e.g. {name}.to_dense()")
    if t.device.type == "meta":
        raise AttnCallError(f"argument '{name}' is on the meta device, which holds no values")


def _torch_to_numpy(t, name: str) -> np.ndarray:
    torch = sys.modules["torch"]
    check_torch_tensor(t, name)
    t = t.detach()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()                     # bfloat16, float8: exact in float32
    try:
        return t.cpu().resolve_conj().resolve_neg().numpy()
    except (TypeError, RuntimeError):
        raise AttnCallError(f"argument '{name}' has dtype {t.dtype}, which cannot be read as "
                            "an array of numbers") from None


def to_numpy(x, name: str) -> np.ndarray:
    """A NumPy view or copy of an array-like (NumPy array, torch tensor, nested list)."""
    if _torch_tensor(x):
        return _torch_to_numpy(x, name)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the caller's input
        raise AttnCallError(f"argument '{name}' cannot be read as an array: {exc}") from None
    if arr.dtype == object:
        raise AttnCallError(f"argument '{name}' is not a numeric array")
    return arr


def real_array(x, name: str) -> np.ndarray:
    """A NumPy array of real numbers (float or integer dtype, not bool or complex) read from an
    array-like, not yet converted: the caller checks its shape before copying it to float64."""
    arr = to_numpy(x, name)
    if arr.dtype.kind not in "iuf":
        raise AttnCallError(f"argument '{name}' must hold real numbers (a float or integer "
                            f"dtype), got dtype {arr.dtype}")
    return arr


def as_float64(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` (of a real dtype) in float64; finite values beyond float64's range (a wider
    float such as longdouble) are an AttnCallError rather than a silent inf."""
    with np.errstate(over="ignore"):
        out = arr.astype(np.float64, copy=False)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8 and \
            bool((np.isfinite(arr) & ~np.isfinite(out)).any()):
        raise AttnCallError(f"argument '{name}' holds values beyond the float64 range")
    return out


def _convert(name: str, arr: np.ndarray, ttype: TensorType) -> np.ndarray:
    """``arr`` in its declared element type: bool inputs take bool arrays only (numpy bool,
    ``torch.bool``); int inputs integers or bools (as 0 and 1), within int64; float inputs
    integers or floats, in float64."""
    kind = arr.dtype.kind
    if ttype.elem is Type.BOOL:
        if kind != "b":
            raise AttnCallError(f"tensor input '{name}' is declared {ttype} and needs bools (a "
                                f"NumPy bool array or a torch.bool tensor), got dtype "
                                f"{arr.dtype}")
        return arr
    if ttype.elem is Type.INT:
        if kind not in "iub":
            raise AttnCallError(f"tensor input '{name}' is declared {ttype} and needs integers, "
                                f"got dtype {arr.dtype}")
        if kind == "u" and arr.dtype.itemsize == 8 and arr.size and int(arr.max()) > _INT64_MAX:
            raise AttnCallError(f"tensor input '{name}' holds a value beyond the int64 range "
                                f"({int(arr.max())})")
        return arr.astype(np.int64, copy=False)
    if kind not in "iuf":
        raise AttnCallError(f"tensor input '{name}' is declared {ttype} and needs numbers (a "
                            f"float or integer dtype), got dtype {arr.dtype}")
    return as_float64(arr, name)


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


def check_lengths(q_len: int, kv_len: int, heads: int, kv_heads: int) -> tuple[int, int, int, int]:
    """The sizes of a call given as numbers, checked (ints, not bools; lengths >= 0, heads >= 1,
    all at most :data:`MAX_LENGTH`; heads a multiple of kv_heads) and returned as Python ints."""
    q_len, kv_len = check_size("q_len", q_len), check_size("kv_len", kv_len)
    heads, kv_heads = check_size("heads", heads, 1), check_size("kv_heads", kv_heads, 1)
    if heads % kv_heads:
        raise AttnCallError(f"argument 'heads' ({heads}) must be a multiple of 'kv_heads' ({kv_heads})")
    return q_len, kv_len, heads, kv_heads


def check_dense_size(heads: int, rows: int, cols: int, what: str = "dense mask") -> None:
    """Reject a [heads, rows, cols] result (a dense mask, a block map) that no NumPy array can
    hold, naming the arguments that size it."""
    if heads * rows * cols > np.iinfo(np.intp).max:
        names = "'heads', 'q_len', 'kv_len'" + (" and 'block'" if what == "block map" else "")
        hint = "" if what == "block map" else "; use block_map for calls this large"
        raise AttnCallError(f"arguments {names}: a {what} of [{heads}, {rows}, {cols}] has more "
                            f"elements than an array can hold{hint}")


def out_of_memory(what: str, sizes: dict) -> AttnCallError:
    """The AttnCallError for a call whose result or working set does not fit in memory."""
    given = ", ".join(f"{name}={value}" for name, value in sizes.items())
    names = ", ".join(f"'{name}'" for name in sizes)
    return AttnCallError(f"{what} of a call this large ({given}) does not fit in memory; "
                         f"reduce the arguments {names}")


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def call_tensor_inputs(ir: PatternIR, given: dict, float32: bool) -> dict:
    """The tensor inputs of a torch call, made safe to hand to a backend.

    Torch tensors must be readable (:func:`check_torch_tensor`); they are detached (gradients
    into tensor inputs are the custom operator's, attndsl/op.py). Torch float dtypes NumPy
    lacks (bfloat16, float8) are widened to float32; other values become NumPy arrays with
    non-negative strides. With ``float32`` (the generated kernels, which hold float tensor
    inputs in float32), a finite value of a ``float`` input beyond float32's range is an error
    rather than a silent inf.
    Declared types, ranks and batch sizes are checked later, by :func:`tensor_inputs`.
    """
    floats = {p.name for p in ir.params if p.is_tensor and p.type.elem is Type.FLOAT}
    out = {}
    for name, value in given.items():
        if value is None:
            out[name] = value
            continue
        if _torch_tensor(value):
            torch = sys.modules["torch"]
            check_torch_tensor(value, name)
            value = value.detach()
            if value.is_floating_point() and \
                    value.dtype not in (torch.float16, torch.float32, torch.float64):
                value = value.float()
            big = name in floats and value.dtype == torch.float64 and float32 and \
                bool((torch.isfinite(value) & (value.abs() > _FLOAT32_MAX)).any())
        else:
            value = to_numpy(value, name)
            if any(st < 0 for st in value.strides):
                value = np.ascontiguousarray(value)
            big = name in floats and float32 and value.dtype.kind == "f" and \
                value.dtype.itemsize > 4 and \
                bool((np.isfinite(value) & (np.abs(value) > _FLOAT32_MAX)).any())
        if big:
            raise AttnCallError(f"tensor input '{name}' holds values beyond the float32 range, "
                                "which the generated kernels use for float tensor inputs; use "
                                "backend='torch'")
        out[name] = value
    return out


def check_window(name: str, window, length: int) -> tuple[int, int]:
    """(start, stop) of a window argument over ``[0, length)``: None (everything), a ``range``
    with step 1, or a pair ``(start, stop)`` of ints with ``0 <= start <= stop <= length``."""
    if window is None:
        return 0, length
    if isinstance(window, range):
        if window.step != 1:
            raise AttnCallError(f"argument '{name}' must be a range with step 1, got {window!r}")
        bounds = (window.start, window.stop)
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        bounds = tuple(window)
    else:
        raise AttnCallError(f"argument '{name}' must be range(start, stop) or (start, stop), got "
                            f"{window!r}")
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) for b in bounds):
        raise AttnCallError(f"argument '{name}' must hold ints, got {window!r}")
    start, stop = (int(b) for b in bounds)
    if not 0 <= start <= stop <= length:
        raise AttnCallError(f"argument '{name}' must lie within [0, {length}], got "
                            f"[{start}, {stop})")
    return start, stop


def check_scale(scale, head_dim: int) -> float:
    """The call's scale: 1/sqrt(head_dim) for None, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(scale, (bool, np.bool_)) or \
            not isinstance(scale, (int, float, np.integer, np.floating)):
        raise AttnCallError(f"argument 'scale' must be a number, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise AttnCallError(f"argument 'scale' must be a finite float64, got {short_repr(scale)}")
    return value


def check_qkv(q_shape, k_shape, v_shape):
    """Validate the shapes of q [B,H,Lq,D], k [B,KVH,Lkv,D], v [B,KVH,Lkv,Dv].

    Returns (batch, heads, kv_heads, q_len, kv_len).
    """
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            raise AttnCallError(f"argument '{name}' must have 4 dimensions [batch, heads, length, "
                                f"head_dim], got shape {list(shape)}")
    check_max_length("q", q_shape[2])
    check_max_length("k", k_shape[2])
    b, h, lq, d = q_shape
    if k_shape[0] != b or v_shape[0] != b:
        raise AttnCallError(f"arguments 'q', 'k' and 'v' must have one batch size, got {b}, "
                            f"{k_shape[0]} and {v_shape[0]}")
    if k_shape[1] != v_shape[1]:
        raise AttnCallError(f"arguments 'k' and 'v' must have the same number of heads, got "
                            f"{k_shape[1]} and {v_shape[1]}")
    kvh = k_shape[1]
    if kvh < 1 or h < 1 or h % kvh:
        raise AttnCallError(f"argument 'q' has {h} heads, which must be a positive multiple of the "
                            f"{kvh} heads of 'k' and 'v' (grouped-query attention)")
    if k_shape[3] != d:
        raise AttnCallError(f"argument 'k' must have the head_dim of 'q' ({d}), got {k_shape[3]}")
    if k_shape[2] != v_shape[2]:
        raise AttnCallError(f"arguments 'k' and 'v' must have one length, got {k_shape[2]} and "
                            f"{v_shape[2]}")
    return b, h, kvh, lq, k_shape[2]
