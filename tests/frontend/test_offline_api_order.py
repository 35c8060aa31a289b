"""The offline LLM works in any order (issue 13.7): generate / chat after generate_async, generate while
async streams are running, and generate_async again afterwards; greedy results equal a fresh LLM's."""
from __future__ import annotations

import asyncio

import pytest

from loraserve import LLM, SamplingParams
from tests.inference.conftest import make_random_model

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = ["The quick brown", "def main():"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("order"))
    make_random_model(path, "llama")
    return path


async def collect(llm, prompt, params=GREEDY):
    last = None
    async for out in llm.generate_async(prompt, params, streaming=True):
        last = out
    return last


def test_generate_and_chat_after_generate_async(model_dir):
    reference = [o.outputs[0].token_ids for o in LLM(model_dir, device="cpu", dtype="float32").generate(PROMPTS, GREEDY)]
    with LLM(model_dir, device="cpu", dtype="float32") as llm:
        first = asyncio.run(collect(llm, PROMPTS[0]))
        assert first.outputs[0].token_ids == reference[0]
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference  # raised RuntimeError before
        chat = llm.chat([{"role": "user", "content": "hi"}], GREEDY)
        assert len(chat.outputs[0].token_ids) == GREEDY.max_tokens
        again = asyncio.run(collect(llm, PROMPTS[1]))  # and back to async
        assert again.outputs[0].token_ids == reference[1]
        assert llm.generate(PROMPTS[0], GREEDY).outputs[0].token_ids == reference[0]


def test_generate_while_async_streams_run(model_dir):
    reference = LLM(model_dir, device="cpu", dtype="float32").generate(PROMPTS, GREEDY)
    with LLM(model_dir, device="cpu", dtype="float32") as llm:
        async def main():
            long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
            agen = llm.generate_async(PROMPTS[0], long, streaming=True)
            await agen.__anext__()  # a stream is active on the engine thread
            outs = llm.generate(PROMPTS, GREEDY)  # served by the same engine thread, next to the stream
            rest = [o async for o in agen]
            return outs, rest[-1]

        outs, streamed = asyncio.run(main())
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
        assert streamed.finished and len(streamed.outputs[0].token_ids) == 40
