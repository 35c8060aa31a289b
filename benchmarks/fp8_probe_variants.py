"""The LORASERVE_ switch sets benchmarks/fp8_probe.py times (--variants NAME,...): each variant's environment on top of
the defaults, read when its CUDA graphs are captured."""

# (name, switches): each variant's LORASERVE_ settings on top of the defaults
VARIANTS = (
    ("default", {}),
    ("gemv_pdl_early_fixup", {"LORASERVE_FP8_GEMV_PDL": "early", "LORASERVE_FP8_SPLITK_FIXUP": "1"}),
    ("rope_kv_unfused", {"LORASERVE_FP8_FUSED_ROPE_KV": "0"}),
    ("gemv_pdl_early", {"LORASERVE_FP8_GEMV_PDL": "early"}),
    ("splitk_fixup", {"LORASERVE_FP8_SPLITK_FIXUP": "1"}),
    ("gemv_pdl_l2", {"LORASERVE_FP8_GEMV_PDL": "1"}),
    # the W8A8 decode GEMMs (M 33..64, kernels/fp8_gemv_configs.py w8a8_mode): per token with fp32 promotion (default),
    # without it (the previous default), per (token, K block) in-kernel, cuBLASLt tensor-wise + a scaling launch
    ("w8a8_token", {"LORASERVE_FP8_W8A8": "token"}),
    ("w8a8_fast", {"LORASERVE_FP8_W8A8": "fast"}),
    ("w8a8_block", {"LORASERVE_FP8_W8A8": "block"}),
    ("w8a8_tensorwise", {"LORASERVE_FP8_W8A8": "tensorwise"}),
    ("w8a8_tensorwise_fast", {"LORASERVE_FP8_W8A8": "tensorwise_fast"}),
    # dot8 everywhere with o's and down's split-K partials summed by the next norm (fp8_gemv defer_sum for the dot
    # kinds), and also as early programmatic dependents (their launch overlaps the kernel before them)
    ("w8a8_token_early", {"LORASERVE_FP8_W8A8": "token", "LORASERVE_FP8_GEMV_PDL": "early"}),
    # dot8's numerics and tiles in persistent programs (kernels/fp8_stream_dot.py: one pipeline fill per program)
    ("w8a8_stream", {"LORASERVE_FP8_W8A8": "stream"}),
    ("w8a8_stream_early", {"LORASERVE_FP8_W8A8": "stream", "LORASERVE_FP8_GEMV_PDL": "early"}),
    # the attention over the e4m3 cache with the codes widened to bf16 (the previous form; now fp16 MMA operands)
    ("attn_bf16_ops", {"LORASERVE_ATTN_FP8_FP16": "0"}),
    # V widened in its load layout (kernels/fp8_convert.py): always / never (default auto: unsplit decode launches)
    ("attn_vpin", {"LORASERVE_ATTN_FP8_VPIN": "1"}),
    ("attn_vpin_off", {"LORASERVE_ATTN_FP8_VPIN": "0"}),
    # the norms' codes from registers (previous; rows may round 1 ulp off rms_norm's) / SiLU-mul + codes in chunks
    ("norm_reread_off", {"LORASERVE_FP8_NORM_REREAD": "0"}),
    ("silu_one_pass_off", {"LORASERVE_FP8_SILU_ONE_PASS": "0"}),
    # bucket-64 tiles from probe 1's sweep (us, partials left to the consumer): qkv dot8 64x128 split 4 10.0 (cuBLASLt
    # tw 10.3 + 1.9 scaling), its partials summed by the RoPE + K/V kernel; o dot8 64x256 split 2 7.54 (tw 7.76);
    # down dot8 64x256 split 2 19.1 (tw 18.7)
    ("qkv_dot8_rope", {"LORASERVE_FP8_TILE64": "6144x4096=dot8:64:64:128:4:4:3", "LORASERVE_FP8_DEFER_QKV": "1"}),
    ("o_dot8", {"LORASERVE_FP8_TILE64": "4096x4096=dot8:64:64:256:2:4:4"}),
    ("down_dot8", {"LORASERVE_FP8_TILE64": "4096x14336=dot8:64:64:256:2:4:4"}),
    ("dot8_tiles_all", {"LORASERVE_FP8_TILE64": "6144x4096=dot8:64:64:128:4:4:3,4096x4096=dot8:64:64:256:2:4:4,"
                                                "4096x14336=dot8:64:64:256:2:4:4", "LORASERVE_FP8_DEFER_QKV": "1"}),
    # decode launches over the e4m3 cache with 3 stages (the block table 2 tiles ahead, K/V 1: with 2 stages the
    # table and K/V loads of a tile wait on each other), and 32-key tiles
    ("attn_s3", {"LORASERVE_ATTN_FP8_DECODE_CFG": "num_stages:3"}),
    ("attn_t32s3", {"LORASERVE_ATTN_FP8_DECODE_CFG": "TILE_N:32,num_stages:3"}),
    # the one-program-per-row kernels with more warps (8B: norm 8 -> 16, silu one-pass 16 -> 32)
    ("norm_w16", {"LORASERVE_FP8_NORM_WARPS": "16"}),
    ("silu_w32", {"LORASERVE_FP8_SILU_WARPS": "32"}),
    # eighth pass: SiLU-and-mul in the gate_up dot8 GEMM's epilogue + down's codes from its row maxima
    # (kernels/fp8_dot8_silu.py), with other gate_up tiles, the norms with 16 warps, qkv's scaling in RoPE
    ("silu_dot8", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "1"}),
    ("silu_dot8_w16", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "1", "LORASERVE_FP8_NORM_WARPS_BATCH": "16"}),
    ("silu_dot8_all", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "1", "LORASERVE_FP8_NORM_WARPS_BATCH": "16",
                       "LORASERVE_FP8_DEFER_QKV": "1"}),
    ("norm_b16", {"LORASERVE_FP8_NORM_WARPS_BATCH": "16"}),   # 16 warps at >= 33 rows only (bs1 as before)
    ("silu_dot8_m32", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "1",
                       "LORASERVE_FP8_TILE64": "28672x4096=dot8:32:64:128:1:4:3"}),
    ("silu_dot8_c2048", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "1", "LORASERVE_FP8_ROW_CODES_BLOCK": "2048"}),
    ("silu_dot8_c512", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "1", "LORASERVE_FP8_ROW_CODES_BLOCK": "512"}),
    ("silu_dot8_s4", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "1",
                      "LORASERVE_FP8_TILE64": "28672x4096=dot8:64:64:128:1:4:4"}),
    ("silu_dot8_w8", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "1",
                      "LORASERVE_FP8_TILE64": "28672x4096=dot8:64:64:128:1:8:3"}),
    ("silu_dot8_n128", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "1",
                        "LORASERVE_FP8_TILE64": "28672x4096=dot8:64:128:128:1:8:3"}),
    # o_proj without the per-token quantization launch before it: x quantized per (token, 128-wide K block) inside the
    # GEMM (dot8b), or weight-only fp16 operands (dot16); other numerics than tw (not bit for bit)
    ("o_dot8b", {"LORASERVE_FP8_TILE64": "4096x4096=dot8b:64:64:128:1:4:3"}),
    ("o_dot8b_s2", {"LORASERVE_FP8_TILE64": "4096x4096=dot8b:64:64:128:2:4:3"}),
    ("o_dot16", {"LORASERVE_FP8_TILE64": "4096x4096=dot16:64:64:128:1:4:3"}),
    ("default2", {}),   # the defaults again at the end (drift)
    # with --lora: the FP8 projections' LoRA shrink on a side stream beside the FP8 GEMM (models/fp8.py
    # lora_overlap_mode; the bf16 projections' default), or shrink + expand there with one add after the GEMM
    ("fp8_lora_shrink", {"LORASERVE_FP8_LORA_OVERLAP": "shrink"}),
    ("fp8_lora_full", {"LORASERVE_FP8_LORA_OVERLAP": "full"}),
    ("fp8_lora_seq", {"LORASERVE_FP8_LORA_OVERLAP": "0"}),
    # with --lora: the fused epilogues kept with LoRA rows (models/fp8_fused.py lora_defer_on; the deltas to the
    # epilogues' consumers): all four, the shrink after the GEMM instead of beside it, one projection group at a time
    ("lora_defer", {"LORASERVE_FP8_LORA_DEFER": "1", "LORASERVE_FP8_LORA_DEFER_SHRINK": "side"}),
    # (LORA_DEFER=1 with SHRINK=full is the default since the fourteenth session; lora_defer_off: the old path)
    ("lora_defer_off", {"LORASERVE_FP8_LORA_DEFER": "0"}),
    ("lora_defer_main", {"LORASERVE_FP8_LORA_DEFER": "1", "LORASERVE_FP8_LORA_DEFER_SHRINK": "main"}),
    ("lora_defer_full", {"LORASERVE_FP8_LORA_DEFER": "1", "LORASERVE_FP8_LORA_DEFER_SHRINK": "full"}),
    # meant as the random layers' sensitivity to rounding alone (the norms in rms_norm's 8-warp layout, 1-2 bf16 ulps
    # apart); H200 2026-12-02: bit for bit the default at batch 64 (no effect there). The rounding-only measure that
    # works is fp8_lora_full above (the old path, its delta rounded to bf16 before the add)
    ("lora_sens_norm8", {"LORASERVE_FP8_NORM_WARPS_BATCH": "0"}),
    # o, down, qkv deferred; gate_up as before (GEMM + its LoRA + silu_mul_quant) with its shrink beside the GEMM
    ("lora_defer3_shrink", {"LORASERVE_FP8_LORA_DEFER": "o,down,qkv", "LORASERVE_FP8_LORA_OVERLAP": "shrink"}),
    ("lora_defer_o_down", {"LORASERVE_FP8_LORA_DEFER": "o,down"}),
    ("lora_defer_qkv", {"LORASERVE_FP8_LORA_DEFER": "qkv"}),
    ("lora_defer_gate_up", {"LORASERVE_FP8_LORA_DEFER": "gate_up"}),
    # the defaults at the eleventh session's start (98872c8): its new switches pinned off (the final's same-run A/B)
    ("prev11", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "0", "LORASERVE_FP8_NORM_WARPS_BATCH": "0",
                "LORASERVE_FP8_DEFER_QKV": "0", "LORASERVE_FP8_LM_HEAD_BATCH_MAX_M": "0"}),
    ("prev11b", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "0", "LORASERVE_FP8_NORM_WARPS_BATCH": "0",
                 "LORASERVE_FP8_DEFER_QKV": "0", "LORASERVE_FP8_LM_HEAD_BATCH_MAX_M": "0"}),
    # the new defaults one at a time off
    ("silu_dot8_off", {"LORASERVE_FP8_GATE_UP_SILU_DOT8": "0"}),
    ("norm_b0", {"LORASERVE_FP8_NORM_WARPS_BATCH": "0"}),
    # gate_up's SiLU GEMM tiles: 32-row halves (mma.sync, 448 programs), 64-wide K tiles in 6 stages
    ("silu_dot8_n32s4", {"LORASERVE_FP8_TILE64": "28672x4096=dot8:64:32:128:1:4:4"}),
    ("silu_dot8_k64s6", {"LORASERVE_FP8_TILE64": "28672x4096=dot8:64:64:64:1:4:6"}),
    ("norm_b32", {"LORASERVE_FP8_NORM_WARPS_BATCH": "32"}),
    # the decode attention over the e4m3 cache with 2 / 8 warps a program (4 now)
    ("attn_w2", {"LORASERVE_ATTN_FP8_DECODE_CFG": "num_warps:2"}),
    ("attn_w8", {"LORASERVE_ATTN_FP8_DECODE_CFG": "num_warps:8"}),
    ("default3", {}),
    ("previous_session", {"LORASERVE_ATTN_FP8_FP16": "0", "LORASERVE_FP8_NORM_REREAD": "0",
                          "LORASERVE_FP8_SILU_ONE_PASS": "0"}),
    ("w8a8_stream_defer_qkv", {"LORASERVE_FP8_W8A8": "stream", "LORASERVE_FP8_DEFER_QKV": "1"}),
    ("w8a8_stream_pps2", {"LORASERVE_FP8_W8A8": "stream", "LORASERVE_FP8_STREAM_PPS": "2"}),
    ("w8a8_token_nodefer", {"LORASERVE_FP8_W8A8": "token", "LORASERVE_FP8_DEFER_DOWN_SUM": "0",
                            "LORASERVE_FP8_DEFER_O": "0"}),
    # single-token GEMVs with fp16 products (gemvh), and the opposite of whatever the default is
    ("gemv_half", {"LORASERVE_FP8_GEMV_HALF": "1"}),
    ("gemv_fp32", {"LORASERVE_FP8_GEMV_HALF": "0"}),
    # the fused decode paths (models/fp8_fused.py): gate_up GEMV + SiLU-mul at one token, norm / SiLU-mul + per-token
    # quantization for the W8A8 GEMMs at 33..64; off one at a time and together (bit for bit the same hidden states)
    ("gate_up_silu_off", {"LORASERVE_FP8_GATE_UP_SILU": "0"}),
    ("prequant_off", {"LORASERVE_FP8_PREQUANT": "0"}),
    ("defer_off", {"LORASERVE_FP8_DEFER_DOWN_SUM": "0"}),
    ("qkv_rope_off", {"LORASERVE_FP8_QKV_ROPE": "0"}),
    ("defer_o_off", {"LORASERVE_FP8_DEFER_O": "0"}),
    # opt-in (slower at batch 64, probe 22:27, with one program per token; now (token, head group) programs)
    ("defer_qkv_on", {"LORASERVE_FP8_DEFER_QKV": "1"}),
    ("defer_qkv_off", {"LORASERVE_FP8_DEFER_QKV": "0"}),
    ("gate_up_split1", {"LORASERVE_FP8_GATE_UP_SPLIT1": "1"}),   # one-token gate_up without split-K: SiLU in the GEMV
    ("unfused", {"LORASERVE_FP8_GATE_UP_SILU": "0", "LORASERVE_FP8_PREQUANT": "0", "LORASERVE_FP8_DEFER_DOWN_SUM": "0",
                 "LORASERVE_FP8_QKV_ROPE": "0", "LORASERVE_FP8_DEFER_O": "0"}),
    # the defaults before this session's last pass: fp32 GEMVs at one token, dot8 everywhere at 33..64, no fusions
    ("old_defaults", {"LORASERVE_FP8_GEMV_HALF": "0", "LORASERVE_FP8_W8A8": "token", "LORASERVE_FP8_GATE_UP_SILU": "0",
                      "LORASERVE_FP8_PREQUANT": "0", "LORASERVE_FP8_DEFER_DOWN_SUM": "0", "LORASERVE_FP8_QKV_ROPE": "0",
                      "LORASERVE_FP8_DEFER_O": "0"}),
)
