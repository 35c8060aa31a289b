"""The driver's side of tensor parallelism: starts the workers, sends them each step, stops them.

Process layout (vLLM's "driver worker"): this process is rank 0. It keeps the scheduler, the
engine loop and the servers, and runs shard 0 of the model itself, so the sampled tokens never
leave it; ranks 1..N-1 are worker processes (torch.multiprocessing spawn) that only run their
shard. Why rank 0 in the driver rather than N workers: the logits and the sampler stay in the
process that needs their results (no device->host->pipe hop per step), and N-1 processes, not N.

Two channels per worker:
  * a pipe (control): one small message per command (step header with its host-side lists,
    adapter load, stop). A worker waits on it with no timeout while the engine is idle, and reads
    EOF when the driver dies, so it never outlives it;
  * the process group (data): the step's packed int64 inputs and adapter weights go by
    `dist.broadcast` on the device (NCCL on CUDA, gloo on CPU), with a finite timeout: once a
    command is announced every rank must arrive in seconds.

A worker that dies is seen by the monitor thread (process sentinels) at once; the next command
raises `WorkerDiedError`, which ends the engine loop (AsyncLLM marks itself dead: NOT_SERVING).
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import weakref
from datetime import timedelta
from multiprocessing.connection import wait as wait_sentinels

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
TIMEOUT_S = float(os.environ.get("LORASERVE_TP_TIMEOUT_S", "300"))   # one collective, once announced
START_TIMEOUT_S = float(os.environ.get("LORASERVE_TP_START_TIMEOUT_S", "600"))


class WorkerDiedError(BaseException):
    """A tensor-parallel worker died or a collective failed: the group cannot run another step.
    A BaseException on purpose: the engine loop survives a failed step (Exception) by failing its
    requests, but this engine is broken for good and must report itself dead."""


class TPExecutor:
    def __init__(self, config, device: torch.device, size: int):
        import torch.multiprocessing as mp

        from .worker import worker_main

        self.size, self.device = size, device
        self.dead: str | None = None
        self.on_death: list = []     # callbacks(reason), from the monitor thread (AsyncLLM ends its loop)
        self._closed = False
        backend = "nccl" if device.type == "cuda" else "gloo"
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        # NVLink multicast (NCCL's NVLS, symmetric memory's multimem) stays off unless asked for: the
        # all-reduce here is P2P (tp/allreduce.py). Set before this process's NCCL init and the spawns,
        # which copy the environment, so every rank agrees.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(1, size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(rank, size, init_method, config, str(device), child, backend,
                                                      TIMEOUT_S), name=f"loraserve-tp{rank}", daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        atexit.register(self._finalizer)
        try:
            self._join_group(backend, init_method)
        except BaseException:
            self.shutdown()
            raise
        # the thread holds the executor weakly: a dropped engine's executor is collected (and stops its workers)
        self._monitor = threading.Thread(target=_watch, args=(weakref.ref(self), list(self.procs)),
                                         name="loraserve-tp-monitor", daemon=True)
        self._monitor.start()

    def _join_group(self, backend: str, init_method: str) -> None:
        """Rendezvous as rank 0 on a thread, so a worker that dies while starting ends the wait."""
        err: list[BaseException] = []

        def join():
            try:
                dist.init_process_group(backend, init_method=init_method, rank=0, world_size=self.size,
                                        timeout=timedelta(seconds=START_TIMEOUT_S), **device_id(self.device))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                err.append(exc)

        t = threading.Thread(target=join, daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.2)
            for p in self.procs:
                if p.exitcode is not None:
                    raise RuntimeError(f"tensor-parallel worker {p.name} exited with code {p.exitcode} while "
                                       "starting (its log lines above say why)")
        if err:
            raise err[0]

    # ---- commands (engine thread) ----------------------------------------------------------------
    def send(self, msg: tuple) -> None:
        self._check()
        try:
            for c in self.conns:
                c.send(msg)
        except (OSError, EOFError) as exc:
            self._fail(f"a tensor-parallel worker is gone ({exc!r})")

    def broadcast(self, t: torch.Tensor, symm=None) -> None:
        """t from rank 0 to every rank (the workers posted a receive of the same shape); through the
        symmetric buffer of `symm` (allreduce.SymmMemAllReduce.broadcast_step) where it fits."""
        try:
            if symm is None or not symm.broadcast_step(t):
                dist.broadcast(t, 0)
        except Exception as exc:  # noqa: BLE001 - a failed collective leaves the group unusable
            self._fail(f"tensor-parallel collective failed: {exc!r}")

    def raise_if_dead(self) -> None:
        """WorkerDiedError if a worker died (queued on the engine thread by AsyncLLM: ends its loop)."""
        self._check()

    def _check(self) -> None:
        if self.dead is not None:
            raise WorkerDiedError(self.dead)

    def _fail(self, reason: str) -> None:
        time.sleep(0.1)   # a worker's death is usually why: let the monitor name it
        self.dead = self.dead or reason
        raise WorkerDiedError(self.dead)

    # ---- failure and shutdown ---------------------------------------------------------------------
    def _on_worker_exit(self, p) -> None:
        p.join(1)
        self.dead = self.dead or f"tensor-parallel worker {p.name} (pid {p.pid}) died with exit code {p.exitcode}"
        log.critical("%s; the engine cannot run another step", self.dead)
        _abort_group()   # unblock a collective the engine thread may be waiting in (NCCL would wait its timeout)
        for cb in list(self.on_death):
            try:
                cb(self.dead)
            except Exception:  # noqa: BLE001
                log.exception("tensor-parallel death callback failed")

    def shutdown(self) -> None:
        """Stop every worker (asked, then terminated, then killed) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        if dist.is_initialized():
            _leave_group()


def _leave_group(wait_s: float = 10.0) -> None:
    """destroy_process_group on a daemon thread with a bounded wait, then abort. Under NCCL, with
    collectives captured in CUDA graphs, destroying the communicator after the workers exited blocked
    for good on the H200s (2026-11-30, bench_tp --tp-graphs: every figure measured, then shutdown
    never returned); shutdown must not hang, whatever NCCL does."""
    def destroy():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group still has to go
            log.debug("destroy_process_group failed", exc_info=True)

    t = threading.Thread(target=destroy, name="loraserve-tp-destroy", daemon=True)
    t.start()
    t.join(wait_s)
    if t.is_alive():
        log.warning("leaving the tensor-parallel process group took over %.0f s; aborting it", wait_s)
        _abort_group()


def _watch(ref, procs) -> None:
    """Monitor thread: the first worker to exit (sentinel) marks the executor dead, unless it is stopping."""
    sentinels = {p.sentinel: p for p in procs}
    ready = wait_sentinels(list(sentinels))
    executor = ref()
    if executor is not None and not executor._closed:
        executor._on_worker_exit(sentinels[ready[0]])


def _stop(procs, conns) -> None:
    for c in conns:
        try:
            c.send(("stop",))
        except (OSError, EOFError):
            pass
        c.close()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()
            p.join(2)
        if p.is_alive():
            p.kill()
            p.join(2)


def _abort_group() -> None:
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None and dist.is_initialized():
        try:
            abort()
        except Exception:  # noqa: BLE001 - best effort: gloo fails the pending op by itself
            log.debug("aborting the process group failed", exc_info=True)


def device_id(device: torch.device) -> dict:
    """NCCL: bind the communicator to this rank's GPU (eager init; the engine thread's current device
    is not necessarily it). Nothing for gloo."""
    if device.type != "cuda":
        return {}
    return {"device_id": torch.device("cuda", device.index or 0)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
