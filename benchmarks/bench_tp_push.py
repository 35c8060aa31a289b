"""Row-parallel GEMM -> fused all-reduce + RMSNorm on 2 GPUs: the GEMM that pushes its tiles to the peer
(kernels/tp_gemm_push.py, LORASERVE_TP_GEMM_PUSH=1) against cuBLAS / the same GEMM without the push, each followed
by the Lamport norm kernel (kernels/allreduce_rmsnorm.py; pushing its row itself unless the GEMM did).

Per pair (GEMM + norm), us, inside CUDA graphs (16 pairs captured, the weights cycled over 8 copies so no pair
reads its weights from L2), at the TP=2 8B shard shapes o_proj [4096, 2048] and down_proj [4096, 7168], 64 and 1
rows (1 row: the GEMV with the push against kernels/gemv.py + norm, what batch-1 decode runs). The start-up
self-check of the push (tp/fused_norm.py) runs first; one fresh pair's output is compared with the cuBLAS pair's
(the GEMMs round differently: tolerance).

    python3 benchmarks/bench_tp_push.py [--json out.json]       # 2 GPUs, ~15 s on a warm Triton cache
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.graph_timing import graph_seconds  # noqa: E402

SHAPES = {"o": (4096, 2048), "down": (4096, 7168)}
# other (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, REGPRE) for the push at the first row count (the defaults are
# tp_gemm_push.PUSH_CONFIGS): more programs than the 64 N tiles (split-K), wider tiles
SWEEP = {"o": [(64, 128, 2, 4, 4, 0), (32, 128, 1, 4, 4, 0), (64, 128, 1, 4, 4, 1)],
         "down": [(64, 128, 4, 4, 4, 0), (128, 128, 4, 4, 4, 0), (64, 128, 2, 4, 4, 1)]}


def worker(rank: int, world: int, port: int, out: dict, rows_list: list[int], sweep: bool = False,
           sweep_only: bool = False) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from loraserve.inference.tp.fused_norm import make_fused_norm
    from loraserve.kernels.gemv import gemv
    from loraserve.kernels.skinny_gemm import skinny_gemm
    from loraserve.kernels.tp_gemm_push import gemm_push, push_config

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60), device_id=dev)
    os.environ["LORASERVE_TP_FUSED_NORM"] = "1"
    os.environ["LORASERVE_TP_GEMM_PUSH"] = "1"
    fn = make_fused_norm(dev, 4096)
    res: dict = {"fused_self_check": fn is not None, "push_self_check": bool(fn is not None and fn.push)}

    def put(key: str, value) -> None:   # printed as measured: a killed run keeps its lines
        res[key] = value
        if rank == 0:
            print(f"{key:44s} {round(value, 3) if isinstance(value, float) else value}", flush=True)

    if rank == 0:
        print(f"self-checks: fused norm {res['fused_self_check']}, push {res['push_self_check']}", flush=True)
    if fn is None or not fn.push:
        if rank == 0:
            out.update(res)
        dist.destroy_process_group()
        return
    fn.push_rows = (1, 64)
    g = torch.Generator(device=dev).manual_seed(5 + rank)
    nw = (1 + 0.1 * torch.randn(4096, device=dev, generator=g)).bfloat16()
    weights = {name: [(torch.randn(N, K, device=dev, generator=g) / K ** 0.5).bfloat16() for _ in range(8)]
               for name, (N, K) in SHAPES.items()}
    inputs = {(name, rows): (torch.randn(rows, K, device=dev, generator=g).bfloat16(),
                             torch.randn(rows, N, device=dev, generator=g).bfloat16())
              for name, (N, K) in SHAPES.items() for rows in rows_list}

    def chain(kind: str, name: str, rows: int, config=None):
        """The pairs of one kind over the 8 weight copies (config: other tiles for the push)."""
        ws, (x, r) = weights[name], inputs[name, rows]
        N, K = SHAPES[name]
        cfg = push_config(rows, N, K, dev)

        def run():
            for w in ws:
                if config is not None:
                    y = torch.empty(rows, N, dtype=x.dtype, device=dev)
                    gemm_push(x, w, y, fn.buffer, fn.deltas, fn.counters, fn.rank, fn.world, fn.max_rows,
                              config=config)
                    fn._pushed = y
                elif kind == "push":
                    y = fn.gemm_push(x, w)
                elif kind == "skinny":
                    y = skinny_gemm(x, w, config=cfg)
                elif kind == "gemv":   # what batch-1 decode runs (kernels/gemv.py)
                    y = gemv(x, w)
                else:
                    y = F.linear(x, w)
                fn(y, r, nw, 1e-5)
        return run

    # 1. the pairs at each row count (the most wanted figures first: a killed run keeps them)
    for rows in rows_list if not sweep_only else ():
        for name in SHAPES:
            for kind in ("cublas", "push") + (("gemv",) if rows == 1 else ("skinny",)):
                dist.barrier()
                put(f"{name}_m{rows}_{kind}_pair_us", graph_seconds(chain(kind, name, rows), 2, 20) * 1e6 / 8)
    # 2. one fresh pair of each: the push + norm against cuBLAS + norm (the GEMMs round differently)
    for name in SHAPES if not sweep_only else ():
        for rows in rows_list:
            (x, r), w = inputs[name, rows], weights[name][0]
            ya = F.linear(x, w)
            fn(ya, r.clone(), nw, 1e-5)   # (a pushed partial must be the next norm's input: this one first)
            yb = fn.gemm_push(x, w)
            fn(yb, r.clone(), nw, 1e-5)
            torch.cuda.synchronize()
            put(f"{name}_m{rows}_push_vs_cublas_max_diff", (ya.float() - yb.float()).abs().max().item())
    # 3. other tiles for the push at the first row count, then the GEMMs alone
    for name in SHAPES if sweep or sweep_only else ():
        for kind in ("cublas", "push") if sweep_only else ():   # this process's baseline beside the other tiles
            dist.barrier()
            put(f"{name}_m{rows_list[0]}_{kind}_pair_us", graph_seconds(chain(kind, name, rows_list[0]), 2, 20) * 1e6 / 8)
        for alt in SWEEP.get(name, []):
            dist.barrier()
            put(f"{name}_m{rows_list[0]}_push_{'_'.join(map(str, alt))}_pair_us",
                graph_seconds(chain("push", name, rows_list[0], alt), 2, 20) * 1e6 / 8)
    for name, (N, K) in SHAPES.items() if not sweep_only else ():
        for rows in rows_list:
            (x, _), ws = inputs[name, rows], weights[name]
            cfg = push_config(rows, N, K, dev)
            put(f"{name}_m{rows}_cublas_gemm_us", graph_seconds(lambda: [F.linear(x, w) for w in ws], 2, 20) * 1e6 / 8)
            put(f"{name}_m{rows}_skinny_gemm_us",
                graph_seconds(lambda: [skinny_gemm(x, w, config=cfg) for w in ws], 2, 20) * 1e6 / 8)
    res["device"] = torch.cuda.get_device_name(dev)
    if rank == 0:
        out.update(res)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,1")
    ap.add_argument("--sweep", action="store_true", help="also the push with the other tiles of SWEEP")
    ap.add_argument("--sweep-only", action="store_true", help="only those, beside cuBLAS + norm and the default push")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("bench_tp_push skipped: it needs 2 GPUs")
        return 0
    import torch.multiprocessing as mp

    from loraserve.inference.tp.executor import _free_port

    rows = [int(v) for v in a.rows.split(",")]
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(worker, args=(2, _free_port(), out, rows, a.sweep, a.sweep_only), nprocs=2, join=True,
                           start_method="spawn")
        res = dict(out)
    for name in SHAPES:
        for m in rows:
            base = "gemv" if m == 1 else "cublas"
            c, p = res.get(f"{name}_m{m}_{base}_pair_us"), res.get(f"{name}_m{m}_push_pair_us")
            if c and p:
                print(f"{name} m{m}: push pair {p:.2f} us vs {base} + norm {c:.2f} ({c - p:+.2f} us saved)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res.get("push_self_check") else 1


if __name__ == "__main__":
    sys.exit(main())
