"""A registry process killed with SIGKILL in the middle of an upload leaves no visible trace:
after a restart on the same data dir nothing can be listed, fetched or downloaded, and
`loraserve registry gc` removes the leftover bytes."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry
from loraserve.v1 import registry_pb2 as pb

from .conftest import wait_for

HERE = Path(__file__).resolve().parent


class ServerProcess:
    """`loraserve registry serve` in a subprocess, on 127.0.0.1:<port it picked>."""

    def __init__(self, data_dir: Path, prefix: list[str] | None = None) -> None:
        cmd = [sys.executable, *(prefix or ["-m", "loraserve.cli"]), "--log-level", "WARNING", "registry", "serve",
               "--data-dir", str(data_dir), "--address", "127.0.0.1:0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = ""
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if m := re.search(r"listening on (127\.0\.0\.1:\d+)", line):
                self.address = m.group(1)
                break
        else:
            raise RuntimeError(f"server did not start: {line}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for s in started:
        s.stop()


def db_rows(data_dir: Path) -> list:
    con = sqlite3.connect(data_dir / "registry.db")
    try:
        return con.execute("SELECT * FROM adapter_versions").fetchall() + con.execute("SELECT * FROM adapters").fetchall()
    finally:
        con.close()


def run_gc(data_dir: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "loraserve.cli", "--log-level", "WARNING", "registry", "gc",
                          "--data-dir", str(data_dir), "--min-age", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_invisible(address: str, name: str) -> None:
    with RegistryClient(address) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.get(name)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert list(c.list()) == []
        with pytest.raises(grpc.RpcError) as err:
            list(c.stub.DownloadAdapter(pb.DownloadAdapterRequest(name=name)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_sigkill_mid_upload(tmp_path: Path, servers, artifacts) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "reg"
    src = artifacts(seed=100, r=16).read_bytes()
    half = len(src) // 2
    staging = data_dir / "artifacts" / "tmp"
    server = ServerProcess(data_dir)
    servers.append(server)
    release = threading.Event()

    def half_upload() -> Iterator[pb.UploadAdapterRequest]:
        yield pb.UploadAdapterRequest(metadata=pb.UploadAdapterMetadata(name="victim", filename="v.tar"))
        for i in range(0, half, 16 << 10):
            yield pb.UploadAdapterRequest(chunk=src[i:min(i + (16 << 10), half)])
        release.wait(60)  # hold the stream open: the server is mid-upload

    stub = RegistryClient(server.address).stub
    future = stub.UploadAdapter.future(half_upload())
    try:
        wait_for(lambda: any(p.stat().st_size >= half for p in staging.glob("*")), what="half the bytes on disk")
        server.kill9()
    finally:
        release.set()
    with pytest.raises(grpc.RpcError):
        future.result(timeout=30)

    leftover = list(staging.iterdir())
    assert len(leftover) == 1  # the half-written temp file, invisible to clients
    with RunningRegistry(RegistryConfig(data_dir=data_dir)) as restarted:  # restart on the same data dir
        assert_invisible(restarted.address, "victim")
        assert db_rows(data_dir) == []
        assert list((data_dir / "artifacts" / "blobs" / "sha256").iterdir()) == []
        assert list(staging.iterdir()) == leftover  # still there, until gc

        assert "1 temp files" in run_gc(data_dir)
        assert list(staging.iterdir()) == []
        with RegistryClient(restarted.address) as c:  # and the registry works as before
            assert c.push(artifacts(seed=100, r=16), "victim").adapter.version == 1


def test_sigkill_between_blob_and_row(tmp_path: Path, servers, artifacts) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "reg"
    blobs = data_dir / "artifacts" / "blobs" / "sha256"
    crashing = ServerProcess(data_dir, prefix=[str(HERE / "crash_server.py"), "after-blob"])
    servers.append(crashing)
    with RegistryClient(crashing.address) as c, pytest.raises(grpc.RpcError) as err:
        c.push(artifacts(seed=101), "victim")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert crashing.proc.wait(30) == -signal.SIGKILL
    assert len(list(blobs.iterdir())) == 1  # the blob made it, the row did not: an orphan

    with RunningRegistry(RegistryConfig(data_dir=data_dir)) as restarted:
        assert_invisible(restarted.address, "victim")
        assert db_rows(data_dir) == []
        orphan = next(blobs.iterdir()).name
        assert restarted.service.gc(min_age_seconds=0).removed_blobs == [orphan]
        assert list(blobs.iterdir()) == []
        with RegistryClient(restarted.address) as c:
            a = c.push(artifacts(seed=101), "victim").adapter
            assert a.version == 1 and (blobs / a.digest.removeprefix("sha256:")).exists()


def test_gc_leaves_young_and_referenced_files(start_registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    """The age guard: gc with the default min age keeps fresh leftovers (uploads in flight elsewhere)."""
    reg = start_registry()
    with RegistryClient(reg.address) as c:
        a = c.push(artifacts(seed=102), "kept").adapter
    orphan = reg.config.data_dir / "artifacts" / "blobs" / "sha256" / ("ab" * 32)
    orphan.write_bytes(b"x")
    temp = reg.config.data_dir / "artifacts" / "tmp" / "deadbeef"
    temp.write_bytes(b"y")
    report = reg.service.gc()  # default min age: 1 hour
    assert (report.removed_blobs, report.removed_temp, report.kept_young) == ([], [], 2)
    report = reg.service.gc(0)
    assert report.removed_blobs == ["ab" * 32] and report.removed_temp == ["staging/deadbeef"]
    assert (reg.config.data_dir / "artifacts" / "blobs" / "sha256" / a.digest.removeprefix("sha256:")).exists()
