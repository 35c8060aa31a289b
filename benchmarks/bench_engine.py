"""End-to-end engine benchmark on a Llama-3-8B-shaped model with random bf16 weights (GPU).

Prints, in one run:
  * HBM copy bandwidth and the decode roofline (weight bytes per step / copy bandwidth)
  * loraserve decode tokens/s at batch 1 and 64, and prefill tokens/s
  * HF transformers on the same weights: decode tokens/s at batch 1 and 64, prefill tokens/s
  * loraserve decode at batch 64 with 32 distinct rank-16 adapters (all projections) vs no LoRA

    python3 benchmarks/bench_engine.py [--layers 32] [--skip-hf] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        y.copy_(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    del x, y
    return 2 * (1 << 30) / dt  # read + write


def build_checkpoint(path: str, layers: int) -> None:
    import transformers
    from tests.inference.conftest import make_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=8192, rope_theta=500000.0, torch_dtype="bfloat16",
                                   bos_token_id=0, eos_token_id=1)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def time_engine_decode(engine, batch: int, prompt_len: int, steps: int, loras=None) -> float:
    from loraserve import SamplingParams

    for i in range(batch):
        engine.add_request(f"d{batch}-{i}-{time.time()}", [(7 * i + j) % 1000 + 2 for j in range(prompt_len)],
                           SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True),
                           None if loras is None else loras[i % len(loras)])
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.seqs.values()):
        engine.step()  # prefill (and first tokens)
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    return batch * steps / dt


def time_engine_prefill(engine, batch: int, prompt_len: int) -> float:
    from loraserve import SamplingParams

    def once(tag):
        for i in range(batch):
            engine.add_request(f"p{tag}-{i}", [(13 * i + j) % 1000 + 2 for j in range(prompt_len)],
                               SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        torch.cuda.synchronize()
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    once("warm")
    return batch * prompt_len / once("run")


@torch.inference_mode()
def time_hf(path: str, prompt_len: int, steps: int, prefill_batch: int) -> dict:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).cuda().eval()
    out = {}
    for batch in (1, 64):
        ids = torch.randint(2, 1000, (batch, prompt_len), device="cuda")
        gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=None)
        model.generate(ids, max_new_tokens=4, **gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **gen)
        torch.cuda.synchronize()
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=steps + 1, **gen)
        torch.cuda.synchronize()
        out[f"hf_decode_bs{batch}_tok_s"] = batch * steps / (time.perf_counter() - t - t_prefill)
    ids = torch.randint(2, 1000, (prefill_batch, 1024), device="cuda")
    model(ids)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model(ids)
    torch.cuda.synchronize()
    out["hf_prefill_tok_s"] = prefill_batch * 1024 / (time.perf_counter() - t)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def random_adapters(args, n: int, rank: int, dtype):
    from loraserve.adapters import LoraAdapter

    shapes = args.lora_module_shapes()
    adapters = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        w = {}
        for layer in range(args.num_hidden_layers):
            for m, (fi, fo) in shapes.items():
                w[(layer, m)] = ((torch.randn(rank, fi, generator=g) * 0.01).to(dtype),
                                 (torch.randn(fo, rank, generator=g) * 0.01).to(dtype))
        adapters.append(LoraAdapter("hf", rank, float(rank), False, sorted(shapes), args.num_hidden_layers, w,
                                    f"sha256:{i:064x}"))
    return adapters


class _Printing(dict):
    """Prints each result as soon as it is measured (a run cut short still reports)."""

    def __init__(self, init):
        super().__init__()
        for k, v in init.items():
            self[k] = v

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        print(f"{k:40s} {v:.3f}" if isinstance(v, float) else f"{k:40s} {v}", flush=True)

    def update(self, other):
        for k, v in other.items():
            self[k] = v


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from loraserve import LoraConfig, LoRARequest
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine

    res = _Printing({"gpu": torch.cuda.get_device_name(), "layers": a.layers, "prompt_len": a.prompt_len})
    bw = copy_bandwidth()
    res["copy_bandwidth_GBps"] = bw / 1e9
    path = tempfile.mkdtemp(prefix="llama8b-")
    t = time.perf_counter()
    build_checkpoint(path, a.layers)
    res["checkpoint_build_s"] = time.perf_counter() - t
    if not a.skip_hf:
        res.update(time_hf(path, a.prompt_len, a.steps, a.prefill_batch))
    cfg = engine_config_from_kwargs(path, dtype="bfloat16", device="cuda", max_num_tokens=8192, max_batch_size=256,
                                    lora_config=None if a.skip_lora else LoraConfig(max_lora_rank=16, max_loras=32,
                                                                                     max_cpu_loras=32),
                                    kv_cache_config={"free_gpu_memory_fraction": 0.5})
    engine = LLMEngine(cfg)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    res["weight_GB"] = weight_bytes / 1e9
    res["roofline_decode_bs1_tok_s"] = bw / weight_bytes
    res["roofline_decode_bs64_tok_s"] = 64 * bw / weight_bytes
    for batch in (1, 64):
        res[f"loraserve_decode_bs{batch}_tok_s"] = time_engine_decode(engine, batch, a.prompt_len, a.steps)
    res["loraserve_prefill_tok_s"] = time_engine_prefill(engine, a.prefill_batch, 1024)
    if not a.skip_lora:
        lm = engine.lora_manager
        reqs = []
        for i, ad in enumerate(random_adapters(engine.args, 32, 16, torch.bfloat16)):
            req = LoRARequest(f"bench-{i}", i, "")
            lm.release(lm.add_adapter(ad, req))
            reqs.append(req)
        res["loraserve_decode_bs64_32lora_tok_s"] = time_engine_decode(engine, 64, a.prompt_len, a.steps, reqs)
        res["loraserve_decode_bs64_nolora_tok_s"] = time_engine_decode(engine, 64, a.prompt_len, a.steps)
        res["lora32_vs_nolora"] = res["loraserve_decode_bs64_32lora_tok_s"] / res["loraserve_decode_bs64_nolora_tok_s"]
    for k in ("1", "64"):
        if f"hf_decode_bs{k}_tok_s" in res:
            res[f"speedup_vs_hf_decode_bs{k}"] = res[f"loraserve_decode_bs{k}_tok_s"] / res[f"hf_decode_bs{k}_tok_s"]
        res[f"fraction_of_roofline_bs{k}"] = res[f"loraserve_decode_bs{k}_tok_s"] / res[f"roofline_decode_bs{k}_tok_s"]
    if "hf_prefill_tok_s" in res:
        res["speedup_vs_hf_prefill"] = res["loraserve_prefill_tok_s"] / res["hf_prefill_tok_s"]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
