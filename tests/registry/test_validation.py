"""Bad uploads: each malformed artifact and each malformed stream is refused with
INVALID_ARGUMENT and a message that says what is wrong, and leaves nothing behind
(no DB row, no blob, no temp file); the server keeps serving."""
from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loraserve.adapters.testing import CORPUS_LIMITS, PWNED_MARKER, make_malformed_corpus
from loraserve.registry.client import RegistryClient
from loraserve.v1 import registry_pb2 as pb

# A word the refusal of each corpus entry must mention (checks the message is about the defect).
EXPECTED_WORDS = {
    "tar_member_dotdot": "..", "tar_member_absolute_path": "absolute", "tar_member_symlink": "link",
    "tar_member_hardlink": "link", "zip_member_dotdot": "..", "zip_member_symlink": "link",
    "hf_nan_values": "nan", "hf_inf_values": "inf", "rank_over_max_rank": "rank",
    "not_an_archive": "archive", "empty_file": "empty", "hf_pickled_code_bin": "",
}


def leftovers(data_dir: Path) -> dict[str, list]:
    """Everything a refused upload could have left: rows, blobs, temp files."""
    con = sqlite3.connect(data_dir / "registry.db")
    try:
        rows = con.execute("SELECT name FROM adapters").fetchall() + con.execute(
            "SELECT digest FROM adapter_versions").fetchall()
    finally:
        con.close()
    art = data_dir / "artifacts"
    return {"rows": rows, "blobs": sorted((art / "blobs" / "sha256").iterdir()), "tmp": sorted((art / "tmp").iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, Path]]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_malformed_corpus(root)


def test_malformed_corpus_rejected(start_registry, corpus, artifacts) -> None:  # type: ignore[no-untyped-def]
    root, entries = corpus
    assert len(entries) >= 20
    reg = start_registry(max_rank=CORPUS_LIMITS["max_rank"], max_artifact_bytes=CORPUS_LIMITS["max_bytes"])
    empty = leftovers(reg.config.data_dir)
    refused = []
    with RegistryClient(reg.address) as c:
        for name, path in entries:
            with pytest.raises(grpc.RpcError) as err:
                c.push(path, f"bad-{name}".replace("_", "-"))
            code, msg = err.value.code(), err.value.details()
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {code} {msg}"
            assert len(msg) > 15, f"{name}: message too vague: {msg!r}"
            assert path.name in msg or "artifact" in msg  # names what the client sent, not a temp file
            assert EXPECTED_WORDS.get(name, "") in msg.lower(), \
                f"{name}: {msg!r}"
            assert leftovers(reg.config.data_dir) == empty, f"{name} left something behind"
            refused.append(name)
        # still serving, and a good artifact still goes in under the same limits
        assert c.push(artifacts(seed=80), "good").adapter.version == 1
    assert len(refused) == len(entries)
    assert not list(root.rglob(PWNED_MARKER)) and not Path("/tmp/loraserve_escaped.txt").exists()


def raw_upload(stub, messages: list[pb.UploadAdapterRequest]) -> pb.UploadAdapterResponse:  # type: ignore[no-untyped-def]
    def it() -> Iterator[pb.UploadAdapterRequest]:
        yield from messages
    return stub.UploadAdapter(it())


def test_malformed_streams(start_registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    registry = start_registry()
    client = RegistryClient(registry.address)
    data = artifacts(seed=81).read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    meta = pb.UploadAdapterMetadata(name="s", filename="s.tar")
    chunk = pb.UploadAdapterRequest(chunk=data)
    cases = {
        "first UploadAdapterRequest must carry metadata": [chunk],
        "empty upload": [],
        "no chunks": [pb.UploadAdapterRequest(metadata=meta)],
        "only the first": [pb.UploadAdapterRequest(metadata=meta), chunk, pb.UploadAdapterRequest(metadata=meta)],
        "announced": [pb.UploadAdapterRequest(metadata=pb.UploadAdapterMetadata(name="s", size_bytes=len(data) + 1)),
                      chunk],
        "not the announced": [pb.UploadAdapterRequest(metadata=pb.UploadAdapterMetadata(
            name="s", digest="sha256:" + "0" * 64)), chunk],
        "bad adapter name": [pb.UploadAdapterRequest(metadata=pb.UploadAdapterMetadata(name="../etc")), chunk],
        "name is required": [pb.UploadAdapterRequest(metadata=pb.UploadAdapterMetadata()), chunk],
        "digest must look like": [pb.UploadAdapterRequest(metadata=pb.UploadAdapterMetadata(name="s", digest="md5:1")),
                                  chunk],
    }
    for expected, messages in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            raw_upload(client.stub, messages)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in err.value.details(), (expected, err.value.details())
    ok = raw_upload(client.stub, [pb.UploadAdapterRequest(metadata=pb.UploadAdapterMetadata(
        name="s", size_bytes=len(data), digest=digest)), chunk])
    assert ok.adapter.digest == digest
    assert leftovers(registry.config.data_dir)["tmp"] == []


def test_size_limit_stops_the_stream(start_registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    reg = start_registry(max_artifact_bytes=10_000)
    with RegistryClient(reg.address) as c, pytest.raises(grpc.RpcError) as err:
        c.push(artifacts(seed=82), "too-big", chunk_size=4096)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_artifact_bytes" in err.value.details()
    assert leftovers(reg.config.data_dir) == {"rows": [], "blobs": [], "tmp": []}


def test_rank_limit(start_registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    reg = start_registry(max_rank=4)
    with RegistryClient(reg.address) as c:
        assert c.push(artifacts(seed=83, r=4), "ok").adapter.rank == 4
        with pytest.raises(grpc.RpcError) as err:
            c.push(artifacts(seed=84, r=8), "over")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rank" in err.value.details()


def test_client_giving_up_mid_upload_leaves_nothing(start_registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    """A client that cancels half-way: the server drops the staging file and keeps serving."""
    import threading

    from .conftest import wait_for

    reg = start_registry()
    data = artifacts(seed=85, r=16).read_bytes()
    staging = reg.config.data_dir / "artifacts" / "tmp"
    hold = threading.Event()

    def half() -> Iterator[pb.UploadAdapterRequest]:
        yield pb.UploadAdapterRequest(metadata=pb.UploadAdapterMetadata(name="gone"))
        yield pb.UploadAdapterRequest(chunk=data[: len(data) // 2])
        hold.wait(30)

    client = RegistryClient(reg.address)
    future = client.stub.UploadAdapter.future(half())
    wait_for(lambda: any(p.stat().st_size > 0 for p in staging.glob("*")), what="bytes in staging")
    future.cancel()
    hold.set()
    wait_for(lambda: not list(staging.iterdir()), timeout=10, what="staging cleaned up")
    assert leftovers(reg.config.data_dir) == {"rows": [], "blobs": [], "tmp": []}
    assert client.push(artifacts(seed=85, r=16), "gone").adapter.version == 1
