"""Checks run in a TRITON_INTERPRET=1 worker process (see test_paged_attention.py)."""
from __future__ import annotations

import torch


def check(B: int, H: int, KVH: int, D: int, BS: int, dtype_name: str, seed: int, num_splits: int | None = None) -> None:
    from loraserve.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    num_blocks, max_blocks = 40, 6
    k_cache = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    lens = torch.randint(1, max_blocks * BS + 1, (B,), generator=g)
    lens[0] = 1
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(B)]).int()
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, D ** -0.5)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens.int(), D ** -0.5, num_splits=num_splits)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
