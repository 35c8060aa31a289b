"""Bearer-token auth (writes, optionally reads) and TLS, over real gRPC."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.certs import self_signed_cert
from loraserve.registry.client import RegistryClient
from loraserve.v1 import registry_pb2 as pb

WRITE, READ = "w-secret-token", "r-secret-token"


def status(fn) -> grpc.StatusCode | None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return None


def test_writes_need_the_token(start_registry, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg = start_registry(auth_token=WRITE)
    src = artifacts(seed=90)
    anon, wrong, good = (RegistryClient(reg.address, token=t) for t in (None, "nope", WRITE))
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert status(lambda: anon.push(src, "a")) == unauth
    assert status(lambda: wrong.push(src, "a")) == unauth
    assert status(lambda: anon.import_adapter("s3://b/k", "a")) == unauth
    # nothing was stored by the refused uploads
    assert list((reg.config.data_dir / "artifacts" / "blobs" / "sha256").iterdir()) == []
    assert list((reg.config.data_dir / "artifacts" / "tmp").iterdir()) == []

    good.push(src, "a")
    for write in (lambda c: c.delete("a", 1), lambda c: c.set_alias("a", "prod", 1),
                  lambda c: c.delete_alias("a", "prod"), lambda c: c.tag("a", 1, set={"k": "v"})):
        assert status(lambda: write(anon)) == unauth
        assert status(lambda: write(wrong)) == unauth
    # reads stay open without a read token
    assert anon.get("a").version == 1 and [a.name for a in anon.list()] == ["a"]
    assert anon.pull("a", 1, tmp_path).exists()
    # a token in the wrong scheme is not a bearer token
    basic = RegistryClient(reg.address)
    basic.metadata = [("authorization", f"Basic {WRITE}")]
    assert status(lambda: basic.delete("a", 1)) == unauth
    assert good.set_alias("a", "prod", 1).aliases == ["prod"]
    assert good.delete("a", 1, force=True) == [1]


def test_reads_need_a_token_when_configured(start_registry, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg = start_registry(auth_token=WRITE, read_token=READ)
    RegistryClient(reg.address, token=WRITE).push(artifacts(seed=91), "a")
    anon, reader = RegistryClient(reg.address), RegistryClient(reg.address, token=READ)
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert status(lambda: anon.get("a")) == unauth
    assert status(lambda: list(anon.list())) == unauth
    assert status(lambda: anon.pull("a", 1, tmp_path)) == unauth
    assert reader.get("a").version == 1 and reader.pull("a", 1, tmp_path).exists()
    assert RegistryClient(reg.address, token=WRITE).get("a").version == 1  # the write token reads too
    assert status(lambda: reader.push(artifacts(seed=92), "a")) == unauth  # a read token cannot write
    # health and reflection stay open
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(reg.address))
    resp = health.Check(health_pb2.HealthCheckRequest(service="loraserve.v1.RegistryService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_tls(start_registry, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("cryptography")
    cert, key = self_signed_cert(tmp_path)
    reg = start_registry(tls_cert_file=cert, tls_key_file=key, auth_token=WRITE)
    reg.host = "localhost"  # the certificate's name
    with RegistryClient(reg.address, token=WRITE, root_certificates=cert.read_bytes(), timeout=10) as c:
        assert c.push(artifacts(seed=93), "tls").adapter.version == 1
        assert c.get("tls").version == 1
    plain = RegistryClient(f"127.0.0.1:{reg.port}", timeout=3)
    assert status(lambda: plain.stub.GetAdapter(pb.GetAdapterRequest(name="tls"), timeout=3)) in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_metrics_count_calls(start_registry, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    reg = start_registry(auth_token=WRITE)
    before = {
        "ok": value("loraserve_registry_requests_total", method="UploadAdapter", code="OK"),
        "nf": value("loraserve_registry_requests_total", method="GetAdapter", code="NOT_FOUND"),
        "refused": value("loraserve_registry_auth_refused_total", method="DeleteAdapter"),
        "up": value("loraserve_registry_uploaded_bytes_total"),
        "down": value("loraserve_registry_downloaded_bytes_total"),
    }
    src = artifacts(seed=94)
    with RegistryClient(reg.address, token=WRITE) as c:
        c.push(src, "m")
        c.pull("m", 1, tmp_path)
        status(lambda: c.get("missing"))
    status(lambda: RegistryClient(reg.address).delete("m", 1))
    size = src.stat().st_size
    assert value("loraserve_registry_requests_total", method="UploadAdapter", code="OK") == before["ok"] + 1
    assert value("loraserve_registry_requests_total", method="GetAdapter", code="NOT_FOUND") == before["nf"] + 1
    assert value("loraserve_registry_auth_refused_total", method="DeleteAdapter") == before["refused"] + 1
    assert value("loraserve_registry_uploaded_bytes_total") == before["up"] + size
    assert value("loraserve_registry_downloaded_bytes_total") == before["down"] + size
