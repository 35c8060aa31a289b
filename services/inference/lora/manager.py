"""LoRAManager: resolves LoRA requests to adapters and decides their residency at scheduling time.

    source (HF PEFT dir / archive / .nemo)  ->  HostTier (host_tier.py)  ->  DeviceTier (device_tier.py)

Identity is the artifact's content digest, never the name or int id: two requests naming
different weights never share state, and re-registering a name with new weights never
serves the old ones.

A request holds its adapter by an `AdapterHold` (released once, on whatever path the request
ends: finished, aborted, cancelled while resolving). A hold keeps the adapter known, never
any tier space: a waiting request costs no host or GPU memory, so any number of distinct
adapters may be requested at once. Residency is decided when the scheduler considers the
request (`try_acquire`, the one interface the scheduler sees):

- on a GPU slot: pin it and run;
- on the host: copy it into a free slot (an idle one is evicted; adapters with queued work
  last) on the side stream, pin it and run; if every slot is pinned it waits;
- not on the host: start a background load (parse + dtype + pinned staging on a worker
  thread) if the host tier has room, and wait; the step loop never parses or reads a file.

Host eviction never drops an adapter that a waiting request needs and that is not on a GPU
slot yet; a load that cannot fit is not started until something becomes evictable (a slot
holder's host copy, or an adapter nobody waits for), which always happens as running
sequences finish, so nothing deadlocks. Fairness across adapters is bounded by slot
hand-off, see `try_acquire`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loraserve.adapters import AdapterFormatError, ArchiveLimits, LoraAdapter, check_compatible, load_adapter
from loraserve.adapters.archives import StagedArtifact
from loraserve.adapters.errors import shorten
from loraserve.config import LoraConfig, LoRARequest, PeftCacheConfig

from ..errors import (AdapterAccessError, AdapterBusyError, AdapterCapacityError,  # noqa: F401 - re-exported
                      AdapterLoadError, AdapterNotFoundError, InvalidRequestError)
from ..models.llama import PROJ_SLICES, ModelArgs
from ..sequence import Sequence
from .admission import SlotAdmission
from .batch import LoRABatch
from .device_tier import DeviceTier, num_device_slots
from .dora import compute_dora_scales
from .holds import (AdapterHandle, AdapterHold, looks_nemo, release_after_engine,  # noqa: F401 - re-exported
                    resolve_async, stat_signature)
from .host_tier import HostTier, TierStats, one_cpu_thread, pinned_bytes, stage, timed_alloc
from .pinned_arena import PinnedArena, release_blocks
from .slots import DeviceSlots

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    host: TierStats
    device: TierStats


class LoRAManager(SlotAdmission):
    def __init__(self, lora_config: LoraConfig, cache_config: PeftCacheConfig, args: ModelArgs,
                 dtype: torch.dtype, device: torch.device, allowed_dirs: list[str] | None = None,
                 model: torch.nn.Module | None = None):
        """model: the served base model, whose weights DoRA adapters need (g = m / ||W + B@A||)."""
        self.lora_config, self.cache_config, self.args = lora_config, cache_config, args
        self.model = model
        # tensor parallelism: no process holds whole base weights, so DoRA factors are computed by
        # every rank for its shard when the adapter is placed on a GPU slot (tp/step.py)
        self.dora_per_rank = False
        self.dtype, self.device = dtype, device
        self.allowed_dirs = None if allowed_dirs is None else [os.path.realpath(d) for d in allowed_dirs]
        self.enabled = lora_config.hf_target_modules() or set(args.lora_module_shapes())
        self.max_rank = lora_config.max_lora_rank
        self.module_shapes = args.lora_module_shapes()
        self.num_slots = num_device_slots(lora_config, cache_config, args, self.enabled, self.max_rank, dtype, device)
        self.slots = DeviceSlots(args, self.enabled, self.num_slots, self.max_rank, dtype, device)
        self.num_slots = self.slots.num_slots   # rank packing may fall back to max-rank slots (slots.py)
        self.device_tier = DeviceTier(self.slots)
        self.host = HostTier(lora_config.max_cpu_loras, cache_config.host_cache_size)
        self.stats = CacheStats(self.host.stats, self.device_tier.stats)
        self.handles: OrderedDict[str, AdapterHandle] = OrderedDict()  # every known adapter (metadata)
        self.by_id: dict[int, str] = {}
        self._digest_of: dict[tuple, str] = {}
        self._blocked: dict[int, float] = {}  # seq_id -> arrival of sequences waiting for a slot
        self._blocked_on: dict[int, AdapterHandle] = {}  # seq_id -> the adapter it waits for (hand-off)
        self._bypasses: dict[int, int] = {}   # seq_id -> newer requests admitted ahead of it meanwhile
        self.max_slot_bypass = 16
        self.slot_handoff = os.environ.get("LORASERVE_SLOT_HANDOFF", "1") != "0"  # see _acquire_by_handoff
        self._draining: AdapterHandle | None = None  # the slot being handed to the oldest waiter
        self.num_handoffs = 0
        self.lock = threading.RLock()
        self._load_done = threading.Condition(self.lock)
        self._loader = ThreadPoolExecutor(max(1, cache_config.num_put_workers) + 1,
                                          thread_name_prefix="loraserve-adapter-load")
        from loraserve.kernels import LoRAMetaBuilder

        self.meta_builder_cls = LoRAMetaBuilder
        # LORASERVE_PINNED_READ (CUDA, default on): adapter files are read straight into pinned memory, so
        # a file in the serving dtype needs no staging copy. On since the 2026-11-30 final H200 run passed
        # tests/inference/test_cold_path_gpu.py and bench_churn measured with it (read 15 ms from the
        # arena vs 54 ms into pageable memory, 84 MB); LORASERVE_PINNED_READ=0: pageable read + staging copy.
        self._read_alloc = pinned_bytes if device.type == "cuda" and os.environ.get(
            "LORASERVE_PINNED_READ", "1") != "0" else None
        # ... into one pinned arena of host_cache_size allocated now (pinned_arena.py: a pinned
        # allocation per adapter cost 73 ms of the 8B adapter's cold path); LORASERVE_PINNED_ARENA=0: off
        self.arena = None
        if self._read_alloc is not None and os.environ.get("LORASERVE_PINNED_ARENA", "1") != "0":
            self.arena = PinnedArena(cache_config.host_cache_size,
                                     [self.slots.copy_stream, torch.cuda.current_stream(device)])
            self.host.on_drop = lambda adapter: release_blocks(self.arena, adapter)
        self._meta_builder = None
        for i, path in enumerate(lora_config.lora_dir):  # TensorRT-LLM: preload lora_dir, ids in order
            self.resolve(LoRARequest(os.path.basename(os.path.normpath(path)) or f"lora-{i}", i, path,
                                     lora_config.lora_ckpt_source)).release()

    # ---- sizing ----------------------------------------------------------------------------
    def reserved_device_bytes(self) -> int:
        return self.slots.nbytes

    # ---- resolve: request -> hold (any thread; parses only an adapter never seen) ----------------
    def check_path(self, path: str) -> str:
        """The real path of a client's lora_path, if allowed. A relative lora_path names a path under
        the allowed dirs (the first where it exists), never one under the server's working directory;
        with no allowed dirs configured it is refused. Messages never list what the dirs hold."""
        shown = shorten(path, 120)
        if not os.path.isabs(path):
            if not self.allowed_dirs:
                raise InvalidRequestError(f"lora_path {shown} must be an absolute path")
            path = next((os.path.join(d, path) for d in self.allowed_dirs if os.path.exists(os.path.join(d, path))),
                        os.path.join(self.allowed_dirs[0], path))
        real = os.path.realpath(path)
        if self.allowed_dirs is not None and not any(real == d or real.startswith(d + os.sep) for d in self.allowed_dirs):
            raise AdapterAccessError(f"lora_path {shown} is not under an allowed directory")
        if not os.path.exists(real):
            raise AdapterNotFoundError(f"lora_path {shown} does not exist")
        return real

    def resolve(self, req: LoRARequest, trusted: bool = False, digest: str | None = None,
                data=None) -> AdapterHold:
        """Identify the adapter `req` names and hold it for one request (hold.release() undoes).
        trusted: the path is the service's own download cache, not a user-named path; digest: its
        content digest, verified at download (trusted only: spares hashing it again, and an adapter
        already known by it is not parsed at all); data: the path's verified bytes while its file is
        still being written (AdapterFetcher, trusted with a digest only)."""
        try:
            return self._resolve(req, trusted, digest, data)
        finally:
            if isinstance(data, StagedArtifact):
                data.release()  # not parsed (known already, or refused): its staging block goes back

    def staging_alloc(self, nbytes: int) -> StagedArtifact | None:
        """A [nbytes] block of the pinned arena for a download to land in (AdapterFetcher), or None
        (no arena: CPU, LORASERVE_PINNED_ARENA=0, or no room). May wait for earlier copies: a thread."""
        block = self.arena.alloc(nbytes) if self.arena is not None else None
        return None if block is None else StagedArtifact(block, block, self.arena.release)

    def _resolve(self, req: LoRARequest, trusted: bool, digest: str | None, data) -> AdapterHold:
        digest = digest if trusted else None
        data = data if digest and req.lora_path else None
        if req.lora_path:  # file-system work outside the lock, which the engine thread takes every step
            real = os.path.realpath(req.lora_path) if trusted else self.check_path(req.lora_path)
            sig = stat_signature(real) if data is None else None  # (the file may not exist yet)
        with self.lock:
            if digest and digest in self.handles:
                h = self.handles[digest]
                if not h.source:
                    h.source, h.trusted = real, True
                self.by_id[req.lora_int_id] = digest
                return self._hold(h)
            if not req.lora_path:
                key = self.by_id.get(req.lora_int_id)
                if key is None or key not in self.handles:
                    raise AdapterNotFoundError(f"adapter {req.lora_name!r} (id {req.lora_int_id}) is not loaded "
                                               "and the request gives no lora_path")
                return self._hold(self.handles[key])
            key = self._digest_of.get(sig) if sig is not None else None
            if key is not None and key in self.handles:
                self.by_id[req.lora_int_id] = key
                return self._hold(self.handles[key])
        source = req.lora_ckpt_source if req.lora_ckpt_source != "hf" or not looks_nemo(real) else None
        timings: dict = {}
        try:
            adapter = self._parse(real, source, trusted, timings, digest, data)
        except AdapterFormatError as exc:
            raise AdapterFormatError(f"adapter {shorten(req.lora_name)}: {exc}") from exc
        hold = self.add_adapter(adapter, req, source=real, signature=sig, ckpt_source=source)
        hold.handle.trusted = trusted
        hold.handle.timings.update(timings)
        return hold

    def _parse(self, path: str, ckpt_source: str | None, trusted: bool, timings: dict | None = None,
               digest: str | None = None, data=None) -> LoraAdapter:
        # archive limits sized by what a max_lora_rank adapter of this model can need (bombs);
        # every file read must stay in the allowed dirs, links resolved; weights must fit self.dtype
        blocks: list = []   # arena blocks the weights files were read into (the adapter keeps them)
        alloc = self._read_alloc if self.arena is None else (lambda n: self._arena_alloc(n, blocks))
        try:
            # one CPU thread: OpenMP workers stall the parse on a busy host (host_tier.one_cpu_thread)
            with one_cpu_thread():
                adapter = load_adapter(path, ckpt_source, max_bytes=self.lora_config.max_lora_bytes,
                                       limits=ArchiveLimits.for_model(self.module_shapes, self.args.num_hidden_layers,
                                                                      self.max_rank),
                                       confine_to=None if trusted else self.allowed_dirs, serving_dtype=self.dtype,
                                       timings=timings, digest=digest, alloc=timed_alloc(alloc, timings), data=data,
                                       # a digest here is a registry download's, verified: values checked at upload
                                       values_verified=trusted and digest is not None)
            if isinstance(data, StagedArtifact):
                # a download overlapped with the parse: nothing parsed is used before its digest checked out
                t0 = time.perf_counter()
                data.wait_verified()
                timings["verify_wait_s"] = time.perf_counter() - t0
                timings["download_s"] = data.download_s
                if data.block is not None:  # the parser's views of the download's block are the weights:
                    blocks.append(data.block)  # it goes back with the adapter's blocks, not data.release()
                    data.block = None
        except BaseException:
            for b in blocks:
                self.arena.release(b)
            raise
        adapter.arena_blocks = blocks
        return adapter

    def _arena_alloc(self, nbytes: int, blocks: list):
        block = self.arena.alloc(nbytes)
        if block is None:
            return pinned_bytes(nbytes)   # no room in the arena: torch's pinned allocator
        blocks.append(block)
        return block

    def add_adapter(self, adapter: LoraAdapter, req: LoRARequest, source: str = "", signature: tuple | None = None,
                    ckpt_source: str | None = None) -> AdapterHold:
        """Register an already parsed adapter (after checking it fits the model), hold it, and keep
        its weights in the host tier if there is room without evicting anything still needed."""
        check_compatible(adapter, module_shapes=self.module_shapes, num_layers=self.args.num_hidden_layers,
                         enabled_modules=self.enabled, max_rank=self.max_rank)
        if not self.host.fits_at_all(adapter.nbytes()):
            raise AdapterCapacityError(f"adapter {req.lora_name!r} ({adapter.nbytes()} bytes) is larger than the "
                                       f"host adapter cache (host_cache_size={self.cache_config.host_cache_size})")
        t0 = time.perf_counter()
        staged = self._stage(adapter)
        stage_s = time.perf_counter() - t0
        with self.lock:
            if signature is not None:
                self._digest_of[signature] = adapter.digest
            self.by_id[req.lora_int_id] = adapter.digest
            h = self.handles.get(adapter.digest)
            if h is None:
                h = AdapterHandle(adapter.digest, req.lora_name, req.lora_int_id, None, adapter.nbytes(),
                                  adapter.rank, source, ckpt_source)
                self.handles[h.key] = h
            elif source and not h.source:
                h.source, h.ckpt_source = source, ckpt_source
            h.load_error = None
            h.timings = {"stage_s": stage_s}
            stored = h.adapter is None and not h.loading and self.host.make_room(h.nbytes, self._host_evictable)
            if stored:
                self.host.put(h, staged)
            else:
                release_blocks(self.arena, staged)   # not kept: reloaded from its source when needed
            return self._hold(h)

    def _stage(self, adapter: LoraAdapter) -> LoraAdapter:
        """DoRA factors from the base weights (float32, kept with the adapter in the host tier), then
        host_tier.stage: the serving dtype, pinned on CUDA so the host->GPU copy is asynchronous."""
        with one_cpu_thread():
            if not self.dora_per_rank:
                compute_dora_scales(adapter, self.model)
            return stage(adapter, self.dtype, self.device, self.arena)

    def _hold(self, h: AdapterHandle) -> AdapterHold:
        if h.adapter is not None or h.slot is not None:
            self.host.stats.hits += 1
        h.num_requests += 1
        self.handles.move_to_end(h.key)
        self.host.touch(h)
        if h.adapter is None and h.slot is None and h.source:
            self._start_load(h)  # prefetch at arrival, if the host tier has room for it now
        return AdapterHold(h, self)

    def release(self, hold) -> None:
        """Drop a hold (AdapterHold; idempotent)."""
        if isinstance(hold, AdapterHold):
            hold.release()

    def release_request(self, seq: Sequence) -> None:
        """A request ended (finished or aborted): drop its hold on the adapter."""
        with self.lock:
            self._blocked.pop(seq.seq_id, None)
            self._blocked_on.pop(seq.seq_id, None)
            self._bypasses.pop(seq.seq_id, None)
            if seq.lora is not None:
                self.release(seq.lora)

    # ---- host tier: background loads --------------------------------------------------------
    def _host_evictable(self, h: AdapterHandle) -> int | None:
        """Eviction preference of a host entry: nobody waits for it (0), its copy is already on a
        GPU slot (1); None while a waiting request needs it and it has no slot yet."""
        if h.loading:
            return None
        if h.num_requests <= h.slot_pins:
            return 0
        return 1 if h.slot is not None else None

    def _start_load(self, h: AdapterHandle) -> None:
        if h.loading or h.adapter is not None:
            return
        if not h.source:
            raise AdapterLoadError(f"adapter {h.name!r} left the host cache and has no source to reload from")
        if not self.host.make_room(h.nbytes, self._host_evictable):
            return  # retried when the scheduler next considers a request for it
        h.loading = True
        self.host.reserve(h.nbytes)
        self._loader.submit(self._load, h)

    def _load(self, h: AdapterHandle) -> None:
        adapter, err = None, None
        try:
            timings: dict = {}
            deadline = time.monotonic() + 60
            while h.trusted and not os.path.exists(h.source) and time.monotonic() < deadline:
                time.sleep(0.01)  # evicted before the fetcher finished writing its disk copy
            # the download cache's files are named by their verified digest: no re-hash on a reload
            adapter = self._parse(h.source, h.ckpt_source, h.trusted, timings, h.key if h.trusted else None)
            if adapter.digest != h.key:
                raise AdapterLoadError(f"adapter {h.name!r} changed on disk since it was first loaded "
                                       f"({h.key} -> {adapter.digest})")
            t1 = time.perf_counter()
            adapter = self._stage(adapter)
            h.timings = dict(timings, stage_s=time.perf_counter() - t1)
        except Exception as exc:  # noqa: BLE001 - handed to the requests that wait for it
            err = exc
            if adapter is not None:
                release_blocks(self.arena, adapter)
        with self.lock:
            self.host.unreserve(h.nbytes)
            h.loading = False
            if err is not None:
                log.warning("loading adapter %r from %s failed: %s", h.name, h.source, err)
                h.load_error, h.load_error_time = err, time.monotonic()
            else:
                self.host.put(h, adapter)
            self._load_done.notify_all()

    def wait_for_load(self, timeout: float) -> None:
        """Block up to `timeout` s until a background load finishes (none in flight: return at once)."""
        with self.lock:
            if self.host.num_reserved:
                self._load_done.wait(timeout)

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
        token_slot = torch.tensor(slots, dtype=torch.int32)
        if self.device.type == "cuda":   # through pinned memory: a pageable copy would wait for the device
            token_slot = token_slot.pin_memory()
        token_slot = token_slot.to(self.device, non_blocking=True)
        # Above 256 tokens the grid's tile count changes no kernel's compiled variant (lora_apply's 3-launch
        # path: the split and block sizes come from T and the rank), so bound it by the step's distinct slots
        # (a 8192-token prefill step over 32 prompts: 288 tiles, not 256 + min(slots, T), 8256 with 8000
        # packing granules); below, min(slots, T) as the decode graphs capture it.
        from ..mixed_graphs import lora_segment_bound

        bound = len({seq.lora.slot for seq in seqs if seq.lora is not None}) \
            if len(slots) > 256 and lora_segment_bound() else None
        meta = self._meta_builder.build(token_slot, max_segments=bound)
        if self.device.type == "cuda":
            self.slots.wait_for_copies()
        return LoRABatch(self.slots, meta)

    # ---- introspection / control (inference service) ---------------------------------------------
    @property
    def slot_owner(self) -> list:
        return self.device_tier.owner

    def resident(self) -> dict[str, list[AdapterHandle]]:
        with self.lock:
            return {"device": [h for h in self.device_tier.owner if h is not None],
                    "host": list(self.host.entries.values())}

    def evict(self, key: str) -> bool:
        """Forget an adapter (both tiers) unless a request holds it; True if it was known."""
        with self.lock:
            h = self.handles.get(key)
            if h is None:
                return False
            if h.num_requests or h.slot_pins:
                raise AdapterBusyError(f"adapter {h.name!r} is in use by {h.num_requests} request(s)")
            self.device_tier.remove(h)
            if h.adapter is not None:
                self.host.drop(h)
                self.host.stats.evictions += 1
            self.handles.pop(key)
            return True

    def num_holds(self) -> int:
        with self.lock:
            return sum(h.num_requests for h in self.handles.values())

    def stats_dict(self) -> dict:
        with self.lock:
            return {"host": vars(self.host.stats).copy(), "device": vars(self.device_tier.stats).copy(),
                    "device_slots": self.num_slots,
                    "device_slots_used": self.device_tier.num_used,
                    "device_slots_pinned": self.device_tier.num_pinned,
                    "slot_handoffs": self.num_handoffs,
                    "host_adapters": len(self.host.entries),
                    "host_bytes": self.host.num_bytes,
                    "host_loading": self.host.num_reserved,
                    "adapter_holds": sum(h.num_requests for h in self.handles.values())}

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


__all__ = ["LoRAManager", "AdapterHandle", "AdapterHold", "AdapterAccessError", "AdapterNotFoundError",
           "AdapterCapacityError", "AdapterBusyError", "AdapterLoadError", "AdapterFormatError", "TierStats",
           "resolve_async", "release_after_engine",
           "PROJ_SLICES"]
