"""The disk-cache copy of a cold adapter fetched over the registry's blob side channel (issue 12's cold path):
written only once the parser released the staged bytes (blob_source.DISK_COPY_AFTER_PARSE), so its 84 MB of
page-cache writes run beside the request's first step and not beside the download and parse it waits for; the
copy holds the bytes as downloaded although the parser folded the scales into the staged block in place.
Real registry (gRPC + blob port) on loopback; the manager's arena is pageable here (PinnedArena(pin=False))."""
from __future__ import annotations

import os
import time

import pytest
import torch

from benchmarks.cold_path import LLAMA3_8B_ARGS, LoopThread, write_peft_dir
from loraserve.adapters import load_adapter
from loraserve.adapters.archives import StagedArtifact
from loraserve.adapters.bundle import artifact_digest
from loraserve.config import LoraConfig, LoRARequest, PeftCacheConfig
from loraserve.inference import adapter_source, blob_fetch, blob_source
from loraserve.inference.lora.manager import LoRAManager
from loraserve.inference.lora.pinned_arena import PinnedArena, release_blocks
from loraserve.inference.models.llama import ModelArgs
from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry

# 12 layers of 512/1024-wide modules, rank 16: ~4.5 MB, two 4 MiB ranges over HTTP
ARGS = ModelArgs(**dict(LLAMA3_8B_ARGS, num_hidden_layers=12, hidden_size=512, intermediate_size=1024,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=1000))


@pytest.fixture
def stack(tmp_path, monkeypatch):
    monkeypatch.setattr(blob_fetch, "BLOB_HTTP", True)
    monkeypatch.setattr(blob_source, "DISK_COPY_AFTER_PARSE", True)
    monkeypatch.setattr(adapter_source, "FETCH_OVERLAP", True)
    # alpha 24 on rank 16: a scale of 1.5 that the parse folds into each staged B in place
    src = write_peft_dir(str(tmp_path / "src"), ARGS.lora_module_shapes(), 12, 16, seed=5, alpha=24.0)
    mgr = LoRAManager(LoraConfig(max_lora_rank=16, max_loras=1, max_cpu_loras=4),
                      PeftCacheConfig(num_device_module_layer=2 * 12 * 7), ARGS, torch.bfloat16, torch.device("cpu"))
    mgr.arena = PinnedArena(32 << 20, [], pin=False)   # as on CUDA, where the manager makes a pinned one
    mgr.host.on_drop = lambda adapter: release_blocks(mgr.arena, adapter)
    loop = LoopThread()
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry", blob_port=0)) as reg:
        with RegistryClient(reg.address) as client:
            client.push(src, "a", base_model="tiny")
        fetcher = adapter_source.AdapterFetcher(reg.address, str(tmp_path / "cache"), stage_alloc=mgr.staging_alloc)
        yield src, mgr, fetcher, loop
        loop.run(fetcher.close())
    loop.close()
    mgr.shutdown()


def test_disk_copy_waits_for_the_parser_and_keeps_the_downloaded_bytes(stack):
    src, mgr, fetcher, loop = stack
    f = loop.run(fetcher.fetch("a", 1))
    assert isinstance(f.data, StagedArtifact)
    f.data.wait_verified()
    time.sleep(0.3)
    assert not os.path.exists(f.path), "the disk copy was written before the parser released the bytes"
    hold = mgr.resolve(LoRARequest("a:1", 1, f.path, "hf"), trusted=True, digest=f.digest, data=f.data)
    assert fetcher.blob_downloads == 1
    loop.run(fetcher.flush())
    assert artifact_digest(f.path) == f.digest  # as downloaded: not the block whose B the parse folded
    ref = load_adapter(src)
    for k, (a, b) in ref.weights.items():
        got = hold.handle.adapter.weights[k]
        assert torch.equal(got[0], a) and torch.equal(got[1], b), k
    hold.release()


def test_disk_copy_of_bytes_nobody_parses_is_written_after_the_wait(stack, monkeypatch):
    _, _, fetcher, loop = stack
    monkeypatch.setattr(blob_source, "DISK_COPY_WAIT_S", 0.2)
    f = loop.run(fetcher.fetch("a", 1))
    t0 = time.perf_counter()
    loop.run(fetcher.flush())  # never released: written once the wait ran out
    assert 0.15 < time.perf_counter() - t0 < 5
    assert artifact_digest(f.path) == f.digest
    f.data.release()


def test_a_fetcher_lowers_the_switch_interval_as_the_service_does(tmp_path):
    """Download threads beside a parser need the GIL for microseconds at a time: AdapterFetcher lowers Python's
    switch interval to FETCH_SWITCH_INTERVAL_S (AsyncLLM's 0.5 ms), never raises it."""
    import sys

    prev = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        adapter_source.AdapterFetcher(None, str(tmp_path / "c1"))
        assert sys.getswitchinterval() == pytest.approx(adapter_source.FETCH_SWITCH_INTERVAL_S)
        sys.setswitchinterval(0.0001)
        adapter_source.AdapterFetcher(None, str(tmp_path / "c2"))
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(prev)
