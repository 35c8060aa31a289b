"""The engine with and without the decode-step fusions, in one process on one checkpoint (GPU):
batch-1 decode tok/s (CUDA-graph steps) next to its HBM roofline, prefill of 8 fresh 1024-token
prompts, and where one batch-1 step's GPU time goes (torch.profiler, kernels summed).

Variants (each a fresh engine, so its decode graphs are captured under the variant's switches):
  base      no fusion (the engine's defaults before these switches)
  fused     LORASERVE_FUSED_ROPE_KV=1 + LORASERVE_GEMV_MAX_M=1 (fused4_pdl: GEMV up to 4 tokens, + PDL)
  fused_pdl fused + LORASERVE_PDL=1 + LORASERVE_FUSED_GREEDY=1 (pdl_only: RoPE+KV fused and PDL, cuBLAS GEMMs; fused_pdl_sg: + the
            greedy sampler in a CUDA graph, LORASERVE_SAMPLER_GRAPHS=1)
  default   whatever the environment / code defaults say (what bench_engine.py measures)

    python3 benchmarks/bench_decode_fusions.py [--layers 8] [--variants base,fused,fused_pdl] [--profile]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_engine import (Prompts, build_checkpoint, copy_bandwidth, decode_step_bytes,  # noqa: E402
                                     prefill_run, sync, time_engine_decode)
from benchmarks.common import write_json  # noqa: E402

VARIANTS = {"base": dict(rope_kv=False, gemv=0, pdl="0"), "fused": dict(rope_kv=True, gemv=1, pdl="0"),
            "fused_pdl": dict(rope_kv=True, gemv=1, pdl="1", greedy="1"), "fused4_pdl": dict(rope_kv=True, gemv=4, pdl="1"),
            "gemv_only": dict(rope_kv=False, gemv=1, pdl="0"), "rope_kv_only": dict(rope_kv=True, gemv=0, pdl="0"),
            "pdl_only": dict(rope_kv=True, gemv=0, pdl="1"),
            "fused_pdl_sg": dict(rope_kv=True, gemv=1, pdl="1", sampler_graphs="1"), "default": None}


def apply_variant(name: str) -> None:
    from loraserve.inference.models import llama

    v = VARIANTS[name]
    if v is None:
        return
    llama.FUSED_ROPE_KV = v["rope_kv"]
    llama.GEMV_MAX_M = v["gemv"]
    llama.GEMV_SILU = False
    os.environ["LORASERVE_PDL"] = v["pdl"]
    os.environ["LORASERVE_SAMPLER_GRAPHS"] = v.get("sampler_graphs", "0")   # greedy sampling in a graph too
    os.environ["LORASERVE_FUSED_GREEDY"] = v.get("greedy", "0")            # kernels/greedy.py


def kernel_table(prof, top: int = 22) -> list[tuple[str, float, int]]:
    """(kernel name, total us, calls) of the CUDA kernels, largest first."""
    rows = {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if t and evt.key and not evt.key.startswith(("aten::", "cuda", "Memset", "Lazy", "Activity")):
            rows[evt.key] = (t, evt.count)
    return sorted(((k[:60], t, n) for k, (t, n) in rows.items()), key=lambda r: -r[1])[:top]


def profile_bs1(engine, prompts, steps: int = 8) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from loraserve import SamplingParams

    engine.add_request("prof-bs1", prompts.make(1, 512)[0], SamplingParams(max_tokens=steps + 40, temperature=0,
                                                                           ignore_eos=True))
    for _ in range(6):
        engine.step()
    cuda = engine.device.type == "cuda"
    sync(engine)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        sync(engine)
    engine.abort_request("prof-bs1")
    table = kernel_table(prof)
    total = sum(t for _, t, _ in table)
    print(f"  bs1 profile, {steps} steps: kernels (top {len(table)}) {total / steps:.0f} us per step")
    for name, t, n in table:
        print(f"    {t / steps:8.1f} us/step {n // steps:5d}/step  {name}")
    return {"per_step_us": {name: t / steps for name, t, _ in table}}


def time_prefill(engine, prompts, batch: int, trace: bool) -> dict:
    def once(tag):
        return prefill_run(engine, prompts, batch, 1024, f"f{tag}", trace)

    once("w0")
    runs = [once(f"r{i}") for i in range(3)]
    dt, rec = sorted(runs, key=lambda r: r[0])[1]
    out = {"tok_s": batch * 1024 / dt, "s": dt}
    if rec:
        steps = []
        for r in rec:
            dev_ms = r.events[0].elapsed_time(r.events[1]) if r.events else None
            steps.append(dict(kind=r.kind, tokens=r.num_tokens, host_launch_ms=(r.launched_at - r.start) * 1e3,
                              device_ms=dev_ms, wait_ms=r.wait_s * 1e3, total_ms=(r.end - r.start) * 1e3))
        out["steps"] = steps
        print(f"  prefill {batch}x1024: {dt * 1e3:.1f} ms wall; steps: " + "; ".join(
            f"{s['kind']}/{s['tokens']} host {s['host_launch_ms']:.1f} dev {s['device_ms'] or 0:.1f} "
            f"wait {s['wait_ms']:.1f} total {s['total_ms']:.1f} ms" for s in steps))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--variants", default="base,fused,fused_pdl")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="kernel table of batch-1 steps (last variant)")
    ap.add_argument("--trace-prefill", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU check of the script on a tiny random Llama")
    ap.add_argument("--checkpoint", default=None, help="build the checkpoint here, or reuse the one already there "
                    "(one process per variant: several engines in one process are a known risk)")
    ap.add_argument("--skip-prefill", action="store_true")
    a = ap.parse_args()
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine

    dev = "cpu" if a.tiny else "cuda"
    bw = 1e11 if a.tiny else copy_bandwidth()
    res = {"gpu": "cpu" if a.tiny else torch.cuda.get_device_name(), "layers": a.layers, "copy_bandwidth_GBps": bw / 1e9}
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    path = a.checkpoint or tempfile.mkdtemp(prefix="llama8b-")
    t = time.perf_counter()
    if os.path.exists(os.path.join(path, "config.json")):
        pass   # reused
    elif a.tiny:
        from tests.inference.conftest import make_random_model

        make_random_model(path, "llama", vocab_size=120000, max_position_embeddings=4096)
    else:
        build_checkpoint(path, a.layers)
    print(f"checkpoint ({a.layers} layers) {time.perf_counter() - t:.1f} s", flush=True)
    prompts = Prompts(seed=77)
    names = a.variants.split(",")
    for i, name in enumerate(names):
        apply_variant(name)
        t = time.perf_counter()
        cfg = engine_config_from_kwargs(path, dtype="float32" if a.tiny else "bfloat16", device=dev, max_num_tokens=8192,
                                        max_batch_size=max(8, a.prefill_batch),
                                        kv_cache_config={"free_gpu_memory_fraction": 0.3})
        engine = LLMEngine(cfg)
        r = time_engine_decode(engine, prompts, 1, 512, a.steps)
        limit = bw / decode_step_bytes(engine, 1, r["mean_context"])
        row = {"engine_build_s": time.perf_counter() - t, "decode_bs1_tok_s": r["tok_s"],
               "decode_bs1_ms_per_step": r["s_per_step"] * 1e3, "decode_bs1_roofline_fraction": r["tok_s"] / limit,
               "prefix_hits": r["prefix_hits"]}
        print(f"{name:10s} bs1 {r['tok_s']:.1f} tok/s = {r['s_per_step'] * 1e3:.3f} ms/step = "
              f"{r['tok_s'] / limit:.3f} of the roofline ({limit:.0f} tok/s); engine {row['engine_build_s']:.1f} s",
              flush=True)
        if not a.skip_prefill:
            row["prefill"] = time_prefill(engine, prompts, a.prefill_batch, a.trace_prefill)
            print(f"{name:10s} prefill {row['prefill']['tok_s']:.0f} tok/s", flush=True)
        if a.profile:
            row["profile_bs1"] = profile_bs1(engine, prompts)
        res[name] = row
        del engine
        gc.collect()
        if not a.tiny:
            torch.cuda.empty_cache()
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
