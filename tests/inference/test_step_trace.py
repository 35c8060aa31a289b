"""engine.step_trace (issue 11's per-step breakdown in bench_e2e): one StepRecord per step() call whose
kinds, token counts and timestamps agree with the batches the scheduler actually ran."""
from __future__ import annotations

import pytest

from benchmarks.e2e_steps import step_breakdown
from loraserve import SamplingParams
from loraserve.config import EngineConfig
from loraserve.inference.engine import LLMEngine, step_kind


def test_step_kind():
    assert step_kind([1, 1, 1]) == "decode"
    assert step_kind([5, 7]) == "prefill"
    assert step_kind([1, 40, 1]) == "mixed"


@pytest.mark.parametrize("overlap", [False, True])
def test_trace_matches_the_batches(tiny_llama, overlap):
    engine = LLMEngine(EngineConfig(model=tiny_llama[0], dtype="float32", device="cpu", async_scheduling=overlap,
                                    max_num_prefill_tokens_with_decode=16))
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    seen = []                                   # (kind, tokens) of every batch scheduled, from the scheduler
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        seen.append((step_kind(batch.num_new_tokens), batch.num_tokens) if batch else (None, 0))
        return batch
    engine.scheduler.schedule = spy
    engine.step_trace = trace = []
    engine.add_request("a", list(range(5, 25)), p)
    for _ in range(3):
        engine.step()
    engine.add_request("b", list(range(30, 70)), p)        # a 40-token prompt joins a decoding request
    while engine.has_unfinished_requests():
        engine.step()
    assert [(r.kind, r.num_tokens) for r in trace] == seen
    assert {"prefill", "mixed", "decode"} <= {r.kind for r in trace}
    kinds, done = [r.kind for r in trace], [r.done_kind for r in trace]
    # serial: a step waits for its own batch; overlapped: for the one the previous step launched
    assert done == ([None] + kinds[:-1] if overlap else kinds)
    for a, b in zip(trace, trace[1:]):
        assert a.start <= a.launched_at <= a.end <= b.start and a.wait_s >= 0
    b = step_breakdown(trace)
    assert b["steps"] == len(trace) == sum(b[k]["count"] for k in ("decode", "mixed", "prefill") if k in b) + \
        sum(r.kind is None for r in trace)
