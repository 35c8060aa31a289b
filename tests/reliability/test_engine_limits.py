"""Parameters at the edge of their types must be refused up front or served, never fail an
engine step (which would take co-batched requests down); a failed step tells clients a log
reference, not the exception text."""
from __future__ import annotations

import asyncio

import pytest

from loraserve import LLM, SamplingParams
from loraserve.inference.async_llm import AsyncLLM, EngineStepError


@pytest.mark.parametrize("kw", [dict(seed=2**63), dict(seed=-2**63 - 1), dict(top_k=2**31), dict(top_k=10**30),
                                dict(min_tokens=2**31)])
def test_out_of_range_sampling_params_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_seed_at_int64_edge_with_n_completions(tiny_llama):
    llm = LLM(model=tiny_llama[0], dtype="float32", device="cpu")
    out = llm.generate([list(range(5, 15))], SamplingParams(max_tokens=4, temperature=1.0, seed=2**63 - 1, n=3,
                                                            ignore_eos=True))
    assert [len(c.token_ids) for c in out[0].outputs] == [4, 4, 4]


def test_failed_step_reports_a_reference_not_the_exception(tiny_llama):
    llm = LLM(model=tiny_llama[0], dtype="float32", device="cpu")
    engine = llm.engine
    secret = "client-controlled text 1234"

    def broken_run(*args, **kwargs):
        raise ValueError(secret)

    aio = AsyncLLM(engine)
    try:
        original = engine.runner.run
        engine.runner.run = broken_run

        async def gen():
            async for _ in aio.generate(list(range(5, 15)), SamplingParams(max_tokens=3, ignore_eos=True)):
                pass
        with pytest.raises(EngineStepError) as err:
            asyncio.run(gen())
        assert secret not in str(err.value) and "reference" in str(err.value)
        engine.runner.run = original
        assert aio.is_alive
    finally:
        aio.shutdown()
