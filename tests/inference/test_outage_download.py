"""Registry killed in the middle of a download (issue 12): the fetch fails as unavailable, the
disk cache keeps no partial artifact, and once the registry is back on its port the same fetch
downloads the whole, verified artifact (no restart of the fetcher). The registry runs as its own
process, killed with SIGKILL: what a crash does."""
from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

from benchmarks.cold_path import RegistryProcess, write_peft_dir
from loraserve.adapters import load_adapter
from loraserve.adapters.bundle import artifact_digest
from loraserve.inference.adapter_source import AdapterFetcher, RegistryUnavailableError
from loraserve.registry.client import RegistryClient

SHAPES = {m: (1024, 1024) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("in_memory", [True, False])
def test_registry_killed_mid_download_leaves_no_partial_file_and_recovers(tmp_path, monkeypatch, in_memory):
    """in_memory: the download goes to memory, its file is written after the digest check (the
    default); else to a temp file first (LORASERVE_FETCH_IN_MEMORY=0)."""
    from loraserve.inference import adapter_source

    monkeypatch.setattr(adapter_source, "FETCH_IN_MEMORY", in_memory)
    src = write_peft_dir(str(tmp_path / "big"), SHAPES, num_layers=24, rank=32, seed=1)  # 44 MB: 42 chunks
    data, cache = str(tmp_path / "registry"), str(tmp_path / "cache")
    reg = RegistryProcess(data).__enter__()
    regs = [reg]
    try:
        with RegistryClient(reg.address) as client:
            client.push(src, "big", base_model="tiny", chunk_size=1 << 20)
        async def main():  # one event loop: the fetcher's channel lives in it
            fetcher = AdapterFetcher(reg.address, cache, timeout_s=10)
            task = asyncio.create_task(fetcher.fetch("big", 1))
            while not task.done():  # the download has begun (a partial file holds a chunk): kill the registry
                parts = [f for f in os.listdir(cache) if f.startswith(".part-")]
                if (in_memory and fetcher._inflight) or (parts and os.path.getsize(os.path.join(cache, parts[0])) > 0):
                    reg.proc.kill()
                    break
                await asyncio.sleep(0.0005)
            (got,) = await asyncio.gather(task, return_exceptions=True)
            if not isinstance(got, BaseException):
                return None
            assert isinstance(got, RegistryUnavailableError), got
            assert [f for f in os.listdir(cache) if f != "refs.json"] == []  # nothing partial, nothing unverified
            # back on the same port: the same fetcher (its channel reconnects) downloads it whole
            regs.append(await asyncio.to_thread(RegistryProcess(data, address=reg.address).__enter__))
            # its channel reconnects within its reconnect backoff (at most 2 s, adapter_source._RECONNECT): a
            # fetch in that window gets UNAVAILABLE, one after it the whole artifact
            deadline = time.monotonic() + 10
            while True:
                try:
                    fetched = await fetcher.fetch("big", 1)
                    break
                except RegistryUnavailableError:
                    assert time.monotonic() < deadline, "the fetcher did not reconnect to the restarted registry"
                    await asyncio.sleep(0.1)
            assert (fetched.data is not None) == in_memory  # verified bytes in hand while the file is written
            await fetcher.close()  # waits for the disk copy
            return fetched

        fetched = asyncio.run(main())
        if fetched is None:
            pytest.skip("the download finished before the registry could be killed")
        assert fetched.downloaded and artifact_digest(fetched.path) == fetched.digest
        adapter = load_adapter(fetched.path, digest=fetched.digest, serving_dtype=torch.bfloat16)
        assert adapter.rank == 32 and len(adapter.weights) == 24 * 7
    finally:
        for r in regs:
            r.__exit__()


def test_adapter_parsed_from_the_downloaded_bytes_equals_the_file(tiny_llama, tmp_path):
    """The fetcher hands over the verified bytes while it writes the disk copy; the manager parses
    them (no file read) into the same weights load_adapter gives for the file, and never alters
    them (the weights are copied out before scales are folded in place: the disk copy stays valid)."""
    import hashlib
    import json

    from loraserve.adapters.testing import make_peft_adapter
    from loraserve.config import LoraConfig, LoRARequest, PeftCacheConfig
    from loraserve.inference.lora.manager import LoRAManager
    from loraserve.inference.models.llama import ModelArgs
    from loraserve.registry.config import RegistryConfig
    from loraserve.registry.testing import RunningRegistry

    model_path, _ = tiny_llama
    with open(os.path.join(model_path, "config.json")) as f:
        args = ModelArgs.from_hf_config(json.load(f))
    src = make_peft_adapter(tmp_path / "a", modules=("q_proj", "v_proj", "down_proj"), r=4, alpha=12, seed=9)
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(str(src), "a", base_model="tiny")

        async def fetch():
            fetcher = AdapterFetcher(reg.address, str(tmp_path / "cache"))
            got = await fetcher.fetch("a", 1)
            await fetcher.close()
            return got

        fetched = asyncio.run(fetch())
    assert fetched.data is not None
    mgr = LoRAManager(LoraConfig(max_lora_rank=8), PeftCacheConfig(), args, torch.float32, torch.device("cpu"))
    hold = mgr.resolve(LoRARequest("a", 1, fetched.path, "hf"), trusted=True, digest=fetched.digest, data=fetched.data)
    ref = load_adapter(fetched.path, serving_dtype=torch.float32)
    assert hold.handle.key == ref.digest == fetched.digest
    assert set(hold.handle.adapter.weights) == set(ref.weights)
    for k, (a, b) in ref.weights.items():
        ga, gb = hold.handle.adapter.weights[k]
        assert torch.equal(ga, a) and torch.equal(gb, b), k
    assert "sha256:" + hashlib.sha256(b"".join(fetched.data.pieces)).hexdigest() == fetched.digest  # untouched
    # a second request by the same digest is served from the known handle, without parsing
    again = mgr.resolve(LoRARequest("a", 2, fetched.path, "hf"), trusted=True, digest=fetched.digest)
    assert again.handle is hold.handle
    hold.release()
    again.release()
    mgr.shutdown()
