"""Writers for adapter artifacts: HF PEFT directories, NeMo checkpoints and archives of them.

Used by tests, demos and tooling (e.g. to re-export a NeMo adapter as PEFT). Weights passed in
are *unscaled* (as trained): the loader folds the scale in.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from .modules import HF_MODULE_PARENT

WeightsByModule = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def peft_key(layer: int, module: str, which: str, *, key_prefix: str = "base_model.model.",
             adapter_name: str | None = None) -> str:
    """`base_model.model.model.layers.{layer}.{self_attn|mlp}.{module}.lora_{A|B}[.{name}].weight`."""
    infix = f".{adapter_name}" if adapter_name else ""
    return (f"{key_prefix}model.layers.{layer}.{HF_MODULE_PARENT[module]}.{module}"
            f".lora_{which}{infix}.weight")


def write_peft_adapter(dir: str | os.PathLike, weights_unscaled: WeightsByModule, r: int,
                       alpha: float, target_modules: list[str] | str | None = None, *,
                       use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
                       alpha_pattern: dict[str, float] | None = None,
                       layers_to_transform: list[int] | None = None, fan_in_fan_out: bool = False,
                       safetensors: bool = True, key_prefix: str = "base_model.model.",
                       adapter_name: str | None = None,
                       extra_config: dict[str, Any] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (or .bin) as PEFT's save_pretrained does.

    weights_unscaled: (layer, hf_module) -> (A [r, in], B [out, r]).
    target_modules defaults to the sorted modules present.
    """
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = sorted({m for _, m in weights_unscaled})
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": modules if target_modules is None else target_modules,
        "use_rslora": use_rslora, "use_dora": False, "fan_in_fan_out": fan_in_fan_out,
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
        "layers_to_transform": layers_to_transform, "layers_pattern": None,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    config.update(extra_config or {})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors: dict[str, torch.Tensor] = {}
    for (layer, module), (a, b) in sorted(weights_unscaled.items()):
        tensors[peft_key(layer, module, "A", key_prefix=key_prefix, adapter_name=adapter_name)] = a.detach().clone()
        tensors[peft_key(layer, module, "B", key_prefix=key_prefix, adapter_name=adapter_name)] = b.detach().clone()
    if safetensors:
        save_file(tensors, str(out / "adapter_model.safetensors"))
    else:
        torch.save(tensors, out / "adapter_model.bin")
    return out


def nemo_key(layer: int, adapter: str, part: str, *, key_prefix: str = "model.decoder") -> str:
    """`{prefix}.layers.{layer}.{self_attention|mlp}.adapter_layer.{adapter}.{linear_in|linear_out}.weight`."""
    block = "mlp" if adapter in ("lora_hto4h_adapter", "lora_4htoh_adapter") else "self_attention"
    return f"{key_prefix}.layers.{layer}.{block}.adapter_layer.{adapter}.{part}.weight"


def write_nemo_adapter(path: str | os.PathLike, weights_unscaled: WeightsByModule, *,
                       model_config: dict[str, Any], adapter_dim: int, alpha: float | None = None,
                       key_prefix: str = "model.decoder", packing: str = "tar") -> Path:
    """Write a NeMo LoRA checkpoint.

    weights_unscaled: (layer, nemo adapter name) -> (linear_in [r, in], linear_out [out, r]),
    fused layouts (qkv interleave, [gate; up]) already applied by the caller.
    model_config: hidden_size, num_attention_heads, ... (peft.lora_tuning is added here).
    packing: "tar" (.nemo), "tar.gz" (gzipped .nemo) or "dir" (extracted).
    """
    lora_tuning: dict[str, Any] = {"adapter_dim": adapter_dim, "adapter_dropout": 0.0,
                                   "column_init_method": "xavier", "row_init_method": "zero"}
    if alpha is not None:
        lora_tuning["alpha"] = alpha
    config = {**model_config, "peft": {"peft_scheme": "lora", "lora_tuning": lora_tuning}}
    state = {nemo_key(layer, adapter, part, key_prefix=key_prefix): t.contiguous()
             for (layer, adapter), pair in sorted(weights_unscaled.items())
             for part, t in zip(("linear_in", "linear_out"), pair)}
    buf = io.BytesIO()
    torch.save(state, buf)
    files = {"model_config.yaml": yaml.safe_dump(config).encode(), "model_weights.ckpt": buf.getvalue()}
    return write_files(path, files, packing)


def write_files(path: str | os.PathLike, files: dict[str, bytes], packing: str,
                top_folder: str | None = None) -> Path:
    """Write {relative name: bytes} as a directory, or a tar / tar.gz / zip archive at `path`."""
    out = Path(path)
    prefix = f"{top_folder}/" if top_folder else ""
    if packing == "dir":
        for name, data in files.items():
            target = out / prefix / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if packing == "zip":
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(prefix + name, data)
        return out
    mode = {"tar": "w", "tar.gz": "w:gz"}[packing]
    with tarfile.open(out, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def pack_dir(src: str | os.PathLike, dest: str | os.PathLike, packing: str,
             top_folder: str | None = None) -> Path:
    """Archive the regular files of directory `src` (recursively) into `dest`."""
    root = Path(src)
    files = {p.relative_to(root).as_posix(): p.read_bytes()
             for p in sorted(root.rglob("*")) if p.is_file()}
    return write_files(dest, files, packing, top_folder)
