"""LLMEngine.reset_prefix_cache (vLLM's name): after it, a repeated prompt is computed in full (no block
reused), and its greedy output is unchanged; refused while a request holds blocks."""
from __future__ import annotations

from loraserve import SamplingParams
from loraserve.config import EngineConfig
from loraserve.inference.engine import LLMEngine


def run(engine: LLMEngine, rid: str, prompt: list[int]) -> list[int]:
    engine.add_request(rid, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    return out.outputs[0].token_ids


def test_reset_prefix_cache(tiny_llama):
    path, _ = tiny_llama
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", device="cpu"))
    prompt = list(range(3, 3 + 70))             # 4 full blocks of 16
    first = run(engine, "a", prompt)
    assert engine.stats()["reused_kv_blocks"] == 0
    assert run(engine, "b", prompt) == first
    reused = engine.stats()["reused_kv_blocks"]
    assert reused == 4                           # the repeat found its prefix
    engine.add_request("busy", prompt, SamplingParams(max_tokens=4))
    engine.step()
    assert engine.reset_prefix_cache() is False  # a request holds blocks: nothing dropped
    while engine.has_unfinished_requests():
        engine.step()
    before = engine.stats()["reused_kv_blocks"]
    assert engine.reset_prefix_cache() is True
    assert run(engine, "c", prompt) == first     # computed in full: same tokens
    assert engine.stats()["reused_kv_blocks"] == before   # no block reused
