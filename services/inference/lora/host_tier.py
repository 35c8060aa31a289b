"""Host tier of the adapter cache: parsed adapters in host memory (pinned on CUDA), LRU.

Budget: `max_adapters` adapters when set (LoraConfig.max_cpu_loras), else `max_bytes`
(PeftCacheConfig.host_cache_size). A load in flight reserves its bytes first, so the tier
never overshoots and a load that cannot fit is never started (no parse-and-drop spin).
Which entries may be evicted is the caller's policy (`evictable`); this class only keeps
the books. Not thread-safe: LoRAManager calls it under its lock.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0


class HostTier:
    def __init__(self, max_adapters: int | None, max_bytes: int):
        self.max_adapters, self.max_bytes = max_adapters, max_bytes
        self.entries: OrderedDict[str, Any] = OrderedDict()   # key -> AdapterHandle with .adapter set, LRU first
        self.num_bytes = 0
        self.reserved_bytes = 0
        self.num_reserved = 0
        self.stats = TierStats()
        self.on_drop: Callable[[Any], None] | None = None   # adapter -> None (its pinned arena blocks back)

    def fits_at_all(self, nbytes: int) -> bool:
        return self.max_adapters is not None or nbytes <= self.max_bytes

    def _has_room(self, nbytes: int, extra_count: int = 0, extra_bytes: int = 0) -> bool:
        if self.max_adapters is not None:
            return len(self.entries) + self.num_reserved - extra_count + 1 <= self.max_adapters
        return self.num_bytes + self.reserved_bytes - extra_bytes + nbytes <= self.max_bytes

    def make_room(self, nbytes: int, evictable: Callable[[Any], int | None]) -> bool:
        """Evict entries until `nbytes` more fit; all or nothing. evictable(h) -> None (keep) or a
        preference (lower goes first; LRU order breaks ties)."""
        if self._has_room(nbytes):
            return True
        ranked = sorted(((pref, i, h) for i, h in enumerate(self.entries.values())
                         if (pref := evictable(h)) is not None), key=lambda t: (t[0], t[1]))
        victims, freed = [], 0
        for _, _, h in ranked:
            victims.append(h)
            freed += h.nbytes
            if self._has_room(nbytes, len(victims), freed):
                for v in victims:
                    self.drop(v)
                    self.stats.evictions += 1
                return True
        return False

    def reserve(self, nbytes: int) -> None:
        self.num_reserved += 1
        self.reserved_bytes += nbytes

    def unreserve(self, nbytes: int) -> None:
        self.num_reserved -= 1
        self.reserved_bytes -= nbytes

    def put(self, handle, adapter) -> None:
        handle.adapter = adapter
        self.entries[handle.key] = handle
        self.num_bytes += handle.nbytes
        self.stats.misses += 1
        self.stats.bytes_loaded += handle.nbytes

    def touch(self, handle) -> None:
        if handle.key in self.entries:
            self.entries.move_to_end(handle.key)

    def drop(self, handle) -> None:
        if self.entries.pop(handle.key, None) is not None:
            self.num_bytes -= handle.nbytes
        if handle.adapter is not None and self.on_drop is not None:
            self.on_drop(handle.adapter)
        handle.adapter = None


# ---- staging: adapters in pinned host memory (CUDA), ready for asynchronous copies ----------------
def pin_into_one(tensors: dict, dtype: torch.dtype) -> dict:
    """{key: tensor} -> {key: view} of ONE pinned host buffer of `dtype` holding them all. A pinned
    allocation costs a driver call (cudaHostAlloc) and page locking each: one per adapter, not one
    per tensor (448 for an 8B adapter on every module)."""
    if not tensors:
        return {}
    buf = torch.empty(sum(t.numel() for t in tensors.values()), dtype=dtype, pin_memory=True)
    flat = [t.reshape(-1) for t in tensors.values()]
    if all(t.dtype == dtype for t in flat):
        torch.cat(flat, out=buf)  # one call fills the buffer
    out, o = {}, 0
    for k, t in tensors.items():
        view = buf[o:o + t.numel()].view(t.shape)
        if t.dtype != dtype:
            view.copy_(t)  # with the dtype conversion
        out[k] = view
        o += t.numel()
    return out


def stage(adapter, dtype: torch.dtype, device: torch.device, arena=None):
    """The adapter in the serving dtype; on CUDA in ONE pinned block (one host->GPU copy per slot
    load, asynchronous): as it is when the file was read into pinned memory in that dtype, else
    copied into a new block (the file's arena blocks, of another dtype, then go back)."""
    from .pinned_arena import arena_blocks, release_blocks

    if device.type != "cuda":
        adapter.weights = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in adapter.weights.items()}
        return adapter
    adapter.dora_scales = pin_into_one(adapter.dora_scales, torch.float32)   # g, shift stay float32
    adapter.dora_shifts = pin_into_one(adapter.dora_shifts, torch.float32)
    if pinned_views(adapter.weights, dtype):
        return adapter  # read straight into pinned memory, already the serving dtype
    flat = pin_into_one({(k, i): t for k, ab in adapter.weights.items() for i, t in enumerate(ab)}, dtype)
    adapter.weights = {k: (flat[k, 0], flat[k, 1]) for k in adapter.weights}
    if arena is not None and arena_blocks(adapter):
        adapter.magnitudes = {k: m.clone() for k, m in adapter.magnitudes.items()}  # may be views of the file
        release_blocks(arena, adapter)
    return adapter


def pinned_bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def pinned_views(weights: dict, dtype: torch.dtype) -> bool:
    """Every factor is `dtype` and a view of one pinned buffer (the file, read into pinned memory)."""
    tensors = [t for ab in weights.values() for t in ab]
    if not tensors or any(t.dtype != dtype for t in tensors):
        return False
    storage = tensors[0].untyped_storage()._cdata  # one storage object: the pinned tensor the file was read into
    return all(t.untyped_storage()._cdata == storage for t in tensors) and tensors[0].is_pinned()


def timed_alloc(alloc, timings: dict | None):
    """`alloc` with its time added to timings["pin_alloc_s"] (a new pinned block costs a
    cudaHostAlloc; torch's caching host allocator reuses the blocks of freed ones)."""
    if alloc is None or timings is None:
        return alloc

    def timed(nbytes: int) -> torch.Tensor:
        t0 = time.perf_counter()
        out = alloc(nbytes)
        timings["pin_alloc_s"] = timings.get("pin_alloc_s", 0.0) + time.perf_counter() - t0
        return out
    return timed


# ---- parsing off the critical path without OpenMP stalls ------------------------------------------
# one_cpu_thread moved to loraserve.adapters.threads (the parser's folds use it on their own threads)
from loraserve.adapters.threads import one_cpu_thread  # noqa: E402,F401 - re-exported
