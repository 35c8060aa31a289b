"""Candidate FP8 GEMV configs per (M, N, K) for benchmarks/fp8_gemv_sweep.py: the general tile list, and the W8A8
(--w8a8) and fp16-product (--gemvh) candidate sets."""
from __future__ import annotations


def candidate_tiles(m: int) -> list[tuple]:
    """(kind, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split) to try at M = m. kind: gemv (CUDA
    cores; gemv2/gemv4: 2/4 groups of BLOCK_N rows per program sharing x), dot (swap-AB tl.dot on bf16),
    dot16 (tl.dot on fp16: a cheaper e4m3 conversion). split: "auto" (fp8_gemv.auto_split; gemv2/gemv4
    tiles are GROUPS x BLOCK_N rows), "tile" (one K tile per program, no K loop: GemLite's GEMV shape, the
    partials summed by the second launch). gemv stages: 2 = the next weight tile prefetched into registers.
    The first entries are the 2026-11-30 second probe's winners; the rest are what that run suggested trying."""
    if m == 1:   # gemv2/gemv4: 2/4 row groups share each x load (3.3-4.1 SASS instructions per weight byte in
        # the K loop against 5.1); the register prefetch (stages 2) lost 25-45% in the second probe: one kept
        return [("gemv", 1, 4, 512, 4, 1, "auto"), ("gemv2", 1, 4, 512, 4, 1, "auto"), ("gemv4", 1, 4, 512, 4, 1, "auto"),
                ("gemv4", 1, 8, 512, 8, 1, "auto"), ("gemv2", 1, 8, 512, 8, 1, "auto"), ("gemv", 1, 8, 512, 8, 1, "auto"),
                ("dot16", 16, 64, 128, 4, 3, "auto"), ("dot16", 16, 64, 128, 2, 3, "auto"),
                ("gemv", 1, 4, 512, 4, 2, "auto")]
    bm = max(16, 1 << (m - 1).bit_length())
    if m >= 64:   # W8A8 bucket (the engine's table: dot8, the numerics of _scaled_mm, x per token in e4m3, FP8 x FP8
        # wgmma with no conversion: 0.8-1.4 SASS instructions per weight byte in the loop). Final run 2026-11-30:
        # 64 x 128 tiles at split 1-8 won all four shapes; 4 stages and 128-wide K tiles with 2 warps are new
        dot8 = [("dot8", bm, 64, 128, 4, 3, "auto"), ("dot8", bm, 128, 128, 4, 3, "auto"), ("dot8", bm, 64, 128, 4, 4, "auto"),
                ("dot8", bm, 64, 256, 4, 3, "auto"), ("dot8", bm, 128, 128, 8, 3, "auto"), ("dot8", bm, 64, 128, 8, 3, "auto")]
    elif m >= 16:   # W8A8 at decode sizes, for comparison with the weight-only dot16 (not the engine's choice)
        dot8 = [("dot8", bm, 64, 128, 4, 3, "auto"), ("dot8", bm, 128, 128, 4, 3, "auto")]
    else:
        dot8 = []
    # second probe: dot16 with 64 x 128 weight tiles, 4 warps, 3 stages won every M in 4..32 (256-row tiles and
    # BLOCK_K 64 / 256 lost 10-60%); 2 warps (mma.sync instead of wgmma: 2.8 SASS instructions per weight
    # byte in the loop at 16 rows) is new
    tiles = dot8 + [("dot16", bm, 64, 128, 4, 3, "auto")]
    if bm == 16:
        tiles.append(("dot16", bm, 64, 128, 2, 3, "auto"))
    tiles += [("dot", bm, 64, 128 if bm <= 32 else 64, 4, 3, "auto"), ("dot16", bm, 64, 64, 4, 3, "auto"),
              ("dot16", bm, 128, 128, 8, 3, "auto"), ("dot16", bm, 64, 128, 4, 4, "auto"), ("dot16", bm, 64, 128, 4, 2, "auto"),
              ("dot", bm, 128, 64, 4, 3, "auto")]
    if bm <= 32:
        tiles.append(("dot16", bm, 64, 256, 4, 3, "auto"))
    if m <= 4:
        tiles.append(("gemv4", 1, 4, 512, 4, 1, "auto"))
    return tiles


def candidates(m: int, n: int, k: int, num_sms: int) -> list[tuple]:
    """GemvConfigs: the table's (or heuristic's) first, then each tile at its split, the first three also
    at half and double the auto split."""
    from loraserve.kernels.fp8_gemv import auto_split, gemv_config

    out = []
    for i, (kind, bm, bn, bk, warps, stages, mode) in enumerate(candidate_tiles(m)):
        rows = bn * (int(kind[-1]) if kind in ("gemv2", "gemv4", "gemvh2", "gemvh4") else 1)
        split = -(-k // bk) if mode == "tile" else auto_split(kind, bm, rows, bk, m, n, k, num_sms)
        splits = [split] + ([max(1, split // 2), split * 2] if i < 3 and mode != "tile" else [])
        for s in dict.fromkeys(splits):
            if s == 1 or k >= s * bk:
                out.append((kind, bm, bn, bk, s, warps, stages))
    # the first two split-K configs again with the split-K sum as a programmatic dependent launch
    pdl = [c + (True,) for c in out if c[4] > 1][:2]
    return list(dict.fromkeys([gemv_config(m, n, k, num_sms)] + out + pdl))


def w8a8_candidates(m: int, n: int, k: int, num_sms: int) -> list[tuple]:
    """--w8a8: the table's W8A8 tile (dot8) in each way of quantizing / accumulating (LORASERVE_FP8_W8A8: dot8
    per token with fp32 promotion every K tile, dot8f without, dot8b per (token, K block) in-kernel, tw / twf
    cuBLASLt's tensor-wise GEMM), then dot8b and dot8 at other tiles and splits."""
    from loraserve.kernels.fp8_gemv import auto_split, gemv_config

    base = gemv_config(m, n, k, num_sms)
    base = ("dot8",) + tuple(base[1:]) if base[0].startswith("dot8") or base[0].startswith("tw") else base
    out = [base] + [(kind,) + tuple(base[1:]) for kind in ("dot8f", "dot8b", "tw", "twf")]
    bm = max(16, 1 << (m - 1).bit_length())
    for kind in ("dot8b", "dot8"):
        for bn, warps, stages in ((64, 4, 3), (128, 4, 3)):
            split = auto_split(kind, bm, bn, 128, m, n, k, num_sms)
            for s_ in dict.fromkeys((split, max(1, split // 2))):
                out.append((kind, bm, bn, 128, s_, warps, stages))
    # no split-K (no partials' sum launch): 32-row weight tiles (mma.sync; twice the programs) or deep pipelines
    out += [("dot8b", bm, 32, 128, 1, 4, 4), ("dot8b", bm, 64, 128, 1, 4, 6), ("dot8b", bm, 32, 128, 1, 2, 6),
            ("dot8", bm, 32, 128, 1, 4, 4)]
    return list(dict.fromkeys(out))


def gemvh_candidates(m: int, n: int, k: int, num_sms: int) -> list[tuple]:
    """--gemvh: the table's config, then the fp16-product GEMV (gemvh2/gemvh4: stages = K tiles per fp16 partial)
    at weight tiles of 1-4 rows x 512-2048 bytes, and the table's gemv2 tile again at a second split."""
    from loraserve.kernels.fp8_gemv import auto_split, gemv_config

    out = [gemv_config(m, n, k, num_sms)]
    for kind, bn, bk, warps, flush in (("gemvh4", 1, 1024, 2, 4), ("gemvh4", 1, 512, 1, 4), ("gemvh4", 1, 2048, 4, 2),
                                       ("gemvh4", 2, 1024, 4, 2), ("gemvh4", 1, 1024, 2, 2), ("gemvh2", 4, 512, 4, 4),
                                       ("gemvh4", 1, 1024, 4, 4), ("gemvh4", 1, 512, 2, 4)):
        split = auto_split(kind, 1, bn * int(kind[-1]), bk, m, n, k, num_sms)
        for s_ in dict.fromkeys((split, split * 2)):
            if k >= s_ * bk * flush:
                out.append((kind, 1, bn, bk, s_, warps, flush))
    return list(dict.fromkeys(out))
