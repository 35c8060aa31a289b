"""A real inference server on 127.0.0.1 in a background thread (tests, benchmarks, demos).

    with RunningInference(ServeConfig(model=path, port=0, registry_address=reg.address)) as srv:
        stub = InferenceServiceStub(grpc.insecure_channel(srv.address))
"""
from __future__ import annotations

import asyncio
import threading

from .serve_config import ServeConfig


class RunningInference:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.running = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="inference-server",
                                        daemon=True)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.running.port}"

    @property
    def core(self):
        return self.running.servicer.core

    def start(self, timeout: float = 120) -> "RunningInference":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"inference server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    async def _main(self) -> None:
        from .server import create_server

        try:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            self.running = await create_server(self.cfg, wait_ready=True)
        except BaseException as exc:  # noqa: BLE001 - surfaced by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        await self.running.stop(grace=1)

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)

    def __enter__(self) -> "RunningInference":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
