"""A server on its own asyncio loop in a daemon thread (tests, benchmarks, demos).

Subclasses implement `_open()` (start serving; runs on the thread's loop) and `_close()`
(stop gracefully). `start()` returns once `_open()` finished, re-raising its error;
`stop()` runs `_close()` and joins the thread. Both also work as a context manager.
"""
from __future__ import annotations

import asyncio
import threading


class BackgroundServer:
    thread_name = "background-server"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name=self.thread_name,
                                        daemon=True)

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> "BackgroundServer":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.thread_name} did not start within {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self

    async def _main(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            await self._open()
        except BaseException as exc:  # noqa: BLE001 - surfaced by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        await self._close()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
