"""A request's adapter hold off the engine thread: resolving on a worker thread, releasing when
the request ends on any path, and the file-system identity of a lora_path (manager.py's helpers)."""
from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraserve.config import LoRARequest

    from .manager import AdapterHold, LoRAManager


async def resolve_async(manager: LoRAManager, req: LoRARequest, trusted: bool = False,
                        digest: str | None = None, data=None) -> AdapterHold:
    """manager.resolve on a worker thread (parsing never blocks an event loop or the engine
    thread). Shielded: a cancel (client gone, deadline) while it runs releases the hold it takes."""
    fut = asyncio.get_running_loop().run_in_executor(None, manager.resolve, req, trusted, digest, data)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().release())
        raise


def release_after_engine(async_llm, hold: AdapterHold) -> None:
    """End a request's hold when the request ends. The engine releases it when the request
    finishes or is aborted; this covers every other path (cancelled before the engine took it,
    add_request refused it). Queued behind the stream's abort on the engine thread, so it never
    drops a hold the engine still uses; release is idempotent."""
    if async_llm.is_alive:
        async_llm.call(lambda _engine: hold.release())
    else:
        hold.release()


def looks_nemo(path: str) -> bool:
    return path.endswith(".nemo") or os.path.isfile(os.path.join(path, "model_config.yaml"))


def stat_signature(path: str) -> tuple:
    if os.path.isdir(path):
        entries = []
        for root, _, files in os.walk(path):
            for f in files:
                st = os.stat(os.path.join(root, f))
                entries.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
        return (path, tuple(sorted(entries)))
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns)
