"""Selector tables of a call computed on its device (torch ops, float32, no host synchronisation).

Input: a :class:`~attndsl.bound.BoundPattern` (or a user-facing pattern), the call's ``q``
``[B, H, q_len, D]`` and ``k`` ``[B, KVH, kv_len, D]`` (any float dtype, any device; read as
``q.float()``), its softmax scale (a Python float) and its tensor inputs by name (torch tensors
or array-likes; ``route(c)`` reads ``c`` of shape ``[H, C, D]`` or ``[B or 1, H, C, D]``).

Output (:func:`selection_tables`): for every derived name of ``codegen.tables.with_tables``, a
tensor on q's device with the layout of :func:`codegen.tables.table_values` and the dtype of
``codegen.args.slot_dtype``:

* ``'blocks'`` (``topk_blocks`` / ``topp_blocks``): int8 ``[B, H, nqb, nkb]``, row ``i`` the
  query block ``first + i`` with ``first = (kv_len - q_len) // b`` and
  ``nqb = (kv_len - 1) // b - first + 1`` (0 when ``q_len == 0``), ``nkb = ceil(kv_len / b)``;
* ``'random'``: int8 ``[query blocks first..(kv_len - 1) // b, nkb]`` (no batch dimension);
* ``'route_q'`` / ``'route_k'``: int32 cluster ids ``[B, H, q_len]`` / ``[B, H, kv_len]``.

Invariants: the semantics are LANGUAGE.md sections 4 and 5 with attndsl.selectors' formulas
(the float64 reference) evaluated in float32, so the tables agree with the reference away from
ties of the scores. Every shape comes from the sizes alone and no value is read back to the host
(no ``.item()``, no data-dependent shapes): the function can run under CUDA-graph capture once
its data-independent constants are cached. Those constants (per-block row counts, candidate
masks, the ``random_blocks`` tables) are built on the host from the sizes with NumPy, uploaded
once and kept in :class:`~attndsl.caches.LRUCache` entries keyed by content (sizes, block size,
device string). Returned tensors may be such cached tensors: callers must not modify them.
"""

from __future__ import annotations

import numpy as np
import torch

from attndsl.bound import as_bound
from attndsl.caches import LRUCache
from attndsl.errors import AttnCallError
from attndsl.ir import Op
from attndsl.selectors import random_block_table

from .args import slot_dtype
from .tables import with_tables

POOL_CONSTS = LRUCache("codegen.selection.pool", 256)
CANDIDATES = LRUCache("codegen.selection.candidates", 256)
RANDOM_TABLES = LRUCache("codegen.selection.random", 64)


def _pool_counts(start: int, length: int, b: int, device: str):
    """(pad_front, n_blocks, counts float32 [n_blocks] on device) for the rows at positions
    ``start .. start + length - 1`` pooled by ``position // b``, blocks numbered from
    ``start // b``."""
    def make():
        pad = start % b if length else 0
        n_blocks = -(-(pad + length) // b) if length else 0
        counts = np.full(n_blocks, b, dtype=np.float32)
        if n_blocks:
            counts[0] -= pad
            counts[-1] -= n_blocks * b - pad - length
        return pad, n_blocks, torch.from_numpy(counts).to(device)
    return POOL_CONSTS.get((start % b, length, b, device), make)


def _pooled(x: torch.Tensor, start: int, b: int) -> torch.Tensor:
    """Block means of x [B, G, L, D] (rows at positions start..) -> [B, G, n_blocks, D]."""
    bsz, g, length, d = x.shape
    pad, n_blocks, counts = _pool_counts(start, length, b, str(x.device))
    if n_blocks == 0 or bsz * g * d == 0:                    # nothing to pool: shapes only
        return x.new_zeros((bsz, g, n_blocks, d))
    back = n_blocks * b - pad - length
    padded = torch.nn.functional.pad(x, (0, 0, pad, back))
    sums = padded.reshape(bsz, g, n_blocks, b, d).sum(dim=3)
    return sums / counts[:, None]


def _candidates(first: int, nqb: int, nkb: int, causal: bool, device: str) -> torch.Tensor:
    """bool [nqb, nkb]: key block J is a candidate of query block first + i."""
    def make():
        i = np.arange(first, first + nqb)[:, None]
        j = np.arange(nkb)[None, :]
        cand = (j < i) if causal else np.ones((nqb, nkb), dtype=bool)
        return torch.from_numpy(np.ascontiguousarray(cand)).to(device)
    return CANDIDATES.get((first, nqb, nkb, bool(causal), device), make)


def _block_scores(qf: torch.Tensor, kf: torch.Tensor, b: int) -> tuple[torch.Tensor, int]:
    """Pooled block scores S float32 [B, H, nqb, nkb] and the first query block."""
    bsz, heads, q_len, d = qf.shape
    kv_heads, kv_len = kf.shape[1], kf.shape[2]
    offset = kv_len - q_len
    pq = _pooled(qf, offset, b)                               # [B, H, nqb, D]
    pk = _pooled(kf, 0, b)                                    # [B, KVH, nkb, D]
    group = heads // kv_heads
    nqb = pq.shape[2]
    s = torch.einsum("bkgid,bkjd->bkgij", pq.reshape(bsz, kv_heads, group, nqb, d), pk)
    return s.reshape(bsz, heads, nqb, pk.shape[2]), offset // b


def _ranked(s: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Key blocks in selection order: descending S over the candidates, ties smaller J first,
    non-candidates last."""
    keyed = torch.where(cand, s, torch.full_like(s, -torch.inf))
    return torch.sort(keyed, dim=-1, descending=True, stable=True).indices


def _topk(s: torch.Tensor, cand: torch.Tensor, n: int) -> torch.Tensor:
    n = max(0, min(n, s.shape[-1]))
    order = _ranked(s, cand)
    table = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    table = table.scatter(-1, order[..., :n], True)
    return table & cand


def _topp(s: torch.Tensor, cand: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    if s.numel() == 0:                   # no query row, no key block or no batch: nothing
        return torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    neg = torch.full_like(s, -torch.inf)
    logits = torch.where(cand, scale * s, neg)
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.where(cand, torch.exp(logits - top), torch.zeros_like(s))
    tiny = torch.finfo(torch.float32).tiny
    prob = w / w.sum(dim=-1, keepdim=True).clamp_min(tiny)
    order = _ranked(s, cand)
    sorted_p = torch.gather(prob, -1, order)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p        # mass strictly before each one
    first_pos = torch.arange(s.shape[-1], device=s.device) == 0
    keep_sorted = (before < p) | first_pos
    table = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    table = table.scatter(-1, order, keep_sorted)
    return table & cand


def _centroids(name: str, value, heads: int, d: int, bsz: int, device) -> torch.Tensor:
    """Tensor input ``name`` as float32 [B or 1, H, C, D] on the device."""
    if isinstance(value, torch.Tensor):
        c = value.detach().to(device=device, dtype=torch.float32)
    else:
        c = torch.from_numpy(np.array(value, dtype=np.float32)).to(device)
    if c.dim() == 3:
        c = c[None]
    ok = (c.dim() == 4 and c.shape[0] in (1, bsz) and c.shape[1] == heads and c.shape[3] == d
          and c.shape[2] >= 1)
    if not ok:
        raise AttnCallError(f"route: tensor input '{name}' must have shape [heads={heads}, "
                            f"C >= 1, head_dim={d}] (with an optional batch dimension of 1 or "
                            f"{bsz}), got {list(c.shape)}")
    return c


def _route(qf: torch.Tensor, kf: torch.Tensor, c: torch.Tensor):
    """(cluster_q int32 [B, H, q_len], cluster_k int32 [B, H, kv_len]): argmax over the
    centroids (torch.argmax takes the first maximum: ties to the smaller m)."""
    bsz, heads, q_len, d = qf.shape
    kv_heads, kv_len = kf.shape[1], kf.shape[2]
    group = heads // kv_heads
    c = c.expand(bsz, -1, -1, -1)
    n_c = c.shape[2]
    cq = torch.einsum("bhid,bhmd->bhim", qf, c).argmax(dim=-1)
    ck = torch.einsum("bkjd,bkgmd->bkgjm", kf, c.reshape(bsz, kv_heads, group, n_c, d))
    ck = ck.argmax(dim=-1).reshape(bsz, heads, kv_len)
    return cq.to(torch.int32), ck.to(torch.int32)


def _random(args: tuple, q_len: int, kv_len: int, device: str) -> torch.Tensor:
    r, b, seed = (int(a) for a in args)
    first, last = (kv_len - q_len) // b, (kv_len - 1) // b

    def make():
        table = random_block_table(r, b, seed, first, last, kv_len)
        return torch.from_numpy(table.astype(np.int8)).to(device)
    return RANDOM_TABLES.get((r, b, seed, first, last, kv_len, device), make)


def selection_tables(pattern, q, k, scale: float, tensors: dict) -> dict[str, torch.Tensor]:
    """The derived selector tensors of a call, computed on q's device (see the module doc)."""
    pattern = as_bound(pattern)
    derived = with_tables(pattern)[3]
    device = q.device
    dev = str(device)
    bsz, heads, q_len, d = q.shape
    kv_len = k.shape[2]
    qf = kf = None
    scores: dict[int, tuple[torch.Tensor, int]] = {}       # per block size, this call only
    routes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # per tensor input, this call
    out: dict[str, torch.Tensor] = {}
    for name, dv in derived.items():
        dtype = slot_dtype(None, dv)
        if dv.kind == "random":
            out[name] = _random(dv.args, q_len, kv_len, dev).to(dtype)
            continue
        if qf is None:
            qf, kf = q.detach().float(), k.detach().to(device=device, dtype=torch.float32)
        if dv.kind == "blocks":
            b = int(dv.args[1])
            if b not in scores:
                scores[b] = _block_scores(qf, kf, b)
            s, first = scores[b]
            cand = _candidates(first, s.shape[2], s.shape[3], bool(dv.args[2]), dev)
            if dv.node.op is Op.TOPK_BLOCKS:
                table = _topk(s, cand, int(dv.args[0]))
            else:
                table = _topp(s, cand, float(dv.args[0]), float(scale))
            out[name] = table.to(dtype)
        else:
            c_name = dv.node.value
            if c_name not in routes:
                if c_name not in tensors or tensors[c_name] is None:
                    raise AttnCallError(f"route: missing tensor input '{c_name}'")
                c = _centroids(c_name, tensors[c_name], heads, d, bsz, device)
                routes[c_name] = _route(qf, kf, c)
            out[name] = routes[c_name][0 if dv.kind == "route_q" else 1].to(dtype)
    return out
