"""The docker-compose stack, replayed on 127.0.0.1 without Docker.

Each service's command and environment are taken from deploy/docker-compose.yml and run as
the containers would run them (`loraserve ...` in its own process), with only what Docker
provides swapped for loopback equivalents: listen addresses and ports, host paths of volumes,
MinIO -> moto's S3 server over HTTP (the bucket created as minio-init creates it), the GPU ->
`--device=cpu` (the switch the compose file documents), the base model -> a tiny random Llama.
Readiness is decided by the compose healthcheck commands themselves.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import (DEPLOY, command_list, flag_value, interpolate, load_compose, replace_flag, service_env)

LOOPBACK = "127.0.0.1"
pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    """This process's environment minus anything that could point a service elsewhere."""
    drop = re.compile(r"^(AWS_|LORASERVE_|MINIO_)")
    return {k: v for k, v in os.environ.items() if not drop.match(k)}


class Service:
    """One compose service as a process; stopped with SIGTERM like `docker compose down`."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log_path = name, log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "loraserve.cli", *args], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_healthy(self, healthcheck: list[str], address: str, timeout: float) -> None:
        """Poll the compose healthcheck (`CMD python <script> <addr>`) until it exits 0."""
        assert healthcheck[0] == "CMD" and healthcheck[1] == "python"
        script = DEPLOY / Path(healthcheck[2]).name
        cmd = [sys.executable, str(script), address, *healthcheck[4:]]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            if subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0:
                return
            time.sleep(0.5)
        pytest.fail(f"{self.name} not healthy after {timeout} s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()["services"]


@pytest.fixture(scope="module")
def s3(compose: dict) -> Iterator[dict]:
    """moto's S3 server in MinIO's place, and the bucket minio-init creates."""
    from moto.server import ThreadedMotoServer

    import boto3

    port = free_port()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    endpoint = f"http://{LOOPBACK}:{port}"
    minio_env = service_env(compose["minio"])
    script = " ".join(command_list(compose["minio-init"]["command"]))
    bucket = re.search(r"mc mb (?:--ignore-existing )?local/(\S+)", script)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=minio_env["MINIO_ROOT_USER"],
                          aws_secret_access_key=minio_env["MINIO_ROOT_PASSWORD"])
    client.create_bucket(Bucket=bucket.group(1))
    try:
        yield dict(endpoint=endpoint, client=client, bucket=bucket.group(1))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def registry(compose: dict, s3: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("registry")
    service = compose["registry"]
    port = free_port()
    args = command_list(service["command"])
    args = replace_flag(args, "--address", f"{LOOPBACK}:{port}")
    args = replace_flag(args, "--data-dir", str(root / "data"))
    assert flag_value(args, "--s3-endpoint-url") == "http://minio:9000"
    args = replace_flag(args, "--s3-endpoint-url", s3["endpoint"])
    env = {**base_env(), **service_env(service)}
    proc = Service("registry", args, env, root / "registry.log")
    try:
        proc.wait_healthy(service["healthcheck"]["test"], f"{LOOPBACK}:{port}", timeout=90)
        yield dict(address=f"{LOOPBACK}:{port}", token=env["LORASERVE_REGISTRY_TOKEN"])
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def inference(compose: dict, registry: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from tests.inference.conftest import make_random_model

    root = tmp_path_factory.mktemp("inference")
    model = root / "model"
    make_random_model(str(model), "llama")
    service = compose["inference"]
    mounts = {t: s for s, t, *_ in (interpolate(str(v), {}).split(":") for v in service["volumes"])}
    ports = {flag: free_port() for flag in ("--port", "--openai-port", "--metrics-port")}
    args = command_list(service["command"])
    args = replace_flag(args, "--model", str(model))
    args = replace_flag(args, "--host", LOOPBACK)
    assert flag_value(args, "--registry") == "registry:50052"
    args = replace_flag(args, "--registry", registry["address"])
    options = flag_value(args, "--extra_llm_api_options")
    args = replace_flag(args, "--extra_llm_api_options", str(DEPLOY / mounts[options]))  # the bind-mounted file
    args = replace_flag(args, "--adapter-cache-dir", str(root / "adapter-cache"))
    for flag, port in ports.items():
        args = replace_flag(args, flag, str(port))
    args.append("--device=cpu")  # compose's documented CPU run, in place of the GPU reservation
    proc = Service("inference", args, {**base_env(), **service_env(service)}, root / "inference.log")
    try:
        proc.wait_healthy(service["healthcheck"]["test"], f"{LOOPBACK}:{ports['--port']}", timeout=180)
        yield dict(address=f"{LOOPBACK}:{ports['--port']}", openai=ports["--openai-port"],
                   metrics=ports["--metrics-port"], root=root)
    finally:
        proc.stop()


def push(registry: dict, path: Path, name: str, token: str | None):  # type: ignore[no-untyped-def]
    from loraserve.registry.client import RegistryClient

    with RegistryClient(registry["address"], token=token) as client:
        return client.push(path, name, base_model="tiny", progress=False)


def test_registry_stores_pushed_adapters_in_the_compose_bucket(registry: dict, s3: dict, tmp_path: Path) -> None:
    import grpc

    from loraserve.adapters.testing import make_peft_adapter

    adapter = make_peft_adapter(tmp_path / "adapter", r=8, seed=3, modules=("q_proj", "v_proj", "down_proj"))
    with pytest.raises(grpc.RpcError) as refused:
        push(registry, adapter, "compose-check", token=None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the compose token is in force
    digest = push(registry, adapter, "compose-check", registry["token"]).adapter.digest
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"]).get("Contents", [])]
    assert any(digest.removeprefix("sha256:") in key for key in keys), f"{digest} not in {s3['bucket']}: {keys}"


def test_inference_serves_registry_adapters_with_the_compose_options(registry: dict, inference: dict,
                                                                     tmp_path: Path) -> None:
    import grpc

    from loraserve.adapters.testing import make_peft_adapter
    from loraserve.v1 import inference_pb2 as pb
    from loraserve.v1 import inference_pb2_grpc as pb_grpc

    adapter = make_peft_adapter(tmp_path / "adapter", r=16, alpha=64, seed=5)
    push(registry, adapter, "compose-gen", registry["token"])

    def generate(adapter_name: str | None) -> list[int]:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(20, 40))),
                                 sampling_params=pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        if adapter_name:
            req.adapter_ref.name = adapter_name
        with grpc.insecure_channel(inference["address"]) as channel:
            stream = pb_grpc.InferenceServiceStub(channel).Generate(req, timeout=60)
            return [t for msg in stream if msg.WhichOneof("response") == "chunk" for t in msg.chunk.token_ids]

    base, tuned = generate(None), generate("compose-gen")
    assert len(base) == len(tuned) == 12
    assert base != tuned, "the adapter fetched from the registry must change the output"
    assert list((inference["root"] / "adapter-cache").rglob("*")), "downloads land in --adapter-cache-dir"


def test_inference_side_ports_answer(inference: dict) -> None:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{inference['metrics']}/metrics", timeout=30) as r:
        assert r.status == 200 and b"# TYPE" in r.read()
    with urllib.request.urlopen(f"http://{LOOPBACK}:{inference['openai']}/v1/models", timeout=30) as r:
        models = json.load(r)
    assert r.status == 200 and models["data"], models
