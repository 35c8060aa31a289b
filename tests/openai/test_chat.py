"""/v1/chat/completions: the model's chat template, streaming deltas, usage; offline engine as reference."""
from __future__ import annotations

from loraserve import SamplingParams

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The lazy dog"}]
# CHAT_TEMPLATE (conftest) applied by hand: the independent expectation of the prompt.
EXPECTED_PROMPT = "<s>system\nBe brief.</s>\n<s>user\nThe lazy dog</s>\n<s>assistant\n"


def test_chat_uses_template_and_matches_offline(client, offline):
    resp = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    ref = offline.generate(EXPECTED_PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)).outputs[0]
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(offline.tokenizer.encode(EXPECTED_PROMPT))
    assert resp.usage.completion_tokens == 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 10


def test_chat_content_parts_and_max_completion_tokens(client):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             MESSAGES[1]]
    a = client.chat.completions.create(model="default", messages=parts, max_completion_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    b = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == 7


def test_chat_streaming(client):
    messages = MESSAGES[1:]  # this one's greedy reply decodes to several deltas
    kw = dict(model="default", messages=messages, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert content == full.choices[0].message.content
    assert sum(1 for c in with_choices if c.choices[0].delta.content) >= 2, [c.choices[0].delta.content for c in with_choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_seeded_sampling_reproducible(client):
    kw = dict(model="default", messages=MESSAGES, max_tokens=12, temperature=0.9, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b
