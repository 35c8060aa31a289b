"""kernels/fp8_qkv_rope_dot8.py (the qkv dot8 GEMM with RoPE + the e4m3 K/V write in its epilogue, 33..64 tokens)
== the dot8 GEMM (the same tiles) then rope_store_kv_fp8, bit for bit (q and both caches, untouched slots included),
and q close to the torch reference: the interpreter on the CPU (small heads), the GPU at the 8B shape (also inside a
CUDA graph), and an sm_90 offline compile (no spills, two FP8 MMAs)."""
from __future__ import annotations

import re
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from .interpreter import interpreter_pool, interpreting
from .sm90 import compile_sm90, offline_triton, stack_bytes

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_qkv_rope_dot8(dtype: str, m: int, heads: int, kv_heads: int, d: int, k: int, config: tuple,
                        device: str = "cpu") -> None:
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8
    from loraserve.kernels.fp8_gemv import fp8_gemv
    from loraserve.kernels.fp8_qkv_rope_dot8 import fp8_qkv_rope_dot8
    from loraserve.kernels.fp8_rope_kv import rope_store_kv_fp8, rope_store_kv_fp8_ref
    from loraserve.kernels.rope import rope_cos_sin_cache

    from .fp8_gemm_cases import make_weight

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(m * 100 + heads + d)
    q_size, kv_size = heads * d, kv_heads * d
    n = q_size + 2 * kv_size
    w_q, w_scale = make_weight(n, k, n + k, device)
    x = torch.randn(m, k, generator=g).to(device, dt)
    xq, xs = per_token_quant_fp8(x)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cs = rope_cos_sin_cache(inv_freq.float().to(device), 4 * m + 64)
    positions = (torch.randperm(4 * m + 64, generator=g)[:m]).to(device)
    slots = torch.randperm(4 * m, generator=g)[:m].to(device)   # (a cache of 4 m slots: the rest stay zero)
    scales = torch.tensor([0.05], device=device), torch.tensor([0.02], device=device)
    blocks = -(-4 * m // 4)
    caches = [torch.zeros(blocks, 4, kv_heads, d, device=device).to(torch.float8_e4m3fn) for _ in range(4)]
    q = fp8_qkv_rope_dot8(xq, xs, w_q, w_scale, positions, cs, slots, caches[0], caches[1], *scales, q_size, kv_size,
                          dt, config=config)
    bm, bk, warps, stages = config
    qkv = fp8_gemv(x, w_q, w_scale, config=("dot8", bm, d // 2, bk, 1, warps, stages), x_q=(xq, xs))
    qr, kr, vr = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q2 = rope_store_kv_fp8(positions, qr.reshape(m, heads, d), kr.reshape(m, kv_heads, d), vr.reshape(m, kv_heads, d),
                           cs, caches[2], caches[3], slots, *scales)
    assert torch.equal(q, q2.reshape(m, q_size)), f"q differs at {int((q != q2.reshape(m, q_size)).sum())}"
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(a.float(), b.float()), f"cache differs at {int((a.float() != b.float()).sum())}"
    q3 = rope_store_kv_fp8_ref(positions, qr.reshape(m, heads, d), kr.reshape(m, kv_heads, d),
                               vr.reshape(m, kv_heads, d), cs, caches[2].clone(), caches[3].clone(), slots, *scales)
    torch.testing.assert_close(q.float(), q3.reshape(m, q_size).float(), rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def interp() -> Iterator:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("m,heads,kv_heads,d,k,config", [
    (5, 4, 2, 32, 96, (16, 32, 4, 2)),     # one row tile (5 of 16), K tail (96 = 3 x 32)
    (17, 2, 1, 32, 64, (16, 32, 4, 2)),    # two row tiles, even K
])
@pytest.mark.parametrize("dtype", ["float16", "float32"])   # the interpreter mishandles bf16
def test_qkv_rope_dot8_interp(interp, dtype, m, heads, kv_heads, d, k, config) -> None:
    interp.submit(check_qkv_rope_dot8, dtype, m, heads, kv_heads, d, k, config).result(timeout=300)


def test_config_switch(monkeypatch) -> None:
    from loraserve.kernels.fp8_qkv_rope_dot8 import qkv_rope_dot8_config

    monkeypatch.delenv("LORASERVE_FP8_QKV_ROPE_DOT8_CFG", raising=False)
    assert qkv_rope_dot8_config() == (32, 128, 4, 3)
    monkeypatch.setenv("LORASERVE_FP8_QKV_ROPE_DOT8_CFG", "16:128:4:4")
    assert qkv_rope_dot8_config() == (16, 128, 4, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,config", [(64, (32, 128, 4, 3)), (48, (16, 128, 4, 4)), (64, (64, 128, 4, 3))])
def test_qkv_rope_dot8_gpu(m, config) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 MMA needs sm >= 89")
    check_qkv_rope_dot8("bfloat16", m, 32, 8, 128, 4096, config, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines launch the kernel (test_qkv_rope_dot8_gpu)")
@pytest.mark.parametrize("bm,stages", [(16, 4), (32, 3), (64, 3)])
def test_qkv_rope_dot8_compiles_sm90(bm, stages) -> None:
    offline_triton()
    from loraserve.kernels.fp8_qkv_rope_dot8 import _fp8_qkv_rope_dot8_kernel

    sig = {"x_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "K": "i32",
           "stride_xm": "i32", "pos_ptr": "*i64", "cs_ptr": "*fp32", "stride_c": "i32", "num_positions": "i32",
           "slot_ptr": "*i64", "qo_ptr": "*bf16", "stride_qo": "i32", "kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv",
           "ks_ptr": "*fp32", "vs_ptr": "*fp32", "Q_SIZE": "i32", "KV_SIZE": "i32"}
    c = {"HALF": 64, "BLOCK_M": bm, "BLOCK_K": 128, "EVEN_K": True, "PRECISE": True, "TRIGGER": True}
    kernel = compile_sm90(_fp8_qkv_rope_dot8_kernel, sig, c, div16_except=("M",), num_warps=4, num_stages=stages)
    ptx = kernel.asm["ptx"]
    assert stack_bytes(kernel) == 0, kernel.metadata
    assert len(re.findall(r"wgmma\.mma_async[\w.]*\.e4m3\.e4m3", ptx)) >= 2
    assert "griddepcontrol.launch_dependents" in ptx
