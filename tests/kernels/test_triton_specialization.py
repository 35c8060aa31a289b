"""Step shapes must not compile new kernel variants after a warm-up (issue 10: a 7759-token prefill
compiled for 1.94 s mid-serving). Triton specialises int arguments (== 1, multiple of 16) and pointer
alignment (16 bytes) unless told not to; the engine's metadata are views into one packed int64 buffer
whose offsets move with the token count (step_inputs.py), so both classes change from step to step.
kernels/_triton.no_specialize lists the arguments; the GPU test counts compiled variants."""
from __future__ import annotations

import importlib

import pytest
import torch

from loraserve.kernels._triton import HAS_TRITON, no_specialize

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def test_no_specialize_keywords(monkeypatch) -> None:
    kw = no_specialize("num_tokens", pointers=("pos_ptr",))
    assert set(kw["do_not_specialize"]) == {"num_tokens", "pos_ptr"}
    assert kw.get("do_not_specialize_on_alignment", ["pos_ptr"]) == ["pos_ptr"]
    monkeypatch.setenv("LORASERVE_TRITON_SPECIALIZE", "1")
    assert no_specialize("num_tokens", pointers=("pos_ptr",)) == {}


def _variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches:
        return sum(len(v[0]) for v in caches.values())
    cache = getattr(kernel, "cache", None)
    return sum(len(v) for v in cache.values()) if isinstance(cache, dict) else -1


def _packed(values, offset, dev):
    """int64 tensors back to back from element `offset` of one buffer, as step_inputs.py lays out a step."""
    flat = torch.zeros(offset + sum(v.numel() for v in values), dtype=torch.int64, device=dev)
    out, at = [], offset
    for v in values:
        out.append(flat[at:at + v.numel()].view(v.shape))
        out[-1].copy_(v)
        at += v.numel()
    return out


def _step(batch, k_cache, v_cache, cos_sin):
    """rope_store_kv + unified attention over `batch` [(query_len, context_len)], metadata packed."""
    from loraserve.kernels.rope import rope_store_kv
    from loraserve.kernels.unified_attention import unified_attention

    dev, dt = k_cache.device, k_cache.dtype
    H, KVH, D, BS = 32, k_cache.shape[2], k_cache.shape[3], k_cache.shape[1]
    N = sum(q for q, _ in batch)
    W = max(-(-L // BS) for _, L in batch)
    tables = torch.randint(0, k_cache.shape[0], (len(batch), W))
    pos = torch.cat([torch.arange(L - q, L) for q, L in batch])
    slots = torch.randperm(k_cache.shape[0] * BS)[:N]
    lens = torch.tensor([L for _, L in batch])
    pos, slots, lens, tables = _packed([pos, slots, lens, tables.view(-1)], N, dev)
    qkv = torch.randn(N, (H + 2 * KVH) * D, device=dev, dtype=dt)
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    qr = rope_store_kv(pos, q.view(N, H, D), k.view(N, KVH, D), v.view(N, KVH, D), cos_sin, k_cache, v_cache, slots)
    qsl = torch.tensor([0] + [q for q, _ in batch], device=dev).cumsum(0).to(torch.int32)
    return unified_attention(qr, k_cache, v_cache, tables.view(len(batch), W), lens, qsl, max(q for q, _ in batch),
                             D ** -0.5, num_splits=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_token_counts_and_offsets_compile_nothing_new(monkeypatch) -> None:
    monkeypatch.delenv("LORASERVE_TRITON_SPECIALIZE", raising=False)
    rope = importlib.import_module("loraserve.kernels.rope")
    ua = importlib.import_module("loraserve.kernels.unified_attention")
    from loraserve.kernels.rope import rope_cos_sin_cache

    k_cache = torch.zeros(512, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    cos_sin = rope_cos_sin_cache(torch.rand(64, device="cuda"), 4096)
    # warm-up: one prompt step (BLOCK_M 64) and one decode step (BLOCK_M 16)
    _step([(64, 64)], k_cache, v_cache, cos_sin)
    _step([(1, 40)] * 2, k_cache, v_cache, cos_sin)
    torch.cuda.synchronize()
    before = (_variants(ua._unified_attention_kernel), _variants(rope._rope_store_kv_kernel))
    if -1 in before:
        pytest.skip("this Triton keeps its compiled variants elsewhere")
    # odd and even token counts, batch sizes 1 / 3 / 16 / 17, metadata at odd element offsets
    for batch in ([(33, 33)], [(17, 17), (16, 16)], [(1, 40)], [(1, 40)] * 3, [(1, 300)] * 16, [(1, 9)] * 17,
                  [(100, 100)] * 3, [(255, 700)]):
        _step(batch, k_cache, v_cache, cos_sin)
    torch.cuda.synchronize()
    after = (_variants(ua._unified_attention_kernel), _variants(rope._rope_store_kv_kernel))
    assert after == before, f"compiled variants (attention, rope_store_kv) grew {before} -> {after}"
