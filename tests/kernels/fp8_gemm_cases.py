"""FP8 GEMM kernels (kernels/fp8_gemm.py) vs their torch references, run in a TRITON_INTERPRET=1
worker on the CPU (test_fp8_gemm.py) and imported by the GPU tests with device="cuda". Each function
raises AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels.fp8_gemm import (FP8, fp8_w8a16_gemm, fp8_w8a16_gemm_ref, per_token_quant_fp8,
                                        per_token_quant_fp8_ref)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# fp32 accumulation in a different order, then one rounding to the dtype
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_weight(n: int, k: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_q [n, k] e4m3, w_scale [n] fp32) with rows of very different magnitudes (per-channel scales matter)."""
    g = _gen(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[:, None]
    scale = w.abs().amax(dim=1) / 448.0
    return (w / scale[:, None]).to(FP8).to(device), scale.to(device)


def check_w8a16(dtype: str, m: int, n: int, k: int, bias: bool, device: str = "cpu", config=None) -> None:
    """config: a forced w8a16_config tuple (BM, BN, BK, SPLIT_K, warps, stages), None: the heuristic's."""
    dt, g = DTYPES[dtype], _gen(m * 1000 + n + k)
    w_q, w_scale = make_weight(n, k, n + k, device)
    wide = torch.randn(m, k + 8, generator=g).to(device, dt)
    x = wide[:, 3:3 + k]   # a strided row view (the q/k/v split of a fused activation is one)
    b = torch.randn(n, generator=g).to(device, dt) if bias else None
    y = fp8_w8a16_gemm(x, w_q, w_scale, b, config=config)
    assert y.shape == (m, n) and y.dtype == dt
    ref = fp8_w8a16_gemm_ref(x, w_q, w_scale, b)
    # tolerance relative to each output channel's magnitude (rows of w span three decades)
    err = (y.float() - ref.float()).abs()
    bound = TOL[dt]["atol"] * w_scale[None, :] * 448 * k ** 0.5 + TOL[dt]["rtol"] * ref.float().abs()
    assert bool((err <= bound).all()), f"max err {float(err.max())} (m={m}, n={n}, k={k})"
    # and against the bf16 weight it stands for: the kernel applies the scale per output channel
    deq = (w_q.float() * w_scale[:, None])
    full = (x.float() @ deq.t() + (b.float() if bias else 0)).to(dt)
    torch.testing.assert_close(y.float(), full.float(), rtol=TOL[dt]["rtol"] * 4, atol=TOL[dt]["atol"] * 4)


def check_per_token_quant(dtype: str, m: int, k: int, device: str = "cpu") -> None:
    dt, g = DTYPES[dtype], _gen(m + k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]).to(device, dt)
    x[0] = 0   # an all-zero row keeps a finite scale and quantizes to zeros
    x_q, s = per_token_quant_fp8(x)
    q_ref, s_ref = per_token_quant_fp8_ref(x)
    assert x_q.dtype == FP8 and x_q.shape == (m, k) and s.shape == (m, 1) and s.dtype == torch.float32
    # amax / 448 in fp32: the GPU kernel's division may round one ulp away from torch's (H200: 1.2e-7 relative)
    torch.testing.assert_close(s, s_ref, rtol=2.5e-7, atol=0)
    assert bool((x_q[0].float() == 0).all())
    # e4m3 rounding of x / s: exact on the GPU (round to nearest even, as torch). Triton 3.x's CPU
    # interpreter drops the carry when rounding up crosses into the next binade (x / s = 126.9 -> 64, not
    # 128), and rounds ties away from zero (42 -> 44, not 40): on the CPU those elements may differ
    a, b = x_q.float(), q_ref.float()
    exact = a == b
    if device == "cuda":   # RNE cast, but a scale one ulp off moves near-ties: a rare one-step slip, no more
        # one e4m3 step: |v| / 8 among normals, 2^-9 among subnormals (H200, 2048 x 4096: 2 elements)
        step = (a - b).abs() <= torch.maximum(torch.maximum(a.abs(), b.abs()) / 8, torch.full_like(a, 2.0 ** -9))
        assert float(exact.float().mean()) >= 0.998, f"{float((~exact).float().mean()):.2e} of x_q off"
        exact = exact | step
    else:
        carry = (b != 0) & (torch.frexp(b.abs())[0] == 0.5) & (a == b / 2)
        assert float(exact.float().mean()) >= 0.9, "most of x_q should round exactly as torch does"
        tie = (a - b).abs() <= torch.maximum(a.abs(), b.abs()) / 8   # one e4m3 step apart
        exact = exact | carry | tie
    assert bool(exact.all()), (f"x_q differs from the reference at {int((~exact).sum())} elements: "
                               f"{a[~exact][:8].tolist()} vs {b[~exact][:8].tolist()}")
    # saturation: the row amax maps to +-448 exactly
    assert torch.allclose(a[1:].abs().amax(dim=1), torch.full((m - 1,), 448.0, device=a.device))


def check_gemv(dtype: str, m: int, n: int, k: int, bias: bool, device: str = "cpu", config=None,
               x_mag: float = 1.0) -> None:
    """kernels/fp8_gemv.py's fp8_gemv vs fp8_w8a16_gemm_ref. config: a forced GemvConfig
    (kind, BM, BN, BK, SPLIT_K, warps, stages), None: the table / heuristic's. x_mag: x's scale (large:
    outlier activations, which the fp16-operand kernel must not overflow; small: its precision floor)."""
    from loraserve.kernels.fp8_gemv import fp8_gemv

    from loraserve.kernels.fp8_gemv import _num_sms, gemv_config

    dt, g = DTYPES[dtype], _gen(m * 1000 + n + k + 7)
    w_q, w_scale = make_weight(n, k, n + 3 * k, device)
    kind, block_k = (config or gemv_config(m, n, k, _num_sms(torch.device(device))))[0:4:3]
    wide = (torch.randn(m, k + 8, generator=g) * x_mag).to(device, dt)
    if kind == "dot8b" and device == "cpu":
        # the interpreter's fp32 -> e4m3 cast drops the carry into the next binade (check_per_token_quant): x here
        # is exact under the kernel's scales (each block: e4m3 values times 2^j, one of them +-448 * 2^j), so the
        # CPU checks the per-(token, block) scaling; the GPU tests check the rounding on plain random x
        wide = _e4m3_blocks(m, k + 8, block_k, 5, g).to(device, dt)
    x = wide[:, 5:5 + k]   # a strided row view (odd start: x rows not 16-byte aligned)
    b = torch.randn(n, generator=g).to(device, dt) if bias else None
    y = fp8_gemv(x, w_q, w_scale, b, config=config)
    assert y.shape == (m, n) and y.dtype == dt
    if kind in ("dot8", "dot8f", "tw", "twf"):   # W8A8: against x rounded per token as the quantization kernel (tested apart) does
        x_q, x_s = per_token_quant_fp8(x.contiguous())
        x = x_q.float() * x_s   # [m, k] fp32: the reference then accumulates and rounds nothing before the end
    if kind == "dot8b":   # W8A8 quantized in-kernel: one scale per (token, BLOCK_K block)
        from loraserve.kernels.fp8_gemv import w8a8_block_ref

        ref = w8a8_block_ref(x.float(), w_q, w_scale, b, block_k)
    else:
        ref = fp8_w8a16_gemm_ref(x, w_q, w_scale, b)
    err = (y.float() - ref.float()).abs()
    # dot16 rounds x to fp16 (exact from bf16/fp16, the GPU's inputs; an fp32 x, interpreter only, keeps 11 bits)
    # gemvh rounds x * 2^-8 and each product to fp16 (partials of <= 4 products in fp16, then fp32)
    tol = TOL[torch.float16] if kind in ("dot16", "gemvh2", "gemvh4") and dt == torch.float32 else TOL[dt]
    bound = (tol["atol"] * x_mag * w_scale[None, :] * 448 * k ** 0.5 + tol["rtol"] * ref.float().abs())
    assert bool((err <= bound).all()), f"max err {float(err.max())} (m={m}, n={n}, k={k}, config={config})"


def _e4m3_blocks(m: int, width: int, block_k: int, start: int, g: torch.Generator) -> torch.Tensor:
    """[m, width] fp32 whose columns start + j * block_k ... (a block of the kernel's K) hold e4m3 values of magnitude
    2^-4..447 (or 0) times 2^e (e in -8..0, per row and block) with one element of each block at +-448 * 2^e: every
    block's scale is 2^(e + 1) and x / scale (halved e4m3 normals) is exact in e4m3."""
    x = (torch.randn(m, width, generator=g) * 8).clamp(-447, 447)
    x = torch.where(x.abs() < 2 ** -4, torch.zeros_like(x), x).to(FP8).float()
    for b0 in range(start, width, block_k):
        b1 = min(b0 + block_k, width)
        e = torch.randint(-8, 1, (m, 1), generator=g).float()
        x[:, b0:b1] *= torch.exp2(e)
        x[:, b0] = 448.0 * torch.exp2(e[:, 0]) * torch.sign(torch.randn(m, generator=g))
    x[:, :start] = 0.0
    return x


def check_gemv_fixup(dtype: str, m: int, n: int, k: int, config) -> None:
    """check_gemv with the split-K partials summed in-kernel by each tile's last program
    (LORASERVE_FP8_SPLITK_FIXUP=1), twice (the arrival counters must be back at zero for the next launch)."""
    import os

    from loraserve.kernels import fp8_gemv as fg

    old = os.environ.get("LORASERVE_FP8_SPLITK_FIXUP")
    os.environ["LORASERVE_FP8_SPLITK_FIXUP"] = "1"
    try:
        for _ in range(2):
            check_gemv(dtype, m, n, k, bias=True, config=config)
            assert int(fg._tile_counters(torch.device("cpu")).abs().sum()) == 0
    finally:
        if old is None:
            os.environ.pop("LORASERVE_FP8_SPLITK_FIXUP")
        else:
            os.environ["LORASERVE_FP8_SPLITK_FIXUP"] = old


def check_gemv_silu(dtype: str, m: int, n: int, k: int, device: str = "cpu", config=None) -> None:
    """fp8_gemv(..., silu=True) on a fused gate_up [n = 2I, k] against the torch reference (fp32 GEMV, one rounding,
    HF's SiLU-and-mul), and bit for bit against the unfused pair (the same GEMV config, then silu_and_mul)."""
    from loraserve.kernels.activation import silu_and_mul
    from loraserve.kernels.fp8_gemv import fp8_gemv
    from loraserve.kernels.fp8_gemv_silu import gemv_silu_ref

    dt, g = DTYPES[dtype], _gen(m * 1000 + n + k + 11)
    w_q, w_scale = make_weight(n, k, n + 5 * k, device)
    x = (torch.randn(m, k + 8, generator=g) * 2).to(device, dt)[:, 3:3 + k]   # a strided row view
    y = fp8_gemv(x, w_q, w_scale, config=config, silu=True)
    assert y.shape == (m, n // 2) and y.dtype == dt
    ref = gemv_silu_ref(x, w_q, w_scale)
    tol = TOL[torch.float16] if config and config[0].startswith("gemvh") and dt == torch.float32 else TOL[dt]
    # GEMV outputs are ~w_scale * 448 * sqrt(k) * |x|; SiLU-mul of two of them: error relative to their product
    gu = fp8_w8a16_gemm_ref(x, w_q, w_scale, None).float()
    scale = (gu[:, : n // 2].abs() + 1) * (gu[:, n // 2:].abs() + 1)
    err = (y.float() - ref.float()).abs()
    assert bool((err <= 4 * tol["rtol"] * scale + tol["atol"]).all()), f"max err {float(err.max())} ({config})"
    unfused = silu_and_mul(fp8_gemv(x, w_q, w_scale, config=config))
    assert torch.equal(y, unfused), f"fused != unfused at {int((y != unfused).sum())} of {y.numel()} ({config})"


def check_gemv_defer_sum(dtype: str, m: int, n: int, k: int, config, device: str = "cpu") -> None:
    """fp8_gemv(defer_sum=True): a split-K CUDA-core config returns (its fp32 partials [SPLIT, m, n], None), whose
    in-order sum times w_scale rounds to fp8_gemv's own output bit for bit; without split-K, (the output, None)."""
    from loraserve.kernels.fp8_gemv import fp8_gemv

    dt, g = DTYPES[dtype], _gen(m * 1000 + n + k + 13)
    w_q, w_scale = make_weight(n, k, n + 7 * k, device)
    x = torch.randn(m, k, generator=g).to(device, dt)
    y = fp8_gemv(x, w_q, w_scale, config=config)
    ws, x_scale = fp8_gemv(x, w_q, w_scale, config=config, defer_sum=True)
    assert x_scale is None
    if config[4] == 1:
        assert torch.equal(ws, y)
        return
    assert ws.dim() == 3 and ws.shape[0] >= 2 and ws.shape[1:] == (m, n) and ws.dtype == torch.float32
    acc = ws[0].clone()
    for split in range(1, ws.shape[0]):
        acc += ws[split]
    assert torch.equal((acc * w_scale).to(dt), y)
