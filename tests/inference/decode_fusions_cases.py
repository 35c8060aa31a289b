"""The engine's CUDA-only glue of the decode fusions (RoPE + K/V write kernel then attention over the
cache, the GEMV for 1-4 rows, fused greedy sampling in the sampler) run on the CPU: the Triton kernels
through the interpreter (a TRITON_INTERPRET=1 worker, see test_decode_fusions_interp.py), the CUDA checks
patched open. Greedy tokens must equal HF transformers'."""
from __future__ import annotations

import tempfile

import torch


def check_fused_engine_vs_hf() -> None:
    from loraserve import LLM, SamplingParams
    from loraserve.inference import sampler
    from loraserve.inference.models import llama
    from tests.inference.conftest import make_random_model

    d = tempfile.mkdtemp(prefix="fused-interp-")
    hf = make_random_model(d, "llama", num_hidden_layers=1)
    llama._fused = lambda x: True                       # the CUDA path's kernels, interpreted
    llama.FUSED_ROPE_KV = True
    llama.Proj._gemv_ok = lambda self, x: 0 < x.shape[0] <= 4
    sampler._fused_greedy_ok = lambda logits: True
    import loraserve.kernels.greedy as greedy

    greedy.CHUNK = 128                                  # several vocabulary chunks per row (V = 320)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    llm = LLM(model=d, dtype="float32", device="cpu")
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0,
                                                                                 ignore_eos=True))]
    for prompt, toks in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert toks == ref, (prompt, toks, ref)
