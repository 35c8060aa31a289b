"""The decode-step kernels of kernels/gemv.py and kernels/rope.py's rope_store_kv vs their torch
references. Run in a TRITON_INTERPRET=1 worker on the CPU (test_gemv.py, test_rope_store_kv.py) and
called directly with device="cuda" by the GPU tests. Each function raises AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels.gemv import gemv, gemv_ref
from loraserve.kernels.rope import rope_cos_sin_cache, rope_store_kv, rope_store_kv_ref

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# fp32 accumulation in another order than the reference: a last-bit difference after the rounding
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def check_gemv(dtype: str, M: int, N: int, K: int, bias: bool, silu_mul: bool, device: str = "cpu",
               config: tuple[int, ...] | None = None) -> None:
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(M * 7919 + N + K)
    x_cols = 2 * K if silu_mul else K
    wide = torch.randn(M, x_cols + 8, generator=g).to(device, dt)
    x = wide[:, 8:]                      # a row-strided view, as a slice of a wider activation
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dt)
    b = torch.randn(N, generator=g).to(device, dt) if bias else None
    y = gemv(x, w, b, silu_mul=silu_mul, config=config)
    ref = gemv_ref(x, w, b, silu_mul=silu_mul)
    assert y.shape == (M, N) and y.dtype == dt
    torch.testing.assert_close(y, ref, **TOL[dt])
    # the output must move with the inputs (a kernel that ignores a row or the bias fails here)
    x2 = x.clone()
    x2[-1] = -x2[-1]
    torch.testing.assert_close(gemv(x2, w, b, silu_mul=silu_mul, config=config), gemv_ref(x2, w, b, silu_mul=silu_mul),
                               **TOL[dt])


def check_rope_store_kv(dtype: str, T: int, H: int, KVH: int, D: int, block_size: int = 16,
                        device: str = "cpu") -> None:
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(T * 31 + H * D + KVH)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    table = rope_cos_sin_cache(inv_freq.float().to(device), 2048)
    positions = torch.randint(0, 2048, (T,), generator=g).to(device)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(device, dt)   # q, k, v: strided views of it
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)
    v = qkv[:, (H + KVH) * D:].view(T, KVH, D)
    num_blocks = (T + block_size - 1) // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T].to(device)   # scattered, distinct
    k_cache = torch.randn(num_blocks, block_size, KVH, D, generator=g).to(device, dt)
    v_cache = torch.randn(num_blocks, block_size, KVH, D, generator=g).to(device, dt)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = rope_store_kv_ref(positions, q, k, v, table, k_ref, v_ref, slots)
    qkv_before = qkv.clone()
    q_out = rope_store_kv(positions, q, k, v, table, k_cache, v_cache, slots)
    torch.testing.assert_close(q_out, q_ref, **TOL[dt])
    torch.testing.assert_close(k_cache, k_ref, **TOL[dt])
    assert torch.equal(v_cache, v_ref), "v must be copied bit for bit, and only at its slots"
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert torch.equal(k_cache.view(-1, KVH, D)[untouched], k_ref.view(-1, KVH, D)[untouched]), "wrote another slot"
    assert torch.equal(qkv, qkv_before), "the inputs were modified"


def check_greedy(B: int, V: int, device: str = "cpu", chunk: int | None = None) -> None:
    """Fused greedy sampling vs the torch ops of sampler.sample(): random rows, a row with ties across
    chunks, a NaN row, rows with +inf (one and two entries), a row with no finite value."""
    import loraserve.kernels.greedy as greedy

    if chunk is not None:
        greedy.CHUNK = chunk
    g = torch.Generator().manual_seed(B * 131 + V)
    x = (torch.randn(B, V, generator=g) * 3).to(device)
    special = []
    if B >= 6:
        x[1, V // 3] = x[1, V - 2] = x[1].max() + 1                 # tie across chunks: the first wins
        x[2, ::7] = float("nan")
        x[3, 5] = float("inf")
        x[4, V - 1] = x[4, 2] = float("inf")
        x[5] = float("-inf")
        x[5, 3] = float("nan")
        special = [1, 2, 3, 4, 5]
    tok, lp, ok = greedy.greedy_sample(x)
    rtok, rlp, rok = greedy.greedy_sample_ref(x)
    assert torch.equal(tok, rtok), (tok, rtok)
    assert torch.equal(ok, rok), (ok, rok)
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and ok.dtype == torch.bool
    if special:
        assert int(tok[1]) == V // 3 and int(tok[3]) == 5 and int(tok[4]) == 2 and not bool(ok[5])
