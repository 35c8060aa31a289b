"""Upload -> get -> list -> download round trips over real gRPC, on a local and an S3 store."""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import grpc
import pytest

from loraserve.adapters import load_adapter
from loraserve.registry.client import RegistryClient
from loraserve.registry.store import RANGES_SUFFIX
from loraserve.v1 import registry_pb2 as pb
from loraserve.v1 import registry_pb2_grpc as pb_grpc


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def blob_keys_s3(client, cfg) -> list[str]:  # type: ignore[no-untyped-def]
    resp = client.list_objects_v2(Bucket=cfg.bucket, Prefix=cfg.prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


@pytest.fixture(params=["local", "s3"])
def store_registry(request, start_registry):  # type: ignore[no-untyped-def]
    """(registry, list_blobs()) for a local-directory store and for moto's S3 server."""
    if request.param == "local":
        reg = start_registry()
        blob_dir = reg.config.data_dir / "artifacts" / "blobs" / "sha256"
        return reg, lambda: sorted(p.name for p in blob_dir.iterdir())
    cfg, s3 = request.getfixturevalue("s3_bucket")
    reg = start_registry(store="s3", s3=cfg)
    return reg, lambda: [k.rsplit("/", 1)[-1] for k in blob_keys_s3(s3, cfg) if "/blobs/sha256/" in k]


@pytest.mark.parametrize("packing", ["tar", "tar.gz", "zip", "dir"])
def test_hf_round_trip(store_registry, artifacts, tmp_path: Path, packing: str) -> None:  # type: ignore[no-untyped-def]
    reg, list_blobs = store_registry
    src = artifacts(seed=1, packing=packing, r=8)
    with RegistryClient(reg.address) as c:
        resp = c.push(src, "sql-lora", base_model="tiny-llama", description="demo", tags={"team": "nlp"})
        a = resp.adapter
        assert (a.name, a.version, a.format, a.base_model) == ("sql-lora", 1, pb.ADAPTER_FORMAT_HF, "tiny-llama")
        assert (a.rank, a.alpha, list(a.target_modules), a.num_layers) == (8, 8.0, ["q_proj", "v_proj"], 2)
        assert a.is_latest and dict(a.tags) == {"team": "nlp"} and a.description == "demo"
        assert a.created_at.seconds > 0 and not resp.deduplicated
        if packing != "dir":  # the digest is that of the bytes sent
            assert a.digest == sha256_of(src) and a.size_bytes == src.stat().st_size
        assert list_blobs() == [a.digest.removeprefix("sha256:")]

        got = c.get("sql-lora")
        assert got == a and c.get("sql-lora", 1) == a and c.get("sql-lora", "latest") == a
        assert [x.name for x in c.list()] == ["sql-lora"]

        out = c.pull("sql-lora", "latest", tmp_path)
        assert sha256_of(out) == a.digest
        if packing != "dir":
            assert out.read_bytes() == src.read_bytes()
    # the downloaded artifact parses to the same weights as the source
    ref, back = load_adapter(src), load_adapter(out)
    assert ref.weights.keys() == back.weights.keys()
    for k in ref.weights:
        assert all((x == y).all() for x, y in zip(ref.weights[k], back.weights[k]))


def test_nemo_round_trip(store_registry, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg, _ = store_registry
    src = artifacts(seed=2, kind="nemo", packing="tar")
    with RegistryClient(reg.address) as c:
        a = c.push(src, "nemo-lora", format="nemo").adapter
        assert a.format == pb.ADAPTER_FORMAT_NEMO and a.artifact_type == "nemo"
        assert set(a.target_modules) == {"q_proj", "k_proj", "v_proj"}
        out = c.pull("nemo-lora", 1, tmp_path / "x.nemo")
    assert out.read_bytes() == src.read_bytes()


def test_declared_format_must_match(client: RegistryClient, artifacts) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        client.push(artifacts(seed=3), "wrong", format="nemo")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "format" in err.value.details()


def test_directory_push_is_deterministic(start_registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    """The same directory pushed twice is the same bytes: ALREADY_EXISTS for the same name,
    one shared blob under another name."""
    reg = start_registry()
    src = artifacts(seed=4, packing="dir")
    with RegistryClient(reg.address) as c:
        first = c.push(src, "dir-a").adapter
        with pytest.raises(grpc.RpcError) as err:
            c.push(src, "dir-a")
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "version 1" in err.value.details()
        second = c.push(src, "dir-b")
    assert second.deduplicated and second.adapter.digest == first.digest
    blobs = list((reg.config.data_dir / "artifacts" / "blobs" / "sha256").iterdir())
    assert len(blobs) == 1
    with tarfile.open(blobs[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert all(m.mtime == 0 and m.uid == 0 and m.isfile() for m in members)


def test_dedup_and_delete_keeps_shared_blob(store_registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    reg, list_blobs = store_registry
    src = artifacts(seed=5)
    with RegistryClient(reg.address) as c:
        a = c.push(src, "one").adapter
        b = c.push(src, "two")
        assert b.deduplicated and b.adapter.digest == a.digest
        assert len(list_blobs()) == 1
        assert c.delete("one", 1) == [1]
        assert len(list_blobs()) == 1  # still used by "two"
        assert c.delete("two", all_versions=True) == [1]
        assert list_blobs() == []


def test_download_stream_shape_and_digest(client: RegistryClient, registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    """Raw stub: metadata first, then chunks of at most the requested size that hash to the digest."""
    src = artifacts(seed=6, packing="tar.gz")
    client.push(src, "raw")
    stub = pb_grpc.RegistryServiceStub(grpc.insecure_channel(registry.address))
    msgs = list(stub.DownloadAdapter(pb.DownloadAdapterRequest(name="raw", alias="latest", chunk_size=16 << 10)))
    assert msgs[0].WhichOneof("payload") == "adapter"
    chunks = [m.chunk for m in msgs[1:]]
    assert all(m.WhichOneof("payload") == "chunk" for m in msgs[1:]) and all(len(x) <= 16 << 10 for x in chunks)
    data = b"".join(chunks)
    assert data == src.read_bytes() and "sha256:" + hashlib.sha256(data).hexdigest() == msgs[0].adapter.digest


def test_pull_refuses_bytes_that_do_not_match(start_registry, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Corrupt the stored blob behind the server's back: the client must refuse and leave no file."""
    from loraserve.registry.client import DigestMismatchError

    registry = start_registry()
    with RegistryClient(registry.address) as c:
        a = c.push(artifacts(seed=7), "tamper").adapter
        blob = registry.config.data_dir / "artifacts" / "blobs" / "sha256" / a.digest.removeprefix("sha256:")
        data = bytearray(blob.read_bytes())
        data[1000] ^= 0xFF
        blob.write_bytes(bytes(data))
        with pytest.raises(DigestMismatchError):
            c.pull("tamper", 1, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists() and not (tmp_path / "out.tar.part").exists()


def test_s3_multipart_upload(start_registry, s3_bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An artifact over the multipart threshold (5 MiB here) goes up in parts and comes back intact."""
    from loraserve.adapters.testing import make_peft_adapter

    cfg, s3 = s3_bucket
    src = make_peft_adapter(tmp_path / "big.tar", r=64, modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"), num_layers=24,
                            packing="tar")
    assert src.stat().st_size > cfg.multipart_threshold
    reg = start_registry(store="s3", s3=cfg)
    with RegistryClient(reg.address) as c:
        a = c.push(src, "big").adapter
        out = c.pull("big", 1, tmp_path / "back.tar")
    assert out.read_bytes() == src.read_bytes()
    blob = f"{cfg.prefix}blobs/sha256/{a.digest.removeprefix('sha256:')}"
    # the temp key gone; beside the blob only its range digests (the parallel ranged download checks them)
    assert blob_keys_s3(s3, cfg) == [blob, blob + RANGES_SUFFIX]
    keys = [blob]
    head = s3.head_object(Bucket=cfg.bucket, Key=keys[0])
    assert head["ContentLength"] == src.stat().st_size


def test_s3_gc(start_registry, s3_bucket, artifacts) -> None:  # type: ignore[no-untyped-def]
    """gc on an S3 store removes orphan blobs and temp keys (old enough), never a referenced blob."""
    cfg, s3 = s3_bucket
    reg = start_registry(store="s3", s3=cfg)
    with RegistryClient(reg.address) as c:
        a = c.push(artifacts(seed=8), "kept").adapter
    s3.put_object(Bucket=cfg.bucket, Key=f"{cfg.prefix}blobs/sha256/{'cd' * 32}", Body=b"orphan")
    s3.put_object(Bucket=cfg.bucket, Key=f"{cfg.prefix}tmp/0123abcd", Body=b"half")
    assert reg.service.gc().kept_young == 2  # both younger than the default hour
    report = reg.service.gc(min_age_seconds=0)
    assert report.removed_blobs == ["cd" * 32] and report.removed_temp == ["tmp/0123abcd"]
    assert blob_keys_s3(s3, cfg) == [f"{cfg.prefix}blobs/sha256/{a.digest.removeprefix('sha256:')}"]
