"""The byte side channel of downloads (issue 12's cold path): the registry's blobs over HTTP/1.1 with
ranges (services/registry/blob_http.py) and AdapterFetcher reading them (services/inference/blob_fetch.py,
blob_source.py). Real servers on loopback (the registry's gRPC and blob ports, moto's S3 server), real
HTTP requests with http.client, the bytes compared with the gRPC DownloadAdapter stream's."""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import time

import grpc
import pytest

from benchmarks.cold_path import write_peft_dir
from loraserve.inference import adapter_source, blob_fetch
from loraserve.inference.errors import DigestMismatchError
from loraserve.registry import metrics
from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry
from loraserve.v1 import registry_pb2 as pb
from loraserve.v1 import registry_pb2_grpc

SHAPES = {m: (1024, 1024) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
READ, WRITE = "read-token-123", "write-token-456"


def _grpc_bytes(address: str, name: str, token: str | None = None) -> bytes:
    md = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as ch:
        return b"".join(m.chunk for m in registry_pb2_grpc.RegistryServiceStub(ch).DownloadAdapter(
            pb.DownloadAdapterRequest(name=name, version=1), metadata=md) if m.WhichOneof("payload") == "chunk")


def _located(address: str, name: str, token: str | None = None) -> pb.GetAdapterResponse:
    md = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as ch:
        return registry_pb2_grpc.RegistryServiceStub(ch).GetAdapter(
            pb.GetAdapterRequest(name=name, version=1, blob_url=True), metadata=md)


def _get(port: int, target: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry with a blob port and read/write tokens, one ~5.5 MB adapter (two 4 MiB ranges)."""
    root = tmp_path_factory.mktemp("blobs")
    src = write_peft_dir(str(root / "src"), SHAPES, num_layers=12, rank=16, seed=9)
    cfg = RegistryConfig(data_dir=root / "registry", blob_port=0, auth_token=WRITE, read_token=READ)
    with RunningRegistry(cfg) as reg:
        with RegistryClient(reg.address, token=WRITE) as client:
            client.push(src, "blobby", base_model="tiny")
        yield reg, _grpc_bytes(reg.address, "blobby", READ)


def test_signed_url_serves_exactly_the_ranges_asked_for(served):
    reg, whole = served
    resp = _located(reg.address, "blobby", READ)
    assert resp.blob.url.startswith("/v1/blobs/sha256/") and resp.blob.port == reg.service.blob_server.port
    assert resp.blob.expires_unix > time.time() + 60
    assert resp.range_digests.range_bytes == 4 << 20 and len(resp.range_digests.sha256) == 2
    assert [hashlib.sha256(whole[i:i + (4 << 20)]).digest() for i in (0, 4 << 20)] == list(resp.range_digests.sha256)
    n = len(whole)
    for header, want in (("bytes=0-99", whole[:100]), (f"bytes={n - 5}-", whole[-5:]), ("bytes=-7", whole[-7:]),
                         (f"bytes=1000-{n + 50}", whole[1000:]), (f"bytes={4 << 20}-{(8 << 20) - 1}", whole[4 << 20:])):
        status, h, body = _get(resp.blob.port, resp.blob.url, {"Range": header})
        assert status == 206 and body == want, header
        assert h["content-length"] == str(len(want)) and h["content-range"].endswith(f"/{n}")
    status, h, body = _get(resp.blob.port, resp.blob.url)
    assert status == 200 and body == whole and h["etag"] == f'"{resp.adapter.digest}"'
    status, h, body = _get(resp.blob.port, resp.blob.url, {"Range": "bytes=0-9"}, method="HEAD")
    assert status == 206 and body == b"" and h["content-length"] == "10"
    for bad in (f"bytes={n}-", f"bytes={n + 10}-{n + 20}", "bytes=5-2", "bytes=-0", "lines=1-2"):
        status, h, _ = _get(resp.blob.port, resp.blob.url, {"Range": bad})
        assert status == 416 and h["content-range"] == f"bytes */{n}", bad


def test_blob_reads_need_a_live_signature_or_a_token(served):
    reg, whole = served
    resp = _located(reg.address, "blobby", READ)
    port, url = resp.blob.port, resp.blob.url
    path, query = url.split("?")
    hex_ = path.rsplit("/", 1)[1]
    sig = query.split("sig=")[1]
    forged = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    expired, _ = reg.service.blob_server.signer.sign(hex_, now=time.time() - 3600)
    other_exp = str(int(query.split("exp=")[1].split("&")[0]) + 100)  # a later expiry with the same signature
    for target in (path, f"{path}?exp={query.split('exp=')[1].split('&')[0]}&sig={forged}", expired,
                   f"{path}?exp={other_exp}&sig={sig}", f"{path}?exp=abc&sig={sig}"):
        status, _, body = _get(port, target, {"Range": "bytes=0-9"})
        assert status == 401, target
        assert whole[:10] not in body
    assert b"expired" in _get(port, expired)[2]
    assert _get(port, path, {"Authorization": f"Bearer {READ}", "Range": "bytes=0-9"})[2] == whole[:10]
    assert _get(port, path, {"Authorization": f"Bearer {WRITE}", "Range": "bytes=0-9"})[0] == 206
    assert _get(port, path, {"Authorization": "Bearer nope"})[0] == 401
    with pytest.raises(grpc.RpcError) as err:  # no token, no URL: GetAdapter itself is a guarded read
        _located(reg.address, "blobby")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_paths_name_digests_never_files(served):
    reg, _ = served
    port = reg.service.blob_server.port
    auth = {"Authorization": f"Bearer {READ}"}
    for target in ("/v1/blobs/sha256/../../registry.db", "/etc/passwd", "/v1/blobs/sha256/" + "A" * 64,
                   "/v1/blobs/sha256/%2e%2e%2fregistry.db", "/v1/blobs/sha256/" + "a" * 63, "/registry.db"):
        status, _, body = _get(port, target, auth)
        assert status == 404 and b"SQLite" not in body, target
    signed, _ = reg.service.blob_server.signer.sign("b" * 64)  # a signature for a digest the store lacks
    assert _get(port, signed)[0] == 404


def _fetch(address: str, cache: str, token: str | None = None, wait=True):
    async def main():
        fetcher = adapter_source.AdapterFetcher(address, cache, token=token)
        try:
            f = await fetcher.fetch("blobby", 1)
            if wait and hasattr(f.data, "wait_verified"):
                await asyncio.to_thread(f.data.wait_verified)
                f.data.released.set()  # (as a parser's release: the disk copy need not wait for one)
            await fetcher.flush()
            return f, fetcher
        finally:
            await fetcher.close()
    return asyncio.run(main())


def _served_ranges() -> float:
    return metrics.REQUESTS.labels("BlobGet", "206")._value.get()


def test_fetcher_reads_the_blob_over_http_and_verifies_it(served, tmp_path):
    reg, whole = served
    before = _served_ranges()
    f, _ = _fetch(reg.address, str(tmp_path / "cache"), READ)
    assert _served_ranges() - before == 2  # both 4 MiB ranges came over HTTP, not gRPC
    assert bytes(f.data.buf.numpy()) == whole and f.digest == "sha256:" + hashlib.sha256(whole).hexdigest()
    assert open(f.path, "rb").read() == whole  # the disk cache copy
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".part-")]


def test_a_tampered_blob_is_refused_and_never_cached(tmp_path):
    src = write_peft_dir(str(tmp_path / "src"), SHAPES, num_layers=12, rank=16, seed=10)
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry", blob_port=0)) as reg:
        with RegistryClient(reg.address) as client:
            client.push(src, "blobby", base_model="tiny")
        blob = reg.service.store.blob_path(_located(reg.address, "blobby").adapter.digest[7:])
        with open(blob, "r+b") as fh:  # one byte of the second range changes on the registry's disk
            fh.seek((4 << 20) + 1234)
            b = fh.read(1)
            fh.seek((4 << 20) + 1234)
            fh.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(DigestMismatchError, match="bytes 4194304-"):
            _fetch(reg.address, str(tmp_path / "cache"))
    assert [p for p in os.listdir(tmp_path / "cache") if not p.startswith("refs")] == []


def test_an_unreachable_blob_port_falls_back_to_grpc(tmp_path):
    src = write_peft_dir(str(tmp_path / "src"), SHAPES, num_layers=12, rank=16, seed=11)
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry", blob_port=0)) as reg:
        with RegistryClient(reg.address) as client:
            client.push(src, "blobby", base_model="tiny")
        whole = _grpc_bytes(reg.address, "blobby")
        reg.service.blob_server.stop()  # GetAdapter still hands out URLs; nothing answers on the port
        f, fetcher = _fetch(reg.address, str(tmp_path / "cache"))
        assert open(f.path, "rb").read() == whole and fetcher._blob_off_until > time.monotonic()
        if hasattr(f.data, "buf"):
            assert bytes(f.data.buf.numpy()) == whole


def test_blobs_over_tls_with_the_registrys_certificate(tmp_path):
    """A registry with TLS serves its blobs over TLS too (its certificate); the fetcher, given the CA
    (--registry-ca), reads them as https; a plain HTTP request to the port gets no bytes."""
    pytest.importorskip("cryptography")
    from tests.certs import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    src = write_peft_dir(str(tmp_path / "src"), SHAPES, num_layers=12, rank=16, seed=14)
    cfg = RegistryConfig(data_dir=tmp_path / "registry", blob_port=0, tls_cert_file=cert, tls_key_file=key)
    with RunningRegistry(cfg) as reg:
        reg.host = "localhost"  # the certificate's name
        with RegistryClient(reg.address, root_certificates=cert.read_bytes(), timeout=10) as client:
            client.push(src, "blobby", base_model="tiny")
            whole = b"".join(m.chunk for m in client.stub.DownloadAdapter(pb.DownloadAdapterRequest(
                name="blobby", version=1)) if m.WhichOneof("payload") == "chunk")
        before = _served_ranges()

        async def main():
            fetcher = adapter_source.AdapterFetcher(reg.address, str(tmp_path / "cache"), ca_file=str(cert))
            try:
                f = await fetcher.fetch("blobby", 1)
                await asyncio.to_thread(f.data.wait_verified)
                await fetcher.flush()
                return f
            finally:
                await fetcher.close()
        f = asyncio.run(main())
        assert _served_ranges() - before == 2 and bytes(f.data.buf.numpy()) == whole
        with pytest.raises((http.client.HTTPException, ConnectionError)):  # the TLS handshake fails: no answer
            _get(reg.service.blob_server.port, "/v1/blobs/sha256/" + f.digest[7:])


def test_no_blob_port_no_url(tmp_path, monkeypatch):
    src = write_peft_dir(str(tmp_path / "src"), SHAPES, num_layers=2, rank=8, seed=12)
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(src, "blobby", base_model="tiny")
        resp = _located(reg.address, "blobby")
        assert not resp.HasField("blob") and resp.adapter.version == 1
        f, fetcher = _fetch(reg.address, str(tmp_path / "cache"))
        assert open(f.path, "rb").read() == _grpc_bytes(reg.address, "blobby")
        assert fetcher._blob_off_until > time.monotonic()  # not asked again for a while


def test_s3_presigned_urls_are_read_straight_from_s3(start_registry, s3_bucket, tmp_path):
    """With s3.presign_downloads the registry answers a presigned GET URL (moto's S3 server on loopback):
    the fetcher reads its ranges from S3 itself and verifies them against the registry's range digests."""
    cfg, _ = s3_bucket
    cfg.presign_downloads = True
    src = write_peft_dir(str(tmp_path / "src"), SHAPES, num_layers=12, rank=16, seed=13)
    reg = start_registry(store="s3", s3=cfg)
    with RegistryClient(reg.address) as client:
        client.push(src, "blobby", base_model="tiny")
    resp = _located(reg.address, "blobby")
    assert resp.blob.url.startswith(cfg.endpoint_url) and "Signature" in resp.blob.url
    assert len(resp.range_digests.sha256) == 2
    whole = _grpc_bytes(reg.address, "blobby")
    before = _served_ranges()
    f, _ = _fetch(reg.address, str(tmp_path / "cache"))
    assert _served_ranges() == before  # (not the registry's port: S3's)
    assert bytes(f.data.buf.numpy()) == whole and open(f.path, "rb").read() == whole
    t = blob_fetch.BlobTarget.of(resp.blob, reg.address, False)  # (moto does not check the signature; S3 does)
    assert (t.host, t.port) == ("127.0.0.1", int(cfg.endpoint_url.rsplit(":", 1)[1]))


class _BadServer:
    """A misbehaving HTTP server on loopback (what a proxy or an old S3 clone might do): `mode` "whole"
    answers 200 with the whole blob whatever the Range, "cut" closes the connection halfway through a range."""

    def __init__(self, data: bytes, mode: str):
        import socket
        import threading

        self.data, self.mode = data, mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn) -> None:
        try:
            self._answer(conn)
        except OSError:
            pass  # (the client hung up: it refused the answer)

    def _answer(self, conn) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                got = conn.recv(4096)
                if not got:
                    return
                head += got
            line = next(x for x in head.decode().split("\r\n") if x.lower().startswith("range:"))
            a, b = (int(x) for x in line.split("=")[1].split("-"))
            if self.mode == "whole":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.data) + self.data)
            else:
                body = self.data[a:b + 1]
                conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\nContent-Range: bytes %d-%d/%d\r\n\r\n"
                             % (len(body), a, b, len(self.data)) + body[:len(body) // 2])

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", ["whole", "cut"])
def test_a_server_that_ignores_ranges_or_cuts_them_is_unavailable_not_wrong(mode):
    import torch
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom((4 << 20) + 12345)
    digests = (4 << 20, [hashlib.sha256(data[i:i + (4 << 20)]).digest() for i in (0, 4 << 20)])
    server = _BadServer(data, mode)
    dest = torch.zeros(len(data), dtype=torch.uint8)
    handed = []
    target = blob_fetch.BlobTarget("http", "127.0.0.1", server.port, "/v1/blobs/sha256/x")
    try:
        with ThreadPoolExecutor(4) as pool, pytest.raises(blob_fetch.BlobUnavailable):
            asyncio.run(blob_fetch.fetch_ranges(target, len(data), digests, "sha256:" + "0" * 64, dest, pool,
                                                lambda a, b: handed.append((a, b)), streams=2, timeout_s=5))
    finally:
        server.close()
    assert handed == []  # nothing unverified was handed on (so the gRPC fallback may still fill dest)


@pytest.mark.parametrize("via", ["http", "grpc"])
def test_finer_range_digests_are_checked_unit_by_unit(tmp_path, monkeypatch, via):
    """Range digests of 1 MiB (LORASERVE_RANGE_DIGEST_BYTES at upload) under the clients' 4 MiB ranges: the HTTP
    side checks and hands on each 1 MiB as it arrives, the gRPC side checks a range's four digests; both
    take the good artifact and name the damaged piece of the other."""
    from loraserve.registry import range_digests

    monkeypatch.setattr(range_digests, "RANGE_BYTES", 1 << 20)
    monkeypatch.setattr(blob_fetch, "BLOB_HTTP", via == "http")
    cfg = RegistryConfig(data_dir=tmp_path / "registry", blob_port=0 if via == "http" else None)
    with RunningRegistry(cfg) as reg:
        with RegistryClient(reg.address) as client:
            for name, seed in (("good", 15), ("bad", 16)):
                client.push(write_peft_dir(str(tmp_path / name), SHAPES, num_layers=12, rank=16, seed=seed), name,
                            base_model="tiny")
        resp = _located(reg.address, "bad")
        assert resp.range_digests.range_bytes == 1 << 20 and len(resp.range_digests.sha256) == 6
        with open(reg.service.store.blob_path(resp.adapter.digest[7:]), "r+b") as fh:
            fh.seek((5 << 20) + 10)
            b = fh.read(1)
            fh.seek((5 << 20) + 10)
            fh.write(bytes([b[0] ^ 0xFF]))

        async def fetch(name):
            fetcher = adapter_source.AdapterFetcher(reg.address, str(tmp_path / f"cache-{name}"))
            try:
                f = await fetcher.fetch(name, 1)
                if hasattr(f.data, "wait_verified"):
                    await asyncio.to_thread(f.data.wait_verified)
                    f.data.released.set()  # (as a parser's release: the disk copy need not wait for one)
                await fetcher.flush()
                return f
            finally:
                await fetcher.close()
        f = asyncio.run(fetch("good"))
        assert open(f.path, "rb").read() == _grpc_bytes(reg.address, "good")
        with pytest.raises(DigestMismatchError, match="bytes 5242880-" if via == "http" else r"ranges \[1\]"):
            asyncio.run(fetch("bad"))
