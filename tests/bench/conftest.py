"""The model the bench tests run on: the embedded default model when it has been built,
else the tiny random Llama; random adapters shaped for it, in TensorRT-LLM's <dir>/<k> layout."""
from __future__ import annotations

import os

import pytest
import torch

from loraserve.inference.bench.adapters import make_random_adapters
from loraserve.inference.llm import default_model_path
from tests.inference.conftest import make_random_model


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory) -> str:
    path = default_model_path()
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    path = str(tmp_path_factory.mktemp("bench_model"))
    make_random_model(path, "llama")
    return path


@pytest.fixture(scope="session")
def lora_dir(bench_model, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bench_loras"))
    make_random_adapters(bench_model, out, count=4, rank=4, modules=("q_proj", "v_proj"), dtype=torch.float32)
    return out
