"""Paged attention over an FP8 (e4m3, per-tensor scales) KV cache vs the same cache in bf16, on the GPU.

Llama-3-8B heads (32 query / 8 KV heads, head_dim 128, blocks of 16 tokens), the Triton step kernel
(kernels/unified_attention.py) and the decode kernel (kernels/paged_attention.py). Each case times the
bf16 cache and its e4m3 quantization (the same random data) as CUDA-graph replays over disjoint block
tables (>= 256 MB of K/V: from HBM, not L2), and reports the FP8 output's max error against the fp32
reference on the dequantized cache. Decode is bandwidth-bound: e4m3 halves the K/V bytes.

    python benchmarks/bench_attention_fp8.py [--json out.json]      # H200: ~20 s
    python benchmarks/bench_attention_fp8.py --decode-sweep         # the engine's decode shapes, per variant
    TRITON_INTERPRET=1 python benchmarks/bench_attention_fp8.py --smoke   # CPU: tiny shapes, no timing
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

H, KVH, D, BS = 32, 8, 128, 16
SCALE = D ** -0.5
FP8 = torch.float8_e4m3fn


def make_case(B: int, q_len: int, L: int, copies: int, device: str, dtype: torch.dtype, seed: int = 0):
    """q [B*q_len, H, D]; bf16 and e4m3 caches of copies*B*W (+1) blocks; `copies` disjoint block tables."""
    g = torch.Generator(device=device).manual_seed(seed)
    W = -(-L // BS)
    nb = copies * B * W + 1
    k = torch.randn(nb, BS, KVH, D, device=device, generator=g, dtype=dtype) * 2
    v = torch.randn(nb, BS, KVH, D, device=device, generator=g, dtype=dtype)
    ks = (k.abs().amax().float() / 400).reshape(1)
    vs = (v.abs().amax().float() / 400).reshape(1)
    k8 = (k.float() / ks).clamp(-448, 448).to(FP8)
    v8 = (v.float() / vs).clamp(-448, 448).to(FP8)
    perm = torch.randperm(nb - 1, device=device, generator=g).int()
    tables = [perm[i * B * W:(i + 1) * B * W].view(B, W).contiguous() for i in range(copies)]
    q = torch.randn(B * q_len, H, D, device=device, generator=g, dtype=dtype)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    qsl = torch.arange(0, B * q_len + 1, q_len, dtype=torch.int32, device=device)
    return q, (k, v), (k8, v8, ks, vs), tables, lens, qsl


def run_case(name: str, B: int, q_len: int, L: int, kernel: str, smoke: bool, rows: list,
             copy_bw: float | None = None) -> None:
    from loraserve.kernels.paged_attention import paged_decode_attention
    from loraserve.kernels.unified_attention import unified_attention, unified_attention_ref

    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    kv_bytes_bf16 = B * L * KVH * D * 2 * 2
    copies = 1 if smoke else max(1, min(32, -(-(256 << 20) // kv_bytes_bf16)))
    q, (k, v), (k8, v8, ks, vs), tables, lens, qsl = make_case(B, q_len, L, copies, device, dtype)

    def call(kc, vc, t, scales):
        if kernel == "paged_decode":
            return paged_decode_attention(q, kc, vc, t, lens, SCALE, k_scale=scales[0], v_scale=scales[1])
        return unified_attention(q, kc, vc, t, lens, qsl, q_len, SCALE, k_scale=scales[0], v_scale=scales[1])

    ref = unified_attention_ref(q.float(), k8.float() * ks, v8.float() * vs, tables[0], lens, qsl, SCALE)
    err = float((call(k8, v8, tables[0], (ks, vs)).float() - ref).abs().max())
    row = {"case": name, "kernel": kernel, "fp8_max_abs_err_vs_dequant_ref": err}
    if not smoke:
        from benchmarks.bench_attention import timed

        t_bf16 = timed([(lambda t: lambda: call(k, v, t, (None, None)))(t) for t in tables])
        t_fp8 = timed([(lambda t: lambda: call(k8, v8, t, (ks, vs)))(t) for t in tables])
        row.update(bf16_us=t_bf16 * 1e6, fp8_us=t_fp8 * 1e6, fp8_speedup=t_bf16 / t_fp8,
                   fp8_kv_GBps=kv_bytes_bf16 / 2 / t_fp8 / 1e9, bf16_kv_GBps=kv_bytes_bf16 / t_bf16 / 1e9)
        if copy_bw and q_len == 1:   # decode reads K/V once: the same run's device copy rate is its limit
            row.update(fp8_kv_frac_of_copy_bw=kv_bytes_bf16 / 2 / t_fp8 / copy_bw,
                       bf16_kv_frac_of_copy_bw=kv_bytes_bf16 / t_bf16 / copy_bw)
    rows.append(row)
    print(json.dumps(row), flush=True)


# name -> (LORASERVE_ATTN_FP8_FP16 or "vpin", config overrides, num_splits)
SWEEP_VARIANTS = {
    "fp16_ops": ("1", None, None), "bf16_ops": ("0", None, None), "fp16_vpin": ("vpin", None, None),
    "fp16_vpin_tile128": ("vpin", {"TILE_N": 128}, None), "fp16_tile128": ("1", {"TILE_N": 128}, None),
    "fp16_stages1": ("1", {"num_stages": 1}, None), "vpin_w8": ("vpin", {"num_warps": 8}, None),
    "vpin_s3": ("vpin", {"num_stages": 3}, None), "vpin_tile32": ("vpin", {"TILE_N": 32}, None),
    "vpin_split2": ("vpin", None, 2), "vpin_split3": ("vpin", None, 3),
    "vpin_t32s3": ("vpin", {"TILE_N": 32, "num_stages": 3}, None),
}


def decode_sweep(cases=((64, 512), (64, 2048), (1, 576)),
                 names=("fp16_ops", "bf16_ops", "fp16_vpin", "fp16_vpin_tile128", "fp16_tile128", "fp16_stages1")
                 ) -> list:
    """Engine-shaped decode steps (the unified kernel, one query row per sequence) over the e4m3 cache: us per call
    of the bf16 cache and of the e4m3 cache per variant (LORASERVE_ATTN_FP8_FP16 on / off = fp16 MMA operands or the
    codes widened to bf16; TILE_N / num_stages / num_warps overrides), the KV bytes' fraction of the copy rate, and
    the max error of each FP8 variant vs the fp32 reference on the dequantized cache."""
    from benchmarks.bench_attention import copy_bandwidth, timed
    from loraserve.kernels.unified_attention import unified_attention, unified_attention_ref

    copy_bw = copy_bandwidth()
    variants = [(name, *SWEEP_VARIANTS[name]) for name in names]
    rows = []
    for B, L in cases:
        kv_bytes_fp8 = B * L * KVH * D * 2
        copies = max(1, min(32, -(-(256 << 20) // (2 * kv_bytes_fp8))))
        q, (k, v), (k8, v8, ks, vs), tables, lens, qsl = make_case(B, 1, L, copies, "cuda", torch.bfloat16)
        ref = unified_attention_ref(q.float(), k8.float() * ks, v8.float() * vs, tables[0], lens, qsl, SCALE)
        row = {"case": f"decode bs{B} x {L}",
               "bf16_us": round(1e6 * timed([(lambda t: lambda: unified_attention(q, k, v, t, lens, qsl, 1, SCALE))(t)
                                             for t in tables]), 2)}
        for name, env, cfg, splits in variants:   # env "vpin": fp16 operands + V widened in its load layout
            os.environ["LORASERVE_ATTN_FP8_FP16"] = "1" if env == "vpin" else env
            os.environ["LORASERVE_ATTN_FP8_VPIN"] = "1" if env == "vpin" else "0"
            try:
                def call(t, cfg=cfg, splits=splits):
                    return unified_attention(q, k8, v8, t, lens, qsl, 1, SCALE, k_scale=ks, v_scale=vs, config=cfg,
                                             num_splits=splits)
                err = float((call(tables[0]).float() - ref).abs().max())
                us = 1e6 * timed([(lambda t: lambda: call(t))(t) for t in tables])
                row[name] = {"us": round(us, 2), "frac_copy": round(kv_bytes_fp8 / (us * 1e-6) / copy_bw, 3),
                             "max_err": round(err, 4)}
            except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                row[name] = f"failed: {type(e).__name__}: {str(e)[:160]}"
            finally:
                os.environ.pop("LORASERVE_ATTN_FP8_FP16", None)
                os.environ.pop("LORASERVE_ATTN_FP8_VPIN", None)
            print(json.dumps({"case": row["case"], name: row[name]}), flush=True)   # (a time limit keeps these)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1: tiny shapes, no timing")
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode-sweep", action="store_true", help="only decode_sweep (engine-shaped decode variants)")
    ap.add_argument("--sweep-variants", default=None, help=f"comma-separated from {sorted(SWEEP_VARIANTS)}")
    ap.add_argument("--sweep-cases", default=None, help="e.g. 64x512,64x2048 (batch x context)")
    a = ap.parse_args()
    if a.decode_sweep:
        if not torch.cuda.is_available():
            print("decode sweep: needs CUDA")
            return 0
        from benchmarks.bench_attention import warm_up

        warm_up()
        kw = {}
        if a.sweep_variants:
            kw["names"] = tuple(a.sweep_variants.split(","))
        if a.sweep_cases:
            kw["cases"] = tuple(tuple(int(v) for v in c.split("x")) for c in a.sweep_cases.split(","))
        rows = decode_sweep(**kw)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        return 0
    if a.smoke:
        cases = [("decode bs2 x 40", 2, 1, 40, "unified"), ("decode bs2 x 40", 2, 1, 40, "paged_decode"),
                 ("prefill 2 x 24", 2, 24, 24, "unified")]
    else:
        if not torch.cuda.is_available():
            print("needs CUDA (or --smoke with TRITON_INTERPRET=1)")
            return 2
        from benchmarks.bench_attention import copy_bandwidth, warm_up

        warm_up()
        copy_bw = copy_bandwidth()
        print(json.dumps({"copy_bandwidth_GBps": copy_bw / 1e9}), flush=True)
        cases = [("decode bs1 x 32k", 1, 1, 32768, "unified"), ("decode bs1 x 32k", 1, 1, 32768, "paged_decode"),
                 ("decode bs64 x 2k", 64, 1, 2048, "unified"), ("decode bs64 x 2k", 64, 1, 2048, "paged_decode"),
                 ("prefill 8 x 1024", 8, 1024, 1024, "unified")]
    rows: list = []
    copy_bw = None if a.smoke else copy_bw
    for c in cases:
        try:
            run_case(*c, smoke=a.smoke, rows=rows, copy_bw=copy_bw)
        except Exception as e:  # noqa: BLE001 - report and go on with the other cases
            rows.append({"case": c[0], "kernel": c[4], "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(json.dumps(rows[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if not a.smoke else "cpu-interpreter",
                       "heads": dict(H=H, KVH=KVH, D=D, BS=BS), "copy_bandwidth_GBps": copy_bw and copy_bw / 1e9,
                       "rows": rows}, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
