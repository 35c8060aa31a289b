"""Registry killed in the middle of a download (issue 12): the fetch fails as unavailable, the
disk cache keeps no partial artifact, and once the registry is back on its port the same fetch
downloads the whole, verified artifact (no restart of the fetcher). The registry runs as its own
process, killed with SIGKILL: what a crash does."""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

from benchmarks.cold_path import RegistryProcess, write_peft_dir
from loraserve.adapters import load_adapter
from loraserve.adapters.bundle import artifact_digest
from loraserve.inference.adapter_source import AdapterFetcher, RegistryUnavailableError
from loraserve.registry.client import RegistryClient

SHAPES = {m: (1024, 1024) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def test_registry_killed_mid_download_leaves_no_partial_file_and_recovers(tmp_path):
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
            while not task.done():  # the partial file exists and holds a chunk: kill the registry
                parts = [f for f in os.listdir(cache) if f.startswith(".part-")]
                if parts and os.path.getsize(os.path.join(cache, parts[0])) > 0:
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
            fetched = await fetcher.fetch("big", 1)
            await fetcher.close()
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
