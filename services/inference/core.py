"""InferenceCore: what the gRPC service and the OpenAI HTTP front share.

It owns the engine (on its thread, through AsyncLLM), the registry fetcher and the
adapter-resolution path, and raises the typed errors below, which each front end maps to
its own status codes (gRPC code / HTTP status).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraserve.config import LoraConfig, LoRARequest, SamplingParams, engine_config_from_kwargs

from .adapter_source import (AdapterFetcher, DigestMismatchError, RegistryAdapterNotFound,  # noqa: F401
                             RegistryUnavailableError)
from .async_llm import AsyncLLM, EngineStepError
from .engine import LLMEngine
from .llm import default_model_path
from .lora.manager import (AdapterAccessError, AdapterBusyError, AdapterCapacityError,  # noqa: F401
                           AdapterNotFoundError, release_after_engine, resolve_async)
from .outputs import RequestOutput
from .serve_config import ServeConfig

log = logging.getLogger(__name__)


class InvalidRequestError(ValueError):
    pass


class QueueFullError(RuntimeError):
    pass


class ShuttingDownError(RuntimeError):
    pass


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


class InferenceCore:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        kwargs = dict(cfg.llm_kwargs)
        kwargs.setdefault("lora_config", LoraConfig())
        kwargs["allowed_lora_dirs"] = list(cfg.allowed_lora_dirs)
        self.model_path = cfg.model or default_model_path()
        self.engine = LLMEngine(engine_config_from_kwargs(self.model_path, **kwargs))
        self.async_llm = AsyncLLM(self.engine)
        self.fetcher = AdapterFetcher(cfg.registry_address, cfg.adapter_cache_dir, cfg.registry_token,
                                      cfg.registry_timeout_s, cfg.registry_ca_file)
        self.tokenizer = self.engine.tokenizer
        self.lora_manager = self.engine.lora_manager
        self.requests_total = 0
        self.requests_aborted = 0
        self.shutting_down = False
        self.sources: dict[str, str] = {}   # digest -> "name:version" it was fetched as

    @property
    def model_name(self) -> str:
        return self.model_path

    # ---- adapters ----------------------------------------------------------------------------
    async def resolve_adapter(self, spec: AdapterSpec | None):
        """Fetch (if needed) and load into the host tier, off the event loop and the engine thread.
        Returns (LoRARequest, held AdapterHandle) or (None, None); the engine takes over the hold."""
        if spec is None:
            return None, None
        trusted = False
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
            trusted = True  # our own download cache, digest verified
        return req, await resolve_async(self.lora_manager, req, trusted)

    async def prefetch(self, spec: AdapterSpec):
        """Load an adapter into the host tier and keep it there until evicted by LRU."""
        req, hold = await self.resolve_adapter(spec)
        hold.release()
        return hold.handle

    # ---- generation ----------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, adapter: AdapterSpec | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
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

    def server_stats(self) -> dict:
        engine = self.engine.stats()
        lora = self.lora_manager.stats_dict() if self.lora_manager else {}
        return {**engine, "active_streams": self.async_llm.num_active,
                "device_slots_used": lora.get("device_slots_used", 0),
                "device_slots_pinned": lora.get("device_slots_pinned", 0),
                "requests_total": self.requests_total, "requests_aborted": self.requests_aborted}

    async def shutdown(self) -> None:
        self.shutting_down = True
        self.async_llm.shutdown()
        await self.fetcher.close()
