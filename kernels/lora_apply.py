"""lora_apply: the LoRA delta of one (possibly fused) projection, Triton or reference.

    y[t, off_s:off_s+1] += (x[t] @ A[a, s, :r].T) @ B[a, off_s:off_s+1, :r].T   for a = slot(t) >= 0
    y[t] = (y[t] + delta[t]) * scale[a] (+ shift[a])   with DoRA's scale [L, N] (one rounding)

Triton path, chosen from host-known shapes only (so a CUDA graph keeps its kernels):
  * "fused": small steps whose grid fits on the GPU at once (lora_fused.fused_plan): one
    launch, shrink and expand split by an in-kernel grid barrier;
  * "partials": shrink writes split-K partials [SPLIT_K, S, T, R], expand sums them while
    loading (two launches): rank <= 16 (streaming variant: <= 64) and <= 256 tokens. Measured on an H200 (rank 16,
    us per projection, vs "reduced"): 1 token 5.8-7.6 vs 7.7-9.6; 16 tokens / 16 adapters
    8.8-21.2 vs 11.1-20.9; 64 tokens / 32 adapters 11.1-37.5 vs 13.9-34.0. Also 257..384 tokens (the
    mixed steps: a 256-token prompt chunk + decode rows) on the streaming variant, the split capped at 2
    (partials_max_tokens, lora_shrink.large_split_cap): H200, the 320-token mixed step, q+v over 32
    adapters, what LoRA adds a layer (medians of paired rounds): 28.6 -> 20.7 us (32 layers), 36.2 -> 31.1 (8);
  * "seg": steps of >= 256 tokens (lora_seg.py, LORASERVE_LORA_SEG / _MIN_TOKENS; not gate_up-sized N * R at
    >= 512 tokens): the segment-tiled pair, a shrink over all slices of a row block at once whose last K split sums
    the partials, and an expand that keeps each row block's h in registers while it walks column blocks;
  * "reduced": shrink, a fixed-order sum of the partials, expand (three launches) otherwise:
    every column block of the expand re-reads the partials, which at rank 64 cost more than
    the saved launch (1-32 tokens: 10-50% slower with partials; down, 1024 tokens: 2x).
Shrink configs and the expand kernel come in two variants, switched by LORASERVE_LORA_STREAM
(lora_meta.LORA_STREAM; on by default): the streaming expand (lora_expand_stream.py) with
the shrink's grid-aware split-K, or the classic kernels (=0). The workspace shape follows it.
On the streaming path, steps of <= 64 tokens (rank <= 16 above 32) shrink with the BGMV kernel
(lora_shrink_bgmv.py, LORASERVE_LORA_BGMV / _MAX_TOKENS; its split is the workspace's leading dim), which
loads its A block before griddepcontrol.wait, and the expand lets the next kernel launch at its start
(LORASERVE_LORA_PREFETCH=at, lora_prefetch.py); steps of <= 32 tokens run the expand's column loop
Triton-pipelined (LORASERVE_LORA_STREAM_SLOTS, lora_expand_stream.py), as do programs walking >= 10
column blocks up to 256 tokens (gate_up; LORASERVE_LORA_STREAM_PIPE_MIN_BLOCKS); larger steps keep the dot
shrink and the hand-rotated loop (H200 runs, 2026-11-30: see kernels/PERF_NOTES.md). Single-slice projections
(o, down) at <= 64 tokens, rank <= 32, expand with the BGMV kernel instead (lora_expand_bgmv.py: one wide B
block per iteration, no tl.dot; LORASERVE_LORA_EXPAND_BGMV / _MAX_SLICES). scale_on (per-slot DoRA flags) lets
the expands skip DoRA's epilogue for plain LoRA slots.
The one-launch ticketed kernel (lora_onelaunch.py, no residency requirement, <= 256 tokens,
rank <= 64, <= 3 slices, not fp32 on a GPU) is opt-in: LORASERVE_LORA_ONELAUNCH=1; it comes
first when on (measured slower than two launches on an H200, see PERF_NOTES). Programmatic
dependent launch between the two kernels is on by default on sm_90+ (LORASERVE_LORA_PDL=0: off;
lora_meta). The fused kernel is
opt-in (LORASERVE_LORA_FUSED=1): its grid barrier has run on an H200, at parity with two
launches (see kernels/PERF_NOTES.md).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import interpret_mode, triton_available
from .lora_meta import LoRAMeta

FUSED_ENABLED = os.environ.get("LORASERVE_LORA_FUSED", "0").strip() not in ("", "0")
# One launch per projection with ticketed roles (lora_onelaunch.py): no residency requirement.
# Opt-in (LORASERVE_LORA_ONELAUNCH=1) until GPU figures say otherwise; read at each call.
ONELAUNCH_ENABLED = os.environ.get("LORASERVE_LORA_ONELAUNCH", "0").strip() not in ("", "0")
# Dense shrink (lora_shrink_dense.py): every token against every slot's A in one GEMM, the streaming
# expand reading each token's own slot's columns. LORASERVE_LORA_DENSE = "triton" (our split-K kernel) |
# "mm" (one cuBLAS GEMM) | "0" (off, the default: the H200 probe of 2026-11-30 19:59 timed the 64-token /
# 32-adapter layer at 57.9 us tiled vs 64.1 with the cuBLAS shrink, the Triton one no better; PERF_NOTES). Taken only for
# DENSE_MIN_TOKENS <= T <= DENSE_MAX_TOKENS and at most T slots in the pool (it reads every slot's A up
# to the pool's max rank). Read at each call.
DENSE_MODE = {"1": "triton", "triton": "triton", "mm": "mm"}.get(
    os.environ.get("LORASERVE_LORA_DENSE", "0").strip().lower(), "")
DENSE_MIN_TOKENS, DENSE_MAX_TOKENS = 32, 256
# Dense expand (lora_expand_dense.py): one program per 128 output columns for all tokens, walking the
# slots 4 at a time (B of unused slots never read), after either shrink, for 2-64 tokens, rank <= 64, wide
# projections (N >= DENSE_EXPAND_MIN_N: its grid is N / 128 programs). LORASERVE_LORA_DENSE_EXPAND=1;
# off by default: 3x slower than the streaming expand on the H200 (gate_up 44-49 vs 17 us). Read at each call.
DENSE_EXPAND = os.environ.get("LORASERVE_LORA_DENSE_EXPAND", "0").strip().lower() not in ("", "0", "false", "off", "no")
DENSE_EXPAND_MIN_N = int(os.environ.get("LORASERVE_LORA_DENSE_EXPAND_MIN_N", "8192"))
DENSE_EXPAND_MIN_TOKENS = int(os.environ.get("LORASERVE_LORA_DENSE_EXPAND_MIN_TOKENS", "2"))
DENSE_EXPAND_MAX_SLOTS = 128   # every program walks all slots (a rank-packed pool has thousands of granules)


def use_triton(x: Tensor) -> bool:
    """Triton on CUDA tensors, or anywhere under TRITON_INTERPRET=1; else the torch reference."""
    return triton_available() and (x.is_cuda or interpret_mode())


def choose_path(x: Tensor, lora_a: Tensor, lora_b: Tensor, meta: LoRAMeta) -> tuple[str, tuple[int, ...], dict | None]:
    """(path, float32 workspace shape, fused plan or None) for these shapes; path is one of
    "reference", "onelaunch", "fused", "dense", "partials", "reduced"."""
    T, (_, S, R, H), N = x.shape[0], lora_a.shape, lora_b.shape[1]  # lora_a: [L, S, R, H]
    if not use_triton(x):
        return "reference", (S, T, R), None
    from .lora_fused import fused_plan
    from .lora_shrink import shrink_split_k

    if ONELAUNCH_ENABLED and not (x.is_cuda and x.dtype == torch.float32):  # fp32 dots spill on sm_90
        from .lora_onelaunch import onelaunch_applies, onelaunch_split_k

        if onelaunch_applies(T, R, S):
            return "onelaunch", (onelaunch_split_k(x, lora_a, lora_b, meta), S, T, R), None

    plan = fused_plan(T, meta.max_slots, meta.block_m, R, H, N, S, x.device) if FUSED_ENABLED else None
    if plan is not None:
        return "fused", (plan["SPLIT_K"], S, T, R), plan
    from .lora_meta import stream_enabled

    if DENSE_MODE and dense_applies(x, lora_a, meta):
        from .lora_shrink_dense import dense_split_k

        L = lora_a.shape[0]
        return "dense", (dense_split_k(x, lora_a, DENSE_MODE), T, L * S * R), None
    from .lora_seg import seg_applies, seg_split_k

    if seg_applies(T, R, S, x, N):   # large steps: the segment-tiled pair (lora_seg.py)
        return "seg", (seg_split_k(x, lora_a, meta), S, T, R), None
    # The streaming expand reads the partials once per (tile, column group), not per column
    # block, so with it the partials pay up to rank 64 (the classic kernel: rank 16).
    if R <= (64 if stream_enabled() else 16) and T <= 256:
        return "partials", (shrink_split_k(x, lora_a, meta.block_m, meta.grid_tiles), S, T, R), None
    if (256 < T <= partials_max_tokens() and R <= 64 and stream_enabled() and not (x.is_cuda and x.dtype == torch.float32)
            and _stream_expand_ok(S, R, x.device)):   # (no torch.sum launch between shrink and expand)
        return "partials", (shrink_split_k(x, lora_a, meta.block_m, meta.grid_tiles), S, T, R), None
    return "reduced", (S, T, R), None


def partials_max_tokens() -> int:
    """Steps of 257..this many tokens take the "partials" path too (the streaming expand sums the shrink's split-K
    partials as it loads them, the split capped at lora_shrink.large_split_cap: 2), not "reduced" (shrink, torch.sum,
    expand): one launch fewer per projection at bench_churn's mixed steps (256-token chunk + decode rows, T 320-352).
    H200 probe (2026-12-01 00:55, bench_lora_resident --replay-variants, 32 layers, the (40, 320) mixed step, q+v over
    32 adapters of rank 8-64; what LoRA adds per layer, min of rounds / median of paired rounds): "reduced" 36.8 /
    28.6 us, partials with 2 splits 33.7 / 20.7, 4 splits 40.6 / 31.1, 8 (the rule) 50.6 / 42.3; no adapter row (the
    launches' fixed cost) 13.5 / 6.6 -> 6.2 / 0.8. Larger steps keep "reduced" (not measured). LORASERVE_LORA_PARTIALS
    _MAX_TOKENS (default 384; 256: "reduced" above 256 tokens, as before); read at each call (resident helper, issue 12;
    kernels/PERF_NOTES.md)."""
    return int(os.environ.get("LORASERVE_LORA_PARTIALS_MAX_TOKENS", "384"))


def _stream_expand_ok(num_slices: int, rank: int, device: torch.device) -> bool:
    from .lora_expand import _stream_ok

    return _stream_ok(num_slices, rank, device)


def dense_applies(x: Tensor, lora_a: Tensor, meta: LoRAMeta) -> bool:
    """The dense shrink may take these shapes (DENSE_MODE aside): a decode-size step with at least
    as many tokens as slots, the streaming expand available, A viewable as one [L*S*R, H] matrix."""
    from .lora_expand import _stream_ok
    from .lora_meta import stream_enabled
    from .lora_shrink_dense import dense_view

    T, (L, S, R, _) = x.shape[0], lora_a.shape
    return (DENSE_MIN_TOKENS <= T <= DENSE_MAX_TOKENS and L <= T and stream_enabled()
            and _stream_ok(S, R, x.device) and not (x.is_cuda and x.dtype == torch.float32)
            and dense_view(lora_a) is not None)


def workspace_shape(x: Tensor, lora_a: Tensor, lora_b: Tensor, meta: LoRAMeta) -> tuple[int, ...]:
    """Shape of the float32 workspace ``lora_apply`` wants for these inputs."""
    return choose_path(x, lora_a, lora_b, meta)[1]


def lora_apply(x: Tensor, y: Tensor, lora_a: Tensor, lora_b: Tensor, slice_offsets: Tensor,
               meta: LoRAMeta, ranks: Tensor, buf: Tensor | None = None, *,
               scale: Tensor | None = None, shift: Tensor | None = None, scale_on: Tensor | None = None) -> Tensor:
    """Add the LoRA deltas of every token to y in place and return y.

    x [T, H_in]; y [T, N] (column view allowed); lora_a [L, S, R, H_in]; lora_b [L, N, R];
    slice_offsets [S+1] int32; ranks [L] int32; buf optional float32 workspace of
    ``workspace_shape(x, lora_a, lora_b, meta)`` (pass a static one under CUDA graphs; any
    other shape is replaced by a fresh allocation); scale optional float32 [L, N], DoRA's
    per-slot, per-output-feature factor g: adapted rows become (y + delta) * g[slot] (the
    expand epilogue; g = 1 leaves plain LoRA rows bit-identical); shift optional float32 [L, N]
    (with scale) added after it: (1 - g) * bias keeps a biased projection's bias unscaled; scale_on optional
    [L] int32, 0 for slots whose scale is all ones (the expand then skips their epilogue loads). Rows
    without an adapter are never touched.
    """
    path, shape, plan = choose_path(x, lora_a, lora_b, meta)
    if buf is None or tuple(buf.shape) != shape:
        buf = torch.empty(shape, dtype=torch.float32, device=x.device)
    if path == "reference":
        from .reference import lora_expand_ref, lora_shrink_ref

        lora_shrink_ref(x, lora_a, meta, ranks, buf)
        return lora_expand_ref(buf, lora_b, slice_offsets, meta, ranks, y, scale=scale, shift=shift)
    if path == "onelaunch":
        from .lora_onelaunch import lora_onelaunch

        return lora_onelaunch(x, lora_a, lora_b, slice_offsets, meta, ranks, y, buf, scale=scale, shift=shift)
    if path == "dense":
        from .lora_shrink_dense import lora_shrink_dense

        lora_shrink_dense(x, lora_a, buf, meta.token_slot, backend=DENSE_MODE)   # [SK, T, L*S*R] partials, every slot
        return _expand(buf, y, lora_b, slice_offsets, meta, ranks, scale, shift, path, scale_on)
    if path == "fused":
        from .lora_fused import lora_shrink_expand

        lora_shrink_expand(x, lora_a, lora_b, slice_offsets, meta, ranks, y, buf, plan=plan)
        if scale is not None:  # the fused kernel has no epilogue scale: a graph-safe torch pass after it
            from .reference import dora_scale_rows

            dora_scale_rows(y, scale, meta, ranks, shift)
        return y
    if path == "seg":
        from .lora_seg import seg_apply

        if seg_apply(x, y, lora_a, lora_b, slice_offsets, meta, ranks, buf, scale, shift, scale_on):
            return y
        return lora_apply(x, y, lora_a, lora_b, slice_offsets, meta, ranks, None, scale=scale, shift=shift,
                          scale_on=scale_on)   # (a compile failure: the tile path from now on)
    from .lora_shrink import lora_shrink

    lora_shrink(x, lora_a, meta, ranks, buf)   # [SK, S, T, R] partials, or [S, T, R] reduced
    return _expand(buf, y, lora_b, slice_offsets, meta, ranks, scale, shift, path, scale_on)


def _expand(buf: Tensor, y: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta, ranks: Tensor,
            scale: Tensor | None, shift: Tensor | None, path: str, scale_on: Tensor | None = None) -> Tensor:
    """The expand half of a split path: the dense expand where DENSE_EXPAND takes it, else lora_expand
    (the streaming kernel for the dense shrink's every-slot partials)."""
    from .lora_expand import lora_expand

    S, R = slice_offsets.shape[0] - 1, lora_b.shape[2]
    if path == "seg":
        from .lora_seg import lora_seg_expand

        return lora_seg_expand(buf, lora_b, slice_offsets, meta, ranks, y, scale=scale, shift=shift, scale_on=scale_on)
    if path == "dense":
        from .lora_shrink_dense import dense_partials

        parts, slot_stride = dense_partials(buf, S, R), S * R
    else:
        parts, slot_stride = (buf if buf.dim() == 4 else buf.unsqueeze(0)), 0
    if dense_expand_taken(y, lora_b, meta, S):
        from .lora_expand_dense import lora_expand_dense

        return lora_expand_dense(parts, lora_b, slice_offsets, meta, ranks, y, slot_stride=slot_stride,
                                 scale=scale, shift=shift)
    return lora_expand(parts if path == "dense" else buf, lora_b, slice_offsets, meta, ranks, y, scale=scale,
                       shift=shift, dense_slots=path == "dense", scale_on=scale_on)


def dense_expand_taken(y: Tensor, lora_b: Tensor, meta: LoRAMeta, num_slices: int) -> bool:
    """DENSE_EXPAND is on and lora_expand_dense takes these shapes (wide enough, <= 64 tokens)."""
    if (not DENSE_EXPAND or lora_b.shape[1] < DENSE_EXPAND_MIN_N or meta.num_tokens < DENSE_EXPAND_MIN_TOKENS
            or lora_b.shape[0] > DENSE_EXPAND_MAX_SLOTS or (y.is_cuda and y.dtype == torch.float32)):
        return False
    from .lora_expand_dense import dense_expand_applies

    return dense_expand_applies(meta.num_tokens, num_slices, lora_b.shape[2])


def lora_apply_split(x: Tensor, lora_a: Tensor, lora_b: Tensor, meta: LoRAMeta) -> bool:
    """True when lora_apply's path for these shapes is two separate kernels (shrink, then expand)
    that :func:`lora_shrink_part` / :func:`lora_expand_part` can run apart (e.g. the shrink on a
    side stream during the base GEMM, batch.py); False for the one-launch paths and the reference."""
    return choose_path(x, lora_a, lora_b, meta)[0] in ("partials", "reduced", "dense", "seg")


def lora_shrink_part(x: Tensor, lora_a: Tensor, meta: LoRAMeta, ranks: Tensor, buf: Tensor,
                     path: str | None = None) -> Tensor:
    """lora_apply's first half on a split path: buf (workspace_shape) <- the shrink of x. path:
    choose_path's, which must be passed for the "dense" path (else the tiled shrink runs)."""
    if path == "dense":
        from .lora_shrink_dense import lora_shrink_dense

        return lora_shrink_dense(x, lora_a, buf, meta.token_slot, backend=DENSE_MODE)
    if path == "seg":
        from .lora_seg import lora_seg_shrink

        return lora_seg_shrink(x, lora_a, meta, ranks, buf)
    from .lora_shrink import lora_shrink

    return lora_shrink(x, lora_a, meta, ranks, buf)


def lora_expand_part(buf: Tensor, y: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta,
                     ranks: Tensor, *, scale: Tensor | None = None, shift: Tensor | None = None,
                     path: str | None = None, scale_on: Tensor | None = None) -> Tensor:
    """lora_apply's second half on a split path: y += expand(buf) (with DoRA's epilogue); path as
    for lora_shrink_part."""
    return _expand(buf, y, lora_b, slice_offsets, meta, ranks, scale, shift, path or "partials", scale_on)
