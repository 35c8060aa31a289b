"""Convert an HF Llama-family checkpoint (bf16/fp16/fp32 safetensors) to FP8 e4m3, offline.

    python scripts/quantize_fp8.py MODEL_DIR OUT_DIR [--per-tensor]

Writes the layout vLLM / AutoFP8 checkpoints use and loraserve loads (models/loader.py):
decoder projections (q/k/v/o/gate/up/down) as float8_e4m3fn `*.weight` plus a float32 `*.weight_scale`
([out, 1] per output channel, or a scalar with --per-tensor); everything else (embeddings, norms,
lm_head, biases) copied as is; config.json gains quantization_config {quant_method: fp8,
activation_scheme: dynamic}; tokenizer and other files are copied. Serving the result needs no
quant_config: the loader sees quantization_config and keeps the weights in FP8.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraserve.inference.models.fp8 import FP8, FP8_MAX, quantize_per_channel

_PROJ = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                   r"\.weight$")


def quantize_tensor(w: torch.Tensor, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], scale fp32: [out, 1] per channel or [] per tensor)."""
    if per_tensor:
        scale = (w.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
        return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    q, scale = quantize_per_channel(w)
    return q, scale[:, None]


def convert(src: str, dst: str, per_tensor: bool = False) -> int:
    """Returns the number of projections quantized."""
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("quantization_config"):
        raise ValueError(f"{src}: already quantized ({cfg['quantization_config'].get('quant_method')})")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):   # tokenizer, generation config, ...: everything but weights and config
        if name == "config.json" or name.endswith(".safetensors") or name.endswith(".index.json"):
            continue
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    index_path = os.path.join(src, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index_path, encoding="utf-8"))["weight_map"].values()))
             if os.path.isfile(index_path) else sorted(f for f in os.listdir(src) if f.endswith(".safetensors")))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors weights")
    weight_map, count = {}, 0
    for file in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(os.path.join(src, file), framework="pt", device="cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if _PROJ.search(name):
                    out[name], out[name + "_scale"] = quantize_tensor(t, per_tensor)
                    count += 1
                else:
                    out[name] = t.contiguous()
        save_file(out, os.path.join(dst, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in out})
    if os.path.isfile(index_path):
        with open(os.path.join(dst, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_scale_granularity": "tensor" if per_tensor else "channel"}
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="HF model directory (bf16/fp16/fp32 safetensors)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--per-tensor", action="store_true", help="one scale per weight (AutoFP8) instead of per channel")
    args = p.parse_args(argv)
    n = convert(args.src, args.dst, args.per_tensor)
    print(f"{args.dst}: {n} projections in FP8 e4m3 ({'per-tensor' if args.per_tensor else 'per-channel'} scales)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
