"""Which step shapes make the model's Triton kernels compile (issue 10: a 7759-token prefill compiled
mid-serving for 1.94 s), and what turning Triton's argument specialisation off costs.

Triton compiles one variant per class of each non-constexpr argument: an int == 1 / a multiple of 16 /
other, a pointer 16-byte aligned or not. The engine packs a step's metadata into one int64 buffer
(step_inputs.py), so positions, context lengths and block tables start at offsets that move with N and B,
and their alignment flips with parity. kernels/_triton.py `no_specialize` names the arguments that
vary (LORASERVE_TRITON_SPECIALIZE=1: Triton's default, to compare).

For each kernel the script launches the engine's step shapes in turn (decode batch sizes, prompt
lengths, odd and even token counts, metadata at odd element offsets, as the input buffer lays it out)
and prints how many variants each kernel holds after warm-up and after the sweep; then times the
prefill (8 x 1024) and decode (64 x 512, 1 x 4096) attention and RoPE+KV store (CUDA graph replays).

    python3 benchmarks/triton_compile_audit.py [--json out.json]       # GPU
    TRITON_INTERPRET=1 python3 benchmarks/triton_compile_audit.py --smoke   # CPU check of the script
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import write_json  # noqa: E402
from benchmarks.graph_timing import graph_seconds  # noqa: E402
from loraserve.inference.warmup import num_variants  # noqa: E402

H, KVH, D, BS = 32, 8, 128, 16


def cache_entries() -> int:
    """Kernels in Triton's on-disk cache (one directory per compiled variant): a compile adds one, whatever
    the Triton version keeps in memory (-1: no cache directory found)."""
    path = os.environ.get("TRITON_CACHE_DIR")
    if not path:
        try:
            import triton

            path = triton.knobs.cache.dir
        except Exception:  # noqa: BLE001 - older Triton
            try:
                from triton.runtime.cache import default_cache_dir

                path = default_cache_dir()
            except Exception:  # noqa: BLE001
                return -1
    try:
        return len(os.listdir(path))
    except OSError:
        return -1


def packed(values: list[torch.Tensor], offset: int, dev) -> list[torch.Tensor]:
    """Int64 tensors laid out back to back in one buffer from element `offset` (as step_inputs.py packs a
    step's metadata): their alignment follows the offsets, as in the engine."""
    flat = torch.zeros(offset + sum(v.numel() for v in values), dtype=torch.int64, device=dev)
    out, at = [], offset
    for v in values:
        view = flat[at:at + v.numel()].view(v.shape)
        view.copy_(v)
        out.append(view)
        at += v.numel()
    return out


class Step:
    """One step's attention inputs: B sequences of (query_len, context_len), packed as the engine does."""

    def __init__(self, batch: list[tuple[int, int]], k_cache, dtype, dev):
        N = sum(q for q, _ in batch)
        W = max(-(-L // BS) for _, L in batch)
        nb = k_cache.shape[0]
        tables = torch.randint(0, nb, (len(batch), W), dtype=torch.int64)
        lens = torch.tensor([L for _, L in batch], dtype=torch.int64)
        positions = torch.cat([torch.arange(L - q, L) for q, L in batch])
        slots = torch.randperm(nb * BS)[:N]
        # the engine's layout: ids [N] | positions [N] | slots [N] | context_lens [B] | tables [B*W] | ...
        self.positions, self.slots, self.lens, self.tables = packed(
            [positions, slots, lens, tables.view(-1)], N, dev)
        self.tables = self.tables.view(len(batch), W)
        self.qsl = torch.tensor([0] + [q for q, _ in batch], device=dev).cumsum(0).to(torch.int32)
        self.q = torch.randn(N, H, D, device=dev, dtype=dtype)
        self.qkv = torch.randn(N, H * D + 2 * KVH * D, device=dev, dtype=dtype)
        self.max_q = max(q for q, _ in batch)
        self.batch = batch


def run_step(st: Step, k_cache, v_cache, cos_sin, splits=None):
    from loraserve.kernels.rope import rope_store_kv
    from loraserve.kernels.unified_attention import unified_attention

    N = st.q.shape[0]
    q, k, v = st.qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    qr = rope_store_kv(st.positions, q.view(N, H, D), k.view(N, KVH, D), v.view(N, KVH, D), cos_sin,
                       k_cache, v_cache, st.slots)
    return unified_attention(qr, k_cache, v_cache, st.tables, st.lens, st.qsl, st.max_q, D ** -0.5,
                             num_splits=splits)


def sweep_shapes(smoke: bool) -> list[tuple[str, list[tuple[int, int]]]]:
    """The step shapes a serving run meets after warm-up: decode batches of every size class, prompts
    of odd and even lengths, chunks over prefixes, mixed steps."""
    if smoke:
        return [("decode 1", [(1, 40)]), ("decode 3", [(1, 20)] * 3), ("prefill 17", [(17, 17)]),
                ("prefill 16+5", [(16, 16), (5, 5)]), ("mixed", [(1, 30), (9, 9)])]
    out = []
    for b in (1, 2, 3, 7, 16, 17, 33, 64, 100):
        out.append((f"decode bs{b}", [(1, 300 + 7 * i) for i in range(b)]))
    for n in (17, 100, 128, 513, 1000, 1024, 2047, 4096, 7759):
        out.append((f"prefill 1x{n}", [(n, n)]))
    out.append(("prefill 3x333", [(333, 333)] * 3))
    out.append(("prefill 8x1024", [(1024, 1024)] * 8))
    out.append(("chunk 256 over 700", [(256, 956)]))
    out.append(("mixed 63 dec + 255 chunk", [(1, 500)] * 63 + [(255, 255)]))
    out.append(("mixed 5 dec + 7 chunk", [(1, 40)] * 5 + [(7, 7)]))
    return out


def audit(dev, dtype, smoke: bool) -> dict:
    import importlib

    rope = importlib.import_module("loraserve.kernels.rope")   # the modules (the package re-exports functions)
    ua = importlib.import_module("loraserve.kernels.unified_attention")

    kernels = {"unified_attention": ua._unified_attention_kernel, "merge_splits": ua._merge_splits_kernel,
               "rope_store_kv": rope._rope_store_kv_kernel}
    nb = 4096 if not smoke else 64
    k_cache = torch.zeros(nb, BS, KVH, D, device=dev, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    cos_sin = rope.rope_cos_sin_cache(torch.rand(D // 2, device=dev), 16384 if not smoke else 512)
    # warm-up, as a serving start-up would: one decode step, one prompt, one long-context decode (splits)
    for batch in ([(1, 40)], [(64, 64)], [(1, 3000 if not smoke else 200)]):
        run_step(Step(batch, k_cache, dtype, dev), k_cache, v_cache, cos_sin)
    sync(dev)
    after_warmup = {k: num_variants(f) for k, f in kernels.items()}
    print(f"variants after warm-up: {after_warmup}", flush=True)
    compiles, times = [], {}
    for name, batch in sweep_shapes(smoke):
        before = {k: num_variants(f) for k, f in kernels.items()}
        entries = cache_entries()
        t = time.perf_counter()
        run_step(Step(batch, k_cache, dtype, dev), k_cache, v_cache, cos_sin)
        sync(dev)
        dt = time.perf_counter() - t
        times[name] = round(dt * 1e3, 1)
        new = {k: num_variants(f) - before[k] for k, f in kernels.items() if num_variants(f) != before[k]}
        new_entries = cache_entries() - entries if entries >= 0 else 0
        if new or new_entries or dt > 0.25:   # a step that compiles takes seconds; a launch, microseconds
            compiles.append((name, new, new_entries, round(dt, 3)))
            print(f"  {name}: compiled? new variants {new}, new cache entries {new_entries}, {dt:.2f} s", flush=True)
    final = {k: num_variants(f) for k, f in kernels.items()}
    print(f"variants after the sweep: {final}; steps that compiled: {len(compiles)}; ms per step (first call, "
          f"incl. host): {times}", flush=True)
    return {"after_warmup": after_warmup, "after_sweep": final, "compiling_steps": compiles, "step_ms": times}


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timings(dev, dtype, cases: str = "prefill_8x1024,decode_64x512,decode_1x4096,prefill_1x7759") -> dict:
    """us per call, CUDA-graph replays (HBM-resident K/V: the cache is larger than L2 many times over)."""
    nb = 8192
    k_cache = torch.randn(nb, BS, KVH, D, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    from loraserve.kernels.rope import rope_cos_sin_cache

    cos_sin = rope_cos_sin_cache(torch.rand(D // 2, device=dev), 16384)
    out = {}
    for name, batch in (("prefill_8x1024", [(1024, 1024)] * 8), ("decode_64x512", [(1, 512)] * 64),
                        ("decode_1x4096", [(1, 4096)]), ("prefill_1x7759", [(7759, 7759)])):
        if name not in cases.split(","):
            continue
        st = Step(batch, k_cache, dtype, dev)
        st.tables.copy_(torch.randperm(nb, device=dev)[:st.tables.numel()].view_as(st.tables))
        fn = lambda: run_step(st, k_cache, v_cache, cos_sin)   # noqa: E731
        out[name + "_us"] = graph_us(fn)
        print(f"  {name}: rope_store_kv + attention {out[name + '_us']:.1f} us", flush=True)
    return out


def prefill_configs(dev, dtype, specs: str) -> dict:
    """Attention alone at 8 x 1024 fresh tokens (CUDA-graph replays): the default tile vs each
    "BLOCK_M,TILE_N,num_warps,num_stages" of `specs` (';'-separated), checked against the default's output."""
    from loraserve.kernels.unified_attention import unified_attention

    nb = 8192
    k_cache = torch.randn(nb, BS, KVH, D, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    st = Step([(1024, 1024)] * 8, k_cache, dtype, dev)
    st.tables.copy_(torch.randperm(nb, device=dev)[:st.tables.numel()].view_as(st.tables))
    flops = 4 * 8 * H * D * 1024 * 1025 / 2
    cfgs = {"default": None}
    for spec in filter(None, specs.split(";")):
        bm, tn, nw, ns = (int(x) for x in spec.split(","))
        cfgs[spec] = dict(BLOCK_M=bm, TILE_N=tn, num_warps=nw, num_stages=ns)
    out, ref = {}, None
    for name, cfg in cfgs.items():
        fn = lambda: unified_attention(st.q, k_cache, v_cache, st.tables, st.lens, st.qsl, 1024,  # noqa: E731
                                       D ** -0.5, config=cfg)
        try:
            o = fn()
            ref = o if ref is None else ref
            err = (o.float() - ref.float()).abs().max().item()
            us = graph_us(fn, 10)
            out[name] = {"us": us, "TFLOPs": flops / us / 1e6, "max_diff_vs_default": err}
            print(f"  prefill attention 8x1024 {name}: {us:.1f} us = {flops / us / 1e6:.0f} TFLOP/s "
                  f"(max|diff| vs default {err:.1e})", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory): next
            print(f"  prefill attention 8x1024 {name}: ERROR {type(e).__name__}: {str(e)[:100]}", flush=True)
    return out


def graph_us(fn, reps: int = 20) -> float:
    """us per call of fn, from `reps` replays of a CUDA graph holding one call."""
    return graph_seconds(fn, replays=reps) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU (TRITON_INTERPRET=1): tiny shapes, no timing")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-sweep", action="store_true", help="timings only")
    ap.add_argument("--no-timings", action="store_true")
    ap.add_argument("--timings", default="prefill_8x1024,decode_64x512,decode_1x4096,prefill_1x7759")
    ap.add_argument("--prefill-configs", default="", help="';'-separated BLOCK_M,TILE_N,num_warps,num_stages")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    spec = os.environ.get("LORASERVE_TRITON_SPECIALIZE", "0")
    print(f"== compile audit, LORASERVE_TRITON_SPECIALIZE={spec}", flush=True)
    res = {"specialize": spec}
    if not a.no_sweep:
        res["audit"] = audit(dev, dtype, a.smoke)
    if dev.type == "cuda" and not a.no_timings:
        res["timings"] = timings(dev, dtype, a.timings)
    if dev.type == "cuda" and a.prefill_configs:
        res["prefill_configs"] = prefill_configs(dev, dtype, a.prefill_configs)
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
