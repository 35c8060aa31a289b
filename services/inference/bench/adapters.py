"""Random LoRA adapters shaped for a given base model, for benchmarks without real adapters.

Written in TensorRT-LLM's layout, adapter k in `<out_dir>/<k>` (HF PEFT directories), so that
`prepare-dataset --lora-dir <out_dir> --rand-task-id 0 <count-1>` points at them. The weights
are random (A, B ~ N(0, 0.1^2)): they cost what a trained adapter of the same rank costs.
"""
from __future__ import annotations

import json
import os

import torch

DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_shapes(model_dir: str) -> tuple[dict[str, tuple[int, int]], int]:
    """({HF module: (in_features, out_features)}, num_layers) read from the model's config.json."""
    from loraserve.inference.models.llama import ModelArgs

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        args = ModelArgs.from_hf_config(json.load(f))
    return args.lora_module_shapes(), args.num_hidden_layers


def make_random_adapters(model_dir: str, out_dir: str, count: int, rank: int = 8,
                         modules: tuple[str, ...] = DEFAULT_MODULES, alpha: float | None = None,
                         seed: int = 0, dtype: torch.dtype = torch.float16) -> list[str]:
    """Write `count` random PEFT adapters `<out_dir>/0 .. <out_dir>/<count-1>`; returns their paths."""
    from loraserve.adapters.testing import random_pairs
    from loraserve.adapters.writer import write_peft_adapter

    shapes, num_layers = module_shapes(model_dir)
    unknown = [m for m in modules if m not in shapes]
    if unknown:
        raise ValueError(f"modules {unknown} are not in the model; it has {sorted(shapes)}")
    paths = []
    for k in range(count):
        pairs = random_pairs({m: shapes[m] for m in modules}, rank, num_layers=num_layers, dtype=dtype, seed=seed + k)
        paths.append(str(write_peft_adapter(os.path.join(out_dir, str(k)), pairs, rank, alpha or 2 * rank)))
    return paths
