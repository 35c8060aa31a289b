"""Mixed steps (prompt chunks + decode rows) replayed from CUDA graphs (mixed_graphs.py) against eager
steps and HF: the same greedy tokens, with graphs actually replayed, for every step kind of a staggered
load (prefill-only, mixed with padding sequences, decode)."""
from __future__ import annotations

import pytest
import torch

from loraserve import SamplingParams
from loraserve.config import EngineConfig
from loraserve.inference.engine import LLMEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [list(range(20, 57)), [5, 6, 7, 8, 9], [3] * 70, list(range(100, 133)), [10, 11], list(range(40, 140))]


def staggered(engine: LLMEngine, steps_between: int = 3) -> dict[str, list[int]]:
    """A new request every few steps, so that prompt chunks ride with running decodes."""
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    done: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, p)
        for _ in range(steps_between):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_graphs_match_eager_and_hf(tiny_llama, monkeypatch, overlap):
    path, hf = tiny_llama
    cfg = dict(model=path, dtype="float32", device="cuda", async_scheduling=overlap, max_num_prefill_tokens_with_decode=48)
    monkeypatch.setenv("LORASERVE_MIXED_GRAPHS", "1")
    graphed = LLMEngine(EngineConfig(**cfg))
    assert graphed.runner.mixed_graphs is not None
    a = staggered(graphed)
    assert graphed.runner.mixed_graphs.num_replays > 0
    monkeypatch.setenv("LORASERVE_MIXED_GRAPHS", "0")
    eager = LLMEngine(EngineConfig(**cfg))
    assert eager.runner.mixed_graphs is None
    b = staggered(eager)
    assert a == b
    for i, prompt in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert a[f"r{i}"] == ref
