"""Issue 9 items 2, 3, 5, 6, 7, 8 at the registry, over a real gRPC stub on loopback: hostile
uploads and references get INVALID_ARGUMENT with short messages, auth metadata is parsed one
way, empty token files stop the server from starting, crashed uploads' staging files are
reclaimed while the server runs, and the artifact type comes from the content."""
from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from loraserve.adapters.testing import make_nemo_adapter, make_peft_adapter
from loraserve.cli import build_parser
from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.v1 import registry_pb2 as pb
from loraserve.v1 import registry_pb2_grpc as pb_grpc
from tests.registry.conftest import wait_for
from tests.reliability.bombs import targz_bomb, zip_bomb
from tests.reliability.hostile import KINDS, hostile_adapter

PYTHON_NOISE = ("TypeError", "RecursionError", "KeyError", "Traceback", "maximum recursion")


def test_hostile_uploads_are_invalid_argument(start_registry, tmp_path):
    reg = start_registry()
    with RegistryClient(reg.address) as c:
        for kind in KINDS:
            with pytest.raises(grpc.RpcError) as err:
                c.push(hostile_adapter(tmp_path / kind, kind), f"hostile-{kind.replace('_', '-')}")
            msg = err.value.details()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, msg)
            assert not any(n in msg for n in PYTHON_NOISE) and len(msg) < 1200, (kind, msg)
        assert "effective LoRA scale" in c_push_error(c, hostile_adapter(tmp_path / "a2", "alpha_1e38"), "x")


def c_push_error(c: RegistryClient, path: Path, name: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        c.push(path, name)
    return err.value.details()


def test_bombs_refused_fast_and_leave_nothing(start_registry, tmp_path, artifacts):
    reg = start_registry()
    bombs = {"zip": zip_bomb(tmp_path / "bomb.zip"), "tar.gz": targz_bomb(tmp_path / "bomb.tar.gz"),
             "nemo": targz_bomb(tmp_path / "bomb.nemo")}
    with RegistryClient(reg.address) as c:
        for kind, path in bombs.items():
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                c.push(path, f"bomb-{kind.replace('.', '-')}")
            elapsed = time.perf_counter() - t0  # includes streaming 3.4 MB over loopback
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "exceeds max_bytes" in err.value.details() or "bomb" in err.value.details()
            assert elapsed < 5, elapsed
        assert c.push(artifacts(seed=81, packing="zip"), "fine").adapter.version == 1
    staging = reg.service.store.staging_dir
    assert not staging.exists() or not list(staging.iterdir())


@pytest.mark.parametrize("name,version,alias", [
    ("../../etc/passwd", 0, ""), ("bad\0name", 0, ""), ("n" * 10_000, 0, ""),
    ("ok-name", -1, ""), ("ok-name", 1, "prod"), ("ok-name", 0, "a" * 10_000), ("ok-name", 0, "bad\0alias"),
])
def test_bad_references_are_invalid_argument(start_registry, name, version, alias):
    reg = start_registry()
    with grpc.insecure_channel(reg.address) as ch:
        stub = pb_grpc.RegistryServiceStub(ch)
        calls = [lambda: stub.GetAdapter(pb.GetAdapterRequest(name=name, version=version, alias=alias), timeout=10),
                 lambda: list(stub.DownloadAdapter(pb.DownloadAdapterRequest(name=name, version=version, alias=alias),
                                                   timeout=10))]
        if not alias:
            calls.append(lambda: stub.DeleteAdapter(pb.DeleteAdapterRequest(name=name, version=version), timeout=10))
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert len(err.value.details()) < 400


def test_auth_metadata_is_parsed_one_way(start_registry, artifacts):
    reg = start_registry(auth_token="w-token", read_token="r-token")
    req = pb.GetAdapterRequest(name="nothing-here")
    with grpc.insecure_channel(reg.address) as ch:
        stub = pb_grpc.RegistryServiceStub(ch)

        def code_of(metadata):  # type: ignore[no-untyped-def]
            try:
                stub.GetAdapter(req, metadata=metadata, timeout=10)
            except grpc.RpcError as err:
                return err.code(), err.details()
            return grpc.StatusCode.OK, ""

        assert code_of(None)[0] == grpc.StatusCode.UNAUTHENTICATED  # missing read token
        assert code_of([("authorization", "bEaReR r-token")])[0] == grpc.StatusCode.NOT_FOUND  # scheme any case
        assert code_of([("authorization", "Bearer  w-token ")])[0] == grpc.StatusCode.NOT_FOUND
        code, msg = code_of([("authorization", "Bearer r-token"), ("authorization", "Bearer r-token")])
        assert code == grpc.StatusCode.UNAUTHENTICATED and "one authorization value" in msg
        code, msg = code_of([("authorization", "Bearer wrong"), ("authorization", "Bearer r-token")])
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert code_of([("authorization", "Basic r-token")])[0] == grpc.StatusCode.UNAUTHENTICATED
        assert code_of([("authorization", "Bearer")])[0] == grpc.StatusCode.UNAUTHENTICATED
    with RegistryClient(reg.address, token="r-token") as c:  # reads fine, writes refused
        with pytest.raises(grpc.RpcError) as err:
            c.push(artifacts(seed=82), "needs-write")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_empty_token_file_is_a_startup_error(tmp_path, content):
    from loraserve.registry.cli import build_config

    token_file = tmp_path / "token"
    token_file.write_text(content)
    for flag in ("--auth-token-file", "--read-token-file"):
        args = build_parser().parse_args(["registry", "serve", "--data-dir", str(tmp_path / "d"), flag, str(token_file)])
        with pytest.raises(SystemExit, match="empty or whitespace only"):
            build_config(args)
    with pytest.raises(ValueError, match="empty or whitespace only"):
        RegistryConfig(data_dir=tmp_path, auth_token=content)
    token_file.write_text("  s3cret \n")
    args = build_parser().parse_args(["registry", "serve", "--data-dir", str(tmp_path / "d"),
                                      "--auth-token-file", str(token_file)])
    assert build_config(args).auth_token == "s3cret"


def test_crashed_upload_staging_is_reclaimed_while_running(start_registry, artifacts):
    reg = start_registry(gc_interval_seconds=0.2, staging_max_age_seconds=2.0)
    staging = reg.service.store.staging_dir
    staging.mkdir(parents=True, exist_ok=True)
    crashed = staging / "0123456789abcdef0123456789abcdef"  # what a SIGKILLed writer leaves
    crashed.write_bytes(os.urandom(1 << 16))
    old = time.time() - 60
    os.utime(crashed, (old, old))
    young = staging / "fedcba9876543210fedcba9876543210"
    young.write_bytes(b"in flight elsewhere")
    wait_for(lambda: not crashed.exists(), timeout=10, what="periodic gc to reclaim the crashed upload")
    assert young.exists()  # younger than staging_max_age_seconds: maybe a live upload of another replica
    wait_for(lambda: not young.exists(), timeout=10, what="the young file once it is old enough")
    with RegistryClient(reg.address) as c:  # and uploads still work alongside the gc thread
        assert c.push(artifacts(seed=83), "after-gc").adapter.version == 1


def test_artifact_type_comes_from_content(start_registry, tmp_path):
    reg = start_registry()
    hf_tar = make_peft_adapter(tmp_path / "hf.tar", seed=84, packing="tar")
    disguised = tmp_path / "looks-like.nemo"
    disguised.write_bytes(hf_tar.read_bytes())
    real_nemo = make_nemo_adapter(tmp_path / "real.nemo", seed=85)
    nemo_as_tar = tmp_path / "plain-name.tar"
    nemo_as_tar.write_bytes(real_nemo.read_bytes())
    with RegistryClient(reg.address) as c:
        a = c.push(disguised, "disguised").adapter
        assert (a.artifact_type, a.format) == ("tar", pb.ADAPTER_FORMAT_HF)
        b = c.push(nemo_as_tar, "nemo-plain-name").adapter
        assert (b.artifact_type, b.format) == ("nemo", pb.ADAPTER_FORMAT_NEMO)
