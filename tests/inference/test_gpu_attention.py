"""The engine on CUDA with every step's attention in the one-launch paged kernel
(kernels/unified_attention.py): whole prompts, chunked prefill over cached prefixes, mixed
prefill + decode steps and decode, eagerly (no CUDA graphs), against HF transformers greedy.
"""
from __future__ import annotations

import pytest
import torch

from loraserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 57)), [3] * 17, list(range(100, 190))]


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("max_num_tokens", [8192, 13])  # 13: prompts arrive in chunks next to decode rows
def test_kernel_attention_matches_transformers(tiny_llama, max_num_tokens):
    from loraserve.inference.attention import DECODE_KERNEL, _use_kernel

    path, hf = tiny_llama
    assert _use_kernel(torch.empty(1, device="cuda")) and DECODE_KERNEL == "unified"
    llm = LLM(model=path, dtype="float32", device="cuda", enforce_eager=True, max_num_tokens=max_num_tokens)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, 12), prompt[:5]
