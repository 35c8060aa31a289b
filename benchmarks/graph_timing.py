"""One CUDA-graph timer for the kernel microbenchmarks: a few warm-up calls on a side stream,
`per_graph` calls captured in one graph (so launch gaps are the graph's, not Python's), the graph
replayed `replays` times between two CUDA events."""
from __future__ import annotations

import torch


def graph_seconds(fn, per_graph: int = 1, replays: int = 5, warmup: int = 1) -> float:
    """Seconds per call of fn."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(per_graph):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * per_graph)
