"""A cold adapter's download overlapped with its parse (issue 12, LORASERVE_FETCH_OVERLAP): the
fetcher hands the engine's staging block over while ranged streams still fill it; LoRAManager.resolve
parses on another thread, waiting only for the bytes it reads, and keeps nothing before the digest
checked out. Real registry on loopback, real stub; the manager's pinned arena is pageable here
(PinnedArena(pin=False)): the same free-list and ownership logic as on CUDA."""
from __future__ import annotations

import glob
import os

import pytest
import torch

from benchmarks.cold_path import LLAMA3_8B_ARGS, LoopThread, write_peft_dir
from loraserve.adapters import load_adapter
from loraserve.adapters.archives import StagedArtifact
from loraserve.adapters.bundle import artifact_digest
from loraserve.config import LoraConfig, LoRARequest, PeftCacheConfig
from loraserve.inference import adapter_source, ranged_download
from loraserve.inference.errors import DigestMismatchError
from loraserve.inference.lora.manager import LoRAManager
from loraserve.inference.lora.pinned_arena import PinnedArena, release_blocks
from loraserve.inference.models.llama import ModelArgs
from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry

ARGS = ModelArgs(**dict(LLAMA3_8B_ARGS, num_hidden_layers=3, hidden_size=256, intermediate_size=512,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000))


@pytest.fixture(params=[(False, True), (True, False)], ids=["protobuf-range-checks", "raw-split-whole-hash"])
def stack(tmp_path, monkeypatch, request):
    from loraserve.registry import range_digests

    raw, range_checks = request.param
    monkeypatch.setattr(ranged_download, "DOWNLOAD_RAW", raw)  # chunks as memoryviews of the messages
    monkeypatch.setattr(adapter_source, "RANGE_CHECKS", range_checks)  # each range vs the registry's digests
    monkeypatch.setattr(range_digests, "RANGE_BYTES", 64 << 10)      # (the registry's ranges: the client's)
    monkeypatch.setattr(ranged_download, "DOWNLOAD_STREAMS", 3)
    monkeypatch.setattr(ranged_download, "RANGE_BYTES", 64 << 10)   # ~1 MB adapter: ~16 ranges
    monkeypatch.setattr(adapter_source, "FETCH_OVERLAP", True)
    src = write_peft_dir(str(tmp_path / "src"), ARGS.lora_module_shapes(), 3, 16, seed=9, alpha=24.0)
    mgr = LoRAManager(LoraConfig(max_lora_rank=16, max_loras=1, max_cpu_loras=4),
                      PeftCacheConfig(num_device_module_layer=2 * 3 * 7), ARGS, torch.bfloat16, torch.device("cpu"))
    mgr.arena = PinnedArena(8 << 20, [], pin=False)   # as on CUDA, where the manager makes a pinned one
    mgr.host.on_drop = lambda adapter: release_blocks(mgr.arena, adapter)
    loop = LoopThread()
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(src, "a", base_model="tiny")
        fetcher = adapter_source.AdapterFetcher(reg.address, str(tmp_path / "cache"), stage_alloc=mgr.staging_alloc)
        yield src, mgr, fetcher, loop, tmp_path / "registry"
        loop.run(fetcher.close())
    loop.close()
    mgr.shutdown()


def test_overlapped_download_parses_to_the_reference_weights_in_the_arena(stack):
    src, mgr, fetcher, loop, _ = stack
    f = loop.run(fetcher.fetch("a", 1))
    assert isinstance(f.data, StagedArtifact)
    hold = mgr.resolve(LoRARequest("a:1", 1, f.path, "hf"), trusted=True, digest=f.digest, data=f.data)
    ref = load_adapter(src)  # the PEFT dir itself, scales folded, every check on
    got = hold.handle.adapter.weights
    assert got.keys() == ref.weights.keys()
    for k, (a, b) in ref.weights.items():
        assert torch.equal(got[k][0], a) and torch.equal(got[k][1], b), k
        assert mgr.arena.owns(got[k][0]) and mgr.arena.owns(got[k][1]), k  # views of the download's block
    assert "verify_wait_s" in hold.handle.timings and hold.handle.timings["download_s"] > 0
    loop.run(fetcher.flush())  # the disk copy: the bytes as downloaded (the block's B were folded since)
    assert artifact_digest(f.path) == f.digest
    hold.release()


def test_a_corrupt_download_is_refused_and_its_block_goes_back(stack):
    """The registry's stored blob is damaged after upload (a bad disk): the bytes it serves no longer
    hash to the digest it announces. The parse (values unchecked: they are 'verified') succeeds, but
    the adapter is refused at the digest check, its arena block returns, and no file is cached."""
    _, mgr, fetcher, loop, registry_dir = stack
    (blob,) = [p for p in glob.glob(str(registry_dir / "artifacts" / "**" / "*"), recursive=True)
               if os.path.isfile(p) and os.path.getsize(p) > 100_000]
    with open(blob, "r+b") as fh:   # one byte deep inside the weights (not a header)
        fh.seek(os.path.getsize(blob) // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x40]))
    f = loop.run(fetcher.fetch("a", 1))
    with pytest.raises(DigestMismatchError):
        mgr.resolve(LoRARequest("a:1", 1, f.path, "hf"), trusted=True, digest=f.digest, data=f.data)
    mgr.arena._reclaim(wait=True)
    assert mgr.arena.num_used == 0 and not os.path.exists(f.path)
    assert not mgr.handles


def test_staged_artifact_waits_for_exactly_the_bytes_it_is_asked_for():
    """wait_for returns once [start, end) landed, whatever landed elsewhere; a failed download wakes
    every waiter with its error; release() gives the block back only after the download stopped."""
    import threading
    import time

    given_back = []
    buf = torch.zeros(1000, dtype=torch.uint8)
    st = StagedArtifact(buf, buf, given_back.append, in_progress=True)
    st.landed(900, 1000)   # the tail first (the ranged download asks for the last range second)
    st.wait_for(950, 1000)
    st.wait_for(10, 10)     # empty
    done = threading.Event()

    def reader():
        st.wait_for(0, 600)
        done.set()
    threading.Thread(target=reader, daemon=True).start()
    st.landed(0, 300)
    st.landed(400, 600)
    time.sleep(0.05)
    assert not done.is_set()          # [300, 400) is still missing
    st.landed(300, 400)
    assert done.wait(5)
    errors = []

    def blocked():
        try:
            st.wait_for(600, 900)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    t = threading.Thread(target=blocked, daemon=True)
    t.start()
    releaser = threading.Thread(target=st.release, daemon=True)
    releaser.start()
    time.sleep(0.05)
    assert given_back == [] and releaser.is_alive()   # the download may still write into the block
    st.finish(DigestMismatchError("bad bytes"))
    t.join(5)
    releaser.join(5)
    assert isinstance(errors[0], DigestMismatchError) and given_back == [buf]
    with pytest.raises(DigestMismatchError):
        st.wait_verified()
