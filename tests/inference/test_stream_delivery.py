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


@pytest.mark.parametrize("overlap", [False, True])
def test_stream_interval_hands_out_every_nth_token(tiny_llama, overlap):
    """stream_interval=4 (TensorRT-LLM's key): a stream gets its first token at once, then outputs at
    4, 8, ... tokens and the last; the tokens and text are those of the offline engine (interval 1)."""
    path, _ = tiny_llama
    params = [SamplingParams(max_tokens=8 + 5 * i, temperature=0, ignore_eos=True) for i in range(len(PROMPTS))]
    reference = LLM(model=path, dtype="float32", device="cpu").generate(PROMPTS, params)
    llm = LLM(model=path, dtype="float32", device="cpu", async_scheduling=overlap, stream_interval=4)

    async def one(prompt, p):
        return [out async for out in llm.generate_async(prompt, p, streaming=True)]

    async def main():
        return await asyncio.gather(*(one(pr, p) for pr, p in zip(PROMPTS, params)))
    try:
        streams = asyncio.run(main())
        offline = llm.generate(PROMPTS, params)   # the offline API under the same setting
    finally:
        llm.shutdown()
    for messages, ref, off in zip(streams, reference, offline):
        last = messages[-1].outputs[0]
        assert last.token_ids == ref.outputs[0].token_ids == off.outputs[0].token_ids
        assert last.text == ref.outputs[0].text
        assert [t for m in messages for t in m.outputs[0].token_ids_diff] == last.token_ids
        assert "".join(m.outputs[0].text_diff for m in messages) == last.text
        ends = [len(m.outputs[0].token_ids) for m in messages[:-1]]
        assert ends and ends[0] == 1 and all(n % 4 == 0 for n in ends[1:]), ends
        assert len(messages) <= 2 + len(last.token_ids) // 4


def test_stream_interval_option_checked():
    from loraserve.config import engine_config_from_kwargs

    assert engine_config_from_kwargs("m", stream_interval=8).stream_interval == 8
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="stream_interval"):
            engine_config_from_kwargs("m", stream_interval=bad)


def test_stream_interval_from_the_cli_and_yaml(tmp_path):
    from loraserve.cli import build_parser
    from loraserve.inference.serve_config import load_serve_config

    args = build_parser().parse_args(["serve", "--stream-interval", "6", "--device", "cpu"])
    assert args.stream_interval == 6
    yaml_file = tmp_path / "extra.yaml"
    yaml_file.write_text("stream_interval: 3\n")
    assert load_serve_config([str(yaml_file)], {}).llm_kwargs["stream_interval"] == 3
    assert load_serve_config([str(yaml_file)], {"stream_interval": 6}).llm_kwargs["stream_interval"] == 6
