"""LoRA added to one decoder layer's base GEMMs, run after them or overlapped with them (issue 10).

`bench_lora_kernels.py --overlap-layer` (or `python3 benchmarks/lora_layer_overlap.py`): one Llama-3-8B
layer's four projections at 64 tokens / 32 distinct rank-16 adapters, each through the engine's own
``LoRABatch.linear`` (services/inference/lora/batch.py), timed as CUDA-graph replays that cycle over
enough copies of the base weights (2 x 436 MB) and of the adapters that both come from HBM:

  base        F.linear only (the limit the LoRA cost is measured against);
  seq         GEMM, then lora_apply (LORASERVE_LORA_OVERLAP off: the default);
  shrink      the shrink on a side stream while the GEMM runs, the expand after it (OVERLAP=shrink);
  full        shrink + expand into a delta on the side stream, one add after the GEMM (OVERLAP=full).

Prints per mode the layer's us and the LoRA it adds over base ((mode - base) / base): the figure a decode
step pays per layer. The stand-alone figure (lora_layer_over_base, bench_lora_kernels.py) times the LoRA
kernels alone, i.e. what "seq" adds if nothing overlaps; "shrink" / "full" show how much of that the
bandwidth-bound GEMMs can hide. Outputs of every mode are compared with seq's (max |diff|; "full" rounds
the delta to bf16 before the add, so it differs by bf16 rounding, the others are bit-equal).
"""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_lora_kernels import PROJECTIONS, Case, graph_us  # noqa: E402

MODES = ("seq", "shrink", "full")


def _slots(cases: dict[str, Case]) -> SimpleNamespace:
    """A slot pool as LoRABatch reads it: a[proj][i] [L, S, R, H], b[proj][i] [L, N, R] for every
    weight set i of the cases (the "layer" index cycles over the sets), slice offsets, ranks."""
    any_case = next(iter(cases.values()))
    return SimpleNamespace(
        a={p: [c.ab(i)[0] for i in range(c.num_sets)] for p, c in cases.items()},
        b={p: [c.ab(i)[1] for i in range(c.num_sets)] for p, c in cases.items()},
        slice_offsets={p: c.offsets for p, c in cases.items()}, ranks=any_case.ranks, scale=None, shift=None)


def set_carveout(num_sms: int | None) -> str:
    """Leave num_sms SMs to other streams in cuBLASLt GEMMs (torch's experimental SM carveout, which sets
    CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET; the GEMMs then go through cuBLASLt: preferred_blas_library), so
    that the side-stream LoRA kernels find free SMs while the base GEMM runs; None: back to the defaults.
    Returns what was set (or why not)."""
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if setter is None or not torch.cuda.is_available():
        return "no SM carveout here (torch without it, or no CUDA)"
    setter(num_sms)
    torch.backends.cuda.preferred_blas_library("cublaslt" if num_sms else "default")
    return f"cuBLASLt, {num_sms} SMs left free" if num_sms else "default GEMM backend"


def overlap_layer(num_tokens: int = 64, num_adapters: int = 32, rank: int = 16, modes=MODES,
                  smoke: bool = False, copies: int = 2, carveouts: tuple[int, ...] = ()) -> dict:
    """{mode: us per layer} plus base and the added fractions (see the module docstring); carveouts:
    then base and every mode again with that many SMs left free by the GEMMs (set_carveout), each
    compared with the default base (the step a user sees)."""
    from loraserve.inference.lora import batch as batch_mod
    from loraserve.inference.lora.batch import LoRABatch

    dev = "cpu" if smoke else "cuda"
    if smoke:  # tiny shapes (Case shrinks the widths), a logic check
        num_tokens, num_adapters = min(num_tokens, 16), min(num_adapters, 4)
    t0 = time.perf_counter()
    cases = {p: Case(p, rank, num_adapters, num_tokens, dev, smoke) for p in PROJECTIONS}
    sets = min(c.num_sets for c in cases.values())
    dtype = next(iter(cases.values())).x.dtype
    # base weights [N, H] per projection, `copies` of them (2 x 436 MB: each replay reads HBM)
    ws = [{p: torch.randn(c.N, c.H, device=dev, dtype=dtype) / c.H ** .5 for p, c in cases.items()}
          for _ in range(copies)]
    xs = {p: c.x for p, c in cases.items()}
    meta = next(iter(cases.values())).meta   # every case: the same T tokens over the same L slots
    lb = LoRABatch(_slots(cases), meta)
    n_calls = max(copies, sets if smoke else min(sets, 8))

    def layer_calls(use_lora: bool):
        def make(i: int):
            w = ws[i % copies]
            if not use_lora:
                return lambda: [F.linear(xs[p], w[p]) for p in cases]
            return lambda: [lb.linear(i % sets, p, xs[p], w[p], None) for p in cases]
        return [make(i) for i in range(n_calls)]

    def timed(calls) -> float:
        if smoke:
            t = time.perf_counter()
            for f in calls:
                f()
            return (time.perf_counter() - t) * 1e6 / len(calls)
        return graph_us(calls)

    saved = batch_mod.OVERLAP
    res: dict = {"tokens": num_tokens, "adapters": num_adapters, "rank": rank}
    try:
        res["base_us"] = timed(layer_calls(False))
        print(f"overlap-layer: {num_tokens} tokens / {num_adapters} adapters / r{rank}: base GEMMs "
              f"{res['base_us']:.1f} us per layer [{time.perf_counter() - t0:.0f} s]", flush=True)
        ref = None
        for carve in (0, *carveouts):
            tag = ""
            if carve:
                if smoke:
                    continue
                tag = f"_carve{carve}"
                how = set_carveout(carve)
                base_c = timed(layer_calls(False))
                res[f"base{tag}_us"] = base_c
                print(f" SM carveout {carve} ({how}): base GEMMs {base_c:.1f} us per layer "
                      f"({base_c / res['base_us']:.3f} of the default base)", flush=True)
            for m in modes:
                batch_mod.OVERLAP = "" if m == "seq" else m
                us = timed(layer_calls(True))
                outs = [lb.linear(0, p, xs[p], ws[0][p], None).float() for p in cases]
                if ref is None:
                    ref = outs
                diff = max((o - r).abs().max().item() for o, r in zip(outs, ref))
                added = (us - res["base_us"]) / res["base_us"]
                res[m + tag] = dict(us=us, added_us=us - res["base_us"], added_over_base=added,
                                    max_abs_diff_vs_seq=diff)
                print(f"  {m + tag:14s} {us:8.1f} us per layer: LoRA adds {us - res['base_us']:6.1f} us = {added:.3f} "
                      f"of the default base; max|diff| vs seq {diff:.2e} [{time.perf_counter() - t0:.0f} s]", flush=True)
    finally:
        batch_mod.OVERLAP = saved
        if carveouts and not smoke:
            set_carveout(None)
    return res


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (logic check)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--carveouts", default="", help="e.g. 16,32: SMs left free by the GEMMs (set_carveout)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    r = overlap_layer(a.tokens, 32, 16, [m for m in a.modes.split(",") if m], smoke=a.smoke,
                      carveouts=tuple(int(c) for c in a.carveouts.split(",") if c))
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
