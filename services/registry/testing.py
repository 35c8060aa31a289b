"""A real registry server on 127.0.0.1 in a background thread, for tests (this and other services').

    with RunningRegistry(RegistryConfig(data_dir=tmp_path)) as reg:
        client = RegistryClient(reg.address)
        ...

The server runs its own asyncio loop in a daemon thread; `stop()` shuts it down gracefully
and disposes the DB engine.
"""
from __future__ import annotations

from loraserve.background import BackgroundServer

from .config import RegistryConfig
from .service import RegistryService


class RunningRegistry(BackgroundServer):
    thread_name = "registry-server"

    def __init__(self, config: RegistryConfig, host: str = "127.0.0.1") -> None:
        super().__init__()
        self.config = config
        self.host = host
        self.port = 0
        self.service: RegistryService | None = None
        self._server = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 60) -> "RunningRegistry":
        return super().start(timeout)

    async def _open(self) -> None:
        from .server import start

        self._server, self.port = await start(self.config, f"{self.host}:0")
        self.service = self._server.registry_service  # type: ignore[attr-defined]

    async def _close(self) -> None:
        await self._server.stop(grace=1)
        self.service.close()
