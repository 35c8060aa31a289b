"""Triton paged decode attention vs its torch reference (interpreter on CPU; bf16 on GPU)."""
from __future__ import annotations


import pytest
import torch

from loraserve.kernels import triton_available

from . import paged_attention_cases
from .interpreter import interpreter_pool, interpreting

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture(scope="module")
def interp():
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("B,H,KVH,D,BS", [(3, 4, 2, 16, 16), (2, 8, 1, 32, 16), (4, 4, 4, 16, 32), (1, 12, 4, 64, 16)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_paged_decode_matches_reference(interp, B, H, KVH, D, BS, dtype):
    interp.submit(paged_attention_cases.check, B, H, KVH, D, BS, dtype, seed=B * 7 + H).result(timeout=300)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_paged_decode_split_kv(interp, num_splits):
    """Split-KV (flash-decoding) partials + merge; 8 splits leave some splits of short sequences empty."""
    interp.submit(paged_attention_cases.check, 3, 8, 2, 16, 16, "float32", seed=11,
                  num_splits=num_splits).result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_paged_decode_gpu_llama8b_shapes(dtype):
    from loraserve.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, KVH, D, BS, NB = 16, 32, 8, 128, 16, 512
    k = torch.randn(NB, BS, KVH, D, device="cuda", generator=g).to(dt)
    v = torch.randn(NB, BS, KVH, D, device="cuda", generator=g).to(dt)
    q = torch.randn(B, H, D, device="cuda", generator=g).to(dt)
    lens = torch.randint(1, 30 * BS, (B,), device="cuda", generator=g).int()
    tables = torch.stack([torch.randperm(NB, device="cuda")[:30] for _ in range(B)]).int()
    out = paged_decode_attention(q, k, v, tables, lens, D ** -0.5)
    ref = paged_decode_attention_ref(q, k, v, tables, lens, D ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_decode_gpu_long_context_split_and_graph():
    """Batch 1 at 20k tokens: split-KV on by default; a CUDA-graph replay equals eager bit for bit."""
    from loraserve.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    g = torch.Generator(device="cuda").manual_seed(1)
    H, KVH, D, BS, L = 32, 8, 128, 16, 20000
    NB = L // BS + 8
    k = torch.randn(NB, BS, KVH, D, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(NB, BS, KVH, D, device="cuda", generator=g).to(torch.bfloat16)
    q = torch.randn(1, H, D, device="cuda", generator=g).to(torch.bfloat16)
    tables = torch.randperm(NB, device="cuda")[None, : NB - 4].int().contiguous()
    lens = torch.tensor([L], dtype=torch.int32, device="cuda")
    ref = paged_decode_attention_ref(q, k, v, tables, lens, D ** -0.5)
    out = torch.empty_like(q)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        paged_decode_attention(q, k, v, tables, lens, D ** -0.5, out=out)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        paged_decode_attention(q, k, v, tables, lens, D ** -0.5, out=out)
    lens.fill_(777)  # replay reads lengths from the device
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, paged_decode_attention(q, k, v, tables, lens, D ** -0.5))
    torch.testing.assert_close(out.float(), paged_decode_attention_ref(q, k, v, tables, lens, D ** -0.5).float(),
                               rtol=3e-2, atol=2e-2)
