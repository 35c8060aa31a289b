"""The reference guide's "LoRA with quantization" example, run as written on the embedded default
model with its two demo adapters (models/adapters/upper: rank 8 on all modules; comments: rank 4 on
q/v), once on an FP8 base with an FP8 KV cache and once unquantized (the model's dtype: bf16 on the
GPU, fp32 on CPU), greedy, and compared token for token.

    python scripts/fp8_lora_example.py            # GPU: FP8 GEMMs on Hopper; CPU: FP8 emulation
    python scripts/fp8_lora_example.py --max-tokens 48 --exclude-modules 'model.layers.0.*'

Prints each prompt's FP8 and bf16 completions, the share of generated tokens that agree (up to the
first divergence, per request) and whether each adapter still changes the output as it does in bf16.
Exit status 1 if an adapter stops changing the FP8 output (the adapter is not applied).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["def read_config(path):\n", "import os\n", "class Cache:\n", "# compute the mean of a list\n"]


def run(quant: bool, adapters: dict[str, str], max_tokens: int, exclude: list[str]) -> dict[str | None, list]:
    from loraserve import LLM, LoraConfig, LoRARequest, QuantAlgo, QuantConfig, SamplingParams
    lora_config = LoraConfig(lora_dir=list(adapters.values()), max_lora_rank=8, max_loras=4, max_cpu_loras=8)
    kwargs = {}
    if quant:   # the guide's snippet, verbatim keys
        kwargs["quant_config"] = QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8,
                                             **({"exclude_modules": exclude} if exclude else {}))
    llm = LLM(model=os.path.join(ROOT, "models", "default"), lora_config=lora_config, **kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    requests = [None] + [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())]
    out: dict[str | None, list] = {}
    try:
        for req in requests:
            res = llm.generate(PROMPTS, params, lora_request=[req] * len(PROMPTS))
            out[None if req is None else req.lora_name] = [r.outputs[0] for r in res]
    finally:
        llm.shutdown()
    return out


def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """Tokens equal before the first divergence, and the length compared."""
    n = min(len(a), len(b))
    same = next((i for i in range(n) if a[i] != b[i]), n)
    return same, max(len(a), len(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--exclude-modules", default="", help="QuantConfig.exclude_modules, comma-separated")
    a = ap.parse_args()
    adapters = {n: os.path.join(ROOT, "models", "adapters", n) for n in ("upper", "comments")}
    exclude = [p for p in a.exclude_modules.split(",") if p]
    import torch
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (FP8 emulation)'}")
    fp8 = run(True, adapters, a.max_tokens, exclude)
    bf16 = run(False, adapters, a.max_tokens, exclude)
    ok, total_same, total = True, 0, 0
    for name in [None, *adapters]:
        label = name or "base"
        for i, prompt in enumerate(PROMPTS):
            q, r = fp8[name][i], bf16[name][i]
            same, n = agreement(list(q.token_ids), list(r.token_ids))
            total_same, total = total_same + same, total + n
            print(f"[{label}] {prompt!r}\n   fp8: {q.text!r}\n   ref: {r.text!r}\n   agree {same}/{n}")
        if name is not None:
            changes_fp8 = [fp8[name][i].token_ids != fp8[None][i].token_ids for i in range(len(PROMPTS))]
            changes_bf16 = [bf16[name][i].token_ids != bf16[None][i].token_ids for i in range(len(PROMPTS))]
            print(f"adapter {name}: changes the output on {sum(changes_fp8)}/{len(PROMPTS)} prompts on FP8, "
                  f"{sum(changes_bf16)}/{len(PROMPTS)} unquantized")
            ok &= sum(changes_fp8) > 0 or sum(changes_bf16) == 0
    print(f"greedy tokens equal to the unquantized model's up to each request's first divergence: {total_same}/{total} "
          f"= {total_same / max(total, 1):.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
