"""A server whose model has no chat template, whose registry is down, and which wants a bearer token."""
from __future__ import annotations

import socket

import openai
import pytest

from loraserve import LLM, SamplingParams
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference

from .conftest import LLM_KWARGS


def dead_address() -> str:
    with socket.socket() as s:  # a port nobody listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def degraded(tmp_path_factory, plain_model):
    root = tmp_path_factory.mktemp("degraded")
    model = plain_model
    cfg = ServeConfig(model=model, port=0, openai_port=0, registry_address=dead_address(), registry_timeout_s=5,
                      adapter_cache_dir=str(root / "cache"), auth_token="s3cret", llm_kwargs=dict(LLM_KWARGS))
    with RunningInference(cfg) as srv:
        url = f"http://127.0.0.1:{srv.running.openai.port}/v1"
        yield dict(model=model, url=url, client=openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0))


def test_bearer_token_required(degraded):
    bad = openai.OpenAI(base_url=degraded["url"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="default", prompt="hi", max_tokens=2)
    assert degraded["client"].models.list().data


def test_chat_without_template_uses_plain_fallback(degraded):
    messages = [{"role": "user", "content": "The lazy dog"}]
    resp = degraded["client"].chat.completions.create(model="default", messages=messages, max_tokens=8,
                                                      temperature=0, extra_body={"ignore_eos": True})
    llm = LLM(model=degraded["model"], **LLM_KWARGS)
    fallback = "user: The lazy dog\nassistant:"  # the documented plain format
    ref = llm.generate(fallback, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).outputs[0]
    assert resp.choices[0].message.content == ref.text
    assert resp.usage.prompt_tokens == len(llm.tokenizer.encode(fallback))


def test_registry_down(degraded):
    client = degraded["client"]
    assert [m.id for m in client.models.list().data] == [degraded["model"]]  # base model still listed
    with pytest.raises(openai.APIStatusError) as exc:
        client.completions.create(model="some-adapter", prompt="hi", max_tokens=2)
    assert exc.value.status_code == 503 and "registry" in exc.value.body["message"]
    assert client.completions.create(model="default", prompt="hi", max_tokens=2).choices  # base still served
