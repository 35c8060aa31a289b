"""The last layer's MLP runs only on the rows the runner samples (models/llama.py LAST_LAYER_ROWS): outputs
must equal the every-row model (fp32, CPU; HF agreement is test_engine_vs_hf.py's), and the MLP must really
see one row per sequence in a prompt step."""
from __future__ import annotations

import pytest
import torch

from loraserve import LLM, SamplingParams
from loraserve.inference.models import llama

PROMPTS = [list(range(20, 57)), [5, 6, 7], [3] * 17, [9]]


def _generate(llm, monkeypatch, on: bool):
    monkeypatch.setattr(llama, "LAST_LAYER_ROWS", on)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    return llm.generate(PROMPTS, params)


def test_last_rows_equal_every_row(tiny_llama, monkeypatch) -> None:
    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", max_num_tokens=64)
    rows_seen = []
    hook = llm.engine.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[0]))
    try:
        full = _generate(llm, monkeypatch, False)
        n_full = list(rows_seen)
        rows_seen.clear()
        last = _generate(llm, monkeypatch, True)
    finally:
        hook.remove()
    # the prompt step: 37 + 3 + 17 + 1 = 58 rows through the MLP with every row, 4 (one per sequence) without
    assert n_full[0] == sum(map(len, PROMPTS)) and rows_seen[0] == len(PROMPTS), (n_full[:3], rows_seen[:3])
    for a, b in zip(full, last):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   rtol=1e-5, atol=1e-5)


def test_chunked_prompt_keeps_every_sequence(tiny_llama, monkeypatch) -> None:
    """Prompts cut into chunks (token budget 16): a chunk that does not end its prompt samples nothing, its
    last row still runs; the tokens equal the every-row model's."""
    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", max_num_tokens=16)
    full = _generate(llm, monkeypatch, False)
    last = _generate(llm, monkeypatch, True)
    assert [o.outputs[0].token_ids for o in full] == [o.outputs[0].token_ids for o in last]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_last_rows_gpu_bf16(tiny_llama, monkeypatch) -> None:
    """The CUDA engine (Triton kernels, bf16): the prompt step's MLP sees one row per sequence, and the
    first tokens' logprobs match the every-row model within bf16 noise (GEMMs of 4 vs 58 rows round apart)."""
    path, _ = tiny_llama
    llm = LLM(model=path, dtype="bfloat16", device="cuda", max_num_tokens=64, enforce_eager=True)
    rows_seen = []
    hook = llm.engine.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[0]))
    try:
        full = _generate(llm, monkeypatch, False)
        rows_seen.clear()
        last = _generate(llm, monkeypatch, True)
    finally:
        hook.remove()
    assert rows_seen[0] == len(PROMPTS), rows_seen[:3]
    first = lambda outs: torch.tensor([o.outputs[0].logprobs[0] for o in outs])   # noqa: E731
    torch.testing.assert_close(first(last), first(full), rtol=3e-2, atol=5e-2)
