"""OpenAI `logprobs` (completions: top-N legacy object; chat: logprobs + top_logprobs),
checked against the offline engine's logprobs (themselves checked against transformers)."""
from __future__ import annotations

import openai
import pytest

from loraserve import SamplingParams

PROMPT = "The quick brown fox"


def test_completions_logprobs(client, offline):
    resp = client.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})
    ref = offline.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)).outputs[0]
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert lp.tokens == [offline.tokenizer.decode([t]) for t in ref.token_ids]
    assert len(lp.tokens) == resp.usage.completion_tokens == 6
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(1 <= len(d) <= 2 for d in lp.top_logprobs)  # two ids may decode to the same string
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the chosen token is the top one


def test_chat_logprobs(client, offline):
    resp = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 5 == resp.usage.completion_tokens
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
        assert bytes(c.bytes).decode() == c.token
    plain = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logprobs_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt=PROMPT, max_tokens=2, logprobs=50)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       top_logprobs=2)
