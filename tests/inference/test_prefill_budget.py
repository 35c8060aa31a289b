"""Prefill while decoding (issue 11, TPOT): a step that carries decode rows takes at most
max_num_prefill_tokens_with_decode prompt tokens, so a long prompt arriving while streams decode is
cut into chunks under that budget; greedy outputs stay those of HF transformers (the independent
reference) and of the uncapped engine, in both the serial and the overlapped loop."""
from __future__ import annotations

import pytest

from loraserve import SamplingParams
from loraserve.config import EngineConfig
from loraserve.inference.engine import LLMEngine

from tests.inference.test_engine_vs_hf import hf_greedy

SHORT = [[5, 6, 7], [40, 41, 42, 43], [9] * 6]
LONG = list(range(20, 20 + 150))       # 150 prompt tokens arriving while the short ones decode
CAP = 16


def run(path: str, cap: int | None, overlap: bool) -> tuple[dict[str, list[int]], list[tuple[int, int]]]:
    """-> (token ids per request, [(decode rows, prompt tokens)] of every step that ran)."""
    engine = LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32", max_num_tokens=256,
                                    max_num_prefill_tokens_with_decode=cap, async_scheduling=overlap))
    steps: list[tuple[int, int]] = []
    schedule = engine.scheduler.schedule

    def recorded():
        batch = schedule()
        prompt_rows = [n for s, n in zip(batch.seqs, batch.num_new_tokens) if n > 1]
        steps.append((len(batch.seqs) - len(prompt_rows), sum(prompt_rows)))
        return batch
    engine.scheduler.schedule = recorded
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for i, ids in enumerate(SHORT):
        engine.add_request(f"s{i}", ids, greedy)
    tokens: dict[str, list[int]] = {}
    for n in range(200):
        if n == 3:      # the short requests are decoding now
            engine.add_request("long", LONG, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        if not engine.has_unfinished_requests():
            break
    return tokens, steps


@pytest.mark.parametrize("overlap", [False, True])
def test_long_prompt_is_chunked_under_the_budget_while_decoding(tiny_llama, overlap):
    path, hf = tiny_llama
    capped, steps = run(path, CAP, overlap)
    uncapped, free_steps = run(path, None, overlap)
    # with decodes running, no step carried more than CAP prompt tokens, and the long prompt took
    # at least ceil(150 / CAP) such steps; uncapped, it went in at once beside the decodes
    mixed = [p for d, p in steps if d > 0 and p > 0]
    assert mixed and max(mixed) <= CAP
    assert sum(1 for d, p in steps if p > 0 and d > 0) >= -(-len(LONG) // CAP)
    assert max(p for d, p in free_steps if d > 0) == len(LONG)
    # greedy outputs: identical to the uncapped engine and to HF transformers
    assert capped == uncapped
    for rid, prompt, n in [("long", LONG, 12)] + [(f"s{i}", p, 30) for i, p in enumerate(SHORT)]:
        assert capped[rid] == hf_greedy(hf, prompt, n)[0], rid


def test_budget_off_without_decodes_and_validated(tiny_llama):
    path, _ = tiny_llama
    engine = LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32", max_num_tokens=256,
                                    max_num_prefill_tokens_with_decode=CAP))
    engine.add_request("a", LONG, SamplingParams(max_tokens=2, temperature=0))
    batch = engine.scheduler.schedule()       # nothing decodes yet: the whole max_num_tokens budget
    assert batch.num_new_tokens == [len(LONG)]
    with pytest.raises(ValueError, match="max_num_prefill_tokens_with_decode"):
        EngineConfig(model=path, max_num_prefill_tokens_with_decode=0)
