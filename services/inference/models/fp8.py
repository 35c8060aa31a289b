"""FP8 (e4m3) base weights and KV cache: TensorRT-LLM's `QuantConfig(quant_algo=FP8, kv_cache_quant_algo=FP8)`.

Weights: each projection's W [out, in] is stored as float8_e4m3fn with one fp32 scale per output row
(W ~= W_q * s[:, None], s = amax(|W[row]|) / 448): per-channel scales keep an outlier row from
crushing the others' precision. Activations get a scale per token at run time (dynamic), or the
checkpoint's static per-tensor `input_scale`. This is vLLM's "FP8 per-channel weight, per-token
activation" scheme (vllm/model_executor/layers/quantization/fp8.py) and TensorRT-LLM's
FP8_PER_CHANNEL_PER_TOKEN; a per-tensor checkpoint scale is the special case of equal rows.

GEMM (`gemm_path`), CUDA sm >= 89: decode-sized M (<= LORASERVE_FP8_GEMV_MAX_M tokens, default 64) runs the
FP8 GEMV kernels (kernels/fp8_gemv.py) with the kind and tile its table holds per M bucket: weight-only up to 32
tokens (bf16 x times e4m3 W converted in registers, no activation quantization; at one token fp16 products summed
in fp16 over 4 K tiles, then fp32: LORASERVE_FP8_GEMV_HALF=0 for fp32), W8A8 at 33..64 (x per token in e4m3, FP8
tensor cores: the numerics of _scaled_mm; per shape cuBLASLt's tensor-wise GEMM + a scaling launch or the Triton dot8
tiles, LORASERVE_FP8_W8A8); larger M torch._scaled_mm (row-wise scales) after one launch that quantizes x per token
(H200 figures: kernels/PERF_NOTES.md). The decode fusions around these GEMMs: models/fp8_fused.py.
Projections under W8A8_MIN_WEIGHTS (1M) keep x unquantized at every M (LORASERVE_FP8_ACT_QUANT=auto|on|off).
The older Triton W8A16 GEMM (kernels/fp8_gemm.py) stays opt-in above the GEMV's limit (LORASERVE_FP8_SMALL_M).
Elsewhere (CPU, CI, and the reference) W is dequantized and multiplied with the unquantized x in the
compute dtype (F.linear: the W8A16 numerics); EMULATE_ACTIVATION_QUANT = True also rounds x per token
as _scaled_mm does. LORASERVE_FP8_SMALL_M=0 / LORASERVE_FP8_FUSED_QUANT=0 switch the Triton parts off.
Measured on the default model (6 texts x 192 tokens, base and `upper`, FP8 weights + KV, CPU bf16
emulation vs the bf16 engine): top-1 96.7% weight-only, 95.5% W8A8 (its qkv and gate_up inputs, post-RMSNorm,
cost most; 95.9% with a bf16 KV cache). The LM head: models/fp8_head.py (an e4m3 copy for small decode steps).
LoRA is untouched: `Fp8Proj.forward` adds the step's LoRA delta, computed from the unquantized x by
the existing LoRA code, to the FP8 GEMM output, exactly as `Proj.forward` does.

KV cache: e4m3 with one fp32 scale per layer for K and one for V (the checkpoint's `k_scale` /
`v_scale`, else calibrated on the first step as vLLM's calculate_kv_scales; a fixed 1.0 lost ~3% top-1
on the default model); `Fp8KVAttention` quantizes on write; the Triton attention kernels (CUDA) read
the codes and widen them in registers (to fp16 MMA operands where q is bf16, V in its load layout at decode launches
without split-KV: kernels/unified_attention.py, kernels/fp8_convert.py), the CPU torch path dequantizes the gathered
blocks. The scales
live in device memory ([2] fp32 per layer), so captured CUDA graphs read the current values. On CUDA, RoPE and
the e4m3 K/V write run as one launch (kernels/fp8_rope_kv.py; LORASERVE_FP8_FUSED_ROPE_KV=0: two).

Nothing here runs unless a quant_config asks for it: the loader swaps modules in at load time.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import paged_attention_fp8
from ..context import get_context
from .fp8_quant import (FP8, FP8_MAX, _MIN_SCALE, dequantize, quantize_per_channel,  # noqa: F401 (re-exported)
                        quantize_per_token, quantize_with_scale)
from .llama import Attention, Proj

log = logging.getLogger(__name__)

K_SCALE_RANGE, V_SCALE_RANGE = 200.0, 100.0   # vLLM's K_SCALE_CONSTANT / V_SCALE_CONSTANT headroom
# CPU: also round activations through e4m3 per token, as _scaled_mm does (tests measure the GPU's
# W8A8 error with it); off by default: the CPU path is weight-only dequantization
EMULATE_ACTIVATION_QUANT = False   # an all-zero row keeps a finite scale (its values quantize to 0 either way)


def _scaled_mm_ok(x: torch.Tensor, w_q: torch.Tensor) -> bool:
    # FP8 tensor cores: Ada/Hopper (sm >= 89); _scaled_mm needs both GEMM dims multiples of 16
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and w_q.shape[0] % 16 == 0 and w_q.shape[1] % 16 == 0)


# Decode-sized GEMMs (M <= this many tokens) may take the Triton W8A16 kernel (kernels/fp8_gemm.py): bf16
# activations times e4m3 weights dequantized in registers. Off by default: measured slower than bf16 on
# the H200 (module docstring); LORASERVE_FP8_SMALL_M=64 turns it on for tuning runs.
DEFAULT_SMALL_M = 0
# Decode-sized GEMMs (M <= this many tokens) take the FP8 GEMV kernels (kernels/fp8_gemv.py, the measured tile
# per M bucket: weight-only up to 32 tokens, W8A8 (tw / dot8) at 33..64), larger M the FP8 tensor cores (_scaled_mm).
# 64: at M = 64 dot8 beat _scaled_mm on every 8B projection on the H200 (96 vs 124 us per layer).
DEFAULT_GEMV_MAX_M = 64
# W8A8 (activations rounded to e4m3 per token) only for projections of at least this many weights: below it
# (a 1024 x 1024 projection) the FP8 tensor cores save next to nothing at any M, while the rounding of x costs
# accuracy (the 128-wide default model: top-1 vs bf16 97.7% weight-only, 95.9% W8A8, CPU bf16 emulation), so
# small GEMMs keep x in the compute dtype. LORASERVE_FP8_ACT_QUANT=on / off: W8A8 wherever the GPU can / never.
W8A8_MIN_WEIGHTS = 1 << 20


def act_quant_mode() -> str:
    """LORASERVE_FP8_ACT_QUANT: 'auto' (default: W8A8 for projections of >= W8A8_MIN_WEIGHTS weights at the M
    where the FP8 tensor cores pay), 'on' (W8A8 for every projection the GPU can), 'off' (weight-only at every M)."""
    mode = os.environ.get("LORASERVE_FP8_ACT_QUANT", "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"LORASERVE_FP8_ACT_QUANT must be auto, on or off, got {mode!r}")
    return mode


def activations_quantized(w_q: torch.Tensor) -> bool:
    """Whether a GEMM with this weight may round its activations to e4m3 (act_quant_mode)."""
    mode = act_quant_mode()
    return mode == "on" or (mode == "auto" and w_q.numel() >= W8A8_MIN_WEIGHTS)


def small_m_limit() -> int:
    """LORASERVE_FP8_SMALL_M: the largest M that takes the W8A16 kernel (0: never, the W8A8 path only)."""
    raw = os.environ.get("LORASERVE_FP8_SMALL_M", "").strip()
    if not raw:
        return DEFAULT_SMALL_M
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"LORASERVE_FP8_SMALL_M must be an integer token count (0 disables), got {raw!r}") from None
    return max(limit, 0)


def _fused_quant_on() -> bool:
    """LORASERVE_FP8_FUSED_QUANT=0: quantize activations with torch ops instead of the one Triton launch."""
    return os.environ.get("LORASERVE_FP8_FUSED_QUANT", "1").strip() != "0"


_BROKEN: set[str] = set()   # Triton paths that failed to compile/launch here: not tried again
# the attribute a producer (models/fp8_fused.py) sets on an activation it also quantized per token: (x_q, scale)
PREQUANT_ATTR = "_fp8_per_token_q"


def _triton_cuda(x: torch.Tensor) -> bool:
    from loraserve.kernels._triton import HAS_TRITON

    return HAS_TRITON and x.is_cuda


def gemv_max_m() -> int:
    """LORASERVE_FP8_GEMV_MAX_M: the largest M that takes the weight-only FP8 GEMV (kernels/fp8_gemv.py);
    0: never (W8A8 _scaled_mm at every M)."""
    raw = os.environ.get("LORASERVE_FP8_GEMV_MAX_M", "").strip()
    if not raw:
        return DEFAULT_GEMV_MAX_M
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"LORASERVE_FP8_GEMV_MAX_M must be an integer token count (0 disables), got {raw!r}") from None
    return max(limit, 0)


def gemm_path(x: torch.Tensor, w_q: torch.Tensor) -> str:
    """Which GEMM fp8_linear runs for x [M, in] and w_q [out, in]: 'gemv' (Triton FP8 GEMV kernels, sm >= 89,
    bf16/fp16 x, M <= LORASERVE_FP8_GEMV_MAX_M; also any M of a projection that keeps x unquantized,
    activations_quantized), 'w8a16' (the older Triton W8A16 GEMM, opt-in through LORASERVE_FP8_SMALL_M),
    'scaled_mm' (FP8 tensor cores, W8A8), or 'dequant' (CPU and older GPUs: F.linear on the dequantized
    weight, or the W8A8 emulation when EMULATE_ACTIVATION_QUANT)."""
    if not _scaled_mm_ok(x, w_q):
        return "dequant"
    if x.dtype in (torch.bfloat16, torch.float16) and _triton_cuda(x):
        if (x.shape[0] <= gemv_max_m() or not activations_quantized(w_q)) and "gemv" not in _BROKEN:
            return "gemv"
        if x.shape[0] <= small_m_limit() and "w8a16" not in _BROKEN:
            return "w8a16"
    if not activations_quantized(w_q):
        return "dequant"
    return "scaled_mm"


def _triton_failed(path: str, err: Exception) -> None:
    _BROKEN.add(path)
    log.exception("FP8 %s Triton kernel failed (%s); falling back to torch for the rest of the run", path, err)


def scaled_mm_rowwise(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """[N, out] = (x_q * x_scale) @ (w_q * w_scale[:, None])^T on FP8 tensor cores, fp32 accumulate.
    x_q [N, in] e4m3 row-major, x_scale [N, 1] fp32; w_q [out, in] e4m3 (w_q.t() is the column-major
    B _scaled_mm wants), w_scale [out] fp32. Row-wise scales need a bf16 output (fp32 callers cast)."""
    out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    out = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale.contiguous(), scale_b=w_scale.reshape(1, -1).contiguous(),
                           out_dtype=out_dtype)
    return out.to(dtype)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, out] = x @ dequant(w_q)^T + bias, in x's dtype; on the FP8 tensor cores x is quantized too.
    x [N, in] (bf16/fp16/fp32); w_q [out, in] e4m3; w_scale [out] fp32; input_scale: None (dynamic,
    per token) or a 0-d fp32 tensor (static, per tensor, from the checkpoint; the W8A16 path, which
    does not quantize x, ignores it). No host syncs on any CUDA path (CUDA-graph capturable)."""
    path = gemm_path(x, w_q)
    # x's per-token e4m3 codes and scales, made by its producer (models/fp8_fused.py: the norm / activation kernel
    # quantized the row it held): the same values per_token_quant_fp8 gives, without its launch
    pre = getattr(x, PREQUANT_ATTR, None) if input_scale is None else None
    if path == "gemv":
        from loraserve.kernels.fp8_gemv import fp8_gemv

        try:
            return fp8_gemv(x if x.stride(-1) == 1 else x.contiguous(), w_q, w_scale, bias,
                            weight_only=not activations_quantized(w_q), x_q=pre)
        except Exception as err:   # a compile error (first call, eager warm-up): the W8A8 path instead
            _triton_failed("gemv", err)
            path = "scaled_mm" if activations_quantized(w_q) else "dequant"
    if path == "w8a16":
        from loraserve.kernels.fp8_gemm import fp8_w8a16_gemm

        try:
            return fp8_w8a16_gemm(x if x.stride(-1) == 1 else x.contiguous(), w_q, w_scale, bias)
        except Exception as err:   # a compile error (first call, eager warm-up): the W8A8 path instead
            _triton_failed("w8a16", err)
            path = "scaled_mm"
    if path == "dequant" and not EMULATE_ACTIVATION_QUANT:
        # the CPU / reference path: weight-only dequantization, then an ordinary matmul in the compute dtype
        return F.linear(x, dequantize(w_q, w_scale[:, None], x.dtype), bias)
    if input_scale is None:
        x_q = None
        if pre is not None and path == "scaled_mm":
            x_q, x_scale = pre
        elif path == "scaled_mm" and _triton_cuda(x) and _fused_quant_on() and "quant" not in _BROKEN:
            from loraserve.kernels.fp8_gemm import per_token_quant_fp8

            try:
                x_q, x_scale = per_token_quant_fp8(x if x.stride(-1) == 1 else x.contiguous())   # one launch
            except Exception as err:
                _triton_failed("quant", err)
        if x_q is None:
            x_q, x_scale = quantize_per_token(x)                   # [N, in], [N, 1]
    else:
        x_q = quantize_with_scale(x, input_scale)
        x_scale = input_scale.reshape(1, 1).expand(x.shape[0], 1)  # row-wise form of the one scale
    if path == "scaled_mm":
        out = scaled_mm_rowwise(x_q, x_scale, w_q, w_scale, x.dtype)
        return out if bias is None else out + bias
    # W8A8 emulation: the tensor-core path's rounding of x too, then an ordinary matmul
    return F.linear(dequantize(x_q, x_scale, x.dtype), dequantize(w_q, w_scale[:, None], x.dtype), bias)


def lora_overlap_mode() -> str | None:
    """LORASERVE_FP8_LORA_OVERLAP: how an FP8 projection runs its LoRA delta (lora/batch.py LoRABatch.around):
    '0' (default): the FP8 GEMM, then the LoRA kernels; 'shrink': the shrink on a side stream while the FP8 GEMM
    runs, the expand after it; 'full': shrink + expand into a delta buffer beside the GEMM, one add after it;
    'auto': whatever the bf16 projections do (LORASERVE_LORA_OVERLAP). Read at each call (graphs keep theirs)."""
    v = os.environ.get("LORASERVE_FP8_LORA_OVERLAP", "0").strip().lower()
    if v in ("auto", "engine"):
        return None
    return {"1": "shrink", "shrink": "shrink", "full": "full"}.get(v, "")


# --- the weight holder ----------------------------------------------------------------------------

class Fp8Proj(nn.Module):
    """Proj with an FP8 weight: y = fp8_linear(x) (+ b) + the step's LoRA delta for this (layer, projection).
    weight [out, in] e4m3 (a frozen Parameter, so the loader's bookkeeping treats it as any weight);
    weight_scale [out] fp32; input_scale: 0-d fp32 (static) or None (dynamic per-token)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layer_idx: int, name: str,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.layer_idx, self.proj_name = layer_idx, name
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.input_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = get_context().lora
        if lora is not None:   # from the unquantized x, as Proj does; the shrink maybe beside the GEMM (lora_overlap)
            return lora.around(self.layer_idx, self.proj_name, x,
                               lambda: fp8_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale),
                               mode=lora_overlap_mode())
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] in `dtype`: what the FP8 weight stands for (tests, DoRA-style consumers)."""
        return dequantize(self.weight, self.weight_scale[:, None], dtype)

    def extra_repr(self) -> str:
        static = "static" if self.input_scale is not None else "dynamic"
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3 per-channel, {static} activation scale"


def excluded(name: str, patterns: list[str] | None) -> bool:
    """True if the fused projection `name` (e.g. 'layers.0.self_attn.qkv_proj') matches an exclude_modules
    pattern, by its own name or the HF name of any part ('model.layers.0.self_attn.q_proj')."""
    if not patterns:
        return False
    from fnmatch import fnmatchcase

    from loraserve.adapters.modules import PACKED_MODULES

    parent, _, proj = name.rpartition(".")
    names = {name, f"model.{name}"} | {f"model.{parent}.{part}" for part in PACKED_MODULES.get(proj, (proj,))}
    return any(fnmatchcase(n, p) for n in names for p in patterns)


def convert_projections(model: nn.Module, dtype: torch.dtype, device: torch.device,
                        exclude: list[str] | None = None) -> dict[str, Fp8Proj]:
    """Replace every Proj of the decoder layers with an (empty) Fp8Proj of the same shape, before the
    weights stream in, except those `exclude` (QuantConfig.exclude_modules) matches. Returns
    {module name: Fp8Proj} (names as in model.named_modules())."""
    out: dict[str, Fp8Proj] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Proj) and not excluded(f"{parent_name}.{child_name}" if parent_name else child_name,
                                                        exclude):
                new = Fp8Proj(child.in_features, child.out_features, child.bias is not None, child.layer_idx,
                              child.proj_name, dtype, device)
                setattr(parent, child_name, new)
                out[f"{parent_name}.{child_name}" if parent_name else child_name] = new
    from .fp8_fused import convert_fused

    convert_fused(model)   # MLPs and norms before FP8 projections: the fused decode paths (models/fp8_fused.py)
    return out


def load_into_fp8(module: Fp8Proj, part: str, row0: int, rows: int, tensor: torch.Tensor, what: str) -> None:
    """One checkpoint tensor into rows [row0, row0 + rows) of an Fp8Proj (a fused module's part).
    part: 'weight' (bf16/fp16/fp32 -> quantized per row here; e4m3 -> copied, its scale comes apart),
    'weight_scale' (a scalar, or [rows] / [rows, 1] per channel), 'input_scale' (a scalar: the fused
    module keeps the largest of its parts', so that no part saturates)."""
    if part == "weight":
        if tuple(tensor.shape) != (rows, module.in_features):
            raise ValueError(f"shape mismatch for {what}: model expects {(rows, module.in_features)}, "
                             f"checkpoint has {tuple(tensor.shape)}")
        tensor = tensor.to(module.weight.device)
        if tensor.dtype == FP8:
            module.weight.data[row0:row0 + rows].copy_(tensor)
            return
        if tensor.dtype.itemsize == 1:
            raise ValueError(f"{what}: {tensor.dtype} weights are not supported (FP8 e4m3 or bf16/fp16/fp32)")
        w_q, scale = quantize_per_channel(tensor)
        module.weight.data[row0:row0 + rows].copy_(w_q)
        module.weight_scale[row0:row0 + rows].copy_(scale)
        return
    scale = tensor.float().to(module.weight_scale.device)
    if part == "weight_scale":
        if scale.numel() == 1:   # per-tensor (AutoFP8 / vLLM): every row of this part shares it
            module.weight_scale[row0:row0 + rows].fill_(scale.item())
        elif scale.numel() == rows:
            module.weight_scale[row0:row0 + rows].copy_(scale.reshape(-1))
        else:
            raise ValueError(f"{what}: weight_scale of shape {tuple(tensor.shape)} is neither per-tensor nor "
                             f"per-channel ({rows} rows); block-wise FP8 scales are not supported")
        return
    if part == "input_scale":
        if scale.numel() != 1:
            raise ValueError(f"{what}: only a per-tensor input_scale is supported, got shape {tuple(tensor.shape)}")
        prev = module.input_scale
        module.input_scale = scale.reshape(()) if prev is None else torch.maximum(prev, scale.reshape(()))
        return
    raise ValueError(f"unexpected FP8 checkpoint tensor {what!r}")


# --- FP8 KV cache --------------------------------------------------------------------------------

class Fp8KVAttention(Attention):
    """Attention over an e4m3 KV cache: Attention.forward with the FP8 store/read (`attend`). Swapped in by
    `enable_fp8_kv_cache`. kv_scales: [2] fp32 on the cache's device (k_scale, v_scale, per tensor = per
    layer), the checkpoint's, else calibrated on the first eager step that is not decode-only (a
    prefill: real data, while CUDA-graph warm-ups are dummy decode steps) and fixed from then on
    (cached blocks hold values under these scales). `k_scale` / `v_scale` read them back as floats
    (a host sync: inspection and tests only; None until set)."""

    kv_scales: torch.Tensor
    _kv_scale_set: list[bool]   # [k, v]: given by the checkpoint or calibrated

    def _init_kv_scales(self, device: torch.device) -> None:
        given = [self.__dict__.pop(name, None) for name in ("k_scale", "v_scale")]   # the loader's floats
        self.register_buffer("kv_scales", torch.ones(2, dtype=torch.float32, device=device), persistent=False)
        self._kv_scale_set = [False, False]
        self._kv_scale_given = [False, False]   # from the checkpoint (never recalibrated)
        for i, value in enumerate(given):
            if value is not None:
                self._set_kv_scale(i, value)
                self._kv_scale_given[i] = True

    def _set_kv_scale(self, i: int, value) -> None:
        if not float(value) > 0:
            raise ValueError(f"FP8 KV-cache {'kv'[i]}_scale must be positive, got {float(value)}")
        self.kv_scales[i].fill_(float(value))
        self._kv_scale_set[i] = True

    @property
    def k_scale(self) -> float | None:
        return float(self.kv_scales[0]) if self._kv_scale_set[0] else None

    @k_scale.setter
    def k_scale(self, value) -> None:   # the checkpoint loader's k_scale tensor (as a float)
        self._set_kv_scale(0, value)
        self._kv_scale_given[0] = True

    @property
    def v_scale(self) -> float | None:
        return float(self.kv_scales[1]) if self._kv_scale_set[1] else None

    @v_scale.setter
    def v_scale(self, value) -> None:
        self._set_kv_scale(1, value)
        self._kv_scale_given[1] = True

    def _calibrate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        # vLLM's calculate_kv_scales headroom (K/200, V/100); later outliers saturate at +-448.
        # Device ops only (no .item()): written into the buffer the kernels and graphs read.
        for i, (x, headroom) in enumerate(((k, K_SCALE_RANGE), (v, V_SCALE_RANGE))):
            if not self._kv_scale_set[i]:
                self.kv_scales[i:i + 1].copy_((x.abs().amax().float() / headroom).clamp(min=1e-6))
                self._kv_scale_set[i] = True

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary) -> torch.Tensor:
        """Attention.forward; on CUDA with the scales fixed (or a decode graph being captured: it reads them at
        replay) RoPE and the e4m3 K/V write run as one launch (kernels/fp8_rope_kv.py), as the bf16 engine's
        rope_store_kv; a step that calibrates the scales takes Attention.forward's RoPE, then attend."""
        ctx = get_context()
        calibrating = not all(self._kv_scale_set) and not ctx.decode_only and not _capturing(x)
        if calibrating or not fused_rope_kv_fp8_on() or not _triton_cuda(x) or "rope_kv" in _BROKEN:
            return super().forward(positions, x, rotary)
        from ..attention import _kernel_attention
        from .fp8_fused import o_proj_out, qkv_rope_kv_fused

        k_scale, v_scale = self.kv_scales[0:1], self.kv_scales[1:2]
        q = qkv_rope_kv_fused(self, x, positions, rotary, ctx)   # one token: RoPE + K/V write in the qkv GEMV
        if q is not None:
            o = _kernel_attention(q.view(-1, self.num_heads, self.head_dim), self.k_cache, self.v_cache, ctx,
                                  self.scale, k_scale, v_scale)
            out = o_proj_out(self, o.reshape(-1, self.q_size))   # models/fp8_fused.py: its epilogue maybe deferred
            return out if self.tp is None or self.tp.defers(out) else self.tp.all_reduce(out)
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)    # (N, H, D)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)  # (N, KVH, D)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        try:
            from loraserve.kernels.fp8_rope_kv import rope_store_kv_fp8

            q = rope_store_kv_fp8(positions, q, k, v, rotary.cos_sin_cache(), self.k_cache, self.v_cache,
                                  ctx.slot_mapping, k_scale, v_scale)
            o = _kernel_attention(q, self.k_cache, self.v_cache, ctx, self.scale, k_scale, v_scale)
            o = o.reshape(-1, self.q_size)
        except Exception as err:   # a compile error (first call, eager warm-up): the two-launch path from now on
            _triton_failed("rope_kv", err)
            q, k = rotary(positions, q, k)
            o = self.attend(q, k, v.contiguous()).reshape(-1, self.q_size)
        out = o_proj_out(self, o)
        return out if self.tp is None or self.tp.defers(out) else self.tp.all_reduce(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not all(self._kv_scale_set) and not get_context().decode_only and not _capturing(q):
            self._calibrate(k, v)
        return paged_attention_fp8(q, k, v, self.k_cache, self.v_cache, self.scale,
                                   self.kv_scales[0:1], self.kv_scales[1:2])


def forget_calibrated_kv_scales(model: nn.Module) -> int:
    """Unset the FP8 KV-cache scales that were calibrated (not the checkpoint's), so the next real prefill calibrates
    them again: after start-up warm-up (services/inference/warmup.py), whose dummy prompts of random token ids must not
    set the scales (on the default model they cost ~1 point of top-1). Returns how many layers it reset."""
    n = 0
    for module in model.modules():
        if isinstance(module, Fp8KVAttention):
            given = getattr(module, "_kv_scale_given", [False, False])
            for i in range(2):
                if module._kv_scale_set[i] and not given[i]:
                    module._kv_scale_set[i] = False
                    module.kv_scales[i:i + 1].fill_(1.0)
                    n += 1
    return n


def fused_rope_kv_fp8_on() -> bool:
    """LORASERVE_FP8_FUSED_ROPE_KV=0: RoPE and the e4m3 K/V store as two launches (apply_rope, store_kv_fp8)."""
    return os.environ.get("LORASERVE_FP8_FUSED_ROPE_KV", "1").strip() != "0"


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def enable_fp8_kv_cache(model: nn.Module, device: torch.device) -> None:
    """Make every Attention of `model` write and read an e4m3 KV cache: on CUDA through the Triton
    attention kernels (kernels/unified_attention.py, kernels/paged_attention.py), on CPU through torch.
    LORASERVE_FP8_KV_CUDA=0 refuses CUDA again (benchmarks/bench_fp8.py then keeps a bf16 KV cache)."""
    if device.type == "cuda":
        from loraserve.kernels import triton_available

        if os.environ.get("LORASERVE_FP8_KV_CUDA", "1") == "0":   # the escape hatch: bf16 KV on the GPU
            raise NotImplementedError("kv_cache_quant_algo=FP8 on CUDA is switched off (LORASERVE_FP8_KV_CUDA=0)")
        if not triton_available():
            raise NotImplementedError("kv_cache_quant_algo=FP8 on CUDA needs Triton (the attention kernels read "
                                      "the e4m3 cache); install triton or leave kv_cache_quant_algo unset")
    elif device.type != "cpu":
        raise NotImplementedError(f"kv_cache_quant_algo=FP8 runs on CUDA (Triton kernels) and CPU, not {device.type}")
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = Fp8KVAttention   # same state; only forward (and the scale buffer) differ
            module._init_kv_scales(device)
