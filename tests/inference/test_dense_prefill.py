"""Dense cuDNN attention for steps of fresh prompts of one length (services/inference/attention.py,
LORASERVE_PREFILL_CUDNN): which steps take it (CPU), and its output against the unified kernel and an fp32
torch reference on the same paged cache (GPU)."""
from __future__ import annotations

import pytest
import torch

from loraserve.inference import attention
from loraserve.inference.context import Context

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ctx(qlens, lens, decode_only=False) -> Context:
    return Context(query_lens=list(qlens), context_lens_list=list(lens), decode_only=decode_only)


@pytest.mark.parametrize("qlens,lens,dtype,cache_dtype,want", [
    ([512] * 4, [512] * 4, torch.bfloat16, None, 512),          # fresh prompts of one length
    ([300] * 2, [300] * 2, torch.float16, None, 300),
    ([512, 512], [512, 600], torch.bfloat16, None, 0),          # a cached prefix
    ([512, 500], [512, 500], torch.bfloat16, None, 0),          # lengths differ
    ([100] * 3, [100] * 3, torch.bfloat16, None, 0),            # shorter than PREFILL_CUDNN_MIN_LEN
    ([512] * 2, [512] * 2, torch.float32, None, 0),             # fp32: the unified kernel
    ([512] * 2, [512] * 2, torch.bfloat16, torch.float8_e4m3fn, 0),   # FP8 cache
])
def test_dense_prefill_len(monkeypatch, qlens, lens, dtype, cache_dtype, want):
    monkeypatch.setenv("LORASERVE_PREFILL_CUDNN", "1")
    monkeypatch.setattr(attention, "B_L_MIN", 512)
    monkeypatch.setattr(attention, "_SHAPES_SEEN", {})
    q = torch.empty(sum(qlens), 4, 128, dtype=dtype)
    k_cache = torch.empty(1, 16, 2, 128, dtype=cache_dtype or dtype)
    # a shape takes the path from its PREFILL_CUDNN_AFTER-th recurrence on (cuDNN's plan per shape)
    for _ in range(attention.PREFILL_CUDNN_AFTER):
        assert attention.dense_prefill_len(_ctx(qlens, lens), q, k_cache) == 0
    assert attention.dense_prefill_len(_ctx(qlens, lens), q, k_cache) == want
    monkeypatch.setenv("LORASERVE_PREFILL_CUDNN", "0")
    assert attention.dense_prefill_len(_ctx(qlens, lens), q, k_cache) == 0


def test_dense_prefill_len_small_steps(monkeypatch):
    """Steps under B_L_MIN tokens, and decode steps, never take the path (however often their shape recurs)."""
    monkeypatch.setenv("LORASERVE_PREFILL_CUDNN", "1")
    monkeypatch.setattr(attention, "_SHAPES_SEEN", {})
    q = torch.empty(2 * 1024, 4, 128, dtype=torch.bfloat16)
    for _ in range(attention.PREFILL_CUDNN_AFTER + 2):
        assert attention.dense_prefill_len(_ctx([1024] * 2, [1024] * 2), q, torch.empty(1, 16, 2, 128,
                                           dtype=torch.bfloat16)) == 0
    assert attention.dense_prefill_len(_ctx([1024] * 4, [1024] * 4), torch.empty(4096, 4, 128, dtype=torch.bfloat16),
                                       torch.empty(1, 16, 2, 128, dtype=torch.bfloat16)) == 0   # first of its shape


def test_dense_prefill_len_decode(monkeypatch):
    monkeypatch.setenv("LORASERVE_PREFILL_CUDNN", "1")
    q = torch.empty(4, 4, 128, dtype=torch.bfloat16)
    assert attention.dense_prefill_len(_ctx([1] * 4, [300] * 4, decode_only=True), q, torch.empty(1, 16, 2, 128,
                                       dtype=torch.bfloat16)) == 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,H,KVH", [(3, 300, 8, 2), (2, 1024, 32, 8), (1, 256, 4, 4)])
def test_dense_prefill_matches_unified(monkeypatch, dtype, B, L, H, KVH):
    from loraserve.kernels.unified_attention import unified_attention, unified_attention_ref

    torch.manual_seed(0)
    D, BS, dev = 128, 16, "cuda"
    W = -(-L // BS)
    nb = B * W * 2 + 1
    k_cache = torch.randn(nb, BS, KVH, D, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(nb, device=dev)[:B * W].view(B, W)                  # blocks scattered over the cache
    pos = torch.arange(L, device=dev)
    slots = (tables[:, pos // BS] * BS + pos % BS).reshape(-1)                  # [N] the step's rows, [B, L] order
    q = torch.randn(B * L, H, D, device=dev, dtype=dtype)
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    qsl = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=dev)
    scale = D ** -0.5
    out = attention.dense_prefill_attention(q, k_cache, v_cache, slots, L, scale)
    assert out.shape == q.shape and out.dtype == dtype
    ref = unified_attention_ref(q.float(), k_cache.float(), v_cache.float(), tables, lens, qsl, scale)
    uni = unified_attention(q, k_cache, v_cache, tables, lens, qsl, L, scale)
    err, err_uni = (out.float() - ref).abs().max().item(), (uni.float() - ref).abs().max().item()
    assert err <= max(2 * err_uni, 1e-2), (err, err_uni)
    # through the engine's dispatch: a step Context of B fresh prompts
    monkeypatch.setenv("LORASERVE_PREFILL_CUDNN", "1")
    monkeypatch.setattr(attention, "PREFILL_CUDNN_MIN_LEN", 256)
    monkeypatch.setattr(attention, "B_L_MIN", 256)
    monkeypatch.setattr(attention, "PREFILL_CUDNN_AFTER", 0)
    ctx = Context(slot_mapping=slots, query_lens=[L] * B, context_lens=lens, context_lens_list=[L] * B,
                  block_tables=tables, query_start_loc=qsl, max_query_len=L, max_seq_len=L)
    got = attention._kernel_attention(q, k_cache, v_cache, ctx, scale)
    assert ctx.dense_prefill == L
    torch.testing.assert_close(got, out, rtol=0, atol=0)
