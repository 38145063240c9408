"""Tile classification on the device: evaluate a pattern's allowed-pair bounds on every pair
of a tile and reduce them to the tile's class.

One program per (candidate tile, batch row). ``CAND`` holds int64 linear indices
``(h * n_qt + qt) * n_kt + kt`` of the tiles to classify (a sound superset of the non-empty
ones, found on the host); program ``(i, b)`` writes the class of tile ``CAND[i]`` for batch row
``b`` to ``OUT + b * s_ob + CAND[i]`` as int8: 0 empty, 1 partial, 2 full. Tiles not listed are
left as the caller initialised them (zeros: empty).

The hooks follow the skeleton's convention (codegen/skeleton.py ``_tile``, argument list
``HOOK_ARGS`` of codegen/lower.py): ``q`` [CHUNK_M, 1] and ``k`` [1, BLOCK_N] absolute
positions (int64), ``h`` the query head (int64), the sizes, and the four tensor slots whose
pointers are moved by ``b * tI_sb`` (their batch stride, 0 when shared). ``UPPER_FN`` is
implied by "allowed" (mask and score not -inf) and decides *empty*: no in-range pair holds it.
``LOWER_FN`` implies "allowed" and decides *full*: every in-range pair holds it. With ``SAME``
(no score clause that may reach -inf) the two are one hook, evaluated once.

Ragged ends: a pair outside ``q_len`` x ``kv_len`` counts for neither (the attention kernel
masks it anyway); every tile has at least one in-range pair. Rows are walked in chunks of
``CHUNK_M`` (a divisor of ``BLOCK_M``) so that large tiles do not hold every pair at once.
"""

import triton
import triton.language as tl


@triton.jit
def classify_tiles(CAND, OUT, n_qt, n_kt, s_ob, q_len, kv_len, heads, kv_heads,
                   t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2, t0_sb,
                   t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2, t1_sb,
                   t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2, t2_sb,
                   t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2, t3_sb,
                   LOWER_FN: tl.constexpr, UPPER_FN: tl.constexpr, SAME: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_M: tl.constexpr):
    c = tl.load(CAND + tl.program_id(0)).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    kt = c % n_kt
    qt = (c // n_kt) % n_qt
    h = c // n_kt // n_qt
    # tensor inputs of this batch row (batch stride 0 when they have no batch dimension)
    t0 = t0 + b * t0_sb
    t1 = t1 + b * t1_sb
    t2 = t2 + b * t2_sb
    t3 = t3 + b * t3_sb
    cols = kt * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    in_k = cols < kv_len
    s = tl.zeros([CHUNK_M, BLOCK_N], dtype=tl.float32)     # no score: the bounds are score-free
    # per pair, over the row chunks: bit 0 = an in-range pair holds UPPER, bit 1 = an in-range
    # pair fails LOWER (element-wise only: one reduction at the end)
    seen = tl.zeros([CHUNK_M, BLOCK_N], dtype=tl.int32)
    for m0 in range(0, BLOCK_M, CHUNK_M):
        rows = qt * BLOCK_M + m0 + tl.arange(0, CHUNK_M).to(tl.int64)
        inside = (rows < q_len)[:, None] & in_k[None, :]
        pos_q = rows + (kv_len - q_len)
        up = inside & UPPER_FN(s, pos_q[:, None], cols[None, :], h, q_len, kv_len, heads, kv_heads,
                               t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                               t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                               t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                               t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2)
        if SAME:
            low = up
        else:
            low = LOWER_FN(s, pos_q[:, None], cols[None, :], h, q_len, kv_len, heads, kv_heads,
                           t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                           t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                           t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                           t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2)
        fails = inside & (low == 0)
        seen = seen | up.to(tl.int32) | (fails.to(tl.int32) * 2)
    # one sum packs both counts: (pairs holding UPPER) + (pairs failing LOWER) * WEIGHT
    weight = CHUNK_M * BLOCK_N + 1
    packed = tl.sum(((seen & 1) + (seen // 2) * weight).to(tl.int64), axis=None)
    cls = tl.where(packed < weight, 2, tl.where(packed % weight > 0, 1, 0))
    tl.store(OUT + b * s_ob + c, cls.to(tl.int8))
