"""Small adapter fixtures for tests of this package and of its users (registry, engine).

Everything here is tiny and random (seeded). The shapes follow a tiny GQA Llama:
hidden 64, 4 heads / 2 KV heads (head dim 16), intermediate 128, 2 layers.

    make_peft_adapter(dest, ...)  -> HF PEFT dir or archive
    make_nemo_adapter(dest, ...)  -> .nemo tar / gzipped tar / extracted dir
    make_malformed_corpus(tmpdir) -> [(name, path)], each rejected by
                                     validate_artifact(path, **CORPUS_LIMITS)
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from .writer import WeightsByModule, pack_dir, write_nemo_adapter, write_peft_adapter

TINY_HIDDEN, TINY_INTERMEDIATE, TINY_LAYERS = 64, 128, 2
TINY_HEADS, TINY_KV_HEADS = 4, 2
TINY_HEAD_DIM = TINY_HIDDEN // TINY_HEADS
# HF module -> (in_features, out_features) of the tiny Llama.
TINY_MODULE_SHAPES: dict[str, tuple[int, int]] = {
    "q_proj": (TINY_HIDDEN, TINY_HEADS * TINY_HEAD_DIM),
    "k_proj": (TINY_HIDDEN, TINY_KV_HEADS * TINY_HEAD_DIM),
    "v_proj": (TINY_HIDDEN, TINY_KV_HEADS * TINY_HEAD_DIM),
    "o_proj": (TINY_HEADS * TINY_HEAD_DIM, TINY_HIDDEN),
    "gate_proj": (TINY_HIDDEN, TINY_INTERMEDIATE),
    "up_proj": (TINY_HIDDEN, TINY_INTERMEDIATE),
    "down_proj": (TINY_INTERMEDIATE, TINY_HIDDEN),
}
# NeMo model_config.yaml fields of the same tiny model.
TINY_NEMO_CONFIG: dict[str, Any] = {
    "hidden_size": TINY_HIDDEN, "num_attention_heads": TINY_HEADS,
    "num_query_groups": TINY_KV_HEADS, "kv_channels": TINY_HEAD_DIM,
    "ffn_hidden_size": TINY_INTERMEDIATE, "num_layers": TINY_LAYERS,
    "activation": "fast-swiglu", "mcore_gpt": True,
}
# NeMo adapter -> (in_features, out_features) of the tiny model (fused layouts).
TINY_NEMO_SHAPES: dict[str, tuple[int, int]] = {
    "lora_kqv_adapter": (TINY_HIDDEN, (TINY_HEADS + 2 * TINY_KV_HEADS) * TINY_HEAD_DIM),
    "lora_dense_attention_adapter": (TINY_HEADS * TINY_HEAD_DIM, TINY_HIDDEN),
    "lora_hto4h_adapter": (TINY_HIDDEN, 2 * TINY_INTERMEDIATE),
    "lora_4htoh_adapter": (TINY_INTERMEDIATE, TINY_HIDDEN),
}
# The limits under which every corpus artifact must still be rejected (registry tests use them).
CORPUS_LIMITS: dict[str, int] = {"max_rank": 64, "max_bytes": 256 * 1024}
PWNED_MARKER = "PWNED_MARKER"  # the malicious pickles would create <tmpdir>/PWNED_MARKER


def random_pairs(shapes: dict[str, tuple[int, int]], r: int | dict[str, int], *,
                 num_layers: int = TINY_LAYERS, layers: list[int] | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> WeightsByModule:
    """(layer, name) -> (A [r, in], B [out, r]), random normal * 0.1, both non-zero."""
    gen = torch.Generator().manual_seed(seed)
    out: WeightsByModule = {}
    for layer in (layers if layers is not None else range(num_layers)):
        for name, (fan_in, fan_out) in shapes.items():
            rank = r[name] if isinstance(r, dict) else r
            a = torch.randn(rank, fan_in, generator=gen) * 0.1
            b = torch.randn(fan_out, rank, generator=gen) * 0.1
            out[(layer, name)] = (a.to(dtype), b.to(dtype))
    return out


def make_peft_adapter(dest: str | Path, *, modules: tuple[str, ...] = ("q_proj", "v_proj"),
                      r: int = 4, alpha: float = 8, num_layers: int = TINY_LAYERS,
                      dtype: torch.dtype = torch.float32, seed: int = 0,
                      packing: str = "dir", top_folder: str | None = None,
                      **peft_kwargs: Any) -> Path:
    """A valid random PEFT adapter for the tiny Llama.

    packing: "dir" writes the directory `dest`; "tar" / "tar.gz" / "zip" write an archive file
    `dest` (optionally with everything inside `top_folder`). peft_kwargs go to write_peft_adapter.
    """
    dest = Path(dest)
    pairs = random_pairs({m: TINY_MODULE_SHAPES[m] for m in modules}, r,
                         num_layers=num_layers, dtype=dtype, seed=seed)
    if packing == "dir":
        return write_peft_adapter(dest, pairs, r, alpha, **peft_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        write_peft_adapter(Path(tmp) / "adapter", pairs, r, alpha, **peft_kwargs)
        return pack_dir(Path(tmp) / "adapter", dest, packing, top_folder)


def make_nemo_adapter(dest: str | Path, *, adapters: tuple[str, ...] = ("lora_kqv_adapter",),
                      r: int = 4, alpha: float | None = None, num_layers: int = TINY_LAYERS,
                      dtype: torch.dtype = torch.float32, seed: int = 0, packing: str = "tar",
                      key_prefix: str = "model.decoder",
                      model_config: dict[str, Any] | None = None) -> Path:
    """A valid random NeMo LoRA checkpoint for the tiny Llama (GQA), packing "tar" | "tar.gz" | "dir"."""
    pairs = random_pairs({a: TINY_NEMO_SHAPES[a] for a in adapters}, r,
                         num_layers=num_layers, dtype=dtype, seed=seed)
    return write_nemo_adapter(dest, pairs, model_config=model_config or TINY_NEMO_CONFIG,
                              adapter_dim=r, alpha=alpha, key_prefix=key_prefix, packing=packing)


def make_malformed_corpus(tmpdir: str | Path) -> list[tuple[str, Path]]:
    """Build the malformed-artifact corpus in `tmpdir`; see `_corpus` for the list."""
    from ._corpus import build_corpus
    return build_corpus(Path(tmpdir))
