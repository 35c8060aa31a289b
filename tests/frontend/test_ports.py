"""A taken port is a clear startup error naming it (issue 13.1), for the inference gRPC, OpenAI HTTP and
metrics ports and the registry's gRPC port; the server already on the port keeps serving."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import grpc
import pytest

from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.ports import PortInUseError
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry
from loraserve.v1 import inference_pb2 as ipb
from loraserve.v1 import inference_pb2_grpc as ipb_grpc
from loraserve.v1 import registry_pb2 as rpb
from loraserve.v1 import registry_pb2_grpc as rpb_grpc
from tests.inference.conftest import make_random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ports_model"))
    make_random_model(path, "llama")
    return path


def serve_cfg(model_dir, tmp_path, **kw) -> ServeConfig:
    return ServeConfig(model=model_dir, port=0, registry_address=None, adapter_cache_dir=str(tmp_path / "cache"),
                       llm_kwargs=dict(dtype="float32", device="cpu"), **kw)


def generate_text(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        req = ipb.GenerateRequest(text="The quick", sampling_params=ipb.SamplingParams(max_tokens=4, temperature=0))
        return "".join(m.chunk.text for m in ipb_grpc.InferenceServiceStub(ch).Generate(req, timeout=30))


def second_inference(cfg: ServeConfig) -> PortInUseError:
    from loraserve.inference.server import create_server

    async def attempt():
        with pytest.raises(PortInUseError) as info:
            running = await create_server(cfg, wait_ready=True)
            await running.stop(0)  # not reached when the port is refused
        return info.value

    return asyncio.run(attempt())


def test_inference_ports_taken(model_dir, tmp_path):
    with RunningInference(serve_cfg(model_dir, tmp_path, openai_port=0, metrics_port=0)) as first:
        before = generate_text(first.address)
        port = first.running.port
        err = second_inference(ServeConfig(**{**_fields(serve_cfg(model_dir, tmp_path)), "port": port}))
        assert f"127.0.0.1:{port}" in str(err) and "--port" in str(err)
        http_port = first.running.openai.port
        err = second_inference(ServeConfig(**{**_fields(serve_cfg(model_dir, tmp_path)), "openai_port": http_port}))
        assert f":{http_port}" in str(err) and "--openai-port" in str(err)
        assert generate_text(first.address) == before  # the first server keeps serving all along
    with socket.socket() as holder:  # the metrics port, held by another program
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        err = second_inference(ServeConfig(**{**_fields(serve_cfg(model_dir, tmp_path)), "metrics_port": taken}))
        assert f"127.0.0.1:{taken}" in str(err) and "--metrics-port" in str(err)


def _fields(cfg: ServeConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_registry_port_taken(tmp_path):
    from loraserve.registry.server import create_server

    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "a")) as first:
        async def attempt():
            with pytest.raises(PortInUseError) as info:
                create_server(RegistryConfig(data_dir=tmp_path / "b"), first.address)
            return info.value

        err = asyncio.run(attempt())
        assert first.address in str(err)
        with grpc.insecure_channel(first.address) as ch:  # the first registry still answers, alone
            assert list(rpb_grpc.RegistryServiceStub(ch).ListAdapters(rpb.ListAdaptersRequest(), timeout=10).adapters) == []


def test_cli_reports_a_taken_port_without_a_traceback(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "loraserve.cli", "registry", "serve", "--port", str(port),
                               "--data-dir", str(tmp_path / "reg")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
