"""The engine on CUDA with the decode-step fusions on (RoPE + KV write in one kernel, the GEMV for 1-4
tokens, programmatic dependent launch, fused greedy sampling): greedy tokens equal HF transformers'
(fp32, CUDA-graph decode at batch 1 and 4, prefill eager) and equal the engine without the fusions."""
from __future__ import annotations

import pytest
import torch

from loraserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 57)), [3] * 17]


@pytest.fixture
def fusions_on(monkeypatch):
    from loraserve.inference.models import llama

    monkeypatch.setattr(llama, "FUSED_ROPE_KV", True)
    monkeypatch.setattr(llama, "GEMV_MAX_M", 4)
    monkeypatch.setenv("LORASERVE_PDL", "1")
    monkeypatch.setenv("LORASERVE_FUSED_GREEDY", "1")   # kernels/greedy.py in the sampler


def test_fused_decode_matches_hf(tiny_llama, fusions_on):
    path, hf = tiny_llama
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    llm = LLM(model=path, dtype="float32", device="cuda")
    assert llm.engine.runner.graph_runner is not None
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, p)]   # decode graphs at batch 4
    single = [llm.generate([PROMPTS[0]], p)[0].outputs[0].token_ids]      # and at batch 1
    for prompt, toks in zip(PROMPTS, batched):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert toks == ref
    assert single[0] == batched[0]


def test_fused_bf16_close_to_unfused(tiny_llama, monkeypatch):
    """bf16: the fused engine's first-step logits equal the unfused engine's within bf16 rounding."""
    from loraserve.inference.models import llama

    path, _ = tiny_llama
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    monkeypatch.setattr(llama, "FUSED_ROPE_KV", False)   # the engine before the fusions
    monkeypatch.setattr(llama, "GEMV_MAX_M", 0)
    monkeypatch.setenv("LORASERVE_PDL", "0")
    monkeypatch.setenv("LORASERVE_FUSED_GREEDY", "0")
    plain = LLM(model=path, dtype="bfloat16", device="cuda").generate(PROMPTS, p)
    monkeypatch.setattr(llama, "FUSED_ROPE_KV", True)
    monkeypatch.setattr(llama, "GEMV_MAX_M", 4)
    monkeypatch.setenv("LORASERVE_PDL", "1")
    monkeypatch.setenv("LORASERVE_FUSED_GREEDY", "1")
    fused = LLM(model=path, dtype="bfloat16", device="cuda").generate(PROMPTS, p)
    agree = sum(a.outputs[0].token_ids[:3] == b.outputs[0].token_ids[:3] for a, b in zip(plain, fused))
    assert agree >= len(PROMPTS) - 1, (agree, [o.outputs[0].token_ids for o in plain], [o.outputs[0].token_ids for o in fused])
