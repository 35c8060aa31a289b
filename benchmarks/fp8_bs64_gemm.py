"""The FP8 decode GEMMs at 33..64 tokens (issue 14, batch-64 decode): us per GEMM and weight TB/s at the Llama-3-8B
projections, every form timed in the same run as CUDA-graph replays cycling over >= 256 MB of weights (HBM, not L2).

Forms (x: [64, K] bf16 or its per-token e4m3 codes, made once outside the timing as the norms make them in the engine):
  bf16       F.linear on the bf16 weight (cuBLAS): the bf16 engine's GEMM
  tw         cuBLASLt tensor-wise FP8 GEMM, unit scales, fp32 out [M, N], + the scaling launch (kernels/fp8_gemm.py)
  tw_acc     the same GEMM without the scaling launch (what the engine runs where the next norm applies the scales)
  tw_swap    the same GEMM with the operands swapped, y^T = W x^T: [N, M] fp32 (cuBLASLt sees M = N, N = 64 and may
             pick other tiles; the consumer would read y transposed)
  rw, rw_swap  torch._scaled_mm with row-wise scales (x per token, W per channel; bf16 out), plain and swapped
  dot8       the Triton W8A8 tiles (kernels/fp8_skinny_dot.py) at the table's tile, + the split-K sum launch
  dot8_defer the same without the sum launch (the next norm sums the partials: fp8_gemv defer_sum)
Every form is checked against the fp32 reference of the same W8A8 product first.

    python3 benchmarks/fp8_bs64_gemm.py [--m 64] [--json out.json]
    TRITON_INTERPRET=1 python3 benchmarks/fp8_bs64_gemm.py --smoke     # CPU: the code path on small shapes
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def graph_us(fns, reps: int = 10) -> float:
    """us per call: fns (one per weight copy) captured once into a CUDA graph, replayed `reps` times (CPU: eager)."""
    if not torch.cuda.is_available():
        import time

        t = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t) * 1e6 / len(fns)
    for fn in fns:   # compile / warm up outside the capture
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / len(fns)


def sweep_configs(n: int, k: int) -> list[tuple]:
    """Tiles for the narrow shapes (N 4096 / 6144): dot8 at 64 / 128 weight rows, 128 / 256-wide K tiles, 1..8
    splits, 3..4 stages (deeper pipelines with fewer splits: fewer partials, more bytes in flight per program); the
    persistent dot8p (kernels/fp8_stream_dot.py) at the same tiles with 1..4 splits (an 8th element: programs per
    SM, LORASERVE_FP8_STREAM_PPS)."""
    out = []
    for kind, splits in (("dot8", (1, 2, 4, 8)), ("dot8p", (1, 2, 4))):
        for bn in (64, 128):
            for bk in (128, 256):
                if bn == 128 and bk == 256:   # spills (tests/kernels/test_fp8_stream_dot.py)
                    continue
                for split in splits:
                    units = (n // bn) * split
                    if k % (split * bk) or units > 1024 or (kind == "dot8" and units < 64) or units < 32:
                        continue
                    for stages in (3, 4):
                        for pps in ((1, 2) if kind == "dot8p" else (0,)):
                            out.append((kind, 64, bn, bk, split, 4, stages) + ((pps,) if pps else ()))
    return out


def engine_w8a8_configs() -> list[tuple]:
    """The table's bucket-64 tiles of the four 8B shapes as dot8 and dot8p (what LORASERVE_FP8_W8A8=token / stream
    run in an engine, with the table's PDL flag for the split-K sum)."""
    from benchmarks.fp8_gemv_sweep import NUM_SMS_H200
    from loraserve.kernels.fp8_gemv_configs import gemv_config

    out = []
    for n, k in SHAPES.values():
        cfg = gemv_config(64, n, k, NUM_SMS_H200)
        out += [(kind,) + tuple(cfg[1:]) for kind in ("dot8", "dot8p")]
    return out


def precompile_all(sweep_cfgs: list[tuple], jobs: int, timeout: float, engine: bool) -> None:
    """One pool of `jobs` processes compiling (Triton's disk cache) the engine's W8A8 tiles (with
    LORASERVE_FP8_GEMV_PDL unset and =early: the engine probe's variants) first, then the sweep's tiles."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor, wait

    from benchmarks.fp8_gemv_sweep import _compile_one

    def key(c):   # one compile variant per (tile, split > 1): the split is a runtime argument
        return (c[0], c[1], c[2], c[3], 2 if c[4] > 1 else 1, c[5], c[6]) + tuple(c[7:])

    work = ([(c, env) for c in dict.fromkeys(map(key, engine_w8a8_configs())) for env in
             ({}, {"LORASERVE_FP8_GEMV_PDL": "early"})] if engine else [])
    work += [(c, {}) for c in dict.fromkeys(map(key, sweep_cfgs))]
    t = time.perf_counter()
    try:
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        futs = [pool.submit(_compile_one, c, env) for c, env in work]
        done, pending = wait(futs, timeout=timeout)
        pool.shutdown(wait=not pending, cancel_futures=True)
        bad = [str(f.exception())[:160] for f in done if f.exception() is not None]
        print(f"precompiled {len(done) - len(bad)}/{len(futs)} in {time.perf_counter() - t:.1f} s"
              + (f"; failures: {bad[:2]}" if bad else ""), flush=True)
    except Exception as err:   # noqa: BLE001  (the timing runs compile what is missing)
        print(f"precompile skipped: {type(err).__name__}: {err}", flush=True)


def run(m: int, shapes: list[str], smoke: bool = False, sweep: bool = False) -> dict:
    from loraserve.inference.models.fp8 import quantize_per_channel
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8, scaled_mm_tensorwise, tensorwise_acc
    from loraserve.kernels.fp8_gemv import _num_sms, fp8_gemv
    from loraserve.kernels.fp8_gemv_configs import gemv_config

    dev = torch.device("cpu" if smoke else "cuda")
    out = {}
    for name in shapes:
        n, k = SHAPES[name]
        if smoke:
            n, k = n // 64, k // 64
        copies = 2 if smoke else max(2, -(-256 * 2 ** 20 // (n * k)))   # FP8 bytes per copy: >= 256 MB in all
        g = torch.Generator(device=dev).manual_seed(n + k)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(copies)]
        qs = [quantize_per_channel(w) for w in ws]
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        x_q, x_scale = per_token_quant_fp8(x)
        ref = ((x_q.float() * x_scale) @ (qs[0][0].float() * qs[0][1][:, None]).t())   # [m, n] fp32, exact W8A8
        y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        cfg = gemv_config(m, n, k, _num_sms(dev))
        dot8_cfg = ("dot8",) + tuple(cfg[1:])
        row: dict = {"copies": copies, "table_kind": cfg[0], "dot8_tile": list(dot8_cfg[1:7])}
        one = torch.ones((), device=dev)
        forms = {
            "bf16": lambda i: F.linear(x, ws[i]),
            "tw": lambda i: scaled_mm_tensorwise(x_q, x_scale, qs[i][0], qs[i][1], None, y),
            "tw_acc": lambda i: tensorwise_acc(x_q, qs[i][0]),
            "tw_swap": lambda i: torch._scaled_mm(qs[i][0], x_q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32),
            # row-wise scales in cuBLASLt / CUTLASS (torch's _scaled_mm with per-row / per-column scales), bf16 out
            "rw": lambda i: torch._scaled_mm(x_q, qs[i][0].t(), scale_a=x_scale, scale_b=qs[i][1].view(1, n),
                                             out_dtype=torch.bfloat16),
            "rw_swap": lambda i: torch._scaled_mm(qs[i][0], x_q.t(), scale_a=qs[i][1].view(n, 1),
                                                  scale_b=x_scale.view(1, m), out_dtype=torch.bfloat16),
            "dot8": lambda i: fp8_gemv(x, qs[i][0], qs[i][1], out=y, config=dot8_cfg, x_q=(x_q, x_scale)),
            "dot8_defer": lambda i: fp8_gemv(x, qs[i][0], qs[i][1], config=dot8_cfg, x_q=(x_q, x_scale),
                                             defer_sum=True)[0],
        }
        for form, fn in forms.items():
            try:
                got = fn(0)
                if not smoke:
                    torch.cuda.synchronize()
                if form in ("tw_acc", "tw_swap"):
                    got = (got.t() if form == "tw_swap" else got) * x_scale * qs[0][1]
                elif form == "rw_swap":
                    got = got.t()
                elif form == "dot8_defer":
                    got = (got.sum(0) * qs[0][1]) if got.dim() == 3 else got
                if form != "bf16":   # (bf16 is the unquantized product: no W8A8 reference)
                    row[f"{form}_max_rel_err"] = round(float((got.float() - ref).abs().max() / ref.abs().max()), 5)
                us = graph_us([lambda i=i: fn(i) for i in range(copies)])
                row[form] = round(us, 2)
                row[f"{form}_TBps"] = round(n * k * (2 if form == "bf16" else 1) / us / 1e6, 2)
            except Exception as err:   # noqa: BLE001  (one form failing must not cost the others)
                row[form] = f"failed: {type(err).__name__}: {err}"[:200]
        if sweep and name != "gate_up":   # dot8 tiles beyond the table's, x codes given, partials left unsummed (the deferred form)
            tried = {}
            for cfg in (sweep_configs(n, k) if not smoke else [("dot8", 64, 16, 32, 2, 4, 2), ("dot8", 64, 32, 64, 1, 4, 2),
                                                               ("dot8p", 64, 16, 32, 2, 4, 2, 2)]):
                name_cfg = ",".join(map(str, (cfg[0],) + cfg[2:5] + cfg[6:]))   # kind,bn,bk,split,stages[,pps]
                os.environ["LORASERVE_FP8_STREAM_PPS"] = str(cfg[7] if len(cfg) > 7 else 1)
                cfg = cfg[:7]
                try:
                    fn = lambda i, c=cfg: fp8_gemv(x, qs[i][0], qs[i][1], config=c, x_q=(x_q, x_scale), defer_sum=True)[0]
                    got = fn(0)
                    got = (got.sum(0) * qs[0][1]) if got.dim() == 3 else got.float()
                    err = float((got.float() - ref).abs().max() / ref.abs().max())
                    assert err < 2e-2, f"rel err {err}"
                    tried[name_cfg] = round(graph_us([lambda i=i: fn(i) for i in range(copies)]), 2)
                except Exception as err:   # noqa: BLE001
                    tried[name_cfg] = f"failed: {type(err).__name__}: {err}"[:120]
            ok = {c: v for c, v in tried.items() if isinstance(v, float)}
            row["sweep_defer"] = tried
            if ok:
                best = min(ok, key=ok.get)
                row["sweep_best"] = [best, ok[best]]
                print(f"    sweep (kind,bn,bk,split,stages[,programs per SM]: us, deferred): best {best} {ok[best]}; "
                      + ", ".join(f"{c} {v}" for c, v in sorted(ok.items(), key=lambda kv: kv[1])[:8]), flush=True)
            fails = [c for c, v in tried.items() if not isinstance(v, float)]
            if fails:
                print(f"    sweep failures: {fails[:4]} {tried[fails[0]]}", flush=True)
        out[name] = row
        print(f"  {name} M={m}: " + ", ".join(f"{f} {row[f]}" for f in forms if f in row), flush=True)
        print(f"    errors: " + ", ".join(f"{kk} {v}" for kk, v in row.items() if kk.endswith("err")), flush=True)
        del ws, qs
        if not smoke:
            torch.cuda.empty_cache()
    best = {f: sum(out[s][f] for s in out if isinstance(out[s].get(f), float)) for f in ("bf16", "tw", "tw_acc",
                                                                                        "tw_swap", "rw", "rw_swap",
                                                                                        "dot8", "dot8_defer")}
    print(f"  sum over the shapes (us): {best}", flush=True)
    out["sum_us"] = best
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="also dot8 tiles beyond the table's (sweep_configs), deferred")
    ap.add_argument("--jobs", type=int, default=12, help="--sweep: processes compiling ahead (0: in place)")
    ap.add_argument("--precompile-s", type=float, default=20.0)
    ap.add_argument("--precompile-engine", action="store_true",
                    help="--sweep: also compile the engine's W8A8 tiles as dot8 / dot8p, plain and PDL early")
    ap.add_argument("--smoke", action="store_true", help="CPU, shapes / 64, eager (set TRITON_INTERPRET=1)")
    ap.add_argument("--precompile-tiles", default="",
                    help="only compile these tiles (kind:bm:bn:bk:split:warps:stages;...) ahead, then exit")
    a = ap.parse_args()
    if a.precompile_tiles:
        cfgs = [(c.split(":")[0],) + tuple(int(v) for v in c.split(":")[1:]) for c in a.precompile_tiles.split(";") if c]
        if torch.cuda.is_available():
            precompile_all(cfgs, a.jobs, a.precompile_s, False)
        return 0
    if not torch.cuda.is_available() and not a.smoke:
        print("fp8_bs64_gemm: no CUDA device (the forms are GPU kernels); nothing timed")
        return 0
    if a.sweep and not a.smoke and a.jobs:   # compile the sweep's tiles ahead in worker processes (Triton's cache)
        cfgs = [c[:7] for s_ in a.shapes.split(",") if s_ != "gate_up" for c in sweep_configs(*SHAPES[s_])]
        precompile_all(cfgs, a.jobs, a.precompile_s, a.precompile_engine)
    res = run(a.m, a.shapes.split(","), a.smoke, a.sweep)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
