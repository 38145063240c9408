"""The forward kernel skeleton: online-softmax attention over listed key tiles.

One program per (query tile, batch x head) (grid axis 0, query tiles fastest). It walks the
*full* key tiles of its query tile (no mask hook: only the ragged end of ``kv_len`` is masked)
and then the *partial* ones (the generated ``MASK_FN`` hook decides each pair), with fp32
accumulators and exp2. With ``NATIVE_DOT`` (compiled mode) fp16/bf16 inputs multiply in their
own type (tensor cores) with fp32 accumulation; otherwise (fp32 inputs, and Triton's
interpreter, whose bf16 products are not reliable) the products are exact fp32. The score hook
``SCORE_FN`` (if ``HAS_SCORE``) rewrites the scaled scores before the softmax; a pair whose
score is -inf is dropped like a masked one. Rows without any allowed key end with output 0 and
lse -inf. The tile lists come from the analysis (attndsl.analysis.descriptors.TileLists).

Non-finite values (docs/language.md, "Non-finite values"): an infinite row maximum rescales by
nothing, so a +inf score at an allowed pair leaves the row sum ``l_i`` at +inf and a NaN score
(with or without +inf) at NaN; the row then ends with output NaN and lse ``l_i``. A program
whose accumulator ends with a non-finite entry sets its ``REDO`` flag; the launch with
``SAFE_V`` (run after every launch by codegen/kernel.py) redoes exactly those programs, reading
V at allowed keys only: non-finite entries are zeroed for the product and each (row, column)
whose allowed keys hold one gets NaN, +inf or -inf added (counted exactly by one extra product
of the allowed pairs with codes 1 / 256 / 257 for +inf / -inf / NaN), so a disallowed key's
value never reaches a row. All positions and offsets are int64.

A third program axis runs *groups*: a group is a set of query rows ``q_row0 + STEP_Q * i``
against key rows ``k_row0 + STEP_K * j`` (``k_row0 + STEP_K * (j // RUN_K) + j % RUN_K`` for
runs of consecutive residues), with its own tile lists over those compressed indices. One
group of every row (steps 1) is the plain kernel; a residue-class gather has one group per
residue class, so a dilated pattern's keys form dense tiles.

Hooks are passed as ``tl.constexpr`` functions, so one skeleton serves every pattern; the
generated module only holds the hooks (codegen/lower.py).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
TINY = tl.constexpr(1.1754943508222875e-38)     # the smallest normal float32


@triton.jit
def _poison(allowed, vt, EXACT: tl.constexpr):
    """[BLOCK_M, DV_PAD]: NaN, +inf or -inf where a row's allowed keys hold a non-finite V entry
    in that column (NaN for a NaN or both signs), else 0. Codes +inf 1, -inf 256, NaN 257 (a NaN
    counts as both signs) sum to P + 256 N with P, N <= BLOCK_N <= 128: exact in fp32, from
    exact fp16 products on tensor cores (``EXACT``: fp32 products, as the attention dots)."""
    tl.static_assert(vt.shape[0] <= 128)
    code = tl.where(vt != vt, 257.0,
                    tl.where(vt == float("inf"), 1.0, tl.where(vt == -float("inf"), 256.0, 0.0)))
    if EXACT:
        cnt = tl.dot(allowed.to(tl.float32), code, input_precision="ieee")
    else:
        cnt = tl.dot(allowed.to(tl.float16), code.to(tl.float16)).to(tl.float32)
    neg = cnt >= 256.0
    pos = (cnt - tl.floor(cnt / 256.0) * 256.0) >= 1.0
    return tl.where(pos & neg, float("nan"),
                    tl.where(pos, float("inf"), tl.where(neg, -float("inf"), 0.0)))


@triton.jit
def _tile(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_n, start_n, h, pos_q, k_row0, nk,
          stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, kv_len, q_len, heads,
          kv_heads, scale,
          t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
          t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
          t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
          t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
          MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, USE_MASK: tl.constexpr,
          HAS_SCORE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
          NATIVE_DOT: tl.constexpr, STEP_K: tl.constexpr, EVEN_N: tl.constexpr,
          D_PAD: tl.constexpr, DV_PAD: tl.constexpr, RUN_K: tl.constexpr, SAFE_V: tl.constexpr):
    idx = start_n + offs_n
    if RUN_K == 1:                      # key rows (STEP_K > 1: one residue class, gathered)
        cols = k_row0 + idx * STEP_K
        in_kv = idx < nk
    else:                               # RUN_K consecutive residues per period of STEP_K; a run
        cols = k_row0 + (idx // RUN_K) * STEP_K + idx % RUN_K     # that wraps starts below 0
        in_kv = (idx < nk) & (cols >= 0)
    k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
    if EVEN_N and (D == D_PAD):         # every listed tile lies inside the keys: no load mask
        kt = tl.load(k_ptrs)
    else:
        kt = tl.load(k_ptrs, mask=in_kv[None, :] & (offs_d[:, None] < D), other=0.0)
    if (q.dtype == tl.float32) or (not NATIVE_DOT):     # exact fp32 products
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee") * scale
    else:                               # fp16/bf16: tensor cores, fp32 accumulation
        s = tl.dot(q, kt.to(q.dtype)).to(tl.float32) * scale
    pos_k = cols[None, :].to(tl.int64)
    allowed = in_kv[None, :] & (pos_q[:, None] == pos_q[:, None])
    if USE_MASK:
        allowed = allowed & MASK_FN(s, pos_q[:, None], pos_k, h, q_len, kv_len, heads, kv_heads,
                                    t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                                    t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                                    t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                                    t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2)
    if HAS_SCORE:
        s = SCORE_FN(s, pos_q[:, None], pos_k, h, q_len, kv_len, heads, kv_heads,
                     t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                     t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                     t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                     t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2).to(tl.float32)
    if USE_MASK or (not EVEN_N):
        allowed = allowed & (s != -float("inf"))
        s2 = tl.where(allowed, s * LOG2E, -float("inf"))
    else:                               # a full tile inside the keys: every pair counts, and a
        s2 = s * LOG2E                  # -inf score gives exp2(-inf) = 0 by itself
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    # an infinite maximum rescales by nothing: a +inf score then adds exp2(+inf) = +inf to the
    # row sum and a NaN score NaN, so l_i ends +inf (+inf scores only) or NaN (a NaN seen)
    m_safe = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    if SAFE_V:      # alpha > 0 while the row has an allowed key: an infinite acc entry stays
        alpha = tl.maximum(alpha, TINY)     # infinite (a finite one moves far below an ulp)
    if USE_MASK or (not EVEN_N):
        p = tl.where(allowed, tl.exp2(s2 - m_safe[:, None]), 0.0)
    else:
        p = tl.exp2(s2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if EVEN_N and (DV == DV_PAD):
        vt = tl.load(v_ptrs)
    else:
        vt = tl.load(v_ptrs, mask=in_kv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    exact = (q.dtype == tl.float32) or (not NATIVE_DOT)     # exact fp32 products
    if SAFE_V:                          # the second pass: V is read at allowed keys only
        v32 = vt.to(tl.float32)
        vt = tl.where((v32 == v32) & (tl.abs(v32) != float("inf")), v32, 0.0).to(vt.dtype)
    if exact:
        pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(q.dtype), vt.to(q.dtype)).to(tl.float32)
    if SAFE_V:
        pv = pv + _poison(allowed & (s != -float("inf")), v32, exact)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def attn_fwd(Q, K, V, O, LSE, REDO,  # noqa: E741 - the usual names of attention operands
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
             slb, slh,
             q_len, kv_len, heads, kv_heads, scale, n_qt,
             GROUPS, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX,
             s_nb, s_ng, s_nh, s_nm, s_ib, s_ig, s_ih, s_im,
             t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2, t0_sb,
             t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2, t1_sb,
             t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2, t2_sb,
             t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2, t3_sb,
             MASK_FN: tl.constexpr, SCORE_FN: tl.constexpr, HAS_SCORE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
             NATIVE_DOT: tl.constexpr, STEP_Q: tl.constexpr, STEP_K: tl.constexpr,
             BAND: tl.constexpr, EVEN_N: tl.constexpr, RUN_K: tl.constexpr,
             SAFE_V: tl.constexpr):
    # axis 0: (batch x head, query tile), query tiles fastest (CUDA allows 2**31 - 1 programs
    # there, 65535 on the other axes); axis 1: groups. int64: tile offsets pass 2**31 keys
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % n_qt
    bh = pid // n_qt
    g = tl.program_id(1)
    # int64: with int32 sizes and strides, b * sqb (and h * sqh) would wrap around for
    # operands of 2**31 elements or more (the products stay scalars, so this costs nothing)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    kvh = h // (heads // kv_heads)
    # group g: query rows q_row0 + STEP_Q * i (i < nq) against key rows k_row0 + STEP_K * j
    # (j < nk); one group of all rows unless the keys are gathered by residue class
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
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    # tensor inputs of this batch element (their batch stride is 0 when they have none)
    t0 = t0 + b * t0_sb
    t1 = t1 + b * t1_sb
    t2 = t2 + b * t2_sb
    t3 = t3 + b * t3_sb
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    # Two loops, not one: USE_MASK must be a compile-time constant so that full tiles carry no
    # trace of the mask hook; the argument lists repeat because the slots are plain arguments
    # (tuple arguments are not relied on across the Triton versions we support).
    # The tile tables are [batch or 1, group, head, query tile(, slot)]: batch stride 0 when
    # every batch element shares them.
    num_off = b * s_nb + g * s_ng + h * s_nh + pid_m * s_nm
    idx_off = b * s_ib + g * s_ig + h * s_ih + pid_m * s_im
    # BAND: the index tables hold run bounds (codegen/tile_tables.py), the tiles are arithmetic
    n_full = tl.load(FULL_NUM + num_off)
    n_part = tl.load(PART_NUM + num_off)
    full0 = n_full * 0
    full0_len = n_full * 0
    full1 = n_full * 0
    run0 = n_full * 0
    run0_len = n_full * 0
    run1 = n_full * 0
    run1_end = n_full * 0
    run2 = n_full * 0
    if BAND:                # (the list tables may be narrower than 5: read only in band form)
        full0 = tl.load(FULL_IDX + idx_off)
        full0_len = tl.load(FULL_IDX + idx_off + 1)
        full1 = tl.load(FULL_IDX + idx_off + 2)
        run0 = tl.load(PART_IDX + idx_off)
        run0_len = tl.load(PART_IDX + idx_off + 1)
        run1 = tl.load(PART_IDX + idx_off + 2)
        run1_end = run0_len + tl.load(PART_IDX + idx_off + 3)
        run2 = tl.load(PART_IDX + idx_off + 4)
    # A launch with SAFE_V (codegen/kernel.py runs it after every launch) redoes the programs
    # whose accumulator ended with a non-finite entry (a NaN or infinite V entry, a NaN or
    # +inf score): it walks the same tiles with V read at allowed keys only (non-finite entries
    # zeroed for p @ v and counted exactly by _poison), so a disallowed key's value never
    # reaches a row. The first launch carries no trace of the check but one reduction at the
    # end, and its registers are not those of the check; the second exits at once elsewhere.
    flag = REDO + g * tl.num_programs(0) + pid
    go = 1
    if SAFE_V:
        go = tl.load(flag)
    if go > 0:
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
        if Q.dtype.element_ty == tl.float64:       # no float64 dot: compute in float32
            q = q.to(tl.float32)
        for i in range(0, n_full):
            if BAND:
                j = tl.where(i < full0_len, full0 + i, full1 + (i - full0_len))
            else:
                j = tl.load(FULL_IDX + idx_off + i)
            start_n = j.to(tl.int64) * BLOCK_N
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_n, start_n, h,
                                  pos_q, k_row0, nk, skn, skd, svn, svd, offs_d, offs_dv, kv_len,
                                  q_len, heads, kv_heads, scale,
                                  t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                                  t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                                  t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                                  t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
                                  MASK_FN, SCORE_FN, False, HAS_SCORE, D, DV, NATIVE_DOT, STEP_K,
                                  EVEN_N, D_PAD, DV_PAD, RUN_K, SAFE_V)
        for i in range(0, n_part):
            if BAND:
                j = tl.where(i < run0_len, run0 + i,
                             tl.where(i < run1_end, run1 + (i - run0_len), run2 + (i - run1_end)))
            else:
                j = tl.load(PART_IDX + idx_off + i)
            start_n = j.to(tl.int64) * BLOCK_N
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_n, start_n, h,
                                  pos_q, k_row0, nk, skn, skd, svn, svd, offs_d, offs_dv, kv_len,
                                  q_len, heads, kv_heads, scale,
                                  t0, t0_n0, t0_n1, t0_n2, t0_s0, t0_s1, t0_s2,
                                  t1, t1_n0, t1_n1, t1_n2, t1_s0, t1_s1, t1_s2,
                                  t2, t2_n0, t2_n1, t2_n2, t2_s0, t2_s1, t2_s2,
                                  t3, t3_n0, t3_n1, t3_n2, t3_s0, t3_s1, t3_s2,
                                  MASK_FN, SCORE_FN, True, HAS_SCORE, D, DV, NATIVE_DOT, STEP_K,
                                  EVEN_N, D_PAD, DV_PAD, RUN_K, SAFE_V)
        # l_i is NaN after a NaN score at an allowed pair, +inf after +inf scores only
        bad = (l_i != l_i) | (l_i == float("inf"))
        has = (l_i > 0.0) & (~bad)
        out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        out = tl.where(bad[:, None], float("nan"), out)
        tl.store(O + b * sob + h * soh + rows[:, None] * som + offs_dv[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=in_q[:, None] & (offs_dv[None, :] < DV))
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, -float("inf"))
        lse = tl.where(bad, l_i, lse)
        tl.store(LSE + b * slb + h * slh + rows, lse, mask=in_q)
        if not SAFE_V:
            n_bad = tl.sum(tl.where((acc == acc) & (tl.abs(acc) != float("inf")), 0, 1))
            tl.store(flag, (n_bad > 0).to(tl.int8))
