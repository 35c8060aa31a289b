"""CUDA: adapter files read straight into pinned memory (no staging copy) land in the GPU slot
exactly as the plain path loads them (load_adapter without an allocator, copied by hand)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from loraserve.adapters import load_adapter
from loraserve.adapters.bundle import Chunks, artifact_digest
from loraserve.adapters.testing import make_peft_adapter
from loraserve.adapters.writer import pack_dir
from loraserve.config import LoraConfig, LoRARequest, PeftCacheConfig, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("packing,file_dtype", [("dir", torch.bfloat16), ("tar", torch.bfloat16),
                                                ("tar-bytes", torch.bfloat16), ("dir", torch.float32),
                                                ("staged", torch.bfloat16)])
def test_pinned_read_lands_in_the_slot_unchanged(tiny_llama, tmp_path, packing, file_dtype, monkeypatch):
    monkeypatch.setenv("LORASERVE_PINNED_READ", "1")   # the default, set explicitly (a runner may export 0)
    from loraserve.inference.lora.host_tier import pinned_views
    from loraserve.inference.lora.manager import LoRAManager
    from loraserve.inference.models.llama import ModelArgs
    from loraserve.inference.sequence import Sequence

    path, _ = tiny_llama
    with open(os.path.join(path, "config.json")) as f:
        args = ModelArgs.from_hf_config(json.load(f))
    src = make_peft_adapter(tmp_path / "a", modules=ALL, r=8, alpha=24.0, dtype=file_dtype, seed=5)
    art = src if packing == "dir" else pack_dir(src, tmp_path / "a.tar", "tar")
    # tar-bytes: the fetcher's verified download in memory (its disk copy still being written)
    raw = art.read_bytes() if packing in ("tar-bytes", "staged") else b""
    data = Chunks([raw[i:i + (1 << 20)] for i in range(0, len(raw), 1 << 20)]) if packing == "tar-bytes" else None
    mgr = LoRAManager(LoraConfig(max_lora_rank=16, max_loras=1), PeftCacheConfig(num_device_module_layer=28),
                      args, torch.bfloat16, torch.device("cuda"))
    if packing == "staged":  # a ranged download landed in an arena block (AdapterFetcher(stage_alloc=...))
        data = mgr.staging_alloc(len(raw))
        data.buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    hold = mgr.resolve(LoRARequest("a", 1, str(art)), trusted=True, digest=artifact_digest(art), data=data)
    h = hold.handle
    # staged: every factor a bf16 view of one pinned block. A bf16 file is served from the block
    # it was read into (header and all: more bytes than the factors); an fp32 one is converted into
    # a staging block that holds exactly the factors. (The H200 run of 2026-11-30 failed here: the
    # test asked pinned_views for "read into", which is also true of the fp32 file's staging copy.)
    assert pinned_views(h.adapter.weights, torch.bfloat16)
    factors = [t for ab in h.adapter.weights.values() for t in ab]
    if packing == "staged":  # served from the download's own block: no read copy, no staging copy
        assert data.consumed and all(data.buf.data_ptr() <= t.data_ptr() < data.buf.data_ptr() + len(raw)
                                     for t in factors)
    factor_bytes = sum(t.numel() * t.element_size() for t in factors)
    assert (factors[0].untyped_storage().nbytes() > factor_bytes) == (file_dtype == torch.bfloat16)
    seq = Sequence("s", [1, 2], SamplingParams(max_tokens=1), lora=hold)
    assert mgr.try_acquire(seq)
    torch.cuda.synchronize()
    ref = load_adapter(art, serving_dtype=torch.bfloat16)
    for (layer, module), (a, b) in ref.weights.items():
        proj, s, off = mgr.slots.slice_index[module]
        assert torch.equal(mgr.slots.a[proj][layer, h.slot, s, :8].cpu(), a.to(torch.bfloat16))
        assert torch.equal(mgr.slots.b[proj][layer, h.slot, off:off + b.shape[0], :8].cpu(), b.to(torch.bfloat16))
    mgr.release_slot(seq)
    mgr.release_request(seq)
    mgr.shutdown()


def test_arena_range_is_reused_only_after_its_copy(tiny_llama, tmp_path, monkeypatch):
    """Adapter a's host copy is dropped while its host->GPU copy still waits on the copy stream
    (queued behind a GPU sleep); adapter b is then read into the arena, which has room for one
    file only, so b must take a's range. The arena waits for a's copy first: a's slot holds a."""
    monkeypatch.setenv("LORASERVE_PINNED_READ", "1")
    from loraserve.inference.lora.manager import LoRAManager
    from loraserve.inference.models.llama import ModelArgs
    from loraserve.inference.sequence import Sequence

    path, _ = tiny_llama
    with open(os.path.join(path, "config.json")) as f:
        args = ModelArgs.from_hf_config(json.load(f))
    srcs = [make_peft_adapter(tmp_path / n, modules=ALL, r=8, alpha=16.0, dtype=torch.bfloat16, seed=s)
            for n, s in (("a", 1), ("b", 2))]
    size = os.path.getsize(srcs[0] / "adapter_model.safetensors")
    mgr = LoRAManager(LoraConfig(max_lora_rank=8, max_loras=2), PeftCacheConfig(num_device_module_layer=56,
                                                                                host_cache_size=size),
                      args, torch.bfloat16, torch.device("cuda"))
    assert mgr.arena is not None and mgr.arena.nbytes < 2 * size
    ha = mgr.resolve(LoRARequest("a", 1, str(srcs[0])), trusted=True, digest=artifact_digest(srcs[0]))
    assert mgr.arena.owns(next(iter(ha.handle.adapter.weights.values()))[0])
    with torch.cuda.stream(mgr.slots.copy_stream):
        torch.cuda._sleep(200_000_000)   # ~0.1 s of GPU time ahead of a's copies on the copy stream
    sa = Sequence("sa", [1, 2], SamplingParams(max_tokens=1), lora=ha)
    assert mgr.try_acquire(sa)          # a's copies are queued, not done
    with mgr.lock:
        mgr.host.drop(ha.handle)         # a's host copy goes; its range is retired until the copy ran
    hb = mgr.resolve(LoRARequest("b", 2, str(srcs[1])), trusted=True, digest=artifact_digest(srcs[1]))
    assert mgr.arena.owns(next(iter(hb.handle.adapter.weights.values()))[0]) and mgr.arena.num_fallbacks == 0
    torch.cuda.synchronize()
    for src, h in ((srcs[0], ha.handle),):
        ref = load_adapter(src, serving_dtype=torch.bfloat16)
        for (layer, module), (a, b) in ref.weights.items():
            proj, s, off = mgr.slots.slice_index[module]
            assert torch.equal(mgr.slots.a[proj][layer, h.slot, s, :8].cpu(), a)
            assert torch.equal(mgr.slots.b[proj][layer, h.slot, off:off + b.shape[0], :8].cpu(), b)
    mgr.release_slot(sa)
    mgr.release_request(sa)
    hb.release()
    mgr.shutdown()
