"""Fused small ops (RMSNorm+residual, SiLU-mul, RoPE) vs their torch references, executed in a
worker process started with TRITON_INTERPRET=1 (see test_fused_ops.py). Also imported by the
GPU tests with device="cuda". Each function raises AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from loraserve.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from loraserve.kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin_cache

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# One rounding to the dtype may land one ulp apart (fp32 summation order, exp/sqrt ulps).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_rms_norm(dtype: str, num_tokens: int, hidden: int, device: str = "cpu") -> None:
    dt, g = DTYPES[dtype], _gen(hidden + num_tokens)
    wide = (torch.randn(num_tokens, hidden + 8, generator=g) * 3).to(device, dt)
    x = wide[:, 4:4 + hidden]  # a strided row view, as a slice of a wider activation
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dt)
    res = torch.randn(num_tokens, hidden, generator=g).to(device, dt)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), **TOL[dt])

    x_ref, res_ref = x.clone(), res.clone()
    fused_add_rms_norm_ref(x_ref, res_ref, w, 1e-5)
    before = wide.clone()
    out, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    assert out.data_ptr() == x.data_ptr() and new_res.data_ptr() == res.data_ptr(), "not in place"
    # The residual is one rounded add: bit exact. The normalised output within one ulp.
    assert torch.equal(res, res_ref), "residual += x differs from the torch add"
    torch.testing.assert_close(x, x_ref, **TOL[dt])
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + hidden:], before[:, 4 + hidden:]), \
        "wrote outside the row view"


def check_silu_and_mul(dtype: str, num_tokens: int, inter: int, device: str = "cpu") -> None:
    dt, g = DTYPES[dtype], _gen(inter + num_tokens)
    gate_up = (torch.randn(num_tokens, 2 * inter, generator=g) * 4).to(device, dt)
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), **TOL[dt])


def check_rope(dtype: str, num_tokens: int, heads: int, kv_heads: int, head_dim: int, scaling: str,
               device: str = "cpu") -> None:
    dt, g = DTYPES[dtype], _gen(heads * head_dim + num_tokens)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling == "linear":
        inv_freq = inv_freq / 4.0
    elif scaling == "llama3":  # low frequencies divided by 8, a smooth band in between
        wavelen = 2 * torch.pi / inv_freq
        inv_freq = torch.where(wavelen > 64, inv_freq / 8, inv_freq)
    cache = rope_cos_sin_cache(inv_freq.float().to(device), 4096)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g).to(device)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dt)
    q = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)  # strided views of the fused qkv
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    q_ref, k_ref = apply_rope_ref(positions, q, k, cache)
    # Out of place into contiguous buffers, then in place on the views.
    q_out, k_out = apply_rope(positions, q, k, cache, torch.empty_like(q_ref), torch.empty_like(k_ref))
    torch.testing.assert_close(q_out, q_ref, **TOL[dt])
    torch.testing.assert_close(k_out, k_ref, **TOL[dt])
    apply_rope(positions, q, k, cache)
    assert torch.equal(q, q_out) and torch.equal(k, k_out), "in place differs from out of place"
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before), "v was touched"
    # The table row for a position equals HF's per-step fp32 computation.
    p = positions[:3].float()
    freqs = p[:, None] * inv_freq.float().to(device)[None, :]
    torch.testing.assert_close(cache[positions[:3]], torch.cat([freqs.cos(), freqs.sin()], -1), rtol=0, atol=0)
