"""A tensor-parallel start is bounded: a worker that never joins the group (stopped right after it was
spawned, as a hung GPU driver or a wedged import would leave it) makes LLM(..., tensor_parallel_size=2) fail
within LORASERVE_TP_START_TIMEOUT_S plus the workers' stop (tp/executor.py), with no process left behind."""
from __future__ import annotations

import threading
import time

import pytest

from loraserve import LLM

from tests.inference.test_tp import _children

psutil = pytest.importorskip("psutil")


def test_a_worker_that_never_joins_fails_the_start_in_bounded_time(tiny_llama, monkeypatch):
    from loraserve.inference.tp import executor

    monkeypatch.setattr(executor, "START_TIMEOUT_S", 6.0)
    stopped: list = []

    def stop_the_worker() -> None:   # SIGSTOP the spawned worker before it can reach the rendezvous
        deadline = time.monotonic() + 30
        while not stopped and time.monotonic() < deadline:
            for p in _children():
                try:
                    p.suspend()
                    stopped.append(p)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.002)

    threading.Thread(target=stop_the_worker, daemon=True).start()
    t = time.monotonic()
    with pytest.raises(Exception) as err:
        LLM(model=tiny_llama[0], dtype="float32", device="cpu", tensor_parallel_size=2)
    took = time.monotonic() - t
    print(f"start failed after {took:.1f} s: {err.value!r}"[:300])
    assert stopped, "the worker was never seen"
    # the rendezvous' deadline (6 s) and the stop of the worker (asked, terminated, killed: <= 9 s)
    assert took < 6 + 12, f"start failed after {took:.1f} s: {err.value!r}"
    assert _children() == []
