"""The attention kernels over an FP8 (float8_e4m3fn, per-tensor k_scale / v_scale) KV cache against the
fp32 torch reference on the dequantized cache: the step kernel (kernels/unified_attention.py) on
prefill, chunked prefill, decode and mixed batches with GQA, the decode kernel (kernels/paged_attention.py),
split-KV, and the engine's FP8 write + read step (attention.paged_attention_fp8). On CPU the kernels
run under Triton's interpreter (which loads float8 tensors) in a spawned TRITON_INTERPRET=1 worker;
the GPU variants add bf16 queries, Llama-3-8B head shapes and a CUDA-graph replay that follows a
scale changed after capture.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import fp8_attention_cases as cases
from . import unified_attention_cases as ua
from .interpreter import interpreter_pool

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
needs_cuda = pytest.mark.skipif(not (triton_available() and torch.cuda.is_available()), reason="needs CUDA + triton")


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(ua.interpreting)


def _run(pool: ProcessPoolExecutor, fn, *args, **kwargs) -> None:
    pool.submit(fn, *args, **kwargs).result(timeout=300)


# (batch, H, KVH, D, BS): GQA groups 4 and 1 and 8, head_dim 24 padded to 32
INTERP_UNIFIED = [("mixed", 8, 2, 16, 16), ("prefill", 4, 4, 16, 16), ("chunked", 8, 1, 32, 32),
                  ("decode", 8, 2, 16, 16), ("mixed", 6, 2, 24, 16)]


@needs_triton
@pytest.mark.parametrize("batch,H,KVH,D,BS", INTERP_UNIFIED)
def test_unified_fp8_interpreter(interp, batch, H, KVH, D, BS) -> None:
    _run(interp, cases.check_unified, batch, H, KVH, D, BS, "float32", seed=H + BS, check_wrong_scale=batch == "mixed")


@needs_triton
def test_unified_fp8_interpreter_fp16_split_kv_float_scales(interp) -> None:
    """fp16 queries (codes widened to fp16 for the dot), split-KV partials carrying v_scale through the
    merge, scales given as floats."""
    _run(interp, cases.check_unified, "chunked", 8, 2, 16, 16, "float16", seed=3, num_splits=3, scales_as="float",
         check_wrong_scale=False)


def _check_unified_fp16_operands(batch_name: str, num_splits) -> None:
    """The FP16_OPS form (the H200's default for bf16 queries: q, the widened codes and p in fp16 for the MMAs) forced
    for fp32 queries (LORASERVE_ATTN_FP8_FP16=1; the interpreter mishandles bf16): within fp16 rounding of the
    reference on the dequantized cache."""
    import os

    from loraserve.kernels.unified_attention import unified_attention, unified_attention_ref

    os.environ["LORASERVE_ATTN_FP8_FP16"] = "1"
    try:
        batch = ua.BATCHES[batch_name]
        q, k, v, tables, lens, qsl, ks, vs = cases.make_fp8_problem(batch, 8, 2, 16, 16, torch.float32, 11)
        ref = unified_attention_ref(q, k.float() * ks, v.float() * vs, tables, lens, qsl, 16 ** -0.5)
        out = unified_attention(q, k, v, tables, lens, qsl, max(ql for ql, _ in batch), 16 ** -0.5,
                                num_splits=num_splits, k_scale=ks, v_scale=vs)
        torch.testing.assert_close(out, ref, **ua.TOLERANCES[torch.float16])
    finally:
        os.environ.pop("LORASERVE_ATTN_FP8_FP16")


@needs_triton
@pytest.mark.parametrize("batch,num_splits", [("decode", None), ("mixed", 3)])
def test_unified_fp8_fp16_operands_interpreter(interp, batch, num_splits) -> None:
    _run(interp, _check_unified_fp16_operands, batch, num_splits)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_fp8_interpreter(interp, num_splits) -> None:
    _run(interp, cases.check_decode, 4, 8, 2, 16, 16, "float32", seed=7, num_splits=num_splits)


@pytest.mark.parametrize("batch", list(ua.BATCHES))
def test_engine_fp8_step_cpu(batch) -> None:
    """The engine's FP8 step on CPU (torch path): quantize, byte write at the slots, dequantized read."""
    cases.check_engine_store_and_read(batch, 8, 2, 16, 16, seed=4)


def test_bad_fp8_inputs_are_refused() -> None:
    from loraserve.kernels.unified_attention import check_kv_dtype, kv_scale_tensor

    q = torch.zeros(2, 4, 16)
    k8 = torch.zeros(3, 16, 2, 16, dtype=torch.float8_e4m3fn)
    assert check_kv_dtype(q, k8, k8) is True
    assert check_kv_dtype(q, q.new_zeros(3, 16, 2, 16), q.new_zeros(3, 16, 2, 16)) is False
    with pytest.raises(ValueError, match="float8_e4m3fn or the query dtype"):
        check_kv_dtype(q, k8.view(torch.float8_e5m2), k8.view(torch.float8_e5m2))
    with pytest.raises(ValueError, match="needs k_scale"):
        kv_scale_tensor(None, "k_scale", q.device)
    with pytest.raises(ValueError, match="1-element float32"):
        kv_scale_tensor(torch.ones(2), "k_scale", q.device)
    assert kv_scale_tensor(0.5, "v_scale", q.device).tolist() == [0.5]


# ---- GPU ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", list(ua.BATCHES))
@pytest.mark.parametrize("dtype,H,KVH,BS", [("bfloat16", 32, 8, 16), ("float32", 32, 8, 16), ("bfloat16", 8, 8, 32)])
def test_unified_fp8_gpu(batch, dtype, H, KVH, BS) -> None:
    cases.check_unified(batch, H, KVH, 128, BS, dtype, seed=1, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,num_splits", [("bfloat16", None), ("bfloat16", 1), ("bfloat16", 8), ("float16", None)])
def test_paged_decode_fp8_gpu(dtype, num_splits) -> None:
    cases.check_decode(16, 32, 8, 128, 16, dtype, seed=2, num_splits=num_splits, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", list(ua.BATCHES))
def test_engine_fp8_step_gpu(batch) -> None:
    """paged_attention_fp8 on CUDA: the quantized byte write, then the Triton kernel reads the codes."""
    cases.check_engine_store_and_read(batch, 32, 8, 128, 16, seed=6, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["unified", "paged_decode"])
def test_fp8_graph_replay_reads_scales_from_device(kernel) -> None:
    """Capture a decode step over an FP8 cache; replay equals eager bit for bit, and after the scale
    tensors change in place (calibration after capture) the replay follows them."""
    from loraserve.kernels.paged_attention import paged_decode_attention
    from loraserve.kernels.unified_attention import unified_attention

    batch = [(1, 700), (1, 40), (1, 3), (1, 1200)]
    q, k, v, tables, lens, qsl, ks, vs = cases.make_fp8_problem(batch, 32, 8, 128, 16, torch.bfloat16, 5, "cuda")

    def step(out=None):
        if kernel == "unified":
            return unified_attention(q, k, v, tables, lens, qsl, 1, 128 ** -0.5, out=out, k_scale=ks, v_scale=vs)
        return paged_decode_attention(q, k, v, tables, lens, 128 ** -0.5, out=out, k_scale=ks, v_scale=vs)

    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step(out)   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step(out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())
    before = out.clone()
    ks.mul_(0.5)
    vs.mul_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step()) and not torch.equal(out, before)


@needs_triton
def test_store_kv_fp8_interpreter(interp) -> None:
    _run(interp, cases.check_store, 37, 2, 16, 16, "float32", seed=1)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_store_kv_fp8_gpu(dtype) -> None:
    """Triton's IEEE division and round-to-nearest-even cast give torch's codes, bit for bit."""
    cases.check_store(4096, 8, 128, 16, dtype, seed=2, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels")
def test_unified_fp8_fp16_operands_compile_sm90() -> None:
    """Offline sm_90 compile of the bs64 decode variant over an e4m3 cache with bf16 queries: with FP16_OPS the codes
    are widened by one cvt.rn.f16x2.e4m3x2 per pair and nothing converts to bf16 (without it, the bf16 widening);
    no spills either way."""
    import re

    from loraserve.kernels.unified_attention import _unified_attention_kernel

    from .sm90 import compile_sm90, offline_triton, stack_bytes

    offline_triton()
    types = {"q_ptr": "*bf16", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "tables_ptr": "*i32", "seq_lens_ptr": "*i32",
             "qsl_ptr": "*i32", "out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32",
             "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "scale_log2": "fp32", "num_seqs": "i32",
             "num_tokens": "i32", "num_splits": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_kb": "i32",
             "stride_ks": "i32", "stride_kh": "i32", "stride_vb": "i32", "stride_vs": "i32", "stride_vh": "i32",
             "stride_tb": "i32", "stride_ot": "i32", "stride_oh": "i32"}
    consts = dict(H=32, G=4, BLOCK_M=16, BLOCK_Q=4, TILE_N=64, BS=16, D=128, D_PAD=128, SPLIT_KV=False,
                  DOT_PRECISION="tf32", FP8_KV=True, USE_PDL=True)
    aligned = ["q_ptr", "k_ptr", "v_ptr", "out_ptr", "part_acc_ptr", "part_ml_ptr", "stride_qt", "stride_qh",
               "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_ot", "stride_oh"]
    ptx = {}
    for fp16, form in ((True, 1), (False, 1), ("pinned", 2)):
        kernel = compile_sm90(_unified_attention_kernel, types, {**consts, "FP16_OPS": bool(fp16), "FP8_KV": form},
                              div16=aligned, num_warps=4, num_stages=2, launch_pdl=True)
        assert stack_bytes(kernel) == 0, fp16
        ptx[fp16] = kernel.asm["ptx"]
    # V widened in its load layout (FP8_KV=2, kernels/fp8_convert.py): no byte gathers from shared memory, the fp16
    # tile to the MMA by ldmatrix.trans (as a bf16 V); the cast form gathers V's codes byte by byte
    assert "ld.shared.b8" in ptx[True] and "ld.shared.b8" not in ptx["pinned"]
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in ptx["pinned"] and "cvt.bf16.f16" not in ptx["pinned"]
    # (Triton 3.9: 256 per-value cvt.bf16.f16 per K/V tile pair without FP16_OPS, none with it)
    assert "cvt.rn.f16x2.e4m3x2" in ptx[True] and "cvt.bf16.f16" not in ptx[True] and "cvt.bf16.f16" in ptx[False]
    assert re.search(r"mma[\w.]*\.f16\.f16", ptx[True]) and not re.search(r"mma[\w.]*\.bf16\.bf16", ptx[True])


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_unified_fp8_vpin_gpu(batch, monkeypatch) -> None:
    """LORASERVE_ATTN_FP8_VPIN=1 (V's codes widened by kernels/fp8_convert.py's inline asm): the reference on the
    dequantized cache, and the cast form's output (same fp16 operands; H200: not bit for bit, within MMA rounding)."""
    from loraserve.kernels.unified_attention import unified_attention

    cases.check_unified(batch, 32, 8, 128, 16, "bfloat16", seed=5, device="cuda", check_wrong_scale=False)
    q, k, v, tables, lens, qsl, ks, vs = cases.make_fp8_problem(ua.BATCHES[batch], 32, 8, 128, 16, torch.bfloat16, 5,
                                                               "cuda")
    max_q = max(ql for ql, _ in ua.BATCHES[batch])
    monkeypatch.setenv("LORASERVE_ATTN_FP8_VPIN", "0")   # the cast form (auto pins V at unsplit decode launches)
    plain = unified_attention(q, k, v, tables, lens, qsl, max_q, 128 ** -0.5, k_scale=ks, v_scale=vs)
    monkeypatch.setenv("LORASERVE_ATTN_FP8_VPIN", "1")
    cases.check_unified(batch, 32, 8, 128, 16, "bfloat16", seed=5, device="cuda", check_wrong_scale=False)
    pinned = unified_attention(q, k, v, tables, lens, qsl, max_q, 128 ** -0.5, k_scale=ks, v_scale=vs)
    print(f"vpin vs cast ({batch}): bit for bit {torch.equal(pinned, plain)}")   # (pytest -s)
    torch.testing.assert_close(pinned.float(), plain.float(), rtol=1e-2, atol=1e-2)
