"""Random Llama-shaped HF checkpoints for the GPU benchmarks (bench_engine.py and the benchmarks that import
its build_checkpoint): safetensors shards written straight from tensors drawn on the GPU, in /dev/shm when it
has room."""
from __future__ import annotations

import gc
import json
import os
import tempfile

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)


def checkpoint_dir(layers: int, shape: dict = LLAMA3_8B, prefix: str = "llama8b-") -> str:
    """A fresh directory for the random checkpoint: in /dev/shm (RAM) when it has room for it with a
    margin (a fresh GPU machine wrote the 16 GB 8B checkpoint to disk in 41.6 s, inside the benchmark's
    time limit), else the default temp dir. The caller removes it."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i
    need = 2 * (layers * per_layer + 2 * 128256 * h)   # bf16 bytes
    try:
        import shutil

        if shutil.disk_usage("/dev/shm").free > 2 * need + (8 << 30):
            return tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")
    except OSError:
        pass
    return tempfile.mkdtemp(prefix=prefix)


def build_checkpoint(path: str, layers: int, shape: dict = LLAMA3_8B, device: str = "cuda") -> None:
    """A Llama-3-shaped checkpoint (8B by default) with random bf16 weights: HF's initialisation (linear and
    embedding weights N(0, 0.02), norms 1) drawn on `device` and written with safetensors directly, a shard
    per 8 layers. (HF's model init in fp32 + save_pretrained took 18.3 s for 4 layers on a fresh H200 machine,
    41.6 s for 32: most of a time-limited run's margin.)"""
    import transformers
    from safetensors.torch import save_file

    from tests.inference.conftest import make_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=128256, num_hidden_layers=layers, **shape,
                                   max_position_embeddings=8192, rope_theta=500000.0, torch_dtype="bfloat16",
                                   bos_token_id=0, eos_token_id=1)
    cfg.save_pretrained(path)
    make_tokenizer(path)
    h, inter, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    g = torch.Generator(device=device).manual_seed(0)

    def normal(*dims: int) -> torch.Tensor:
        return torch.randn(dims, generator=g, device=device, dtype=torch.bfloat16).mul_(std).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    groups = [[("model.embed_tokens.weight", lambda: normal(cfg.vocab_size, h)), ("model.norm.weight", lambda: ones(h)),
               ("lm_head.weight", lambda: normal(cfg.vocab_size, h))]]
    for first in range(0, layers, 8):
        group = []
        for li in range(first, min(first + 8, layers)):
            p = f"model.layers.{li}."
            group += [(p + "self_attn.q_proj.weight", lambda: normal(h, h)),
                      (p + "self_attn.k_proj.weight", lambda: normal(kv, h)),
                      (p + "self_attn.v_proj.weight", lambda: normal(kv, h)),
                      (p + "self_attn.o_proj.weight", lambda: normal(h, h)),
                      (p + "mlp.gate_proj.weight", lambda: normal(inter, h)),
                      (p + "mlp.up_proj.weight", lambda: normal(inter, h)),
                      (p + "mlp.down_proj.weight", lambda: normal(h, inter)),
                      (p + "input_layernorm.weight", lambda: ones(h)),
                      (p + "post_attention_layernorm.weight", lambda: ones(h))]
        groups.append(group)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: make() for key, make in group}
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    gc.collect()
