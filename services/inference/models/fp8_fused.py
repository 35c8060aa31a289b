"""The FP8 model's fused decode paths: fewer launches per decoder layer around the FP8 GEMMs.

models/fp8.py's convert_projections swaps these in by class (same state, only forward differs):

* `Fp8MLP` (llama.MLP whose gate_up is an Fp8Proj):
  - where the gate_up GEMV runs a grouped kind (on the Llama-3-8B table: one token, gemvh2 / gemv2), that GEMV applies
    SiLU-and-mul in its epilogue (kernels/fp8_gemv_silu.py): the activation launch goes (LORASERVE_FP8_GATE_UP_SILU);
  - where the down projection quantizes its input per token (W8A8: dot8 / tw at 33..64 tokens, _scaled_mm above),
    the activation kernel writes the e4m3 codes too (kernels/fp8_norm_quant.py silu_mul_quant): the down GEMM's
    quantization launch goes (LORASERVE_FP8_PREQUANT).
* `Fp8RMSNorm` (the input / post-attention norms before qkv / gate_up): where that projection quantizes its input per
  token, the norm kernel writes the e4m3 codes too (rms_norm_quant) (LORASERVE_FP8_PREQUANT).
The codes ride on the activation tensor as an attribute (models/fp8.py PREQUANT_ATTR) that fp8_linear reads; any
other tensor (a copy, a slice, the next layer's) has none and is quantized as before. All of it equals the unfused
launches bit for bit (same tiles, same roundings). With LoRA rows in the step only the codes are made by the producers
(the deltas join the GEMM outputs, so no epilogue may move), unless LORASERVE_FP8_LORA_DEFER (lora_defer_on) keeps the
epilogues where they are and hands each delta to them; nothing runs under tensor parallelism or off CUDA.
"""
from __future__ import annotations

import logging
import os

import torch

from ..context import get_context
from .fp8 import _BROKEN, PREQUANT_ATTR, Fp8Proj, _fused_quant_on, _triton_cuda, activations_quantized, gemm_path
from .llama import MLP, DecoderLayer, RMSNorm

log = logging.getLogger(__name__)


def gate_up_silu_on() -> bool:
    """LORASERVE_FP8_GATE_UP_SILU=0: the gate_up GEMV and silu_and_mul as two launches (the previous path)."""
    return os.environ.get("LORASERVE_FP8_GATE_UP_SILU", "1").strip() != "0"


def prequant_on() -> bool:
    """LORASERVE_FP8_PREQUANT=0: the W8A8 GEMMs quantize their inputs in launches of their own (the previous path)."""
    return os.environ.get("LORASERVE_FP8_PREQUANT", "1").strip() != "0"


def defer_down_sum_on() -> bool:
    """LORASERVE_FP8_DEFER_DOWN_SUM=0: the down GEMV's split-K sum in a launch of its own, not in the next norm."""
    return os.environ.get("LORASERVE_FP8_DEFER_DOWN_SUM", "1").strip() != "0"


# the attribute on a down GEMV's deferred output (Fp8MLP._down): (w_scale [N], x_scale [M, 1] or None) for
# splitk_add_rms_norm: split-K partials [SPLIT, M, N], or [1, M, N] from the unit-scale tensor-wise FP8 GEMM
PARTIALS_ATTR = "_fp8_splitk_partials_scale"


def defer_o_on() -> bool:
    """LORASERVE_FP8_DEFER_O=0: o_proj's tw epilogue (scales) in a launch of its own, not in the post-attention norm."""
    return os.environ.get("LORASERVE_FP8_DEFER_O", "1").strip() != "0"


def lora_defer_on(what: str) -> bool:
    """LORASERVE_FP8_LORA_DEFER: with LoRA rows in the step (33..64 tokens), the fused epilogues stay (`what`: 'o',
    'down', 'qkv', 'gate_up'): the projection's LoRA delta goes to a buffer of its own (LoRABatch.around_delta: zeroed
    and the shrink run on the side stream beside the FP8 GEMM, the expand after it) that the epilogue's consumer adds
    before its rounding (the norm after o / down, the RoPE + K/V kernel after qkv), DoRA's g applied there; gate_up's
    delta is made before its dot8 GEMM, whose SiLU epilogue adds it. '1' / 'all' (default since the fourteenth
    session): all four; else a comma list; '0': off (the GEMM's own epilogue, then the LoRA kernels add into its
    output, then the unfused launches). LORASERVE_FP8_LORA_DEFER_SHRINK=full (default): the whole delta beside the GEMM
    (o / down / qkv: d is no GEMM output; the stream joins before the consumer); =side: the shrink beside it, the expand
    after it; =main: the shrink after the GEMM on the main stream (only the zeroing beside it).
    H200 (bench_fp8.py, 32 layers, batch 64, 32 rank-16 adapters): lora32_vs_nolora_fp8 0.661 (eleventh-session final,
    off) -> 0.699; fp8_probe --lora 32 (same run, us a layer added by LoRA): 76.1-76.5 -> 64.7-69.0. Numerics: a
    rounding-only change of the old path (LORASERVE_FP8_LORA_OVERLAP=full: the delta rounded to bf16 before its add)
    moves the random FP8 layers' LoRA output by 0.45 / 0.53 of the adapters' effect at 1 / 2 layers (e4m3 code flips of
    the per-token activations), this path by 0.62 / 0.67; per layer it is as close to an fp32 reference as the old one
    (tests/inference/test_fp8_fused.py, 8 adapters, DoRA)."""
    v = os.environ.get("LORASERVE_FP8_LORA_DEFER", "1").strip().lower()
    if v in ("", "0", "off", "false", "no") or "lora_defer" in _BROKEN:
        return False
    return v in ("1", "all", "on", "true", "yes") or what in {p.strip() for p in v.split(",")}


def _lora_defer_ok(lora, what: str, x: torch.Tensor, proj) -> bool:
    """With LoRA rows: lora_defer_on(what), a delta the consumers can take (LoRABatch.delta_ok), and the W8A8 decode
    bucket (33..64 tokens: tw / dot8 GEMMs that leave their epilogue; below it the CUDA-core GEMVs keep theirs)."""
    return (lora_defer_on(what) and x.shape[0] > LORA_DEFER_MIN_TOKENS
            and lora.delta_ok(proj.proj_name, proj.out_features))


LORA_DEFER_MIN_TOKENS = 32


def _lora_defer_side() -> bool | str:
    v = os.environ.get("LORASERVE_FP8_LORA_DEFER_SHRINK", "full").strip().lower()
    return "full" if v == "full" else v != "main"


def _delta_torch(y: torch.Tensor, delta: torch.Tensor | None, dora) -> torch.Tensor:
    """The deferred consumers' LoRA step in torch (their fallbacks): (y + delta) * g[slot] on the adapted rows."""
    if delta is None:
        return y
    y = y + delta.float()
    if dora is not None:
        tok, g, on = dora
        slot = tok[: y.shape[0]].long()
        use = slot >= 0
        if on is not None:
            use = use & (on[slot.clamp(min=0)] != 0)
        y = torch.where(use[:, None], y * g[slot.clamp(min=0)], y)
    return y


def deferred_linear(proj, x: torch.Tensor, what: str = "") -> torch.Tensor:
    """proj(x) for an Fp8Proj whose output goes straight into an Fp8RMSNorm's residual add (the caller checked: no TP,
    the consumer is that norm): where the GEMV's last launch is an epilogue (the split-K sum of the one-token CUDA-core
    kinds, the scaling after cuBLASLt's unit-scale FP8 GEMM at 33..64 tokens), that launch is left out and the raw
    result [SPLIT or 1, M, N] fp32 returned, tagged with PARTIALS_ATTR for the norm (splitk_add_rms_norm). With LoRA
    rows only where lora_defer_on(what): the delta then rides along in the tag (LoRABatch.around_delta)."""
    lora = get_context().lora
    if (not isinstance(proj, Fp8Proj) or proj.bias is not None or proj.input_scale is not None or "defer" in _BROKEN
            or x.stride(-1) != 1 or gemm_path(x, proj.weight) != "gemv" or (lora is not None and not _lora_defer_ok(
                lora, what, x, proj))):
        return proj(x)
    from loraserve.kernels.fp8_gemv import fp8_gemv

    def gemm():   # the fp8_linear call Fp8Proj would make (weight-only below W8A8 sizes, the producer's codes)
        return fp8_gemv(x, proj.weight, proj.weight_scale, weight_only=not activations_quantized(proj.weight),
                        x_q=getattr(x, PREQUANT_ATTR, None), defer_sum=True)

    delta = dora = None
    try:
        if lora is None:
            y, x_scale = gemm()
        else:
            (y, x_scale), delta, dora = lora.around_delta(proj.layer_idx, proj.proj_name, x, gemm,
                                                          side=_lora_defer_side())
    except Exception as err:
        _fused_failed("defer" if lora is None else "lora_defer", err)
        return proj(x)
    if y.dim() == 3:   # deferred: split-K partials (x_scale None) or a unit-scale FP8 GEMM's fp32 result
        setattr(y, PARTIALS_ATTR, (proj.weight_scale, x_scale, delta, dora))
    elif delta is not None:   # the GEMM ran its own epilogue: the delta joins here (DoRA's g included)
        y.copy_(_delta_torch(y.float(), delta, dora).to(y.dtype))
    return y


def o_proj_out(attn, o: torch.Tensor) -> torch.Tensor:
    """Fp8KVAttention's o_proj(o [N, Q]): its epilogue deferred into the post-attention norm where that is an
    Fp8RMSNorm and the layer is not the model's last (`_defer_ok`, convert_fused: the last layer may select rows of
    its attention output before that norm)."""
    if attn.tp is None and attn.__dict__.get("_defer_ok") and defer_o_on():
        return deferred_linear(attn.o_proj, o, "o")
    return attn.o_proj(o)


def qkv_rope_on() -> bool:
    """LORASERVE_FP8_QKV_ROPE=0: RoPE and the e4m3 K/V write in a launch after the qkv GEMV (fp8_rope_kv), not in it."""
    return os.environ.get("LORASERVE_FP8_QKV_ROPE", "1").strip() != "0"


def qkv_rope_kv_fused(attn, x: torch.Tensor, positions: torch.Tensor, rotary, ctx) -> torch.Tensor | None:
    """Fp8KVAttention's qkv projection + RoPE + e4m3 K/V cache write in fewer launches: as one launch
    (kernels/fp8_qkv_rope.py) where the qkv GEMV runs an fp16-product grouped kind without split-K (the 8B table: one
    token); as cuBLASLt's unit-scale FP8 GEMM + one RoPE/K/V launch that applies the scales where it runs 'tw' (33..64
    tokens, _qkv_deferred_rope_kv; the dot8 kinds' split-K partials likewise). q_out ([N, Q] or [N, H, D]) or None
    (the caller runs the GEMV, then fp8_rope_kv). Not with LoRA rows (their delta joins qkv before RoPE) or under TP."""
    proj = attn.qkv_proj
    if (attn.tp is not None or not qkv_rope_on() or "qkv_rope" in _BROKEN
            or not isinstance(proj, Fp8Proj) or not _triton_cuda(x) or gemm_path(x, proj.weight) != "gemv"):
        return None
    lora = ctx.lora is not None   # with LoRA rows only the 33..64 form (the delta in RoPE's epilogue), lora_defer_on
    if lora and not _lora_defer_ok(ctx.lora, "qkv", x, proj):
        return None
    from loraserve.kernels.fp8_gemv import _num_sms, gemv_config, gemv_pdl_mode, pdl_supported
    from loraserve.kernels.fp8_qkv_rope import fp8_qkv_rope_kv, qkv_rope_config_ok

    N, K = proj.weight.shape
    cfg = gemv_config(x.shape[0], N, K, _num_sms(x.device), not activations_quantized(proj.weight))
    if proj.input_scale is None and ((cfg[0] in ("tw", "twf") and N % 16 == 0 and K % 16 == 0)
                                     or (cfg[0] in ("dot8", "dot8f", "dot8p") and cfg[4] > 1 and K >= 2 * cfg[3])):
        return _qkv_deferred_rope_kv(attn, x, positions, rotary, ctx)
    if lora or not qkv_rope_config_ok(cfg, K, attn.head_dim):
        return None
    mode = gemv_pdl_mode(cfg[0])
    try:
        return fp8_qkv_rope_kv(x if x.stride(-1) == 1 else x.contiguous(), proj.weight, proj.weight_scale, proj.bias,
                               cfg, positions, rotary.cos_sin_cache(), ctx.slot_mapping, attn.k_cache, attn.v_cache,
                               attn.kv_scales[0:1], attn.kv_scales[1:2], attn.q_size, attn.kv_size,
                               wait=mode != "0" and pdl_supported(x.device), early=mode == "early")
    except Exception as err:   # a compile error (first call, eager warm-up): the two launches from now on
        _fused_failed("qkv_rope", err)
        return None


def _qkv_deferred_rope_kv(attn, x: torch.Tensor, positions: torch.Tensor, rotary, ctx) -> torch.Tensor | None:
    """33..64 tokens: the qkv GEMM's last launch (the scaling after cuBLASLt's unit-scale FP8 GEMM, 'tw'; the split-K
    sum of the dot8 kinds) folded into the RoPE + e4m3 K/V write (kernels/fp8_rope_kv.py rope_store_kv_fp8_scaled);
    q [N, H, D] or None. H200 probe 22:27, 4 8B layers at batch 64, 167.7 us per layer with it vs 159.3 without (bit
    for bit the same) when that kernel ran one program per token; it now runs (token, head group) programs: default since the eighth pass (H200, same replay, bs64, bit for bit: 132.65 vs
    132.9 / 133.2 alone and 127.0 vs 127.7 on the new defaults in probe 1; 127.09 vs 127.1-127.6 in probe 2);
    LORASERVE_FP8_DEFER_QKV=0: the scaling launch + rope_store_kv_fp8."""
    if os.environ.get("LORASERVE_FP8_DEFER_QKV", "1").strip() == "0" or "defer_qkv" in _BROKEN:
        return None
    from loraserve.kernels.fp8_gemv import fp8_gemv
    from loraserve.kernels.fp8_rope_kv import rope_store_kv_fp8_scaled

    proj = attn.qkv_proj
    xc = x if x.stride(-1) == 1 else x.contiguous()

    def gemm():
        return fp8_gemv(xc, proj.weight, proj.weight_scale, x_q=getattr(x, PREQUANT_ATTR, None), defer_sum=True)

    delta = dora = None
    try:
        if ctx.lora is None:
            acc, x_scale = gemm()
        else:   # the delta apart (LoRABatch.around_delta), added in RoPE's epilogue
            (acc, x_scale), delta, dora = ctx.lora.around_delta(proj.layer_idx, proj.proj_name, xc, gemm,
                                                                side=_lora_defer_side())
        if acc.dim() != 3:   # (tw without bias and the dot8 kinds with split-K always defer; kept safe)
            raise RuntimeError(f"qkv GEMM did not defer its epilogue: {tuple(acc.shape)}")
        return rope_store_kv_fp8_scaled(positions, acc, x_scale, proj.weight_scale, proj.bias,
                                        rotary.cos_sin_cache(), attn.k_cache, attn.v_cache, ctx.slot_mapping,
                                        attn.kv_scales[0:1], attn.kv_scales[1:2], attn.num_heads, x.dtype,
                                        delta=delta, dora=dora)
    except Exception as err:   # a compile error (first call, eager warm-up): the unfused launches from now on
        _fused_failed("defer_qkv" if ctx.lora is None else "lora_defer", err)
        return None


def quantizes_per_token(x: torch.Tensor, proj) -> bool:
    """Whether fp8_linear(x) on `proj` quantizes x per token at run time (what per_token_quant_fp8 computes): the
    per-token W8A8 GEMV kinds (dot8 / tw) or _scaled_mm with the Triton quantization launch."""
    if not isinstance(proj, Fp8Proj) or proj.input_scale is not None or not activations_quantized(proj.weight):
        return False
    path = gemm_path(x, proj.weight)
    if path == "scaled_mm":
        return _fused_quant_on() and "quant" not in _BROKEN
    if path != "gemv":
        return False
    from loraserve.kernels.fp8_gemv import _num_sms, gemv_config

    N, K = proj.weight.shape
    kind = gemv_config(x.shape[0], N, K, _num_sms(x.device))[0]
    return kind in ("dot8", "dot8f", "dot8p") or (kind in ("tw", "twf") and N % 16 == 0 and K % 16 == 0)


def _prequant_ok(x: torch.Tensor, proj, tp) -> bool:
    return (tp is None and prequant_on() and "prequant" not in _BROKEN and x.dim() == 2 and x.shape[0] > 0
            and x.dtype in (torch.bfloat16, torch.float16) and _triton_cuda(x) and quantizes_per_token(x, proj))


def _fused_failed(path: str, err: Exception) -> None:
    _BROKEN.add(path)
    log.exception("FP8 fused %s failed (%s); the unfused launches for the rest of the run", path, err)


class Fp8RMSNorm(RMSNorm):
    """RMSNorm that also quantizes its output per token for the FP8 projection after it (`_fp8_consumer`)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        scales = getattr(x, PARTIALS_ATTR, None)
        if scales is not None:   # x: the previous layer's deferred down output (Fp8MLP._down): its epilogue here
            from loraserve.kernels.fp8_norm_quant import splitk_add_rms_norm

            w_scale, x_scale, delta, dora = scales
            proj = self.__dict__.get("_fp8_consumer")
            quant = proj is not None and _prequant_ok(residual, proj, self.tp)
            try:
                res = splitk_add_rms_norm(x, w_scale, residual, self.weight, self.eps, x_scale, quant, delta=delta,
                                          dora=dora)
            except Exception as err:   # a compile error: this step's epilogue in torch, no deferring from now on
                _fused_failed("defer" if delta is None else "lora_defer", err)
                y = _delta_torch(x.sum(0) * (x_scale if x_scale is not None else 1.0) * w_scale, delta, dora)
                return super().forward(y.to(residual.dtype), residual)
            if quant:
                setattr(res[0], PREQUANT_ATTR, (res[2], res[3]))
            return res[0], res[1]
        proj = self.__dict__.get("_fp8_consumer")
        if proj is None or not _prequant_ok(x, proj, self.tp) or x.stride(-1) != 1:
            return super().forward(x, residual)
        from loraserve.kernels.fp8_norm_quant import rms_norm_quant

        try:
            out, residual, x_q, scale = rms_norm_quant(x, residual, self.weight, self.eps)
        except Exception as err:   # a compile error (first call, eager warm-up): unfused from now on
            _fused_failed("prequant", err)
            return super().forward(x, residual)
        setattr(out, PREQUANT_ATTR, (x_q, scale))
        return out if residual is None else (out, residual)


class Fp8MLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self._gate_up_silu(x)   # [N, I] or None (not this step)
        if act is not None:
            return self._down(act)
        if self.tp is not None or not _triton_cuda(x):
            return super().forward(x)
        gate_up = self.gate_up_proj(x)   # (N, 2I), with the step's LoRA delta (if any)
        if _prequant_ok(gate_up[:, : gate_up.shape[1] // 2], self.down_proj, None) and gate_up.stride(-1) == 1:
            from loraserve.kernels.fp8_norm_quant import silu_mul_quant

            try:
                act, x_q, scale = silu_mul_quant(gate_up)
                setattr(act, PREQUANT_ATTR, (x_q, scale))
                return self._down(act)
            except Exception as err:
                _fused_failed("prequant", err)
        from loraserve.kernels.activation import silu_and_mul

        return self._down(silu_and_mul(gate_up))

    def _down(self, act: torch.Tensor) -> torch.Tensor:
        """down_proj(act); where this layer's output goes straight into the next layer's Fp8RMSNorm (`_defer_ok`, set
        by convert_fused) and the down GEMV has split-K on a CUDA-core kind, its fp32 partials [SPLIT, M, N] instead,
        tagged with PARTIALS_ATTR: the next norm sums them in its own launch (one launch fewer per layer)."""
        if not (self.__dict__.get("_defer_ok") and defer_down_sum_on()):
            return self.down_proj(act)
        return deferred_linear(self.down_proj, act, "down")

    def _gate_up_silu(self, x: torch.Tensor) -> torch.Tensor | None:
        proj = self.gate_up_proj
        if (self.tp is not None or not isinstance(proj, Fp8Proj) or proj.bias is not None or not gate_up_silu_on()
                or "gemv_silu" in _BROKEN or gemm_path(x, proj.weight) != "gemv"):
            return None
        lora = get_context().lora   # with LoRA rows only the dot8 form (the delta in its epilogue), lora_defer_on
        if lora is not None and not _lora_defer_ok(lora, "gate_up", x, proj):
            return None
        from loraserve.kernels.fp8_gemv import _num_sms, fp8_gemv, gemv_config
        from loraserve.kernels.fp8_gemv_silu import silu_config_ok

        weight_only = not activations_quantized(proj.weight)
        N, K = proj.weight.shape
        cfg = gemv_config(x.shape[0], N, K, _num_sms(x.device), weight_only)
        if not weight_only and proj.input_scale is None and gate_up_silu_dot8_on() and "gemv_silu_dot8" not in _BROKEN:
            from loraserve.kernels.fp8_dot8_silu import dot8_silu_config_ok

            if dot8_silu_config_ok(cfg):
                return self._gate_up_silu_dot8(x, cfg, lora)
        if lora is not None or not silu_config_ok(cfg, N):
            return None
        if os.environ.get("LORASERVE_FP8_GATE_UP_SPLIT1", "0").strip() == "1":   # probe: no split-K (SiLU in the GEMV)
            cfg = tuple(cfg[:4]) + (1,) + tuple(cfg[5:7])
        try:
            return fp8_gemv(x if x.stride(-1) == 1 else x.contiguous(), proj.weight, proj.weight_scale,
                            weight_only=weight_only, silu=True, config=cfg)
        except Exception as err:   # a compile error (first call, eager warm-up): the two launches from now on
            _fused_failed("gemv_silu", err)
            return None


    def _gate_up_silu_dot8(self, x: torch.Tensor, cfg: tuple, lora=None) -> torch.Tensor | None:
        """33..64 tokens (dot8 without split-K): SiLU-and-mul in the gate_up GEMM's epilogue, and where down quantizes
        its input per token, its codes from the GEMM's row maxima (kernels/fp8_dot8_silu.py): the activation's row
        kernel goes. h carries the codes (PREQUANT_ATTR) as silu_mul_quant's output does. lora (the step's LoRABatch,
        lora_defer_on('gate_up')): gate_up's LoRA delta made first (LoRABatch.around_delta, nothing beside it) and
        added in that epilogue, DoRA's g there too."""
        from loraserve.kernels.fp8_dot8_silu import dot8_silu_quant

        codes = _prequant_ok(x, self.down_proj, None)   # (M and dtype are h's: down's decision at h's shape)
        xc = x if x.stride(-1) == 1 else x.contiguous()
        proj = self.gate_up_proj
        try:
            delta = dora = None
            if lora is not None:   # the delta before the GEMM whose epilogue adds it
                _, delta, dora = lora.around_delta(proj.layer_idx, proj.proj_name, xc, lambda: None, side=False)
            h, x_q, scale = dot8_silu_quant(xc, proj.weight, proj.weight_scale, cfg, x_q=getattr(x, PREQUANT_ATTR, None),
                                            codes=codes, delta=delta, dora=dora)
        except Exception as err:   # a compile error (first call, eager warm-up): the unfused launches from now on
            _fused_failed("gemv_silu_dot8" if lora is None else "lora_defer", err)
            return None
        if codes:
            setattr(h, PREQUANT_ATTR, (x_q, scale))
        return h


def gate_up_silu_dot8_on() -> bool:
    """LORASERVE_FP8_GATE_UP_SILU_DOT8 (default 1; 0: off): at 33..64 tokens (gate_up on dot8 without split-K)
    SiLU-and-mul in the GEMM's epilogue and down's codes from its row maxima (kernels/fp8_dot8_silu.py), not the
    one-program-per-row silu_mul_quant after the GEMM. H200, 4 8B layers' bs64 decode graph (eighth pass probe 1):
    132.9 -> 129.5 us a layer, bit for bit the same hidden states."""
    return os.environ.get("LORASERVE_FP8_GATE_UP_SILU_DOT8", "1").strip() != "0"


def convert_fused(model: torch.nn.Module) -> int:
    """Swap in Fp8MLP for every llama.MLP with an FP8 gate_up, and Fp8RMSNorm for the norms before an FP8 qkv /
    gate_up (their consumer kept outside the module tree: no new parameters or submodules). Returns the count."""
    n = 0
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]   # in model order (one ModuleList)
    for module in layers:
        mlp, attn = module.mlp, module.self_attn
        if type(mlp) is MLP and isinstance(mlp.gate_up_proj, Fp8Proj):
            mlp.__class__ = Fp8MLP
            n += 1
        for norm, proj in ((module.input_layernorm, getattr(attn, "qkv_proj", None)),
                           (module.post_attention_layernorm, getattr(mlp, "gate_up_proj", None))):
            if type(norm) is RMSNorm and isinstance(proj, Fp8Proj):
                norm.__class__ = Fp8RMSNorm
                norm.__dict__["_fp8_consumer"] = proj
                n += 1
    # a layer's MLP output goes only into the next layer's input norm (the model's loop): there the down GEMV's
    # split-K sum may be left to that norm (Fp8MLP._down); never in the last layer (the final norm is llama's)
    for layer, after in zip(layers, layers[1:]):
        if type(layer.mlp) is Fp8MLP and type(after.input_layernorm) is Fp8RMSNorm:
            layer.mlp.__dict__["_defer_ok"] = True
        if type(layer.post_attention_layernorm) is Fp8RMSNorm:   # read by Fp8KVAttention (o_proj_out)
            layer.self_attn.__dict__["_defer_ok"] = True
    return n
