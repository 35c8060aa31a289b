"""InferenceCore: the one facade the gRPC service and the OpenAI HTTP front call.

It owns the engine (on its thread, through AsyncLLM), the registry fetcher and the
adapter-resolution path, and gives the fronts every operation they need (generate, tokenize,
chat encoding, model info, loaded adapters, load/unload, stats, health), so that a front only
maps fields: no front reaches into the engine, its scheduler, block manager, LoRA manager or
tokenizer. Engine state that is mutated or must be consistent is read on the engine thread
(AsyncLLM.call) or under the LoRA manager's lock.

Errors are the types declared in errors.py (each with its gRPC code and HTTP status); an
unexpected exception in a request becomes errors.InternalError after one log line with the
request id. Every request, from any front, ends in one RequestRecord (request_metrics.py):
logged at INFO and handed to the listeners (the Prometheus metrics).
"""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loraserve.config import LoraConfig, LoRARequest, SamplingParams, engine_config_from_kwargs

from . import errors
from .adapter_source import AdapterFetcher
from .async_llm import AsyncLLM
from .engine import LLMEngine
from .errors import (AdapterAccessError, AdapterBusyError, AdapterCapacityError,  # noqa: F401 - re-exported
                     AdapterNotFoundError, DigestMismatchError, EngineStepError, InvalidRequestError, QueueFullError,
                     RegistryAdapterNotFound, RegistryUnavailableError, ShuttingDownError)
from .llm import default_model_path
from .lora.manager import release_after_engine, resolve_async
from .outputs import RequestOutput
from .request_metrics import RequestRecord, RequestTracker, log_record
from .serve_config import ServeConfig

log = logging.getLogger(__name__)


@dataclass
class AdapterSpec:
    """Which adapter a request wants: a registry reference or TensorRT-LLM's lora_request."""

    name: str = ""
    version: int = 0
    alias: str = ""
    lora_request: LoRARequest | None = None

    def describe(self) -> str:
        if self.lora_request is not None:
            return f"lora_request {self.lora_request.lora_name!r}"
        ref = f":{self.version}" if self.version else f":{self.alias}" if self.alias else ""
        return f"{self.name}{ref}"


def digest_int_id(digest: str) -> int:
    return int(digest.split(":", 1)[-1][:15], 16)


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    model_type: str
    dtype: str
    device: str
    vocab_size: int
    max_seq_len: int
    num_layers: int
    hidden_size: int
    lora_enabled: bool
    max_lora_rank: int
    lora_target_modules: list[str]
    device_adapter_slots: int


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    digest: str
    rank: int
    size_bytes: int
    on_device: bool
    on_host: bool
    active_requests: int
    source: str          # "name:version" for registry adapters, else the path it was loaded from


@dataclass(frozen=True)
class AdapterCache:
    """One consistent view of the adapter tiers (taken under the LoRA manager's lock)."""

    adapters: list[LoadedAdapter]     # sorted by digest
    host: dict                        # TierStats fields: hits, misses, evictions, bytes_loaded
    device: dict
    disk: dict
    device_slots: int
    device_slots_used: int
    device_slots_pinned: int
    host_adapters: int
    host_bytes: int
    host_loading: int
    slot_handoffs: int = 0            # admissions that drained a slot for the oldest waiter (fairness)


class InferenceCore:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        kwargs = dict(cfg.llm_kwargs)
        kwargs.setdefault("lora_config", LoraConfig())
        kwargs["allowed_lora_dirs"] = list(cfg.allowed_lora_dirs)
        self.model_path = cfg.model or default_model_path()
        self.engine = LLMEngine(engine_config_from_kwargs(self.model_path, **kwargs))
        self.async_llm = AsyncLLM(self.engine)
        lora = self.engine.lora_manager  # downloads land in its pinned staging arena (None: no LoRA)
        self.fetcher = AdapterFetcher(cfg.registry_address, cfg.adapter_cache_dir, cfg.registry_token,
                                      cfg.registry_timeout_s, cfg.registry_ca_file,
                                      stage_alloc=lora.staging_alloc if lora is not None else None)
        self.tokenizer = self.engine.tokenizer
        self.lora_manager = self.engine.lora_manager
        self.requests_total = 0
        self.requests_aborted = 0
        self.shutting_down = False
        self.sources: dict[str, str] = {}   # digest -> "name:version" it was fetched as
        # every request's RequestRecord goes to these (the Prometheus metrics subscribe); a listener
        # that raises is logged and skipped, never the request's problem
        self.request_listeners: list[Callable[[RequestRecord], None]] = []
        self.active_by_adapter: Counter[str] = Counter()   # adapter name ("" = base) -> requests in flight

    @property
    def model_name(self) -> str:
        return self.model_path

    # ---- model and tokenizer -----------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        e, lm = self.engine, self.lora_manager
        return ModelInfo(self.model_name, e.args.model_type, str(e.dtype).replace("torch.", ""), str(e.device),
                         e.args.vocab_size, e.max_seq_len, e.args.num_hidden_layers, e.args.hidden_size,
                         lm is not None, lm.max_rank if lm else 0, sorted(lm.enabled) if lm else [],
                         lm.num_slots if lm else 0)

    def base_model_names(self) -> set[str]:
        """What a client may call the base model: its path or the path's last part."""
        return {self.model_name, os.path.basename(os.path.normpath(self.model_name))}

    def tokenize(self, text: str) -> tuple[list[int], list[str]]:
        """Prompt ids of `text` as generate encodes it (special tokens as the tokenizer adds them),
        and each id's token string."""
        ids = self.tokenizer.encode(text)
        return ids, self.tokenizer.id_to_tokens(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """transformers' apply_chat_template(tokenize=True) ids; a template's refusal is ChatTemplateError."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    def max_tokens_room(self, prompt_len: int) -> int:
        """The most tokens a request with this prompt can generate (max_seq_len and the KV cache)."""
        return max(1, min(self.engine.max_seq_len, self.engine.kv_capacity_tokens) - prompt_len)

    def health(self) -> tuple[bool, str]:
        """(serving, why not)."""
        if not self.async_llm.is_alive:
            return False, f"engine dead: {self.async_llm.dead_reason!r}"[:200]
        if self.shutting_down:
            return False, "shutting down"
        return True, "ok"

    def on_engine_dead(self, callback: Callable[[BaseException], None]) -> None:
        """callback(exc), once, from the engine thread, if it ever dies (the server flips health)."""
        self.async_llm.on_dead = callback

    @property
    def has_registry(self) -> bool:
        return self.cfg.registry_address is not None

    async def registry_adapters(self) -> list:
        """The registry's adapters (latest version of each name); [] without a registry."""
        return await self.fetcher.list_adapters() if self.has_registry else []

    # ---- adapters ----------------------------------------------------------------------------
    async def resolve_adapter(self, spec: AdapterSpec | None):
        """Fetch (if needed) and load into the host tier, off the event loop and the engine thread.
        Returns (LoRARequest, held AdapterHandle) or (None, None); the engine takes over the hold."""
        if spec is None:
            return None, None
        trusted, digest, data = False, None, None
        if spec.lora_request is not None:
            req = spec.lora_request
            if req.lora_path and not self.cfg.allowed_lora_dirs:
                raise AdapterAccessError("lora_path is not accepted: the operator allowed no directories "
                                         "(--allowed-lora-dir)")
        else:
            if not spec.name:
                raise InvalidRequestError("adapter name is empty")
            fetched = await self.fetcher.fetch(spec.name, spec.version, spec.alias)
            self.sources[fetched.digest] = f"{fetched.name}:{fetched.version}"
            req = LoRARequest(f"{fetched.name}:{fetched.version}", digest_int_id(fetched.digest), fetched.path,
                              fetched.format)
            # our own download cache, digest verified (data: its bytes while the file is being written)
            trusted, digest, data = True, fetched.digest, fetched.data
        return req, await resolve_async(self.lora_manager, req, trusted, digest, data)

    async def prefetch(self, spec: AdapterSpec):
        """Load an adapter into the host tier and keep it there until evicted by LRU."""
        req, hold = await self.resolve_adapter(spec)
        hold.release()
        return hold.handle

    def _loaded(self, h, on_device: bool, on_host: bool) -> LoadedAdapter:
        return LoadedAdapter(h.name, h.key, h.rank, h.nbytes, on_device, on_host, h.num_requests,
                             self.sources.get(h.key, h.source))

    async def load_adapter(self, spec: AdapterSpec | None) -> LoadedAdapter:
        if spec is None:
            raise InvalidRequestError("set adapter_ref or lora_request")
        if self.lora_manager is None:
            raise InvalidRequestError("this server was started without LoRA (lora_config)")
        h = await self.prefetch(spec)
        return self._loaded(h, h.slot is not None, h.adapter is not None)

    async def unload_adapter(self, digest: str = "", spec: AdapterSpec | None = None) -> bool:
        """Forget an adapter (both tiers) unless requests hold it (AdapterBusyError); True if it was
        known. On the engine thread: the GPU tier is the engine's."""
        if spec is not None:
            fetched = await self.fetcher.fetch(spec.name, spec.version, spec.alias)
            digest = fetched.digest
            if hasattr(fetched.data, "release"):  # a staging block nobody parses: back to the arena (off the loop:
                await asyncio.to_thread(fetched.data.release)  # it waits for the download still filling it)
        if not digest:
            raise InvalidRequestError("set adapter_ref or digest")
        if self.lora_manager is None:
            return False
        return await asyncio.wrap_future(self.async_llm.call(lambda e: e.lora_manager.evict(digest)))

    def loaded_adapter_ids(self) -> dict[str, int]:
        """name -> lora_int_id of every adapter in the host tier (a request may name them alone)."""
        lm = self.lora_manager
        if lm is None:
            return {}
        return {h.name: h.int_id for h in lm.resident()["host"]}

    def adapter_queues(self, timeout_s: float = 1.0) -> dict[str, Counter]:
        """Requests per adapter name ("" = base model) running and waiting in the scheduler, read on
        the engine thread (at most a step's wait; empty counts past timeout_s or with the engine dead)."""
        def read(engine) -> dict[str, Counter]:
            names = lambda seqs: Counter(s.lora_request.lora_name if s.lora_request else "" for s in seqs)  # noqa: E731
            running, waiting = engine.queued_sequences()
            return {"running": names(running), "waiting": names(waiting)}

        if self.async_llm.is_alive:
            try:
                return self.async_llm.call(read).result(timeout_s)
            except TimeoutError:
                log.warning("adapter queue counts: the engine thread did not answer in %.1f s", timeout_s)
        return {"running": Counter(), "waiting": Counter()}

    def registry_stats(self) -> dict:
        """Registry-outage counters: references served stale, calls that failed as unavailable."""
        return {"stale_served": self.fetcher.stale_served, "errors": self.fetcher.registry_errors}

    def adapter_cache(self) -> AdapterCache:
        disk = vars(self.fetcher.stats).copy()
        lm = self.lora_manager
        if lm is None:
            return AdapterCache([], {}, {}, disk, 0, 0, 0, 0, 0, 0)
        with lm.lock:  # re-entrant: residency and counters from one instant
            res = lm.resident()
            stats = lm.stats_dict()
        dev = {h.key for h in res["device"]}
        host = {h.key for h in res["host"]}
        handles = {h.key: h for h in res["device"] + res["host"]}
        return AdapterCache([self._loaded(h, k in dev, k in host) for k, h in sorted(handles.items())],
                            stats["host"], stats["device"], disk, stats["device_slots"], stats["device_slots_used"],
                            stats["device_slots_pinned"], stats["host_adapters"], stats["host_bytes"],
                            stats["host_loading"], stats.get("slot_handoffs", 0))

    # ---- generation ----------------------------------------------------------------------------
    @staticmethod
    def new_request_id() -> str:
        return f"req-{uuid.uuid4().hex[:16]}"

    async def generate(self, prompt: str | list[int], params: SamplingParams, adapter: AdapterSpec | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. Whatever the front and however the request ends (finished,
        refused, failed, cancelled, the consumer gone), it ends in one RequestRecord here."""
        request_id = request_id or self.new_request_id()
        tracker = RequestTracker(request_id, self.model_name, _adapter_name(adapter))
        code = "CANCELLED"   # until it ends otherwise: a consumer that stops early (GeneratorExit) or a cancel
        asked = tracker.adapter
        self.active_by_adapter[asked] += 1
        inner = self._generate(prompt, params, adapter, request_id)
        try:
            async for out in inner:
                tracker.seen(out)
                if out.finished:
                    code = "OK"
                yield out
        except Exception as exc:
            if errors.declared(exc) is None:
                err = errors.internal(exc, "generate", request_id)
                code = err.grpc_code
                raise err from exc
            code = errors.code_name(exc)
            raise
        finally:
            await inner.aclose()   # its cleanup (engine abort, adapter hold) now, not when it is collected
            self.active_by_adapter[asked] -= 1
            if self.active_by_adapter[asked] <= 0:
                del self.active_by_adapter[asked]
            self._record(tracker.close(code))

    async def _generate(self, prompt, params, adapter, request_id) -> AsyncIterator[RequestOutput]:
        if self.shutting_down:
            raise ShuttingDownError("server is shutting down")
        if self.async_llm.num_active >= self.cfg.max_queue_size:
            raise QueueFullError(f"queue full: {self.async_llm.num_active} requests in flight "
                                 f"(max_queue_size={self.cfg.max_queue_size})")
        self.requests_total += 1
        hold = None
        finished = False
        try:
            lora_request, hold = await self.resolve_adapter(adapter)
            async for out in self.async_llm.generate(prompt, params, lora_request, request_id, lora_handle=hold):
                finished = out.finished
                yield out
        except EngineStepError:
            if hold is not None and hold.load_error is not None:
                raise hold.load_error from None  # its adapter failed to load while it waited: that error's status
            raise
        finally:
            if not finished:
                self.requests_aborted += 1
            if hold is not None:
                release_after_engine(self.async_llm, hold)

    def _record(self, record: RequestRecord) -> None:
        log_record(record)
        for listener in self.request_listeners:
            try:
                listener(record)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                log.exception("request listener failed")

    # ---- stats -----------------------------------------------------------------------------------
    def server_stats(self) -> dict:
        """A snapshot without waiting for the engine thread (scrapes; numbers may be a step apart)."""
        return self._with_counters(self.engine.stats())

    async def stats(self) -> dict:
        """The engine's queues and KV cache read on the engine thread (one consistent instant)."""
        if not self.async_llm.is_alive:
            return self.server_stats()
        return self._with_counters(await asyncio.wrap_future(self.async_llm.call(lambda e: e.stats())))

    def _with_counters(self, engine: dict) -> dict:
        lora = self.lora_manager.stats_dict() if self.lora_manager else {}
        return {**engine, "active_streams": self.async_llm.num_active,
                "device_slots_used": lora.get("device_slots_used", 0),
                "device_slots_pinned": lora.get("device_slots_pinned", 0),
                "requests_total": self.requests_total, "requests_aborted": self.requests_aborted}

    async def shutdown(self) -> None:
        self.shutting_down = True
        self.async_llm.shutdown()
        await self.fetcher.close()
        if self.engine.tp is not None:   # tensor parallelism: stop the worker processes (tp/executor.py)
            self.engine.runner.shutdown()


def _adapter_name(spec: AdapterSpec | None) -> str:
    """The adapter a request asked for, before resolution ("" = the base model)."""
    if spec is None:
        return ""
    if spec.lora_request is not None:
        return spec.lora_request.lora_name
    return spec.describe()
