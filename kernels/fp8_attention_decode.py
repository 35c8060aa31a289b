"""Decode attention over the e4m3 KV cache with the block table read one key tile ahead (issue 14, opt-in).

    Semantics: kernels/unified_attention.py's _unified_attention_kernel (the same arguments, grid and math: outputs
    bit for bit), with one change in the key-tile loop: the block ids of tile t + 1 are loaded while tile t is read.

Why: in the unified kernel the K / V loads of a tile take their addresses from the block-table load of the same
iteration; at num_stages 2 Triton's pipeliner then keeps K / V one buffer deep behind that load (offline sm_90
TTGIR), so each tile's gathered loads wait on a table load first (H200 bs64 x 512 decode over e4m3: 31.2 us, 0.51
of the copy rate; 3 stages: 48.3). Carrying the next tile's ids in registers takes the table load off that path.
Switch: LORASERVE_ATTN_FP8_TABLE_AHEAD=1 (unified_attention picks this kernel for decode launches over the e4m3
cache); a separate kernel so the unified kernel (and its compiled cache) stays as it is.
"""
from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton
from .unified_attention import NO_SPECIALIZE

if HAS_TRITON:
    from .fp8_convert import e4m3_to_f16_pinned
    from .unified_attention import _find_seq, _quant_out_tail

    @triton.jit
    def _attend_ahead(acc, l_i, m_i, q, q_pos, table, k_base, v_base, t_lo, t_hi, kv_limit, scale_log2,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d,
                TILE_N: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_KV: tl.constexpr):
        """Online softmax over key tiles [t_lo, t_hi) of one sequence; acc (BLOCK_M, D_PAD), l_i, m_i
        (BLOCK_M,) fp32. MASKED: the tiles may hold keys past kv_limit or past a row's position.
        FP8_KV: K/V tiles are e4m3 codes, widened to q's dtype (exact: e4m3 fits bf16/fp16/fp32); the
        caller folds k_scale into scale_log2 and multiplies v_scale into the finished acc."""
        d_ok = offs_d < D
        # the block ids of the first tile now, of tile t + 1 while tile t is read: the K / V loads of a tile no
        # longer wait on its own table load (indices past kv_limit masked: never past the sequence's row)
        nxt = t_lo * TILE_N + offs_n
        blk_next = tl.load(table + nxt // BS, mask=nxt < kv_limit, other=0).to(tl.int64)
        for t in range(t_lo, t_hi):
            k_pos = t * TILE_N + offs_n                  # (TILE_N,)
            off = k_pos % BS
            block = blk_next
            nxt = k_pos + TILE_N
            blk_next = tl.load(table + nxt // BS, mask=nxt < kv_limit, other=0).to(tl.int64)
            if MASKED:
                kv_ok = k_pos < kv_limit
                k = tl.load(k_base + block[None, :] * stride_kb + off[None, :] * stride_ks + offs_d[:, None],
                            mask=kv_ok[None, :] & d_ok[:, None], other=0.0)         # (D_PAD, TILE_N)
                v = tl.load(v_base + block[:, None] * stride_vb + off[:, None] * stride_vs + offs_d[None, :],
                            mask=kv_ok[:, None] & d_ok[None, :], other=0.0)         # (TILE_N, D_PAD)
            else:
                if D == D_PAD:
                    k = tl.load(k_base + block[None, :] * stride_kb + off[None, :] * stride_ks + offs_d[:, None])
                    v = tl.load(v_base + block[:, None] * stride_vb + off[:, None] * stride_vs + offs_d[None, :])
                else:
                    k = tl.load(k_base + block[None, :] * stride_kb + off[None, :] * stride_ks + offs_d[:, None],
                                mask=d_ok[:, None], other=0.0)
                    v = tl.load(v_base + block[:, None] * stride_vb + off[:, None] * stride_vs + offs_d[None, :],
                                mask=d_ok[None, :], other=0.0)
            if FP8_KV:
                k = k.to(q.dtype)
                if FP8_KV == 2:   # fp16 operands, V widened in its load layout (kernels/fp8_convert.py: no byte gathers)
                    v = e4m3_to_f16_pinned(v)
                else:
                    v = v.to(q.dtype)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2              # (BLOCK_M, TILE_N) fp32
            if MASKED:
                s = tl.where((k_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a row with nothing visible yet (split-KV past its position) keeps m = -inf: no inf - inf
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = m_new
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(**NO_SPECIALIZE)
    def _fp8_decode_attention_kernel(
            q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
            k_scale_ptr, v_scale_ptr, scale_log2, num_seqs, num_tokens, num_splits,
            stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_tb, stride_ot, stride_oh, oq_ptr, os_ptr, opart_ptr, ocnt_ptr, stride_oq,
            H: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
            TILE_N: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
            SPLIT_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_KV: tl.constexpr,
            USE_PDL: tl.constexpr = False, FP16_OPS: tl.constexpr = False,
            QUANT_OUT: tl.constexpr = False,
            KVH_P2: tl.constexpr = 1, QBLOCK: tl.constexpr = 1, FP8_MAX_C: tl.constexpr = 448.0,
            MIN_SCALE_C: tl.constexpr = 1e-12):
        if USE_PDL:   # kernels/pdl.py: every program waits (spare tiles too), before reading q / K / V
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq = _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q)
        q_start = tl.load(qsl_ptr + seq).to(tl.int32)
        q_len = tl.load(qsl_ptr + seq + 1).to(tl.int32) - q_start
        num_local = tl.cdiv(q_len, BLOCK_Q)
        idx = tile - (q_start // BLOCK_Q + seq)
        if idx >= num_local:  # a spare tile of the static grid
            return
        local = num_local - 1 - idx  # the sequence's longest (last) rows first: better tail balance
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
        ctx_before = seq_len - q_len

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, TILE_N)
        q_row = local * BLOCK_Q + offs_m // G            # (BLOCK_M,) query index inside the sequence
        head = kvh * G + offs_m % G                      # (BLOCK_M,) query head
        row_ok = (q_row < q_len) & (offs_m < BLOCK_Q * G)
        d_ok = offs_d < D
        tok = (q_start + q_row).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)              # (BLOCK_M, D_PAD)
        q_pos = ctx_before + q_row                       # (BLOCK_M,) absolute position

        # keys [0, kv_limit) are visible to at least one row of this tile
        kv_limit = tl.minimum(seq_len, ctx_before + tl.minimum(local * BLOCK_Q + BLOCK_Q, q_len))
        num_tiles = tl.cdiv(kv_limit, TILE_N)
        if not SPLIT_KV:
            t_lo = 0
            t_hi = num_tiles
        else:
            per_split = tl.cdiv(num_tiles, num_splits)
            t_lo = split * per_split
            t_hi = tl.minimum(t_lo + per_split, num_tiles)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        table = tables_ptr + seq.to(tl.int64) * stride_tb
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        # tiles below t_full are visible to every row (the first row sees keys <= its position):
        # no causal or length mask there; only the diagonal tiles pay for masking
        t_full = (ctx_before + local * BLOCK_Q + 1) // TILE_N
        if FP8_KV:  # scores = q . (k_code * k_scale): the per-tensor scale read from device memory (graph-safe)
            scale_log2 = scale_log2 * tl.load(k_scale_ptr).to(tl.float32)
            if FP16_OPS:
                # fp16 MMA operands (q, the widened K/V codes, p): e4m3 -> fp16 is one cvt per 2 codes, -> bf16 adds
                # a per-value F2F (H200 bs64 decode: 63 us a layer on the e4m3 cache vs 44 on bf16 before). q is
                # exact in fp16 within +-65504 (clamped past it) down to 2^-14 (below: fp16's subnormal steps)
                q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        acc, l_i, m_i = _attend_ahead(acc, l_i, m_i, q, q_pos, table, k_base, v_base, t_lo, tl.minimum(t_hi, t_full),
                                kv_limit, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d,
                                TILE_N, BS, D, D_PAD, False, DOT_PRECISION, FP8_KV)
        acc, l_i, m_i = _attend_ahead(acc, l_i, m_i, q, q_pos, table, k_base, v_base, tl.maximum(t_lo, t_full), t_hi,
                                kv_limit, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d,
                                TILE_N, BS, D, D_PAD, True, DOT_PRECISION, FP8_KV)
        if FP8_KV:  # sum_j p_j (v_code_j * v_scale) = v_scale * acc (before the merge: partials stay comparable)
            acc = acc * tl.load(v_scale_ptr).to(tl.float32)

        if not SPLIT_KV:
            out = acc / l_i[:, None]
            tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            if QUANT_OUT:   # kernels/fp8_row_split.py's pattern, for the FP8 o_proj: see _quant_out_tail
                _quant_out_tail(out.to(out_ptr.dtype.element_ty).to(tl.float32), row_ok, d_ok, q_start, kvh,
                                out_ptr, stride_ot, oq_ptr, os_ptr, opart_ptr, ocnt_ptr, stride_oq, H * D, KVH_P2,
                                QBLOCK, FP8_MAX_C, MIN_SCALE_C)
        else:
            # partials: acc [num_splits, N, H, D_PAD], (max, sum) [2, num_splits, N, H], fp32, contiguous
            row = (split * num_tokens + tok) * H + head  # (BLOCK_M,) int64
            # a split past the keys (short contexts under a split count fixed at graph capture) writes only its
            # (max = -inf, sum = 0): the merge then skips its accumulator (an 8 KB store and load saved per program)
            tl.store(part_acc_ptr + row[:, None] * D_PAD + offs_d[None, :], acc, mask=(row_ok & ((q_row * 0 + t_lo) < t_hi))[:, None])
            tl.store(part_ml_ptr + row, m_i, mask=row_ok)
            tl.store(part_ml_ptr + num_splits * num_tokens * H + row, l_i, mask=row_ok)
