"""No GPU here: the fused FP8 decode kernels (kernels/fp8_gemv_silu.py, fp8_qkv_rope.py, fp8_norm_quant.py,
fp8_rope_kv.py, fp8_head_rescore.py) compiled ahead of time for sm_90 with Triton's bundled ptxas, at the launch
configurations the engine uses on the 8B shapes: a kernel that does not compile for Hopper (the interpreter tests
cannot tell), spills, or lost its programmatic-dependent wait would otherwise first show on the H200."""
from __future__ import annotations

import re

import pytest

from .sm90 import compile_sm90, offline_triton, stack_bytes

P = {"bf": "*bf16", "f": "*fp32", "q": "*fp8e4nv", "i32": "*i32", "i64": "*i64"}


def _compile(fn, types: dict, constexprs: dict, warps: int, pdl: bool = False):
    """(ptx, max stack bytes) of `fn` compiled for sm_90; types: every runtime argument's Triton type."""
    # what a launch specialises: 16-byte aligned pointers and 16-divisible sizes / strides (not M, the token count)
    kernel = compile_sm90(fn, types, constexprs, div16_except=("M", "eps", "x16_scale", "fp8_max"), num_warps=warps,
                          num_stages=1, launch_pdl=pdl)
    return kernel.asm["ptx"], stack_bytes(kernel)


@pytest.fixture(scope="module")
def aot():
    offline_triton()
    return _compile


GEMV = {"x_ptr": P["bf"], "w_ptr": P["q"], "s_ptr": P["f"], "b_ptr": P["f"], "y_ptr": P["bf"], "ws_ptr": P["f"],
        "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_xm": "i32", "stride_ym": "i32",
        "x16_scale": "fp32"}


@pytest.mark.parametrize("half,use_ws", [(False, False), (False, True), (True, True), (True, False)])
def test_gate_up_silu_gemv_compiles(aot, half, use_ws) -> None:
    from loraserve.kernels import fp8_gemv as fg

    c = {"HAS_BIAS": False, "USE_WS": use_ws, "GROUPS": 2, "BLOCK_N": 4, "BLOCK_K": 512, "PDL": False, "WAIT": True,
         "EARLY": True, "SILU": True}
    if half:
        c["FLUSH"] = 4
        fn = fg._fp8_gemv_half_kernel
    else:
        c.update(EVEN_K=True, PREFETCH=False)
        fn = fg._fp8_gemv_groups_kernel
    ptx, stack = aot(fn, GEMV, c, 4, pdl=True)
    assert stack == 0 and "griddepcontrol.wait" in ptx
    assert use_ws or "ex2.approx" in ptx   # the SiLU in the epilogue (exp) where there is no split-K sum after it


def test_splitk_sum_silu_compiles(aot) -> None:
    from loraserve.kernels.fp8_gemv_silu import _splitk_sum_silu_kernel

    ptx, stack = aot(_splitk_sum_silu_kernel, {"ws_ptr": P["f"], "s_ptr": P["f"], "y_ptr": P["bf"], "M": "i32",
                                              "N": "i32", "SPLITS": "i32", "stride_ym": "i32"},
                     {"BLOCK": 1024, "PDL": True}, 4, pdl=True)
    assert stack == 0 and "griddepcontrol.wait" in ptx


@pytest.mark.parametrize("groups,bn,warps", [(4, 1, 1), (2, 4, 4)])
def test_qkv_rope_compiles(aot, groups, bn, warps) -> None:
    from loraserve.kernels.fp8_qkv_rope import _fp8_qkv_rope_kernel

    types = {"x_ptr": P["bf"], "w_ptr": P["q"], "s_ptr": P["f"], "b_ptr": P["f"], "M": "i32", "K": "i32",
             "stride_xm": "i32", "x16_scale": "fp32", "pos_ptr": P["i64"], "cs_ptr": P["f"], "stride_c": "i32",
             "num_positions": "i32", "slot_ptr": P["i64"], "qo_ptr": P["bf"], "stride_qo": "i32", "kc_ptr": P["q"],
             "vc_ptr": P["q"], "ks_ptr": P["f"], "vs_ptr": P["f"], "Q_SIZE": "i32", "KV_SIZE": "i32"}
    c = {"HAS_BIAS": False, "GROUPS": groups, "BLOCK_N": bn, "BLOCK_K": 512, "FLUSH": 4, "HALF": 64, "WAIT": True,
         "EARLY": True}
    ptx, stack = aot(_fp8_qkv_rope_kernel, types, c, warps, pdl=True)
    # one warp holding 4 x [1, 512] fp32 accumulators spills a little (168 bytes; the table's plain gemvh4 1 x 512
    # one-warp tile itself spills 616 with EARLY and measured fastest on the H200): bounded, not zero
    assert stack <= (256 if warps == 1 else 0), stack
    assert "fma.rn.f16x2" in ptx and "griddepcontrol.wait" in ptx
    assert re.search(r"ld\.global[\w:.]*\.v4", ptx[:ptx.index("griddepcontrol.wait")])   # EARLY: first tiles first
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx   # the K/V codes


# the LoRA-delta arguments of the deferred-epilogue kernels (kernels/fp8_norm_quant._delta_kwargs): as a launch without
# a delta passes them (None pointers: constexprs), with a delta and no DoRA, and with DoRA's flags
LORA_TYPES = {"d_ptr": P["bf"], "stride_d": "i32", "tok_ptr": P["i32"], "g_ptr": P["f"], "stride_g": "i32",
              "on_ptr": P["i32"]}
LORA_NONE = {"d_ptr": None, "tok_ptr": None, "g_ptr": None, "on_ptr": None}
LORA_NO_DORA = {"tok_ptr": None, "g_ptr": None, "on_ptr": None}


def test_norm_quant_kernels_compile(aot) -> None:
    from loraserve.kernels import fp8_norm_quant as nq

    fp8 = {"FP8_MAX_C": 448.0, "MIN_SCALE_C": 1e-12}
    ptx, _ = aot(nq._rms_norm_quant_kernel,
                 {"x_ptr": P["bf"], "res_ptr": P["bf"], "w_ptr": P["bf"], "out_ptr": P["bf"], "q_ptr": P["q"],
                  "s_ptr": P["f"], "H": "i32", "eps": "fp32", "fp8_max": "fp32", "stride_x": "i32", "stride_r": "i32",
                  "stride_o": "i32", "stride_q": "i32"},
                 {"HAS_RESIDUAL": True, "BLOCK": 4096, **fp8, "USE_PDL": True}, 8, pdl=True)
    assert "div.rn.f32" in ptx and "griddepcontrol.wait" in ptx
    aot(nq._silu_mul_quant_kernel,
        {"x_ptr": P["bf"], "out_ptr": P["bf"], "q_ptr": P["q"], "s_ptr": P["f"], "I": "i32", "fp8_max": "fp32",
         "stride_x": "i32", "stride_o": "i32", "stride_q": "i32"}, {"BLOCK": 2048, **fp8, "USE_PDL": True}, 8, pdl=True)
    for row_scale, quant, dora in ((False, False, None), (True, True, None), (True, True, 0), (True, True, 2)):
        # dora None: no LoRA delta (the pointers None, as a launch passes them); 0 / 2: the delta (LoRABatch.around_delta)
        # without / with DoRA's per-slot g
        lora = LORA_NONE if dora is None else {"HAS_DELTA": True, "DORA": dora, **({} if dora else LORA_NO_DORA)}
        ptx, _ = aot(nq._splitk_add_rms_norm_kernel,
                     {"ws_ptr": P["f"], "s_ptr": P["f"], "xs_ptr": P["f"], "res_ptr": P["bf"], "w_ptr": P["bf"],
                      "out_ptr": P["bf"], "q_ptr": P["q"], "qs_ptr": P["f"], "M": "i32", "H": "i32", "SPLITS": "i32",
                      "eps": "fp32", "fp8_max": "fp32", "stride_r": "i32", "stride_o": "i32", "stride_q": "i32",
                      **LORA_TYPES},
                     {"ROW_SCALE": row_scale, "QUANT": quant, "BLOCK": 4096, **fp8, "USE_PDL": True, **lora}, 8,
                     pdl=True)
        assert "griddepcontrol.wait" in ptx


def test_rope_kv_kernels_compile(aot) -> None:
    from loraserve.kernels import fp8_rope_kv as rk

    common = {"pos_ptr": P["i64"], "cache_ptr": P["f"], "slot_ptr": P["i64"], "qo_ptr": P["bf"],
              "k_cache_ptr": P["q"], "v_cache_ptr": P["q"], "k_scale_ptr": P["f"], "v_scale_ptr": P["f"], "H": "i32",
              "KVH": "i32", "stride_qot": "i32", "stride_c": "i32", "num_positions": "i32"}
    shape = {"HALF": 64, "HALF_P2": 64, "BLOCK_H": 32, "BLOCK_KVH": 8, "USE_PDL": True}
    ptx, _ = aot(rk._rope_store_kv_fp8_kernel,
                 {**common, "q_ptr": P["bf"], "k_ptr": P["bf"], "v_ptr": P["bf"], "stride_qt": "i32", "stride_qh": "i32",
                  "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32", "stride_qoh": "i32"},
                 shape, 4, pdl=True)
    assert "fma.rn.f32" in ptx
    for dora in (None, 0, 2):   # no LoRA delta / the delta / the delta and DoRA's per-slot g
        lora = LORA_NONE if dora is None else {"HAS_DELTA": True, "DORA": dora, **({} if dora else LORA_NO_DORA)}
        ptx, stack = aot(rk._rope_store_kv_fp8_scaled_kernel,
                         {**common, "a_ptr": P["f"], "xs_ptr": P["f"], "ws_ptr": P["f"], "b_ptr": P["f"],
                          "stride_at": "i32", "SPLITS": "i32", "stride_as": "i32", **LORA_TYPES},
                         {**shape, "HAS_BIAS": False, **lora}, 4, pdl=True)
        assert "fma.rn.f32" in ptx and "griddepcontrol.wait" in ptx
        assert stack == 0, f"the scaled RoPE kernel spills ({stack} bytes, LoRA {dora})"


def test_head_rescore_kernels_compile(aot) -> None:
    from loraserve.kernels import fp8_head_rescore as hr

    aot(hr._splitk_sum_chunkmax_kernel,
        {"ws_ptr": P["f"], "s_ptr": P["f"], "y_ptr": P["bf"], "best_ptr": P["f"], "arg_ptr": P["i32"], "M": "i32",
         "N": "i32", "SPLITS": "i32", "NCHUNK": "i32", "stride_ym": "i32"}, {"BLOCK": 1024, "CHUNK": 128}, 4)
    aot(hr._head_rescore_kernel,
        {"y_ptr": P["bf"], "best_ptr": P["f"], "arg_ptr": P["i32"], "x_ptr": P["bf"], "e_ptr": P["bf"], "NCHUNK": "i32",
         "V": "i32", "H": "i32", "stride_ym": "i32", "stride_xm": "i32", "stride_e": "i32"},
        {"K": 8, "NCHUNK_P2": 1024, "BLOCK_H": 1024}, 4)
