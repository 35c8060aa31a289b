"""kernels/fp8_norm_quant.py vs its references (kernels/rmsnorm.py's / activation.py's torch references, then
per_token_quant_fp8_ref), in a TRITON_INTERPRET=1 worker on the CPU and imported by the GPU tests (device="cuda").
Each function raises AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels.fp8_gemm import per_token_quant_fp8, per_token_quant_fp8_ref

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _codes_match(q: torch.Tensor, s: torch.Tensor, y: torch.Tensor, device: str) -> None:
    # the codes are per_token_quant_fp8's of the output (the same kernel math: bit for bit), and close to torch's
    # (the interpreter's e4m3 cast rounds ties / binade carries its own way: kernels' tests of the quant kernel)
    q2, s2 = per_token_quant_fp8(y)
    assert torch.equal(s, s2) and torch.equal(q.float(), q2.float()), "codes differ from per_token_quant_fp8(out)"
    q_ref, s_ref = per_token_quant_fp8_ref(y)
    torch.testing.assert_close(s, s_ref, rtol=2.5e-7, atol=0)
    a, b = q.float(), q_ref.float()
    ok = (a - b).abs() <= torch.maximum(a.abs(), b.abs()) / 8 + 2.0 ** -9   # one e4m3 step (a near-tie)
    if device == "cpu":   # the interpreter drops the carry into the next binade (126.9 -> 64: check_per_token_quant)
        ok |= (b != 0) & (torch.frexp(b.abs())[0] == 0.5) & (a == b / 2)
    assert bool(ok.all()), f"codes off by > 1 step: {a[~ok][:6].tolist()} vs {b[~ok][:6].tolist()}"


def check_rms_norm_quant(dtype: str, t: int, h: int, residual: bool, device: str = "cpu") -> None:
    from loraserve.kernels.fp8_norm_quant import rms_norm_quant
    from loraserve.kernels.rmsnorm import fused_add_rms_norm_ref, rms_norm_ref

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(t * 100 + h)
    x = (torch.randn(t, h, generator=g) * torch.logspace(-2, 1, t)[:, None]).to(device, dt)
    w = (torch.rand(h, generator=g) + 0.5).to(device, dt)
    r = torch.randn(t, h, generator=g).to(device, dt) if residual else None
    r_ref = r.clone() if residual else None
    r_before = r.clone() if residual else None
    x_before = x.clone()
    out, r_out, q, s = rms_norm_quant(x, r, w, 1e-5)
    assert out.shape == (t, h) and q.shape == (t, h) and s.shape == (t, 1) and torch.equal(x, x_before)
    if residual:
        ref, r_ref = fused_add_rms_norm_ref(x.clone(), r_ref, w, 1e-5)
        assert r_out is r and torch.equal(r, r_ref), "residual not updated as x + residual"
    else:
        ref = rms_norm_ref(x, w, 1e-5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2 if dt != torch.float32 else 1e-5, atol=1e-2)
    _codes_match(q, s, out, device)
    # and kernels/rmsnorm.py's kernel bit for bit (the same layout and summation order: the codes are read back)
    from loraserve.kernels.rmsnorm import fused_add_rms_norm, rms_norm

    plain = fused_add_rms_norm(x_before.clone(), r_before, w, 1e-5)[0] if residual else rms_norm(x_before, w, 1e-5)
    from loraserve.kernels.fp8_norm_quant import norm_warps

    block = 1 << (h - 1).bit_length()
    if device == "cuda" and norm_warps(t, block) != min(16, max(1, block // 512)):
        # 16 warps a row at 33..64 rows (norm_warps' default there): the squares summed in another order than
        # rms_norm's layout: 1/rms one fp32 ulp off, then two roundings (normed, weight * normed): within 2 ulps
        a, b = out.float(), plain.float()
        ulp = torch.ldexp(torch.ones_like(a), torch.frexp(torch.maximum(a.abs(), b.abs()))[1]
                          - (8 if dt == torch.bfloat16 else 11))
        assert bool(((a - b).abs() <= 2 * ulp).all()), f"rms_norm_quant > 2 ulps off rms_norm: {float((a - b).abs().max())}"
        return
    assert torch.equal(out, plain), f"rms_norm_quant != rms_norm at {int((out != plain).sum())} of {out.numel()}"


def check_silu_mul_quant(dtype: str, t: int, i: int, device: str = "cpu") -> None:
    from loraserve.kernels.activation import silu_and_mul_ref
    from loraserve.kernels.fp8_norm_quant import silu_mul_quant

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(t * 100 + i)
    gate_up = (torch.randn(t, 2 * i + 6, generator=g) * 3).to(device, dt)[:, 3:3 + 2 * i]   # strided rows
    out, q, s = silu_mul_quant(gate_up)
    assert out.shape == (t, i) and q.shape == (t, i) and s.shape == (t, 1)
    ref = silu_and_mul_ref(gate_up.float()).to(dt)   # HF's math in fp32, one rounding (the kernel rounds silu too)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2 if dt != torch.float32 else 1e-5, atol=2e-2)
    _codes_match(q, s, out, device)


def lora_delta_case(t: int, n: int, dt, device: str, dora: str, g: torch.Generator):
    """A LoRA delta [t, n] in dt and its DoRA arguments for the deferred-epilogue kernels: dora '' (none), 'all' (g on
    every adapted row), 'flags' (g where the slot's flag is set); rows of slot -1 have no adapter. Returns (delta,
    dora tuple or None, the per-row factor [t, n] fp32 the reference multiplies by)."""
    delta = (torch.randn(t, n, generator=g) * 0.5).to(device, dt)
    slots = 3
    tok = torch.tensor([(i % (slots + 1)) - 1 for i in range(t)], dtype=torch.int32)   # -1, 0, 1, 2, -1, ...
    gs = torch.rand(slots, n, generator=g) + 0.5
    on = torch.tensor([1, 0, 1], dtype=torch.int32)
    factor = torch.ones(t, n)
    for i, sl in enumerate(tok.tolist()):
        if sl >= 0 and (dora == "all" or (dora == "flags" and on[sl])):
            factor[i] = gs[sl]
    args = None if not dora else (tok.to(device), gs.to(device), on.to(device) if dora == "flags" else None)
    return delta, args, factor.to(device)


def check_splitk_add_rms_norm(dtype: str, splits: int, t: int, h: int, device: str = "cpu", row_scale: bool = False,
                              quant: bool = False, lora: str | None = None) -> None:
    """The deferred split-K sum + residual add + RMSNorm == _splitk_sum's rounding then fused_add_rms_norm_ref;
    row_scale: one 'split' times a per-row scale (a unit-scale FP8 GEMM's result); quant: the codes of the output.
    lora ('' / 'all' / 'flags', lora_delta_case): a LoRA delta added before the rounding (and DoRA's g): the residual
    within one rounding of the reference off the device's fp32 contraction."""
    from loraserve.kernels.fp8_norm_quant import splitk_add_rms_norm
    from loraserve.kernels.rmsnorm import fused_add_rms_norm_ref

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(splits * 1000 + t * 10 + h)
    ws = (torch.randn(splits, t, h, generator=g) * 30).to(device)
    s = (torch.rand(h, generator=g) * 0.01).to(device)
    w = (torch.rand(h, generator=g) + 0.5).to(device, dt)
    r = torch.randn(t, h, generator=g).to(device, dt)
    r_ref = r.clone()
    xs = (torch.rand(t, 1, generator=g) + 0.5).to(device) if row_scale else None
    delta, dora, factor = lora_delta_case(t, h, dt, device, lora, g) if lora is not None else (None, None, None)
    res = splitk_add_rms_norm(ws, s, r, w, 1e-5, xs, quant, delta=delta, dora=dora)
    out, r_out = res[0], res[1]
    y = ws[0].clone()
    for k in range(1, splits):   # the split order of the kernels' sums
        y += ws[k]
    if row_scale:
        y = y * xs   # _rescale_rows_cols_kernel's order: (acc * x_scale) * w_scale
    y = y * s
    if delta is not None:
        y = (y + delta.float()) * factor
    ref, r_ref = fused_add_rms_norm_ref(y.to(dt), r_ref, w, 1e-5)
    if quant:
        _codes_match(res[2], res[3], out, device)
    assert r_out is r
    if delta is None or device == "cpu":
        assert torch.equal(r, r_ref), f"residual max diff {float((r.float() - r_ref.float()).abs().max())}"
    else:   # (a GPU may contract acc * s + delta into one FMA: a value on a rounding edge one ulp away)
        torch.testing.assert_close(r.float(), r_ref.float(), rtol=1e-2 if dt != torch.float32 else 1e-5, atol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2 if dt != torch.float32 else 1e-5, atol=1e-2)


def check_qkv_rope(dtype: str, m: int, heads: int, kv_heads: int, d: int, k: int, config, bias: bool,
                   device: str = "cpu") -> None:
    """kernels/fp8_qkv_rope.py (qkv GEMV + RoPE + e4m3 K/V write, one launch) == fp8_gemv then rope_store_kv_fp8, bit
    for bit (q_out and both caches, untouched slots included), and q close to the torch reference."""
    from loraserve.kernels.fp8_gemv import fp8_gemv
    from loraserve.kernels.fp8_qkv_rope import fp8_qkv_rope_kv
    from loraserve.kernels.fp8_rope_kv import rope_store_kv_fp8, rope_store_kv_fp8_ref
    from loraserve.kernels.rope import rope_cos_sin_cache

    from .fp8_gemm_cases import make_weight

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(m * 100 + heads + d)
    q_size, kv_size = heads * d, kv_heads * d
    n = q_size + 2 * kv_size
    w_q, w_scale = make_weight(n, k, n + k, device)
    x = torch.randn(m, k, generator=g).to(device, dt)
    b = torch.randn(n, generator=g).to(device, dt) if bias else None
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cs = rope_cos_sin_cache(inv_freq.float().to(device), 64)
    positions = torch.tensor([5, 37, 12, 63][:m], device=device)
    slots = torch.tensor([3, 9, 14, 0][:m], device=device)
    scales = torch.tensor([0.05], device=device), torch.tensor([0.02], device=device)
    caches = [torch.zeros(4, 4, kv_heads, d, device=device).to(torch.float8_e4m3fn) for _ in range(4)]
    q = fp8_qkv_rope_kv(x, w_q, w_scale, b, config, positions, cs, slots, caches[0], caches[1], *scales, q_size, kv_size)
    qkv = fp8_gemv(x, w_q, w_scale, b, config=config)
    qr, kr, vr = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q2 = rope_store_kv_fp8(positions, qr.reshape(m, heads, d), kr.reshape(m, kv_heads, d), vr.reshape(m, kv_heads, d),
                           cs, caches[2], caches[3], slots, *scales)
    assert torch.equal(q, q2.reshape(m, q_size)), f"q differs at {int((q != q2.reshape(m, q_size)).sum())}"
    for a, b_ in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(a.float(), b_.float()), f"cache differs at {int((a.float() != b_.float()).sum())}"
    q3 = rope_store_kv_fp8_ref(positions, qr.reshape(m, heads, d), kr.reshape(m, kv_heads, d),
                               vr.reshape(m, kv_heads, d), cs, caches[2].clone(), caches[3].clone(), slots, *scales)
    torch.testing.assert_close(q.float(), q3.reshape(m, q_size).float(), rtol=1e-2, atol=1e-2)


def check_rope_kv_scaled(dtype: str, t: int, heads: int, kv_heads: int, d: int, bias: bool, device: str = "cpu",
                         splits: int = 0, lora: str | None = None) -> None:
    """rope_store_kv_fp8_scaled (the tw scaling folded into RoPE + K/V write) == the scaling as
    _rescale_rows_cols_kernel does it, then rope_store_kv_fp8: q and both caches bit for bit. splits > 0: acc is
    [splits, t, n] split-K partials (no x scale), summed in split order as fp8_gemv's _splitk_sum_kernel does."""
    from loraserve.kernels.fp8_rope_kv import rope_store_kv_fp8, rope_store_kv_fp8_scaled
    from loraserve.kernels.rope import rope_cos_sin_cache

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(t * 10 + heads + d)
    n = (heads + 2 * kv_heads) * d
    acc = (torch.randn(t, n, generator=g) * 300).to(device)
    xs = (torch.rand(t, 1, generator=g) * 0.01 + 1e-3).to(device)
    ws = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(device)
    b = torch.randn(n, generator=g).to(device, dt) if bias else None
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cs = rope_cos_sin_cache(inv_freq.float().to(device), 64)
    positions = torch.randint(0, 64, (t,), generator=g).to(device)
    blocks = t // 4 + 3   # 4-slot blocks, scattered distinct slots (some untouched)
    slots = torch.randperm(blocks * 4, generator=g)[:t].to(device)
    scales = torch.tensor([0.05], device=device), torch.tensor([0.02], device=device)
    caches = [torch.zeros(blocks, 4, kv_heads, d, device=device).to(torch.float8_e4m3fn) for _ in range(4)]
    delta, dora, factor = lora_delta_case(t, n, dt, device, lora, g) if lora is not None else (None, None, None)
    if splits:
        parts = (torch.randn(splits, t, n, generator=g) * 100).to(device)
        q = rope_store_kv_fp8_scaled(positions, parts, None, ws, b, cs, caches[0], caches[1], slots, *scales, heads, dt,
                                     delta=delta, dora=dora)
        y = torch.zeros(t, n, device=device)
        for part in parts:   # split order, as _splitk_sum_kernel
            y += part
        y = y * ws + (b.float() if bias else 0)
    else:
        q = rope_store_kv_fp8_scaled(positions, acc, xs, ws, b, cs, caches[0], caches[1], slots, *scales, heads, dt,
                                     delta=delta, dora=dora)
        y = acc * xs * ws + (b.float() if bias else 0)
    if delta is not None:
        y = (y + delta.float()) * factor
    qkv = y.to(dt)
    qr, kr, vr = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q2 = rope_store_kv_fp8(positions, qr.reshape(t, heads, d), kr.reshape(t, kv_heads, d), vr.reshape(t, kv_heads, d),
                           cs, caches[2], caches[3], slots, *scales)
    if delta is not None and device != "cpu":   # (an FMA contraction on the device: one rounding apart at most)
        torch.testing.assert_close(q.float(), q2.float(), rtol=1e-2, atol=1e-2)
        for a, b_ in ((caches[0], caches[2]), (caches[1], caches[3])):   # e4m3 codes: one code step apart at most
            torch.testing.assert_close(a.float(), b_.float(), rtol=0.15, atol=0.02)
        return
    assert torch.equal(q, q2), f"q differs at {int((q != q2).sum())}"
    for a, b_ in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(a.float(), b_.float()), f"cache differs at {int((a.float() != b_.float()).sum())}"


def check_head_rescore(dtype: str, m: int, v: int, h: int, k: int, chunk: int, device: str = "cpu") -> None:
    """kernels/fp8_head_rescore.py vs the torch form (Fp8Head._candidates's chunk argmaxes of the k best chunks, the
    exact rows' dot products scattered in): the same candidates, the sum's logits bit for bit elsewhere."""
    from loraserve.kernels.fp8_head_rescore import fp8_head_rescored

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(m * 7 + v + h)
    ws = torch.randn(2, m, v, generator=g)
    s = torch.rand(v, generator=g) + 0.5
    # k + 4 distinct peaks per row (8, 9, ... times the scale's inverse: exact in bf16) in distinct chunks: the k best
    # chunks and their argmaxes are unambiguous (bf16 logits elsewhere may tie; that is not what this checks)
    for r in range(m):
        chunks = torch.randperm(v // chunk, generator=g)[:k + 4]
        ids = chunks * chunk + torch.randint(0, chunk, (k + 4,), generator=g)
        ws[0, r, ids] = (8.0 + torch.arange(k + 4, dtype=torch.float32)) / s[ids]
        ws[1, r, ids] = 0.0
    ws, s = ws.to(device), s.to(device)
    x = torch.randn(m, h, generator=g).to(device, dt)
    exact = torch.randn(v, h, generator=g).to(device, dt)
    y = fp8_head_rescored(ws, s, x, exact, k, chunk)
    ref = ((ws[0] + ws[1]) * s).to(dt)                                      # the split-K sum's rounding
    best, where = ref.float().view(m, v // chunk, chunk).max(dim=-1)
    top = best.topk(k, dim=-1).indices
    idx = top * chunk + where.gather(1, top)                                 # [m, k] candidates
    dots = torch.einsum("mkh,mh->mk", exact[idx].float(), x.float())
    mask = torch.zeros(m, v, dtype=torch.bool, device=device)
    mask.scatter_(1, idx, True)
    assert torch.equal(y[~mask], ref[~mask]), "logits outside the candidates changed"
    got = y.gather(1, idx).float()
    torch.testing.assert_close(got, dots.to(dt).float(), rtol=1e-2 if dt != torch.float32 else 1e-5, atol=1e-2)
    changed = (y != ref).sum(dim=1)
    assert bool((changed <= k).all()), "more than k logits per row rescored"


def check_head_self_check(device: str = "cpu") -> None:
    """Fp8Head._check_fused (the first eager call's comparison with the torch form) keeps a correct fused result and
    replaces a wrong one (a logit outside the candidates changed) by the torch form, switching the fused path off."""
    from loraserve.inference.models.fp8 import _BROKEN, quantize_per_channel
    from loraserve.inference.models.fp8_head import Fp8Head
    from loraserve.kernels.fp8_head_rescore import fp8_head_rescored

    g = torch.Generator().manual_seed(5)
    v, h, k = 2048, 64, 2
    w = torch.randn(v, h, generator=g).to(device, torch.float16)
    w_q, s = quantize_per_channel(w)
    head = Fp8Head(w_q, s, exact=w, rescore=k)
    x = torch.randn(1, h, generator=g).to(device, torch.float16)
    ws = torch.randn(2, 1, v, generator=g).to(device) * 0.01
    y = fp8_head_rescored(ws, s, x, w, k, 128)
    assert head._check_fused(y.clone(), ws, x).equal(y) and "head_rescore" not in _BROKEN
    bad = y.clone()
    bad[0, int(bad[0].argmin())] += 1.0   # a logit no candidate holds
    head.__dict__.pop("_fused_checked")
    out = head._check_fused(bad, ws, x)
    assert "head_rescore" in _BROKEN and not out.equal(bad)
    _BROKEN.discard("head_rescore")
