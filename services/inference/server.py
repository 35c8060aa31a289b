"""The inference gRPC service (loraserve.v1.InferenceService), thin over InferenceCore.

`create_server(cfg)` binds and starts the server at once (health NOT_SERVING, reflection
on), then loads the model in a thread and flips health to SERVING; `serve(cfg)` runs it
until SIGINT/SIGTERM and stops gracefully (health NOT_SERVING first).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraserve import ports
from loraserve.config import LoRARequest, SamplingParams
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

from . import status
from .core import AdapterSpec, InferenceCore, LoadedAdapter
from .errors import InvalidRequestError
from .serve_config import ServeConfig

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """Map a domain error to its canonical gRPC status (None: not a domain error; see status.py)."""
    return status.mapped(exc)


def to_logprobs(p: pb.SamplingParams) -> int | None:
    """vLLM's meaning (None: none; N: the chosen token's logprob plus the top N); the deprecated
    legacy_logprobs (bool) and top_logprobs fields still count, the larger request wins."""
    asked = [n for n in (p.logprobs if p.HasField("logprobs") else None, p.top_logprobs or None,
                         0 if p.legacy_logprobs else None) if n is not None]
    return max(asked) if asked else None


def to_sampling_params(p: pb.SamplingParams) -> SamplingParams:
    kw = {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "seed"):
        if p.HasField(name):
            kw[name] = getattr(p, name)
    try:
        return SamplingParams(stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
                              logprobs=to_logprobs(p),
                              include_stop_str_in_output=p.include_stop_str_in_output,
                              min_tokens=p.min_tokens, **kw)
    except ValueError as exc:  # SamplingParams checks its fields: the client's values
        raise InvalidRequestError(f"sampling_params: {exc}") from exc


def to_adapter_spec(msg, which: str | None) -> AdapterSpec | None:
    if which == "adapter_ref":
        r = msg.adapter_ref
        status.check_adapter_ref(r.name, r.version, r.alias)
        return AdapterSpec(name=r.name, version=r.version, alias=r.alias)
    if which == "lora_request":
        r = msg.lora_request
        status.check_lora_request(r.lora_name, r.lora_int_id, r.lora_path)
        try:
            req = LoRARequest(r.lora_name, r.lora_int_id, r.lora_path, r.lora_ckpt_source or "hf")
        except ValueError as exc:  # LoRARequest checks its fields: the client's values
            raise InvalidRequestError(f"lora_request: {exc}") from exc
        return AdapterSpec(lora_request=req)
    return None


def mapped_errors(method):
    """A unary RPC's exceptions answered by errors.py's table (an undeclared one: INTERNAL and one
    log line), never grpc's default UNKNOWN carrying the exception's text."""
    @functools.wraps(method)
    async def call(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:  # context.abort: already answered
            raise
        except Exception as exc:  # noqa: BLE001 - mapped by errors.py's table
            await self._abort_for(context, exc)
    return call


def to_loaded(a: LoadedAdapter) -> pb.LoadedAdapter:
    return pb.LoadedAdapter(name=a.name, digest=a.digest, rank=a.rank, size_bytes=a.size_bytes, on_device=a.on_device,
                            on_host=a.on_host, active_requests=a.active_requests, source=a.source)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Maps messages to InferenceCore calls and back; request metrics and the request log line are
    the core's (one place for every front)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.core: InferenceCore | None = None
        self.metrics = None

    async def _core(self, context) -> InferenceCore:
        if self.cfg.auth_token:
            from loraserve.auth_header import authorization_values, refusal  # shared with registry + HTTP
            refused = refusal(authorization_values(context.invocation_metadata()), [self.cfg.auth_token])
            if refused is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, refused)
        if self.core is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if self.core.shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        return self.core

    async def _abort_for(self, context, exc: BaseException, request_id: str | None = None):
        # errors.py's table; anything undeclared: INTERNAL, a generic message and one log line
        # (with the request id), never the exception's text
        await context.abort(*status.classify(exc, "inference gRPC call", request_id))

    async def Generate(self, request, context):
        core = await self._core(context)
        which = request.WhichOneof("prompt")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing: set text or token_ids")
        prompt = request.text if which == "text" else list(request.token_ids.ids)
        request_id = request.request_id or core.new_request_id()
        try:
            params = to_sampling_params(request.sampling_params)
            spec = to_adapter_spec(request, request.WhichOneof("adapter"))
            async for out in core.generate(prompt, params, spec, request_id):
                comp = out.outputs[0]
                if comp.token_ids_diff or comp.text_diff:
                    n = len(comp.token_ids_diff)
                    tops = comp.top_logprobs[-n:] if comp.top_logprobs and n else []
                    yield pb.GenerateResponse(chunk=pb.GenerateChunk(
                        token_ids=comp.token_ids_diff, text=comp.text_diff,
                        logprobs=comp.logprobs[-n:] if comp.logprobs and n else [],
                        top_logprobs=[pb.TopLogprobs(token_ids=list(t), logprobs=list(t.values())) for t in tops]))
                if out.finished:
                    m = out.metrics
                    yield pb.GenerateResponse(complete=pb.GenerateComplete(
                        finish_reason=FINISH.get(comp.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                        stop_reason="" if comp.stop_reason is None else str(comp.stop_reason),
                        prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(comp.token_ids),
                        queue_time_s=m.queue_time or 0.0, ttft_s=m.ttft or 0.0,
                        total_time_s=(m.finished_time - m.arrival_time) if m.finished_time else 0.0,
                        adapter_digest=out.adapter_digest or "", request_id=out.request_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped by errors.py's table
            await self._abort_for(context, exc, request_id)

    @mapped_errors
    async def GetModelInfo(self, request, context):
        core = await self._core(context)
        i = core.model_info()
        return pb.GetModelInfoResponse(
            model_name=i.model_name, model_type=i.model_type, dtype=i.dtype, device=i.device, vocab_size=i.vocab_size,
            max_seq_len=i.max_seq_len, num_layers=i.num_layers, hidden_size=i.hidden_size,
            lora_enabled=i.lora_enabled, max_lora_rank=i.max_lora_rank, lora_target_modules=i.lora_target_modules,
            device_adapter_slots=i.device_adapter_slots)

    @mapped_errors
    async def Tokenize(self, request, context):
        core = await self._core(context)
        ids, tokens = core.tokenize(request.text)
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

    @mapped_errors
    async def ListLoadedAdapters(self, request, context):
        core = await self._core(context)
        c = core.adapter_cache()
        tier = lambda d: pb.CacheTierStats(**d)  # noqa: E731
        return pb.ListLoadedAdaptersResponse(
            adapters=[to_loaded(a) for a in c.adapters], host=tier(c.host), device=tier(c.device), disk=tier(c.disk),
            device_slots=c.device_slots, device_slots_used=c.device_slots_used)

    @mapped_errors
    async def LoadAdapter(self, request, context):
        core = await self._core(context)
        loaded = await core.load_adapter(to_adapter_spec(request, request.WhichOneof("adapter")))
        return pb.LoadAdapterResponse(adapter=to_loaded(loaded))

    @mapped_errors
    async def UnloadAdapter(self, request, context):
        core = await self._core(context)
        if request.WhichOneof("adapter") == "digest":
            done = await core.unload_adapter(digest=request.digest)
        elif request.WhichOneof("adapter") == "adapter_ref":
            done = await core.unload_adapter(spec=to_adapter_spec(request, "adapter_ref"))
        else:
            raise InvalidRequestError("set adapter_ref or digest")
        return pb.UnloadAdapterResponse(unloaded=done)

    @mapped_errors
    async def GetServerStats(self, request, context):
        core = await self._core(context)
        s = await core.stats()
        return pb.GetServerStatsResponse(
            waiting_requests=s["waiting"], running_requests=s["running"], active_streams=s["active_streams"],
            free_kv_blocks=s["free_kv_blocks"], total_kv_blocks=s["total_kv_blocks"],
            device_slots_used=s["device_slots_used"], device_slots_pinned=s["device_slots_pinned"],
            requests_total=s["requests_total"], requests_aborted=s["requests_aborted"])


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    servicer: InferenceServicer
    health: health.aio.HealthServicer
    ready: asyncio.Event
    metrics_port: int | None = None
    openai: object = None
    load_error: BaseException | None = None
    _tasks: list = field(default_factory=list)

    async def stop(self, grace: float = 5.0) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        core = self.servicer.core
        if core is not None:
            core.shutting_down = True
        if self.openai is not None:
            await self.openai.stop()
        await self.server.stop(grace)
        if self.servicer.metrics is not None:
            self.servicer.metrics.stop()
        if core is not None:
            await core.shutdown()


async def create_server(cfg: ServeConfig, wait_ready: bool = False) -> RunningServer:
    # a taken port is an error now, before the model loads (SO_REUSEPORT off; the HTTP ports checked too)
    ports.check_free(cfg.host, cfg.metrics_port, "Prometheus metrics", "--metrics-port")
    ports.check_free(cfg.openai_host or cfg.host, cfg.openai_port, "the OpenAI HTTP API", "--openai-port")
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20), *ports.GRPC_OPTIONS])
    servicer = InferenceServicer(cfg)
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert_file:
        with open(cfg.tls_key_file, "rb") as k, open(cfg.tls_cert_file, "rb") as c:
            port = ports.add_grpc_port(server, address, credentials=grpc.ssl_server_credentials([(k.read(), c.read())]))
    else:
        port = ports.add_grpc_port(server, address)
    await server.start()
    running = RunningServer(server, port, servicer, health_servicer, asyncio.Event())

    async def load() -> None:
        try:
            core = await asyncio.to_thread(InferenceCore, cfg)
            if cfg.metrics_port is not None:
                from .metrics import ServiceMetrics

                servicer.metrics = ServiceMetrics(core)
                running.metrics_port = ports.bind_or_explain(lambda: servicer.metrics.start(cfg.metrics_port, cfg.host),
                                                             cfg.host, cfg.metrics_port, "Prometheus metrics", "--metrics-port")
            servicer.core = core
            loop = asyncio.get_running_loop()

            async def not_serving() -> None:
                for name in ("", SERVICE_NAME):
                    await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

            # the engine thread died (it should not): probes must see it at once, so the pod restarts
            core.on_engine_dead(lambda exc: loop.call_soon_threadsafe(lambda: loop.create_task(not_serving())))
            if cfg.openai_port is not None:
                from .openai_server import start_openai_server

                try:
                    running.openai = await start_openai_server(core, cfg.openai_host or cfg.host, cfg.openai_port)
                except OSError as exc:
                    raise ports.explained(exc, cfg.openai_host or cfg.host, cfg.openai_port, "the OpenAI HTTP API",
                                          "--openai-port") from exc
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("model %s loaded; serving on %s:%d", core.model_name, cfg.host, port)
        except BaseException as exc:  # noqa: BLE001
            running.load_error = exc
            log.exception("failed to load the model")
        finally:
            running.ready.set()

    running._tasks.append(asyncio.create_task(load()))
    if wait_ready:
        await running.ready.wait()
        if running.load_error is not None:
            await server.stop(0)
            raise running.load_error
    return running


async def serve(cfg: ServeConfig) -> int:
    running = await create_server(cfg)
    print(f"loraserve inference listening on {cfg.host}:{running.port} (loading model...)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, asyncio.create_task(running.ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    if running.load_error is not None:
        await running.server.stop(0)
        print(f"error: {running.load_error}", flush=True)
        return 1
    if running.ready.is_set() and not stop.is_set():
        extra = f", metrics on :{running.metrics_port}" if running.metrics_port else ""
        if running.openai is not None:
            extra += f", OpenAI HTTP on :{running.openai.port}"
        print(f"ready: model loaded{extra}", flush=True)
    await waiter
    await running.stop()
    return 0
