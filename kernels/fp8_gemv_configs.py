"""Tile configs of the FP8 decode GEMV kernels (kernels/fp8_gemv.py): the table measured on the H200 per
(M bucket, N, K) for the Llama-3-8B projections (benchmarks/fp8_gemv_sweep.py), a heuristic for other shapes,
and LORASERVE_FP8_GEMV_CONFIGS (a sweep's --configs-out) to override the table on another GPU."""
from __future__ import annotations

import json
import logging
import os

import torch
from torch import Tensor

from ._triton import triton

# (kind, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages[, pdl]); kind: "gemv" (BLOCK_M 1/2/4), "gemv2" /
# "gemv4" (BLOCK_M 1; 2 / 4 groups of BLOCK_N weight rows share each x load), "dot" (bf16 operands),
# "dot16" (fp16 operands) or "dot8" (W8A8: x quantized per token to e4m3 first, as _scaled_mm does).
# For gemv, num_stages is the number of weight tiles held in registers (2: the next one prefetched).
GemvConfig = tuple   # (str, int, int, int, int, int, int) or with a trailing bool: pdl
# "dot8f" is dot8 with the FP8 MMA accumulating over all of K in its reduced precision (measurements only); "dot8b"
# quantizes x inside the GEMM, one scale per (token, BLOCK_K block): no quantization launch (LORASERVE_FP8_W8A8).
# "tw" / "twf": per-token quantization, cuBLASLt's tensor-wise FP8 GEMM (unit scales; twf: fast accumulation), then the
# scales by one launch (kernels/fp8_gemm.py scaled_mm_tensorwise): not Triton tiles, only the kind is read.
# "gemvh2" / "gemvh4": gemv2 / gemv4 with fp16 products summed over num_stages (FLUSH) K tiles before the fp32
# accumulator (kernels/fp8_gemv.py _fp8_gemv_half_kernel; about a third fewer instructions per weight byte).
KINDS = ("gemv", "gemv2", "gemv4", "dot", "dot16", "dot8", "dot8f", "dot8b", "tw", "twf", "gemvh2", "gemvh4", "dot8p")
# "dot8p": dot8's per-token W8A8 in persistent programs that walk (N tile, K split) units with the K loop flattened
# (kernels/fp8_stream_dot.py; no bias; K a multiple of SPLIT x BLOCK_K, else dot8)
X16_SCALE = 0.0625   # dot16: x * 2^-4 into fp16 (exact), the accumulator divided by it (exact) after the K loop

# Measured best per (M bucket, N, K): H200, final run 2026-11-30 12:13 (benchmarks/fp8_gemv_sweep.py, CUDA-graph
# timings; benchmarks/results/fp8_gemv_sweep_h200.json, kernels/PERF_NOTES.md); the 8B decode figures in
# benchmarks/results/fp8_h200.json ran these configs. Buckets 2 and 8 take the measured 4 / 16 entries. Other
# shapes (other models, tensor-parallel shards): heuristic_config. Bucket 64 is W8A8 (dot8, x per token in e4m3,
# the numerics of _scaled_mm): that sweep's dot8 rows, one layer's four GEMMs 96.1 us against _scaled_mm's 124.1
# and bf16's 127.2 (the weight-only forms took 137).
_LLAMA3_8B = {
    # (N, K): {M bucket: config}
    (6144, 4096): {1: ("gemv", 1, 4, 512, 1, 4, 1), 4: ("dot16", 16, 64, 128, 4, 2, 3),
                   16: ("dot16", 16, 64, 128, 4, 2, 3), 32: ("dot16", 32, 64, 128, 4, 4, 3, True),
                   64: ("tw", 64, 128, 128, 4, 4, 3, True)},
    (4096, 4096): {1: ("gemv", 1, 4, 512, 1, 4, 1), 4: ("dot16", 16, 64, 128, 4, 2, 3),
                   16: ("dot16", 16, 64, 128, 4, 2, 3), 32: ("dot16", 32, 64, 128, 4, 4, 3, True),
                   64: ("tw", 64, 64, 128, 4, 4, 3)},
    (28672, 4096): {1: ("gemv2", 1, 4, 512, 1, 4, 1), 4: ("dot16", 16, 64, 128, 1, 2, 3),
                    16: ("dot16", 16, 64, 128, 1, 2, 3), 32: ("dot16", 32, 64, 128, 2, 4, 3, True),
                    64: ("dot8", 64, 64, 128, 1, 4, 3)},
    (4096, 14336): {1: ("gemv2", 1, 4, 512, 2, 4, 1, True), 4: ("dot16", 16, 64, 128, 8, 2, 3),
                    16: ("dot16", 16, 64, 128, 8, 2, 3), 32: ("dot16", 32, 64, 128, 4, 4, 3, True),
                    64: ("tw", 64, 128, 128, 8, 4, 3, True)},
}
# Bucket 64 since the 2026-11-30 20:00 probe (fp8_gemv_sweep.py --w8a8 --ms 64, copy 4238 GB/s, us per GEMM incl. the
# quantization launch): cuBLASLt's tensor-wise FP8 GEMM + the scaling launch ("tw") beat the dot8 tiles on qkv (15.08 vs
# 15.80), o (12.05 vs 13.28) and down (27.85 vs 30.90), not on gate_up (43.89 vs 35.98): the same per-token W8A8
# numerics (max error vs the exact W8A8 result 2.4-2.8e-3 either way). The table's kinds serve LORASERVE_FP8_W8A8=auto
# (opt-in); the default 'token' runs the dot8 tiles everywhere (the tiles stay beside "tw" for it, and 'block' dot8b).
CONFIGS: dict[tuple[int, int, int], GemvConfig] = {
    (m, n, k): cfg for (n, k), by_m in _LLAMA3_8B.items() for m, cfg in {**by_m, 2: by_m[4], 8: by_m[16]}.items()}

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def m_bucket(M: int) -> int:
    """The smallest bucket >= M (CUDA-graph decode batches are these sizes); above 64: M itself."""
    for b in M_BUCKETS:
        if M <= b:
            return b
    return M


def auto_split(kind: str, bm: int, bn: int, bk: int, M: int, N: int, K: int, num_sms: int) -> int:
    """Split-K count: double while the grid stays under ~6 programs per SM (gemv: short programs, many
    resident) or ~4 (dot), keeping >= 2 K tiles per split. The H200 sweep (2026-11-30): gemv best at
    1024-1536 programs (o/qkv M=1: split 2 cost 10-20%), dot at 384-512 (a split past that cost 5-40%)."""
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    limit = (6 if kind.startswith("gemv") else 4) * num_sms
    split = 1
    while tiles * split * 2 <= limit and split < 32 and K >= 2 * split * 2 * bk:
        split *= 2
    return split


def heuristic_config(M: int, N: int, K: int, num_sms: int) -> GemvConfig:
    """For shapes the table lacks, from the H200 sweeps: M = 1 the CUDA-core GEMV with 4 x 512 weight tiles
    and no register prefetch (many small programs, more of them resident per SM; the prefetch cost 25-45%),
    M <= 32 the swap-AB tensor-core kernel on fp16 operands with 64-row weight tiles (at M = 4 it beat the
    4-row GEMV by 2x and the bf16-operand form by 10-25%), above it (M 33..64) W8A8 on FP8 tensor cores with
    64 x 128 weight tiles (dot8: x per token in e4m3; it beat _scaled_mm and every weight-only form on all four
    8B shapes at M = 64), and past 64 the bf16-operand form (64 x 64; the engine sends M > 64 to _scaled_mm)."""
    if M == 1:
        kind, bm, bn, bk, warps, stages = "gemv", 1, 4, 512, 4, 1
    elif M <= 32:
        kind, bm, bn, bk, warps, stages = "dot16", max(16, triton.next_power_of_2(M)), 64, 128, 4, 3
    elif M <= 64:
        kind, bm, bn, bk, warps, stages = "dot8", 64, 64, 128, 4, 3
    else:
        kind, bm, bn, bk, warps, stages = "dot", 64, 64, 64, 4, 3
    bk = min(bk, max(16, triton.next_power_of_2(K)))
    return kind, bm, bn, bk, auto_split(kind, bm, bn, bk, M, N, K, num_sms), warps, stages


_env_loaded = False
_OVERRIDDEN: set[tuple[int, int, int]] = set()   # (M bucket, N, K) that LORASERVE_FP8_GEMV_CONFIGS set: kept as given


def _load_env_configs() -> None:
    """LORASERVE_FP8_GEMV_CONFIGS=path.json (fp8_gemv_sweep.py --configs-out: {"M,N,K": config}) overrides
    the table, for tuning runs on another GPU."""
    global _env_loaded
    _env_loaded = True
    path = os.environ.get("LORASERVE_FP8_GEMV_CONFIGS", "").strip()
    if not path:
        return
    try:
        with open(path) as fh:
            table = {tuple(int(v) for v in key.split(",")): tuple(cfg) for key, cfg in json.load(fh).items()}
    except (OSError, ValueError) as err:   # a tuning aid: a bad file leaves the built-in table
        logging.getLogger(__name__).warning("LORASERVE_FP8_GEMV_CONFIGS=%s not read (%s)", path, err)
        return
    for (m, n, k), cfg in list(table.items()):   # buckets 2 and 8 from the measured 4 and 16, as the built-in table
        for bucket, source in ((2, 4), (8, 16)):
            if m == source and (bucket, n, k) not in table:
                table[(bucket, n, k)] = cfg
    CONFIGS.update(table)
    _OVERRIDDEN.update(table)


_TILE64_CACHE: dict[str, dict[tuple[int, int], GemvConfig]] = {}


def tile64_overrides() -> dict[tuple[int, int], GemvConfig]:
    """LORASERVE_FP8_TILE64="NxK=kind:bm:bn:bk:split:warps:stages[,...]": the 33..64-token bucket's config for those
    shapes (probes: read at each call, unlike LORASERVE_FP8_GEMV_CONFIGS, so one process can A/B tiles)."""
    raw = os.environ.get("LORASERVE_FP8_TILE64", "").strip()
    if raw not in _TILE64_CACHE:
        table = {}
        for item in filter(None, (p.strip() for p in raw.split(","))):
            try:
                shape, cfg = item.split("=")
                n, k = (int(v) for v in shape.lower().split("x"))
                kind, *nums = cfg.split(":")
                assert kind in KINDS and len(nums) == 6
                table[(n, k)] = (kind, *(int(v) for v in nums))
            except (ValueError, AssertionError):
                raise ValueError(f"LORASERVE_FP8_TILE64: bad item {item!r} (NxK=kind:bm:bn:bk:split:warps:stages)") \
                    from None
        _TILE64_CACHE[raw] = table
    return _TILE64_CACHE[raw]


def gemv_config(M: int, N: int, K: int, num_sms: int, weight_only: bool = False) -> GemvConfig:
    """The table's config for (M bucket, N, K), else the heuristic's. weight_only: never dot8 (x stays in
    bf16/fp16; where dot8 would serve, the bf16-operand tensor-core form with 64 x 64 tiles)."""
    if not _env_loaded:
        _load_env_configs()
    cfg = CONFIGS.get((m_bucket(M), N, K)) or heuristic_config(M, N, K, num_sms)
    if m_bucket(M) == 64 and (N, K) in tile64_overrides():
        cfg = tile64_overrides()[(N, K)]
    # any tile serves any M: the grid has cdiv(M, BLOCK_M) row tiles
    if weight_only and cfg[0] in W8A8_KINDS:
        bm, bk = max(16, triton.next_power_of_2(min(M, 64))), min(64, max(16, triton.next_power_of_2(K)))
        cfg = ("dot", bm, 64, bk, auto_split("dot", bm, 64, bk, M, N, K, num_sms), 4, 3)
    elif cfg[0] in W8A8_KINDS and w8a8_mode() != "auto":
        cfg = (_W8A8_KINDS[w8a8_mode()],) + tuple(cfg[1:])
    elif (M == 1 and cfg[0] in ("gemv", "gemv2", "gemv4") and (N, K) in _HALF_M1 and (1, N, K) not in _OVERRIDDEN
          and gemv_half_on()):
        cfg = _HALF_M1[(N, K)]
    return cfg


# M = 1 tiles of the fp16-product GEMV (gemvh, LORASERVE_FP8_GEMV_HALF) per (N, K), from the 2026-11-30 20:00 probe
# (fp8_gemv_sweep.py --gemvh --ms 1, us per GEMV): qkv 7.49 vs the fp32 gemv's 8.10, o 6.24 vs 7.35, gate_up 29.92 vs
# 32.13 (3.93 TB/s of weights, 0.93 of copy); down stays on the fp32 gemv2 (17.44; gemvh4 17.57): its input, the
# SiLU product, is the one activation that may pass gemvh's |x| < 9362. Shapes not here keep the fp32 kinds.
_HALF_M1: dict[tuple[int, int], GemvConfig] = {
    (6144, 4096): ("gemvh4", 1, 1, 512, 1, 1, 4),
    (4096, 4096): ("gemvh4", 1, 1, 512, 1, 2, 4),
    (28672, 4096): ("gemvh2", 1, 4, 512, 2, 4, 4),
    # the FP8 LM head (models/fp8_head.py), 128256 x 4096: probe 2 of 2026-11-30 20:30, 119.4 us vs the fp32 gemv's
    # 135.9 (its top 8 are rescored from the bf16 rows at <= 4 rows, so the argmax does not rest on fp16 products)
    (128256, 4096): ("gemvh2", 1, 4, 512, 2, 4, 4),
}


def gemv_half_on() -> bool:
    """LORASERVE_FP8_GEMV_HALF (default 1): single-token GEMVs of the shapes in _HALF_M1 with fp16 products (gemvh:
    fp16 partials over 4 K tiles, then fp32; x * 2^-8 in fp16, so |x| < 9362); 0: the fp32 CUDA-core kinds. On since
    the 2026-11-30 20:55 final (32-layer 8B engine in a child of its own: bs1 2.685 ms per step vs 2.799; the 20:30
    probe's device-side assert was the second-engine-in-one-process fault, PERF_NOTES "Known bug")."""
    return os.environ.get("LORASERVE_FP8_GEMV_HALF", "1").strip() != "0"


_W8A8_KINDS = {"token": "dot8", "block": "dot8b", "fast": "dot8f", "tensorwise": "tw", "tensorwise_fast": "twf",
               "stream": "dot8p"}
W8A8_KINDS = tuple(_W8A8_KINDS.values())


def w8a8_mode() -> str:
    """LORASERVE_FP8_W8A8: how the W8A8 decode GEMMs (M 33..64) run. 'auto' (default since the 20:55 final's 32-layer
    engine ran it: bs64 5.656 ms per step vs 5.838): the table's kind per shape (tw or dot8, both per-token W8A8). The
    others force one kind: 'token': one scale per token by a launch before the GEMM, the FP8 MMA's partials promoted to fp32 every K tile
    (_scaled_mm's numerics; dot8);
    'block': inside the GEMM, one scale per (token, 128-wide K block) (dot8b: no quantization launch); 'fast': per
    token, the MMA accumulating over all of K in its reduced precision (dot8f: measurements only); 'tensorwise' /
    'tensorwise_fast': per token, cuBLASLt's FP8 GEMM with unit scales (use_fast_accum off / on), scales after it;
    'stream': dot8's numerics in persistent programs (dot8p, kernels/fp8_stream_dot.py)."""
    mode = os.environ.get("LORASERVE_FP8_W8A8", "auto").strip().lower() or "auto"
    if mode not in _W8A8_KINDS and mode != "auto":
        raise ValueError(f"LORASERVE_FP8_W8A8 must be auto or one of {sorted(_W8A8_KINDS)}, got {mode!r}")
    return mode


_COUNTER_SLOTS = 1 << 16
_COUNTERS: dict[torch.device, Tensor] = {}


def _tile_counters(device: torch.device) -> Tensor:
    """[_COUNTER_SLOTS] int32 zeros per device: the split-K fixup's arrival counters, one per output tile, each
    reset by the tile's last program (so one buffer serves every GEMM of the step: they run one after another)."""
    cnt = _COUNTERS.get(device)
    if cnt is None:
        cnt = _COUNTERS[device] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return cnt


def splitk_fixup_on() -> bool:
    """LORASERVE_FP8_SPLITK_FIXUP=1: the tensor-core kinds sum their split-K partials in-kernel (the last program
    of each tile; deterministic order) instead of a second launch. Off by default until an H200 run measures it."""
    return os.environ.get("LORASERVE_FP8_SPLITK_FIXUP", "0").strip() == "1"


def gemv_pdl_mode(kind: str = "gemv") -> str:
    """LORASERVE_FP8_GEMV_PDL: how the GEMV kernels of `kind` launch. 'auto' (default): 'early' for the CUDA-core
    kinds (gemv*), plainly for the tensor-core ones (dot*): H200, benchmarks/fp8_probe.py (4 8B layers, decode graphs
    replayed, 2026-11-30 17:02): early cut the FP8 layer from 82.9 to 80.5 us at batch 1 and cost 2.1 us at batch 64
    (168.5 -> 170.7; with the in-kernel split-K sum 199.0), outputs bit for bit equal. '0': plainly. '1': as
    programmatic dependents (where pdl_supported) that prefetch all their weight rows into L2 before their wait (H200,
    2026-11-30, fp8_gemv_sweep.py --chain-ms, a layer's four GEMMs each after an RMSNorm: it cost 20 us per layer at M=1
    (74.1 -> 93.8; 87.5 with the norms' PDL on) and 17 at M=64). 'early': as dependents that load only their first
    weight tile (registers) before the wait, as the bf16 GEMV (kernels/gemv.py) does in the bf16 engine's chain."""
    mode = os.environ.get("LORASERVE_FP8_GEMV_PDL", "auto").strip().lower()
    if mode == "auto":
        return "early" if kind.startswith("gemv") else "0"
    return mode if mode in ("1", "early") else "0"


def gemv_pdl_on() -> bool:
    return gemv_pdl_mode() != "0"
