"""Timing helpers of the LoRA kernel benchmarks (bench_lora_kernels and the probes that import it): the device copy
bandwidth (read + write) every figure is a fraction of, CUDA-event medians, and per-call time from graph replays."""
from __future__ import annotations

import statistics

import torch


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = event_time(lambda: dst.copy_(src), reps=20)
    src = dst = None  # free the 4 GiB (not `del`: the lambda above closes over them)
    return 2 * (1 << 30) * 2 / (ms * 1e-3) / 1e9


def event_time(fn, reps: int) -> float:
    """Median ms of fn over reps, after a warm-up, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_us(calls, reps: int = 20) -> float:
    """us per element of calls (a list of no-arg fns), from replays of one graph running them all."""
    for c in calls:  # compile + warm up outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    us = event_time(graph.replay, reps) * 1e3 / len(calls)
    del graph
    return us
