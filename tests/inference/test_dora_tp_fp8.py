"""DoRA under tensor parallelism and on an FP8 base (issue 16: "same behaviour under FP8 and tensor
parallelism"), against transformers + PEFT, token for token in fp32 on the CPU.

TP=2 (gloo): no rank holds whole rows of W for o/down, so each rank computes its shard's factor
g = m / ||W + s*B@A||_row (column-parallel: local rows; row-parallel: squared norms all-reduced).
FP8: g is computed from the weight the FP8 GEMM serves (e4m3 weight x per-channel scale); the PEFT
reference is the HF model with those dequantized weights.
"""
from __future__ import annotations

import copy

import torch

from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams

from .test_multi_lora import peft_adapter_with_random_weights, peft_greedy

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "dora-all-r8": dict(r=8, lora_alpha=16, target_modules=ALL, use_dora=True),
    "dora-od-r4": dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj", "v_proj"], use_dora=True),
    "lora-all-r8": dict(r=8, lora_alpha=16, target_modules=ALL),
}
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 41)), [3] * 7, [11, 12]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _save_adapters(base, root) -> dict:
    out = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        d = str(root / name)
        out[name] = (d, peft_adapter_with_random_weights(base, d, seed=500 + i, **kw))
    return out


def _batch(adapters):
    reqs = [None] + [LoRARequest(name, i + 1, d) for i, (name, (d, _)) in enumerate(adapters.items())]
    return PROMPTS, reqs   # one prompt per request: base, two DoRA, one plain LoRA


def test_dora_under_tp2_equals_peft(tiny_llama, tmp_path):
    path, base = tiny_llama
    adapters = _save_adapters(base, tmp_path)
    prompts, reqs = _batch(adapters)
    refs = [peft_greedy(base, prompts[0], 8)] + [peft_greedy(m, p, 8) for (_, m), p in zip(adapters.values(),
                                                                                        prompts[1:])]
    # max_loras=2 for 3 adapters: slots are reloaded mid-run, DoRA and plain LoRA take turns on a slot
    llm = LLM(model=path, dtype="float32", device="cpu", tensor_parallel_size=2,
              lora_config=LoraConfig(max_lora_rank=8, max_loras=2, max_cpu_loras=4))
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=reqs)]
    finally:
        llm.engine.runner.shutdown()
    assert got == refs
    plain = [peft_greedy(base, p, 8) for p in prompts[1:3]]
    assert refs[1:3] != plain, "the DoRA adapters do not change the output: the test would be vacuous"


def _dequantized_hf(base, model):
    """A copy of the HF model whose projections hold the served FP8 weights, dequantized (fp32)."""
    hf = copy.deepcopy(base)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            ours = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,
                    "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}
            blk = hf.model.layers[i]
            w = {k: p.dequantized_weight(torch.float32) for k, p in ours.items()}
            q, k, v = (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj)
            nq, nk = q.weight.shape[0], k.weight.shape[0]
            q.weight.copy_(w["qkv"][:nq])
            k.weight.copy_(w["qkv"][nq:nq + nk])
            v.weight.copy_(w["qkv"][nq + nk:])
            blk.self_attn.o_proj.weight.copy_(w["o"])
            ni = blk.mlp.gate_proj.weight.shape[0]
            blk.mlp.gate_proj.weight.copy_(w["gate_up"][:ni])
            blk.mlp.up_proj.weight.copy_(w["gate_up"][ni:])
            blk.mlp.down_proj.weight.copy_(w["down"])
    return hf


def test_dora_on_fp8_base_equals_peft_on_the_dequantized_weights(tiny_llama, tmp_path, monkeypatch):
    from loraserve.inference.models import fp8 as fp8_mod

    # activations unquantized (the W8A16 reading of the FP8 GEMM): the served function is then
    # exactly the model with dequantized weights, which PEFT gets as its base
    monkeypatch.setattr(fp8_mod, "EMULATE_ACTIVATION_QUANT", False)
    path, base = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", quant_config={"quant_algo": "FP8"},
              lora_config=LoraConfig(max_lora_rank=8, max_loras=2, max_cpu_loras=4))
    proj = llm.engine.model.layers[0].self_attn.qkv_proj
    assert proj.weight.dtype == torch.float8_e4m3fn
    hf = _dequantized_hf(base, llm.engine.model)
    assert not torch.equal(hf.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    adapters = _save_adapters(hf, tmp_path)   # PEFT's DoRA norms from the dequantized weights
    prompts, reqs = _batch(adapters)
    refs = [peft_greedy(hf, prompts[0], 8)] + [peft_greedy(m, p, 8) for (_, m), p in zip(adapters.values(),
                                                                                      prompts[1:])]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=reqs)]
    assert got == refs
    assert refs[1:3] != [peft_greedy(hf, p, 8) for p in prompts[1:3]], "DoRA changes nothing: vacuous"
