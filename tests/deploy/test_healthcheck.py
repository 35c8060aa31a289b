"""deploy/grpc_healthcheck.py against a real grpc.health.v1 server on 127.0.0.1 (port 0).

The script is run as the container runs it: a separate process whose exit status is the verdict.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .helpers import DEPLOY

SCRIPT = DEPLOY / "grpc_healthcheck.py"
SERVICE = "loraserve.v1.InferenceService"


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_exit_status_follows_the_serving_status(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # a model still loading
    result = probe(address)
    assert result.returncode == 1 and "NOT_SERVING" in result.stdout
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = probe(address)
    assert result.returncode == 0 and "SERVING" in result.stdout


def test_named_service_and_unknown_service(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe(address, "--service", SERVICE).returncode == 1
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert probe(address, "--service", SERVICE).returncode == 0
    unknown = probe(address, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout


def test_address_from_the_environment_as_the_images_set_it(health_server: tuple[str, health.HealthServicer]) -> None:
    import os

    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe(env={**os.environ, "LORASERVE_HEALTH_ADDRESS": address}).returncode == 0
    missing = probe(env={k: v for k, v in os.environ.items() if k != "LORASERVE_HEALTH_ADDRESS"})
    assert missing.returncode == 2 and "LORASERVE_HEALTH_ADDRESS" in missing.stderr


def test_nothing_listening_is_unhealthy_within_the_timeout() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = probe(f"127.0.0.1:{port}", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout or "DEADLINE_EXCEEDED" in result.stdout, result.stdout
