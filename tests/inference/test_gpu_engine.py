"""The engine on CUDA: CUDA-graph decode and Triton kernels against eager/HF/peft references."""
from __future__ import annotations

import pytest
import torch

from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams
from tests.inference.test_multi_lora import ADAPTERS, peft_adapter_with_random_weights, peft_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 57)), [3] * 17]


def test_graph_decode_matches_eager_and_hf(tiny_llama):
    path, hf = tiny_llama
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    graphed = LLM(model=path, dtype="float32", device="cuda")
    assert graphed.engine.runner.graph_runner is not None
    eager = LLM(model=path, dtype="float32", device="cuda", enforce_eager=True)
    a = [o.outputs[0].token_ids for o in graphed.generate(PROMPTS, p)]
    b = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, p)]
    assert a == b
    for prompt, toks in zip(PROMPTS, a):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert toks == ref


def test_multi_lora_on_gpu_matches_peft(tiny_llama, tmp_path):
    path, base = tiny_llama
    adapters = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        d = tmp_path / name
        adapters[name] = (str(d), peft_adapter_with_random_weights(base, str(d), seed=100 + i, **kw))
    llm = LLM(model=path, dtype="float32", device="cuda", lora_config=LoraConfig(max_lora_rank=16, max_loras=3))
    reqs = [None] + [LoRARequest(n, i + 1, d) for i, (n, (d, _)) in enumerate(adapters.items())]
    prompts = [p for p in PROMPTS for _ in reqs]
    loras = [r for _ in PROMPTS for r in reqs]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), lora_request=loras)
    for prompt, lora, out in zip(prompts, loras, outs):
        ref_model = base if lora is None else adapters[lora.lora_name][1]
        assert out.outputs[0].token_ids == peft_greedy(ref_model, prompt, 8), lora and lora.lora_name


def test_graphed_engines_one_after_another_in_one_process(tiny_llama, tmp_path):
    """Three graphed engines with adapters, built one after another in one process: each later one gets
    memory the caching allocator handed back from the one before (not zeroed). Its decode-graph warm-up
    must wait for its own static buffers' fills (block tables, slots): once it did not, and the second
    engine faulted (an out-of-bounds gather on stale block-table values) or decoded garbage."""
    import gc

    path, base = tiny_llama
    d = tmp_path / "a"
    adapter = peft_adapter_with_random_weights(base, str(d), seed=7, **next(iter(ADAPTERS.values())))
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    loras = [None, LoRARequest("a", 1, str(d))] * len(PROMPTS)
    prompts = [q for q in PROMPTS for _ in range(2)]
    want = [peft_greedy(base if r is None else adapter, q, 8) for q, r in zip(prompts, loras)]
    for _ in range(3):
        llm = LLM(model=path, dtype="float32", device="cuda", lora_config=LoraConfig(max_lora_rank=16, max_loras=2))
        assert llm.engine.runner.graph_runner is not None
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, p, lora_request=loras)]
        assert got == want
        llm.shutdown()
        del llm
        gc.collect()
