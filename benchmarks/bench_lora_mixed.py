"""LoRA on the fused qkv projection in the step shapes of bench_churn's resident phase, by slot layout.

bench_churn's resident32 load (8B shape, LoRA on q_proj + v_proj, max rank 64, 32 adapters of rank 8-64,
256-token prompts, 64 output tokens, concurrency 64) runs decode steps of 64 tokens, mixed steps (~63
decode rows + one 256-token prompt chunk) and prefill-heavy steps. The LoRA kernels' grids and configs come
from host sizes only (graphs): T, the rank bound of the slot view (64) and the tile bound
cdiv(T, BM) + min(slots, T, max_segments). With thousands of slots (bench_churn's GPU tier holds 1000
adapters: 1000 max-rank slots, or 8000 rank-packing granules) that bound was ~T, so a 320-token step
launched ~340 tiles for ~50 used ones and the configs sized for all of them left most SMs idle.

Each case: one CUDA graph of [metadata build + LoRA qkv of `layers` layers] (as the mixed-step graphs run
it; layers cycle through distinct weights so A and B come from HBM), us per layer; the base qkv GEMM
(x [T, 4096] @ W [6144, 4096]^T) timed the same way for scale. Layouts: max-rank slots (33: the bench's
engine tier; 1000: bench_churn's) and packed granules (8000), each with the segment bound on (graph
sequences: mixed_graphs) and off (the old grid).

    python3 benchmarks/bench_lora_mixed.py                    # GPU
    TRITON_INTERPRET=1 python3 benchmarks/bench_lora_mixed.py --smoke   # CPU flow check (tiny shapes)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

QV = ("q_proj", "v_proj")


def model_args(smoke: bool, layers: int):
    from loraserve.inference.models.llama import ModelArgs

    if smoke:   # tiny: the interpreter must finish in seconds
        return ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                         max_position_embeddings=256, tie_word_embeddings=False, attention_bias=False,
                         model_type="llama", torch_dtype="float32", eos_token_id=[1], bos_token_id=0,
                         num_hidden_layers=layers)
    return ModelArgs(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5, rope_scaling=None,
                     max_position_embeddings=8192, tie_word_embeddings=False, attention_bias=False,
                     model_type="llama", torch_dtype="bfloat16", eos_token_id=[1], bos_token_id=0,
                     num_hidden_layers=layers)


def make_tier(args, num_slots: int, packed: bool, ranks: list[int], dtype, device, merge: bool = True):
    """DeviceSlots + DeviceTier with len(ranks) random q+v adapters placed; returns (slots, [slot per adapter]).
    merge False: one A slice per module of qkv (3, the k slice all zero) as before slots.MERGE_SLICES."""
    from benchmarks.bench_churn import random_adapter
    from loraserve.inference.lora import slots as slots_mod
    from loraserve.inference.lora.device_tier import DeviceTier
    from loraserve.inference.lora.holds import AdapterHandle

    keep = slots_mod.MERGE_SLICES
    slots_mod.MERGE_SLICES = merge
    try:
        slots = slots_mod.DeviceSlots(args, set(QV), num_slots, 64, dtype, device, packed=packed)
    finally:
        slots_mod.MERGE_SLICES = keep
    tier = DeviceTier(slots)
    placed = []
    for i, r in enumerate(ranks):
        a = random_adapter(args.lora_module_shapes(), QV, args.num_hidden_layers, r, 500 + i, device, dtype)
        h = AdapterHandle(a.digest, f"a{i}", i + 1, a, a.nbytes(), a.rank)
        assert tier.place(h), "tier too small"
        placed.append(h.slot)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return slots, placed


def step_cases(num_adapters: int, smoke: bool) -> dict[str, list[tuple[int, int]]]:
    """name -> [(tokens, adapter index)] per sequence, as bench_churn's resident phase steps them."""
    p = 24 if smoke else 256
    dec = [(1, k % num_adapters) for k in range(8 if smoke else 64)]
    return {   # bench_churn's steady state first: nearly every step is one prompt chunk + the running decodes
        "mixed_320": dec[:-1] + [(p, 5 % num_adapters)],               # 63 decode rows + one prompt (graph T 352)
        "decode_64": dec,                                              # 64 decode rows over 32 adapters
        "ttft_1x64": [(16 if smoke else 64, 0)],                       # one fresh prompt (the resident TTFT)
        "prefill_2048": [(p, k % num_adapters) for k in range(2 if smoke else 8)],   # 8 prompts
        "mixed_576": dec[:-2] + [(p, 3 % num_adapters), (p, 7 % num_adapters)],
    }


def graph_shape(num_tokens: int, num_seqs: int) -> tuple[int, int]:
    """(Bp, T) of the mixed-step graph that replays this step (MixedGraphRunner.pick): its padding
    sequences' tokens (slot -1) are part of the LoRA kernels' T."""
    from loraserve.inference.mixed_graphs import SEQ_BUCKETS, TOKEN_BUCKETS

    bp = next(b for b in SEQ_BUCKETS if b >= num_seqs + 1)
    return bp, next((t for t in TOKEN_BUCKETS if t >= num_tokens + bp - num_seqs), num_tokens + bp - num_seqs)


VARIANTS = {   # name -> (segment bound, block_m override, expand column loop pipelined up to this many tokens,
               #          expand programs per SM the column groups aim at)
    "old": (False, None, None, 4),      # before: cdiv(T, BM) + min(slots, T) tiles, the torch metadata build
    "bound": (True, None, None, 4),     # mixed_graphs' bound (<= Bp - 1 segments), the torch metadata build
    "pipe": (True, None, 4096, None),   # + the expand's Triton-pipelined column loop at every T (default: <= 32)
    "bm32": (True, 32, None, None),     # + 32-row tiles below 512 tokens (the prompt chunk: 8 tiles, not 16)
    "pps8": (True, None, None, 8),      # + twice the expand's column groups at every T (default: above 256)
    "mk": (True, None, None, None),     # + the metadata built by one Triton launch (lora_meta_build.py): now
                                        # the default, and in every variant below
    "bn128": (True, None, None, None),  # + 128-column expand blocks at rank 64 (64 before: half the loop trips)
    "part512": (True, None, None, None),  # + split-K partials summed by the expand up to 512 tokens (no sum launch)
}


def _bn128(orig):
    def config(num_tokens, n_total, rank, num_slices, block_m, grid_tiles, split_k=1, num_sms=132):
        cfg = orig(num_tokens, n_total, rank, num_slices, block_m, grid_tiles, split_k, num_sms)
        if cfg["BLOCK_N"] < 128 and block_m <= 16:
            from loraserve.kernels import lora_expand_stream as les

            n_blocks = -(-n_total // 128)
            pps = les.STREAM_PROGRAMS_PER_SM if num_tokens <= 256 else les.STREAM_PROGRAMS_PER_SM_LARGE
            groups = max(1, min(n_blocks, round(pps * num_sms / max(1, grid_tiles))))
            per = -(-n_blocks // groups)
            cfg.update(BLOCK_N=128, COLS_PER_PROG=per * 128, groups=-(-n_blocks // per), num_warps=4)
        return cfg
    return config


def _part512(orig):
    def choose(x, lora_a, lora_b, meta):
        path, shape, plan = orig(x, lora_a, lora_b, meta)
        if path == "reduced" and x.shape[0] <= 512 and lora_a.shape[2] <= 64:
            from loraserve.kernels.lora_shrink import shrink_split_k

            sk = shrink_split_k(x, lora_a, meta.block_m, meta.grid_tiles)
            return "partials", (sk, *shape), None
        return path, shape, plan
    return choose


PATCHES = {"bn128": ("loraserve.kernels.lora_expand_stream", "stream_expand_config", _bn128),
           "part512": ("loraserve.kernels.lora_apply", "choose_path", _part512)}


class patched:
    """Module attribute swaps of a variant (benchmarks only), undone on exit."""

    def __init__(self, variant: str):
        self.spec = PATCHES.get(variant)

    def __enter__(self):
        if self.spec:
            import importlib

            mod_name, attr, wrap = self.spec
            self.mod = importlib.import_module(mod_name)
            self.orig = getattr(self.mod, attr)
            setattr(self.mod, attr, wrap(self.orig))
        return self

    def __exit__(self, *exc):
        if self.spec:
            setattr(self.mod, self.spec[1], self.orig)
        return False


class Case:
    """A graph of [metadata build + LoRA qkv over `layers` layers] for one step composition."""

    def __init__(self, slots, token_slot: torch.Tensor, bp: int, variant: str, layers: int):
        from loraserve.inference.lora.batch import LoRABatch
        from loraserve.kernels import LoRAMetaBuilder

        T = token_slot.numel()
        dev, dtype = token_slot.device, slots.dtype
        self.bound, block_m, self.pipe_tokens, self.pps = VARIANTS[variant]
        self.meta_kernel = variant not in ("old", "bound")
        self.variant = variant
        self.builder = LoRAMetaBuilder(max(T, 256), slots.num_slots, dev, block_m=block_m)
        self.token_slot, self.bp, self.layers = token_slot, bp, layers
        H, N = slots.a["qkv_proj"].shape[-1], slots.b["qkv_proj"].shape[2]
        g = torch.Generator(device=dev).manual_seed(T)
        self.x = torch.randn(T, H, generator=g, device=dev).to(dtype)            # [T, H]
        self.y = torch.zeros(T, N, device=dev, dtype=dtype)                         # [T, N] q|k|v
        self.batch = LoRABatch(slots, self.build())
        self.meta = self.batch.meta

    def build(self):
        from loraserve.kernels import lora_meta

        keep, lora_meta.LORA_META_KERNEL = lora_meta.LORA_META_KERNEL, self.meta_kernel
        lora_meta.META_KERNEL_INTERPRETED = True   # (--smoke under TRITON_INTERPRET=1)
        try:
            return self.builder.build(self.token_slot, max_segments=self.bp - 1 if self.bound else None)
        finally:
            lora_meta.LORA_META_KERNEL = keep

    def forward(self, meta_only: bool = False):
        from loraserve.kernels import lora_expand_stream as les

        keep = les.STREAM_SLOTS_MAX_TOKENS, les.STREAM_PROGRAMS_PER_SM, les.STREAM_PROGRAMS_PER_SM_LARGE
        if self.pipe_tokens is not None:
            les.STREAM_SLOTS_MAX_TOKENS = self.pipe_tokens
        if self.pps is not None:
            les.STREAM_PROGRAMS_PER_SM = les.STREAM_PROGRAMS_PER_SM_LARGE = self.pps
        try:
            self.build()
            if not meta_only:
                with patched(self.variant):
                    for layer in range(self.layers):
                        self.batch.apply(layer, "qkv_proj", self.x, self.y)
        finally:
            les.STREAM_SLOTS_MAX_TOKENS, les.STREAM_PROGRAMS_PER_SM, les.STREAM_PROGRAMS_PER_SM_LARGE = keep


def time_graph(fn, reps: int, device, out: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None]:
    """(us per replay of a graph of fn, out after ONE replay from zero); eager on CPU (one call)."""
    if device.type != "cuda":
        if out is not None:
            out.zero_()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6, None if out is None else out.clone()
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        fn()            # compile + allocator warm-up outside the capture
    s.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        fn()
    first = None
    if out is not None:
        out.zero_()
    g.replay()
    torch.cuda.synchronize()
    if out is not None:
        first = out.clone()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / reps, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU / TRITON_INTERPRET=1)")
    ap.add_argument("--layers", type=int, default=4, help="layers of slot weights cycled in one graph")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layouts", default="33,1000,p8000",
                    help="max-rank slot counts, p<N> = N packed granules; suffix :3 = 3 qkv A slices (k's unmerged)")
    ap.add_argument("--cases", help="comma list of step cases (default all)")
    ap.add_argument("--variants", default="old,bound", help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop starting new cases after this")
    ap.add_argument("--json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    margs = model_args(args.smoke, args.layers)
    n_ad = 4 if args.smoke else 32
    ranks = [int(r) for r in np.random.default_rng(1).choice([8, 16, 32, 64], size=n_ad)]
    cases = step_cases(n_ad, args.smoke)
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
    out: dict = {"meta": dict(device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                              ranks=ranks, layers=args.layers, command=" ".join(sys.argv)), "cases": {}}
    base_us = {}
    if device.type == "cuda":   # the base qkv GEMM of each case, same timing (weights cycled over layers)
        H, N = margs.hidden_size, margs.head_dim * (margs.num_attention_heads + 2 * margs.num_key_value_heads)
        ws = [torch.randn(N, H, device=device, dtype=dtype) * 0.02 for _ in range(args.layers)]
        for name, seqs in cases.items():
            x = torch.randn(graph_shape(sum(n for n, _ in seqs), len(seqs))[1], H, device=device, dtype=dtype)
            base_us[name] = time_graph(lambda: [torch.nn.functional.linear(x, w) for w in ws], args.reps,
                                       device)[0] / args.layers
        del ws
    print("base qkv GEMM us/layer: " + ", ".join(f"{k} {v:.1f}" for k, v in base_us.items()), flush=True)
    tiers = {}
    for layout in args.layouts.split(","):   # every layout's slots at once (~10 GB each at 4 layers of the 8B shape)
        packed = layout.startswith("p")
        n_slots = int(layout.lstrip("p").removesuffix(":3"))
        if args.smoke:
            n_slots = min(n_slots, 200)
        t = time.perf_counter()
        tiers[layout] = slots, _ = make_tier(margs, n_slots, packed, ranks, dtype, device,
                                             merge=not layout.endswith(":3"))
        print(f"layout {layout}: {slots.num_slots} slots of {slots.granule} rows, {slots.a['qkv_proj'].shape[2]} "
              f"qkv A slices ({slots.nbytes / 2**30:.2f} GiB)  [{time.perf_counter() - t:.1f} s]", flush=True)
    for name, seqs in cases.items():          # cases outer: the most important first in every layout
        if time.perf_counter() - t0 > args.budget_s:
            print(f"  (budget {args.budget_s:.0f} s spent: {name} and later skipped)")
            break
        ref = None   # y of the first layout's first variant: the same adapters and x in every layout
        for layout, (slots, placed) in tiers.items():
            bp, t_graph = graph_shape(sum(n for n, _ in seqs), len(seqs))
            real = [placed[a] for n, a in seqs for _ in range(n)]
            token_slot = torch.tensor(real + [-1] * (t_graph - len(real)), dtype=torch.int32, device=device)
            row = {}
            for variant in args.variants.split(","):
                c = Case(slots, token_slot, bp, variant, args.layers)
                us, y1 = time_graph(c.forward, args.reps, device, c.y)
                us /= args.layers
                meta_us = time_graph(functools.partial(c.forward, meta_only=True), args.reps, device)[0]
                ref = y1.float() if ref is None else ref
                diff = float((y1.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
                row[variant] = dict(us_per_layer=us, grid_tiles=c.meta.grid_tiles, used_tiles=int(c.meta.num_tiles),
                                    meta_build_us=meta_us, rel_diff_vs_first=diff)   # vs the first layout's first
                del c
            row["base_gemm_us"] = base_us.get(name)
            out["cases"][f"{layout}/{name}"] = row
            bg = base_us.get(name)
            print(f"  {layout:>7} {name:>12} T={token_slot.numel():5d} Bp={bp:3d}" + (f" base {bg:5.1f}" if bg else "")
                  + "".join(f" | {v} {r['us_per_layer']:6.1f} us" + (f" ({r['us_per_layer'] / bg:.2f})" if bg else "")
                            + f" g{r['grid_tiles']}/{r['used_tiles']} m{r['meta_build_us']:.0f}"
                            + (f" d{r['rel_diff_vs_first']:.1e}" if r['rel_diff_vs_first'] else "")
                            for v, r in row.items() if isinstance(r, dict))
                  + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
