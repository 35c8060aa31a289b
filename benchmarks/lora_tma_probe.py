"""How fast can one launch read gate_up's B (29.4 MB: 32 slots x 28672 x 16 bf16)? (issue 10, PERF_NOTES)

Every LoRA kernel streams its adapter bytes at ~1.9-2.0 TB/s at the 64-token / 32-adapter layer case
(gate_up's expand: 29.4 MB of B in ~15 us). This probe reads exactly those bytes (the benchmark's pool
layout: [sets x 32, 28672, 16] bf16, a set is one contiguous 29.4 MB range; graph replays cycle over
>= 256 MB of sets so every read comes from HBM) with
  (a) torch: a sum and a device copy;
  (b) plain Triton loads into registers (kernels/lora_tma_read.read_plain), with cp.async stages too;
  (c) TMA descriptor loads pipelined by Triton (read_tma) at (box, stages, programs) settings;
  (d) the current default expand alone (bench_lora_kernels' Case, from the default shrink's partials);
and prints us per 29.4 MB, the read rate, and the steady rate over all sets in one launch (so the fixed
cost of a launch shows: us - bytes / steady rate).

    python benchmarks/lora_tma_probe.py [--budget 55] [--only plain,tma]
    TRITON_INTERPRET=1 python benchmarks/lora_tma_probe.py --smoke   # CPU: tiny buffer, checks vs the reference
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from loraserve.kernels.lora_tma_read import make_desc, read_plain, read_ref, read_tma, tma_view  # noqa: E402

# (name, settings) in priority order (a budget cuts the tail): "plain" = registers (BLOCK elements x UNROLL loads,
# 4 warps: BLOCK 4096 = 64 B a thread a load) or cp.async stages; "tma" = boxes [rows, cols] of the flat view, Triton
# keeping stages - 1 boxes in flight in shared memory. Programs per launch; bytes in flight a program in comments.
SETTINGS = [
    ("tma 128x64 s4 p264", dict(rows=128, cols=64, stages=4, programs=264)),     # 48 KB a program
    ("tma 256x16 s8 p264", dict(rows=256, cols=16, stages=8, programs=264)),     # B's own [L*N, 16] view, 56 KB
    ("plain b4096 u4 p528", dict(block=4096, unroll=4, programs=528)),           # 32 KB in registers
    ("tma 128x64 s8 p132", dict(rows=128, cols=64, stages=8, programs=132)),     # 112 KB
    ("tma 256x64 s4 p132", dict(rows=256, cols=64, stages=4, programs=132, num_warps=8)),   # 96 KB
    ("plain b4096 u1 p528", dict(block=4096, unroll=1, programs=528)),           # 8 KB
    ("cp.async b8192 s4 p264", dict(block=8192, unroll=1, stages=4, programs=264)),  # 48 KB
    ("tma 256x16 s4 p264", dict(rows=256, cols=16, stages=4, programs=264)),     # 24 KB
    ("tma 64x64 s8 p264", dict(rows=64, cols=64, stages=8, programs=264)),       # 56 KB
    ("tma 128x64 s4 p528", dict(rows=128, cols=64, stages=4, programs=528)),
    ("plain b4096 u4 p264", dict(block=4096, unroll=4, programs=264)),
    ("plain b8192 u2 w8 p264", dict(block=8192, unroll=2, programs=264, num_warps=8)),
    ("tma 256x16 s4 p528", dict(rows=256, cols=16, stages=4, programs=528)),
    ("tma 128x64 s8 p264", dict(rows=128, cols=64, stages=8, programs=264)),
]
PLAIN = [(n, c) for n, c in SETTINGS if "rows" not in c]
TMA = [(n, c) for n, c in SETTINGS if "rows" in c]


def make_call(kind: str, src: torch.Tensor, cfg: dict):
    """A no-arg fn reading src once with this setting (descriptor and output built here, outside timing)."""
    cfg = dict(cfg)
    if kind == "plain":
        grid = -(-src.numel() // (cfg["block"] * cfg.get("unroll", 1)))
        out = torch.zeros(min(grid, cfg["programs"]), dtype=torch.float32, device=src.device)   # (launched: <= that)
        return lambda: read_plain(src, out=out, **cfg)
    view = tma_view(src, cfg["cols"])
    desc = make_desc(view, cfg["rows"], cfg["cols"])
    out = torch.zeros(cfg["programs"], dtype=torch.float32, device=src.device)   # (launched: <= that)
    return lambda: read_tma(src, out=out, desc=desc, **cfg)


def smoke() -> None:
    """Every setting on a tiny buffer under the interpreter, against read_ref."""
    src = torch.randn(2 * 256 * 64 * 3, dtype=torch.bfloat16)
    for name, cfg in PLAIN + TMA:
        kind = name.split()[0]
        kind = "tma" if kind == "tma" else "plain"
        c = dict(cfg, programs=min(cfg["programs"], 5))
        if kind == "plain":
            c["block"] = min(c["block"], 1024)
            out = read_plain(src, **c)
            ref = read_ref(src, c["programs"], c["block"] * c.get("unroll", 1))
        else:
            out = read_tma(src, **c)
            ref = read_ref(src, c["programs"], c["rows"] * c["cols"])
        err = (out - ref).abs().max().item()
        print(f"smoke {name:28s} programs {out.numel()} max|err| {err:.2e}", flush=True)
        assert err < 1e-2 * max(1.0, ref.abs().max().item()), name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget", type=float, default=55.0, help="seconds; settings left are skipped")
    ap.add_argument("--only", default="torch,plain,tma,expand")
    ap.add_argument("--expand-budget", type=float, default=1e9, help="seconds from the start: no expand variant after")
    args = ap.parse_args()
    if args.smoke:
        smoke()
        from benchmarks.bench_lora_kernels import Case

        expands(Case, 0, time.perf_counter(), smoke=True)
        return
    from benchmarks.bench_lora_kernels import Case, copy_bandwidth, graph_us

    t0 = time.perf_counter()
    only = set(args.only.split(","))
    bw = copy_bandwidth()
    slots, n, r = 32, 28672, 16
    sets = 9   # 9 x 29.4 MB = 264 MB > the 60 MB L2
    pool = torch.randn(sets * slots, n, r, device="cuda", dtype=torch.bfloat16)
    per = [pool[i * slots:(i + 1) * slots].reshape(-1) for i in range(sets)]
    nbytes = per[0].numel() * 2
    print(f"device {torch.cuda.get_device_name()}; copy {bw:.0f} GB/s (read + write); gate_up's B of 32 slots "
          f"{nbytes / 1e6:.1f} MB, {sets} sets cycled", flush=True)

    def report(name: str, us: float, steady_us: float | None = None) -> None:
        rate = nbytes / (us * 1e-6) / 1e12
        line = f"  {name:28s} {us:6.2f} us per 29.4 MB = {rate:.2f} TB/s read"
        if steady_us is not None:
            srate = sets * nbytes / (steady_us * 1e-6) / 1e12
            line += f"; all {sets} sets in one launch {steady_us:6.1f} us = {srate:.2f} TB/s -> fixed ~{us - nbytes / (srate * 1e6):.1f} us"
        print(line + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)

    if "torch" in only:
        report("torch sum (fp32)", graph_us([lambda s=s: s.sum(dtype=torch.float32) for s in per]),
               graph_us([lambda: pool.sum(dtype=torch.float32)]))
        dst = torch.empty_like(per[0])
        report("torch copy (read + write)", graph_us([lambda s=s: dst.copy_(s) for s in per]))
        del dst
    flat_all = pool.reshape(-1)
    for name, cfg in SETTINGS:
        kind = "tma" if "rows" in cfg else "plain"
        if kind not in only:
            continue
        if time.perf_counter() - t0 > args.budget:
            print(f"  budget of {args.budget:.0f} s spent: skipped {name}", flush=True)
            continue
        try:
            calls = [make_call(kind, s, cfg) for s in per]
            us = graph_us(calls)
            steady = graph_us([make_call(kind, flat_all, dict(cfg))])
            report(name, us, steady)
            got = calls[0]().sum().item()   # the sums of set 0's runs add up to set 0's sum
            want = per[0].sum(dtype=torch.float32).item()
            if abs(got - want) > 1e-5 * per[0].float().abs().sum().item():   # (fp32 order only)
                print(f"  {name:28s} WRONG SUM {got:.3f} vs {want:.3f}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report, go on
            print(f"  {name:28s} ERROR {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    if "expand" in only:
        expands(Case, nbytes, t0, deadline_s=args.expand_budget)


EXPAND_VARIANTS = ("default", "stream_one", "tma_p4", "tma_p4_r128", "tmap_n128_p5", "stream_pps6", "stream_one_pps6",
                   "tma_n128_p5", "tmap_p8_n128", "tmap_p4", "stream_pps8", "tmap_w2_p8_n128", "tma_p4_two",
                   "tma_p6_r128", "tma_n128_p6", "tma_p4_s3")


def expands(Case, nbytes: int, t0: float, smoke: bool = False, deadline_s: float = 1e9) -> None:
    """gate_up's expand alone at the layer case (64 tokens / 32 adapters / r16, from the default shrink's partials):
    the default (streaming expand) and the TMA expand's variants (lora_variants), until deadline_s after t0."""
    from benchmarks.lora_variants import VARIANTS, _use_variant

    c = Case("gate_up", 16, 4, 16, "cpu", smoke=True) if smoke else Case("gate_up", 16, 32, 64)
    c.calls("shrink_only")[0]()
    for v in EXPAND_VARIANTS:
        if time.perf_counter() - t0 > deadline_s:
            print(f"  expand variants: {deadline_s:.0f} s spent; skipped from {v}", flush=True)
            break
        try:
            _use_variant(c, VARIANTS[v])
            us = c.time("expand_only")
            print(f"  {'expand (gate_up) ' + v:28s} {us:6.2f} us (B {nbytes / 1e6:.1f} MB + y read/written "
                  f"{2 * c.T * c.N * 2 / 1e6:.1f} MB)  [{time.perf_counter() - t0:.0f} s]", flush=True)
        except Exception as exc:  # noqa: BLE001 - report, go on
            print(f"  expand {v} ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    _use_variant(c, VARIANTS["default"])

if __name__ == "__main__":
    main()
