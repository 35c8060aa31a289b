"""Helpers for adapter-format tests: tiny HF Llama + PEFT adapters built with the real libraries."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from loraserve.adapters.testing import (TINY_HEADS, TINY_HIDDEN, TINY_INTERMEDIATE,
                                        TINY_KV_HEADS, TINY_LAYERS)

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=TINY_HIDDEN, intermediate_size=TINY_INTERMEDIATE,
                      num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS,
                      num_key_value_heads=TINY_KV_HEADS, vocab_size=64)
    return LlamaForCausalLM(cfg)


def save_peft_adapter(out: Path, *, safe: bool = True, seed: int = 0, **lora_kwargs):
    """get_peft_model on a tiny Llama with random non-zero lora_B; save_pretrained to out. -> (model, out)."""
    from peft import LoraConfig, get_peft_model
    model = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kwargs))
    peft_model.eval()
    peft_model.save_pretrained(str(out), safe_serialization=safe)
    return peft_model, out


def peft_lora_layers(peft_model) -> dict[tuple[int, str], torch.nn.Module]:
    """(layer, module) -> PEFT's LoRA Linear wrapper for every adapted module."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLinear):
            layers[(int(_LAYER.search(name).group(1)), name.rsplit(".", 1)[-1])] = module
    return layers


def assert_matches_peft(adapter, peft_model, atol: float = 1e-5) -> None:
    """For every adapted module: x @ A.T @ B.T == PEFT layer(x) - base layer(x)."""
    layers = peft_lora_layers(peft_model)
    assert set(adapter.weights) == set(layers)
    gen = torch.Generator().manual_seed(123)
    for key, layer in layers.items():
        a, b = adapter.weights[key]
        x = torch.randn(5, layer.in_features, generator=gen)
        with torch.no_grad():
            expected = layer(x) - layer.base_layer(x)
        got = x @ a.T @ b.T
        assert expected.abs().max() > 1e-3, f"{key}: PEFT delta is ~0, test would be vacuous"
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4, msg=lambda m: f"{key}: {m}")


