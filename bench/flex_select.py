"""The Flex way of data-dependent block selection, for bench/bench_select.py: the selection in
torch (pooled block means, block scores, top-k or top-p over the earlier blocks), a
``BlockMask`` built from the selected block indices (``BlockMask.from_kv_blocks``: no mask_mod
evaluated over the N^2 pairs), and the same selection as a dense mask for the checks.
``case`` arguments have ``kind`` ("topk" or "topp") and ``value`` (top_k or p)."""

from __future__ import annotations

import math


def select_blocks(q, k, case, block: int, scale: float):
    """The Flex way's selection, in torch (float32, on q's device, no host sync): (idx, count)
    with idx [H, nb, C] candidate key blocks of each (head, query block) in selection order and
    count [H, nb] how many of them are selected. topk_blocks / topp_blocks of docs/language.md
    with q_len == kv_len, N a multiple of block: candidates J < I, MoBA the top_k highest
    pooled scores, top-p the shortest score-ordered prefix whose softmax(scale * S) mass
    reaches p (at least one block where there is a candidate)."""
    import torch

    heads, kv_heads, n, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    nb = n // block
    pq = q[0].float().reshape(heads, nb, block, d).mean(dim=2)
    pk = k[0].float().reshape(kv_heads, nb, block, d).mean(dim=2)
    if kv_heads != heads:
        pk = pk.repeat_interleave(heads // kv_heads, dim=0)
    s = pq @ pk.transpose(-1, -2)                               # [H, nb, nb]
    ar = torch.arange(nb, device=q.device)
    cand = ar[None, :] < ar[:, None]
    s = s.masked_fill(~cand, -math.inf)
    n_cand = ar.expand(heads, nb)                               # query block I has I candidates
    if case.kind == "topk":
        kk = min(int(case.value), nb)
        idx = torch.topk(s, kk, dim=-1).indices
        return idx, n_cand.clamp(max=kk)
    sorted_s, order = torch.sort(s, dim=-1, descending=True, stable=True)
    prob = torch.softmax(scale * sorted_s, dim=-1)              # NaN on the row without candidates
    before = prob.cumsum(dim=-1) - prob                         # mass strictly before each position
    count = (before < case.value).sum(dim=-1).clamp(min=1)
    return order, torch.minimum(count, n_cand)


def causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_block_of(block: int, flex_block: int) -> int:
    return flex_block if flex_block and block > flex_block and block % flex_block == 0 else block


def block_mask_of(idx, count, block: int, n: int, fb: int, q_blocks: bool = False):
    """BlockMask.from_kv_blocks at BLOCK_SIZE fb (fb divides block): for query tile t of block
    I = t // r (r = block // fb), full kv tiles = the r tiles of each selected block and the own
    block's tiles before t; the one partial tile = t (the diagonal), masked by q >= kv."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    heads, nb, c = idx.shape
    dev = idx.device
    r, nt = block // fb, n // fb
    sub = torch.arange(r, device=dev)
    tiles = (idx[..., None] * r + sub).reshape(heads, nb, c * r)
    valid = (torch.arange(c, device=dev)[None, None, :] < count[..., None])
    valid = valid[..., None].expand(heads, nb, c, r).reshape(heads, nb, c * r)
    t = torch.arange(nt, device=dev)
    row_block = t // r
    tiles, valid = tiles[:, row_block], valid[:, row_block]    # [H, nt, c * r]
    if r > 1:
        own = row_block[:, None] * r + sub[None, :]             # [nt, r]
        tiles = torch.cat([own.expand(heads, nt, r), tiles], dim=-1)
        valid = torch.cat([(own < t[:, None]).expand(heads, nt, r), valid], dim=-1)
    full = torch.where(valid, tiles, nt).sort(dim=-1).values   # ascending, padding (nt) last
    width = full.shape[-1]
    if width >= nt:
        full = full[..., :nt]
    else:
        full = torch.cat([full, full.new_full((heads, nt, nt - width), nt)], dim=-1)
    full = full.masked_fill(full >= nt, 0)
    full_num = valid.sum(dim=-1)
    kv_num = torch.ones((1, heads, nt), dtype=torch.int32, device=dev)
    kv_idx = torch.zeros((1, heads, nt, nt), dtype=torch.int32, device=dev)
    kv_idx[..., 0] = t.to(torch.int32)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num[None].to(torch.int32),
                                    full[None].to(torch.int32), BLOCK_SIZE=fb, mask_mod=causal_mask_mod,
                                    seq_lengths=(n, n), compute_q_blocks=q_blocks)


def selection_table(idx, count):
    """bool [H, nb, nb]: selected (head, query block, key block)."""
    import torch

    heads, nb, c = idx.shape
    keep = torch.arange(c, device=idx.device)[None, None, :] < count[..., None]
    table = torch.zeros((heads, nb, nb), dtype=torch.bool, device=idx.device)
    return table.scatter_(-1, idx, keep)        # idx holds distinct blocks within a row


def dense_of_selection(idx, count, block: int, n: int):
    """bool [H, n, n]: the Flex way's mask (causal and (selected block or own block))."""
    import torch

    table = selection_table(idx, count)
    ib = torch.arange(n, device=idx.device) // block
    m = table[:, ib][:, :, ib] | (ib[:, None] == ib[None, :])
    return m & (torch.arange(n, device=idx.device)[:, None] >= torch.arange(n, device=idx.device)[None, :])


def kept_pairs(count, block: int, n: int) -> int:
    heads, nb = count.shape
    return int(count.sum()) * block * block + heads * nb * block * (block + 1) // 2


