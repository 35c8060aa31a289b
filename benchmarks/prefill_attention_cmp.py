"""Prefill attention at 8 fresh 1024-token prompts (Llama-3-8B heads 32/8/128, bf16, causal) in one run: the
engine's unified kernel over the paged cache (blocks scattered, and in order) against torch SDPA's backends
(flash, cuDNN, efficient; GQA native or K/V heads pre-repeated) and FlashAttention 2/3 where importable, each
checked against the unified kernel's output, timed as CUDA-graph replays (TFLOP/s over the causal FLOPs).

    python3 benchmarks/prefill_attention_cmp.py [--configs "BLOCK_M,TILE_N,warps,stages;..."]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_attention import BS, D, DT, H, KVH, SCALE, Cache, warm_up  # noqa: E402
from benchmarks.graph_timing import graph_seconds  # noqa: E402

B, L = 8, 1024
FLOPS = 4 * B * H * D * L * (L + 1) / 2   # causal: query i sees i + 1 keys


def variants(configs: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from loraserve.kernels.unified_attention import unified_attention

    W = L // BS
    cache = Cache(B * W * 4 + 1)
    tables = cache.tables(B, W)
    ordered = torch.arange(B * W, device="cuda", dtype=torch.int32).view(B, W)
    q = torch.randn(B * L, H, D, device="cuda", dtype=DT)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    qsl = torch.arange(0, B * L + 1, L, dtype=torch.int32, device="cuda")
    k_tok = cache.k[tables.long()].reshape(B * L, KVH, D)    # [N, KVH, D] as the step's own k / v
    v_tok = cache.v[tables.long()].reshape(B * L, KVH, D)
    q4 = q.view(B, L, H, D).transpose(1, 2)                   # strided views (the engine's layout)
    k4 = k_tok.view(B, L, KVH, D).transpose(1, 2)
    v4 = v_tok.view(B, L, KVH, D).transpose(1, 2)
    q4c, k4c, v4c = q4.contiguous(), k4.contiguous(), v4.contiguous()
    k4r, v4r = k4c.repeat_interleave(H // KVH, 1), v4c.repeat_interleave(H // KVH, 1)
    ko, vo = torch.empty_like(cache.k), torch.empty_like(cache.v)
    ko[:B * W], vo[:B * W] = k_tok.view(B * W, BS, KVH, D), v_tok.view(B * W, BS, KVH, D)

    def sdpa(backend, qq, kk, vv, gqa):
        def fn():
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=SCALE, enable_gqa=gqa)
            return o.transpose(1, 2).reshape(B * L, H, D)
        return fn

    out = {"unified (scattered blocks)": lambda: unified_attention(q, cache.k, cache.v, tables, lens, qsl, L, SCALE),
           "unified (blocks in order)": lambda: unified_attention(q, ko, vo, ordered, lens, qsl, L, SCALE)}
    for spec in filter(None, configs.split(";")):
        bm, tn, nw, ns = (int(x) for x in spec.split(","))
        cfg = dict(BLOCK_M=bm, TILE_N=tn, num_warps=nw, num_stages=ns)
        out[f"unified {spec}"] = (lambda cfg: lambda: unified_attention(q, cache.k, cache.v, tables, lens, qsl, L,
                                                                        SCALE, config=cfg))(cfg)
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        out[f"sdpa {name} gqa, contiguous"] = sdpa(be, q4c, k4c, v4c, True)
        out[f"sdpa {name} gqa, strided views"] = sdpa(be, q4, k4, v4, True)
        out[f"sdpa {name} K/V pre-repeated"] = sdpa(be, q4c, k4r, v4r, False)
    qkv = torch.randn(B * L, (H + 2 * KVH) * D, device="cuda", dtype=DT)   # v as the engine has it: a view of qkv
    qkv[:, (H + KVH) * D:] = v_tok.reshape(B * L, KVH * D)
    v_view = qkv[:, (H + KVH) * D:].view(B * L, KVH, D)

    def cudnn_varlen(vv):
        def fn():
            return torch.ops.aten._cudnn_attention_forward(q, k_tok, vv, None, qsl, qsl, L, L, False, 0.0, True,
                                                           scale=SCALE)[0]
        return fn

    out["cudnn varlen (packed THD, GQA)"] = cudnn_varlen(v_tok)
    out["cudnn varlen, v a view of qkv"] = cudnn_varlen(v_view)
    try:
        from flash_attn import flash_attn_varlen_func

        out["flash_attn 2 varlen"] = lambda: flash_attn_varlen_func(q, k_tok, v_tok, qsl, qsl, L, L, softmax_scale=SCALE,
                                                                    causal=True)
    except Exception as e:  # noqa: BLE001
        print(f"flash_attn not importable: {type(e).__name__}: {str(e)[:80]}")
    try:
        from flash_attn_interface import flash_attn_varlen_func as fa3

        out["flash_attn 3 varlen"] = lambda: fa3(q, k_tok, v_tok, qsl, qsl, L, L, softmax_scale=SCALE, causal=True)
    except Exception as e:  # noqa: BLE001
        print(f"flash_attn_interface (FA3) not importable: {type(e).__name__}: {str(e)[:80]}")
    return out


def uneven_check() -> None:
    """cuDNN's packed (ragged) causal attention on uneven fresh prompts vs the unified kernel."""
    from loraserve.kernels.unified_attention import unified_attention

    lens_l = [1500, 7, 300, 1024, 33, 777]
    n, b = sum(lens_l), len(lens_l)
    W = -(-max(lens_l) // BS)
    cache = Cache(b * W + 1)
    tables = cache.tables(b, W)
    q = torch.randn(n, H, D, device="cuda", dtype=DT)
    k = torch.empty(n, KVH, D, device="cuda", dtype=DT)
    v = torch.empty_like(k)
    at = 0
    for i, ln in enumerate(lens_l):
        k[at:at + ln] = cache.k[tables[i].long()].reshape(-1, KVH, D)[:ln]
        v[at:at + ln] = cache.v[tables[i].long()].reshape(-1, KVH, D)[:ln]
        at += ln
    lens = torch.tensor(lens_l, dtype=torch.int32, device="cuda")
    qsl = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
    qsl[1:] = lens.cumsum(0)
    ref = unified_attention(q, cache.k, cache.v, tables, lens, qsl, max(lens_l), SCALE).float()
    for dt in (torch.int32, torch.int64):
        try:
            o = torch.ops.aten._cudnn_attention_forward(q, k, v, None, qsl.to(dt), qsl.to(dt), max(lens_l),
                                                        max(lens_l), False, 0.0, True, scale=SCALE)[0]
            print(f"  uneven {lens_l} cudnn varlen ({dt}): shape {tuple(o.shape)} max|diff| vs unified "
                  f"{(o.float() - ref).abs().max().item():.1e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  uneven cudnn varlen ({dt}): ERROR {type(e).__name__}: {str(e)[:160]}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="", help="';'-separated BLOCK_M,TILE_N,num_warps,num_stages (unified)")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    uneven_check()
    fns = variants(a.configs)
    warm_up(1.0)
    ref = None
    for name, fn in fns.items():
        try:
            o = fn()
            o = o[0] if isinstance(o, tuple) else o
            ref = o.float() if ref is None else ref
            err = (o.float() - ref).abs().max().item()
            s = graph_seconds(fn, replays=a.reps)
            print(f"  {name:40s} {s * 1e6:8.1f} us = {FLOPS / s / 1e12:5.0f} TFLOP/s  max|diff| vs unified {err:.1e}",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  {name:40s} ERROR {type(e).__name__}: {str(e)[:120]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
