"""Host tier of the adapter cache: parsed adapters in host memory (pinned on CUDA), LRU.

Budget: `max_adapters` adapters when set (LoraConfig.max_cpu_loras), else `max_bytes`
(PeftCacheConfig.host_cache_size). A load in flight reserves its bytes first, so the tier
never overshoots and a load that cannot fit is never started (no parse-and-drop spin).
Which entries may be evicted is the caller's policy (`evictable`); this class only keeps
the books. Not thread-safe: LoRAManager calls it under its lock.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
        handle.adapter = None
