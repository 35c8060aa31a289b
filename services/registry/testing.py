"""A real registry server on 127.0.0.1 in a background thread, for tests (this and other services').

    with RunningRegistry(RegistryConfig(data_dir=tmp_path)) as reg:
        client = RegistryClient(reg.address)
        ...

The server runs its own asyncio loop in a daemon thread; `stop()` shuts it down gracefully
and disposes the DB engine.
"""
from __future__ import annotations

import asyncio
import threading

from .config import RegistryConfig
from .service import RegistryService


class RunningRegistry:
    def __init__(self, config: RegistryConfig, host: str = "127.0.0.1") -> None:
        self.config = config
        self.host = host
        self.port = 0
        self.service: RegistryService | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="registry-server", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "RunningRegistry":
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise TimeoutError("registry server did not start within 60 s")
        return self

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        from .server import start

        try:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            server, self.port = await start(self.config, f"{self.host}:0")
            self.service = server.registry_service  # type: ignore[attr-defined]
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        await server.stop(grace=1)
        self.service.close()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)

    def __enter__(self) -> "RunningRegistry":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
