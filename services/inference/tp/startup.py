"""Where a tensor-parallel engine's start-up time goes, per rank (one log line per phase, always on).

A TP=2 engine of the 8B shape did not finish starting within ~130 s on a fresh 2-GPU machine
(2026-11-30 final run) while TP=1 started in seconds; these lines say which phase holds it, on each rank:
  rank 0:  spawn + rendezvous, all-reduce set-up (+ fused norm self-check), model load (+ LoRA manager),
           KV cache, decode graphs (Triton compiles land here on a cold cache), sampler graphs
  workers: rendezvous, all-reduce set-up, model load, waiting for the driver, KV cache, decode graphs,
           sampler graphs
`LORASERVE_TP_GRAPH_BUCKETS=1,64`: the decode buckets captured under TP (default: every bucket up to the
batch limit, as TP=1). Fewer buckets, fewer Triton specialisations to compile and graphs to capture; a
step of n rows replays the smallest captured bucket >= n, so any batch still runs graphed.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("loraserve.inference.tp.startup")


class StartupClock:
    def __init__(self, rank: int):
        self.rank = rank
        self.t0 = self.last = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> float:
        """The time since the previous mark, logged and kept as `phase`."""
        now = time.monotonic()
        dt, self.last = now - self.last, now
        self.phases.append((phase, dt))
        log.info("tp rank %d start-up: %s %.2f s (%.1f s since start)", self.rank, phase, dt, now - self.t0)
        return dt

    def total(self) -> float:
        return self.last - self.t0

    def summary(self) -> str:
        return ", ".join(f"{p} {dt:.1f}" for p, dt in self.phases) + f" (total {self.total():.1f} s)"


def graph_buckets(buckets: list[int]) -> list[int]:
    """The captured subset of `buckets` (LORASERVE_TP_GRAPH_BUCKETS); the largest is always kept (it sizes the
    static buffers and covers every batch up to the limit)."""
    spec = os.environ.get("LORASERVE_TP_GRAPH_BUCKETS", "").strip()
    if not spec:
        return buckets
    wanted = {int(v) for v in spec.replace(" ", "").split(",") if v}
    return sorted({b for b in buckets if b in wanted} | {buckets[-1]})
