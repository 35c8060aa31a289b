"""Benchmark the multi-LoRA Triton kernels at Llama-3-8B shapes, bf16, each figure next to its limit.

One run prints, with the limits measured in the same run (device copy bandwidth; the base GEMMs
of one decoder layer at the same token count):
  * lora_layer_over_base: LoRA on all 7 modules of one layer (qkv, o, gate_up, down fused
    projections), 64 tokens, 32 adapters of rank 16, over the layer's 4 base GEMMs (F.linear);
  * lora_1tok_us_per_proj: median over the 4 projections at 1 token, 1 adapter, rank 16;
  * lora_32mb_bw_fraction_median: median over the swept shapes (projection x rank x adapters x
    tokens) that must move >= 32 MB of bytes moved / time / copy bandwidth.
Bytes moved = A and B rows up to each adapter's rank, x read, y read and written (what any
implementation must move; the fp32 intermediate is not counted).
Every timing is a CUDA-graph replay (launch gaps excluded, as in a captured decode step) that
cycles over enough weight copies (>= 256 MB) that weights come from HBM, not the 60 MB L2.
"path" is what lora_apply runs (the engine's path: fused one-launch kernel for small steps,
shrink -> partials -> expand otherwise); "3launch" is the previous path (shrink, split-K sum,
expand) measured in the same run as the "before".

--compare times both kernel variants of lora_apply in the same run (LORASERVE_LORA_STREAM=0
"classic": one expand program per (tile, column block); =1 "stream", the default: streaming
expand + grid-aware shrink split-K, kernels/lora_expand_stream.py) on the layer case, the 1-token
case and the >= 32 MB shapes, prints each figure for both with its target, and the largest
|stream - classic| output difference per case. It chooses nothing: the default is whatever
LORASERVE_LORA_STREAM says (printed).

    python benchmarks/bench_lora_kernels.py [--table] [--sweep-fused] [--sweep-layer] [--json out.json]
    python benchmarks/bench_lora_kernels.py --compare [--max-shapes 26] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/bench_lora_kernels.py --smoke [--compare]   # CPU logic check
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))   # benchmarks.lora_variants

from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_expand, lora_meta, lora_shrink
from loraserve.kernels.lora_apply import choose_path
from loraserve.kernels.lora_fused import _FITS, fused_plan, lora_shrink_expand
from loraserve.kernels.lora_shrink import shrink_split_k

from benchmarks.lora_timing import copy_bandwidth, event_time, graph_us  # noqa: E402,F401 (re-exported)

# Llama-3-8B: hidden 4096, 32 q heads / 8 kv heads of 128, intermediate 14336.
PROJECTIONS = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]),
               "gate_up": (4096, [14336, 14336]), "down": (14336, [4096])}
L2_FLUSH_BYTES = 256 << 20
_SEG_DEFAULT = (__import__("loraserve.kernels.lora_seg", fromlist=["X"]).SEG_ENABLED,
                __import__("loraserve.kernels.lora_seg", fromlist=["X"]).SEG_MIN_TOKENS)   # as the process found them


class Case:
    """One projection's LoRA problem with num_sets copies of the adapter weights."""

    def __init__(self, proj: str, rank: int, num_adapters: int, num_tokens: int, device: str = "cuda",
                 smoke: bool = False, max_rank: int | None = None, idle: bool = False):
        """idle: every token without an adapter (the path's fixed cost: launches, metadata)."""
        hidden, widths = PROJECTIONS[proj]
        if smoke:
            hidden, widths = 64, [max(16, w // 256) for w in widths]
        self.S, self.N, self.T, self.L, self.H = len(widths), sum(widths), num_tokens, num_adapters, hidden
        R = max_rank or rank
        dtype = torch.float16 if smoke else torch.bfloat16
        set_bytes = self.L * (self.S * R * hidden + self.N * R) * 2
        self.num_sets = 1 if smoke else max(2, min(64, math.ceil(L2_FLUSH_BYTES / set_bytes)))
        self.lora_a = torch.randn(self.num_sets * self.L, self.S, R, hidden, device=device, dtype=dtype) / hidden ** .5
        self.lora_b = torch.randn(self.num_sets * self.L, self.N, R, device=device, dtype=dtype) / R ** .5
        self.ranks = torch.full((self.L,), rank, dtype=torch.int32, device=device)
        self.offsets = torch.tensor([0] + torch.tensor(widths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        self.x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
        self.y = torch.randn(num_tokens, self.N, device=device, dtype=dtype)
        self.y_init = self.y.clone()  # timings accumulate into y; output checks start from this
        slots = (torch.arange(num_tokens, device=device) % self.L).to(torch.int32)  # T/L tokens each
        if idle:
            slots.fill_(-1)
        self.meta = LoRAMetaBuilder(num_tokens, self.L, device).build(slots)
        self.path, shape, _ = choose_path(self.x, self.lora_a[:self.L], self.lora_b[:self.L], self.meta)
        self.ws = torch.empty(shape, device=device)
        self.variant = lora_meta.LORA_STREAM  # the kernel variant self.ws was sized for
        self.buf3 = torch.empty(self.S, num_tokens, R, device=device)
        # bytes any implementation must move: A, B up to rank; x read; y read + written
        self.bytes = self.L * (self.S * rank * hidden + self.N * rank) * 2 + num_tokens * hidden * 2 \
            + 2 * num_tokens * self.N * 2

    def use_variant(self, stream: bool | dict) -> None:
        """Switch lora_apply's kernel variant for the next calls/timings: a bool sets only
        LORASERVE_LORA_STREAM (the other switches stay as they are); a dict
        (benchmarks/lora_variants.VARIANTS) sets every switch: stream, fused (LORASERVE_LORA_FUSED),
        onelaunch (LORASERVE_LORA_ONELAUNCH) and its token range, pdl (LORASERVE_LORA_PDL) and the
        streaming expand's b_ahead (None: the code's rule); a key left out means off / the rule."""
        import importlib

        if isinstance(stream, dict):
            v = stream
            apply_mod = importlib.import_module("loraserve.kernels.lora_apply")  # the module, not the function
            apply_mod.FUSED_ENABLED = bool(v.get("fused", False))
            apply_mod.ONELAUNCH_ENABLED = bool(v.get("onelaunch", False))
            apply_mod.DENSE_MODE = v.get("dense", "")
            apply_mod.DENSE_EXPAND = bool(v.get("dense_expand", False))
            apply_mod.DENSE_EXPAND_MIN_N = v.get("dense_expand_min_n", 8192)
            from loraserve.kernels import lora_expand_stream, lora_onelaunch

            lora_onelaunch.ONELAUNCH_MAX_TOKENS = v.get("onelaunch_max_tokens", 256)
            lora_meta.LORA_PDL = bool(v.get("pdl", False))
            lora_meta.LORA_BGMV = bool(v.get("bgmv", False))
            lora_meta.LORA_BGMV_MAX_TOKENS = v.get("bgmv_max_tokens", 32)
            lora_meta.LORA_PREFETCH = v.get("prefetch", "")
            lora_expand_stream.STREAM_B_AHEAD = v.get("b_ahead")
            lora_expand_stream.STREAM_Y_AHEAD = v.get("y_ahead")
            lora_expand_stream.STREAM_SLOTS = v.get("slots")
            from loraserve.kernels import lora_shrink_bgmv

            lora_shrink_bgmv.BGMV_TARGET_SPLIT = v.get("bgmv_split", 4)
            lora_shrink_bgmv.BGMV_BLOCK_K = v.get("bgmv_block_k")
            lora_shrink_bgmv.BGMV_WIDE_BLOCK_K = v.get("bgmv_wide_block_k", 0)
            lora_expand_stream.STREAM_PIPE_MIN_BLOCKS = v.get("pipe_min_blocks", 0)
            importlib.import_module("loraserve.kernels.lora_expand").EXPAND_BGMV_MAX_SLICES = v.get("xb_max_slices", 1)
            lora_expand_stream.STREAM_BLOCK_N = v.get("stream_block_n", 0)
            lora_meta.LORA_BGMV_MAX_RANK = v.get("bgmv_max_rank", 64)
            lora_meta.LORA_GROUP_MAJOR = bool(v.get("group_major", False))
            lora_meta.LORA_SHRINK_K_MAJOR = bool(v.get("k_major", False))
            from loraserve.kernels import lora_expand_bgmv

            apply_exp = importlib.import_module("loraserve.kernels.lora_expand")  # the module
            apply_exp.EXPAND_BGMV = bool(v.get("expand_bgmv", False))
            lora_expand_bgmv.EXPAND_BGMV_BLOCK_N = v.get("xb_block_n", 512)
            lora_expand_bgmv.EXPAND_BGMV_WARPS = v.get("xb_warps", 0)
            lora_expand_bgmv.EXPAND_BGMV_PPS = v.get("xb_pps", 4)
            stream = bool(v.get("stream", True))
            from loraserve.kernels import lora_seg   # the segment-tiled pair for large steps: the process default
            lora_seg.SEG_ENABLED = bool(v.get("seg", _SEG_DEFAULT[0]))   # unless the variant says
            lora_seg.SEG_MIN_TOKENS = v.get("seg_min_tokens", _SEG_DEFAULT[1])
        lora_meta.LORA_STREAM = stream
        self.path, shape, _ = choose_path(self.x, self.lora_a[:self.L], self.lora_b[:self.L], self.meta)
        if tuple(self.ws.shape) != tuple(shape):
            self.ws = torch.empty(shape, device=self.x.device)
        self.variant = stream

    def ab(self, i: int):
        return self.lora_a[i * self.L:(i + 1) * self.L], self.lora_b[i * self.L:(i + 1) * self.L]

    def calls(self, kind: str, cfg: dict | None = None, shrink_cfg: dict | None = None,
              expand_cfg: dict | None = None):
        def make(i: int):
            a, b = self.ab(i)
            if kind == "path":  # what the engine runs
                return lambda: lora_apply(self.x, self.y, a, b, self.offsets, self.meta, self.ranks, self.ws)
            if kind == "shrink_only" and self.path == "dense":  # the dense shrink, every token x every slot
                from loraserve.kernels.lora_apply import DENSE_MODE
                from loraserve.kernels.lora_shrink_dense import lora_shrink_dense

                return lambda: lora_shrink_dense(self.x, a, self.ws, self.meta.token_slot, backend=DENSE_MODE)
            if kind == "shrink_only" and self.path == "seg":   # the segment-tiled shrink (lora_seg.py)
                from loraserve.kernels.lora_seg import lora_seg_shrink

                return lambda: lora_seg_shrink(self.x, a, self.meta, self.ranks, self.ws)
            if kind == "expand_only" and cfg is None and self.path in ("dense", "partials", "reduced", "seg"):
                from loraserve.kernels.lora_apply import _expand   # lora_apply's own expand half (dense or not)

                return lambda: _expand(self.ws, self.y, b, self.offsets, self.meta, self.ranks, None, None, self.path)
            if kind == "shrink_only":  # lora_apply's first launch(es), into its workspace
                return lambda: lora_shrink(self.x, a, self.meta, self.ranks, self.ws)
            if kind == "expand_only":  # lora_apply's expand from its workspace (streaming: cfg overrides)
                return lambda: lora_expand(self.ws, b, self.offsets, self.meta, self.ranks, self.y, config=cfg)
            if kind == "fused":
                plan = fused_plan(self.T, self.L, self.meta.block_m, a.shape[2], self.H, self.N, self.S,
                                  self.x.device, **(cfg or {}))
                if plan is None:
                    raise ValueError("fused kernel does not apply")
                ws = torch.empty(plan["SPLIT_K"], self.S, self.T, a.shape[2], device=self.x.device)
                return lambda: lora_shrink_expand(self.x, a, b, self.offsets, self.meta, self.ranks, self.y, ws,
                                                  plan=plan)
            if kind == "onelaunch":  # lora_onelaunch with plan overrides (sweeps)
                from loraserve.kernels.lora_onelaunch import lora_onelaunch

                return lambda: lora_onelaunch(self.x, a, b, self.offsets, self.meta, self.ranks, self.y, config=cfg)
            if kind == "2launch":
                sk = (shrink_cfg or {}).get("SPLIT_K") or shrink_split_k(
                    self.x, a, self.meta.block_m, self.meta.grid_tiles, False if (shrink_cfg or expand_cfg) else None)
                ws = torch.empty(sk, self.S, self.T, a.shape[2], device=self.x.device)

                classic = False if (shrink_cfg or expand_cfg) else None  # the sweeps tune classic configs

                def run():
                    lora_shrink(self.x, a, self.meta, self.ranks, ws, config=shrink_cfg, stream=classic)
                    lora_expand(ws, b, self.offsets, self.meta, self.ranks, self.y, config=expand_cfg,
                                stream=classic)
                return run
            if kind == "3launch":  # the previous path: shrink, torch.sum of split-K partials, expand
                def run():  # classic kernels and configs
                    lora_shrink(self.x, a, self.meta, self.ranks, self.buf3, config=shrink_cfg, stream=False)
                    lora_expand(self.buf3, b, self.offsets, self.meta, self.ranks, self.y, config=expand_cfg,
                                stream=False)
                return run
            raise ValueError(kind)
        return [make(i) for i in range(self.num_sets)]

    def time(self, kind: str = "path", **kw) -> float:
        if not self.x.is_cuda:  # --smoke (interpreter): run once, a logic check, not a timing
            t0 = time.perf_counter()
            for f in self.calls(kind, **kw):
                f()
            return (time.perf_counter() - t0) * 1e6
        return graph_us(self.calls(kind, **kw))


def base_layer_us(num_tokens: int) -> float:
    """The 4 base GEMMs of one Llama-3-8B layer (F.linear, bf16), weights cycled from HBM."""
    copies = 2  # 2 x 436 MB: each replay reads weights from HBM
    ws = [[torch.randn(sum(w), h, device="cuda", dtype=torch.bfloat16) / h ** .5 for h, w in PROJECTIONS.values()]
          for _ in range(copies)]
    xs = [torch.randn(num_tokens, h, device="cuda", dtype=torch.bfloat16) for h, _ in PROJECTIONS.values()]
    calls = [lambda c=c: [F.linear(x, w) for x, w in zip(xs, ws[c])] for c in range(copies)]
    us = graph_us(calls)
    ws = None  # free the weight copies (the lambdas close over ws)
    return us


def layer_lora_us(num_tokens: int, num_adapters: int, rank: int, kind: str = "path") -> tuple[float, dict]:
    """LoRA on all 4 fused projections of one layer; returns (total us, us per projection)."""
    per = {p: Case(p, rank, num_adapters, num_tokens).time(kind) for p in PROJECTIONS}
    return sum(per.values()), per


def sweep_shapes(smoke: bool) -> list[tuple[str, int, int, int]]:
    tokens = [1, 16, 256] if smoke else [1, 4, 16, 64, 256, 1024]
    adapters = [1, 4] if smoke else [1, 4, 16, 32]
    return [(p, r, L, T) for p in PROJECTIONS for r in (16, 64) for L in adapters for T in tokens if L <= T]


def shape_bytes(proj: str, rank: int, L: int, T: int) -> int:
    hidden, widths = PROJECTIONS[proj]
    S, N = len(widths), sum(widths)
    return L * (S * rank * hidden + N * rank) * 2 + T * hidden * 2 + 2 * T * N * 2


def metrics(bw: float, with_before: bool = True, max_shapes: int | None = None) -> dict:
    """The three targets with lora_apply's defaults; max_shapes: time only that many of the >= 32 MB
    shapes, evenly spread over the sweep's order (the median is then over those)."""
    out = {"copy_bw_gbs": bw}
    base = base_layer_us(64)
    lora, per = layer_lora_us(64, 32, 16)
    out.update(base_layer_gemm_us_64tok=base, lora_layer_us=lora, lora_layer_over_base=lora / base,
               lora_layer_us_per_proj=per)
    print(f"layer, 64 tokens / 32 adapters / rank 16: LoRA {lora:.1f} us (per proj "
          + ", ".join(f"{p} {u:.1f}" for p, u in per.items()) + f") / base GEMMs {base:.1f} us "
          f"= {lora / base:.3f} (target <= 0.35)", flush=True)
    if with_before:
        before, per_b = layer_lora_us(64, 32, 16, "3launch")
        out.update(lora_layer_over_base_3launch=before / base)
        print(f"  before (3 launches): {before:.1f} us = {before / base:.3f}; per proj "
              + ", ".join(f"{p} {u:.1f}" for p, u in per_b.items()), flush=True)
    cases = {p: Case(p, 16, 1, 1) for p in PROJECTIONS}
    one = {p: c.time() for p, c in cases.items()}
    out.update(lora_1tok_us_per_proj=statistics.median(one.values()), lora_1tok_us=one,
               lora_1tok_paths={p: c.path for p, c in cases.items()}, fused_barrier_fits=list(_FITS.values()))
    print(f"1-token paths: {out['lora_1tok_paths']}; barrier fits: {out['fused_barrier_fits']}", flush=True)
    one64 = {p: Case(p, 16, 1, 1, max_rank=64).time() for p in PROJECTIONS}
    out.update(lora_1tok_us_rank16_in_rank64_slots=one64)
    print("1 token, rank 16: " + ", ".join(f"{p} {u:.1f}" for p, u in one.items())
          + f" us; median {out['lora_1tok_us_per_proj']:.1f} (target <= 5); in max-rank-64 slots: "
          + ", ".join(f"{p} {u:.1f}" for p, u in one64.items()), flush=True)
    if with_before:
        b1 = {p: Case(p, 16, 1, 1).time("3launch") for p in PROJECTIONS}
        out.update(lora_1tok_us_per_proj_3launch=statistics.median(b1.values()))
        print("  before (3 launches): " + ", ".join(f"{p} {u:.1f}" for p, u in b1.items()), flush=True)
    fracs, rows = [], []
    big = [sh for sh in sweep_shapes(False) if shape_bytes(*sh) >= 32e6]
    if max_shapes and len(big) > max_shapes > 1:
        big = [big[round(i * (len(big) - 1) / (max_shapes - 1))] for i in range(max_shapes)]
    for proj, r, L, T in big:
        c = Case(proj, r, L, T)
        us = c.time()
        frac = c.bytes / (us * 1e-6) / 1e9 / bw
        fracs.append(frac)
        rows.append(dict(proj=proj, rank=r, loras=L, tokens=T, us=us, mb=c.bytes / 1e6, bw_fraction=frac,
                         path=c.path))
        print(f"  >=32MB {proj:8s} r{r:<3d} L{L:<3d} T{T:<5d} {us:8.1f} us {c.bytes / 1e6:7.1f} MB "
              f"{frac:6.3f} of copy ({c.path})", flush=True)
        del c
    out.update(lora_32mb_bw_fraction_median=statistics.median(fracs), lora_32mb_shapes=rows)
    print(f"shapes >= 32 MB: median {out['lora_32mb_bw_fraction_median']:.3f} of copy bandwidth "
          f"({bw:.0f} GB/s), {len(fracs)} shapes (target >= 0.6)", flush=True)
    return out


def sweep_fused() -> None:
    """Fused one-launch kernel (block sizes) and the paths against each other at small steps."""
    print("\nsweep-fused: us per projection; fused = one launch with the grid barrier")
    for proj in PROJECTIONS:
        c = Case(proj, 16, 1, 1)
        cells = []
        for bn in (64, 128, 256):
            for bk in (64, 128, 256):
                try:
                    cells.append(f"n{bn}/k{bk}={c.time('fused', cfg=dict(block_n=bn, block_k=bk)):.1f}")
                except ValueError:
                    cells.append(f"n{bn}/k{bk}=n/a")
        print(f"{proj} r16 T1: " + " ".join(cells), flush=True)
    for proj in PROJECTIONS:
        for r in (16, 64):
            for T, L in ((1, 1), (4, 4), (16, 1), (16, 16), (64, 4), (64, 32)):
                c = Case(proj, r, L, T)
                cells = [f"path({c.path})={c.time():.1f}"]
                for kind in ("fused", "2launch", "3launch"):
                    try:
                        cells.append(f"{kind}={c.time(kind):.1f}")
                    except ValueError:
                        cells.append(f"{kind}=n/a")
                print(f"{proj} r{r} T{T} L{L}: " + " ".join(cells), flush=True)
    print(f"barrier fits (grid, config) -> {list(_FITS.values())}", flush=True)


def sweep_layer() -> None:
    """Kernel configs for the 64-token / 32-adapter / rank-16 layer case, shrink and expand alone."""
    print("\nsweep-layer: 64 tokens, 32 adapters, rank 16; us per projection")
    for proj in PROJECTIONS:
        c = Case(proj, 16, 32, 64)
        cells = [f"path={c.time():.1f}"]
        for sk in (1, 4, 8, 16):
            for bk in (64, 128, 256):
                if bk * sk > c.H:
                    continue
                cells.append(f"sk{sk}/bk{bk}={c.time('2launch', shrink_cfg=dict(SPLIT_K=sk, BLOCK_K=bk)):.1f}")
        for ecfg in (dict(BLOCK_N=64), dict(BLOCK_N=256), dict(BLOCK_N=256, num_warps=8), dict(num_stages=2)):
            cells.append(f"exp{ecfg}={c.time('2launch', expand_cfg=ecfg):.1f}")
        print(f"{proj}: " + " ".join(cells), flush=True)


def table(bw: float, smoke: bool) -> None:
    print(f"\n{'proj':8s} {'rank':>4s} {'loras':>5s} {'tokens':>6s} {'path_us':>8s} {'3launch':>8s} "
          f"{'MB':>7s} {'GB/s':>7s} {'frac':>6s}")
    for proj, r, L, T in sweep_shapes(smoke):
        c = Case(proj, r, L, T, device="cpu" if smoke else "cuda", smoke=smoke)
        if smoke:
            t0 = time.perf_counter()
            kinds = ["path", "2launch", "3launch"] + (["fused"] if c.path == "fused" else [])
            for f in [f for k in kinds for f in c.calls(k)]:
                f()
            print(f"{proj:8s} {r:4d} {L:5d} {T:6d} ran in {time.perf_counter() - t0:.2f} s", flush=True)
            continue
        us, us3 = c.time(), c.time("3launch")
        gbs = c.bytes / (us * 1e-6) / 1e9
        print(f"{proj:8s} {r:4d} {L:5d} {T:6d} {us:8.1f} {us3:8.1f} {c.bytes / 1e6:7.2f} {gbs:7.0f} "
              f"{gbs / bw:6.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--table", action="store_true", help="also the full per-shape table")
    ap.add_argument("--sweep-fused", action="store_true", help="fused-kernel configs and cross-over")
    ap.add_argument("--sweep-layer", action="store_true", help="configs for the 64-token layer case")
    ap.add_argument("--no-before", action="store_true", help="skip timing the previous 3-launch path")
    ap.add_argument("--json", help="write the metrics here")
    ap.add_argument("--only-sweeps", action="store_true", help="skip the metrics, run the sweeps asked for")
    ap.add_argument("--fused", action="store_true",
                    help="let lora_apply take the one-launch fused kernel (as LORASERVE_LORA_FUSED=1)")
    ap.add_argument("--compare", action="store_true",
                    help="classic vs streaming kernels (LORASERVE_LORA_STREAM=0/1) on the targets, one run")
    ap.add_argument("--sweep-stream", action="store_true", help="streaming shrink / expand knobs (layer case, 1 token)")
    ap.add_argument("--max-shapes", type=int, default=None,
                    help="at most this many >= 32 MB shapes, evenly spread (default all 51; with --compare 0: none)")
    ap.add_argument("--shapes", default=None,
                    help="with --compare: exactly these extra shapes, proj:rank:adapters:tokens,... (e.g. "
                         "gate_up:16:1:256); their bytes fraction is printed whatever their size")
    ap.add_argument("--big-only", action="store_true",
                    help="with --compare: only the >= 32 MB (or --shapes) shapes, no layer / 1-token / idle cases")
    ap.add_argument("--variants", default="classic,stream",
                    help="with --compare: comma-separated lora_variants.VARIANTS, the first is the reference")
    ap.add_argument("--sweep-onelaunch", action="store_true", help="one-launch kernel plan knobs (layer, 1 token)")
    ap.add_argument("--sweep-bgmv", action="store_true", help="BGMV shrink / expand prefetch knobs (layer case)")
    ap.add_argument("--sweep-xbgmv", action="store_true", help="the BGMV expand's tile knobs alone (layer case)")
    ap.add_argument("--sweep-budget", type=float, default=None, help="seconds for each --sweep-* (then stop)")
    ap.add_argument("--overlap-layer", action="store_true",
                    help="one layer's base GEMMs + LoRA through LoRABatch.linear: sequential vs the side-stream "
                         "overlap modes (benchmarks/lora_layer_overlap.py), before anything else asked for")
    args = ap.parse_args()
    from benchmarks.lora_variants import compare, sweep_bgmv, sweep_onelaunch, sweep_stream, sweep_xbgmv   # sweeps

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    shapes_only = None
    if args.shapes:
        shapes_only = [(p, int(r), int(L), int(T)) for p, r, L, T in (sh.split(":") for sh in args.shapes.split(","))]

    if args.fused:
        import importlib

        importlib.import_module("loraserve.kernels.lora_apply").FUSED_ENABLED = True  # the module
    if args.overlap_layer:
        from benchmarks.lora_layer_overlap import overlap_layer

        ov = overlap_layer(smoke=args.smoke)
        if not (args.compare or args.only_sweeps or args.json is None):
            with open(args.json, "w") as f:
                json.dump(ov, f, indent=1)
        if args.smoke or not args.compare:
            return
    if args.smoke:
        if args.compare:
            compare(float("nan"), 3 if args.max_shapes is None else args.max_shapes, smoke=True, variants=variants,
                    shapes_only=shapes_only, big_only=args.big_only)
            if args.sweep_stream:
                sweep_stream(smoke=True, budget_s=args.sweep_budget)
            if args.sweep_onelaunch:
                sweep_onelaunch(smoke=True, budget_s=args.sweep_budget)
            if args.sweep_bgmv:
                sweep_bgmv(smoke=True, budget_s=args.sweep_budget)
            if args.sweep_xbgmv:
                sweep_xbgmv(smoke=True, budget_s=args.sweep_budget)
            return
        if args.only_sweeps and args.sweep_xbgmv:
            sweep_xbgmv(smoke=True, budget_s=args.sweep_budget)
            return
        table(float("nan"), smoke=True)
        return
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth (read+write) {bw:.0f} GB/s", flush=True)
    if args.compare:
        res = compare(bw, args.max_shapes, variants=variants, shapes_only=shapes_only, big_only=args.big_only)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        if args.sweep_onelaunch:
            sweep_onelaunch(budget_s=args.sweep_budget)
        if args.sweep_stream:
            sweep_stream(budget_s=args.sweep_budget)
        if args.sweep_bgmv:
            sweep_bgmv(budget_s=args.sweep_budget)
        if args.sweep_xbgmv:
            sweep_xbgmv(budget_s=args.sweep_budget)
        return
    if args.sweep_xbgmv and args.only_sweeps:
        sweep_xbgmv(budget_s=args.sweep_budget)
        return
    if args.sweep_onelaunch and args.only_sweeps:
        sweep_onelaunch(budget_s=args.sweep_budget)
        return
    if args.sweep_bgmv and args.only_sweeps:
        sweep_bgmv(budget_s=args.sweep_budget)
        return
    if args.sweep_stream and args.only_sweeps:
        sweep_stream(budget_s=args.sweep_budget)
        return
    if args.only_sweeps:
        if args.sweep_fused:
            sweep_fused()
        if args.sweep_layer:
            sweep_layer()
        return
    res = metrics(bw, with_before=not args.no_before, max_shapes=args.max_shapes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.sweep_fused:
        sweep_fused()
    if args.sweep_layer:
        sweep_layer()
    if args.table:
        table(bw, smoke=False)
    print("\nSUMMARY  lora_layer_over_base {:.3f} (<= 0.35)  lora_1tok_us_per_proj {:.2f} (<= 5)  "
          "lora_32mb_bw_fraction_median {:.3f} (>= 0.6)  copy {:.0f} GB/s  base layer GEMMs {:.1f} us".format(
              res["lora_layer_over_base"], res["lora_1tok_us_per_proj"], res["lora_32mb_bw_fraction_median"],
              bw, res["base_layer_gemm_us_64tok"]))


if __name__ == "__main__":
    main()
