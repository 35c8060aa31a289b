"""Per-token kernels of the FP8 decode layer at decode batch sizes, one program per row vs rows cut into chunks
(kernels/fp8_row_split.py, LORASERVE_FP8_ROW_SPLIT): us per call, CUDA graphs of --reps launches replayed.

    python3 benchmarks/bench_fp8_rows.py --rows 64 --json /tmp/rows.json
    python3 benchmarks/bench_fp8_rows.py --tiny     # CPU: the code path only (eager, small shapes)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _time_us(fn, reps: int, rounds: int, cuda: bool) -> float:
    if not cuda:
        t = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t)
    fn()   # compile
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    best = float("inf")
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, 1e3 * a.elapsed_time(b) / reps)
    return round(best, 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="48,64")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--chunks", default="512,1024,2048")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from loraserve.kernels.activation import silu_and_mul
    from loraserve.kernels.fp8_norm_quant import rms_norm_quant, silu_mul_quant, splitk_add_rms_norm
    from loraserve.kernels.rmsnorm import fused_add_rms_norm

    cuda = torch.cuda.is_available() and not a.tiny
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    H, I = (a.hidden, a.inter) if cuda else (96, 200)
    res: dict = {}
    for T in [int(r) for r in a.rows.split(",")]:
        g = torch.Generator().manual_seed(T)
        gate_up = (torch.randn(T, 2 * I, generator=g) * 3).to(dev, dt)
        x = torch.randn(T, H, generator=g).to(dev, dt)
        r = torch.randn(T, H, generator=g).to(dev, dt)
        w = (torch.rand(H, generator=g) + 0.5).to(dev, dt)
        ws = (torch.randn(1, T, H, generator=g) * 30).to(dev)
        s = (torch.rand(H, generator=g) * 0.01).to(dev)
        xs = (torch.rand(T, 1, generator=g) + 0.5).to(dev)
        row: dict = {}
        cases = {"bf16_silu_and_mul": lambda: silu_and_mul(gate_up),
                 "bf16_add_rms_norm": lambda: fused_add_rms_norm(x, r, w, 1e-5),
                 "silu_mul_quant": lambda: silu_mul_quant(gate_up),
                 "rms_norm_quant": lambda: rms_norm_quant(x, r, w, 1e-5),
                 "splitk_add_rms_norm_q": lambda: splitk_add_rms_norm(ws, s, r, w, 1e-5, xs, True)}
        for name, fn in cases.items():
            env = {"LORASERVE_FP8_ROW_SPLIT": "0"}
            variants = [("row", env)]
            if name.startswith(("silu_mul", "rms_norm_q", "splitk")):
                key = "LORASERVE_FP8_ROW_SPLIT_CHUNK" if name.startswith("silu") else "LORASERVE_FP8_ROW_SPLIT_NORM_CHUNK"
                variants += [(f"split{c}", {"LORASERVE_FP8_ROW_SPLIT": "1", key: c}) for c in a.chunks.split(",")]
            for vname, vars_ in variants:
                old = {k: os.environ.get(k) for k in vars_}
                os.environ.update(vars_)
                try:
                    row[f"{name}_{vname}" if vname != "row" or not name.startswith("bf16") else name] = \
                        _time_us(fn, a.reps, a.rounds, cuda)
                except Exception as err:   # noqa: BLE001  (one failing variant must not cost the others)
                    row[f"{name}_{vname}"] = f"error: {type(err).__name__}: {str(err)[:160]}"
                finally:
                    for k, v in old.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
        res[f"T{T}"] = row
        print(json.dumps({f"T{T}": row}), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
