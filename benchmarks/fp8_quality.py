"""Quality half of benchmarks/bench_fp8.py (issue 14): teacher-forced top-1 agreement of an FP8 engine against
bf16 on the embedded default model with its demo adapter `upper`, and the max logit error."""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

def teacher_forced_logits(engine, ids: list[int], lora_handle=None, decode: bool = False) -> torch.Tensor:
    """[len(ids), V] logits of one sequence in two chunks (the second reads the first from the KV cache); decode:
    the second half one token per forward instead (M = 1: the decode GEMV kernels, eager)."""
    import types

    from loraserve.inference.context import Context, reset_context, set_context, split_mixed

    bs, dev, out, half = engine.runner.block_size, engine.device, [], len(ids) // 2
    chunks = [(0, half)] + ([(p, p + 1) for p in range(half, len(ids))] if decode else [(half, len(ids))])
    for lo, hi in chunks:
        blocks = list(range(-(-hi // bs)))
        ctx = Context(slot_mapping=torch.tensor([blocks[p // bs] * bs + p % bs for p in range(lo, hi)], device=dev),
                      query_lens=[hi - lo], context_lens=torch.tensor([hi], device=dev, dtype=torch.int32),
                      context_lens_list=[hi], block_tables=torch.tensor([blocks], device=dev, dtype=torch.int32),
                      decode_only=False)
        split_mixed(ctx, dev)
        set_context(ctx)
        try:
            with torch.inference_mode():
                if lora_handle is not None:
                    ctx.lora = engine.lora_manager.prepare_batch([types.SimpleNamespace(lora=lora_handle)], [hi - lo])
                x = engine.model(torch.tensor(ids[lo:hi], device=dev), torch.arange(lo, hi, device=dev))
                out.append(engine.model.compute_logits(x).float().cpu())
        finally:
            reset_context()
    return torch.cat(out)


def _compare(logits: dict, ref: dict, suffix: str) -> dict:
    """Top-1 agreement (all tokens, and base / upper apart) and max |logit error| of `logits` against `ref`."""
    out = {}
    for who in ("all", "base", "upper"):
        keys = [k for k in ref if who == "all" or k[0] == who]
        agree = sum(int((logits[k].argmax(-1) == ref[k].argmax(-1)).sum()) for k in keys)
        total = sum(ref[k].shape[0] for k in keys)
        key = "top1_agreement_vs_bf16" if who == "all" else f"top1_agreement_{who}"
        out[key + suffix] = agree / total
        if who == "all":
            out["top1_tokens" + suffix] = total
            out["max_logit_error" + suffix] = max(float((logits[k] - ref[k]).abs().max()) for k in keys)
    return out


# --quality-decode: the default model's projections at one token on the fp16-product GEMV (gemvh, the 8B table's kind
# at one token for qkv / o / gate_up / the LM head; its own table has no entry for these small shapes), gate_up's with
# the SiLU epilogue (grouped kind): fp8_gemv_configs' LORASERVE_FP8_GEMV_CONFIGS format, "M,N,K": config
DEFAULT_MODEL_M1_CONFIGS = {"1,256,128": ["gemvh4", 1, 1, 32, 1, 1, 4], "1,128,128": ["gemvh4", 1, 1, 32, 1, 1, 4],
                            "1,688,128": ["gemvh2", 1, 4, 32, 1, 4, 4], "1,4096,128": ["gemvh2", 1, 4, 32, 1, 4, 4]}


def agreement(kw: dict, quant: dict, num_texts: int, on_result=None, extra_modes: bool = True,
              decode: bool = False) -> dict:
    """Top-1 agreement and max |logit error| of FP8 vs bf16 (same compute dtype) on the default model,
    base and with the `upper` adapter, on text sampled from the bf16 engine's model. decode: also both engines
    teacher-forced through one-token forwards for the second half of each text (keys *_decode)."""
    from benchmarks.bench_fp8 import ROOT, build, free
    from loraserve import LoraConfig, LoRARequest, SamplingParams

    model = os.path.join(ROOT, "models", "default")
    prompts = ["def ", "import os\n\n\nclass ", "    def __init__(self", "for i in range(10):\n"] * 4
    res, texts, ref = {}, None, {}
    t0 = time.perf_counter()
    for tag, q in (("bf16", None), ("fp8", quant)):
        # eager (no CUDA-graph capture: the teacher-forced chunks run eagerly anyway; capture and its compiles
        # for 13 batch buckets x 2 cost most of this phase's time)
        engine = build(model, q, {**kw, "max_num_tokens": 2048, "enforce_eager": True}, LoraConfig(max_lora_rank=8))
        req = LoRARequest("upper", 1, os.path.join(ROOT, "models", "adapters", "upper"))
        if texts is None:   # sampled once, from the bf16 engine
            params = SamplingParams(max_tokens=160, temperature=1.0, seed=0, ignore_eos=True)
            done: dict[str, list[int]] = {}
            for i, p in enumerate(prompts[:num_texts]):   # one batch: 160 decode steps, not 160 per text
                engine.add_request(f"text-{i}", engine.tokenizer.encode(p), params, None)
            while engine.seqs:
                for o in engine.step():
                    if o.finished:
                        done[o.request_id] = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
            texts = [done[f"text-{i}"] for i in range(len(done))]
        engine.add_request("warm", [5, 6, 7], SamplingParams(max_tokens=1), req)   # adapter resident, KV scales set
        while engine.seqs:
            engine.step()
        handle = [h for h in engine.lora_manager.resident()["device"] if h is not None and h.slot >= 0][0]
        def all_logits(one_token: bool = False) -> dict:
            return {(name, i): teacher_forced_logits(engine, ids, h, one_token) for name, h in (("base", None),
                                                                                                ("upper", handle))
                    for i, ids in enumerate(texts)}

        print(f"  quality: {tag} engine ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        if tag == "bf16":
            ref = all_logits()
            ref_decode = all_logits(True) if decode else None
        else:
            # the engine's own dispatch: a teacher-forced chunk of ~80 tokens is prefill-sized, so on the GPU a
            # projection of >= W8A8_MIN_WEIGHTS runs W8A8 (_scaled_mm, activations rounded to e4m3 per token),
            # as a served prompt's does; the default model's (128-wide) are all below it: weight-only
            res = _compare(all_logits(), ref, "")
            if on_result is not None:   # the headline figure first: a time-limited run keeps it
                on_result(res)
            if decode:   # the second halves one token per forward (decode's GEMV kernels and fusions)
                res.update(_compare(all_logits(True), ref_decode, "_decode"))
                if on_result is not None:
                    on_result(res)
            # the same engine with every GEMM W8A8 where the GPU can (what an 8B model's prefill runs), then
            # with every GEMM weight-only (what decode's steps of <= 32 tokens run); the path is chosen per call
            for mode, suffix in (("on", "_w8a8"), ("off", "_w8a16")) if extra_modes else ():
                old = os.environ.get("LORASERVE_FP8_ACT_QUANT")
                os.environ["LORASERVE_FP8_ACT_QUANT"] = mode
                try:
                    res.update(_compare(all_logits(), ref, suffix))
                    if on_result is not None:
                        on_result(res)
                finally:
                    if old is None:
                        os.environ.pop("LORASERVE_FP8_ACT_QUANT")
                    else:
                        os.environ["LORASERVE_FP8_ACT_QUANT"] = old
        free(engine)
        engine = None
    return res
