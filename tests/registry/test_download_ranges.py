"""DownloadAdapter byte ranges (issue 12: parallel ranged streams for the cold path), through a real
registry on loopback and a real stub: each range is exactly the artifact's bytes there, a range past
the end is OUT_OF_RANGE, and AdapterFetcher's parallel ranged download gives the same verified bytes
as one stream, hashed in artifact order whatever order the ranges complete in."""
from __future__ import annotations

import asyncio
import glob
import hashlib
import os
import random

import grpc
import pytest

from benchmarks.cold_path import write_peft_dir
from loraserve.inference import adapter_source, ranged_download
from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry
from loraserve.v1 import registry_pb2 as pb
from loraserve.v1 import registry_pb2_grpc

SHAPES = {m: (256, 256) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    src = write_peft_dir(str(root / "src"), SHAPES, num_layers=4, rank=16, seed=3)  # ~0.9 MB tar
    with RunningRegistry(RegistryConfig(data_dir=root / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(src, "ranged", base_model="tiny")
        with grpc.insecure_channel(reg.address) as ch:
            whole = b"".join(m.chunk for m in registry_pb2_grpc.RegistryServiceStub(ch).DownloadAdapter(
                pb.DownloadAdapterRequest(name="ranged", version=1)) if m.WhichOneof("payload") == "chunk")
        yield reg, whole


def _range(address: str, offset: int, length: int, chunk: int = 16 << 10) -> tuple[str, bytes]:
    with grpc.insecure_channel(address) as ch:
        msgs = list(registry_pb2_grpc.RegistryServiceStub(ch).DownloadAdapter(
            pb.DownloadAdapterRequest(name="ranged", version=1, chunk_size=chunk, offset=offset, length=length)))
    assert msgs[0].WhichOneof("payload") == "adapter"
    return msgs[0].adapter.digest, b"".join(m.chunk for m in msgs[1:])


def test_each_range_is_the_artifacts_bytes_there(registry):
    reg, whole = registry
    assert len(whole) > 100_000
    for offset, length in ((0, 1), (1, 70_001), (len(whole) - 5, 5), (12_345, 0), (len(whole), 0),
                           (len(whole) - 7, 100), (0, 10 ** 12)):  # past the end: cut there, as an HTTP Range
        digest, got = _range(reg.address, offset, length)
        assert got == (whole[offset:offset + length] if length else whole[offset:]), (offset, length)
        assert digest == "sha256:" + hashlib.sha256(whole).hexdigest()  # the whole artifact's, in every range


@pytest.mark.parametrize("offset,length", [(10 ** 9, 0), (10 ** 9, 5), (-1, 4), (0, -1)])
def test_a_range_starting_past_the_end_or_negative_is_refused(registry, offset, length):
    reg, whole = registry
    with pytest.raises(grpc.RpcError) as err:
        _range(reg.address, offset, length)
    code = err.value.code()
    assert code == (grpc.StatusCode.INVALID_ARGUMENT if min(offset, length) < 0 else grpc.StatusCode.OUT_OF_RANGE)
    assert "ranged" in err.value.details() or min(offset, length) < 0


@pytest.mark.parametrize("streams,range_bytes,raw", [(3, 64 << 10, False), (8, 100_000, False), (2, 1 << 30, False),
                                                     (3, 64 << 10, True), (2, 1 << 30, True)])
def test_parallel_ranged_fetch_gives_the_verified_artifact(registry, tmp_path, monkeypatch, streams, range_bytes, raw):
    """raw: the responses split by hand (LORASERVE_DOWNLOAD_RAW), chunks as memoryviews of the messages."""
    reg, whole = registry
    monkeypatch.setattr(ranged_download, "DOWNLOAD_RAW", raw)
    monkeypatch.setattr(ranged_download, "DOWNLOAD_STREAMS", streams)
    monkeypatch.setattr(ranged_download, "RANGE_BYTES", range_bytes)

    async def main():
        fetcher = adapter_source.AdapterFetcher(reg.address, str(tmp_path / "cache"))
        f = await fetcher.fetch("ranged", 1)
        await fetcher.close()  # the disk copy written
        return f

    f = asyncio.run(main())
    assert f.downloaded and f.data is not None
    assert b"".join(bytes(p) for p in f.data.pieces) == whole
    assert f.digest == "sha256:" + hashlib.sha256(whole).hexdigest()
    assert open(f.path, "rb").read() == whole


def test_in_order_hasher_hashes_in_artifact_order_whatever_order_ranges_arrive():
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(0)
    blob = rng.randbytes(300_000)
    ranges = ranged_download.plan_ranges(len(blob), 40_000)
    assert sum(n for _, n in ranges) == len(blob) and ranges[-1][1] == 300_000 - 7 * 40_000
    pieces = [[blob[o + i:o + min(i + 7_000, n)] for i in range(0, n, 7_000)] for o, n in ranges]
    events = [(r, k) for r, ps in enumerate(pieces) for k in range(len(ps) + 1)]  # k == len: the range ends
    rng.shuffle(events)
    events.sort(key=lambda e: (e[0], e[1]))  # within a range: in order ...
    per_range = {r: [e for e in events if e[0] == r] for r in range(len(ranges))}
    order = []
    while any(per_range.values()):  # ... across ranges: interleaved at random
        r = rng.choice([r for r, evs in per_range.items() if evs])
        order.append(per_range[r].pop(0))
    with ThreadPoolExecutor(1) as pool:
        h = ranged_download._InOrderHasher(len(ranges), pool)
        for r, k in order:
            h.finish(r) if k == len(pieces[r]) else h.add(r, pieces[r][k])
        got = asyncio.run(h.digest())
    assert got == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert b"".join(h.ordered()) == blob


def test_staged_fetch_lands_in_the_arena_block_and_parses_without_a_copy(registry, tmp_path, monkeypatch):
    """stage_alloc given (the engine's pinned arena; pageable here): each message is copied to its offset
    in one block and written to its offset in the disk copy as it arrives; the parser's weights are views
    of that block (no read copy), equal to the weights parsed from the file; the block goes back to the
    arena when released, and a second fetch of the same bytes (a waiter) never gets the block."""
    import torch

    from loraserve.adapters import load_adapter
    from loraserve.adapters.archives import StagedArtifact
    from loraserve.inference.lora.pinned_arena import PinnedArena

    reg, whole = registry
    monkeypatch.setattr(ranged_download, "DOWNLOAD_STREAMS", 3)
    monkeypatch.setattr(ranged_download, "RANGE_BYTES", 64 << 10)
    arena = PinnedArena(4 << 20, [], pin=False)

    def stage_alloc(n):
        block = arena.alloc(n)
        return None if block is None else StagedArtifact(block, block, arena.release)

    async def main():
        fetcher = adapter_source.AdapterFetcher(reg.address, str(tmp_path / "cache"), stage_alloc=stage_alloc)
        first, second = await asyncio.gather(fetcher.fetch("ranged", 1), fetcher.fetch("ranged", 1))
        await fetcher.close()
        return first, second

    got = asyncio.run(main())
    f, waiter = sorted(got, key=lambda x: x.data is None)
    assert isinstance(f.data, StagedArtifact) and waiter.data is None  # the block is the downloader's alone
    assert bytes(f.data.buf.numpy()) == whole and open(f.path, "rb").read() == whole
    used = arena.num_used
    assert used >= len(whole)
    staged = load_adapter(f.path, digest=f.digest, data=f.data, values_verified=True)
    ref = load_adapter(f.path, digest=f.digest)
    assert staged.weights.keys() == ref.weights.keys()
    lo, hi = f.data.buf.data_ptr(), f.data.buf.data_ptr() + len(whole)
    for k, (a, b) in ref.weights.items():
        sa, sb = staged.weights[k]
        assert torch.equal(sa, a) and torch.equal(sb, b), k
        assert lo <= sa.data_ptr() < hi and lo <= sb.data_ptr() < hi, k  # views of the block, not copies
    with pytest.raises(RuntimeError):
        f.data.take()  # handed to one parser only
    arena.release(f.data.buf)
    arena._reclaim(wait=True)
    assert arena.num_used == 0


def test_values_verified_skips_only_the_value_scans(tmp_path):
    """A registry-verified artifact is not scanned value by value again (the registry refused NaN at
    upload); the same bytes without values_verified are refused; the structure is checked either way."""
    import json

    import torch
    from safetensors.torch import save_file

    from loraserve.adapters import AdapterFormatError, load_adapter

    d = tmp_path / "nan"
    d.mkdir()
    a, b = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(32, 4, dtype=torch.bfloat16)
    b[3, 1] = float("nan")
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                       "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterFormatError, match="NaN|non-finite|overflow"):
        load_adapter(d, serving_dtype=torch.bfloat16)
    got = load_adapter(d, serving_dtype=torch.bfloat16, digest="sha256:" + "0" * 64, values_verified=True)
    assert torch.equal(got.weights[(0, "q_proj")][0], a)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 4}))
    with pytest.raises(AdapterFormatError, match="rank 8"):
        load_adapter(d, digest="sha256:" + "0" * 64, values_verified=True)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 1 << 20, (1 << 20) + 3])
def test_split_download_response_matches_protobuf(size):
    """The hand split of a chunk message gives exactly the bytes protobuf decodes (varint lengths of
    1-3 bytes); an adapter message (or an empty chunk) is decoded by protobuf itself."""
    data = random.Random(size).randbytes(size)
    wire = pb.DownloadAdapterResponse(chunk=data).SerializeToString()
    got = ranged_download.split_download_response(wire)
    if isinstance(got, memoryview):
        assert bytes(got) == data
    else:
        assert got.chunk == data
    meta = pb.DownloadAdapterResponse(adapter=pb.AdapterVersion(name="x", version=3, digest="sha256:" + "a" * 64))
    back = ranged_download.split_download_response(meta.SerializeToString())
    assert back.WhichOneof("payload") == "adapter" and back.adapter.version == 3


def test_ranges_from_an_s3_store_are_ranged_gets(start_registry, s3_bucket, tmp_path):
    """An S3-backed registry serves a range with a ranged GET (moto's S3 server over HTTP on loopback):
    the bytes equal the same range of the whole download, a range past the end is cut there, and the
    fetcher's parallel ranged download from it verifies."""
    cfg, _ = s3_bucket
    src = write_peft_dir(str(tmp_path / "src"), SHAPES, num_layers=2, rank=8, seed=4)
    reg = start_registry(store="s3", s3=cfg)
    with RegistryClient(reg.address) as client:
        client.push(src, "ranged", base_model="tiny")
    with grpc.insecure_channel(reg.address) as ch:
        whole = b"".join(m.chunk for m in registry_pb2_grpc.RegistryServiceStub(ch).DownloadAdapter(
            pb.DownloadAdapterRequest(name="ranged", version=1)) if m.WhichOneof("payload") == "chunk")
    for offset, length in ((0, 1000), (5_000, 70_000), (len(whole) - 10, 500), (777, 0)):
        _, got = _range(reg.address, offset, length)
        assert got == (whole[offset:offset + length] if length else whole[offset:]), (offset, length)

    async def main():
        fetcher = adapter_source.AdapterFetcher(reg.address, str(tmp_path / "cache"))
        f = await fetcher.fetch("ranged", 1)
        await fetcher.close()
        return f

    ranged_download.RANGE_BYTES, saved = 32 << 10, ranged_download.RANGE_BYTES
    try:
        f = asyncio.run(main())
    finally:
        ranged_download.RANGE_BYTES = saved
    assert f.digest == "sha256:" + hashlib.sha256(whole).hexdigest() and open(f.path, "rb").read() == whole


def test_later_ranges_skip_the_lookup_but_not_past_a_delete(tmp_path):
    """A ranged download's later ranges (offset > 0) reuse the version's record for a few seconds
    (its artifact never changes); a delete drops that at once: the next range is NOT_FOUND."""
    src = write_peft_dir(str(tmp_path / "src"), SHAPES, num_layers=2, rank=8, seed=5)
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(src, "gone", base_model="tiny")
            with grpc.insecure_channel(reg.address) as ch:
                stub = registry_pb2_grpc.RegistryServiceStub(ch)

                def later_range():
                    return b"".join(m.chunk for m in stub.DownloadAdapter(pb.DownloadAdapterRequest(
                        name="gone", version=1, offset=1000, length=5000)) if m.WhichOneof("payload") == "chunk")
                first, again = later_range(), later_range()  # the second from the remembered record
                assert first == again and len(first) == 5000
                client.delete("gone", 1)
                with pytest.raises(grpc.RpcError) as err:
                    later_range()
                assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("damage", ["none", "blob", "digests"])
def test_range_digests_check_each_range_and_catch_a_damaged_blob(tmp_path, monkeypatch, damage):
    """The registry keeps each range's sha256 (computed at upload from the verified bytes) beside the
    blob and sends them with a download's first message; the fetcher then checks every range on its
    own threads instead of hashing the whole artifact in order. A blob damaged after upload (or damaged
    range digests) fails the check: DigestMismatchError, nothing cached."""
    from loraserve.inference.errors import DigestMismatchError
    from loraserve.registry import range_digests

    monkeypatch.setattr(range_digests, "RANGE_BYTES", 64 << 10)   # the registry's ranges ...
    monkeypatch.setattr(ranged_download, "RANGE_BYTES", 64 << 10)  # ... and the client's: the same plan
    monkeypatch.setattr(ranged_download, "DOWNLOAD_STREAMS", 3)
    src = write_peft_dir(str(tmp_path / "src"), SHAPES, num_layers=4, rank=16, seed=6)
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(src, "checked", base_model="tiny")
        (blob,) = glob.glob(str(tmp_path / "registry" / "artifacts" / "blobs" / "sha256" / ("[0-9a-f]" * 64)))
        whole = open(blob, "rb").read()
        with grpc.insecure_channel(reg.address) as ch:
            first = next(iter(registry_pb2_grpc.RegistryServiceStub(ch).DownloadAdapter(
                pb.DownloadAdapterRequest(name="checked", version=1, offset=0, length=10))))
        rd = first.range_digests
        assert rd.range_bytes == 64 << 10 and list(rd.sha256) == [
            hashlib.sha256(whole[i:i + (64 << 10)]).digest() for i in range(0, len(whole), 64 << 10)]
        if damage == "blob":
            with open(blob, "r+b") as fh:
                fh.seek(len(whole) // 2)
                fh.write(bytes([whole[len(whole) // 2] ^ 1]))
        elif damage == "digests":
            side = blob + ".ranges"
            raw = bytearray(open(side, "rb").read())
            raw[-1] ^= 1
            open(side, "wb").write(bytes(raw))
            reg.service._range_digests.clear()

        async def main():
            fetcher = adapter_source.AdapterFetcher(reg.address, str(tmp_path / "cache"))
            try:
                return await fetcher.fetch("checked", 1)
            finally:
                await fetcher.close()

        if damage == "none":
            f = asyncio.run(main())
            assert b"".join(bytes(p) for p in f.data.pieces) == whole and open(f.path, "rb").read() == whole
        else:
            with pytest.raises(DigestMismatchError, match="range"):
                asyncio.run(main())
            assert [n for n in os.listdir(tmp_path / "cache") if n != "refs.json"] == []
