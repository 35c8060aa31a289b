"""bench_e2e's physical limit: the time a load needs at the GEMM peak and copy bandwidth measured in the
same run (prefill FLOPs at the peak + each decode step's weight bytes and every decode token's KV
context at the copy bandwidth), the figure wall time is divided by."""
from __future__ import annotations

import math
import time


def device_limits(tiny: bool) -> tuple[float, float]:
    """(GEMM FLOP/s, copy bytes/s) measured now: bf16 8192^3 and a 1 GiB copy on CUDA; on CPU
    (--tiny) an fp32 1024^3 matmul and a 256 MiB copy, so that the flow's arithmetic runs anywhere."""
    import torch

    if torch.cuda.is_available() and not tiny:
        from benchmarks.bench_engine import copy_bandwidth, gemm_peak

        return gemm_peak(), copy_bandwidth()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    peak = 5 * 2 * 1024 ** 3 / (time.perf_counter() - t)
    x = torch.ones(1 << 26)
    y = torch.empty_like(x)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    return peak, 5 * 2 * x.numel() * 4 / (time.perf_counter() - t)


def physical_limit(engine, requests, concurrency: int, peak: float, bw: float) -> dict:
    """Seconds the load needs at the measured limits (a lower bound: no overhead at all)."""
    from benchmarks.bench_engine import decode_step_bytes, prefill_flops

    a = engine.args
    flops = sum(prefill_flops(a, 1, len(r.input_ids)) for r in requests)
    decode_tokens = sum(r.output_tokens - 1 for r in requests)
    steps = math.ceil(decode_tokens / concurrency)
    kv_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * engine.runner.k_cache.element_size()
    # every decode token reads its whole context's K/V: sum over j of (prompt + j)
    kv_tokens = sum((r.output_tokens - 1) * len(r.input_ids) + r.output_tokens * (r.output_tokens - 1) // 2
                    for r in requests)
    decode_bytes = steps * decode_step_bytes(engine, 0, 0) + kv_tokens * kv_per_token
    return {"prefill_s": flops / peak, "decode_s": decode_bytes / bw, "limit_s": flops / peak + decode_bytes / bw,
            "prefill_tflop": flops / 1e12, "decode_steps": steps, "decode_gb": decode_bytes / 1e9}
