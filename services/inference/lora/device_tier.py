"""Device tier of the adapter cache: which adapter owns which GPU slot, and who pins it.

A slot is pinned while a running sequence uses it (`pins`); an unpinned slot keeps its
adapter (a later request is a hit) until a new adapter needs the space. Victims are chosen
among unpinned slots, adapters with no queued work first, then least recently used, so a
popular adapter with work queued is not evicted for a one-off request while another slot
can go. Not thread-safe: LoRAManager calls it under its lock.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .host_tier import TierStats
from .slots import DeviceSlots, slot_granule, slot_span


def num_device_slots(lora_config, cache_config, args, enabled: set[str], max_rank: int, dtype: torch.dtype,
                     device: torch.device) -> int:
    """GPU tier size, by memory as in TensorRT-LLM's PeftCacheConfig: num_device_module_layer
    max-rank (layer, module) weights when set, else device_cache_percent of free GPU memory;
    on CPU max_loras (or 8) max-rank adapters. Never less than max_loras max-rank adapters, the
    distinct adapters one batch may use. Counted in slots of slot_granule(max_rank) rank rows:
    granules that adapters take by their own rank (slots.py; by default when max_lora_rank >= 32), or
    max_lora_rank wide (below that, or with LORASERVE_RANK_PACKING=0)."""
    granule = slot_granule(max_rank)
    per_max = slot_span(max_rank, granule) if granule < max_rank else 1   # slots of one max-rank adapter
    floor = (lora_config.max_loras or 1) * per_max
    if cache_config.num_device_module_layer:
        per_adapter = args.num_hidden_layers * len(enabled)
        return max(floor, cache_config.num_device_module_layer // per_adapter * per_max)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_slot = DeviceSlots.bytes_per_slot(args, enabled, max_rank, dtype, rows=granule)
        return max(floor, int(free * cache_config.device_cache_percent) // per_slot)
    return (lora_config.max_loras or 8) * per_max


class DeviceTier:
    def __init__(self, slots: DeviceSlots):
        self.slots = slots
        self.owner: list = [None] * slots.num_slots        # slot -> AdapterHandle
        self.lru: OrderedDict[int, None] = OrderedDict()   # slots, least recently pinned first
        self.stats = TierStats()
        self.num_pinned = 0                                 # slots with at least one pin
        # packed (slots.py): slot -> first slot of the adapter holding it, -1 free
        self._occupant = np.full(slots.num_slots, -1, dtype=np.int64)

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots

    @property
    def num_used(self) -> int:
        """Adapters on the GPU."""
        return sum(1 for h in self.owner if h is not None)

    def limit_slots(self, n: int) -> None:
        """Use only the first n slots (n <= the allocated ones; nothing pinned): benchmarks compare
        tier sizes on one engine, whose CUDA graphs captured the slot buffers."""
        assert 1 <= n <= self.slots.num_slots and self.num_pinned == 0
        for h in list(self.owner):
            if h is not None:
                self.remove(h)
        self.owner = [None] * n
        self._occupant = np.full(n, -1, dtype=np.int64)

    def place(self, handle) -> bool:
        """Copy handle's host weights into a free (or freed) slot; False if every slot is pinned."""
        span = self.slots.span(handle.rank)
        slot = self._free_block(span) if self.slots.packed else self._free_slot()
        if slot is None:
            return False
        self.stats.misses += 1
        self.stats.bytes_loaded += self.slots.load(slot, handle.adapter)
        handle.slot = slot
        self.owner[slot] = handle
        self._occupant[slot:slot + span] = slot
        return True

    def pin(self, handle) -> None:
        self.num_pinned += handle.slot_pins == 0
        handle.slot_pins += 1
        self.lru[handle.slot] = None
        self.lru.move_to_end(handle.slot)

    def unpin(self, handle) -> None:
        if handle.slot_pins > 0:
            handle.slot_pins -= 1
            self.num_pinned -= handle.slot_pins == 0

    def remove(self, handle) -> None:
        if handle.slot is not None:
            self._occupant[handle.slot:handle.slot + self.slots.span(handle.rank)] = -1
            self.owner[handle.slot] = None
            self.lru.pop(handle.slot, None)
            handle.slot = None
            self.stats.evictions += 1

    def _free_slot(self) -> int | None:
        for s, h in enumerate(self.owner):
            if h is None:
                return s
        idle = [s for s in self.lru if self.owner[s] is not None and self.owner[s].slot_pins == 0]
        if not idle:
            return None
        # adapters without queued work go first (LRU among them), then the rest by LRU
        victim = min(idle, key=lambda s: self.owner[s].num_requests > self.owner[s].slot_pins)
        self.remove(self.owner[victim])
        return victim

    def _free_block(self, span: int) -> int | None:
        """Packed: the first slot of `span` free slots aligned to `span`, evicting idle adapters if
        needed: among the aligned blocks whose adapters are all unpinned, the one whose adapters
        have the least queued work, then were pinned least recently, then are fewest (the
        unpacked policy, per block). None if every block holds a pinned adapter."""
        n = len(self.owner) // span * span
        if n == 0:
            return None
        free = (self._occupant[:n] < 0).reshape(-1, span).all(axis=1)   # [n / span] blocks
        i = int(free.argmax())
        if free[i]:
            return i * span
        order = {s: k for k, s in enumerate(self.lru)}
        best = None
        for b in range(0, n, span):
            starts = {int(s) for s in self._occupant[b:b + span] if s >= 0}
            held = [self.owner[s] for s in starts]
            if any(h.slot_pins for h in held):
                continue
            key = (sum(h.num_requests > h.slot_pins for h in held), max(order.get(s, -1) for s in starts), len(held))
            if best is None or key < best[0]:
                best = (key, b, held)
        if best is None:
            return None
        for h in best[2]:
            self.remove(h)
        return best[1]
