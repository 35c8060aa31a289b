"""Benchmark the multi-LoRA Triton kernels (shrink + expand) at Llama-3-8B shapes, bf16.

For each projection (qkv, gate_up, down), rank (16, 64), adapters in the batch (1..32) and
decode batch size (1..1024 tokens, spread evenly over the adapters) it prints:
  * triton_us: shrink+expand per call, timed from CUDA-graph replays (launch gaps excluded, as
    in a graph-captured decode step), cycling over enough weight copies that A and B come
    from HBM rather than the 60 MB L2;
  * ref_us: the torch reference (eager; it syncs, so it cannot be captured);
  * GB/s: bytes that must move (A and B rows up to each adapter's rank, x read, y read and
    written, the fp32 intermediate written and read) over triton_us, next to the HBM copy
    bandwidth measured in the same run (bytes read + written by a large device copy).

    python benchmarks/bench_lora_kernels.py [--quick] [--csv out.csv]
    TRITON_INTERPRET=1 python benchmarks/bench_lora_kernels.py --smoke   # CPU logic check
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from loraserve.kernels import LoRAMetaBuilder, lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

PROJECTIONS = {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336]), "down": (14336, [4096])}
L2_FLUSH_BYTES = 256 << 20  # weights cycled per timing so that each call reads from HBM


def copy_bandwidth(device: str) -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _event_time(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def _event_time(fn, reps: int) -> float:
    """Median ms of fn over reps, after a warm-up, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_case(proj: str, rank: int, num_adapters: int, num_tokens: int, device: str, smoke: bool,
               shrink_cfg: dict | None = None, expand_cfg: dict | None = None, with_ref: bool = True,
               block_m: int | None = None) -> dict:
    hidden, widths = PROJECTIONS[proj]
    if smoke:
        hidden, widths = 64, [w // 256 for w in widths]
    S, N, T, L, R = len(widths), sum(widths), num_tokens, num_adapters, rank
    dtype = torch.bfloat16 if not smoke else torch.float16
    set_bytes = L * (S * R * hidden + N * R) * 2
    num_sets = 1 if smoke else max(2, min(128, math.ceil(L2_FLUSH_BYTES / set_bytes)))
    lora_a = torch.randn(num_sets * L, S, R, hidden, device=device, dtype=dtype) / hidden ** 0.5
    lora_b = torch.randn(num_sets * L, N, R, device=device, dtype=dtype) / R ** 0.5
    ranks = torch.full((L,), R, dtype=torch.int32, device=device)
    offsets = torch.tensor([0] + list(torch.tensor(widths).cumsum(0)), dtype=torch.int32, device=device)
    x = torch.randn(T, hidden, device=device, dtype=dtype)
    y = torch.randn(T, N, device=device, dtype=dtype)
    buf = torch.empty(S, T, R, device=device)
    slots = (torch.arange(T, device=device) % L).to(torch.int32)  # every adapter gets T/L tokens
    meta = LoRAMetaBuilder(T, L, device, block_m=block_m).build(slots)

    def run(i: int) -> None:
        a, b = lora_a[i * L:(i + 1) * L], lora_b[i * L:(i + 1) * L]
        lora_shrink(x, a, meta, ranks, buf, config=shrink_cfg)
        lora_expand(buf, b, offsets, meta, ranks, y, config=expand_cfg)

    def run_ref() -> None:
        lora_shrink_ref(x, lora_a[:L], meta, ranks, buf)
        lora_expand_ref(buf, lora_b[:L], offsets, meta, ranks, y)

    moved = set_bytes + T * hidden * 2 + 2 * T * N * 2 + 2 * S * T * R * 4
    if smoke:
        t0 = time.perf_counter()
        run(0)
        return dict(triton_us=(time.perf_counter() - t0) * 1e6, ref_us=float("nan"), bytes=moved)

    for i in range(num_sets):  # compile + warm up outside the capture
        run(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(num_sets):
            run(i)
    triton_us = _event_time(graph.replay, reps=20) * 1e3 / num_sets
    ref_us = _event_time(run_ref, reps=5) * 1e3 if with_ref else float("nan")
    return dict(triton_us=triton_us, ref_us=ref_us, bytes=moved)


SWEEP_CASES = [("qkv", 64, 32, 256), ("gate_up", 64, 4, 1024), ("down", 16, 1, 1), ("qkv", 16, 32, 64)]
SWEEP_SHRINK = [None, {"SPLIT_K": 1}, {"SPLIT_K": 4}, {"SPLIT_K": 16}, {"BLOCK_K": 256}, {"num_warps": 8}]
SWEEP_EXPAND = [{"BLOCK_N": 64}, {"BLOCK_N": 256, "num_warps": 8}, {"BLOCK_K": 32}, {"num_stages": 2}]


def sweep(device: str) -> None:
    """Shrink+expand time under other launch configurations (None = the defaults)."""
    print("\nsweep: us per shrink+expand; the changed parameter, the rest default")
    for proj, rank, L, T in SWEEP_CASES:
        cells = []
        for cfg in SWEEP_SHRINK:
            r = bench_case(proj, rank, L, T, device, False, shrink_cfg=cfg, with_ref=False)
            cells.append(f"shrink{cfg or ''}={r['triton_us']:.1f}")
        for cfg in SWEEP_EXPAND:
            r = bench_case(proj, rank, L, T, device, False, expand_cfg=cfg, with_ref=False)
            cells.append(f"expand{cfg}={r['triton_us']:.1f}")
        print(f"{proj} r{rank} L{L} T{T}: " + "  ".join(cells), flush=True)


def sweep_block_m(device: str) -> None:
    """Rows per tile for large steps (auto_block_m's choice), with expand at 4 or 8 warps."""
    print("\nsweep: rows per tile (block_m) for large steps; us per shrink+expand")
    for proj, rank in (("qkv", 16), ("gate_up", 64), ("down", 64)):
        for T in (512, 1024):
            for L in (1, 32):
                cells = [f"bm{bm}={bench_case(proj, rank, L, T, device, False, with_ref=False, block_m=bm)['triton_us']:.1f}"
                         for bm in (16, 32, 64)]
                r = bench_case(proj, rank, L, T, device, False, expand_cfg={"num_warps": 8}, with_ref=False, block_m=64)
                cells.append(f"bm64+expand8warps={r['triton_us']:.1f}")
                print(f"{proj} r{rank} L{L} T{T}: " + "  ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--csv", help="also write the rows here")
    ap.add_argument("--sweep", action="store_true", help="also try other launch configurations on a few cases")
    ap.add_argument("--sweep-block-m", action="store_true", help="also compare rows per tile on large steps")
    ap.add_argument("--only-sweep", action="store_true", help="skip the main table")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke:
        name = torch.cuda.get_device_name()
        bw = copy_bandwidth(device)
        print(f"device: {name}; measured HBM copy bandwidth (read+write): {bw:.0f} GB/s")
    else:
        bw = float("nan")
    tokens = [1, 16, 256] if args.quick or args.smoke else [1, 4, 16, 64, 256, 1024]
    adapters = [1, 32] if args.smoke else [1, 4, 16, 32]
    rows = []
    header = f"{'proj':8s} {'rank':>4s} {'loras':>5s} {'tokens':>6s} {'triton_us':>10s} {'ref_us':>9s} " \
             f"{'speedup':>7s} {'MB':>7s} {'GB/s':>7s} {'%copy':>6s}"
    print(header)
    for proj in ([] if args.only_sweep else PROJECTIONS):
        for rank in (16, 64):
            for L in adapters:
                for T in tokens:
                    if L > T:
                        continue
                    r = bench_case(proj, rank, L, T, device, args.smoke)
                    gbs = r["bytes"] / (r["triton_us"] * 1e-6) / 1e9
                    row = dict(proj=proj, rank=rank, loras=L, tokens=T, **r, gbs=gbs, pct=100 * gbs / bw)
                    rows.append(row)
                    print(f"{proj:8s} {rank:4d} {L:5d} {T:6d} {r['triton_us']:10.1f} {r['ref_us']:9.1f} "
                          f"{r['ref_us'] / r['triton_us']:7.1f} {r['bytes'] / 1e6:7.2f} {gbs:7.0f} "
                          f"{row['pct']:6.1f}", flush=True)
    if args.sweep and not args.smoke:
        sweep(device)
    if args.sweep_block_m and not args.smoke:
        sweep_block_m(device)
    if args.csv and rows:
        with open(args.csv, "w") as f:
            f.write(",".join(rows[0]) + "\n")
            for row in rows:
                f.write(",".join(str(v) for v in row.values()) + "\n")


if __name__ == "__main__":
    main()
