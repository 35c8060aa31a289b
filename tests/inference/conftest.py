"""Fixtures: small random HF checkpoints (Llama, Qwen2, Mistral shapes) written to disk with a
byte-level BPE tokenizer, so the engine loads them exactly as it loads a real model."""
from __future__ import annotations

import json
import os

import pytest
import torch


def make_tokenizer(out_dir: str, vocab_size: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog. " * 3, "def main():\n    return 42\n",
            "Größe, naïve café — 東京 🚀 emoji"]
    tok.train_from_iterator(text, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def make_random_model(out_dir: str, kind: str = "llama", seed: int = 0, shard: bool = False, **overrides):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5)
    common.update(overrides)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common)
        model = transformers.MistralForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # larger weights than the init default so that logits are not all near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in str(p.shape) or p.dim() == 1:
                pass
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out_dir, max_shard_size="100KB" if shard else "2GB", safe_serialization=True)
    make_tokenizer(out_dir)
    return model.eval()


def pytest_configure(config):
    """The engine's start-up warm-up (warmup.py) compiles Triton variants for every engine a GPU test builds: off
    under pytest (tests/inference/test_warmup.py turns it on where it is the subject). A hook, not an import-time
    setting: benchmarks import this module for its checkpoint helpers and keep the warm-up."""
    os.environ.setdefault("LORASERVE_WARMUP", "0")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_llama"))
    return d, make_random_model(d, "llama")
