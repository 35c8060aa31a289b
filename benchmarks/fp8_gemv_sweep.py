"""Tile sweep of the FP8 decode GEMV (kernels/fp8_gemv.py) at Llama-3-8B projection shapes (issue 14).

For qkv (N 6144, K 4096), o (4096, 4096), gate_up (28672, 4096), down (4096, 14336) at M in
{1, 4, 16, 32, 64}: us per call and weight GB/s (weight bytes / time) of each candidate config of the
new kernel, of the old W8A16 kernel (kernels/fp8_gemm.py), of bf16 F.linear (cuBLAS), and of the
per-token quantization + torch._scaled_mm path; the device copy bandwidth (read + write, eager 1 GiB
copy) and a read-only figure (a sum over 1 GiB) from the same run; the best config per shape, and
a CONFIGS table for fp8_gemv.py (also written with --configs-out, which LORASERVE_FP8_GEMV_CONFIGS
reads).

Timing: CUDA-graph replays of one call per weight copy, cycling over >= 256 MB of weights (HBM, not
the 50 MB L2), so host launch costs are out. Every candidate is checked against the fp32 reference
first. Kernels are compiled ahead in --jobs worker processes (Triton's disk cache), then timed; a
time budget (--budget-s) stops the candidate list early, printing what it has.

    python3 benchmarks/fp8_gemv_sweep.py [--budget-s 45] [--json out.json] [--configs-out cfg.json]
    TRITON_INTERPRET=1 python3 benchmarks/fp8_gemv_sweep.py --smoke     # CPU: correctness on tiny shapes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
EXTRA_SHAPES = {"lm_head": (128256, 4096)}   # --shapes lm_head: the LM head weight-only in FP8 (not the default)
MS = (1, 4, 16, 32, 64)
NUM_SMS_H200 = 132

# the candidate configs per M (their own file: benchmarks/fp8_sweep_candidates.py)
from benchmarks.fp8_sweep_candidates import (candidate_tiles, candidates, gemvh_candidates,  # noqa: E402,F401
                                             w8a8_candidates)


def _compile_one(cfg: tuple, env: dict | None = None) -> str:
    """Worker: compile one config on a small problem with the same specialisations (Triton's disk cache);
    env: LORASERVE_ switches of the variant (e.g. LORASERVE_FP8_GEMV_PDL=1: launched as a programmatic dependent)."""
    os.environ.update(env or {})
    from loraserve.kernels.fp8_gemv import fp8_gemv

    kind, bm, bn, bk, split, warps, stages = cfg[:7]
    k = 2 * max(split, 1) * bk * 2
    w = torch.zeros(256, k, device="cuda").to(torch.float8_e4m3fn)
    x = torch.zeros(max(bm, 1), k, device="cuda", dtype=torch.bfloat16)
    fp8_gemv(x, w, torch.ones(256, device="cuda"), config=(kind, bm, bn, bk, 2 if split > 1 else 1, warps, stages)
             + tuple(cfg[7:]))
    if split > 1:   # the partials' sum kernel: one variant per BLOCK (min(1024, N)); 256 here, 1024 at 8B shapes
        w = torch.zeros(1024, k, device="cuda").to(torch.float8_e4m3fn)
        fp8_gemv(x, w, torch.ones(1024, device="cuda"), config=(kind, bm, bn, bk, 2, warps, stages) + tuple(cfg[7:]))
    torch.cuda.synchronize()
    return "ok"


def precompile(cfgs: list[tuple], jobs: int, timeout: float, envs: tuple = ({},)) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    # one compile variant per (tile, split > 1): the split's value is a runtime argument
    keys = list(dict.fromkeys((c[0], c[1], c[2], c[3], 2 if c[4] > 1 else 1, c[5], c[6]) + tuple(c[7:]) for c in cfgs))
    t = time.perf_counter()
    try:
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        futs = [pool.submit(_compile_one, c, env) for c in keys for env in envs]
        done, pending = wait(futs, timeout=timeout)
        pool.shutdown(wait=not pending, cancel_futures=True)   # a hung compile must not hold the sweep
        bad = [str(f.exception())[:200] for f in done if f.exception() is not None]
        print(f"precompiled {len(done) - len(bad)}/{len(futs)} variants in {time.perf_counter() - t:.1f} s"
              + (f"; failures: {bad[:3]}" if bad else ""), flush=True)
    except Exception as err:   # noqa: BLE001  (the main process compiles what is missing)
        print(f"precompile skipped: {type(err).__name__}: {err}", flush=True)


def graph_us(fn, copies: int, reps: int = 10) -> float:
    """us per call: one CUDA graph of `copies` calls (one per weight copy), replayed `reps` times
    (on the CPU, --smoke: wall clock of one pass, to exercise the sweep's code only)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for i in range(copies):
            fn(i)
        return (time.perf_counter() - t) * 1e6 / copies
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):   # warm-up outside the capture (compile, allocator)
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    for _ in range(2):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * copies)


def tensorwise_rescaled(x, w_q, w_scale, dtype):
    """W8A8 through cuBLASLt's tensor-wise FP8 GEMM (unit scales), the per-token and per-channel scales applied
    after it: a candidate for M = 32..64, where torch's row-wise _scaled_mm (CUTLASS) is slow."""
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8

    x_q, x_scale = per_token_quant_fp8(x)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    acc = torch._scaled_mm(x_q, w_q.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    return (acc * x_scale * w_scale[None, :]).to(dtype)


def read_bandwidth() -> float:
    """Bytes read per second by torch's fp32 sum over 1 GiB: a lower bound of what a GEMV can stream (the
    int32 sum of the first version accumulated in int64 and read 0.77 TB/s)."""
    x = torch.rand(1 << 28, device="cuda")
    for _ in range(3):
        x.sum()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        x.sum()
    end.record()
    torch.cuda.synchronize()
    return 4 * x.numel() / (start.elapsed_time(end) / 1e3 / 10)


def sweep(a) -> dict:
    from benchmarks.bench_engine import copy_bandwidth
    from loraserve.inference.models.fp8 import quantize_per_channel, scaled_mm_rowwise
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8, per_token_quant_fp8_ref
    from loraserve.kernels.fp8_gemv import fp8_gemv

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float16)   # the interpreter mishandles bf16
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else NUM_SMS_H200
    shapes = {name: {**SHAPES, **EXTRA_SHAPES}[name] for name in a.shapes.split(",")} if cuda else {"tiny": (48, 256)}
    ms = [int(v) for v in a.ms.split(",")]
    cands = (w8a8_candidates if getattr(a, "w8a8", False) else gemvh_candidates if getattr(a, "gemvh", False)
             else candidates)
    all_cfgs = [c for n, k in shapes.values() for m in ms for c in cands(m, n, k, num_sms) if c[0][:2] != "tw"]
    if a.jobs > 0:
        precompile(all_cfgs, a.jobs, timeout=getattr(a, "precompile_s", None) or a.budget_s / 3)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke: timings meaningless)", "num_sms": num_sms,
           "copy_GBps": copy_bandwidth() / 1e9 if cuda else 1.0, "read_GBps": read_bandwidth() / 1e9 if cuda else 1.0,
           "rows": [], "best": {}}
    print(f"{res['device']}: copy {res['copy_GBps']:.0f} GB/s (read + write), read {res['read_GBps']:.0f} GB/s "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"{'shape':8} {'M':>3} {'path':44} {'us':>8} {'wGB/s':>7} {'%copy':>6} {'rel_err':>8} {'vs_w8a8':>8}", flush=True)
    configs_out: dict[str, list] = {}
    out_of_time = False
    for name, (n, k) in shapes.items():
        copies = max(2, -(-(256 << 20) // (n * k))) if cuda else 2   # >= 256 MB of FP8 weights per cycle
        g = torch.Generator(device=dev).manual_seed(0)
        w16 = [torch.randn(n, k, device=dev, dtype=dt, generator=g) * 0.02 for _ in range(copies)]
        qs = [quantize_per_channel(w) for w in w16]
        deq = qs[0][0].float() * qs[0][1][:, None]
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
            ref = x.float() @ deq.t()
            x_q8, x_s8 = per_token_quant_fp8_ref(x)
            ref8 = (x_q8.float() * x_s8) @ deq.t()   # the exact W8A8 (per-token) result: dot8 / tw must sit on it
            paths = [(f"new{c}", c) for c in cands(m, n, k, num_sms)]
            paths += [("bf16_F.linear", "bf16"), ("quant+_scaled_mm", "scaled_mm"),
                      ("quant+tensorwise_scaled_mm+rescale", "tw_scaled_mm")]
            best = None
            for i, (label, cfg) in enumerate(paths):
                # over budget: only the heuristic's config (first) and the bf16 / _scaled_mm baselines
                if time.perf_counter() - t0 > a.budget_s and i > 0 and cfg not in ("bf16", "scaled_mm", "tw_scaled_mm"):
                    out_of_time = True
                    continue
                if cfg == "bf16":
                    fn = (lambda i: F.linear(x, w16[i]))
                elif cfg == "scaled_mm":
                    fn = (lambda i: scaled_mm_rowwise(*per_token_quant_fp8(x), *qs[i], dt))
                elif cfg == "tw_scaled_mm":   # cuBLASLt's tensor-wise FP8 GEMM, both scales applied after it
                    fn = (lambda i: tensorwise_rescaled(x, *qs[i], dt))
                else:
                    fn = (lambda i, c=cfg: fp8_gemv(x, *qs[i], config=c))
                try:
                    y = fn(0).float()
                    err = float((y - ref).norm() / ref.norm())
                    err8 = float((y - ref8).abs().max() / ref8.abs().max())
                    us = graph_us(fn, copies)
                except Exception as e:   # noqa: BLE001  (one bad tile must not end the sweep)
                    print(f"{name:8} {m:3d} {label:44} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                wbytes = n * k * (2 if cfg == "bf16" else 1)
                gbps = wbytes / us / 1e3
                row = {"shape": name, "m": m, "path": label, "us": round(us, 2), "weight_GBps": round(gbps, 1),
                       "frac_copy": round(gbps / res["copy_GBps"], 3), "rel_err": err, "max_err_vs_w8a8": err8}
                res["rows"].append(row)
                # vs x @ dequant(W_q)^T: the weight-only kernels within bf16 rounding; bf16 (the unquantized
                # W) and _scaled_mm (x rounded to e4m3 too) within e4m3's quantization error
                ok = err < (8e-2 if cfg in ("bf16", "scaled_mm", "tw_scaled_mm") or cfg[0][:4] in ("dot8", "tw", "twf")
                            else 1e-2)
                print(f"{name:8} {m:3d} {label:44} {us:8.2f} {gbps:7.0f} {100 * gbps / res['copy_GBps']:6.1f} "
                      f"{err:8.1e} {err8:8.1e}{'' if ok else '  WRONG'}", flush=True)
                # the table's choice: weight-only up to M = 32 (decode numerics), any kind in the W8A8 bucket 64
                eligible = isinstance(cfg, tuple) and ok and ((cfg[0][:4] != "dot8" and cfg[0][:2] != "tw") or m > 32)
                if eligible and (best is None or us < best[1]):
                    best = (cfg, us)
            if best is not None:
                bf16 = next((r["us"] for r in res["rows"] if r["shape"] == name and r["m"] == m
                             and r["path"] == "bf16_F.linear"), None)
                smm = next((r["us"] for r in res["rows"] if r["shape"] == name and r["m"] == m
                            and r["path"] == "quant+_scaled_mm"), None)
                res["best"][f"{name}_m{m}"] = {"config": list(best[0]), "us": round(best[1], 2),
                                               "vs_bf16": round(bf16 / best[1], 3) if bf16 else None,
                                               "vs_scaled_mm": round(smm / best[1], 3) if smm else None}
                configs_out[f"{m},{n},{k}"] = list(best[0])
        w16 = qs = deq = None
        if cuda:
            torch.cuda.empty_cache()
    print("best per shape (speedup of the best gemv config over bf16 and over quant+_scaled_mm):")
    for key, b in res["best"].items():
        print(f"  {key:12} {str(tuple(b['config'])):42} {b['us']:7.2f} us  x{b['vs_bf16']} bf16  "
              f"x{b['vs_scaled_mm']} scaled_mm")
    # one decoder layer's four projections per M: the decode-step figure the engine can reach
    res["layer_us"] = {}
    for m in ms:
        def total(path: str) -> float | None:
            us = [next((r["us"] for r in res["rows"] if r["shape"] == s and r["m"] == m and r["path"] == path), None)
                  for s in shapes]
            return round(sum(us), 2) if all(u is not None for u in us) else None
        best = [res["best"].get(f"{s}_m{m}", {}).get("us") for s in shapes]
        layer = {"bf16": total("bf16_F.linear"), "scaled_mm": total("quant+_scaled_mm"),
                 "gemv_best": round(sum(best), 2) if all(b is not None for b in best) else None}
        if layer["bf16"] and layer["gemv_best"]:
            layer["gemv_speedup_vs_bf16"] = round(layer["bf16"] / layer["gemv_best"], 3)
        res["layer_us"][m] = layer
        print(f"  layer (all 4 projections) M={m}: {layer}")
    # the largest measured M up to which the GEMV's layer total beats _scaled_mm at every measured M
    rec = 0
    for m in sorted(ms):
        lay = res["layer_us"][m]
        if lay["gemv_best"] is None or lay["scaled_mm"] is None or lay["gemv_best"] > lay["scaled_mm"]:
            break
        rec = m
    res["recommended_gemv_max_m"] = rec
    print(f"recommended LORASERVE_FP8_GEMV_MAX_M={rec}")
    if a.max_m_out:
        with open(a.max_m_out, "w") as fh:
            fh.write(f"{rec}\n")
    print("CONFIGS = {" + ", ".join(f"({k}): {tuple(v)}" for k, v in configs_out.items()) + "}")
    res["configs"] = configs_out
    res["out_of_time"] = out_of_time
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    if a.configs_out:
        with open(a.configs_out, "w") as fh:
            json.dump(configs_out, fh)
    print(f"sweep done in {res['wall_s']} s{' (budget hit: some candidates skipped)' if out_of_time else ''}")
    return res


# (name, LORASERVE_FP8_GEMV_PDL, LORASERVE_PDL, LORASERVE_FP8_SPLITK_FIXUP) of each layer-chain variant
CHAIN_SWITCHES = ("LORASERVE_FP8_GEMV_PDL", "LORASERVE_PDL", "LORASERVE_FP8_SPLITK_FIXUP", "LORASERVE_FP8_W8A8",
                  "LORASERVE_FP8_GEMV_HALF")
CHAIN_VARIANTS = (("bf16", "0", "0", "0"), ("bf16_gemv_pdl", "0", "1", "0"), ("fp8", "0", "0", "0"),
                  ("fp8_fixup", "0", "0", "1"),
                  ("fp8_gemv_pdl", "1", "0", "0"), ("fp8_all_pdl", "1", "1", "0"), ("fp8_all_pdl_fixup", "1", "1", "1"),
                  # LORASERVE_FP8_GEMV_PDL=early: dependents that load their first weight tile before the wait
                  ("fp8_early_pdl", "early", "1", "0"), ("fp8_early_pdl_fixup", "early", "1", "1"),
                  # the engine's defaults (GEMV PDL auto), then the W8A8 forms at 33..64 tokens and fp16-product GEMVs
                  ("fp8_auto", "auto", "0", "0", "token", "0"), ("fp8_w8a8_block", "auto", "0", "0", "block", "0"),
                  ("fp8_w8a8_tw", "auto", "0", "0", "tensorwise", "0"), ("fp8_w8a8_fast", "auto", "0", "0", "fast", "0"),
                  ("fp8_half", "auto", "0", "0", "token", "1"))
CHAIN_VARIANTS = tuple(v + ("token", "0")[len(v) - 4:] for v in CHAIN_VARIANTS)   # every switch set each time
# LORASERVE_FP8_CHAIN_VARIANTS=fp8,fp8_early_pdl,...: only these (bf16 always) - a probe's time limit
_only = os.environ.get("LORASERVE_FP8_CHAIN_VARIANTS", "").strip()
if _only:
    CHAIN_VARIANTS = tuple(v for v in CHAIN_VARIANTS if v[0] == "bf16" or v[0] in _only.split(","))


def layer_chain(ms: list[int], copies: int = 2, jobs: int = 0) -> dict:
    """us per decoder layer of the four projections back to back as the engine runs them (the table's configs),
    each after an RMSNorm (kernels/rmsnorm.py) that writes its input, standing in for the norm / activation
    before it; CUDA-graph replays over `copies` layers of weights (> L2). Variants (CHAIN_VARIANTS): bf16
    F.linear; FP8 with plain launches; FP8 with the split-K partials summed in-kernel; FP8 with the GEMVs launched
    as programmatic dependents (weights prefetched into L2 before their wait); that with the norms letting their
    dependents launch early too (LORASERVE_PDL=1, kernels/pdl.py); and that with the in-kernel split-K sum."""
    from loraserve.inference.models.fp8 import fp8_linear, quantize_per_channel
    from loraserve.kernels.rmsnorm import rms_norm

    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float16)
    shapes = SHAPES if cuda else {"a": (48, 256), "b": (32, 48)}
    g = torch.Generator(device=dev).manual_seed(1)
    w16 = {name: [torch.randn(n, k, device=dev, dtype=dt, generator=g) * 0.02 for _ in range(copies)]
           for name, (n, k) in shapes.items()}
    wq = {name: [quantize_per_channel(w) for w in ws] for name, ws in w16.items()}
    norm_w = {name: torch.ones(k, device=dev, dtype=dt) for name, (n, k) in shapes.items()}
    if cuda and jobs > 0:   # the table's tiles, plain and as dependents, compiled ahead in parallel workers
        from loraserve.kernels.fp8_gemv import _num_sms, gemv_config

        cfgs = [gemv_config(m, n, k, _num_sms(torch.device(dev))) for m in ms for n, k in shapes.values()]
        # the GEMV's compiled variants differ by its own two switches only (LORASERVE_PDL moves the norms)
        envs = {(v[1], v[3]) for v in CHAIN_VARIANTS[1:]}
        precompile(cfgs, jobs, timeout=25, envs=tuple({"LORASERVE_FP8_GEMV_PDL": p, "LORASERVE_FP8_SPLITK_FIXUP": f}
                                                      for p, f in sorted(envs)))
    out = {}
    saved = {k: os.environ.get(k) for k in CHAIN_SWITCHES}
    try:
        for m in ms:
            src = {name: torch.randn(m, k, device=dev, dtype=dt, generator=g) for name, (n, k) in shapes.items()}
            xs = {name: torch.empty_like(x) for name, x in src.items()}

            def layer(i: int, kind: str) -> None:
                for name in shapes:
                    if cuda:
                        rms_norm(src[name], norm_w[name], 1e-5, out=xs[name])   # the kernel before the GEMM
                    else:
                        xs[name].copy_(src[name])
                    if kind == "bf16":
                        F.linear(xs[name], w16[name][i])
                    elif kind == "bf16_gemv_pdl":   # the bf16 engine's decode chain: its GEMV (<= 4 rows) with PDL
                        if cuda and m <= 4:
                            from loraserve.kernels.gemv import gemv

                            gemv(xs[name], w16[name][i])
                        else:
                            F.linear(xs[name], w16[name][i])
                    else:
                        fp8_linear(xs[name], *wq[name][i], None)

            row = {}
            for kind, *switches in CHAIN_VARIANTS:
                os.environ.update(dict(zip(CHAIN_SWITCHES, switches)))
                try:
                    row[kind] = round(graph_us(lambda i, k=kind: layer(i, k), copies), 2)
                except Exception as err:   # noqa: BLE001
                    row[kind] = f"failed: {type(err).__name__}: {str(err)[:160]}"
            out[m] = row
            print(f"  layer chain M={m} (us, 4 GEMMs + 4 RMSNorms): {row}", flush=True)
        w16 = wq = None
        if cuda:   # the LM head (bf16 in the engine, as TensorRT-LLM / vLLM keep it) against a weight-only FP8 GEMV
            torch.cuda.empty_cache()
            n, k = EXTRA_SHAPES["lm_head"]
            head = torch.randn(n, k, device=dev, dtype=dt, generator=g) * 0.02
            head_q = quantize_per_channel(head)
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
                row = {"bf16": round(graph_us(lambda i: F.linear(x, head), 1), 2)}
                os.environ["LORASERVE_FP8_GEMV_PDL"] = "0"
                row["fp8"] = round(graph_us(lambda i: fp8_linear(x, *head_q, None), 1), 2)
                out[f"lm_head_m{m}"] = row
                print(f"  lm_head M={m}: {row}", flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def engine_configs(num_sms: int) -> list[tuple]:
    """The GEMV configs a decode engine compiles as it captures its CUDA graphs: the table's (or heuristic's) at
    every decode batch bucket <= 64 for the 8B projections, and for the default model's (128 wide, weight-only
    at every M: its quality run's teacher-forced chunks too)."""
    from loraserve.kernels.fp8_gemv import gemv_config

    tiny = ((256, 128), (128, 128), (688, 128))   # models/default: qkv, o, gate_up (down's 344 is not a x16)
    cfgs = [gemv_config(m, n, k, num_sms) for n, k in SHAPES.values() for m in (1, 2, 4, 8, 16, 24, 32, 48, 64)]
    cfgs += [gemv_config(m, n, k, num_sms, weight_only=True) for n, k in tiny for m in (1, 2, 4, 8, 16, 32, 64, 96)]
    return list(dict.fromkeys(cfgs))


def smoke() -> int:
    """CPU (TRITON_INTERPRET=1): every candidate kind on tiny shapes against the torch reference."""
    from loraserve.kernels.fp8_gemv import fp8_gemv, gemv_ref

    g = torch.Generator().manual_seed(0)
    fails = 0
    for m, n, k in ((1, 40, 96), (3, 24, 272), (17, 40, 128)):
        w = torch.randn(n, k, generator=g)
        s = w.abs().amax(1) / 448
        w_q = (w / s[:, None]).to(torch.float8_e4m3fn)
        x = torch.randn(m, k, generator=g, dtype=torch.float32).half()
        ref = gemv_ref(x, w_q, s).float()
        for cfg in [None, ("gemv", 1, 8, 64, 1, 4, 1), ("gemv", 4, 4, 64, 2, 4, 2), ("dot", 16, 16, 32, 2, 4, 2),
                    ("dot16", 16, 16, 32, 2, 4, 2)]:
            y = fp8_gemv(x, w_q, s, config=cfg).float()
            err = float((y - ref).abs().max() / ref.abs().max())
            ok = err < 2e-3
            fails += not ok
            print(f"smoke m={m} n={n} k={k} {cfg}: rel err {err:.1e} {'ok' if ok else 'WRONG'}", flush=True)
    # the candidate generator at the real shapes (no launch)
    for n, k in SHAPES.values():
        for m in MS:
            assert candidates(m, n, k, NUM_SMS_H200), (m, n, k)
    # the sweep's own code path (timing, tables, configs) on one tiny shape; its rows carry rel_err vs fp32
    res = sweep(argparse.Namespace(shapes="", ms="1,16", jobs=0, budget_s=120.0, configs_out=None,
                                   max_m_out=None))
    wrong = [r for r in res["rows"] if r["path"].startswith("new") and not r["rel_err"] < (8e-2 if "dot8" in r["path"]
                                                                                            else 1e-2)]
    fails += len(wrong) + (not res["best"])
    layer_chain([1, 3], copies=2)   # the chain's code path (timings meaningless here)
    print("smoke:", "PASS" if not fails else f"{fails} FAILED")
    return 1 if fails else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU correctness run (set TRITON_INTERPRET=1)")
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop trying candidates after this long")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--jobs", type=int, default=8, help="worker processes compiling ahead (0: compile in place)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs-out", default=None, help="best config per (M, N, K) as JSON (LORASERVE_FP8_GEMV_CONFIGS)")
    ap.add_argument("--max-m-out", default=None, help="file for the recommended LORASERVE_FP8_GEMV_MAX_M")
    ap.add_argument("--chain-ms", default="", help="also time whole-layer chains at these M (e.g. 1,64), PDL off/on")
    ap.add_argument("--no-sweep", action="store_true", help="only the layer chains")
    ap.add_argument("--w8a8", action="store_true", help="only the W8A8 candidates (w8a8_candidates) and the baselines")
    ap.add_argument("--gemvh", action="store_true", help="only the fp16-product GEMV candidates (gemvh_candidates)")
    ap.add_argument("--precompile-s", type=float, default=None, help="compile-ahead time limit (default: budget / 3)")
    ap.add_argument("--precompile-engine", action="store_true",
                    help="only compile the engine's GEMV configs (8B and default-model shapes) into Triton's cache")
    a = ap.parse_args()
    if a.smoke or not torch.cuda.is_available():
        if not a.smoke:
            print("no CUDA device: running the --smoke checks instead")
        if not torch.cuda.is_available():   # Triton reads it at import (loraserve.kernels is not imported yet)
            os.environ.setdefault("TRITON_INTERPRET", "1")
        return smoke()
    if a.precompile_engine:   # warm a cold Triton cache for a benchmark run that follows (or runs beside it)
        from loraserve.kernels.fp8_gemv import _num_sms

        precompile(engine_configs(_num_sms(torch.device("cuda"))), a.jobs, timeout=a.budget_s)
        return 0
    res = {} if a.no_sweep else sweep(a)
    if a.chain_ms:
        res["layer_chain_us"] = layer_chain([int(v) for v in a.chain_ms.split(",")], jobs=a.jobs)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
