"""RMSNorm / SiLU-and-mul fused with the per-token e4m3 quantization (kernels/fp8_norm_quant.py): the interpreter on
the CPU (tails, a row past one 2048-wide chunk), the GPU at Llama-3-8B widths."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import fp8_norm_quant_cases as cases
from .interpreter import interpreter_pool, interpreting


@pytest.fixture(scope="module")
def interp() -> Iterator:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("dtype", ["float16", "float32"])   # the interpreter mishandles bf16
@pytest.mark.parametrize("t,h,residual", [(3, 96, False), (5, 100, True)])
def test_rms_norm_quant_interp(interp, dtype, t, h, residual) -> None:
    interp.submit(cases.check_rms_norm_quant, dtype, t, h, residual).result(timeout=300)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("t,i", [(2, 200), (1, 2100)])   # 2100: two 2048-wide chunks, the second short
def test_silu_mul_quant_interp(interp, dtype, t, i) -> None:
    interp.submit(cases.check_silu_mul_quant, dtype, t, i).result(timeout=300)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("splits,t,h,row_scale,quant", [(2, 1, 96, False, False), (3, 2, 100, False, True),
                                                        (1, 3, 96, True, True)])
def test_splitk_add_rms_norm_interp(interp, dtype, splits, t, h, row_scale, quant) -> None:
    interp.submit(cases.check_splitk_add_rms_norm, dtype, splits, t, h, "cpu", row_scale, quant).result(timeout=300)


@pytest.mark.parametrize("lora", ["", "all", "flags"])
@pytest.mark.parametrize("splits,t,row_scale,quant", [(2, 5, False, True), (1, 4, True, False)])
def test_splitk_add_rms_norm_lora_delta_interp(interp, splits, t, row_scale, quant, lora) -> None:
    """The deferred epilogue with the projection's LoRA delta (and DoRA's g) added before the rounding
    (LoRABatch.around_delta's consumers): == the reference's (y * s + delta) * g, then the norm."""
    interp.submit(cases.check_splitk_add_rms_norm, "float16", splits, t, 96, "cpu", row_scale, quant,
                  lora).result(timeout=300)


@pytest.mark.parametrize("lora,splits,bias", [("", 0, False), ("flags", 0, False), ("all", 3, False),
                                              ("flags", 0, True)])
def test_rope_kv_scaled_lora_delta_interp(interp, lora, splits, bias) -> None:
    """qkv's deferred epilogue in RoPE + K/V with its LoRA delta (and DoRA's g) == the values made first, then
    rope_store_kv_fp8."""
    interp.submit(cases.check_rope_kv_scaled, "float16", 5, 4, 2, 16, bias, "cpu", splits, lora).result(timeout=300)


@pytest.mark.parametrize("dtype,m,heads,kv_heads,d,k,config,bias", [
    ("float16", 2, 2, 1, 16, 128, ("gemvh4", 1, 1, 32, 1, 1, 4), False),   # pairs (d, d + 8): 2 per program
    ("float32", 1, 4, 2, 16, 128, ("gemvh2", 1, 4, 32, 1, 4, 4), True),    # one pair of 4-row blocks; qkv bias
    ("float16", 3, 2, 2, 32, 256, ("gemvh4", 1, 2, 32, 1, 1, 4), True),    # 3 tokens, 2 chunks of K
])
def test_qkv_rope_interp(interp, dtype, m, heads, kv_heads, d, k, config, bias) -> None:
    """kernels/fp8_qkv_rope.py: the qkv GEMV with RoPE + the e4m3 K/V write == fp8_gemv then rope_store_kv_fp8."""
    interp.submit(cases.check_qkv_rope, dtype, m, heads, kv_heads, d, k, config, bias).result(timeout=300)


@pytest.mark.parametrize("dtype,t,heads,kv_heads,d,bias,splits", [("float16", 3, 4, 2, 16, False, 0),
                                                                   ("float32", 2, 3, 1, 32, True, 0),
                                                                   ("float16", 3, 8, 2, 16, False, 3),   # partials
                                                                   ("float32", 2, 5, 1, 32, True, 1)])
def test_rope_kv_scaled_interp(interp, dtype, t, heads, kv_heads, d, bias, splits) -> None:
    """The tw GEMM's scaling (or dot8's split-K sum) folded into RoPE + the e4m3 K/V write == the epilogue launch,
    then rope_store_kv_fp8."""
    interp.submit(cases.check_rope_kv_scaled, dtype, t, heads, kv_heads, d, bias, "cpu", splits).result(timeout=300)


@pytest.mark.parametrize("dtype,m,v,h,k,chunk", [("float16", 1, 640, 64, 4, 16), ("float32", 3, 1120, 96, 8, 16)])
def test_head_rescore_interp(interp, dtype, m, v, h, k, chunk) -> None:
    """The FP8 LM head's fused rescoring == the torch form's candidates; other logits untouched."""
    interp.submit(cases.check_head_rescore, dtype, m, v, h, k, chunk).result(timeout=300)


def test_head_self_check_interp(interp) -> None:
    """The fused head rescoring is checked against the torch form on its first eager call."""
    interp.submit(cases.check_head_self_check).result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 4])
def test_head_rescore_gpu(m) -> None:
    cases.check_head_rescore("bfloat16", m, 128256, 4096, 8, 128, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rope_kv_scaled_gpu() -> None:
    cases.check_rope_kv_scaled("bfloat16", 48, 32, 8, 128, False, "cuda")
    cases.check_rope_kv_scaled("bfloat16", 64, 32, 8, 128, False, "cuda", splits=4)
    for lora in ("", "all", "flags"):   # with a LoRA delta (LoRABatch.around_delta)
        cases.check_rope_kv_scaled("bfloat16", 64, 32, 8, 128, False, "cuda", lora=lora)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 3])
def test_qkv_rope_gpu(m) -> None:
    """At the 8B qkv shape with the table's one-token config (gemvh4 1 x 512, 1 warp, 4 K tiles per fp16 partial)."""
    cases.check_qkv_rope("bfloat16", m, 32, 8, 128, 4096, ("gemvh4", 1, 1, 512, 1, 1, 4), False, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 48, 64, 300])
def test_norm_quant_gpu(t) -> None:
    cases.check_rms_norm_quant("bfloat16", t, 4096, True, "cuda")
    cases.check_rms_norm_quant("bfloat16", t, 4096, False, "cuda")
    cases.check_silu_mul_quant("bfloat16", t, 14336, "cuda")
    cases.check_splitk_add_rms_norm("bfloat16", 2, t, 4096, "cuda")
    cases.check_splitk_add_rms_norm("bfloat16", 1, t, 4096, "cuda", row_scale=True, quant=True)
    for lora in ("", "flags"):   # with a LoRA delta (LoRABatch.around_delta)
        cases.check_splitk_add_rms_norm("bfloat16", 1, t, 4096, "cuda", row_scale=True, quant=True, lora=lora)


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels (test_norm_quant_gpu)")
def test_norm_quant_keeps_rms_norm_layout_sm90() -> None:
    """Offline sm_90 compiles at the 8B width: the norm + quantize kernels reduce the row in _rms_norm_kernel's layout
    with no layout conversion (an e4m3 store of the row itself had Triton lay it out 16 values a thread: another
    summation order, rows one bf16 ulp off rms_norm's on the H200)."""
    import re

    from loraserve.kernels.fp8_norm_quant import _rms_norm_quant_kernel, _splitk_add_rms_norm_kernel
    from loraserve.kernels.rmsnorm import _rms_norm_kernel

    from .sm90 import compile_sm90, offline_triton

    offline_triton()
    types = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "q_ptr": "*fp8e4nv",
             "s_ptr": "*fp32", "ws_ptr": "*fp32", "xs_ptr": "*fp32", "qs_ptr": "*fp32", "H": "i32", "M": "i32",
             "SPLITS": "i32", "eps": "fp32", "fp8_max": "fp32", "stride_x": "i32", "stride_r": "i32",
             "stride_o": "i32", "stride_q": "i32"}
    common = dict(div16_except=("eps", "fp8_max", "M", "SPLITS"), num_warps=8, launch_pdl=True)
    layouts = {}
    for name, fn, consts in (
            ("rms_norm", _rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096, USE_PDL=True)),
            ("rms_norm_quant", _rms_norm_quant_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096, FP8_MAX_C=448.0,
                                                            MIN_SCALE_C=1e-12, USE_PDL=True)),
            ("splitk_add_rms_norm", _splitk_add_rms_norm_kernel, dict(ROW_SCALE=True, QUANT=True, BLOCK=4096,
                                                                      FP8_MAX_C=448.0, MIN_SCALE_C=1e-12,
                                                                      USE_PDL=True))):
        ttgir = compile_sm90(fn, types, consts, **common).asm["ttgir"]
        layouts[name] = set(re.findall(r"#blocked\d* = (#ttg\.blocked<[^>]*>)", ttgir))
        assert "convert_layout" not in ttgir, name
    # the quantize pass reads the row back in half-row chunks (its own layout): the norm's is rms_norm's
    assert layouts["rms_norm"] <= layouts["rms_norm_quant"] and layouts["rms_norm"] <= layouts["splitk_add_rms_norm"], \
        layouts


def _check_switched_off(dtype: str) -> None:
    """LORASERVE_FP8_SILU_ONE_PASS=0 (chunks + a second pass) and LORASERVE_FP8_NORM_REREAD=0 (codes from registers):
    the same contracts."""
    import os

    os.environ.update(LORASERVE_FP8_SILU_ONE_PASS="0", LORASERVE_FP8_NORM_REREAD="0")
    try:
        cases.check_silu_mul_quant(dtype, 3, 2100)
        cases.check_rms_norm_quant(dtype, 5, 100, True)
        cases.check_splitk_add_rms_norm(dtype, 1, 3, 96, "cpu", row_scale=True, quant=True)
    finally:
        for key in ("LORASERVE_FP8_SILU_ONE_PASS", "LORASERVE_FP8_NORM_REREAD"):
            os.environ.pop(key)


def test_norm_quant_switched_off_interp(interp) -> None:
    interp.submit(_check_switched_off, "float16").result(timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels (test_norm_quant_gpu)")
def test_silu_mul_quant_one_pass_compiles_sm90() -> None:
    """The one-pass SiLU-mul + codes at the 8B width (a 14336-wide row in registers, 16 warps): no spills."""
    from loraserve.kernels.fp8_norm_quant import _silu_mul_quant_kernel

    from .sm90 import compile_sm90, offline_triton, stack_bytes

    offline_triton()
    kernel = compile_sm90(_silu_mul_quant_kernel,
                          {"x_ptr": "*bf16", "out_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "I": "i32",
                           "fp8_max": "fp32", "stride_x": "i32", "stride_o": "i32", "stride_q": "i32"},
                          dict(BLOCK=16384, FP8_MAX_C=448.0, MIN_SCALE_C=1e-12, USE_PDL=True, ONE_PASS=True),
                          div16_except=("fp8_max",), num_warps=16, launch_pdl=True)
    assert stack_bytes(kernel) == 0
