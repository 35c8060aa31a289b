"""A real inference server (gRPC + OpenAI HTTP front on port 0) on a tiny random Llama, a real
registry holding one adapter, the real `openai` client, and the offline engine as reference."""
from __future__ import annotations

import json
import os
import shutil

import openai
import pytest

from loraserve import LLM, LoraConfig
from loraserve.adapters.testing import make_peft_adapter
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry
from tests.inference.conftest import make_random_model

# A chat template of our own, so that tests can write the expected prompt by hand.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
LLM_KWARGS = dict(dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8, max_loras=2))


@pytest.fixture(scope="session")
def plain_model(tmp_path_factory) -> str:
    """The tiny random Llama; its tokenizer_config.json has no chat template."""
    path = str(tmp_path_factory.mktemp("plain_model"))
    make_random_model(path, "llama")
    return path


def with_chat_template(src: str, dest: str, chat_template: str) -> str:
    shutil.copytree(src, dest)
    cfg_path = os.path.join(dest, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = chat_template
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return dest


@pytest.fixture(scope="session")
def oai_stack(tmp_path_factory, plain_model):
    root = tmp_path_factory.mktemp("oai")
    model = with_chat_template(plain_model, str(root / "model"), CHAT_TEMPLATE)
    allowed = root / "allowed"
    local = str(make_peft_adapter(allowed / "local", seed=7, r=4))
    alpha = str(make_peft_adapter(root / "src" / "alpha", seed=11, r=8, modules=("q_proj", "v_proj", "o_proj")))
    outside = str(make_peft_adapter(root / "outside", seed=13, r=4))
    with RunningRegistry(RegistryConfig(data_dir=root / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(alpha, "alpha", base_model="tiny")
        cfg = ServeConfig(model=model, port=0, openai_port=0, registry_address=reg.address,
                          allowed_lora_dirs=[str(allowed)], adapter_cache_dir=str(root / "cache"),
                          llm_kwargs=dict(LLM_KWARGS))
        with RunningInference(cfg) as srv:
            base_url = f"http://127.0.0.1:{srv.running.openai.port}/v1"
            client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
            yield dict(srv=srv, client=client, base_url=base_url, model=model, local=local, alpha=alpha,
                       outside=outside, root=root)
            client.close()


@pytest.fixture(scope="session")
def client(oai_stack) -> openai.OpenAI:
    return oai_stack["client"]


@pytest.fixture(scope="session")
def offline(oai_stack) -> LLM:
    """The offline engine on the same checkpoint: the independent path the server must match."""
    return LLM(model=oai_stack["model"], **LLM_KWARGS)
