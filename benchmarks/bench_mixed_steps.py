"""Mixed prefill+decode steps: decode rows batched (current) vs attended one sequence at a
time (the path before), on the same engine in the same run. Runs on CPU or GPU.

    python benchmarks/bench_mixed_steps.py [--device cpu] [--decoders 64] [--steps 20]

Each measured step has `--decoders` sequences decoding plus one new 256-token prompt
arriving, as under continuous load.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def run(engine, decoders: int, steps: int) -> float:
    from loraserve import SamplingParams

    p = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    for i in range(decoders):
        engine.add_request(f"d{i}-{time.time()}", [(i * 7 + j) % 300 + 2 for j in range(64)], p)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.seqs.values()):
        engine.step()
    t = time.perf_counter()
    for k in range(steps):
        engine.add_request(f"p{k}-{time.time()}", [(k * 5 + j) % 300 + 2 for j in range(256)],
                           SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    return dt / steps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decoders", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference import context
    from loraserve.inference.engine import LLMEngine
    from tests.inference.conftest import make_random_model

    path = tempfile.mkdtemp()
    make_random_model(path, "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    engine = LLMEngine(engine_config_from_kwargs(path, dtype="float32", device=a.device, enforce_eager=True))
    batched = run(engine, a.decoders, a.steps)
    real_split = context.split_mixed

    def per_sequence(ctx, device):  # the path before: every sequence attended on its own
        real_split(ctx, device)
        ctx.decode_rows = ctx.decode_seqs = None
        start, ctx.prefill_seqs = 0, []
        for i, (qlen, total) in enumerate(zip(ctx.query_lens, ctx.context_lens_list)):
            ctx.prefill_seqs.append((i, start, qlen, total))
            start += qlen

    import loraserve.inference.model_runner as mr
    mr.split_mixed = per_sequence
    looped = run(engine, a.decoders, a.steps)
    mr.split_mixed = real_split
    print(f"device {a.device}, {a.decoders} decoding + one 256-token prefill per step")
    print(f"per-sequence attention  {looped * 1e3:8.2f} ms/step")
    print(f"batched decode rows     {batched * 1e3:8.2f} ms/step")
    print(f"speedup                 {looped / batched:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
