"""The bound call: a pattern with its parameters at one call's shapes, dtype, device and backend.

Input: what :func:`attndsl.runtime.bind` validated from ``pat(q, k, v, ...)``. Output:
:class:`BoundCall`, a frozen value whose :attr:`~BoundCall.key` (the pattern's content key
and the call's sizes, dtype, device, backend and scale) keys the backend's caches, and
:class:`CallData`, the part of a call that is data rather than content (tensor inputs, the
reference grids that hold the selector tables). The stages after ``bind`` take both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .bound import BoundPattern


@dataclass(frozen=True)
class CallShape:
    """The sizes of a call: q [batch, heads, q_len, head_dim], k [batch, kv_heads, kv_len,
    head_dim], v [batch, kv_heads, kv_len, v_dim]."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_dim: int

    @property
    def empty(self) -> bool:
        """Whether the call has no output row or no key (nothing to launch)."""
        return self.batch * self.heads * self.q_len == 0 or self.kv_len == 0


@dataclass(frozen=True)
class BoundCall:
    """This pattern with these parameters at these shapes, dtype, device and backend."""

    pattern: BoundPattern
    shape: CallShape
    dtype: str                  # torch dtype name: "float16", "bfloat16", "float32", "float64"
    device: str                 # torch device: "cpu", "cuda:0"
    backend: str                # "torch", "triton" or "triton-interpret"
    scale: float

    @property
    def key(self) -> tuple:
        return (self.pattern.key, self.shape, self.dtype, self.device, self.backend, self.scale)

    @property
    def interpret(self) -> bool:
        """Whether the generated kernels run under Triton's interpreter."""
        return self.backend == "triton-interpret"

    def describe(self) -> str:
        s = self.shape
        return (f"pattern {self.pattern.name} [{self.pattern.key[:12]}] "
                f"{dict(self.pattern.values)}\n"
                f"q [{s.batch}, {s.heads}, {s.q_len}, {s.head_dim}]  k/v [{s.batch}, "
                f"{s.kv_heads}, {s.kv_len}, {s.head_dim}/{s.v_dim}]  {self.dtype} on {self.device}"
                f"\nbackend {self.backend}, scale {self.scale!r}")


@dataclass(frozen=True)
class CallData:
    """The data of a call that its content key does not cover: tensor inputs by name (as given,
    checked), one reference grid per batch element (sizes, tensor inputs per element) and the
    call's selection: its selector tables by derived name (codegen/tables.py), torch tensors on
    the call's device computed from q and k (codegen/selection.py); empty without selectors."""

    tensors: dict = field(default_factory=dict)
    grids: tuple = ()
    selection: dict = field(default_factory=dict)

    @property
    def static(self) -> bool:
        """Whether nothing in the call's analysis depends on data (cacheable by content)."""
        return not self.tensors and not self.selection


def acc_dtype(dtype):
    """The accumulation type of a call with torch dtype ``dtype``, and its lse's: float64 for
    float64 inputs, else float32 (both backends)."""
    import torch  # only where a backend runs: `import attndsl` does not load torch

    return torch.float64 if dtype == torch.float64 else torch.float32
