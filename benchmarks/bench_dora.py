"""DoRA vs plain LoRA decode throughput (issue 16): batch 64, 32 distinct adapters each.

DoRA adds one element-wise scale per adapted output row (the LoRA expand epilogue multiplies
by the slot's g = m / ||W + B@A||), so a DoRA batch should decode within a few percent of the
same batch with plain LoRA adapters of the same rank and modules. The limit is the plain LoRA
run of the same engine, alternated with the DoRA run (LoRA, DoRA, LoRA, DoRA, ...) so drift
hits both; each figure is the median over the repeats. The expand kernel with and without the
scale is also timed alone per projection (the epilogue's own cost).

    python3 benchmarks/bench_dora.py [--layers 32] [--repeats 3] [--json benchmarks/results/dora_h200.json]
    python3 benchmarks/bench_dora.py --tiny      # CPU smoke run on a tiny random Llama (CI / laptops)

The GPU run uses a Llama-3-8B-shaped model with random bf16 weights (bench_engine.build_checkpoint)
and rank-16 adapters on all seven projections; the result key is `dora32_vs_lora32_decode`.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.common import write_json  # noqa: E402


def make_adapters(engine, n: int, rank: int, *, dora: bool, seed: int, scale: float = 0.01) -> list:
    """n random adapters on every projection of the engine's model, in its dtype. DoRA ones get
    m = ||W + B@A||_row * (1 + 0.05 noise), i.e. g ~ 1 +- 5% (a trained-looking factor)."""
    from loraserve.adapters import LoraAdapter
    from loraserve.inference.lora.dora import base_projection, row_norms

    args, dtype, dev = engine.args, engine.dtype, engine.device
    shapes = args.lora_module_shapes()
    g = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for i in range(n):
        w, mags = {}, {}
        for layer in range(args.num_hidden_layers):
            for m, (fi, fo) in shapes.items():
                a = (torch.randn(rank, fi, generator=g, device=dev) * scale).to(dtype)
                b = (torch.randn(fo, rank, generator=g, device=dev) * scale).to(dtype)
                w[(layer, m)] = (a.cpu(), b.cpu())
                if dora:
                    lin, lo, hi = base_projection(engine.model, layer, m)
                    noise = 1 + 0.05 * torch.randn(fo, generator=g, device=dev)
                    mags[(layer, m)] = (row_norms(lin.weight[lo:hi], a, b) * noise).cpu()
        out.append(LoraAdapter("hf", rank, float(rank), False, sorted(shapes), args.num_hidden_layers, w,
                               f"sha256:{seed:08x}{i:056x}", magnitudes=mags))
    return out


def register(engine, adapters: list, first_id: int) -> list:
    from loraserve import LoRARequest

    lm, reqs = engine.lora_manager, []
    for i, ad in enumerate(adapters):
        req = LoRARequest(f"bench-{first_id + i}", first_id + i, "")
        lm.release(lm.add_adapter(ad, req))
        reqs.append(req)
    return reqs


def time_decode(engine, batch: int, prompt_len: int, steps: int, loras: list, seed: int) -> float:
    """Decode tokens/s of `batch` sequences over `steps` steps (after prefill and 3 warm-up steps)."""
    from benchmarks.bench_engine import run_decode

    ids = torch.randint(2, engine.args.vocab_size - 1, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(seed)).tolist()
    return run_decode(engine, ids, steps, loras, tag=f"dora-bench-{seed}")["tok_s"]


def time_expand_epilogue(engine, batch: int, num_adapters: int, iters: int = 200) -> dict:
    """us per lora_expand launch with and without the DoRA scale, per projection (GPU only)."""
    from loraserve.kernels import LoRAMetaBuilder, lora_expand

    slots = engine.lora_manager.slots
    token_slot = (torch.arange(batch, device="cuda") % num_adapters).to(torch.int32)
    meta = LoRAMetaBuilder(batch, slots.num_slots, "cuda").build(token_slot)
    out = {}
    for proj, b in slots.b.items():
        b0, scale = b[0], slots.scale[proj][0]
        S, R = slots.a[proj].shape[2], b0.shape[2]
        buf = torch.randn(S, batch, R, device="cuda")
        y = torch.zeros(batch, b0.shape[1], dtype=b0.dtype, device="cuda")
        for tag, sc in (("lora", None), ("dora", scale)):
            for _ in range(10):
                lora_expand(buf, b0, slots.slice_offsets[proj], meta, slots.ranks, y, scale=sc)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                lora_expand(buf, b0, slots.slice_offsets[proj], meta, slots.ranks, y, scale=sc)
            end.record()
            torch.cuda.synchronize()
            out[f"expand_{proj}_{tag}_us"] = start.elapsed_time(end) * 1e3 / iters
    return out


def main() -> int:
    from benchmarks.bench_engine import decode_bench_parser

    a = decode_bench_parser(repeats=3).parse_args()

    from loraserve import LoraConfig
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine

    path = tempfile.mkdtemp(prefix="dora-bench-")
    if a.tiny:
        from tests.inference.conftest import make_random_model

        make_random_model(path, "llama")
        a.batch, a.adapters, a.rank, a.prompt_len, a.steps = min(a.batch, 8), min(a.adapters, 4), 8, 16, 4
        a.repeats = min(a.repeats, 2)
        kw = dict(dtype="float32", device="cpu")
    else:
        from benchmarks.bench_engine import build_checkpoint

        build_checkpoint(path, a.layers)
        kw = dict(dtype="bfloat16", device="cuda", max_num_tokens=8192, max_batch_size=256,
                  kv_cache_config={"free_gpu_memory_fraction": 0.5})
    lora_cfg = LoraConfig(max_lora_rank=a.rank, max_loras=2 * a.adapters, max_cpu_loras=2 * a.adapters)
    engine = LLMEngine(engine_config_from_kwargs(path, lora_config=lora_cfg, **kw))
    t = time.perf_counter()
    lora = register(engine, make_adapters(engine, a.adapters, a.rank, dora=False, seed=1), 1)
    dora = register(engine, make_adapters(engine, a.adapters, a.rank, dora=True, seed=2), 1 + a.adapters)
    res: dict = {"device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
                 "layers": engine.args.num_hidden_layers, "batch": a.batch, "adapters": a.adapters,
                 "rank": a.rank, "prompt_len": a.prompt_len, "steps": a.steps, "repeats": a.repeats,
                 "adapter_setup_s": time.perf_counter() - t}
    runs: dict[str, list[float]] = {"lora": [], "dora": []}
    for rep in range(a.repeats):
        for tag, reqs in (("lora", lora), ("dora", dora)):
            runs[tag].append(time_decode(engine, a.batch, a.prompt_len, a.steps, reqs, seed=100 * rep + len(tag)))
    res["lora32_decode_tok_s_runs"], res["dora32_decode_tok_s_runs"] = runs["lora"], runs["dora"]
    res["lora32_decode_tok_s"] = statistics.median(runs["lora"])
    res["dora32_decode_tok_s"] = statistics.median(runs["dora"])
    res["dora32_vs_lora32_decode"] = res["dora32_decode_tok_s"] / res["lora32_decode_tok_s"]
    res["dora_slot_bytes_fraction"] = (sum(s.numel() * 4 for s in engine.lora_manager.slots.scale.values())
                                       / engine.lora_manager.slots.nbytes)
    if engine.device.type == "cuda":
        res.update(time_expand_epilogue(engine, a.batch, a.adapters))
    print(json.dumps(res, indent=2))
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
