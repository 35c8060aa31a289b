"""AsyncLLM hands step N's stream messages to the event loop once step N+1 is launched (engine.on_launched),
and everything at once when the engine goes idle: every stream still gets each token once, in order,
ending with the same output as the offline engine (the reference: LLM.generate on a fresh engine)."""
from __future__ import annotations

import asyncio

import pytest

from loraserve import LLM, SamplingParams

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 23, 5)]


@pytest.mark.parametrize("overlap", [False, True])
def test_streams_get_every_token_once_in_order(tiny_llama, overlap):
    path, _ = tiny_llama
    params = [SamplingParams(max_tokens=8 + 5 * i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    reference = LLM(model=path, dtype="float32", device="cpu").generate(PROMPTS, params)
    llm = LLM(model=path, dtype="float32", device="cpu", async_scheduling=overlap)

    async def one(prompt, p):
        messages = []
        async for out in llm.generate_async(prompt, p, streaming=True):
            messages.append(out)
        return messages

    async def main():
        return await asyncio.gather(*(one(pr, p) for pr, p in zip(PROMPTS, params)))
    try:
        streams = asyncio.run(main())
    finally:
        llm.shutdown()
    for messages, ref in zip(streams, reference):
        last = messages[-1].outputs[0]
        assert messages[-1].finished and not any(m.finished for m in messages[:-1])
        assert last.token_ids == ref.outputs[0].token_ids and last.text == ref.outputs[0].text
        assert [t for m in messages for t in m.outputs[0].token_ids_diff] == last.token_ids
        assert "".join(m.outputs[0].text_diff for m in messages) == last.text
        assert len(messages) > 1          # streamed, not handed over in one piece at the end
