"""OpenAI-compatible HTTP front of the inference service (FastAPI on uvicorn, same event loop).

    POST /v1/completions, POST /v1/chat/completions   streaming (server-sent events) or not
    GET  /v1/models                                    base model + adapters (registry, loaded)
    GET  /health

Adapter choice, as vLLM/LoRAX and TensorRT-LLM users write it:
  * `model` = the base model (its path, basename or "default")  -> no adapter;
  * `model` = an adapter already in the host tier by name (lora_config.lora_dir preloads) -> it;
  * `model` = "name", "name:3" or "name:alias"                   -> registry reference;
  * `extra_body={"lora_request": {"lora_name", "lora_int_id", "lora_path"}}` wins over `model`.

Errors are mapped to HTTP statuses by the one table in errors.py (the gRPC front's codes, each
with its HTTP status) and rendered as OpenAI's JSON error body. A streaming request is started (adapter resolved, first output produced) before
the 200 goes out, so that its errors also get the right status; a client that disconnects
mid-stream cancels its generators, which aborts the requests in the engine.

    handle = await start_openai_server(core, "127.0.0.1", 0); handle.port; await handle.stop()
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from loraserve.config import LoRARequest

from . import openai_protocol as proto
from . import status
from .core import AdapterSpec, InferenceCore
from .openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, map_exception, sse
from .outputs import RequestOutput

log = logging.getLogger(__name__)

BASE_MODEL_ALIASES = ("default",)


# ---- choices: one engine request per (prompt, j < n) ---------------------------------------------
@dataclass
class Choice:
    index: int
    prompt_index: int
    stream: AsyncIterator[RequestOutput]
    first: RequestOutput


async def close_all(choices: list[Choice]) -> None:
    for c in choices:
        with contextlib.suppress(Exception):
            await c.stream.aclose()  # runs core.generate's finally: aborts the engine request


async def start_choices(core: InferenceCore, prompts: list, make_params, adapter: AdapterSpec | None,
                        n: int, rid: str) -> list[Choice]:
    """Start every choice at once and wait for each one's first output (the adapter is resolved
    and the request admitted by then); on any error abort them all and raise the first."""
    plan = [(p_idx * n + j, p_idx, prompt, j) for p_idx, prompt in enumerate(prompts) for j in range(n)]
    streams = [core.generate(prompt, make_params(p_idx, j), adapter, request_id=f"{rid}-{index}")
               for index, p_idx, prompt, j in plan]
    firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
    choices = [Choice(index, p_idx, s, first) for (index, p_idx, _, _), s, first in zip(plan, streams, firsts)]
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        await close_all(choices)
        raise errors[0]
    return choices


async def final_output(choice: Choice) -> RequestOutput:
    out = choice.first
    while not out.finished:
        out = await choice.stream.__anext__()
    await choice.stream.aclose()
    return out


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """Interleave the choices' outputs as they come (first outputs first)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    tasks: list[asyncio.Task] = []

    async def pump(c: Choice) -> None:
        try:
            if not c.first.finished:
                async for out in c.stream:
                    await queue.put((c, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((c, exc))
        finally:
            queue.put_nowait((c, done))

    try:
        for c in choices:
            yield c, c.first
        tasks = [asyncio.create_task(pump(c)) for c in choices]
        remaining = len(tasks)
        while remaining:
            c, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield c, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(choices)


def prompt_usage(choices: list[Choice], finals: dict[int, RequestOutput]) -> dict:
    prompt_tokens = {c.prompt_index: finals[c.index].num_prompt_tokens for c in choices}
    return proto.usage(sum(prompt_tokens.values()), sum(o.num_completion_tokens for o in finals.values()))


# ---- the app ---------------------------------------------------------------------------------------
class OpenAIFront:
    def __init__(self, core: InferenceCore):
        self.core = core

    # -- adapter selection --
    def base_names(self) -> set[str]:
        return {*self.core.base_model_names(), *BASE_MODEL_ALIASES, ""}

    def adapter_for(self, model: str, lora_request: proto.LoraRequestBody | None) -> AdapterSpec | None:
        if lora_request is not None:
            try:
                status.check_lora_request(lora_request.lora_name, lora_request.lora_int_id, lora_request.lora_path)
                return AdapterSpec(lora_request=lora_request.to_lora_request())
            except ValueError as exc:
                raise OpenAIError(400, f"lora_request: {exc}", param="lora_request") from exc
        if model in self.base_names():
            return None
        loaded = self.core.loaded_adapter_ids()
        if model in loaded:
            return AdapterSpec(lora_request=LoRARequest(model, loaded[model], ""))
        if not self.core.has_registry:
            raise OpenAIError(404, f"model {status.shown(model)} does not exist: it is not the base model "
                                   f"({self.core.model_name}) nor a loaded adapter, and no adapter registry "
                                   "is configured", param="model", code="model_not_found")
        name, _, ref = model.partition(":")
        version = int(ref) if ref.isascii() and ref.isdigit() and len(ref) <= 18 else 0
        alias = "" if version else ref
        try:
            status.check_adapter_ref(name, version, alias)
        except ValueError as exc:
            raise OpenAIError(400, f"model {status.shown(model)}: {exc}", param="model") from exc
        return AdapterSpec(name=name, version=version, alias=alias)

    def check_auth(self, request: Request) -> None:
        token = self.core.cfg.auth_token
        if not token:
            return
        from loraserve.auth_header import refusal  # one parser for gRPC, HTTP and the registry
        refused = refusal(request.headers.getlist("authorization"), [token])
        if refused is not None:
            raise OpenAIError(401, f"{refused} (Authorization: Bearer <token>)", code="invalid_api_key")

    # -- /v1/completions --
    async def completions(self, req: CompletionRequest, rid: str | None = None):
        req.check_supported()
        prompts = req.prompts()
        adapter = self.adapter_for(req.model, req.lora_request)
        max_tokens = req.max_tokens if req.max_tokens is not None else self.core.max_tokens_room(0)
        rid = rid or proto.new_id("cmpl")
        model = req.model or self.core.model_name
        choices = await start_choices(self.core, prompts, lambda p, j: req.sampling_params(max_tokens, j),
                                      adapter, req.n, rid)
        echoes = [(p if isinstance(p, str) else self.core.decode(p)) if req.echo else "" for p in prompts]
        if req.stream:
            return self._stream(self._completion_events(choices, rid, model, echoes, req.include_usage_in_stream))
        finals = {c.index: out for c, out in zip(choices, await asyncio.gather(*map(final_output, choices)))}
        dec = self.core.decode
        body = [{"index": c.index, "text": echoes[c.prompt_index] + finals[c.index].outputs[0].text,
                 "logprobs": proto.completion_logprobs(finals[c.index].outputs[0], dec, len(echoes[c.prompt_index])),
                 "finish_reason": finals[c.index].outputs[0].finish_reason} for c in choices]
        return proto.completion_body(rid, model, body, prompt_usage(choices, finals))

    async def _completion_events(self, choices, rid, model, echoes, include_usage) -> AsyncIterator[bytes]:
        created = int(time.time())
        finals: dict[int, RequestOutput] = {}
        started: set[int] = set()
        async for c, out in merged(choices):
            text = out.outputs[0].text_diff
            if c.index not in started:
                started.add(c.index)
                text = echoes[c.prompt_index] + text
            if not text and not out.finished:
                continue
            if out.finished:
                finals[c.index] = out
            choice = {"index": c.index, "text": text, "logprobs": None,
                      "finish_reason": out.outputs[0].finish_reason if out.finished else None}
            yield sse(proto.completion_body(rid, model, [choice], None, created, chunk=True))
        if include_usage:
            yield sse(proto.completion_body(rid, model, [], prompt_usage(choices, finals), created, chunk=True))
        yield sse("[DONE]")

    # -- /v1/chat/completions --
    async def chat_completions(self, req: ChatCompletionRequest, rid: str | None = None):
        req.check_supported()
        adapter = self.adapter_for(req.model, req.lora_request)
        # one function for every front: transformers' apply_chat_template(tokenize=True) ids; a template that
        # refuses these messages (raise_exception) or fails on them is a ChatTemplateError: 400, param messages
        ids = self.core.encode_chat(req.plain_messages(), add_generation_prompt=req.add_generation_prompt)
        requested = req.requested_max_tokens()
        max_tokens = requested if requested is not None else self.core.max_tokens_room(len(ids))
        rid = rid or proto.new_id("chatcmpl")
        model = req.model or self.core.model_name
        choices = await start_choices(self.core, [ids], lambda p, j: req.sampling_params(max_tokens, j),
                                      adapter, req.n, rid)
        if req.stream:
            return self._stream(self._chat_events(choices, rid, model, req.include_usage_in_stream))
        finals = {c.index: out for c, out in zip(choices, await asyncio.gather(*map(final_output, choices)))}
        dec = self.core.decode
        body = [{"index": c.index, "message": {"role": "assistant", "content": finals[c.index].outputs[0].text},
                 "logprobs": proto.chat_logprobs(finals[c.index].outputs[0], dec),
                 "finish_reason": finals[c.index].outputs[0].finish_reason} for c in choices]
        return proto.chat_body(rid, model, body, prompt_usage(choices, finals))

    async def _chat_events(self, choices, rid, model, include_usage) -> AsyncIterator[bytes]:
        created = int(time.time())

        def chunk(index: int, delta: dict, finish: str | None = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse(proto.chat_body(rid, model, [choice], None, created, chunk=True))

        finals: dict[int, RequestOutput] = {}
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for c, out in merged(choices):
            if out.outputs[0].text_diff:
                yield chunk(c.index, {"content": out.outputs[0].text_diff})
            if out.finished:
                finals[c.index] = out
                yield chunk(c.index, {}, out.outputs[0].finish_reason)
        if include_usage:
            yield sse(proto.chat_body(rid, model, [], prompt_usage(choices, finals), created, chunk=True))
        yield sse("[DONE]")

    @staticmethod
    def _stream(events: AsyncIterator[bytes]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield event
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # after the 200: report in the stream, as OpenAI does
                yield sse(map_exception(exc).body())
                yield sse("[DONE]")

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- /v1/models --
    async def models(self) -> dict:
        base = self.core.model_name
        data = [proto.model_card(base, "loraserve")]
        seen = {base}
        if self.core.has_registry:
            try:
                for a in await self.core.registry_adapters():
                    if a.name not in seen:
                        seen.add(a.name)
                        data.append(proto.model_card(a.name, "loraserve-registry", parent=base, version=a.version))
            except Exception as exc:  # noqa: BLE001 - the base model is still served
                log.warning("GET /v1/models: registry listing failed: %s", exc)
        for name in self.core.loaded_adapter_ids():
            if name not in seen:
                seen.add(name)
                data.append(proto.model_card(name, "loraserve-loaded", parent=base))
        return {"object": "list", "data": data}


async def _until_disconnected(request: Request) -> None:
    # the body has been read, so the next ASGI message can only be the client going away
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable):
    """Await a handler, cancelling it if the client disconnects first. The server notices a gone
    client by itself only while it writes a streamed body; without this, a non-streaming request
    whose client left (a proxy timeout, a killed script) would generate to its last token."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # closes its engine streams: the requests are aborted, KV and adapter freed
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return JSONResponse(proto.error_body(499, "client disconnected"), status_code=499)
    return task.result()


def build_app(core: InferenceCore) -> FastAPI:
    front = OpenAIFront(core)
    app = FastAPI(title="loraserve OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg')}"
                            for e in errors) or "invalid request body"
        return JSONResponse(proto.error_body(400, message, param=loc or None), status_code=400)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception):
        err = map_exception(exc)
        return JSONResponse(err.body(), status_code=err.status)

    async def authorized(request: Request) -> None:
        front.check_auth(request)  # raises OpenAIError(401), rendered by the handler above

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        rid = proto.new_id("cmpl")  # here, so that an internal error's log line names the request
        try:
            return await cancel_on_disconnect(request, front.completions(req, rid))
        except Exception as exc:
            err = map_exception(exc, rid)
            return JSONResponse(err.body(), status_code=err.status)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        rid = proto.new_id("chatcmpl")
        try:
            return await cancel_on_disconnect(request, front.chat_completions(req, rid))
        except Exception as exc:
            err = map_exception(exc, rid)
            return JSONResponse(err.body(), status_code=err.status)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return await front.models()

    @app.get("/health")
    async def health():
        serving, why = core.health()
        if not serving:
            return JSONResponse({"status": why}, status_code=503)
        return {"status": "ok"}

    return app


# ---- serving on the caller's event loop --------------------------------------------------------------
@dataclass
class OpenAIServerHandle:
    server: object            # uvicorn.Server
    task: asyncio.Task
    host: str
    port: int

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _make_uvicorn_server(app: FastAPI):
    import uvicorn

    class _Server(uvicorn.Server):
        # The gRPC server owns the process's signals; this server stops through handle.stop().
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    return _Server(config)


async def start_openai_server(core: InferenceCore, host: str = "127.0.0.1", port: int = 8000) -> OpenAIServerHandle:
    """Serve the OpenAI API on host:port (0 = any free port) on the running event loop."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))  # bind here: a taken port fails now, with OSError, not in uvicorn's sys.exit
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    bound_port = sock.getsockname()[1]
    server = _make_uvicorn_server(build_app(core))
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"openai-http:{bound_port}")
    while not server.started:
        if task.done():
            task.result()  # re-raise the startup failure
            raise RuntimeError("OpenAI HTTP server exited during startup")
        await asyncio.sleep(0.01)
    log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", host, bound_port)
    return OpenAIServerHandle(server, task, host, bound_port)
