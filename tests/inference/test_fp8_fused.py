"""The FP8 model's fused decode paths (models/fp8_fused.py): module swap on load, and on the GPU the fused launches
(gate_up GEMV + SiLU-and-mul, norm / activation + per-token quantization) equal the unfused ones bit for bit at
Llama-3-8B widths and stay within tolerance of the dequantized torch reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraserve.inference.models import fp8, fp8_fused
from loraserve.inference.models.llama import MLP, DecoderLayer, ModelArgs, RMSNorm


def _args(hidden: int, inter: int) -> ModelArgs:
    return ModelArgs(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                     num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512, head_dim=128,
                     rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None, max_position_embeddings=128,
                     tie_word_embeddings=False, attention_bias=False, model_type="llama", torch_dtype="bfloat16",
                     eos_token_id=[0], bos_token_id=None)


def _fp8_layer(hidden: int, inter: int, device: str) -> DecoderLayer:
    torch.manual_seed(0)
    layer = DecoderLayer(_args(hidden, inter), 0).to(device, torch.bfloat16)
    for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        torch.nn.init.normal_(lin.weight, std=hidden ** -0.5)
    weights = {n: m.weight.detach().clone() for n, m in layer.named_modules() if hasattr(m, "proj_name")}
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    mods = fp8.convert_projections(layer, torch.bfloat16, torch.device(device))
    for name, mod in mods.items():
        fp8.load_into_fp8(mod, "weight", 0, mod.out_features, weights[name], name)
    return layer


def test_convert_swaps_the_mlp_and_the_norms_before_fp8_projections() -> None:
    layer = _fp8_layer(512, 1024, "cpu")
    assert type(layer.mlp) is fp8_fused.Fp8MLP and type(layer.input_layernorm) is fp8_fused.Fp8RMSNorm
    assert type(layer.post_attention_layernorm) is fp8_fused.Fp8RMSNorm
    assert layer.input_layernorm.__dict__["_fp8_consumer"] is layer.self_attn.qkv_proj
    # the consumer is no submodule: the state dict is the unfused layer's
    assert not any("_fp8_consumer" in k for k in layer.state_dict())
    # CPU: the unfused math (llama.MLP / RMSNorm on the dequantized weights)
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    out = layer.mlp(layer.post_attention_layernorm(x))
    gu = layer.mlp.gate_up_proj
    h = RMSNorm.forward(layer.post_attention_layernorm, x)
    ref = layer.mlp.down_proj(F.silu(gu(h)[:, :1024]) * gu(h)[:, 1024:])
    assert torch.equal(out, ref) and type(layer.mlp).__mro__[1] is MLP


def _gpu() -> bool:
    from loraserve.kernels import triton_available

    return torch.cuda.is_available() and triton_available() and torch.cuda.get_device_capability() >= (8, 9)


def _mlp_block(layer, x, residual):
    h, res = layer.post_attention_layernorm(x.clone(), residual.clone())
    return layer.mlp(h), res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 48, 64, 200])
def test_fused_paths_equal_the_unfused_gpu(m, monkeypatch) -> None:
    """norm -> gate_up -> SiLU-mul -> down at 8B widths: fused (default) == LORASERVE_FP8_GATE_UP_SILU=0 +
    LORASERVE_FP8_PREQUANT=0 bit for bit; and close to bf16 torch on the dequantized weights."""
    if not _gpu():
        pytest.skip("needs sm >= 89 and Triton")
    # rms_norm's layout (8 warps at 4096): the default's 16 warps at 33..64 rows sum in another order (some rows one
    # bf16 ulp off the unfused norm: test_norm_16_warps_within_two_ulps_gpu); here the fused structure bit for bit
    monkeypatch.setenv("LORASERVE_FP8_NORM_WARPS_BATCH", "0")
    layer = _fp8_layer(4096, 14336, "cuda")
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    residual = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    fused, res_f = _mlp_block(layer, x, residual)
    monkeypatch.setenv("LORASERVE_FP8_GATE_UP_SILU", "0")
    monkeypatch.setenv("LORASERVE_FP8_PREQUANT", "0")
    plain, res_p = _mlp_block(layer, x, residual)
    assert torch.equal(res_f, res_p)
    # Bit for bit: the norm + quantize kernel reduces in rms_norm's layout since its codes are read back (before, its
    # e4m3 store laid the row out 16 values a thread and some rows rounded one bf16 ulp off: H200 seed 48, 2026-11-30;
    # equal at m = 48 and 64 on the H200 2026-12-01 02:00)
    diff = float((fused.float() - plain.float()).norm() / plain.float().norm())
    print(f"fused-vs-unfused m={m}: bit for bit {torch.equal(fused, plain)}, rel diff {diff:.3g}")   # (pytest -s)
    assert torch.equal(fused, plain), f"rel diff {diff}, max {float((fused - plain).abs().max())}"
    # the reference: bf16 torch on the dequantized weights (weight-only numerics; W8A8 at m > 32 adds x's rounding)
    mlp = layer.mlp
    h = RMSNorm.forward(layer.post_attention_layernorm, (x.float() + residual.float()).to(torch.bfloat16))
    gu = F.linear(h, mlp.gate_up_proj.dequantized_weight(torch.bfloat16))
    ref = F.linear(F.silu(gu[:, :14336]) * gu[:, 14336:], mlp.down_proj.dequantized_weight(torch.bfloat16))
    rel = float((fused.float() - ref.float()).norm() / ref.float().norm())
    assert rel < (0.06 if m > 32 else 0.01), rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 2, 64])   # 2: the table's dot16 (no deferring); 64: tw (W8A8, + the codes)
def test_down_sum_deferred_to_the_next_norm_gpu(m, monkeypatch) -> None:
    """Two FP8 layers' MLP -> next input norm at 8B widths: layer 0's down epilogue (split-K sum at one token, the
    tw scales at 64) moves into layer 1's norm (one launch fewer); its normed output, residual and the codes for the
    next qkv equal the unfused path's bit for bit."""
    if not _gpu():
        pytest.skip("needs sm >= 89 and Triton")
    # rms_norm's layout (8 warps at 4096): the default's 16 warps at 33..64 rows sum in another order (some rows one
    # bf16 ulp off the unfused norm: test_norm_16_warps_within_two_ulps_gpu); here the fused structure bit for bit
    monkeypatch.setenv("LORASERVE_FP8_NORM_WARPS_BATCH", "0")
    layers = torch.nn.ModuleList([_fp8_layer(4096, 14336, "cuda"), _fp8_layer(4096, 14336, "cuda")])
    fp8_fused.convert_fused(layers)
    assert layers[0].mlp.__dict__.get("_defer_ok") and not layers[1].mlp.__dict__.get("_defer_ok")
    g = torch.Generator(device="cuda").manual_seed(m)
    h = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    residual = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)

    def run():
        y = layers[0].mlp(h.clone())
        deferred = y.dim() == 3
        out, res = layers[1].input_layernorm(y, residual.clone())
        codes = getattr(out, fp8.PREQUANT_ATTR, None)
        return out, res, deferred, codes

    out, res, deferred, codes = run()
    assert (codes is not None) == (m == 64)
    # deferred: the CUDA-core GEMV's split-K partials at one token, cuBLASLt's unit-scale result (tw) at 33..64
    assert deferred == (m != 2)
    monkeypatch.setenv("LORASERVE_FP8_DEFER_DOWN_SUM", "0")
    monkeypatch.setenv("LORASERVE_FP8_GATE_UP_SILU", "0")
    monkeypatch.setenv("LORASERVE_FP8_PREQUANT", "0")
    out2, res2, deferred2, _ = run()
    assert not deferred2 and torch.equal(res, res2) and torch.equal(out, out2)
    if codes is not None:   # == per_token_quant_fp8 of the unfused output
        from loraserve.kernels.fp8_gemm import per_token_quant_fp8

        q2, s2 = per_token_quant_fp8(out2)
        assert torch.equal(codes[0].float(), q2.float()) and torch.equal(codes[1], s2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 48])
def test_o_proj_epilogue_deferred_to_the_post_attention_norm_gpu(m, monkeypatch) -> None:
    """o_proj (4096 x 4096) -> post-attention norm: at 48 tokens (tw) the scales move into the norm, which also writes
    gate_up's codes; at one token (gemvh, no split) nothing is deferred. Equal to the unfused pair bit for bit."""
    if not _gpu():
        pytest.skip("needs sm >= 89 and Triton")
    # rms_norm's layout (8 warps at 4096): the default's 16 warps at 33..64 rows sum in another order (some rows one
    # bf16 ulp off the unfused norm: test_norm_16_warps_within_two_ulps_gpu); here the fused structure bit for bit
    monkeypatch.setenv("LORASERVE_FP8_NORM_WARPS_BATCH", "0")
    layer = _fp8_layer(4096, 14336, "cuda")
    g = torch.Generator(device="cuda").manual_seed(m)
    o = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    residual = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    y = fp8_fused.deferred_linear(layer.self_attn.o_proj, o)
    assert (y.dim() == 3) == (m == 48)
    out, res = layer.post_attention_layernorm(y, residual.clone())
    monkeypatch.setenv("LORASERVE_FP8_PREQUANT", "0")
    out2, res2 = layer.post_attention_layernorm(layer.self_attn.o_proj(o), residual.clone())
    assert torch.equal(res, res2) and torch.equal(out, out2)
    codes = getattr(out, fp8.PREQUANT_ATTR, None)
    assert (codes is not None) == (m == 48)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [48, 64])
def test_gate_up_silu_dot8_equals_the_unfused_gpu(m, monkeypatch) -> None:
    """The MLP block at 33..64 tokens with SiLU-and-mul in the gate_up dot8 GEMM's epilogue and down's codes from its
    row maxima (LORASERVE_FP8_GATE_UP_SILU_DOT8=1, kernels/fp8_dot8_silu.py): bit for bit the unfused launches."""
    if not _gpu():
        pytest.skip("needs sm >= 89 and Triton")
    # rms_norm's layout (8 warps at 4096): the default's 16 warps at 33..64 rows sum in another order (some rows one
    # bf16 ulp off the unfused norm: test_norm_16_warps_within_two_ulps_gpu); here the fused structure bit for bit
    monkeypatch.setenv("LORASERVE_FP8_NORM_WARPS_BATCH", "0")
    layer = _fp8_layer(4096, 14336, "cuda")
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    residual = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    monkeypatch.setenv("LORASERVE_FP8_GATE_UP_SILU_DOT8", "1")
    h, _ = layer.post_attention_layernorm(x.clone(), residual.clone())
    act = layer.mlp._gate_up_silu(h)
    assert act is not None and getattr(act, fp8.PREQUANT_ATTR, None) is not None, "the dot8 SiLU path did not run"
    fused, res_f = _mlp_block(layer, x, residual)
    assert "gemv_silu_dot8" not in fp8._BROKEN
    monkeypatch.setenv("LORASERVE_FP8_GATE_UP_SILU", "0")
    monkeypatch.setenv("LORASERVE_FP8_PREQUANT", "0")
    plain, res_p = _mlp_block(layer, x, residual)
    assert torch.equal(res_f, res_p) and torch.equal(fused, plain), float((fused.float() - plain.float()).abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [48, 64])
def test_norm_16_warps_within_two_ulps_gpu(m, monkeypatch) -> None:
    """The norms' default at 33..64 rows (16 warps a row, kernels/fp8_norm_quant.py norm_warps: faster at bs64) sum
    the row's squares in another order than rms_norm's 8-warp layout, so an output may round a bf16 ulp or two away (the
    stated tolerance: <= 2 ulps of the larger value: the fp32 1/rms one ulp off passes through two bf16 roundings,
    normed then weight * normed; H200 probe 2: 2 ulps at 48 rows; the residual bit for bit); its codes stay
    per_token_quant_fp8 of its own output bit for bit."""
    if not _gpu():
        pytest.skip("needs sm >= 89 and Triton")
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8

    layer = _fp8_layer(4096, 14336, "cuda")
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    residual = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    out16, res16 = layer.post_attention_layernorm(x.clone(), residual.clone())
    monkeypatch.setenv("LORASERVE_FP8_NORM_WARPS_BATCH", "0")
    out8, res8 = layer.post_attention_layernorm(x.clone(), residual.clone())
    assert torch.equal(res16, res8)
    a, b = out16.float(), out8.float()
    ulp = torch.ldexp(torch.ones_like(a), torch.frexp(torch.maximum(a.abs(), b.abs()))[1] - 8)   # bf16: 8 bits
    assert bool(((a - b).abs() <= 2 * ulp).all()), float(((a - b).abs() / ulp).max())
    codes = getattr(out16, fp8.PREQUANT_ATTR)
    q, s = per_token_quant_fp8(out16)
    assert torch.equal(codes[0].float(), q.float()) and torch.equal(codes[1], s)


def _lora_batch(layers: int, m: int, dora: bool):
    """A LoRABatch over 8 rank-16 slots on the four projections of `layers` 8B layers (rows round-robin over the slots,
    the last rows without an adapter); dora: slots 1 and 3 carry DoRA's g (per-slot flags), the others g = 1."""
    import types

    from loraserve.inference.lora.batch import LoRABatch
    from loraserve.kernels import LoRAMetaBuilder

    L, R, g = 8, 16, torch.Generator(device="cuda").manual_seed(7)
    shapes = {"qkv_proj": (4096, [4096, 1024, 1024]), "o_proj": (4096, [4096]), "gate_up_proj": (4096, [14336, 14336]),
              "down_proj": (14336, [4096])}
    ns = types.SimpleNamespace(a={}, b={}, scale={}, shift={}, slice_offsets={}, dora_slot={},
                               ranks=torch.full((L,), R, dtype=torch.int32, device="cuda"))
    for proj, (k, widths) in shapes.items():
        n = sum(widths)
        ns.a[proj] = (torch.randn(layers, L, len(widths), R, k, device="cuda", generator=g) * k ** -0.5).bfloat16()
        ns.b[proj] = (torch.randn(layers, L, n, R, device="cuda", generator=g) * 0.25).bfloat16()
        ns.slice_offsets[proj] = torch.tensor([0] + torch.tensor(widths).cumsum(0).tolist(), dtype=torch.int32,
                                              device="cuda")
        ns.scale[proj] = torch.ones(layers, L, n, device="cuda")
        ns.dora_slot[proj] = torch.zeros(layers, L, dtype=torch.int32, device="cuda")
        if dora:
            for slot in (1, 3):
                ns.scale[proj][:, slot] = 0.8 + 0.4 * torch.rand(layers, n, device="cuda", generator=g)
                ns.dora_slot[proj][:, slot] = 1
    tok = torch.tensor([i % L if i < m - 3 else -1 for i in range(m)], dtype=torch.int32, device="cuda")
    return LoRABatch(ns, LoRAMetaBuilder(m, L, "cuda").build(tok))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,dora,side", [(48, False, "side"), (64, True, "full"), (64, False, "main")])
def test_lora_delta_with_deferred_epilogues_gpu(m, dora, side, monkeypatch) -> None:
    """LORASERVE_FP8_LORA_DEFER: with LoRA rows, o's and down's tw scaling stay in the next norm and the LoRA delta
    (DoRA's g on its slots) joins there (LoRABatch.around_delta); gate_up's delta joins its dot8 SiLU epilogue. Against
    the path that scales first and adds the delta into the GEMM output, then the unfused launches: the same values up
    to where bf16 rounds (the old path rounds y before the delta joins)."""
    if not _gpu():
        pytest.skip("needs sm >= 89 and Triton")
    from loraserve.inference.context import Context, reset_context, set_context

    layers = torch.nn.ModuleList([_fp8_layer(4096, 14336, "cuda"), _fp8_layer(4096, 14336, "cuda")])
    for i, layer in enumerate(layers):   # (the LoRA weights are looked up by layer index)
        for mod in layer.modules():
            if isinstance(mod, fp8.Fp8Proj):
                mod.layer_idx = i
    fp8_fused.convert_fused(layers)
    g = torch.Generator(device="cuda").manual_seed(m)
    o = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    h = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    residual = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    lb = _lora_batch(2, m, dora)
    set_context(Context(lora=lb))
    try:
        def run():
            y = fp8_fused.o_proj_out(layers[0].self_attn, o.clone())
            o_deferred = y.dim() == 3
            out_o, res_o = layers[0].post_attention_layernorm(y, residual.clone())
            y = layers[0].mlp(h.clone())
            down_deferred = y.dim() == 3
            out_d, res_d = layers[1].input_layernorm(y, residual.clone())
            torch.cuda.synchronize()
            return (out_o, res_o, out_d, res_d), (o_deferred, down_deferred)

        monkeypatch.setenv("LORASERVE_FP8_LORA_DEFER", "1")
        monkeypatch.setenv("LORASERVE_FP8_LORA_DEFER_SHRINK", side)   # where the shrink (and expand) run
        new, deferred = run()
        assert deferred == (True, True) and "lora_defer" not in fp8._BROKEN
        hn = layers[0].post_attention_layernorm(h.clone(), residual.clone())[0]
        assert layers[0].mlp._gate_up_silu(hn) is not None, "gate_up's dot8 SiLU epilogue with the delta did not run"
        monkeypatch.setenv("LORASERVE_FP8_LORA_DEFER", "0")
        old, deferred = run()
        assert deferred == (False, False)
    finally:
        reset_context()
    set_context(Context())
    try:
        base = layers[0].post_attention_layernorm(layers[0].self_attn.o_proj(o.clone()), residual.clone())[1]
    finally:
        reset_context()
    assert (old[1] - base).float().norm() > 0.05 * base.float().norm(), "the adapters must change the output"
    # against an fp32 reference of the o block (o's e4m3 codes and scales as the GEMM takes them, the dequantized
    # weight, the exact LoRA delta and DoRA's g): the deferred path is as close as the old one (both: bf16 roundings)
    ref = residual.double() + _dora_ref(_w8a8_ref(o, layers[0].self_attn.o_proj), _lora_delta_ref(lb, 0, "o_proj", o),
                                        lb, 0, "o_proj")
    err_new = float((new[1].double() - ref).norm() / ref.norm())
    err_old = float((old[1].double() - ref).norm() / ref.norm())
    effect = float((old[1].double() - base.double()).norm() / ref.norm())
    print(f"o block m={m} dora={dora}: err vs fp32 ref new {err_new:.3g} old {err_old:.3g}, LoRA effect {effect:.3g}")
    assert err_new < 4e-3 and err_old < 4e-3 and err_new <= 1.5 * err_old + 1e-4, (err_new, err_old)
    # o -> norm: one bf16 rounding apart; gate_up -> down -> norm: those roundings also move some of h's e4m3 codes
    # (down's per-token W8A8 input) by one step (~6%): a larger bound there
    for a, b, bound in zip(new, old, (4e-3, 4e-3, 2e-2, 2e-2)):
        rel = float((a.float() - b.float()).norm() / b.float().norm())
        assert rel < bound, rel


def _w8a8_ref(x: torch.Tensor, proj) -> torch.Tensor:
    """fp32 x @ W^T as the W8A8 GEMMs compute it: x's per-token e4m3 codes and scales, the dequantized weight."""
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8

    xq, xs = per_token_quant_fp8(x.contiguous())
    return (xq.double() * xs.double()) @ proj.dequantized_weight(torch.float64).t()


def _lora_delta_ref(lb, layer: int, proj: str, x: torch.Tensor) -> torch.Tensor:
    """The exact LoRA delta [T, N] (float64) of x for `proj` from the LoRABatch's slots: per row, its slot's A then B
    per slice (slot -1: none)."""
    a, b = lb.slots.a[proj][layer].double(), lb.slots.b[proj][layer].double()   # [L, S, R, in], [L, N, R]
    offs = lb.slots.slice_offsets[proj].tolist()
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64, device=x.device)
    for t, slot in enumerate(lb.meta.token_slot[: x.shape[0]].tolist()):
        if slot < 0:
            continue
        for i in range(len(offs) - 1):
            out[t, offs[i]:offs[i + 1]] = (x[t].double() @ a[slot, i].t()) @ b[slot, offs[i]:offs[i + 1]].t()
    return out


def _dora_ref(y: torch.Tensor, delta: torch.Tensor, lb, layer: int, proj: str) -> torch.Tensor:
    """(y + delta) * g[slot] on the rows whose slot carries DoRA (the expand's epilogue, no bias), y + delta elsewhere."""
    out = y + delta
    g, on = lb.slots.scale[proj][layer].double(), lb.slots.dora_slot[proj][layer]
    for t, slot in enumerate(lb.meta.token_slot[: y.shape[0]].tolist()):
        if slot >= 0 and int(on[slot]):
            out[t] = out[t] * g[slot]
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,dora", [(48, False), (64, True)])
def test_lora_delta_in_qkv_rope_gpu(m, dora, monkeypatch) -> None:
    """LORASERVE_FP8_LORA_DEFER with qkv: cuBLASLt's unit-scale result and the LoRA delta (DoRA's g) go to the RoPE +
    e4m3 K/V kernel, which applies the scales and adds the delta. Against the old path (scaled qkv + the delta added
    into it, then rope_store_kv_fp8) and an fp32 reference (W8A8 GEMM + exact delta, RoPE in float64): q as close to
    the reference as the old path's, the caches' e4m3 codes one step apart at most and on few values."""
    if not _gpu():
        pytest.skip("needs sm >= 89 and Triton")
    from loraserve.inference.context import Context, reset_context, set_context
    from loraserve.inference.models.llama import RotaryEmbedding
    from loraserve.kernels.fp8_rope_kv import rope_store_kv_fp8
    from loraserve.kernels.rope import apply_rope_ref

    layer = _fp8_layer(4096, 14336, "cuda")
    fp8.enable_fp8_kv_cache(layer, torch.device("cuda"))
    attn = layer.self_attn
    attn.kv_scales.copy_(torch.tensor([0.02, 0.01], device="cuda"))
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    positions = torch.randint(0, 100, (m,), device="cuda", generator=g)
    blocks = m // 16 + 2
    slots = torch.randperm(blocks * 16, device="cuda", generator=g)[:m]
    caches = [torch.zeros(blocks, 16, 8, 128, device="cuda").to(torch.float8_e4m3fn) for _ in range(4)]
    rotary = RotaryEmbedding(_args(4096, 14336)).cuda()
    lb = _lora_batch(1, m, dora)
    ctx = Context(slot_mapping=slots, lora=lb)
    set_context(ctx)
    try:
        monkeypatch.setenv("LORASERVE_FP8_LORA_DEFER", "1")
        attn.k_cache, attn.v_cache = caches[0], caches[1]
        q_new = fp8_fused.qkv_rope_kv_fused(attn, x, positions, rotary, ctx)
        assert q_new is not None and "lora_defer" not in fp8._BROKEN
        monkeypatch.setenv("LORASERVE_FP8_LORA_DEFER", "0")
        assert fp8_fused.qkv_rope_kv_fused(attn, x, positions, rotary, ctx) is None   # (the old path: not fused)
        qkv = attn.qkv_proj(x)
        q, k, v = qkv.split([4096, 1024, 1024], dim=-1)
        q_old = rope_store_kv_fp8(positions, q.reshape(m, 32, 128), k.reshape(m, 8, 128), v.reshape(m, 8, 128),
                                  rotary.cos_sin_cache(), caches[2], caches[3], slots, attn.kv_scales[0:1],
                                  attn.kv_scales[1:2])
        torch.cuda.synchronize()
    finally:
        reset_context()
    y = _dora_ref(_w8a8_ref(x, attn.qkv_proj), _lora_delta_ref(lb, 0, "qkv_proj", x), lb, 0, "qkv_proj")
    qr, kr = apply_rope_ref(positions, y[:, :4096].reshape(m, 32, 128), y[:, 4096:5120].reshape(m, 8, 128),
                            rotary.cos_sin_cache().double())
    base = apply_rope_ref(positions, _w8a8_ref(x, attn.qkv_proj)[:, :4096].reshape(m, 32, 128),
                          kr, rotary.cos_sin_cache().double())[0]
    err_new = float((q_new.double() - qr).norm() / qr.norm())
    err_old = float((q_old.double() - qr).norm() / qr.norm())
    effect = float((base - qr).norm() / qr.norm())
    print(f"qkv m={m} dora={dora}: q err vs fp32 ref new {err_new:.3g} old {err_old:.3g}, LoRA effect {effect:.3g}")
    assert effect > 0.05 and err_new < 4e-3 and err_new <= 1.5 * err_old + 1e-4, (err_new, err_old, effect)
    # the caches against the reference's own e4m3 codes (k after RoPE and v, each rounded to bf16 as the kernels do,
    # then / scale): both paths round bf16-level differences (delta added before or after the bf16 rounding, RoPE in
    # fp32), so codes on a rounding edge move by one step in either; the fused path must be off the reference on no
    # more codes than the old one (a wrong or missing delta would move most codes: the LoRA effect is > 5%)
    vr = y[:, 5120:6144].reshape(m, 8, 128)
    for i, (ref, scale) in enumerate(((kr, 0.02), (vr, 0.01))):
        want = (ref.to(torch.bfloat16).double() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
        got_new = caches[i].view(-1, 8, 128)[slots].float()
        got_old = caches[i + 2].view(-1, 8, 128)[slots].float()
        off_new = float((got_new != want).float().mean())
        off_old = float((got_old != want).float().mean())
        print(f"  {'kv'[i]} cache codes off the reference: fused {off_new:.4f} old {off_old:.4f}")
        assert off_new <= 1.5 * off_old + 0.01 and off_new < 0.15, (i, off_new, off_old)
        # and the codes' error against the reference as a whole, and at its worst: no larger than the old path's (RoPE
        # rotates k1 cos - k2 sin, so bf16-level errors before it move small results of that cancellation by many of
        # their own e4m3 steps in either path: H200, the worst k code 21.5 / 25 small steps off, old / fused)
        err_new = float((got_new - want).norm() / want.norm())
        err_old = float((got_old - want).norm() / want.norm())
        worst_new = float((got_new - want).abs().max())
        worst_old = float((got_old - want).abs().max())
        print(f"  {'kv'[i]} codes' error vs the reference: fused {err_new:.4g} old {err_old:.4g}, worst {worst_new} / "
              f"{worst_old}")
        assert err_new <= 1.2 * err_old + 1e-4 and err_new < 0.03, (i, err_new, err_old)
        assert worst_new <= 1.5 * worst_old + 1.0, (i, worst_new, worst_old)
