"""The backward kernel skeleton: FlashAttention-2 gradients over the forward's tiles.

Appended to every generated module after the forward skeleton (codegen/emit.py), so one
compiled file serves both passes; the hooks come as ``tl.constexpr`` functions as in
codegen/skeleton.py (``MASK_FN``, ``SCORE_FN`` and ``SCORE_GRAD_FN``: d(score clause)/d(score)
at the raw scaled score, codegen/lower.py). Three kernels, launched by codegen/backward.py:

* ``attn_bwd_preprocess`` — one program per (query tile, batch x head): ``Dm = rowsum(dO * O)
  - dlse`` in fp32 ([B, H, Lq]; ``dlse`` the gradient into lse, absent when lse is unused).
* ``attn_bwd_dq`` — one program per (query tile, batch x head, group), walking the forward's own
  full and partial key-tile tables (band or list form): it recomputes ``s = scale * q k^T``, the
  mask hook on partial tiles, the score hook, ``P = exp(score - lse)`` with the call's final lse
  (0 at pairs that are not allowed and on rows whose lse is -inf), ``dP = dO V^T``,
  ``dS = P (dP - Dm)`` times the score clause's derivative (``HAS_SCORE_GRAD``), and stores
  ``dQ = scale * dS K`` (fp32) for its group's rows.
* ``attn_bwd_dkdv`` — one program per (key tile, batch x KV head, group), walking the
  *transposed* tables (per key tile, its full and partial query tiles) of every query head of
  the KV head's group in turn, so a GQA group's sum stays inside one program (no atomics). It
  computes the transposed tile (``s^T = scale * k q^T``, the hooks called with the positions
  transposed: they are elementwise) and accumulates ``dV += P^T dO`` and
  ``dK += scale * dS^T Q`` in fp32; stores dK, dV for its group's key rows into the group's
  slice of the output (``s_kg``, ``s_vg``: 0 when the host proved the groups' key rows disjoint).

Numerics as the forward: exact fp32 products unless ``NATIVE_DOT`` with fp16/bf16 inputs
(tensor cores, fp32 accumulation); float64 inputs are computed in float32; every offset is
int64. Rows with lse -inf give exact zeros; a NaN or +inf lse may give NaN gradients.
Deterministic: every output element is written by one program, once.
"""

import triton
import triton.language as tl

LOG2E_B = tl.constexpr(1.4426950408889634)


@triton.jit
def _dot(a, b, NATIVE: tl.constexpr):
    """a @ b in fp32: exact fp32 products, or with ``NATIVE`` (16-bit operands) tensor cores
    with fp32 accumulation."""
    if NATIVE:
        r = tl.dot(a, b).to(tl.float32)
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return r


@triton.jit
def _key_rows(idx, k_row0, nk, STEP_K: tl.constexpr, RUN_K: tl.constexpr):
    """(rows, in range) of compressed key indices ``idx`` (codegen/gather.py key_rows)."""
    if RUN_K == 1:
        cols = k_row0 + idx * STEP_K
        ok = idx < nk
    else:
        cols = k_row0 + (idx // RUN_K) * STEP_K + idx % RUN_K
        ok = (idx < nk) & (cols >= 0)
    return cols, ok


@triton.jit
def _runs(base, BAND: tl.constexpr, RUNS: tl.constexpr, TABLE):
    """The run bounds of a row of a band-form tile table (codegen/tile_tables.py), read once
    per row: (first of run 0, its length, first of run 1, end of run 1 in walk order, first of
    run 2); the last two only with ``RUNS`` 3. Zeros for list tables (not read)."""
    r0 = base * 0
    len0 = r0
    r1 = r0
    end1 = r0
    r2 = r0
    if BAND:
        r0 = tl.load(TABLE + base)
        len0 = tl.load(TABLE + base + 1)
        r1 = tl.load(TABLE + base + 2)
        if RUNS == 3:
            end1 = len0 + tl.load(TABLE + base + 3)
            r2 = tl.load(TABLE + base + 4)
    return r0, len0, r1, end1, r2


@triton.jit
def _walk(i, base, r0, len0, r1, end1, r2, BAND: tl.constexpr, RUNS: tl.constexpr, TABLE):
    """The i-th tile of a row of a tile table: from its run bounds (:func:`_runs`) in band
    form, else read from the index list at ``base``."""
    if BAND:
        if RUNS == 2:
            j = tl.where(i < len0, r0 + i, r1 + (i - len0))
        else:
            j = tl.where(i < len0, r0 + i, tl.where(i < end1, r1 + (i - len0), r2 + (i - end1)))
    else:
        j = tl.load(TABLE + base + i)
    return j.to(tl.int64)


@triton.jit
def _grads(s, pos_q, pos_k, ok, lse2, dp, dm, h, q_len, kv_len, heads, kv_heads,
           t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
           t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
           t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
           t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
           MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD_FN: tl.constexpr,
           USE_MASK: tl.constexpr, HAS_SCORE: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr):
    """(P, dS_raw) of one tile in either orientation: ``s`` the scaled scores, ``pos_q`` /
    ``pos_k`` positions broadcasting to its shape, ``ok`` the in-range pairs of rows whose lse
    is not -inf, ``lse2`` the row's lse times log2(e), ``dp`` = dO V^T and ``dm`` =
    rowsum(dO O) - dlse, broadcast likewise. Both results are 0 at every pair not allowed (the
    mask, ``ok``, or a -inf score), whatever the derivative is there."""
    allowed = ok
    if USE_MASK:
        allowed = allowed & MASK_FN(s, pos_q, pos_k, h, q_len, kv_len, heads, kv_heads,
                                    t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                                    t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                                    t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                                    t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2)
    score = s
    if HAS_SCORE:
        score = SCORE_FN(s, pos_q, pos_k, h, q_len, kv_len, heads, kv_heads,
                         t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                         t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                         t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                         t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2).to(tl.float32)
    allowed = allowed & (score != -float("inf"))
    p = tl.where(allowed, tl.exp2(tl.where(allowed, score * LOG2E_B - lse2, 0.0)), 0.0)
    ds = p * (dp - dm)
    if HAS_SCORE_GRAD:
        ds = ds * SCORE_GRAD_FN(s, pos_q, pos_k, h, q_len, kv_len, heads, kv_heads,
                                t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                                t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                                t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                                t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2).to(tl.float32)
    return p, tl.where(allowed, ds, 0.0)


@triton.jit
def attn_bwd_preprocess(O, DO, DLSE, DM,  # noqa: E741 - the usual names of attention operands
                        sob, soh, som, sod, sdb, sdh, sdm, sdd, slb, slh,
                        q_len, heads, n_qt,
                        HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, DV: tl.constexpr,
                        DV_PAD: tl.constexpr):
    # grid: (query tiles x batch x heads,); DM and DLSE are [B, H, Lq] with strides slb, slh, 1
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % n_qt
    bh = pid // n_qt
    b = bh // heads
    h = bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, DV_PAD)
    in_q = rows < q_len
    msk = in_q[:, None] & (offs[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * som + offs[None, :] * sod, mask=msk,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdm + offs[None, :] * sdd, mask=msk,
                 other=0.0).to(tl.float32)
    dm = tl.sum(o * do, 1)
    if HAS_DLSE:
        dm = dm - tl.load(DLSE + b * slb + h * slh + rows, mask=in_q, other=0.0).to(tl.float32)
    tl.store(DM + b * slb + h * slh + rows, dm, mask=in_q)


@triton.jit
def _dq_tile(acc, q, do, lse2, dm, ok_q, pos_q, k_base, v_base, j, h, k_row0, nk,
             skn, skd, svn, svd, offs_n, offs_d, offs_dv, q_len, kv_len, heads, kv_heads, scale,
             t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
             t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
             t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
             t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
             MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD_FN: tl.constexpr,
             USE_MASK: tl.constexpr, HAS_SCORE: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr,
             D: tl.constexpr, DV: tl.constexpr, NATIVE_DOT: tl.constexpr,
             STEP_K: tl.constexpr, RUN_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc + dS_raw K over key tile ``j`` (compressed index) of the program's query rows."""
    cols, in_kv = _key_rows(j * BLOCK_N + offs_n, k_row0, nk, STEP_K, RUN_K)
    kk = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd,
                 mask=in_kv[:, None] & (offs_d[None, :] < D), other=0.0)
    vv = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :] * svd,
                 mask=in_kv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    s = _dot(q, tl.trans(kk), NATIVE_DOT) * scale
    dp = _dot(do, tl.trans(vv), NATIVE_DOT)
    _p, ds = _grads(s, pos_q[:, None], cols[None, :].to(tl.int64), ok_q[:, None] & in_kv[None, :],
                    lse2[:, None], dp, dm[:, None], h, q_len, kv_len, heads, kv_heads,
                    t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                    t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                    t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                    t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
                    MASK_FN, SCORE_FN, SCORE_GRAD_FN, USE_MASK, HAS_SCORE, HAS_SCORE_GRAD)
    if NATIVE_DOT:
        ds = ds.to(kk.dtype)
    return acc + _dot(ds, kk, NATIVE_DOT)


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, DM, DQ,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sdb, sdh, sdm, sdd, slb, slh, sgb, sgh, sgm, sgd,
                q_len, kv_len, heads, kv_heads, scale, n_qt,
                GROUPS, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
                s_nb, s_ng, s_nh, s_nm, s_ib, s_ig, s_ih, s_im,
                t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2, t0_sb,
                t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2, t1_sb,
                t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2, t2_sb,
                t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2, t3_sb,
                MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD_FN: tl.constexpr,
                HAS_SCORE: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                NATIVE_DOT: tl.constexpr, STEP_Q: tl.constexpr, STEP_K: tl.constexpr,
                BAND: tl.constexpr, RUN_K: tl.constexpr):
    # axis 0: (batch x head, query tile), query tiles fastest; axis 1: groups (as attn_fwd).
    # DQ: fp32 [B, H, Lq, D] (strides sg*); LSE, DM: [B, H, Lq] (strides slb, slh, 1).
    # NATIVE_DOT here: 16-bit operands multiplied on tensor cores (the host decides)
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % n_qt
    bh = pid // n_qt
    g = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    kvh = h // (heads // kv_heads)
    q_row0 = tl.load(GROUPS + g * 4)
    nq = tl.load(GROUPS + g * 4 + 1)
    k_row0 = tl.load(GROUPS + g * 4 + 2)
    nk = tl.load(GROUPS + g * 4 + 3)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_q = offs_m < nq
    rows = q_row0 + offs_m * STEP_Q
    pos_q = (rows + (kv_len - q_len)).to(tl.int64)
    t0 = t0 + b * t0_sb
    t1 = t1 + b * t1_sb
    t2 = t2 + b * t2_sb
    t3 = t3 + b * t3_sb
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=in_q[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if Q.dtype.element_ty == tl.float64:        # no float64 dot: compute in float32
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if NATIVE_DOT:
        do = do.to(q.dtype)
    lse = tl.load(LSE + b * slb + h * slh + rows, mask=in_q, other=-float("inf")).to(tl.float32)
    dm = tl.load(DM + b * slb + h * slh + rows, mask=in_q, other=0.0)
    ok_q = in_q & (lse != -float("inf"))        # rows without an allowed key: exact zeros
    lse2 = tl.where(ok_q, lse * LOG2E_B, 0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    num_off = b * s_nb + g * s_ng + h * s_nh + pid_m * s_nm
    idx_off = b * s_ib + g * s_ig + h * s_ih + pid_m * s_im
    n_full = tl.load(FULL_NUM + num_off)
    n_part = tl.load(PART_NUM + num_off)
    f0, f_len0, f1, f_end1, f2 = _runs(idx_off, BAND, 2, FULL_IDX)
    p0, p_len0, p1, p_end1, p2 = _runs(idx_off, BAND, 3, PART_IDX)
    for i in range(0, n_full):
        j = _walk(i, idx_off, f0, f_len0, f1, f_end1, f2, BAND, 2, FULL_IDX)
        acc = _dq_tile(acc, q, do, lse2, dm, ok_q, pos_q, k_base, v_base, j, h, k_row0, nk,
                       skn, skd, svn, svd, offs_n, offs_d, offs_dv, q_len, kv_len, heads,
                       kv_heads, scale,
                       t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                       t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                       t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                       t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
                       MASK_FN, SCORE_FN, SCORE_GRAD_FN, False, HAS_SCORE, HAS_SCORE_GRAD,
                       D, DV, NATIVE_DOT, STEP_K, RUN_K, BLOCK_N)
    for i in range(0, n_part):
        j = _walk(i, idx_off, p0, p_len0, p1, p_end1, p2, BAND, 3, PART_IDX)
        acc = _dq_tile(acc, q, do, lse2, dm, ok_q, pos_q, k_base, v_base, j, h, k_row0, nk,
                       skn, skd, svn, svd, offs_n, offs_d, offs_dv, q_len, kv_len, heads,
                       kv_heads, scale,
                       t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                       t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                       t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                       t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
                       MASK_FN, SCORE_FN, SCORE_GRAD_FN, True, HAS_SCORE, HAS_SCORE_GRAD,
                       D, DV, NATIVE_DOT, STEP_K, RUN_K, BLOCK_N)
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgm + offs_d[None, :] * sgd, acc * scale,
             mask=in_q[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_tile(dk, dv, kk, vv, pos_k, in_kv, q_base, do_base, l_base, m_base, i, h, q_row0, nq,
               sqm, sqd, sdm, sdd, offs_m, offs_d, offs_dv, q_len, kv_len, heads, kv_heads,
               scale,
               t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
               t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
               t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
               t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
               MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD_FN: tl.constexpr,
               USE_MASK: tl.constexpr, HAS_SCORE: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr,
               D: tl.constexpr, DV: tl.constexpr, NATIVE_DOT: tl.constexpr,
               STEP_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """(dk + dS_raw^T Q, dv + P^T dO) over query tile ``i`` (compressed index) of head ``h``, in
    the transposed orientation: tiles [BLOCK_N, BLOCK_M]."""
    idx = i * BLOCK_M + offs_m
    in_q = idx < nq
    rows = q_row0 + idx * STEP_Q
    pos_q = (rows + (kv_len - q_len)).to(tl.int64)
    q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_base + rows[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=in_q[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if NATIVE_DOT:
        do = do.to(kk.dtype)
    lse = tl.load(l_base + rows, mask=in_q, other=-float("inf")).to(tl.float32)
    dm = tl.load(m_base + rows, mask=in_q, other=0.0)
    ok_q = in_q & (lse != -float("inf"))        # rows without an allowed key: exact zeros
    lse2 = tl.where(ok_q, lse * LOG2E_B, 0.0)
    st = _dot(kk, tl.trans(q), NATIVE_DOT) * scale
    dpt = _dot(vv, tl.trans(do), NATIVE_DOT)
    pt, dst = _grads(st, pos_q[None, :], pos_k[:, None], in_kv[:, None] & ok_q[None, :],
                     lse2[None, :], dpt, dm[None, :], h, q_len, kv_len, heads, kv_heads,
                     t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                     t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                     t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                     t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
                     MASK_FN, SCORE_FN, SCORE_GRAD_FN, USE_MASK, HAS_SCORE, HAS_SCORE_GRAD)
    if NATIVE_DOT:
        pt = pt.to(kk.dtype)
        dst = dst.to(kk.dtype)
    return dk + _dot(dst, q, NATIVE_DOT), dv + _dot(pt, do, NATIVE_DOT)


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, DM, DK, DV_OUT,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  sdb, sdh, sdm, sdd, slb, slh, s_kg, sob, soh, son, sod, s_vg, s_pb, s_ph, s_pn, s_pd,
                  q_len, kv_len, heads, kv_heads, scale, n_kt,
                  GROUPS, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
                  s_nb, s_ng, s_nh, s_nm, s_ib, s_ig, s_ih, s_im,
                  t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2, t0_sb,
                  t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2, t1_sb,
                  t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2, t2_sb,
                  t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2, t3_sb,
                  MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, SCORE_GRAD_FN: tl.constexpr,
                  HAS_SCORE: tl.constexpr, HAS_SCORE_GRAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                  NATIVE_DOT: tl.constexpr, STEP_Q: tl.constexpr, STEP_K: tl.constexpr,
                  BAND: tl.constexpr, RUN_K: tl.constexpr):
    # axis 0: (batch x KV head, key tile), key tiles fastest; axis 1: groups. The tables are
    # the transposed ones [Bt, G, H, nKT(, W)] (rows: key tiles; entries: query tiles).
    # DK, DV_OUT: fp32 [G or 1, B, KVH, Lkv, D / Dv] (group strides s_kg, s_vg: 0 for one)
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid % n_kt
    bkv = pid // n_kt
    g = tl.program_id(1)
    b = (bkv // kv_heads).to(tl.int64)
    kvh = (bkv % kv_heads).to(tl.int64)
    per_kv = heads // kv_heads
    q_row0 = tl.load(GROUPS + g * 4)
    nq = tl.load(GROUPS + g * 4 + 1)
    k_row0 = tl.load(GROUPS + g * 4 + 2)
    nk = tl.load(GROUPS + g * 4 + 3)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    cols, in_kv = _key_rows(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), k_row0, nk, STEP_K, RUN_K)
    pos_k = cols.to(tl.int64)
    t0 = t0 + b * t0_sb
    t1 = t1 + b * t1_sb
    t2 = t2 + b * t2_sb
    t3 = t3 + b * t3_sb
    kk = tl.load(K + b * skb + kvh * skh + cols[:, None] * skn + offs_d[None, :] * skd,
                 mask=in_kv[:, None] & (offs_d[None, :] < D), other=0.0)
    vv = tl.load(V + b * svb + kvh * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
                 mask=in_kv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if K.dtype.element_ty == tl.float64:        # no float64 dot: compute in float32
        kk = kk.to(tl.float32)
        vv = vv.to(tl.float32)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], dtype=tl.float32)
    for r in range(0, per_kv):                  # the query heads of this KV head, in order
        h = kvh * per_kv + r
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        l_base = LSE + b * slb + h * slh
        m_base = DM + b * slb + h * slh
        num_off = b * s_nb + g * s_ng + h * s_nh + pid_n * s_nm
        idx_off = b * s_ib + g * s_ig + h * s_ih + pid_n * s_im
        n_full = tl.load(FULL_NUM + num_off)
        n_part = tl.load(PART_NUM + num_off)
        f0, f_len0, f1, f_end1, f2 = _runs(idx_off, BAND, 2, FULL_IDX)
        p0, p_len0, p1, p_end1, p2 = _runs(idx_off, BAND, 3, PART_IDX)
        for t in range(0, n_full):
            i = _walk(t, idx_off, f0, f_len0, f1, f_end1, f2, BAND, 2, FULL_IDX)
            dk, dv = _dkdv_tile(dk, dv, kk, vv, pos_k, in_kv, q_base, do_base, l_base, m_base,
                                i, h, q_row0, nq, sqm, sqd, sdm, sdd, offs_m, offs_d, offs_dv,
                                q_len, kv_len, heads, kv_heads, scale,
                                t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                                t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                                t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                                t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
                                MASK_FN, SCORE_FN, SCORE_GRAD_FN, False, HAS_SCORE,
                                HAS_SCORE_GRAD, D, DV, NATIVE_DOT, STEP_Q, BLOCK_M)
        for t in range(0, n_part):
            i = _walk(t, idx_off, p0, p_len0, p1, p_end1, p2, BAND, 3, PART_IDX)
            dk, dv = _dkdv_tile(dk, dv, kk, vv, pos_k, in_kv, q_base, do_base, l_base, m_base,
                                i, h, q_row0, nq, sqm, sqd, sdm, sdd, offs_m, offs_d, offs_dv,
                                q_len, kv_len, heads, kv_heads, scale,
                                t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                                t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                                t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                                t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
                                MASK_FN, SCORE_FN, SCORE_GRAD_FN, True, HAS_SCORE,
                                HAS_SCORE_GRAD, D, DV, NATIVE_DOT, STEP_Q, BLOCK_M)
    rows_ok = in_kv[:, None]
    tl.store(DK + g * s_kg + b * sob + kvh * soh + cols[:, None] * son + offs_d[None, :] * sod,
             dk * scale, mask=rows_ok & (offs_d[None, :] < D))
    tl.store(DV_OUT + g * s_vg + b * s_pb + kvh * s_ph + cols[:, None] * s_pn
             + offs_dv[None, :] * s_pd, dv, mask=rows_ok & (offs_dv[None, :] < DV))
