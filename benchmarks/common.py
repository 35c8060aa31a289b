"""What the benchmarks share besides the CUDA-graph timer (graph_timing.graph_seconds) and the limits measured in
the same run (bench_engine.copy_bandwidth, bench_engine.gemm_peak): writing the result JSON that
benchmarks/results/ keeps."""
from __future__ import annotations

import json
import os


def write_json(path: str | None, obj, indent: int = 2) -> None:
    """obj as JSON at path, its folder made if missing; nothing where path is None (no --json given)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
