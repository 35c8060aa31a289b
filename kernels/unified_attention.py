"""Paged attention for a whole flattened step (prefill, chunked prefill, decode, mixed), Triton.

Semantics, for sequence b with query rows t in [qs[b], qs[b+1]) (qs = query_start_loc),
L = seq_lens[b] tokens in the cache after this step, Q = qs[b+1] - qs[b] new tokens (the last
Q of the L), query head h and its KV head k = h // G (G = H / KVH):
    pos(t) = L - Q + (t - qs[b])                    absolute position of query row t
    key j of b lives in block block_tables[b, j // BS] at offset j % BS
    out[t, h] = softmax_j(q[t, h] . K[j, k] * scale) @ V[j, k]        j <= pos(t)
q: [N, H, D] (N = qs[B]); k_cache, v_cache: [num_blocks, BS, KVH, D]; block_tables:
[B, max_blocks] int32/int64; seq_lens: [B] int32/int64; query_start_loc: [B + 1] int32/int64;
out: [N, H, D]. The K/V of the step's own tokens must already be in the cache (store_kv).
FP8 KV cache: k_cache/v_cache float8_e4m3fn holding K / k_scale and V / v_scale (per-tensor
scales, 1-element fp32 device tensors read by the kernel, so a captured graph follows a
scale changed after capture); K[j] above means k_code[j] * k_scale. The codes are widened to
q's dtype in registers (exact), k_scale is folded into the score scale and v_scale into the
finished output, so the softmax and accumulation stay fp32 as for a bf16 cache.

Flash-attention style (FlashAttention-2, Dao 2023), as vLLM's unified Triton kernel lays it
out: a program takes BLOCK_Q query tokens of one sequence times the G query heads of one KV
head (BLOCK_M = BLOCK_Q * G rows, so each K/V tile is read once for the whole GQA group and
never copied), walks the sequence's keys TILE_N at a time through the block table with an
online softmax in fp32, and stops at the tile's causal limit. Program -> sequence is a binary
search over query_start_loc on the device: the grid, N // BLOCK_Q + B tiles x KVH (x splits),
depends only on static sizes, so a launch can be captured in a CUDA graph and replayed for any
query lengths, context lengths and block tables of the same N and B.

Split-KV (flash-decoding): when tiles x KVH would leave the GPU's SMs idle (long contexts at
small batch), each tile's key range is cut into NUM_SPLITS parts that write unnormalised
partials (acc, max, sum) and a second kernel merges them.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON, no_specialize, tl, triton
from .pdl import pdl_kwargs

LOG2E = 1.4426950408889634
# Integer arguments that change from step to step (sequence and token counts, the block table's width,
# the split count) and the metadata pointers (views into the step's packed input buffer, 16-byte aligned
# or not with N's parity) are not specialised (Triton would compile a variant per class, so a step of a new
# class compiled mid-serving: 1.94 s for a 7759-token prefill in the e2e run). They index metadata and
# partials, never a vectorised K/V load, so the hints bought nothing there (kernels/_triton.py).
# Compiled variants left: one per (BLOCK_M in 16/32/64 from max_query_len, SPLIT_KV, dtype, FP8_KV, PDL)
# and the merge's S_PAD (2..64, powers of two). LORASERVE_TRITON_SPECIALIZE=1: Triton's default again.
NO_SPECIALIZE = no_specialize("num_seqs", "num_tokens", "num_splits", "stride_tb",
                              pointers=("tables_ptr", "seq_lens_ptr", "qsl_ptr"))
NO_SPECIALIZE_MERGE = no_specialize("num_tokens", "num_splits")

if HAS_TRITON:
    from .fp8_convert import e4m3_to_f16_pinned

    @triton.jit
    def _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
        # the last sequence b whose first tile qs[b] // BLOCK_Q + b is <= tile
        lo: tl.int32 = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            first = tl.load(qsl_ptr + mid).to(tl.int32) // BLOCK_Q + mid
            if first <= tile:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _attend(acc, l_i, m_i, q, q_pos, table, k_base, v_base, t_lo, t_hi, kv_limit, scale_log2,
                stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d,
                TILE_N: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_KV: tl.constexpr):
        """Online softmax over key tiles [t_lo, t_hi) of one sequence; acc (BLOCK_M, D_PAD), l_i, m_i
        (BLOCK_M,) fp32. MASKED: the tiles may hold keys past kv_limit or past a row's position.
        FP8_KV: K/V tiles are e4m3 codes, widened to q's dtype (exact: e4m3 fits bf16/fp16/fp32); the
        caller folds k_scale into scale_log2 and multiplies v_scale into the finished acc."""
        d_ok = offs_d < D
        for t in range(t_lo, t_hi):
            k_pos = t * TILE_N + offs_n                  # (TILE_N,)
            off = k_pos % BS
            if MASKED:
                kv_ok = k_pos < kv_limit
                block = tl.load(table + k_pos // BS, mask=kv_ok, other=0).to(tl.int64)
                k = tl.load(k_base + block[None, :] * stride_kb + off[None, :] * stride_ks + offs_d[:, None],
                            mask=kv_ok[None, :] & d_ok[:, None], other=0.0)         # (D_PAD, TILE_N)
                v = tl.load(v_base + block[:, None] * stride_vb + off[:, None] * stride_vs + offs_d[None, :],
                            mask=kv_ok[:, None] & d_ok[None, :], other=0.0)         # (TILE_N, D_PAD)
            else:
                block = tl.load(table + k_pos // BS).to(tl.int64)
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
    def _unified_attention_kernel(
            q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
            k_scale_ptr, v_scale_ptr, scale_log2, num_seqs, num_tokens, num_splits,
            stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_tb, stride_ot, stride_oh,
            H: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
            TILE_N: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
            SPLIT_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_KV: tl.constexpr,
            USE_PDL: tl.constexpr = False, FP16_OPS: tl.constexpr = False):
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
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_pos, table, k_base, v_base, t_lo, tl.minimum(t_hi, t_full),
                                kv_limit, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d,
                                TILE_N, BS, D, D_PAD, False, DOT_PRECISION, FP8_KV)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_pos, table, k_base, v_base, tl.maximum(t_lo, t_full), t_hi,
                                kv_limit, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs, offs_n, offs_d,
                                TILE_N, BS, D, D_PAD, True, DOT_PRECISION, FP8_KV)
        if FP8_KV:  # sum_j p_j (v_code_j * v_scale) = v_scale * acc (before the merge: partials stay comparable)
            acc = acc * tl.load(v_scale_ptr).to(tl.float32)

        if not SPLIT_KV:
            out = acc / l_i[:, None]
            tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            # partials: acc [num_splits, N, H, D_PAD], (max, sum) [2, num_splits, N, H], fp32, contiguous
            row = (split * num_tokens + tok) * H + head  # (BLOCK_M,) int64
            # a split past the keys (short contexts under a split count fixed at graph capture) writes only its
            # (max = -inf, sum = 0): the merge then skips its accumulator (an 8 KB store and load saved per program)
            tl.store(part_acc_ptr + row[:, None] * D_PAD + offs_d[None, :], acc, mask=(row_ok & ((q_row * 0 + t_lo) < t_hi))[:, None])
            tl.store(part_ml_ptr + row, m_i, mask=row_ok)
            tl.store(part_ml_ptr + num_splits * num_tokens * H + row, l_i, mask=row_ok)

    @triton.jit(**NO_SPECIALIZE_MERGE)
    def _merge_splits_kernel(part_acc_ptr, part_ml_ptr, out_ptr, num_tokens, num_splits, stride_ot, stride_oh,
                             H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                             S_PAD: tl.constexpr, USE_PDL: tl.constexpr = False):
        if USE_PDL:   # kernels/pdl.py: every input comes from the kernels before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D_PAD)
        s_ok = offs_s < num_splits
        row = (offs_s * num_tokens + t) * H + h          # (S_PAD,)
        m = tl.load(part_ml_ptr + row, mask=s_ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + num_splits * num_tokens * H + row, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)                             # finite: split 0 always holds key 0
        w = tl.math.exp2(m - m_max)                      # (S_PAD,), 0 for empty splits
        # splits that saw no key (m = -inf) wrote no accumulator: weight 0, not read
        acc = tl.load(part_acc_ptr + row[:, None] * D_PAD + offs_d[None, :], mask=(s_ok & (m > float("-inf")))[:, None],
                      other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=offs_d < D)


# H200: 132 SMs. Split-KV aims the grid at about four waves of programs (measured on the H200,
# batch 1 at 32k: 8 splits 127 us, 16: 72, 32: 47, 64: 44; kernels/PERF_NOTES.md).
TARGET_PROGRAMS = 528
MAX_SPLITS = 64
PROGRAMS_PER_SM = 3  # programs of the decode/prefill tiles resident on one SM at a time (~)
# split-KV partials are [splits, N, H, D] fp32: cap them (a long decode next to a big prompt chunk
# would otherwise ask for gigabytes; such a step then splits less)
MAX_WORKSPACE_BYTES = 128 << 20


# Decode grids of 3/8..1/2 of TARGET_PROGRAMS (B x KV heads: tensor parallelism's 4 KV heads a rank at batch 64, or
# batch 25..32 at 8): 128-key tiles and no split instead of the static rule's 64 keys x 3 splits + merge. H200, 16/4
# heads, B 64 (benchmarks/tp_layer_sweep.py, probes 2026-11-30 22:04 / 23:15), us: 25.1 vs 33.4 at 576 keys, 66.6 vs
# 76.8 at 2048, 125.1 vs 136.1 at 4096, 241.5 vs 253.9 at 8192; at 512 programs 64-key tiles stay (40.2 vs 46.4 at 576).
# TP=2 engine, 8 layers, bs64 decode graph: 1.001 -> 0.935 ms. LORASERVE_ATTN_WIDE_DECODE=0: the static rule everywhere
WIDE_DECODE = os.environ.get("LORASERVE_ATTN_WIDE_DECODE", "1").strip().lower() not in ("", "0", "off", "false", "no")


def fp8_fp16_operands(dtype: torch.dtype) -> bool:
    """LORASERVE_ATTN_FP8_FP16 (default auto): over an e4m3 KV cache the MMAs take fp16 operands (q, the widened
    codes, p) where q is bf16 (auto), always (1: tests, any dtype) or never (0: the codes widened to q's dtype)."""
    mode = os.environ.get("LORASERVE_ATTN_FP8_FP16", "auto").strip().lower()
    return mode == "1" or (mode not in ("0", "off", "false", "no") and dtype == torch.bfloat16)


def fp8_kv_form(fp8_kv: bool, dtype: torch.dtype, decode_one_split: bool = False) -> int:
    """FP8_KV: 0 (bf16/fp16/fp32 cache), 1 (e4m3 codes widened by a cast), 2 (with fp16 operands, V widened in its
    load layout by kernels/fp8_convert.py; not under the interpreter: inline asm). LORASERVE_ATTN_FP8_VPIN: auto
    (default) = 2 for decode launches without split-KV (H200 probe 2026-12-01 02:00, 4 8B layers, decode graph: bs64
    149.1 -> 133.8 us a layer; at bs1, split-KV, 72.3 -> 76.3, so not there; prefill not measured), 1 = always, 0 = never."""
    if not fp8_kv:
        return 0
    mode = os.environ.get("LORASERVE_ATTN_FP8_VPIN", "auto").strip().lower()
    pinned = ((mode == "1" or (mode == "auto" and decode_one_split)) and fp8_fp16_operands(dtype)
              and os.environ.get("TRITON_INTERPRET") != "1")
    return 2 if pinned else 1


def wide_decode(num_programs: int, elem_bytes: int, device: torch.device) -> bool:
    target = TARGET_PROGRAMS * _num_sms(device) // 132
    return WIDE_DECODE and elem_bytes <= 2 and target * 3 // 8 <= num_programs < target // 2


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def launch_config(max_query_len: int, group: int, elem_bytes: int = 2) -> dict:
    """Tile shape for a step whose longest query run is `max_query_len` (static per captured shape).

    Decode-like steps use the smallest tile (BLOCK_M 16 rows = 16 // G tokens of a GQA group),
    longer runs 64 rows (H200 sweep, 8 x 1024 prefill: 64 rows / 64 keys / 4 warps / 2 stages
    274 us; 128 rows 298-338 us); TILE_N keys per iteration, whatever the KV block size. fp32
    tiles are halved along the keys so that K/V stages fit in shared memory."""
    g_pad = 1 << (group - 1).bit_length()
    rows = 1 << (max(1, max_query_len) * group - 1).bit_length()
    block_m = max(16, g_pad, min(64, rows))
    tile_n = 64 if elem_bytes <= 2 else 32
    return dict(BLOCK_M=block_m, TILE_N=tile_n, num_warps=4, num_stages=2)


def choose_num_splits(num_programs: int, max_kv_tiles: int, device: torch.device) -> int:
    """Static choice (graph capture: only sizes known): splits so that about TARGET_PROGRAMS
    programs run, never more than the key tiles."""
    target = TARGET_PROGRAMS * _num_sms(device) // 132
    if num_programs >= target // 2:
        return 1
    return max(1, min(MAX_SPLITS, -(-target // num_programs), max_kv_tiles))


def plan_num_splits(query_lens, seq_lens, num_heads: int, num_kv_heads: int, elem_bytes: int,
                    device: torch.device) -> int:
    """Per-step choice from the host copies of the query and context lengths ([B] each): split
    until the heaviest program (the longest context's last tile) takes no longer than an even
    share of the step's work over the SMs, once that imbalance passes 2x (splitting costs partial
    writes and a merge). Batch 1 x 32k -> ~50 splits; batch 64 x 512 -> 1; 64 decodes + a
    512-token chunk over 2k -> 1; 4 decodes at 16k next to a 128-token prompt -> 13."""
    q = torch.as_tensor(query_lens, dtype=torch.float64)
    L = torch.as_tensor(seq_lens, dtype=torch.float64)
    group = num_heads // num_kv_heads
    cfg = launch_config(int(q.max()), group, elem_bytes)
    block_q, tile_n = cfg["BLOCK_M"] // group, cfg["TILE_N"]
    # each query tile walks the keys up to its causal limit: on average L - Q / 2 of them
    work = float(((q / block_q).ceil() * ((L - q / 2) / tile_n).ceil().clamp(min=1)).sum()) * num_kv_heads
    heavy = math.ceil(float(L.max()) / tile_n)
    imbalance = heavy * PROGRAMS_PER_SM * _num_sms(device) / work
    if imbalance < 2:  # H200, 64 decodes + 512-token chunk at 2k (imbalance 1.1): 1 split 115 us, 2: 134
        return 1
    return min(MAX_SPLITS, heavy, math.ceil(imbalance))


def unified_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                      query_start_loc: Tensor, max_query_len: int, scale: float, max_seq_len: int | None = None,
                      out: Tensor | None = None, num_splits: int | None = None, config: dict | None = None,
                      k_scale: Tensor | float | None = None, v_scale: Tensor | float | None = None) -> Tensor:
    """See the module docstring. Returns out [N, H, D].

    max_query_len: an upper bound of the query run lengths (picks the tile shape; static per
    graph). max_seq_len: an upper bound of seq_lens, used only to cap the split count
    (default: the block table's width x BS, a static bound). num_splits: from plan_num_splits
    when the caller has the host lengths; None picks from static sizes (graph capture).
    config overrides the tile shape (benchmarks, tests). Every seq_lens[b] must be >= its query length >= 1.
    k_scale, v_scale: the per-tensor scales of an FP8 (float8_e4m3fn) cache ([1] fp32 on q's device,
    or floats outside graphs); ignored for a cache in q's dtype.
    """
    N, H, D = q.shape
    _, BS, KVH, Dk = k_cache.shape
    B = block_tables.shape[0]
    assert Dk == D and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert H % KVH == 0, f"{H} query heads not a multiple of {KVH} KV heads"
    assert BS & (BS - 1) == 0, f"block size {BS} must be a power of two"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "last dim must be contiguous"
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share a layout"
    fp8_kv = check_kv_dtype(q, k_cache, v_cache)
    if fp8_kv:
        k_scale, v_scale = kv_scale_tensor(k_scale, "k_scale", q.device), kv_scale_tensor(v_scale, "v_scale", q.device)
    else:
        k_scale = v_scale = q  # unused pointers
    assert seq_lens.shape == (B,) and query_start_loc.shape == (B + 1,), (seq_lens.shape, query_start_loc.shape, B)
    assert block_tables.stride(-1) == 1, "block table rows must be contiguous"
    for t in (block_tables, seq_lens, query_start_loc):
        assert t.dtype in (torch.int32, torch.int64) and t.device == q.device, (t.dtype, t.device)
    G = H // KVH
    cfg = dict(launch_config(max_query_len, G, q.element_size()), **(config or {}))
    if config is None and max_query_len == 1 and num_splits in (None, 1) and not fp8_kv \
            and wide_decode(B * KVH, q.element_size(), q.device):   # (decode: one query row per sequence)
        cfg["TILE_N"], num_splits = 128, 1
    if config is None and max_query_len == 1 and fp8_kv and os.environ.get("LORASERVE_ATTN_FP8_DECODE_CFG"):
        # e.g. "TILE_N:32,num_warps:8,splits:2": decode launches over the e4m3 cache (probes; unset: the table's)
        for item in os.environ["LORASERVE_ATTN_FP8_DECODE_CFG"].split(","):
            key, _, val = item.partition(":")
            if key.strip() == "splits":
                num_splits = int(val)
            else:
                cfg[key.strip()] = int(val)
    block_m = cfg.pop("BLOCK_M")
    block_q = block_m // G
    assert block_q >= 1, f"BLOCK_M {block_m} smaller than the GQA group {G}"
    d_pad = max(16, triton.next_power_of_2(D))
    num_tiles = N // block_q + B
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * BS
        num_splits = choose_num_splits(num_tiles * KVH if max_query_len > 1 else B * KVH,
                                       -(-bound // cfg["TILE_N"]), q.device)
    num_splits = max(1, min(num_splits, MAX_WORKSPACE_BYTES // (N * H * (d_pad + 2) * 4)))
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1 and out.dtype == q.dtype
    if num_splits > 1:
        part_acc = torch.empty(num_splits, N, H, d_pad, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(2, num_splits, N, H, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    kernel = _unified_attention_kernel
    kernel[(num_tiles, KVH, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_acc, part_ml,
        k_scale, v_scale, scale * LOG2E, B, N, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        H=H, G=G, BLOCK_M=block_m, BLOCK_Q=block_q, BS=BS, D=D, D_PAD=d_pad, SPLIT_KV=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8_KV=fp8_kv_form(fp8_kv, q.dtype, max_query_len == 1 and num_splits == 1), **cfg,
        **pdl_kwargs(q.device), FP16_OPS=fp8_kv and fp8_fp16_operands(q.dtype))
    if num_splits > 1:
        merge_attention_splits(part_acc, part_ml, out)
    return out


FP8_KV_DTYPE = torch.float8_e4m3fn


def kv_scale_tensor(scale: Tensor | float | None, name: str, device: torch.device) -> Tensor:
    """A per-tensor KV scale as the 1-element fp32 device tensor the kernels read. Pass a tensor inside
    CUDA graphs (a float becomes a fresh tensor per call: fine eagerly, frozen into a captured graph)."""
    if scale is None:
        raise ValueError(f"an FP8 KV cache needs {name} (the per-tensor scale its codes were written with)")
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != device:
            raise ValueError(f"{name} must be a 1-element float32 tensor on {device}, got "
                             f"{scale.dtype} {tuple(scale.shape)} on {scale.device}")
        return scale
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def check_kv_dtype(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """True for an FP8 (e4m3) cache; the cache must otherwise be in q's dtype."""
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {k_cache.dtype} and v_cache {v_cache.dtype} differ")
    if k_cache.dtype == FP8_KV_DTYPE:
        if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"an FP8 KV cache needs bf16/fp16/fp32 queries, got {q.dtype}")
        return True
    if k_cache.dtype.itemsize == 1:
        raise ValueError(f"KV cache dtype {k_cache.dtype} is not supported: float8_e4m3fn or the query dtype")
    if k_cache.dtype != q.dtype:
        raise ValueError(f"KV cache dtype {k_cache.dtype} differs from the query dtype {q.dtype}")
    return False


def merge_attention_splits(part_acc: Tensor, part_ml: Tensor, out: Tensor) -> Tensor:
    """out[t, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s (log2 domain).

    part_acc: [S, N, H, D_PAD] fp32 unnormalised outputs; part_ml: [2, S, N, H] fp32 running
    max (of scores x scale x log2 e) and sum; out: [N, H, D] written in place."""
    S, N, H, d_pad = part_acc.shape
    assert part_ml.shape == (2, S, N, H) and part_acc.is_contiguous() and part_ml.is_contiguous()
    assert out.shape[:2] == (N, H) and out.shape[2] <= d_pad and out.stride(-1) == 1
    _merge_splits_kernel[(N, H)](part_acc, part_ml, out, N, S, out.stride(0), out.stride(1),
                                 H=H, D=out.shape[2], D_PAD=d_pad,
                                 S_PAD=max(2, triton.next_power_of_2(S)), num_warps=4, **pdl_kwargs(out.device))
    return out


from .unified_attention_ref import unified_attention_ref  # noqa: E402,F401  (the torch reference, re-exported)
