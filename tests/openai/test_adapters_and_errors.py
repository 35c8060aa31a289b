"""Adapter choice (registry name in `model`, TensorRT-LLM lora_request in extra_body), /v1/models,
and OpenAI error classes for bad requests, all through the real `openai` client."""
from __future__ import annotations

import concurrent.futures
import time

import openai
import pytest

from loraserve import LoRARequest, SamplingParams

PROMPT = "The quick brown fox"


def complete(client, **kw):
    args = dict(model="default", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    args.update(kw)
    return client.completions.create(**args).choices[0].text


def offline_text(offline, lora=None):
    return offline.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                            lora_request=lora).outputs[0].text


def test_lora_request_in_extra_body(client, offline, oai_stack):
    lora = {"lora_name": "local", "lora_int_id": 3, "lora_path": oai_stack["local"]}
    got = complete(client, extra_body={"ignore_eos": True, "lora_request": lora})
    assert got == offline_text(offline, LoRARequest("local", 3, oai_stack["local"]))
    assert got != offline_text(offline)  # the adapter really changes the output
    streamed = client.completions.create(model="default", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True, "lora_request": lora})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == got


@pytest.mark.parametrize("model", ["alpha", "alpha:1", "alpha:latest"])
def test_registry_adapter_by_model_name(client, offline, oai_stack, model):
    assert complete(client, model=model) == offline_text(offline, LoRARequest("alpha", 1, oai_stack["alpha"]))


def test_models_lists_base_and_registry_adapters(client, oai_stack):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == oai_stack["model"]
    assert "alpha" in ids


def test_concurrent_requests_different_adapters(oai_stack, offline):
    client = oai_stack["client"]
    local = {"lora_name": "local", "lora_int_id": 3, "lora_path": oai_stack["local"]}
    jobs = [dict(), dict(model="alpha"), dict(extra_body={"ignore_eos": True, "lora_request": local}),
            dict(model="alpha"), dict()] * 2
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda kw: complete(client, **kw), jobs))
    expected = {None: offline_text(offline), "alpha": offline_text(offline, LoRARequest("alpha", 1, oai_stack["alpha"])),
                "local": offline_text(offline, LoRARequest("local", 3, oai_stack["local"]))}
    for kw, text in zip(jobs, got):
        key = kw.get("model") or ("local" if "extra_body" in kw else None)
        assert text == expected[key], kw


@pytest.mark.parametrize("kw,error", [
    (dict(model="no-such-adapter"), openai.NotFoundError),
    (dict(model="alpha:99"), openai.NotFoundError),
    (dict(extra_body={"lora_request": {"lora_name": "ghost", "lora_int_id": 424242}}), openai.NotFoundError),
    (dict(temperature=-1), openai.BadRequestError),
    (dict(top_p=2.0), openai.BadRequestError),
    (dict(max_tokens=0), openai.BadRequestError),
    (dict(n=0), openai.BadRequestError),
    (dict(presence_penalty=0.5), openai.BadRequestError),
    (dict(extra_body={"no_such_param": 1}), openai.BadRequestError),
    (dict(prompt=[10 ** 6]), openai.BadRequestError),
    (dict(prompt="x " * 600), openai.BadRequestError),
    (dict(extra_body={"lora_request": {"lora_name": "", "lora_int_id": 1}}), openai.BadRequestError),
])
@pytest.mark.parametrize("stream", [False, True])
def test_errors_have_openai_classes(client, kw, error, stream):
    args = dict(model="default", prompt=PROMPT, max_tokens=4, temperature=0, stream=stream)
    args.update(kw)
    with pytest.raises(error) as exc:
        resp = client.completions.create(**args)
        if stream:
            list(resp)
    assert exc.value.body["message"]  # OpenAI's error shape: {"error": {"message", "type", ...}}
    assert exc.value.body["type"] in ("invalid_request_error", "not_found_error")
    assert complete(client, max_tokens=2)  # still serving


def test_lora_path_outside_allowed_dirs_is_permission_denied(client, oai_stack):
    lora = {"lora_name": "outside", "lora_int_id": 9, "lora_path": oai_stack["outside"]}
    with pytest.raises(openai.PermissionDeniedError) as exc:
        complete(client, extra_body={"lora_request": lora})
    assert "allowed" in exc.value.body["message"]


def test_chat_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       stream=True)


def test_client_disconnect_aborts_request(client, oai_stack):
    core = oai_stack["srv"].core
    aborted = core.requests_aborted
    stream = client.completions.create(model="default", prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        stats = core.server_stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and core.requests_aborted > aborted:
            break
        time.sleep(0.05)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["free_kv_blocks"] == stats["total_kv_blocks"]
    assert core.requests_aborted > aborted
