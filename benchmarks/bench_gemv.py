"""Batch-1 decode pieces on the GPU: the GEMV (kernels/gemv.py) vs cuBLAS per projection, and one decoder
layer's whole kernel chain (RMSNorm, qkv, RoPE + KV write, attention, o, RMSNorm, gate_up, SiLU, down)
as the decode CUDA graph runs it, in the variants the engine can take:

  base      cuBLAS GEMMs, apply_rope + v copy + 2 index_copy_, separate SiLU-mul (the engine before)
  fusedkv   base with RoPE + KV write in one kernel (LORASERVE_FUSED_ROPE_KV=1)
  gemv      fusedkv with the GEMV for every projection and SiLU-mul inside the down GEMV (LORASERVE_GEMV_MAX_M=1)
  gemv_pdl  gemv with programmatic dependent launch on every Triton kernel (LORASERVE_PDL=1)
  gemv_pdl_silu_apart  gemv_pdl with SiLU-mul as its own kernel (LORASERVE_GEMV_SILU=0)
  policy_pdl  the engine's default GEMV policy: qkv, o, down through the GEMV, gate_up cuBLAS, SiLU apart
              (policy_qkv_o_pdl: qkv and o only)
  base_pdl  fusedkv with PDL (cuBLAS GEMMs break the chain at each GEMM)

Every timing is a CUDA-graph replay over enough distinct weight copies that weights come from HBM (not
L2); the limit printed next to each figure is the weight bytes at the copy bandwidth measured here.

    python3 benchmarks/bench_gemv.py [--layers 32] [--configs 8,512,4 4,512,4] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_engine import copy_bandwidth  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from benchmarks.graph_timing import graph_seconds  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "down_silu": (4096, 14336), "lm_head": (128256, 4096)}
SMOKE_SHAPES = {"qkv": (96, 64), "o": (64, 64), "gate_up": (192, 64), "down": (64, 96), "down_silu": (64, 96),
                "lm_head": (256, 64)}


def time_graph(fn, reps: int = 5, cuda: bool = True) -> float:
    """Seconds per call of fn (which runs the whole workload once), from CUDA-graph replays."""
    if not cuda:
        import time

        fn()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return graph_seconds(fn, replays=reps)


def per_shape(dev, dtype, shapes, configs, bw, cuda: bool) -> dict:
    """M=1: cuBLAS vs each GEMV config; weights cycled over >= 512 MB of copies."""
    from loraserve.kernels.gemv import gemv

    out = {}
    for name, (N, K) in shapes.items():
        nbytes = N * K * 2
        copies = max(2, (512 << 20) // nbytes) if cuda else 2
        ws = [torch.randn(N, K, device=dev).to(dtype) / K ** 0.5 for _ in range(copies)]
        silu = name == "down_silu"   # x = gate_up [1, 2K]; cuBLAS pays the SiLU kernel, the GEMV fuses it
        x = torch.randn(1, 2 * K if silu else K, device=dev).to(dtype)
        from loraserve.kernels.activation import silu_and_mul

        def cublas():
            for w in ws:
                F.linear(silu_and_mul(x) if silu else x, w)

        row = {"limit_us": nbytes / bw * 1e6}
        row["cublas_us"] = time_graph(cublas, cuda=cuda) / copies * 1e6
        for cfg in configs:
            def tri(cfg=cfg):
                for w in ws:
                    gemv(x, w, silu_mul=silu, config=cfg)
            try:
                row["gemv_%s_us" % "_".join(map(str, cfg))] = time_graph(tri, cuda=cuda) / copies * 1e6
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                row["gemv_%s_us" % "_".join(map(str, cfg))] = f"error {type(exc).__name__}: {exc}"[:200]
        out[name] = row
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        ws = None   # frees the copies before the next shape's (the closures above share this cell: no `del`)
    return out


class LayerChain:
    """num_layers decoder layers at one decode token (weights: `distinct` copies cycled), the engine's ops."""

    def __init__(self, dev, dtype, num_layers: int, distinct: int, ctx_len: int, small: bool):
        H, KVH, D, hidden, inter = (4, 2, 16, 64, 96) if small else (32, 8, 128, 4096, 14336)
        self.H, self.KVH, self.D, self.hidden, self.inter, self.L = H, KVH, D, hidden, inter, num_layers
        g = lambda *s: (torch.randn(*s, device=dev) / s[-1] ** 0.5).to(dtype)  # noqa: E731
        self.w = [dict(qkv=g((H + 2 * KVH) * D, hidden), o=g(hidden, H * D), gate_up=g(2 * inter, hidden),
                       down=g(hidden, inter), n1=torch.ones(hidden, device=dev, dtype=dtype),
                       n2=torch.ones(hidden, device=dev, dtype=dtype)) for _ in range(distinct)]
        bs = 16
        nblocks = ctx_len // bs + 2
        self.k_cache = torch.randn(nblocks, bs, KVH, D, device=dev).to(dtype)
        self.v_cache = torch.randn(nblocks, bs, KVH, D, device=dev).to(dtype)
        self.tables = torch.arange(nblocks, device=dev, dtype=torch.int32).flip(0)[None, :].contiguous()
        self.seq_lens = torch.tensor([ctx_len], device=dev, dtype=torch.int32)
        self.qsl = torch.tensor([0, 1], device=dev, dtype=torch.int32)
        self.slots = torch.tensor([int(self.tables[0, (ctx_len - 1) // bs]) * bs + (ctx_len - 1) % bs], device=dev)
        self.positions = torch.tensor([ctx_len - 1], device=dev)
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device=dev) / D))
        from loraserve.kernels.rope import rope_cos_sin_cache

        self.table = rope_cos_sin_cache(inv.float(), 8192)
        self.x = torch.randn(1, hidden, device=dev).to(dtype)
        self.res = torch.randn(1, hidden, device=dev).to(dtype)
        self.ctx_len = ctx_len

    def run(self, fused_kv: bool, use_gemv: bool, silu_in_gemv: bool = True,
            gemv_projs: tuple[str, ...] = ("qkv", "o", "gate_up", "down")) -> torch.Tensor:
        from loraserve.kernels.activation import silu_and_mul
        from loraserve.kernels.gemv import gemv
        from loraserve.kernels.rmsnorm import fused_add_rms_norm
        from loraserve.kernels.rope import apply_rope, rope_store_kv
        from loraserve.kernels.unified_attention import unified_attention

        H, KVH, D = self.H, self.KVH, self.D
        def lin(x, w, name):
            return gemv(x, w) if use_gemv and name in gemv_projs else F.linear(x, w)
        x, res = self.x.clone(), self.res.clone()
        for i in range(self.L):
            w = self.w[i % len(self.w)]
            x, res = fused_add_rms_norm(x, res, w["n1"], 1e-5)
            qkv = lin(x, w["qkv"], "qkv")
            q = qkv[:, :H * D].view(1, H, D)
            k = qkv[:, H * D:(H + KVH) * D].view(1, KVH, D)
            v = qkv[:, (H + KVH) * D:].view(1, KVH, D)
            if fused_kv:
                q = rope_store_kv(self.positions, q, k, v, self.table, self.k_cache, self.v_cache, self.slots)
            else:
                q, k = apply_rope(self.positions, q, k, self.table, torch.empty(q.shape, dtype=q.dtype, device=q.device),
                                  torch.empty(k.shape, dtype=k.dtype, device=k.device))
                v = v.contiguous()
                self.k_cache.view(-1, KVH, D).index_copy_(0, self.slots, k)
                self.v_cache.view(-1, KVH, D).index_copy_(0, self.slots, v)
            o = unified_attention(q, self.k_cache, self.v_cache, self.tables, self.seq_lens, self.qsl, 1, D ** -0.5)
            x = lin(o.view(1, H * D), w["o"], "o")
            x, res = fused_add_rms_norm(x, res, w["n2"], 1e-5)
            gate_up = lin(x, w["gate_up"], "gate_up")
            if use_gemv and silu_in_gemv:
                x = gemv(gate_up, w["down"], silu_mul=True)
            else:
                x = lin(silu_and_mul(gate_up), w["down"], "down")
        return x

    def weight_bytes(self) -> int:
        w = self.w[0]
        return self.L * sum(w[k].numel() * w[k].element_size() for k in ("qkv", "o", "gate_up", "down"))


def greedy_bench(dev, cuda: bool, vocab: int) -> dict:
    """Greedy sampling of B rows of fp32 logits: the sampler's torch ops vs kernels/greedy.py (graphs)."""
    from loraserve.kernels.greedy import greedy_sample, greedy_sample_ref

    out = {}
    for B in (1, 8, 64):
        x = torch.randn(B, vocab, device=dev) * 3
        t_ref = time_graph(lambda: greedy_sample_ref(x), reps=20, cuda=cuda)
        t_new = time_graph(lambda: greedy_sample(x), reps=20, cuda=cuda)
        same = bool(torch.equal(greedy_sample(x)[0], greedy_sample_ref(x)[0]))
        out[B] = {"torch_us": t_ref * 1e6, "fused_us": t_new * 1e6, "same_tokens": same}
        print(f"greedy B={B}: torch ops {t_ref * 1e6:.1f} us, fused {t_new * 1e6:.1f} us, same tokens {same}", flush=True)
    return out


VARIANTS = {"base": (False, False, "0", False), "fusedkv": (True, False, "0", False),
            "base_pdl": (True, False, "1", False), "gemv": (True, True, "0", True), "gemv_pdl": (True, True, "1", True),
            "gemv_pdl_silu_apart": (True, True, "1", False), "policy_pdl": (True, True, "1", False, ("qkv", "o", "down")),
            "policy_qkv_o_pdl": (True, True, "1", False, ("qkv", "o"))}


def layer_chain(dev, dtype, layers: int, variants: list[str], bw: float, small: bool, cuda: bool) -> dict:
    chain = LayerChain(dev, dtype, layers, 2 if small else 8, 64 if small else 512, small)
    limit = chain.weight_bytes() / bw
    out = {"layers": layers, "weight_limit_us": limit * 1e6}
    print(f"layer chain x{layers}: weights {chain.weight_bytes() / 1e9:.2f} GB = {limit * 1e6:.0f} us at copy bw",
          flush=True)
    ref = None
    for name in variants:
        fused_kv, use_gemv, pdl, silu, *projs = VARIANTS[name]
        projs = projs[0] if projs else ("qkv", "o", "gate_up", "down")
        os.environ["LORASERVE_PDL"] = pdl
        y = chain.run(fused_kv, use_gemv, silu, projs).float()
        ref = y if ref is None else ref
        err = float((y - ref).abs().max() / (ref.abs().max() + 1e-6))
        t = time_graph(lambda: chain.run(fused_kv, use_gemv, silu, projs), cuda=cuda)
        out[name] = {"us": t * 1e6, "us_per_layer": t * 1e6 / layers, "limit_fraction": limit / t, "rel_err_vs_first": err}
        print(f"  {name:9s} {t * 1e6:8.1f} us = {t * 1e6 / layers:6.1f} us/layer, {limit / t:.3f} of the weight limit"
              f" (max rel diff vs {variants[0]} {err:.1e})", flush=True)
    os.environ["LORASERVE_PDL"] = "0"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--configs", nargs="*", default=["8,512,4,1", "8,512,4,0", "4,512,4,1", "16,256,4,1"])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", default="base,fusedkv,base_pdl,gemv,gemv_pdl")
    ap.add_argument("--skip-shapes", action="store_true")
    ap.add_argument("--skip-greedy", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, eager, CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    res = {"gpu": torch.cuda.get_device_name() if cuda else "cpu"}
    bw = copy_bandwidth() if cuda else 1e12
    res["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    configs = [tuple(int(v) for v in c.split(",")) for c in a.configs]
    if a.smoke:
        configs = [(8, 32, 4, 1), (8, 32, 4, 0)]
    shapes = {k: (SMOKE_SHAPES if a.smoke else SHAPES)[k] for k in a.shapes.split(",") if k}
    if not a.skip_shapes:
        res["per_shape_m1"] = per_shape(dev, dtype, shapes, configs, bw, cuda)
    if not a.skip_greedy:
        res["greedy"] = greedy_bench(dev, cuda, 1000 if a.smoke else 128256)
    res["layer_chain"] = layer_chain(dev, dtype, 2 if a.smoke else a.layers, a.variants.split(","), bw, a.smoke, cuda)
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
