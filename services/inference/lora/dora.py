"""DoRA's per-output-feature factor, computed once per adapter from the served base weights.

DoRA (Liu et al. 2024, arXiv:2402.09353; PEFT `use_dora=True`) adapts a linear layer as

    W' = m * (W + s*B@A) / ||W + s*B@A||_row        (norm over the input dimension, one per output)

so for an input row x:  x W'^T = g * (x W^T + s * (x A^T) B^T)  with  g = m / ||W + s*B@A||_row;
a bias b of the base layer is added unscaled (PEFT subtracts it before scaling), which the
serving path gets as g * (x W^T + b + delta) + c with the shift c = (1 - g) * b.
g depends on weights only: it is computed here when the adapter is loaded, in float32 as PEFT's
DoraLinearLayer.get_weight_norm does (torch.linalg.norm over dim 1 of W + s*B@A; the norm is
detached there, which changes nothing at inference; PEFT adds no eps, so a zero-norm row would
make g infinite: such an adapter is refused). The serving path then scales each DoRA token's
whole output row (base + delta) by g[slot(t)] in the LoRA expand epilogue.

The base weights come from the model's fused projections (q/k/v rows of qkv_proj, gate/up rows
of gate_up_proj), sliced per HF module.
"""
from __future__ import annotations

import torch
from torch import nn

from loraserve.adapters import AdapterFormatError, LoraAdapter
from loraserve.adapters.modules import PACKED_MODULES

_PARENT = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
# Bounds the fp32 temporary W + B@A to 32 MiB: on the GPU it is taken from what the KV cache left.
_CHUNK_ELEMS = 1 << 23


def base_projection(model: nn.Module, layer: int, module: str) -> tuple[nn.Module, int, int]:
    """(the fused Proj holding HF `module` in decoder layer `layer`, first row, last row + 1)."""
    for proj, slices in PACKED_MODULES.items():
        if module in slices:
            lin = getattr(getattr(model.layers[layer], _PARENT[proj]), proj)
            sizes = _slice_sizes(model, proj)
            start = sum(sizes[: slices.index(module)])
            return lin, start, start + sizes[slices.index(module)]
    raise KeyError(f"{module} is not a projection of the model")


def _slice_sizes(model: nn.Module, proj: str) -> list[int]:
    shapes = model.args.lora_module_shapes()
    return [shapes[m][1] for m in PACKED_MODULES[proj]]


@torch.no_grad()
def row_norms(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight_scale: torch.Tensor | None = None,
              squared: bool = False) -> torch.Tensor:
    """||W + B@A|| per row (or its square), float32 [out]. weight [out, in] (any float dtype/device, or
    FP8 with weight_scale [out]: W = weight * weight_scale[:, None], the weight the FP8 GEMM serves);
    a [r, in]; b [out, r] with the LoRA scale folded in. Chunked over rows to bound the fp32 temporary."""
    out = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    a32 = a.to(weight.device, torch.float32)
    b32 = b.to(weight.device, torch.float32)
    rows = max(1, _CHUNK_ELEMS // max(1, weight.shape[1]))
    for lo in range(0, weight.shape[0], rows):
        hi = min(lo + rows, weight.shape[0])
        w = weight[lo:hi].to(torch.float32)
        if weight_scale is not None:
            w = w * weight_scale[lo:hi, None].to(torch.float32)
        w = w + b32[lo:hi] @ a32          # (rows, in)
        out[lo:hi] = w.square().sum(dim=1) if squared else torch.linalg.norm(w, dim=1)
    return out


def base_weight(lin: nn.Module, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, per-row dequantization scale or None) of a served projection. FP8 projections
    (models/fp8.py: e4m3 weight, float32 weight_scale [out]) count as the weight they stand for;
    any other non-float weight is refused."""
    w = lin.weight
    scale = getattr(lin, "weight_scale", None)
    if w.is_floating_point() and w.element_size() >= 2:
        return w, None
    if w.dtype == getattr(torch, "float8_e4m3fn", None) and scale is not None and scale.dim() == 1:
        return w, scale
    raise AdapterFormatError(f"DoRA on {module} is not supported with {w.dtype} base weights")


def compute_dora_scales(adapter: LoraAdapter, model: nn.Module | None) -> None:
    """Fill adapter.dora_scales[(layer, module)] = g = m / ||W + B@A||_row (float32 [out], on the
    CPU) for every module with a magnitude vector, and adapter.dora_shifts[...] = (1 - g) * b where
    the base layer has a bias b. No-op for a plain LoRA adapter or one already done.
    AdapterFormatError if there is no model or a factor is not finite."""
    if not adapter.is_dora or len(adapter.dora_scales) == len(adapter.magnitudes):
        return
    if model is None:
        raise AdapterFormatError("DoRA (use_dora=true) is not supported by this engine: it holds no whole base "
                                 "weights to compute m / ||W + s*B@A|| from")
    scales, shifts = {}, {}
    for key, m in adapter.magnitudes.items():
        layer, module = key
        lin, lo, hi = base_projection(model, layer, module)
        weight, wscale = base_weight(lin, module)
        a, b = adapter.weights[key]
        norms = row_norms(weight[lo:hi], a, b, None if wscale is None else wscale[lo:hi]).cpu()
        g = m.to(torch.float32) / norms
        if not bool(torch.isfinite(g).all()):
            raise AdapterFormatError(f"layer {layer} {module}: DoRA factor m / ||W + s*B@A|| is not finite "
                                     f"(a zero-norm output row)")
        scales[key] = g.contiguous()
        if getattr(lin, "bias", None) is not None:
            shifts[key] = ((1 - g) * lin.bias[lo:hi].detach().to(torch.float32).cpu()).contiguous()
    adapter.dora_scales, adapter.dora_shifts = scales, shifts
