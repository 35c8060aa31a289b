"""kernels/fp8_dot8_silu.py: the gate_up dot8 GEMM with SiLU-and-mul in its epilogue and down's per-token codes from
its row maxima, against the torch reference and bit for bit against the unfused launches (dot8 GEMM, then
silu_and_mul, then per_token_quant_fp8): the interpreter on the CPU (small shapes, M / N / K tails), the GPU at the
8B shape (eager and a CUDA-graph replay), and an sm_90 offline compile (no spills, the FP8 MMA, the PDL trigger)."""
from __future__ import annotations

import re
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from .interpreter import interpreter_pool, interpreting
from .sm90 import compile_sm90, offline_triton, stack_bytes

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_dot8_silu_lora(dtype: str, m: int, i: int, k: int, config: tuple, dora: str, device: str = "cpu") -> None:
    """With gate_up's LoRA delta (and DoRA's g) in the epilogue (LoRABatch.around_delta's consumer): h within rounding
    of dot8_silu_ref with the same delta and factor, and the codes per_token_quant_fp8(h) bit for bit."""
    from loraserve.kernels.fp8_dot8_silu import dot8_silu_quant, dot8_silu_ref
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8

    from .fp8_gemm_cases import make_weight
    from .fp8_norm_quant_cases import lora_delta_case

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(m * 1000 + i + k + 1)
    w_q, w_scale = make_weight(2 * i, k, i + 3 * k, device)
    x = (torch.randn(m, k, generator=g) * 2).to(device, dt)
    xq = per_token_quant_fp8(x)
    delta, args, factor = lora_delta_case(m, 2 * i, dt, device, dora, g)
    delta = delta * 20   # (as large as the GEMM's outputs: the delta must show)
    h, q, s = dot8_silu_quant(x, w_q, w_scale, config, x_q=xq, delta=delta, dora=args)
    q2, s2 = per_token_quant_fp8(h)
    assert torch.equal(s, s2) and torch.equal(q.float(), q2.float()), "codes differ from per_token_quant_fp8(h)"
    ref = dot8_silu_ref(x, w_q, w_scale, xq, delta=delta, factor=factor)[0].float()
    plain = dot8_silu_ref(x, w_q, w_scale, xq)[0].float()
    rel = float((h.float() - ref).norm() / ref.norm())
    assert rel < (2e-2 if dt != torch.float32 else 1e-4), rel
    assert float((plain - ref).norm() / ref.norm()) > 0.05, "the delta must change the output"


def check_dot8_silu(dtype: str, m: int, i: int, k: int, config: tuple, device: str = "cpu") -> None:
    """h == silu_and_mul(fp8_gemv(same config)) and (codes, scale) == per_token_quant_fp8(h), bit for bit; h within
    bf16/fp16 rounding of dot8_silu_ref (the same per-token x rounding, fp32 GEMM)."""
    from loraserve.kernels.activation import silu_and_mul
    from loraserve.kernels.fp8_dot8_silu import dot8_silu_quant, dot8_silu_ref
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8
    from loraserve.kernels.fp8_gemv import fp8_gemv

    from .fp8_gemm_cases import make_weight

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(m * 1000 + i + k)
    w_q, w_scale = make_weight(2 * i, k, i + 3 * k, device)
    x = (torch.randn(m, k + 8, generator=g) * 2).to(device, dt)[:, 3:3 + k]   # a strided row view
    xq = per_token_quant_fp8(x.contiguous())
    h, q, s = dot8_silu_quant(x, w_q, w_scale, config, x_q=xq)
    assert h.shape == (m, i) and q.shape == (m, i) and s.shape == (m, 1) and h.dtype == dt
    unfused = silu_and_mul(fp8_gemv(x, w_q, w_scale, config=config, x_q=xq))
    assert torch.equal(h, unfused), f"fused != unfused at {int((h != unfused).sum())} of {h.numel()} ({config})"
    q2, s2 = per_token_quant_fp8(unfused)
    assert torch.equal(s, s2) and torch.equal(q.float(), q2.float()), "codes differ from per_token_quant_fp8(h)"
    h2, q3, s3 = dot8_silu_quant(x, w_q, w_scale, config)   # x quantized by the launcher itself: the same
    assert torch.equal(h2, h) and torch.equal(s3, s) and h2 is not h
    h4, none, _ = dot8_silu_quant(x, w_q, w_scale, config, x_q=xq, codes=False)
    assert none is None and torch.equal(h4, h)
    ref = dot8_silu_ref(x, w_q, w_scale, xq)[0].float()   # (x's codes as the kernel made them: tested apart)
    # a sanity bound on the whole (bit for bit the unfused launches above is the property; their GEMM is tested
    # against its reference in test_fp8_gemv): element bounds failed on the H200 at isolated outputs where SiLU-mul
    # amplifies g's / u's roundings (probes 1-2: 16 at |h| ~ 600), so the relative norm of the error
    rel = float((h.float() - ref).norm() / ref.norm())
    assert rel < (2e-2 if dt != torch.float32 else 1e-4), rel


@pytest.fixture(scope="module")
def interp() -> Iterator:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("m,i,k,config", [
    (5, 40, 96, ("dot8", 16, 16, 32, 1, 4, 2)),     # one row tile, I tail (40 = 2 x 16 + 8), K tail
    (17, 32, 128, ("dot8", 16, 16, 32, 1, 4, 2)),   # two row tiles (17 = 16 + 1), even K
    (3, 48, 64, ("dot8f", 16, 32, 32, 1, 4, 2)),    # the fast accumulation kind
])
@pytest.mark.parametrize("dtype", ["float16", "float32"])   # the interpreter mishandles bf16
def test_dot8_silu_interp(interp, dtype, m, i, k, config) -> None:
    interp.submit(check_dot8_silu, dtype, m, i, k, config).result(timeout=300)


@pytest.mark.parametrize("dora", ["", "flags", "all"])
def test_dot8_silu_lora_delta_interp(interp, dora) -> None:
    interp.submit(check_dot8_silu_lora, "float16", 17, 40, 96, ("dot8", 16, 16, 32, 1, 4, 2), dora).result(timeout=300)


def test_config_ok() -> None:
    from loraserve.kernels.fp8_dot8_silu import dot8_silu_config_ok

    assert dot8_silu_config_ok(("dot8", 64, 64, 128, 1, 4, 3)) and dot8_silu_config_ok(("dot8f", 64, 64, 128, 1, 4, 3))
    assert not dot8_silu_config_ok(("dot8", 64, 64, 128, 2, 4, 3))
    assert not dot8_silu_config_ok(("tw", 64, 64, 128, 1, 4, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [48, 64])
def test_dot8_silu_gpu(m) -> None:
    """At the 8B gate_up shape with the table's bucket-64 config; then captured in a CUDA graph, replay == eager."""
    from loraserve.kernels.fp8_dot8_silu import dot8_silu_quant
    from loraserve.kernels.fp8_gemv import gemv_config

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 MMA needs sm >= 89")
    cfg = gemv_config(64, 28672, 4096, torch.cuda.get_device_properties(0).multi_processor_count)
    if cfg[0] != "dot8" or cfg[4] != 1:
        cfg = ("dot8", 64, 64, 128, 1, 4, 3)
    check_dot8_silu("bfloat16", m, 14336, 4096, cfg, "cuda")
    check_dot8_silu_lora("bfloat16", m, 14336, 4096, cfg, "flags", "cuda")
    from .fp8_gemm_cases import make_weight

    w_q, w_scale = make_weight(28672, 4096, 1, "cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    eager = dot8_silu_quant(x, w_q, w_scale, cfg)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dot8_silu_quant(x, w_q, w_scale, cfg)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dot8_silu_quant(x, w_q, w_scale, cfg)
    for t in out:
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, eager):
        assert torch.equal(a.float(), b.float())


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines launch the kernels (test_dot8_silu_gpu)")
@pytest.mark.parametrize("bn,warps,stages,dora", [(64, 4, 3, None), (128, 8, 3, None), (64, 8, 4, None),
                                                  (64, 4, 3, 2), (64, 4, 3, 0)])   # (128 x 4 warps spills)
def test_dot8_silu_compiles_sm90(bn, warps, stages, dora) -> None:
    offline_triton()
    from loraserve.kernels.fp8_dot8_silu import _row_codes_kernel
    from loraserve.kernels.fp8_skinny_dot import _fp8_skinny_dot_kernel

    sig = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16",
           "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_xm": "i32",
           "stride_ym": "i32", "x16_scale": "fp32", "xs_ptr": "*fp32", "cnt_ptr": "*fp32", "SPLITS": "i32"}
    c = {"HAS_BIAS": False, "EVEN_K": True, "USE_WS": False, "F16": False, "FP8X": True, "BLOCK_M": 64, "BLOCK_N": bn,
         "BLOCK_K": 128, "PDL": True, "WAIT": False, "FIXUP": False, "PRECISE": True, "SILU": True}
    if dora is not None:   # with gate_up's LoRA delta in the epilogue (0: no DoRA, 2: DoRA's per-slot g)
        sig.update({"d_ptr": "*bf16", "stride_d": "i32"})
        c.update({"HAS_DELTA": True, "DORA": dora})
        if dora:
            sig.update({"tok_ptr": "*i32", "g_ptr": "*fp32", "stride_g": "i32", "on_ptr": "*i32"})
    kernel = compile_sm90(_fp8_skinny_dot_kernel, sig, c, div16_except=("M", "x16_scale", "SPLITS"), unit=("SPLITS",),
                          num_warps=warps, num_stages=stages)
    ptx = kernel.asm["ptx"]
    assert stack_bytes(kernel) == 0, kernel.metadata
    assert len(re.findall(r"wgmma\.mma_async[\w.]*\.e4m3\.e4m3", ptx)) >= 2   # gate and up: two FP8 MMAs
    assert "griddepcontrol.launch_dependents" in ptx and "ex2.approx" in ptx
    codes = compile_sm90(_row_codes_kernel, {"h_ptr": "*bf16", "pm_ptr": "*fp32", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                                             "N": "i32", "P": "i32", "fp8_max": "fp32", "stride_h": "i32",
                                             "stride_q": "i32"},
                         {"BLOCK": 1024, "P_BLOCK": 256, "FP8_MAX_C": 448.0, "MIN_SCALE_C": 1e-12, "USE_PDL": True},
                         div16_except=("P", "fp8_max"), num_warps=4, num_stages=1, launch_pdl=True)
    assert stack_bytes(codes) == 0 and "griddepcontrol.wait" in codes.asm["ptx"]
