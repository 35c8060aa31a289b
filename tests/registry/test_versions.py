"""Metadata behaviour over gRPC, on SQLite and on PostgreSQL (the `registry` fixture is
parametrized over both): versions, aliases and latest, tags, delete, pagination, concurrency."""
from __future__ import annotations

import threading

import grpc
import pytest

from loraserve.registry.client import RegistryClient
from loraserve.v1 import registry_pb2 as pb


def code_of(fn) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_versions_aliases_latest(client: RegistryClient, artifacts) -> None:  # type: ignore[no-untyped-def]
    v1 = client.push(artifacts(seed=10), "chat", aliases=["prod"]).adapter
    v2 = client.push(artifacts(seed=11), "chat").adapter
    v3 = client.push(artifacts(seed=12), "chat", aliases=["canary"]).adapter
    assert [v1.version, v2.version, v3.version] == [1, 2, 3]
    assert client.get("chat").version == 3 and client.get("chat", "latest").is_latest
    assert client.get("chat", "prod").version == 1 and list(client.get("chat", 1).aliases) == ["prod"]
    assert client.get("chat", "canary").digest == v3.digest

    moved = client.set_alias("chat", "prod", 2)  # an alias moves, it never names two versions
    assert moved.version == 2 and list(moved.aliases) == ["prod"]
    assert list(client.get("chat", 1).aliases) == []
    client.delete_alias("chat", "canary")
    assert code_of(lambda: client.get("chat", "canary"))[0] == grpc.StatusCode.NOT_FOUND

    code, msg = code_of(lambda: client.set_alias("chat", "latest", 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "latest" in msg
    code, msg = code_of(lambda: client.set_alias("chat", "x", 9))
    assert code == grpc.StatusCode.NOT_FOUND and "version 9" in msg
    assert code_of(lambda: client.get("nope"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.get("chat", 7))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.get("bad name!"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_versions_never_reused(client: RegistryClient, artifacts) -> None:  # type: ignore[no-untyped-def]
    for seed in (20, 21, 22):
        client.push(artifacts(seed=seed), "del", aliases=["prod"] if seed == 21 else [])
    assert client.delete("del", 3) == [3]
    assert client.get("del").version == 2  # latest falls back
    code, msg = code_of(lambda: client.delete("del", 2))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "prod" in msg
    assert client.delete("del", 2, force=True) == [2]
    assert code_of(lambda: client.get("del", "prod"))[0] == grpc.StatusCode.NOT_FOUND
    assert client.push(artifacts(seed=23), "del").adapter.version == 4  # 3 is gone for good
    assert client.delete("del", all_versions=True) == [1, 4]
    code, msg = code_of(lambda: client.get("del"))
    assert code == grpc.StatusCode.NOT_FOUND and "no versions" in msg
    assert code_of(lambda: client.delete("del", 1))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.delete("del"))[0] == grpc.StatusCode.INVALID_ARGUMENT  # neither version nor all
    assert list(client.list()) == []


def test_tags(client: RegistryClient, artifacts) -> None:  # type: ignore[no-untyped-def]
    client.push(artifacts(seed=30), "tagged", tags={"team": "a", "stage": "dev"})
    a = client.tag("tagged", "latest", set={"stage": "prod", "owner": "me"}, remove=["team"])
    assert dict(a.tags) == {"stage": "prod", "owner": "me"}
    assert dict(client.get("tagged", 1).tags) == {"stage": "prod", "owner": "me"}
    a = client.tag("tagged", 1, aliases=["stable"])
    assert list(a.aliases) == ["stable"]
    code, msg = code_of(lambda: client.tag("tagged", 1, set={"bad key!": "x"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tag key" in msg


def test_pagination(client: RegistryClient, artifacts) -> None:  # type: ignore[no-untyped-def]
    expected = []
    for i, name in enumerate(["b-lora", "a-lora", "c-lora", "a-lora", "b-lora", "a-lora", "d-other"]):
        a = client.push(artifacts(seed=40 + i), name, base_model="m2" if name == "c-lora" else "m1").adapter
        expected.append((a.name, a.version))
    expected.sort()
    stub = client.stub
    seen, token, pages = [], "", 0
    while True:
        resp = stub.ListAdapters(pb.ListAdaptersRequest(page_size=2, page_token=token))
        assert len(resp.adapters) <= 2
        seen += [(a.name, a.version) for a in resp.adapters]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert seen == expected and pages == 4
    assert [(a.name, a.version) for a in client.list(page_size=3)] == expected

    assert [(a.name, a.version) for a in client.list(name_prefix="a-")] == [("a-lora", 1), ("a-lora", 2),
                                                                            ("a-lora", 3)]
    assert [a.name for a in client.list(base_model="m2")] == ["c-lora"]
    assert [(a.name, a.version) for a in client.list(latest_only=True, page_size=1)] == [
        ("a-lora", 3), ("b-lora", 2), ("c-lora", 1), ("d-other", 1)]
    assert [a.name for a in client.list(name_prefix="a%")] == []  # LIKE wildcards are escaped

    first = stub.ListAdapters(pb.ListAdaptersRequest(page_size=2))
    code, msg = code_of(lambda: stub.ListAdapters(pb.ListAdaptersRequest(page_size=2, page_token=first.next_page_token,
                                                                         name_prefix="a-")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "filters" in msg
    code, _ = code_of(lambda: stub.ListAdapters(pb.ListAdaptersRequest(page_token="garbage!!")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_uploads_get_distinct_versions(client: RegistryClient, registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    paths = [artifacts(seed=60 + i) for i in range(6)]
    results: dict[int, pb.AdapterVersion] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(paths))

    def push(i: int) -> None:
        try:
            with RegistryClient(registry.address) as c:
                barrier.wait()
                results[i] = c.push(paths[i], "race", chunk_size=16 << 10).adapter
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(a.version for a in results.values()) == list(range(1, len(paths) + 1))
    listed = {a.version: a.digest for a in client.list(name_prefix="race")}
    assert listed == {a.version: a.digest for a in results.values()}
    assert len(set(listed.values())) == len(paths)


def test_same_bytes_same_name_already_exists(client: RegistryClient, artifacts) -> None:  # type: ignore[no-untyped-def]
    client.push(artifacts(seed=70), "dup")
    code, msg = code_of(lambda: client.push(artifacts(seed=70), "dup"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "dup version 1" in msg
    client.push(artifacts(seed=71), "dup")
    again = client.push(artifacts(seed=70), "dup", exist_ok=True)  # idempotent re-push
    assert again.existing and again.deduplicated and again.adapter.version == 1 and not again.adapter.is_latest
    assert [a.version for a in client.list()] == [1, 2]
