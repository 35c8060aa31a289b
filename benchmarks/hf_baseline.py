"""HF transformers on the same checkpoint as the engine (benchmarks/bench_engine.py's baseline): SDPA attention, bf16,
decode through generate() and a prefill that stays loaded so that its timed runs interleave with the engine's."""
from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from benchmarks.bench_engine import Prompts


class HFPrefill:
    """HF transformers' prefill of `batch` fresh 1024-token prompts (logits of the last token only, as the
    engine), one timed call per __call__; the model stays loaded so that bench_engine can interleave
    these runs with the engine's (time_engine_prefill's `other`)."""

    def __init__(self, model, prompts: Prompts, batch: int, device: str):
        self.model, self.prompts, self.batch, self.device = model, prompts, batch, device
        self.times: list[float] = []

    @torch.inference_mode()
    def __call__(self) -> float:
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        ids = torch.tensor(self.prompts.make(self.batch, 1024), device=self.device)
        sync()
        t = time.perf_counter()
        self.model(ids, logits_to_keep=1)
        sync()
        self.times.append(time.perf_counter() - t)
        print(f"  HF prefill: {self.times[-1] * 1e3:.2f} ms", flush=True)
        return self.times[-1]

    def tok_s(self, first: int = 0) -> float:
        t = sorted(self.times[first:])
        return self.batch * 1024 / t[len(t) // 2]

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


@torch.inference_mode()
def time_hf(path: str, prompts: Prompts, prompt_len: int, steps: int, prefill_batch: int,
            decode: bool = True, device: str = "cuda", keep: bool = False) -> dict:
    """HF's figures. keep: out["hf_prefill"] is an HFPrefill holding the model (for interleaved runs)."""
    import transformers

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # HF at its best here: SDPA attention (flash / cuDNN kernels), bf16, one generate() per batch
    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype,
                                                          attn_implementation="sdpa").to(device).eval()
    out = {"hf_attn_implementation": model.config._attn_implementation, "transformers": transformers.__version__}
    for batch in ((1, 64) if decode else ()):
        gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=None)
        model.generate(torch.tensor(prompts.make(batch, prompt_len), device=device), max_new_tokens=4, **gen)
        ids = torch.tensor(prompts.make(batch, prompt_len), device=device)
        sync()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **gen)
        sync()
        t_prefill = time.perf_counter() - t
        ids = torch.tensor(prompts.make(batch, prompt_len), device=device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=steps + 1, **gen)
        sync()
        out[f"hf_decode_bs{batch}_tok_s"] = batch * steps / (time.perf_counter() - t - t_prefill)
    hf = HFPrefill(model, prompts, prefill_batch, device)
    del model
    hf()   # warm-up
    for _ in range(3):
        hf()
    # before the engine exists, on a GPU that has not run a long prefill yet (cooler, faster clocks)
    out["hf_prefill_tok_s_alone"] = out["hf_prefill_tok_s"] = hf.tok_s(first=1)
    if keep:
        out["hf_prefill"] = hf
    else:
        hf.close()
    return out
