"""FP8 GEMM kernels (kernels/fp8_gemm.py): the W8A16 small-M GEMM and the fused per-token activation
quantization against their torch references, on the CPU through Triton's interpreter (a spawned
TRITON_INTERPRET=1 worker) and on the GPU at Llama-3-8B shapes (with a CUDA-graph replay); plus the
dispatch of models/fp8.py's fp8_linear (which path a shape takes, and the env switches)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import fp8_gemm_cases as cases
from .interpreter import interpreter_pool, interpreting
from .sm90 import compile_sm90, offline_triton, resource_usage, stack_bytes


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


def _run(pool: ProcessPoolExecutor, fn, *args) -> None:
    pool.submit(fn, *args).result(timeout=300)


@pytest.mark.parametrize("dtype", ["float16", "float32"])   # the interpreter mishandles bf16
@pytest.mark.parametrize("m,n,k,bias", [(1, 48, 64, False), (5, 40, 96, True), (33, 16, 272, False),
                                        (70, 24, 32, True)])
def test_w8a16_interp(interp, dtype, m, n, k, bias) -> None:
    # 40 / 48 / 24: N not a multiple of the N tile; 96 / 272: a masked K tail; 33: a part-filled 64-row
    # M tile; 70: two M tiles (BLOCK_M stops at 64)
    _run(interp, cases.check_w8a16, dtype, m, n, k, bias)


@pytest.mark.parametrize("m,n,k,bias,config", [
    (5, 40, 1024, True, None),                     # the heuristic splits K in two (3 N tiles < 8 "SMs")
    (7, 40, 272, True, (16, 16, 32, 4, 4, 2)),     # 3 splits of 96, the last one 80: a masked K tail
    (3, 32, 512, False, (16, 32, 64, 4, 4, 2)),    # 4 even splits
])
def test_w8a16_split_k_interp(interp, m, n, k, bias, config) -> None:
    _run(interp, cases.check_w8a16, "float32", m, n, k, bias, "cpu", config)


def test_w8a16_config_heuristic() -> None:
    """Tiles for the Llama-3-8B projections on 132 SMs: one M tile; the grid covers the SMs (split-K
    where N alone does not); BLOCK_N keeps the x re-reads at most the weight bytes (2 M / BLOCK_N <= 1)."""
    from loraserve.kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton not installed")
    from loraserve.kernels.fp8_gemm import w8a16_config

    for m in (1, 2, 8, 16, 33, 64):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
            bm, bn, bk, split, _, _ = w8a16_config(m, n, k, 132)
            assert bm >= m and bm <= 64 and 2 * m <= bn
            assert -(-n // bn) * split >= 132 and (split == 1 or -(-n // bn) * split <= 4 * 132), (m, n, k, bn, split)
            assert k % (split * bk) == 0 or split == 1


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("m,k", [(3, 64), (4, 2100)])   # 2100: more than one 2048 block, masked tail
def test_per_token_quant_interp(interp, dtype, m, k) -> None:
    _run(interp, cases.check_per_token_quant, dtype, m, k)


def test_references_match_dequantized_math() -> None:
    """The references against the plain formulas (fp32): W8A16 == x @ dequant(W)^T; the per-token
    quantization round-trips within e4m3's relative precision."""
    from loraserve.kernels.fp8_gemm import fp8_w8a16_gemm_ref, per_token_quant_fp8_ref

    w_q, w_scale = cases.make_weight(24, 40, 0, "cpu")
    x = torch.randn(7, 40, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fp8_w8a16_gemm_ref(x, w_q, w_scale), x @ (w_q.float() * w_scale[:, None]).t(),
                               rtol=1e-5, atol=1e-6)
    x_q, s = per_token_quant_fp8_ref(x)
    assert bool(((x_q.float() * s - x).abs() <= x.abs() / 16 + s * 2 ** -9).all())


def test_dispatch(monkeypatch) -> None:
    """fp8_linear's choice of kernel from (device, M, env): CPU always dequantizes; on CUDA, with the FP8
    GEMV off (LORASERVE_FP8_GEMV_MAX_M=0; its own dispatch is in test_fp8_gemv.py), every M takes the FP8
    tensor cores, M <= LORASERVE_FP8_SMALL_M the older W8A16 kernel when that is set."""
    from loraserve.inference.models import fp8

    monkeypatch.setenv("LORASERVE_FP8_GEMV_MAX_M", "0")

    cpu = torch.zeros(4, 64)
    w = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    assert fp8.gemm_path(cpu, w) == "dequant"
    monkeypatch.setenv("LORASERVE_FP8_SMALL_M", "0")
    assert fp8.small_m_limit() == 0
    monkeypatch.setenv("LORASERVE_FP8_SMALL_M", "16")
    assert fp8.small_m_limit() == 16
    monkeypatch.setenv("LORASERVE_FP8_SMALL_M", "many")
    with pytest.raises(ValueError, match="LORASERVE_FP8_SMALL_M"):
        fp8.small_m_limit()
    monkeypatch.delenv("LORASERVE_FP8_SMALL_M")
    assert fp8.small_m_limit() == fp8.DEFAULT_SMALL_M == 0
    if torch.cuda.is_available() and triton_available():
        fp8_cores = torch.cuda.get_device_capability() >= (8, 9)
        xs = torch.zeros(8, 64, dtype=torch.bfloat16, device="cuda")
        wc = w.cuda()
        assert fp8.gemm_path(xs, wc) == ("scaled_mm" if fp8_cores else "dequant")
        monkeypatch.setenv("LORASERVE_FP8_SMALL_M", "64")
        assert fp8.gemm_path(xs, wc) == ("w8a16" if fp8_cores else "dequant")
        xl = torch.zeros(65, 64, dtype=torch.bfloat16, device="cuda")
        assert fp8.gemm_path(xl, wc) == ("scaled_mm" if fp8_cores else "dequant")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 64, 200])   # 200: the _scaled_mm path with the fused quantization
def test_fp8_linear_paths_agree_gpu(m, monkeypatch) -> None:
    """fp8_linear on each GPU path against the weight-only reference: W8A16 (the GEMV's weight-only tiles) within bf16
    rounding, the W8A8 paths (dot8 at 33..64 tokens, _scaled_mm above) within e4m3 activation rounding."""
    from loraserve.inference.models import fp8

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm >= 89")
    monkeypatch.setenv("LORASERVE_FP8_SMALL_M", "64")   # W8A16 up to 64 tokens (opt-in), W8A8 above
    w_q, w_scale = cases.make_weight(4096, 4096, 3, "cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ref = (x.float() @ (w_q.float() * w_scale[:, None]).t())
    y = fp8.fp8_linear(x, w_q, w_scale, None).float()
    rel = float((y - ref).norm() / ref.norm())
    # W8A8 (x rounded to e4m3 per token): _scaled_mm above 64 tokens, and the GEMV table's dot8 tiles at 33..64
    from loraserve.kernels.fp8_gemv import _num_sms, gemv_config

    w8a8 = m > 64 or (fp8.gemm_path(x, w_q) == "gemv" and fp8.activations_quantized(w_q)
                      and gemv_config(m, 4096, 4096, _num_sms(x.device))[0] in ("dot8", "dot8b", "dot8f", "tw", "twf"))
    assert rel < (6e-2 if w8a8 else 1e-2), (rel, w8a8)
    assert w8a8 == (m > 32)   # the 8B table: weight-only up to 32 tokens
    assert not fp8._BROKEN, fp8._BROKEN


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("m", [1, 7, 16, 64])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (28672, 4096)])
def test_w8a16_gpu(dtype, m, n, k) -> None:
    cases.check_w8a16(dtype, m, n, k, bias=(m == 7), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,k", [(1, 4096), (300, 14336), (2048, 4096)])
def test_per_token_quant_gpu(m, k) -> None:
    cases.check_per_token_quant("bfloat16", m, k, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [8, 64])   # 64: the split-K path (two launches, a workspace)
def test_w8a16_cuda_graph_replay(m) -> None:
    """Captured in a CUDA graph, replay equals the eager launch bit for bit (no host syncs inside)."""
    from loraserve.kernels.fp8_gemm import fp8_w8a16_gemm

    w_q, w_scale = cases.make_weight(4096, 4096, 0, "cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    eager = fp8_w8a16_gemm(x, w_q, w_scale)
    out = torch.empty_like(eager)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fp8_w8a16_gemm(x, w_q, w_scale, out=out)   # warm-up (compile) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_w8a16_gemm(x, w_q, w_scale, out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines launch the kernels instead")
def test_kernels_compile_for_sm90_without_register_spills() -> None:
    """No GPU here: compile the W8A16 tiles the heuristic picks for Llama-3-8B decode (and the two helper
    kernels) ahead of time for sm_90 with Triton's bundled ptxas, and read the cubin's resources: a tile
    that does not compile, or spills registers to local memory, would otherwise first show on the H200."""
    offline_triton()
    from loraserve.kernels import fp8_gemm as fg

    def compile_and_check(fn, signature: dict, constexprs: dict, **options) -> None:
        kernel = compile_sm90(fn, signature, constexprs, **options)
        assert stack_bytes(kernel) == 0, (constexprs, options, resource_usage(kernel))

    gemm_sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16",
                "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_xm": "i32",
                "stride_ym": "i32"}
    for m, n, k in ((1, 4096, 4096), (16, 4096, 4096), (32, 6144, 4096), (64, 4096, 14336)):
        bm, bn, bk, split, warps, stages = fg.w8a16_config(m, n, k, 132)
        compile_and_check(fg._fp8_w8a16_gemm_kernel, gemm_sig,
                          {"HAS_BIAS": False, "EVEN_K": True, "SPLIT_K": split, "BLOCK_M": bm, "BLOCK_N": bn,
                           "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
    compile_and_check(fg._splitk_reduce_kernel, {"ws_ptr": "*fp32", "s_ptr": "*fp32", "b_ptr": "*bf16",
                                                 "y_ptr": "*bf16", "M": "i32", "N": "i32", "stride_ym": "i32"},
                      {"HAS_BIAS": True, "SPLIT_K": 4, "BLOCK": 1024}, num_warps=4)
    compile_and_check(fg._per_token_quant_fp8_kernel, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                                                       "K": "i32", "stride_xm": "i32", "stride_qm": "i32",
                                                       "fp8_max": "fp32"},
                      {"FP8_MAX_C": 448.0, "MIN_SCALE_C": 1e-12, "BLOCK": 2048, "WAIT": False}, num_warps=8)
    compile_and_check(fg._per_token_quant_fp8_kernel, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                                                       "K": "i32", "stride_xm": "i32", "stride_qm": "i32",
                                                       "fp8_max": "fp32"},
                      {"FP8_MAX_C": 448.0, "MIN_SCALE_C": 1e-12, "BLOCK": 2048, "WAIT": True}, num_warps=8,
                      launch_pdl=True)
