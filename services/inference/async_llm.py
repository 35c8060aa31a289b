"""AsyncLLM: the engine on a background thread, with an asyncio streaming front.

The engine thread owns the engine: requests and aborts reach it through a command queue
and results go back to each request's asyncio.Queue with call_soon_threadsafe, so any
number of coroutines (gRPC streams, HTTP handlers) can share one engine.
A consumer that stops iterating (client gone, deadline) aborts its request at once,
which frees its KV blocks and adapter pin.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Callable

from loraserve.config import LoRARequest, SamplingParams

from .engine import LLMEngine
from .errors import EngineDeadError, EngineStepError, InvalidRequestError
from .output_builder import PendingOutput
from .outputs import RequestOutput, merge_outputs

log = logging.getLogger(__name__)


SWITCH_INTERVAL_S = 0.0005


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None):
        self.engine = engine
        # The engine thread wakes from the device wait needing the GIL; with Python's default 5 ms switch
        # interval a busy event-loop thread (building stream messages) could hold it for a whole decode step.
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.max_queue = max_queue
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        # called once, from the engine thread, if the loop ever dies (the server flips health)
        self.on_dead: Callable[[BaseException], None] | None = None
        # the last step's stream messages, handed to the event loops once the next step is launched (see _loop)
        self._undelivered: list[tuple[str, Any]] = []
        engine.on_launched = self._deliver_undelivered
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()
        # tensor parallelism: a worker that dies while the engine idles ends the loop too (NOT_SERVING)
        tp = getattr(engine, "tp", None)
        if tp is not None:
            tp.executor.on_death.append(lambda reason: self.call(self._end_if_worker_died))
        # an observer of every step's messages (PendingOutput: request_id, finished, error; build() is the
        # consumer's, in order)
        self.on_step: Callable[[list[PendingOutput]], None] | None = None

    # ---- public API (any thread / event loop) -----------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self._streams)

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead_reason(self) -> BaseException | None:
        return self._dead

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread; returns a Future with its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            # The caller may have cancelled the future (client gone, deadline) before the engine
            # thread got here. fn still runs (an add_request must take ownership of its adapter
            # hold, so that the abort queued behind it releases it), but its result goes nowhere;
            # a RUNNING future can no longer be cancelled, so set_result cannot race a cancel.
            wanted = fut.set_running_or_notify_cancel()
            try:
                result = fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                if wanted:
                    fut.set_exception(exc)
                else:
                    log.debug("command for a cancelled caller failed: %r", exc)
                return
            if wanted:
                fut.set_result(result)

        self._commands.put(run)
        return fut

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       lora_request: LoRARequest | None = None, request_id: str | None = None,
                       lora_handle=None) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDeadError(f"engine thread died: {self._dead!r}")
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            if lora_handle is not None and self.engine.lora_manager is not None:
                self.engine.lora_manager.release(lora_handle)
            raise InvalidRequestError(f"duplicate request_id {request_id!r}")
        self._streams[request_id] = (loop, q)
        finished = False
        try:
            await asyncio.wrap_future(self.call(lambda e: e.add_request(request_id, prompt, sampling_params, lora_request, lora_handle)))
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                error = None
                while not out.finished and not q.empty():  # a slow consumer gets one message per wake-up
                    nxt = q.get_nowait()
                    if isinstance(nxt, BaseException):
                        error = nxt
                        break
                    out = merge_outputs(out, nxt)
                finished = out.finished
                yield out
                if error is not None:
                    raise error
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:   # its consumer is gone: the last message is not built
                self.call(lambda e: e.abort_request(request_id, build=False))

    def abort(self, request_id: str) -> concurrent.futures.Future:
        return self.call(lambda e: e.abort_request(request_id))

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._drain(block=False)   # anything queued while the thread was exiting runs here, on the caller's
        if self.engine.on_launched == self._deliver_undelivered:   # the engine may go back to a caller's thread
            self.engine.on_launched = None

    # ---- engine thread --------------------------------------------------------------------
    def _end_if_worker_died(self, engine) -> None:
        """A TP worker died: raise its WorkerDiedError (a BaseException) on the engine thread, which ends
        the loop (dead, on_dead); a no-op anywhere else (shutdown drains leftover commands on its caller)."""
        if threading.current_thread() is self._thread:
            engine.tp.executor.raise_if_dead()

    def _loop(self) -> None:
        """Step N's messages are handed over while step N+1 waits for the device (engine.on_launched): the
        event loop's per-stream Python work then overlaps the device wait, during which this thread holds no
        GIL, instead of the launch of N+1, where each torch call would wait for the GIL (up to a switch
        interval). A message is late by one schedule + launch (~1 ms), the same for every token: TPOT and
        ITL do not change. When the engine goes idle, or a step fails, everything is handed over at once."""
        try:
            while not self._stop.is_set():
                idle = not self.engine.has_unfinished_requests()
                if idle:
                    self._deliver_undelivered()
                self._drain(block=idle)
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished_requests():
                    try:
                        outputs = self.engine.step_pending()   # built on the consumers' loops (_put_all)
                    except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
                        self._deliver_undelivered()
                        self._fail_running(exc)
                        continue
                    self._deliver_undelivered()   # normally done already, by engine.on_launched
                    # a request the engine failed alone (e.g. non-finite logits) ends in an error
                    self._undelivered = [(out.request_id, EngineStepError(out.error) if out.error else out)
                                         for out in outputs]
                    if self.on_step is not None:
                        try:
                            self.on_step(outputs)
                        except Exception:  # noqa: BLE001 - an observer never stops the engine
                            log.exception("on_step callback failed")
            # commands queued before the stop (aborts, adapter-hold releases of closed streams) still run:
            # the engine goes back to the caller with nothing held for requests that are gone
            self._drain(block=False)
            self._deliver_undelivered()
        except BaseException as exc:  # noqa: BLE001 - report to every waiting stream
            self._deliver_undelivered()
            log.critical("engine thread died; the server reports NOT_SERVING from now on", exc_info=True)
            self._dead = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine failed: {exc!r}"))
            if self.on_dead is not None:
                try:
                    self.on_dead(exc)
                except Exception:  # noqa: BLE001
                    log.exception("on_dead callback failed")

    def _fail_running(self, exc: Exception) -> None:
        """A step raised (e.g. out of memory): abort the requests that were running, report the
        error to their streams, and go on with the rest of the queue."""
        # clients get a reference to the log line, never the exception's text (it may echo their input)
        ref = f"engine-{next(self._ids)}-{int(time.time())}"
        running, _ = self.engine.queued_sequences()
        log.exception("engine step failed (reference %s); aborting %d running request(s): %s", ref, len(running),
                      ", ".join(s.request_id for s in running))
        for seq in running:
            self.engine.abort_request(seq.request_id)
            self._deliver(seq.request_id, EngineStepError(f"request failed in the engine (reference {ref}; "
                                                          "see the server log)"))

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                cmd()
            except Exception:  # noqa: BLE001 - a command's failure is its caller's, never the loop's
                log.exception("engine command failed")
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver_undelivered(self) -> None:
        items, self._undelivered = self._undelivered, []
        if items:
            self._deliver_many(items)

    def _deliver_many(self, items: list[tuple[str, Any]]) -> None:
        """One wake-up per event loop per step, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            entry = self._streams.get(request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _deliver(self, request_id: str, item: Any) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            pass


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    """On the consumers' event loop: build the step's messages (detokenization included) while the engine
    thread waits for the device, and queue them."""
    for q, item in puts:
        if type(item) is PendingOutput:
            try:
                item = item.build()
            except Exception as exc:  # noqa: BLE001 - this stream's failure, not the loop's
                log.exception("building a stream message failed")
                item = EngineStepError(f"building the output failed: {exc!r}")
        q.put_nowait(item)
