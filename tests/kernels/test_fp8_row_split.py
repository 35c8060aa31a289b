"""Row-split SiLU-mul / RMSNorm + per-token e4m3 codes (kernels/fp8_row_split.py): the interpreter on the CPU (rows
cut into several chunks, a short last chunk, one chunk), the GPU at Llama-3-8B widths and decode batch sizes."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import fp8_row_split_cases as cases
from .interpreter import interpreter_pool, interpreting


@pytest.fixture(scope="module")
def interp() -> Iterator:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("dtype", ["float16", "float32"])   # the interpreter mishandles bf16
@pytest.mark.parametrize("t,i,chunk", [(3, 200, 64), (2, 96, 128)])   # 4 chunks, the last short / one chunk
def test_silu_split_interp(interp, dtype, t, i, chunk) -> None:
    interp.submit(cases.check_silu_split, dtype, t, i, chunk).result(timeout=300)


@pytest.mark.parametrize("kind", ["plain", "residual", "partials", "row_scale"])
def test_norm_split_interp(interp, kind) -> None:
    interp.submit(cases.check_norm_split, "float16", 3, 100, 32, kind).result(timeout=300)


@pytest.mark.parametrize("batch,num_splits", [("decode", 1), ("decode", 2), ("mixed", None)])
def test_attention_quant_out_interp(interp, batch, num_splits) -> None:
    """decode/1: the epilogue's codes; decode/2 (split-KV) and mixed (prefill rows): the quantization launch."""
    interp.submit(cases.check_attention_quant_out, batch, 8, 2, 16, 16, "float16", num_splits).result(timeout=300)


def test_attend_quant_glue_interp(interp) -> None:
    interp.submit(cases.check_attend_quant_glue).result(timeout=300)


def test_row_split_switch() -> None:
    import os

    from loraserve.kernels.fp8_row_split import ROW_SPLIT_MAX_ROWS, row_split_on

    old = os.environ.get("LORASERVE_FP8_ROW_SPLIT")
    try:
        os.environ.pop("LORASERVE_FP8_ROW_SPLIT", None)
        assert not row_split_on("silu", 64) or os.environ.get("LORASERVE_FP8_ROW_SPLIT") is not None
        os.environ["LORASERVE_FP8_ROW_SPLIT"] = "1"
        assert row_split_on("silu", 64) == triton_available() and row_split_on("norm", 1) == triton_available()
        assert not row_split_on("norm", ROW_SPLIT_MAX_ROWS + 1) and not row_split_on("silu", 0)
        os.environ["LORASERVE_FP8_ROW_SPLIT"] = "0"
        assert not row_split_on("silu", 64) and not row_split_on("norm", 64)
    finally:
        os.environ.pop("LORASERVE_FP8_ROW_SPLIT", None)
        if old is not None:
            os.environ["LORASERVE_FP8_ROW_SPLIT"] = old


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 48, 64])
def test_row_split_gpu(t) -> None:
    cases.check_silu_split("bfloat16", t, 14336, 1024, "cuda")
    for kind in ("plain", "residual", "partials", "row_scale"):
        cases.check_norm_split("bfloat16", t, 4096, 1024, kind, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attention_quant_out_gpu() -> None:
    for batch, splits in (("decode", 1), ("decode", 3), ("mixed", None)):
        cases.check_attention_quant_out(batch, 32, 8, 128, 16, "bfloat16", splits, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels (test_row_split_gpu)")
def test_row_split_compiles_sm90() -> None:
    """Offline sm_90 compiles at the 8B widths (PDL, the acq_rel counter, the tail loops): no spills."""
    from loraserve.kernels.fp8_row_split import _norm_quant_split_kernel, _silu_mul_quant_split_kernel

    from .sm90 import compile_sm90, offline_triton, stack_bytes

    offline_triton()
    k = compile_sm90(_silu_mul_quant_split_kernel,
                     {"x_ptr": "*bf16", "out_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "part_ptr": "*fp32",
                      "cnt_ptr": "*i32", "I": "i32", "fp8_max": "fp32", "stride_x": "i32", "stride_o": "i32",
                      "stride_q": "i32", "C": "i32"},
                     dict(CHUNK=1024, TAIL=16384, C_P2=16, FP8_MAX_C=448.0, MIN_SCALE_C=1e-12, USE_PDL=True),
                     div16_except=("fp8_max", "C"), num_warps=8, launch_pdl=True)
    assert stack_bytes(k) == 0
    k = compile_sm90(_norm_quant_split_kernel,
                     {"x_ptr": "*bf16", "ws_ptr": "*fp32", "s_ptr": "*fp32", "xs_ptr": "*fp32", "res_ptr": "*bf16",
                      "w_ptr": "*bf16", "out_ptr": "*bf16", "q_ptr": "*fp8e4nv", "qs_ptr": "*fp32",
                      "part_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "H": "i32", "SPLITS": "i32", "eps": "fp32",
                      "fp8_max": "fp32", "stride_x": "i32", "stride_r": "i32", "stride_o": "i32", "stride_q": "i32",
                      "C": "i32"},
                     dict(PARTIALS=True, ROW_SCALE=True, HAS_RESIDUAL=True, CHUNK=1024, TAIL=4096, C_P2=4,
                          FP8_MAX_C=448.0, MIN_SCALE_C=1e-12, USE_PDL=True),
                     div16_except=("eps", "fp8_max", "M", "SPLITS", "C"), num_warps=4, launch_pdl=True)
    assert stack_bytes(k) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernel (test_attention_quant_out_gpu)")
def test_attention_quant_out_compiles_sm90() -> None:
    """The bs64 decode attention over the e4m3 cache (V pinned) with o_proj's codes in its epilogue: compiles for
    sm_90 with no spills; the tail's counter is an acq_rel atomic."""
    from loraserve.kernels.unified_attention import _unified_attention_kernel

    from .sm90 import compile_sm90, offline_triton, stack_bytes

    offline_triton()
    types = {"q_ptr": "*bf16", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "tables_ptr": "*i32", "seq_lens_ptr": "*i32",
             "qsl_ptr": "*i32", "out_ptr": "*bf16", "part_acc_ptr": "*bf16", "part_ml_ptr": "*bf16",
             "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "scale_log2": "fp32", "num_seqs": "i32",
             "num_tokens": "i32", "num_splits": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_kb": "i32",
             "stride_ks": "i32", "stride_kh": "i32", "stride_vb": "i32", "stride_vs": "i32", "stride_vh": "i32",
             "stride_tb": "i32", "stride_ot": "i32", "stride_oh": "i32", "oq_ptr": "*fp8e4nv", "os_ptr": "*fp32",
             "opart_ptr": "*fp32", "ocnt_ptr": "*i32", "stride_oq": "i32"}
    consts = dict(H=32, G=4, BLOCK_M=16, BLOCK_Q=4, TILE_N=64, BS=16, D=128, D_PAD=128, SPLIT_KV=False,
                  DOT_PRECISION="tf32", FP8_KV=2, USE_PDL=True, FP16_OPS=True, QUANT_OUT=True, KVH_P2=8,
                  QBLOCK=4096)
    aligned = ["q_ptr", "k_ptr", "v_ptr", "out_ptr", "oq_ptr", "stride_qt", "stride_qh", "stride_kb", "stride_ks",
               "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_ot", "stride_oh", "stride_oq"]
    kernel = compile_sm90(_unified_attention_kernel, types, consts, div16=aligned, num_warps=4, num_stages=2,
                          launch_pdl=True)
    assert stack_bytes(kernel) == 0
    assert "atom.global.gpu.acq_rel.add" in kernel.asm["ptx"]
