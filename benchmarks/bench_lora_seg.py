"""Sweep the segment-tiled LoRA pair (kernels/lora_seg.py) against lora_apply's tile path on the >= 32 MB shapes of
bench_lora_kernels (same cases, same byte count, same CUDA-graph timing), with the ceilings of the same run: the device
copy, y read + written by torch (y.add_(1): the expand's own traffic) and x read (x.sum).

    python benchmarks/bench_lora_seg.py [--max-shapes 10] [--configs default,bn128,...] [--budget 60]
    TRITON_INTERPRET=1 python benchmarks/bench_lora_seg.py --smoke     # CPU logic check

Each config is a set of LORASERVE_LORA_SEG_* variables (read by lora_seg's config functions at each call). Per shape:
the tile path (us, shrink + expand), then each config: us of the pair, shrink alone, expand alone, fraction of copy,
max |seg - tile| output difference and whether two runs are bit-equal.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_lora_kernels import Case, copy_bandwidth, graph_us, shape_bytes, sweep_shapes  # noqa: E402
from loraserve.kernels import lora_apply, lora_seg  # noqa: E402
from loraserve.kernels.lora_apply import choose_path  # noqa: E402

CONFIGS = {  # name -> LORASERVE_LORA_SEG_* overrides
    "default": {},
    "nored": {"LORASERVE_LORA_SEG_REDUCE": "0"},   # the expand sums the split-K partials (per column group)
    "ya": {"LORASERVE_LORA_SEG_YAHEAD": "1"},   # the expand loads the next block's y before its dot
    "g4ya": {"LORASERVE_LORA_SEG_GROUP": "4", "LORASERVE_LORA_SEG_YAHEAD": "1"},
    "g4a": {"LORASERVE_LORA_SEG_GROUP": "4", "LORASERVE_LORA_SEG_ADAPT": "1"},   # one pass if one slot, else per tile
    "g4aya": {"LORASERVE_LORA_SEG_GROUP": "4", "LORASERVE_LORA_SEG_ADAPT": "1", "LORASERVE_LORA_SEG_YAHEAD": "1"},
    "yast1": {"LORASERVE_LORA_SEG_YAHEAD": "1", "LORASERVE_LORA_SEG_STAGES": "1"},
    "x4": {"LORASERVE_LORA_SEG_EXPAND_PER_SM": "4"},
    "x16": {"LORASERVE_LORA_SEG_EXPAND_PER_SM": "16"},
    "bpp1": {"LORASERVE_LORA_SEG_BPP": "1"},
    "bn128": {"LORASERVE_LORA_SEG_BN": "128"},
    "w4": {"LORASERVE_LORA_SEG_WARPS": "4"},
    "st1": {"LORASERVE_LORA_SEG_STAGES": "1"},
    "st3": {"LORASERVE_LORA_SEG_STAGES": "3"},
    "s4": {"LORASERVE_LORA_SEG_SHRINK_PER_SM": "4"},
    "s1": {"LORASERVE_LORA_SEG_SHRINK_PER_SM": "1"},
    "sbk64": {"LORASERVE_LORA_SEG_SHRINK_BK": "64"},
    "sbk128": {"LORASERVE_LORA_SEG_SHRINK_BK": "128"},
    "g2": {"LORASERVE_LORA_SEG_GROUP": "2"},
    "g4": {"LORASERVE_LORA_SEG_GROUP": "4"},
    "g4st1": {"LORASERVE_LORA_SEG_GROUP": "4", "LORASERVE_LORA_SEG_STAGES": "1"},
    "g2x4": {"LORASERVE_LORA_SEG_GROUP": "2", "LORASERVE_LORA_SEG_EXPAND_PER_SM": "4"},
    "sw4": {"LORASERVE_LORA_SEG_SHRINK_WARPS": "4"},
    "sw8": {"LORASERVE_LORA_SEG_SHRINK_WARPS": "8"},
    "sst3": {"LORASERVE_LORA_SEG_SHRINK_STAGES": "3"},
    "noya": {"LORASERVE_LORA_SEG_YAHEAD": "0"},
    "x2": {"LORASERVE_LORA_SEG_EXPAND_PER_SM": "2"},
    "x8": {"LORASERVE_LORA_SEG_EXPAND_PER_SM": "8"},
    "s2": {"LORASERVE_LORA_SEG_SHRINK_PER_SM": "2"},
    "w4bn128": {"LORASERVE_LORA_SEG_WARPS": "4", "LORASERVE_LORA_SEG_BN": "128", "LORASERVE_LORA_SEG_EXPAND_PER_SM": "16"},
    "s1nored": {"LORASERVE_LORA_SEG_SHRINK_PER_SM": "1", "LORASERVE_LORA_SEG_REDUCE": "0"},
    "st4": {"LORASERVE_LORA_SEG_STAGES": "4"},
    "s1st3": {"LORASERVE_LORA_SEG_SHRINK_PER_SM": "1", "LORASERVE_LORA_SEG_STAGES": "3"},
}
_ALL_KEYS = sorted({k for c in CONFIGS.values() for k in c})


def _set_env(env: dict) -> None:
    for k in _ALL_KEYS:
        os.environ.pop(k, None)
    os.environ.update(env)


def _output(c: Case, ws: torch.Tensor) -> torch.Tensor:
    c.y.copy_(c.y_init)
    a, b = c.ab(0)
    lora_apply(c.x, c.y, a, b, c.offsets, c.meta, c.ranks, ws)
    out = c.y.clone()
    c.y.copy_(c.y_init)
    return out


def _time(c: Case, fns) -> float:
    if not c.x.is_cuda:
        for f in fns:
            f()
        return float("nan")
    return graph_us(fns)


def run_shape(c: Case, configs: list[str], bw: float, deadline: float) -> None:
    lora_seg.SEG_ENABLED = False
    c.use_variant(True)
    tile_path = c.path
    ref = _output(c, c.ws)
    us = _time(c, c.calls("path"))
    sh = _time(c, c.calls("shrink_only")) if tile_path in ("partials", "reduced") else float("nan")
    ex = _time(c, c.calls("expand_only")) if tile_path in ("partials", "reduced") else float("nan")
    frac = c.bytes / (us * 1e-6) / 1e9 / bw
    print(f"  tile({tile_path:8s}) {us:7.2f} us {frac:6.3f}  shrink {sh:6.2f} expand {ex:6.2f}", flush=True)
    lora_seg.SEG_ENABLED, lora_seg.SEG_MIN_TOKENS = True, 65
    nr_long, lora_seg.SEG_MAX_NR_LONG = lora_seg.SEG_MAX_NR_LONG, 1 << 62   # every shape takes seg here
    for name in configs:
        if time.perf_counter() > deadline:
            print("  (budget spent)", flush=True)
            break
        _set_env(CONFIGS[name])
        try:
            path, shape, _ = choose_path(c.x, c.lora_a[:c.L], c.lora_b[:c.L], c.meta)
            assert path == "seg", path
            c.path, c.ws = "seg", torch.empty(shape, device=c.x.device)
            out = _output(c, c.ws)
            again = _output(c, c.ws)
            us = _time(c, c.calls("path"))
            sh = _time(c, c.calls("shrink_only"))
            ex = _time(c, c.calls("expand_only"))
            if lora_seg._SEG_FAILED:   # lora_apply fell back to the tile path: not a seg timing
                lora_seg._SEG_FAILED.clear()
                raise RuntimeError("the seg kernels failed to compile/launch (lora_apply fell back)")
        except Exception as exc:  # noqa: BLE001 - one config failing leaves the others
            lora_seg._SEG_FAILED.clear()
            print(f"  seg {name:8s} FAILED {exc!r}"[:300], flush=True)
            continue
        diff = (out.float() - ref.float()).abs().max().item()
        frac = c.bytes / (us * 1e-6) / 1e9 / bw
        print(f"  seg {name:8s} {us:7.2f} us {frac:6.3f}  shrink {sh:6.2f} expand {ex:6.2f}  split {shape[0]:2d}  "
              f"max|diff| {diff:.2e} repeat-equal {torch.equal(out, again)}", flush=True)
    _set_env({})
    lora_seg.SEG_MAX_NR_LONG = nr_long


def ceilings(c: Case, bw: float) -> str:
    """us of torch's y.add_(1) (y read + written) and x.sum (x read) for this shape, as fractions of the copy."""
    if not c.x.is_cuda:
        return ""
    y_us = graph_us([lambda: c.y.add_(1)] * 4)
    x_us = graph_us([lambda: c.x.sum()] * 4)
    yb, xb = 2 * c.y.numel() * 2, c.x.numel() * 2
    return (f"y.add_ {y_us:6.2f} us ({yb / (y_us * 1e-6) / 1e9 / bw:.2f} of copy), x.sum {x_us:6.2f} us "
            f"({xb / (x_us * 1e-6) / 1e9 / bw:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--max-shapes", type=int, default=10)
    ap.add_argument("--min-tokens", type=int, default=65, help="only shapes with at least this many tokens")
    ap.add_argument("--shapes", default=None, help="proj:rank:adapters:tokens,... instead of the >= 32 MB pick")
    ap.add_argument("--configs", default="default")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; later configs / shapes are skipped")
    ap.add_argument("--shape-budget", type=float, default=1e9, help="seconds per shape (later configs skipped)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    configs = [s for s in args.configs.split(",") if s]
    unknown = [s for s in configs + [c for item in (args.shapes or "").split(",") if "=" in item
                                     for c in item.partition("=")[2].split("+")] if s not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known {list(CONFIGS)}")
    per_shape: dict[tuple, list[str]] = {}   # proj:rank:adapters:tokens=cfg+cfg+...: this shape's own configs
    if args.shapes:
        shapes = []
        for item in args.shapes.split(","):
            spec, _, cfgs = item.partition("=")
            p, r, L, T = spec.split(":")
            shapes.append((p, int(r), int(L), int(T)))
            if cfgs:
                per_shape[shapes[-1]] = cfgs.split("+")
    else:
        big = [sh for sh in sweep_shapes(args.smoke) if args.smoke or shape_bytes(*sh) >= 32e6]
        if args.max_shapes and len(big) > args.max_shapes > 1:
            big = [big[round(i * (len(big) - 1) / (args.max_shapes - 1))] for i in range(args.max_shapes)]
        shapes = [sh for sh in big if sh[3] >= args.min_tokens]
    bw = float("nan") if args.smoke else copy_bandwidth()
    dev = "cpu" if args.smoke else "cuda"
    print(f"copy bandwidth (read + write) {bw:.0f} GB/s; shapes {shapes}; configs {configs}", flush=True)
    for proj, r, L, T in shapes:
        if time.perf_counter() > deadline:
            print(f"(budget spent: {proj} r{r} L{L} T{T} and later skipped)")
            break
        c = Case(proj, r, L, T, dev, args.smoke)
        print(f"{proj} r{r} L{L} T{T}: {c.bytes / 1e6:.1f} MB; {ceilings(c, bw)} [{time.perf_counter() - t0:.0f} s]",
              flush=True)
        run_shape(c, per_shape.get((proj, r, L, T), configs), bw, min(deadline, time.perf_counter() + args.shape_budget))
        del c
    print(f"done [{time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()
