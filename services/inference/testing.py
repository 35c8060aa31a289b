"""A real inference server on 127.0.0.1 in a background thread (tests, benchmarks, demos).

    with RunningInference(ServeConfig(model=path, port=0, registry_address=reg.address)) as srv:
        stub = InferenceServiceStub(grpc.insecure_channel(srv.address))
"""
from __future__ import annotations

from loraserve.background import BackgroundServer

from .serve_config import ServeConfig


class RunningInference(BackgroundServer):
    thread_name = "inference-server"

    def __init__(self, cfg: ServeConfig):
        super().__init__()
        self.cfg = cfg
        self.running = None

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.running.port}"

    @property
    def core(self):
        return self.running.servicer.core

    def start(self, timeout: float = 120) -> "RunningInference":
        return super().start(timeout)

    async def _open(self) -> None:
        from .server import create_server

        self.running = await create_server(self.cfg, wait_ready=True)

    async def _close(self) -> None:
        await self.running.stop(grace=1)
