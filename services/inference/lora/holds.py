"""An adapter's handle and a request's hold on it (AdapterHandle, AdapterHold), and the hold off the
engine thread: resolving on a worker thread, releasing when the request ends on any path, and the
file-system identity of a lora_path (manager.py's helpers)."""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraserve.adapters import LoraAdapter

if TYPE_CHECKING:
    from loraserve.config import LoRARequest

    from .manager import LoRAManager


@dataclass(eq=False)
class AdapterHandle:
    key: str                          # "sha256:<hex>" content digest
    name: str
    int_id: int
    adapter: LoraAdapter | None       # host copy (None while not in the host tier)
    nbytes: int
    rank: int
    source: str = ""                  # path it is (re)loaded from
    ckpt_source: str | None = None    # format hint for load_adapter
    num_requests: int = 0             # live holds (queued + running requests)
    slot: int | None = None
    slot_pins: int = 0                # running sequences using the slot
    loading: bool = False             # a background load is in flight
    load_error: BaseException | None = None
    load_error_time: float = 0.0      # requests that arrived before this fail with load_error
    trusted: bool = False             # source is the service's own download cache (not confined)
    # cold-path stages of its last load, seconds (parse_s, stage_s; place_s when copied to a slot)
    timings: dict = field(default_factory=dict)


class AdapterHold:
    """One request's claim on an adapter; `release()` is idempotent. Reads of other attributes
    (key, slot, name, ...) go to the handle, so a Sequence can carry the hold as its `lora`."""

    __slots__ = ("handle", "_manager", "released")

    def __init__(self, handle: AdapterHandle, manager: "LoRAManager"):
        self.handle, self._manager, self.released = handle, manager, False

    def release(self) -> None:
        with self._manager.lock:
            if not self.released:
                self.released = True
                self.handle.num_requests = max(0, self.handle.num_requests - 1)

    def __getattr__(self, name):
        return getattr(self.handle, name)


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
