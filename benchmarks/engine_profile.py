"""torch.profiler tables of the engine's steps for bench_engine.py --profile: one prefill step of 8 fresh
1024-token prompts and decode steps at batch 64 / 1 (with 32 adapters when given)."""
from __future__ import annotations

import os

import torch

def profile_steps(engine, prompts, out_dir: str, loras=None, decode: bool = True) -> None:
    """torch.profiler tables of one prefill step (8 x 1024) and of decode steps at batch 64, without and
    (loras given) with LoRA."""
    from torch.profiler import ProfilerActivity, profile

    from loraserve import SamplingParams

    os.makedirs(out_dir, exist_ok=True)
    for i, ids in enumerate(prompts.make(8, 1024)):
        engine.add_request(f"prof-p{i}", ids, SamplingParams(max_tokens=1, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
    with open(os.path.join(out_dir, "profile_prefill.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    if not decode:
        return
    profile_decode(engine, prompts, os.path.join(out_dir, "profile_decode_bs64.txt"))
    profile_decode(engine, prompts, os.path.join(out_dir, "profile_decode_bs1.txt"), batch=1)
    if loras:
        profile_decode(engine, prompts, os.path.join(out_dir, "profile_decode_bs64_32lora.txt"), loras)


def profile_decode(engine, prompts, path: str, loras=None, batch: int = 64) -> None:
    """torch.profiler tables of 10 decode steps at `batch` (512-token prompts; loras cycled over them)."""
    from torch.profiler import ProfilerActivity, profile

    from loraserve import SamplingParams

    tag = f"l{batch}" if loras else f"d{batch}"
    for i, ids in enumerate(prompts.make(batch, 512)):
        engine.add_request(f"prof-{tag}{i}", ids, SamplingParams(max_tokens=40, ignore_eos=True, temperature=0),
                           None if not loras else loras[i % len(loras)])
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.seqs.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    for rid in list(engine.seqs):
        engine.abort_request(rid)
