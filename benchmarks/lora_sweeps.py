"""Knob sweeps of the multi-LoRA kernels (`bench_lora_kernels.py --sweep-onelaunch / --sweep-stream / --sweep-bgmv /
--sweep-xbgmv`, each with --sweep-budget): us per projection at the 64-token / 32-adapter / rank-16 layer case (and 1
token where noted), one config per cell, errors reported in place. Split out of lora_variants.py (files under ~500
lines); lora_variants re-exports them."""
from __future__ import annotations

import time

import torch

from benchmarks.bench_lora_kernels import Case
from benchmarks.lora_variants import DEFAULT, VARIANTS


SHORT = dict(shrink_per_sm="s", expand_per_sm="e", block_k="bk", block_n="bn", num_warps="w", num_stages="st")


def sweep_onelaunch(smoke: bool = False, budget_s: float | None = None) -> None:
    """lora_onelaunch plan knobs, us per projection: shrink programs per SM (SPLIT_K) x expand
    programs per SM (column groups), then BLOCK_K / BLOCK_N / warps at the default split, on
    the 64-token / 32-adapter layer case and at 1 token. Stops starting new rows after budget_s
    seconds (most telling rows first)."""
    print("\nsweep-onelaunch: rank 16; s = shrink programs/SM, e = expand programs/SM", flush=True)
    t0 = time.perf_counter()
    grid = [dict(shrink_per_sm=s, expand_per_sm=e) for s in (0.5, 1, 2, 4) for e in (2, 4, 8)]
    grid += [dict(block_k=128), dict(block_k=256), dict(block_n=64), dict(num_warps=8), dict(num_stages=4)]
    rows = [(label, L, T, proj) for proj in ("gate_up", "qkv", "down", "o")
            for label, L, T in (("layer", 32, 64), ("1tok", 1, 1))]
    for label, L, T, proj in rows:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            print(f"sweep-onelaunch: budget of {budget_s:.0f} s spent; rows left out from {label} {proj}", flush=True)
            break
        c = Case(proj, 16, 4, 16, "cpu", smoke=True) if smoke else Case(proj, 16, L, T)
        cells = []
        for cfg in grid:
            key = ",".join(f"{SHORT[k]}{v}" for k, v in cfg.items())
            try:
                cells.append(f"{key}:{c.time('onelaunch', cfg=cfg):.1f}")
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile: report, go on
                cells.append(f"{key}:ERR({type(exc).__name__})")
        print(f"{label} {proj}: " + " ".join(cells) + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        del c


def _time_calls(c: Case, calls: list) -> float:
    if not c.x.is_cuda:  # --smoke: run once (a logic check)
        t0 = time.perf_counter()
        for f in calls:
            f()
        return (time.perf_counter() - t0) * 1e6
    from benchmarks.bench_lora_kernels import graph_us

    return graph_us(calls)


def sweep_stream(smoke: bool = False, budget_s: float | None = None) -> None:
    """Streaming-path knobs, each kernel alone (us per projection), rank 16, on the 64-token /
    32-adapter layer case and at 1 token: the expand's programs per SM (column groups per tile) x
    BLOCK_N, and the shrink's SPLIT_K x BLOCK_K x num_stages. Stops starting new rows after
    budget_s seconds."""
    from loraserve.kernels.lora_expand_stream import stream_expand_config
    from loraserve.kernels.lora_shrink import lora_shrink

    print("\nsweep-stream: rank 16; streaming kernels alone, us per projection; exp pP/nN = P programs/SM, "
          "BLOCK_N; shr skS/bkK/stG = SPLIT_K, BLOCK_K, num_stages", flush=True)
    t0 = time.perf_counter()
    rows = [(label, L, T, proj) for proj in ("gate_up", "qkv", "down", "o")
            for label, L, T in (("layer", 32, 64), ("1tok", 1, 1))]
    shrink_cfgs = {"layer": [(2, 256, 4), (4, 256, 4), (8, 256, 4), (4, 512, 3), (8, 128, 4), (4, 256, 6),
                             (16, 128, 4), (4, 128, 6)],
                   "1tok": [(8, 128, 4), (16, 128, 4), (32, 128, 4), (16, 256, 3), (32, 64, 4), (64, 64, 3)]}
    for label, L, T, proj in rows:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            print(f"sweep-stream: budget of {budget_s:.0f} s spent; rows left out from {label} {proj}", flush=True)
            break
        c = Case(proj, 16, 4, 16, "cpu", smoke=True) if smoke else Case(proj, 16, L, T)
        c.use_variant(True)
        c.calls("shrink_only")[0]()  # real partials in the workspace (not uninitialised memory)
        SK, S, T_, R = c.ws.shape
        cells = [f"exp default(SK{SK})={c.time('expand_only'):.1f}"]
        expand_cfgs = [(p, n, 2) for p in ((2, 4, 8) if label == "layer" else (4,)) for n in (64, 128, 256)]
        expand_cfgs += [(4, 128, 3), (4, 256, 3)] + ([(8, 128, 3)] if label == "layer" else [])
        for per_sm, bn, ahead in expand_cfgs:
            base = stream_expand_config(T_, c.N, R, S, c.meta.block_m, c.meta.grid_tiles, SK)
            blocks = -(-c.N // bn)
            groups = max(1, min(blocks, round(per_sm * 132 / c.meta.grid_tiles)))
            cfg = dict(BLOCK_N=bn, COLS_PER_PROG=-(-blocks // groups) * bn, B_AHEAD=ahead,
                       num_warps=4 if c.meta.block_m * bn <= 2048 else 8, SK_CHUNK=base["SK_CHUNK"])
            key = f"p{per_sm}/n{bn}" + ("/a3" if ahead == 3 else "")
            try:
                cells.append(f"{key}={c.time('expand_only', cfg=cfg):.1f}")
            except Exception as exc:  # noqa: BLE001 - report, go on
                cells.append(f"{key}=ERR({type(exc).__name__})")
        cells.append(f"| shr default={c.time('shrink_only'):.1f}")
        for sk, bk, st in shrink_cfgs[label]:
            if smoke:
                sk, bk = min(sk, 2), min(bk, 32)
            if bk * sk > c.H:
                continue
            ws = torch.empty(sk, S, T_, R, device=c.x.device)
            cfg = dict(BLOCK_K=bk, num_stages=st)
            calls = [lambda a=c.ab(i)[0], ws=ws, cfg=cfg: lora_shrink(c.x, a, c.meta, c.ranks, ws, config=cfg, stream=True)
                     for i in range(c.num_sets)]
            try:
                cells.append(f"sk{sk}/bk{bk}/st{st}={_time_calls(c, calls):.1f}")
            except Exception as exc:  # noqa: BLE001 - a config that does not compile: report, go on
                cells.append(f"sk{sk}/bk{bk}/st{st}=ERR({type(exc).__name__})")
        print(f"{label} {proj}: " + " ".join(cells) + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        del c


def sweep_bgmv(smoke: bool = False, budget_s: float | None = None) -> None:
    """Streaming-expand tile knobs, the kernel alone (us per projection), on the 64-token / 32-adapter /
    rank-16 layer case from the default shrink's partials: BLOCK_N x warps x programs per SM x B / y
    blocks ahead (the first probe found B / y depth and programs per SM flat for gate_up: 17.9-24.6 us).
    Stops starting new rows after budget_s seconds."""
    from loraserve.kernels.lora_expand_stream import stream_expand_config

    print("\nsweep-expand: layer case, rank 16, expand alone (Triton-pipelined column loop), us per projection; "
          "nN/wW/pP/stS = BLOCK_N, warps, programs per SM, stages", flush=True)
    t0 = time.perf_counter()
    for proj in ("gate_up", "qkv", "down", "o"):
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            print(f"sweep-expand: budget of {budget_s:.0f} s spent; rows left out from {proj}", flush=True)
            break
        c = Case(proj, 16, 4, 16, "cpu", smoke=True) if smoke else Case(proj, 16, 32, 64)
        c.use_variant(VARIANTS["prev"])
        c.calls("shrink_only")[0]()  # real partials in the workspace
        SK, S, T_, R = c.ws.shape
        cells = [f"default(SK{SK})={c.time('expand_only'):.1f}"]
        for bn, w, per_sm, ba, ya in ((128, 4, 4, 0, -4), (128, 4, 8, 0, -4), (128, 4, 2, 0, -4), (256, 8, 4, 0, -4),
                                      (256, 4, 4, 0, -3), (64, 4, 8, 0, -6), (64, 2, 8, 0, -4), (128, 4, 4, 0, -8),
                                      (128, 2, 6, 0, -4)):
            if smoke:
                bn = min(bn, 32)
            base = stream_expand_config(T_, c.N, R, S, c.meta.block_m, c.meta.grid_tiles, SK)
            blocks = -(-c.N // bn)
            groups = max(1, min(blocks, round(per_sm * 132 / c.meta.grid_tiles)))
            cfg = dict(base, BLOCK_N=bn, num_warps=w, COLS_PER_PROG=-(-blocks // groups) * bn, B_AHEAD=2,
                       Y_AHEAD=1, SLOTS=ya)
            key = f"n{bn}/w{w}/p{per_sm}/st{-ya}"
            try:
                cells.append(f"{key}={c.time('expand_only', cfg=cfg):.1f}")
            except Exception as exc:  # noqa: BLE001 - report, go on
                cells.append(f"{key}=ERR({type(exc).__name__})")
        print(f"layer {proj}: " + " ".join(cells) + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        c.use_variant(DEFAULT)
        del c


def sweep_xbgmv(smoke: bool = False, budget_s: float | None = None) -> None:
    """The BGMV expand alone (us per projection) on the 64-token / 32-adapter / rank-16 layer case, from the default
    shrink's partials: BLOCK_N x warps x programs per SM, next to the streaming expand and to a device copy of the
    same bytes (B of the 32 adapters + y read and written: what the expand must move, as one torch copy)."""
    from benchmarks.bench_lora_kernels import graph_us
    from loraserve.kernels.lora_expand_bgmv import expand_bgmv_config, lora_expand_bgmv

    print("\nsweep-xbgmv: layer case, rank 16, expands alone (us); nN/wW/pP = BLOCK_N, warps, programs per SM",
          flush=True)
    t0 = time.perf_counter()
    for proj in ("gate_up", "qkv", "o", "down"):
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            print(f"sweep-xbgmv: budget of {budget_s:.0f} s spent; rows left out from {proj}", flush=True)
            break
        c = Case(proj, 16, 4, 16, "cpu", smoke=True) if smoke else Case(proj, 16, 32, 64)
        c.use_variant(VARIANTS["noxbgmv"])
        c.calls("shrink_only")[0]()  # real partials in the workspace
        cells = [f"stream={c.time('expand_only'):.1f}"]
        if not smoke:  # references: the B bytes the expand must read, read by torch (a sum) and copied
            nbytes = c.L * c.N * 16 * 2
            cells.append(f"sumB{nbytes / 1e6:.0f}MB=" + f"{graph_us([lambda i=i: c.ab(i)[1].sum(dtype=torch.float32) for i in range(c.num_sets)]):.1f}")
            dst = torch.empty_like(c.ab(0)[1])
            cells.append(f"copyB={graph_us([lambda i=i: dst.copy_(c.ab(i)[1]) for i in range(c.num_sets)]):.1f}")
            del dst
        print(f"layer {proj}: " + " ".join(cells) + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        SK, S, T_, R = c.ws.shape
        for bn, w, pps in ((512, 8, 4), (1024, 8, 4), (512, 16, 4), (256, 4, 4), (512, 8, 2), (256, 4, 8), (1024, 8, 2),
                           (512, 4, 4), (256, 8, 4), (128, 4, 8)):
            if smoke:
                bn = min(bn, 32)
            base = expand_bgmv_config(c.N, R, c.meta.grid_tiles)
            blocks = -(-c.N // bn)
            groups = max(1, min(blocks, round(pps * 132 / c.meta.grid_tiles)))
            cfg = dict(BLOCK_N=bn, BLOCK_R=base["BLOCK_R"], num_warps=w, COLS_PER_PROG=-(-blocks // groups) * bn)
            key = f"n{bn}/w{w}/p{pps}"
            try:
                calls = [lambda i=i, cfg=cfg: lora_expand_bgmv(c.ws, c.ab(i)[1], c.offsets, c.meta, c.ranks, c.y,
                                                             config=cfg) for i in range(c.num_sets)]
                cell = f"{key}={_time_calls(c, calls):.1f}"
            except Exception as exc:  # noqa: BLE001 - report, go on
                cell = f"{key}=ERR({type(exc).__name__})"
            cells.append(cell)
            print(f"  {proj} {cell}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        c.use_variant(DEFAULT)
        del c
