"""LoRAManager: resolves LoRA requests to adapters and keeps them in a tiered cache.

    disk (HF PEFT dir / archive / .nemo)  ->  host tier  ->  device tier (DeviceSlots)

Identity is the artifact's content digest, never the name or int id: two requests naming
different weights never share state, and re-registering a name with new weights never
serves the old ones. Host tier: up to max_cpu_loras adapters or host_cache_size bytes
(pinned memory on CUDA), LRU, never dropping an adapter that a queued or running request
holds. Device tier: max_loras slots (or device_cache_percent of free GPU memory), LRU,
never evicting a slot pinned by a running sequence. A request whose adapter finds no free
slot waits in the queue (the scheduler skips it; base-model requests and running ones go
on) and is admitted once a slot frees; while it waits, newer requests for resident adapters
may go ahead of it only a bounded number of times (max_slot_bypass), then the slots drain
to it, so it cannot starve.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from loraserve.adapters import AdapterFormatError, LoraAdapter, check_compatible, load_adapter
from loraserve.config import LoraConfig, LoRARequest, PeftCacheConfig

from ..models.llama import PROJ_SLICES, ModelArgs
from ..sequence import Sequence
from .batch import LoRABatch
from .slots import DeviceSlots

log = logging.getLogger(__name__)


class AdapterAccessError(PermissionError):
    """lora_path is outside every directory the operator allowed."""


class AdapterNotFoundError(LookupError):
    pass


@dataclass
class AdapterHandle:
    key: str                          # "sha256:<hex>" content digest
    name: str
    int_id: int
    adapter: LoraAdapter | None       # host copy (None once dropped from the host tier)
    nbytes: int
    rank: int
    source: str = ""                  # path it was loaded from
    num_requests: int = 0             # queued + running requests holding it
    slot: int | None = None
    slot_pins: int = 0                # running sequences using the slot


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0


@dataclass
class CacheStats:
    host: TierStats = field(default_factory=TierStats)
    device: TierStats = field(default_factory=TierStats)


class LoRAManager:
    def __init__(self, lora_config: LoraConfig, cache_config: PeftCacheConfig, args: ModelArgs,
                 dtype: torch.dtype, device: torch.device, allowed_dirs: list[str] | None = None):
        self.lora_config, self.cache_config, self.args = lora_config, cache_config, args
        self.dtype, self.device = dtype, device
        self.allowed_dirs = None if allowed_dirs is None else [os.path.realpath(d) for d in allowed_dirs]
        self.enabled = lora_config.hf_target_modules() or set(args.lora_module_shapes())
        self.max_rank = lora_config.max_lora_rank
        self.module_shapes = args.lora_module_shapes()
        self.num_slots = self._num_device_slots()
        self.slots = DeviceSlots(args, self.enabled, self.num_slots, self.max_rank, dtype, device)
        self.slot_owner: list[AdapterHandle | None] = [None] * self.num_slots
        self.slot_lru: OrderedDict[int, None] = OrderedDict()
        self.handles: OrderedDict[str, AdapterHandle] = OrderedDict()  # host tier, LRU order
        self.by_id: dict[int, str] = {}
        self._digest_of: dict[tuple, str] = {}
        self._blocked: dict[int, float] = {}  # seq_id -> arrival of sequences waiting for a slot
        self._bypasses: dict[int, int] = {}   # seq_id -> newer requests admitted ahead of it meanwhile
        self.max_slot_bypass = 16
        self.stats = CacheStats()
        self.lock = threading.RLock()
        from loraserve.kernels import LoRAMetaBuilder

        self.meta_builder_cls = LoRAMetaBuilder
        self._meta_builder = None
        for i, path in enumerate(lora_config.lora_dir):  # TensorRT-LLM: preload lora_dir, ids in order
            self.release(self.resolve(LoRARequest(os.path.basename(os.path.normpath(path)) or f"lora-{i}", i, path,
                                                  lora_config.lora_ckpt_source)))

    # ---- sizing ----------------------------------------------------------------------------
    def _num_device_slots(self) -> int:
        if self.lora_config.max_loras:
            return self.lora_config.max_loras
        per_slot = DeviceSlots.bytes_per_slot(self.args, self.enabled, self.max_rank, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * self.cache_config.device_cache_percent) // per_slot)
        return 8

    def reserved_device_bytes(self) -> int:
        return self.slots.nbytes

    def _host_budget_ok(self, extra_bytes: int) -> bool:
        used = sum(h.nbytes for h in self.handles.values() if h.adapter is not None)
        count = sum(1 for h in self.handles.values() if h.adapter is not None)
        if self.lora_config.max_cpu_loras is not None:
            return count + 1 <= self.lora_config.max_cpu_loras
        return used + extra_bytes <= self.cache_config.host_cache_size

    # ---- resolve: request -> handle in the host tier (any thread) ---------------------------
    def check_path(self, path: str) -> str:
        real = os.path.realpath(path)
        if self.allowed_dirs is not None and not any(real == d or real.startswith(d + os.sep) for d in self.allowed_dirs):
            raise AdapterAccessError(f"lora_path {path!r} is not under an allowed directory")
        if not os.path.exists(real):
            raise AdapterNotFoundError(f"lora_path {path!r} does not exist")
        return real

    def resolve(self, req: LoRARequest, trusted: bool = False) -> AdapterHandle:
        """Find or load the adapter `req` names and hold it for one request (release() undoes).
        trusted: the path is the service's own download cache, not a user-named path."""
        with self.lock:
            if not req.lora_path:
                key = self.by_id.get(req.lora_int_id)
                if key is None or key not in self.handles:
                    raise AdapterNotFoundError(f"adapter {req.lora_name!r} (id {req.lora_int_id}) is not loaded "
                                               "and the request gives no lora_path")
                return self._hold(self.handles[key], hit=True)
            real = os.path.realpath(req.lora_path) if trusted else self.check_path(req.lora_path)
            sig = _stat_signature(real)
            key = self._digest_of.get(sig)
            if key is not None and key in self.handles and self.handles[key].adapter is not None:
                self.by_id[req.lora_int_id] = key
                return self._hold(self.handles[key], hit=True)
        source = req.lora_ckpt_source if req.lora_ckpt_source != "hf" or not _looks_nemo(real) else None
        try:
            adapter = load_adapter(real, source, max_bytes=self.lora_config.max_lora_bytes)
            return self.add_adapter(adapter, req, source=real, signature=sig)
        except AdapterFormatError as exc:
            raise AdapterFormatError(f"adapter {req.lora_name!r}: {exc}") from exc

    def add_adapter(self, adapter: LoraAdapter, req: LoRARequest, source: str = "", signature: tuple | None = None
                    ) -> AdapterHandle:
        """Put an already parsed adapter in the host tier (after checking it fits the model)."""
        check_compatible(adapter, module_shapes=self.module_shapes, num_layers=self.args.num_hidden_layers,
                         enabled_modules=self.enabled, max_rank=self.max_rank)
        with self.lock:
            if signature is not None:
                self._digest_of[signature] = adapter.digest
            self.by_id[req.lora_int_id] = adapter.digest
            handle = self.handles.get(adapter.digest)
            if handle is not None and handle.adapter is not None:
                return self._hold(handle, hit=True)
            self.stats.host.misses += 1
            self._make_host_room(adapter.nbytes())
            weights = {k: (a.to(self.dtype), b.to(self.dtype)) for k, (a, b) in adapter.weights.items()}
            if self.device.type == "cuda":
                weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.items()}
            adapter.weights = weights
            self.stats.host.bytes_loaded += adapter.nbytes()
            if handle is None:
                handle = AdapterHandle(adapter.digest, req.lora_name, req.lora_int_id, adapter, adapter.nbytes(),
                                       adapter.rank, source)
                self.handles[adapter.digest] = handle
            else:
                handle.adapter = adapter
            return self._hold(handle, hit=False)

    def _hold(self, handle: AdapterHandle, hit: bool) -> AdapterHandle:
        if hit:
            self.stats.host.hits += 1
        handle.num_requests += 1
        self.handles.move_to_end(handle.key)
        return handle

    def _make_host_room(self, nbytes: int) -> None:
        while not self._host_budget_ok(nbytes):
            victim = next((h for h in self.handles.values() if h.adapter is not None and h.num_requests == 0), None)
            if victim is None:
                raise AdapterCapacityError("host adapter cache is full of adapters in use "
                                           f"(max_cpu_loras={self.lora_config.max_cpu_loras}, "
                                           f"host_cache_size={self.cache_config.host_cache_size})")
            victim.adapter = None
            self.stats.host.evictions += 1
            if victim.slot is None:
                del self.handles[victim.key]

    def release(self, handle: AdapterHandle) -> None:
        with self.lock:
            handle.num_requests = max(0, handle.num_requests - 1)

    def release_request(self, seq: Sequence) -> None:
        """A request ended (finished or aborted): drop its hold on the adapter."""
        with self.lock:
            self._blocked.pop(seq.seq_id, None)
            self._bypasses.pop(seq.seq_id, None)
            if seq.lora is not None:
                self.release(seq.lora)

    # ---- device tier: scheduler hooks (engine thread) -----------------------------------------
    def try_acquire(self, seq: Sequence) -> bool:
        with self.lock:
            h: AdapterHandle = seq.lora
            oldest = min(self._blocked.items(), key=lambda kv: kv[1], default=None)
            if oldest is not None and oldest[1] < seq.arrival_time:
                # An older request waits for a slot. Newer requests whose adapter is resident may go
                # ahead of it a bounded number of times (throughput), then everyone waits its turn
                # so that the slots drain to it (no starvation).
                if h.slot is None or self._bypasses.get(oldest[0], 0) >= self.max_slot_bypass:
                    return False
                self._bypasses[oldest[0]] = self._bypasses.get(oldest[0], 0) + 1
            if h.slot is not None:
                self.stats.device.hits += 1
                return self._pin(h, seq)
            slot = self._free_slot()
            if slot is None:
                self._blocked.setdefault(seq.seq_id, seq.arrival_time)
                return False
            if h.adapter is None:  # dropped from host meanwhile: reload from its source
                raise AdapterNotFoundError(f"adapter {h.name!r} left the host cache before it was used")
            self.stats.device.misses += 1
            self.stats.device.bytes_loaded += self.slots.load(slot, h.adapter)
            h.slot = slot
            self.slot_owner[slot] = h
            return self._pin(h, seq)

    def _pin(self, h: AdapterHandle, seq: Sequence) -> bool:
        self._blocked.pop(seq.seq_id, None)
        self._bypasses.pop(seq.seq_id, None)
        h.slot_pins += 1
        self.slot_lru[h.slot] = None
        self.slot_lru.move_to_end(h.slot)
        return True

    def _free_slot(self) -> int | None:
        for s, owner in enumerate(self.slot_owner):
            if owner is None:
                return s
        for s in self.slot_lru:  # least recently used first
            owner = self.slot_owner[s]
            if owner is not None and owner.slot_pins == 0:
                owner.slot = None
                self.slot_owner[s] = None
                self.stats.device.evictions += 1
                if owner.adapter is None:
                    self.handles.pop(owner.key, None)
                return s
        return None

    def release_slot(self, seq: Sequence) -> None:
        with self.lock:
            h: AdapterHandle = seq.lora
            h.slot_pins = max(0, h.slot_pins - 1)

    # ---- per step --------------------------------------------------------------------------------
    def prepare_batch(self, seqs: list[Sequence], num_new_tokens: list[int]) -> LoRABatch | None:
        slots = []
        any_adapter = False
        for seq, n in zip(seqs, num_new_tokens):
            s = -1 if seq.lora is None else seq.lora.slot
            any_adapter |= s >= 0
            slots.extend([s] * n)
        if not any_adapter:
            return None
        if self._meta_builder is None or self._meta_builder.max_tokens < len(slots):
            self._meta_builder = self.meta_builder_cls(max(len(slots), 256), self.num_slots, self.device)
        token_slot = torch.tensor(slots, dtype=torch.int32).to(self.device, non_blocking=True)
        meta = self._meta_builder.build(token_slot)
        if self.device.type == "cuda":
            self.slots.wait_for_copies()
        return LoRABatch(self.slots, meta)

    # ---- introspection / control (inference service) ---------------------------------------------
    def resident(self) -> dict[str, list[AdapterHandle]]:
        with self.lock:
            return {"device": [h for h in self.slot_owner if h is not None],
                    "host": [h for h in self.handles.values() if h.adapter is not None]}

    def evict(self, key: str) -> bool:
        """Drop an adapter from both tiers unless a request holds it; True if it was cached."""
        with self.lock:
            h = self.handles.get(key)
            if h is None:
                return False
            if h.num_requests or h.slot_pins:
                raise AdapterBusyError(f"adapter {h.name!r} is in use by {h.num_requests} request(s)")
            if h.slot is not None:
                self.slot_owner[h.slot] = None
                self.slot_lru.pop(h.slot, None)
                h.slot = None
                self.stats.device.evictions += 1
            self.handles.pop(key)
            self.stats.host.evictions += 1
            return True

    def stats_dict(self) -> dict:
        with self.lock:
            return {tier: vars(getattr(self.stats, tier)).copy() for tier in ("host", "device")} | {
                "device_slots": self.num_slots,
                "device_slots_used": sum(1 for h in self.slot_owner if h is not None),
                "device_slots_pinned": sum(1 for h in self.slot_owner if h is not None and h.slot_pins),
                "host_adapters": sum(1 for h in self.handles.values() if h.adapter is not None),
                "host_bytes": sum(h.nbytes for h in self.handles.values() if h.adapter is not None),
            }


class AdapterCapacityError(RuntimeError):
    pass


class AdapterBusyError(RuntimeError):
    pass


def _looks_nemo(path: str) -> bool:
    return path.endswith(".nemo") or os.path.isfile(os.path.join(path, "model_config.yaml"))


def _stat_signature(path: str) -> tuple:
    if os.path.isdir(path):
        entries = []
        for root, _, files in os.walk(path):
            for f in files:
                st = os.stat(os.path.join(root, f))
                entries.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
        return (path, tuple(sorted(entries)))
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns)


__all__ = ["LoRAManager", "AdapterHandle", "AdapterAccessError", "AdapterNotFoundError", "AdapterCapacityError",
           "AdapterBusyError", "AdapterFormatError", "PROJ_SLICES"]
