"""/v1/completions through the real `openai` client, checked against the offline engine."""
from __future__ import annotations

import pytest

from loraserve import SamplingParams

PROMPT = "The quick brown fox"


def greedy_ref(offline, prompt, max_tokens, lora=None, **kw):
    return offline.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **kw),
                            lora_request=lora).outputs[0]


def test_greedy_matches_offline_engine_with_usage(client, offline):
    resp = client.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    ref = greedy_ref(offline, PROMPT, 12, ignore_eos=True)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert len(resp.choices) == 1
    assert resp.choices[0].text == ref.text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))
    assert resp.usage.completion_tokens == len(ref.token_ids) == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_streaming_concatenates_to_non_streaming(client):
    kw = dict(model="default", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2  # really streamed, not one blob
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_token_id_prompts_batches_and_echo(client, offline):
    ids = offline.tokenizer.encode(PROMPT)
    other = offline.tokenizer.encode("Hello world")
    resp = client.completions.create(model="default", prompt=[ids, other], max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].text == greedy_ref(offline, ids, 6, ignore_eos=True).text
    assert resp.choices[1].text == greedy_ref(offline, other, 6, ignore_eos=True).text
    assert resp.usage.prompt_tokens == len(ids) + len(other)
    assert resp.usage.completion_tokens == 12
    texts = client.completions.create(model="default", prompt=[PROMPT, "Hello world"], max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in texts.choices] == [c.text for c in resp.choices]
    echoed = client.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + resp.choices[0].text


def _stop_candidate(text: str) -> str:
    """A printable substring of `text` that first occurs after its start (longest of 6/2/1 chars)."""
    for size in (6, 2, 1):
        for k in range(1, len(text) - size):
            cand = text[k:k + size]
            if "\ufffd" not in cand and cand.isprintable() and cand.strip() and text.find(cand) >= 1:
                return cand
    pytest.skip(f"no stop candidate in {text!r}")


@pytest.mark.parametrize("prompt", ["The lazy dog", "def main():"])
def test_stop_string(client, offline, prompt):
    ref = greedy_ref(offline, prompt, 24, ignore_eos=True).text
    stop = _stop_candidate(ref)
    resp = client.completions.create(model="default", prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == ref[:ref.find(stop)]
    assert resp.usage.completion_tokens < 24
    streamed = client.completions.create(model="default", prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref[:ref.find(stop)]


def test_seed_reproducible_and_matches_offline(client, offline):
    kw = dict(model="default", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.95,
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    c = client.completions.create(seed=4321, **kw).choices[0].text
    assert a == b
    assert a != c
    ref = offline.generate(PROMPT, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234,
                                                  ignore_eos=True)).outputs[0].text
    assert a == ref


def test_n_choices_streamed_interleaved(client):
    chunks = list(client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3,
                                            seed=5, stream=True, extra_body={"ignore_eos": True}))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)}
    full = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=5,
                                     extra_body={"ignore_eos": True})
    assert {c.index: c.text for c in full.choices} == texts
    assert len(set(texts.values())) > 1  # choice j uses seed + j
    assert full.usage.completion_tokens == 24
