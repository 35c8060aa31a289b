"""Per-step batch metadata for the multi-LoRA kernels (SGMV-style segments and tiles).

A step's tokens each carry an adapter *slot* (``-1``: no adapter). The kernels want the
tokens grouped by slot, so :class:`LoRAMetaBuilder` sorts them once per step and cuts every
slot's group ("segment") into tiles of at most ``block_m`` rows. One Triton program handles
one tile, so the grid is ``cdiv(T, block_m) + min(T, max_slots)`` tiles whatever the batch
composition: it never depends on device data, never needs a host sync, and a CUDA graph
captured for a token count ``T`` stays valid for any later assignment of slots (unused tiles
carry slot ``-1`` and exit at once). This is the MoE "align block size" trick applied to
punica's SGMV segments; vLLM's v1 LoRA ops instead launch ``cdiv(T, BM) x max_loras``
programs, most of which exit.

All buffers are allocated once in ``__init__`` and refilled in place by ``build``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LoRAMeta:
    """Views of the builder's static buffers for one step of ``num_tokens`` tokens.

    token_slot:       [T] int32, slot per token, -1 = no adapter.
    sorted_token_ids: [T_max] int32; entries [0, seg_starts[num_segments]) are the tokens
                      that have an adapter, grouped by slot (ascending), token order kept.
    seg_starts:       [L_max+1] int32, segment i is sorted_token_ids[seg_starts[i]:seg_starts[i+1]];
                      unused segments are empty (start == end == number of adapted tokens).
    seg_slots:        [L_max] int32, slot of segment i (active slots ascending), -1 for unused.
    num_segments:     [1] int32, number of active segments.
    tile_slots:       [tiles_max] int32, slot of each tile, -1 for unused tiles.
    tile_starts:      [tiles_max] int32, first row of the tile (an offset into sorted_token_ids).
    tile_ends:        [tiles_max] int32, end of the tile's segment; the tile's rows are
                      [tile_start, min(tile_start + block_m, tile_end)).
    num_tiles:        [1] int32, number of used tiles.
    num_tokens:       T (host int), block_m (host int), max_slots (host int),
    grid_tiles:       host int, the tile-grid size kernels launch for this T.
    """

    token_slot: Tensor
    sorted_token_ids: Tensor
    seg_starts: Tensor
    seg_slots: Tensor
    num_segments: Tensor
    tile_slots: Tensor
    tile_starts: Tensor
    tile_ends: Tensor
    num_tiles: Tensor
    num_tokens: int
    block_m: int
    max_slots: int
    grid_tiles: int
    _segments: list[tuple[int, Tensor]] | None = field(default=None, repr=False, compare=False)

    def segments(self) -> list[tuple[int, Tensor]]:
        """Host-side ``[(slot, token_ids int64)]`` per active segment (syncs; for the references).

        Cached on this object: the CPU engine calls the references for every layer of a step.
        """
        if self._segments is None:
            n = int(self.num_segments.item())
            slots = self.seg_slots[:n].tolist()
            starts = self.seg_starts[: n + 1].tolist()
            ids = self.sorted_token_ids.long()
            self._segments = [(s, ids[starts[i]: starts[i + 1]]) for i, s in enumerate(slots)]
        return self._segments


MIN_BLOCK_M = 16  # tl.dot needs at least 16 rows

# Kernel variant switch for lora_shrink / lora_expand / lora_apply (read at each call, so a
# benchmark may flip it between runs): True = the streaming expand (lora_expand_stream.py) and
# the shrink's grid-aware split-K; False = the classic kernels and configs.
# LORASERVE_LORA_STREAM=0 turns it off; on by default.
LORA_STREAM = os.environ.get("LORASERVE_LORA_STREAM", "1").strip().lower() not in ("", "0", "false", "off", "no")


# Programmatic dependent launch (sm_90+) for the streaming pair: the shrink lets the expand launch
# at once, the expand fetches its metadata and first B blocks and waits (griddepcontrol.wait)
# before reading y and the partials. Every program of both kernels waits (the shrink's at its
# start, for the kernel before it), so each kernel's completion implies its predecessors' and a
# normally launched kernel after the expand sees all their writes. On by default: measured on an
# H200 (kernels/PERF_NOTES.md) it cut 1 token from 6.64 to 4.88 us per projection (median) and the
# 64-token / 32-adapter layer from 66.5 to 60.5 us, outputs bit-identical. LORASERVE_LORA_PDL=0
# turns it off; read at each launch.
LORA_PDL = os.environ.get("LORASERVE_LORA_PDL", "1").strip().lower() not in ("", "0", "false", "off", "no")
_PDL_OK: dict[int, bool] = {}

# BGMV-style shrink (lora_shrink_bgmv.py) for steps of <= LORA_BGMV_MAX_TOKENS tokens on the
# streaming path: one [16, BLOCK_K] block of A per program straight into registers, x row by row
# (no 16-row tl.dot padding). On by default (LORASERVE_LORA_BGMV=0 turns it off); read at each call.
# H200 probe (2026-11-30 13:52, with PDL, us): 1 token qkv 4.59 -> 3.59, o 4.42 -> 3.20, gate_up
# 7.49 -> 4.55, down 5.35 -> 4.13 (median 4.97 -> 3.86); qkv rank 64 / 16 tokens / 16 adapters 20.7 ->
# 17.5; gate_up 64 tokens of ONE adapter 12.5 -> 10.3; but 64 tokens / 32 adapters (2 rows a tile)
# 58.2 -> 61.3 us for the layer: hence <= 32 tokens (LORASERVE_LORA_BGMV_MAX_TOKENS).
LORA_BGMV = os.environ.get("LORASERVE_LORA_BGMV", "1").strip().lower() not in ("", "0", "false", "off", "no")
# Up to 64 tokens since the H200 probe of 2026-11-30 22:26 (with LORA_PREFETCH's "a": A loaded before the wait; above
# 32 tokens only at rank <= 16, lora_shrink.bgmv_applies): 64 tokens / 32 adapters / r16 layer 58.1 -> 52.6 us.
LORA_BGMV_MAX_TOKENS = int(os.environ.get("LORASERVE_LORA_BGMV_MAX_TOKENS", "64"))
LORA_BGMV_WIDE_MAX_RANK = 16   # ... above 32 tokens only up to this (pool) rank (lora_shrink.bgmv_applies)
# ... and at <= 32 tokens up to this rank (LORASERVE_LORA_BGMV_MAX_RANK): rank-64 steps leave 4 rank blocks x K chunks
# of partials (down: 4 x 7) that the expand sums (down r64 / 16 adapters / 16 tokens: expand 18-23 us for 8.4 MB of B).
LORA_BGMV_MAX_RANK = int(os.environ.get("LORASERVE_LORA_BGMV_MAX_RANK", "64"))

# Launch order of the expands' (tile, column group) grid and the BGMV shrink's (tile, K chunk) grid
# (LORASERVE_LORA_GROUP_MAJOR / LORASERVE_LORA_SHRINK_K_MAJOR; off by default, unmeasured when written): tile-major,
# the programs launched together read the same column run (K chunk) of up to 32 adapters whose weights lie a
# slot stride apart (896 KB = 7 x 2^17 for gate_up's B, 256 KB for its A): every stream starts on the same DRAM
# channels (partition camping is one candidate for the ~1.9 TB/s all LoRA kernels stream at). Group-major, they read
# consecutive runs of one adapter. Read at each launch.
LORA_GROUP_MAJOR = os.environ.get("LORASERVE_LORA_GROUP_MAJOR", "0").strip().lower() not in ("", "0", "false", "off", "no")
LORA_SHRINK_K_MAJOR = os.environ.get("LORASERVE_LORA_SHRINK_K_MAJOR", "0").strip().lower() not in ("", "0", "false", "off",
                                                                                                  "no")

# The shrink launches with PDL only up to this many tokens (LORASERVE_LORA_PDL_SHRINK_MAX_TOKENS; default: every
# step, as before). Above it the shrink waits for the GEMM before it the normal way: at bench_churn's mixed step
# (T 320-352, ~1000-1500 shrink programs) the early-launched programs may hold SM slots beside the GEMM's last
# wave (H200 probe 2026-11-30 22:26: a base cuBLAS kernel +5.9 us a layer in the LoRA graph). Measured: no gain
# (probe 23:13, 8 interleaved rounds at the (40, 320) mixed step: 51.3 vs 47.4 us a layer with PDL; resident
# helper, kernels/PERF_NOTES.md), so the default stays. Read at each launch.
LORA_PDL_SHRINK_MAX_TOKENS = int(os.environ.get("LORASERVE_LORA_PDL_SHRINK_MAX_TOKENS", "1000000000"))

# Loads / L2 prefetches before griddepcontrol.wait and the expand's early trigger: letters of "albt"
# (lora_prefetch.py); "" or "0" = off. Default "at" (the BGMV shrink's A into registers before its wait, the expand
# triggers at its start): H200 probe 2026-11-30 22:26, with the BGMV shrink up to 64 tokens, layer 58.1 -> 52.6 us,
# 1 token 4.16 -> 4.03 us (median), outputs bit-equal to "" (GPU test). Read at each launch.
LORA_PREFETCH = "".join(c for c in os.environ.get("LORASERVE_LORA_PREFETCH", "at").strip().lower() if c in "albt")


# LoRAMetaBuilder.build as one Triton launch (lora_meta_build.py) for steps of <= 2048 tokens on a GPU; on by
# default (LORASERVE_LORA_META_KERNEL=0: the torch build). H200 probe (2026-11-30 19:59, bench_lora_mixed, in a
# CUDA graph): the torch build, ~50 small kernels in every decode and mixed-step graph, took 185-217 us a step
# with bench_churn's 8000-granule tier (153 us with 1000 slots); the kernel 5-12 us; all buffers bit-equal
# (GPU test). Under Triton's interpreter only when META_KERNEL_INTERPRETED (tests: its sort is slow there).
# Read at each call.
LORA_META_KERNEL = os.environ.get("LORASERVE_LORA_META_KERNEL", "1").strip().lower() not in ("", "0", "false", "off",
                                                                                             "no")
META_KERNEL_INTERPRETED = False


def _interpret() -> bool:
    from ._triton import interpret_mode

    return interpret_mode()


def pdl_launch(device: torch.device) -> dict:
    """Extra kernel-launch keywords: USE_PDL (the constexpr) and Triton's launch_pdl, both only
    when LORA_PDL is on and the device is a Hopper or newer GPU; else nothing."""
    if not LORA_PDL or device.type != "cuda":
        return {}
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _PDL_OK.get(idx)
    if ok is None:  # Hopper or newer, and a Triton with the griddepcontrol intrinsics (>= 3.4)
        from ._triton import tl

        cuda_ext = getattr(getattr(tl, "extra", None), "cuda", None)
        ok = _PDL_OK[idx] = (torch.cuda.get_device_capability(idx)[0] >= 9
                             and hasattr(cuda_ext, "gdc_wait") and hasattr(cuda_ext, "gdc_launch_dependents"))
    return dict(USE_PDL=True, launch_pdl=True) if ok else {}


def stream_enabled(override: bool | None = None) -> bool:
    """The variant a launcher uses: the explicit override, else the module switch."""
    return LORA_STREAM if override is None else override


def auto_block_m(num_tokens: int, num_segments: int | None = None) -> int:
    """Rows per tile from host-known sizes. Long segments want big tiles (A and B are re-read
    from L2 once per tile), short ones small tiles (a tile never spans two slots, so a
    16-token segment in a 64-row tile wastes the rest). Measured on an H200 at Llama-3-8B
    shapes (benchmarks/bench_lora_kernels.py --sweep-block-m): 64 wins for segments of
    >= 256 tokens, 32 for ~32-token segments at T >= 1024, 16 below. Without a segment
    count (which lives on the GPU) assume decode-like steps: 16 below 512 tokens, else 32.
    """
    if num_segments:
        avg = num_tokens / num_segments
        return 64 if avg >= 256 else 32 if avg >= 32 and num_tokens >= 1024 else MIN_BLOCK_M
    return MIN_BLOCK_M if num_tokens < 512 else 32


def grid_tiles_for(num_tokens: int, block_m: int, max_slots: int) -> int:
    """Upper bound on the number of tiles: every segment adds at most one partial tile."""
    return -(-num_tokens // block_m) + min(max_slots, num_tokens)


class LoRAMetaBuilder:
    """Owns the static metadata buffers; ``build`` refills them for each step.

    ``build`` runs only device-side torch ops (sort, scatter_add, cumsum, searchsorted): no
    host sync, so it can run on the decode path right before a graph replay.
    """

    def __init__(self, max_tokens: int, max_slots: int, device: torch.device | str,
                 block_m: int | None = None) -> None:
        """block_m: rows per tile; None picks per step (:func:`auto_block_m`) from T alone, so a
        CUDA graph captured for a given T always sees the same grid."""
        if max_tokens < 1 or max_slots < 1:
            raise ValueError(f"max_tokens ({max_tokens}) and max_slots ({max_slots}) must be >= 1")
        if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
            raise ValueError(f"block_m must be a power of two >= 16 (tl.dot), got {block_m}")
        self.max_tokens, self.max_slots, self.block_m = max_tokens, max_slots, block_m
        self.device = torch.device(device)
        self.max_tiles = grid_tiles_for(max_tokens, MIN_BLOCK_M, max_slots)  # most tiles
        i32 = dict(dtype=torch.int32, device=self.device)
        i64 = dict(dtype=torch.int64, device=self.device)
        self.token_slot = torch.full((max_tokens,), -1, **i32)
        self.sorted_token_ids = torch.zeros(max_tokens, **i32)
        self.seg_starts = torch.zeros(max_slots + 1, **i32)
        self.seg_slots = torch.full((max_slots,), -1, **i32)
        self.num_segments = torch.zeros(1, **i32)
        self.tile_slots = torch.full((self.max_tiles,), -1, **i32)
        self.tile_starts = torch.zeros(self.max_tiles, **i32)
        self.tile_ends = torch.zeros(self.max_tiles, **i32)
        self.num_tiles = torch.zeros(1, **i32)
        # Constants reused every step.
        self._ones = torch.ones(max_tokens, **i64)
        self._slot_ids = torch.arange(max_slots, **i64)
        self._tile_ids = torch.arange(self.max_tiles, **i64)
        self._counts = torch.zeros(max_slots + 1, **i64)

    def build(self, token_slot: Tensor, *, block_m: int | None = None,
              num_segments_hint: int | None = None, max_segments: int | None = None) -> LoRAMeta:
        """Fill the buffers for ``token_slot`` ([T] int, -1 = none, else < max_slots).

        block_m overrides the builder's choice for this step; num_segments_hint (the number
        of distinct adapters in the step, known to the scheduler) improves the automatic one.
        max_segments: a bound on the distinct slots in token_slot that the caller guarantees
        (e.g. the sequences of the step: a graph of Bp sequences has at most Bp), so the grid is
        cdiv(T, BM) + min(max_slots, T, max_segments) tiles, not cdiv(T, BM) + min(max_slots, T):
        with thousands of slots (rank-packing granules) a 2048-token step otherwise launches
        2112 tiles for <= 136 used ones, and the launch configs (shrink split, expand column
        groups) that assume every grid tile active starve the used ones of parallelism.
        Tiles past the bound are never launched: a step with more distinct slots than
        max_segments would drop tokens, so the bound must hold.
        Under CUDA graphs keep all three a function of the captured shape, so that the grid matches.
        """
        if token_slot.dim() != 1:
            raise ValueError(f"token_slot must be 1-D [T], got shape {tuple(token_slot.shape)}")
        if token_slot.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token_slot must be int32 or int64, got {token_slot.dtype}")
        T, L = token_slot.numel(), self.max_slots
        BM = block_m or self.block_m or auto_block_m(T, num_segments_hint)
        if BM < MIN_BLOCK_M or BM & (BM - 1):
            raise ValueError(f"block_m must be a power of two >= 16 (tl.dot), got {BM}")
        if T > self.max_tokens:
            raise ValueError(f"{T} tokens exceed the builder's max_tokens={self.max_tokens}")
        if token_slot.device.type == "cpu" and T:  # cheap here; on GPU it would cost a sync
            lo, hi = int(token_slot.min()), int(token_slot.max())
            if lo < -1 or hi >= L:
                raise ValueError(f"token_slot values must lie in [-1, {L - 1}], got [{lo}, {hi}]")

        ts = self.token_slot[:T]
        if LORA_META_KERNEL and 0 < T and (token_slot.is_cuda or (META_KERNEL_INTERPRETED and _interpret())):
            from .lora_meta_build import MAX_TOKENS, build_with_kernel

            if T <= MAX_TOKENS:   # one launch instead of the ~50 below (lora_meta_build.py)
                build_with_kernel(self, token_slot.contiguous(), BM)
                return self._meta(ts, T, BM, L, max_segments)
        ts.copy_(token_slot)
        key = torch.where(ts < 0, L, ts).long()  # no-adapter tokens sort last
        order = torch.sort(key, stable=True).indices
        self.sorted_token_ids[:T].copy_(order)

        counts = self._counts
        counts.zero_()
        counts.scatter_add_(0, key, self._ones[:T])
        slot_counts = counts[:L]
        active = slot_counts > 0
        # Active slots first (ascending), then the unused ones: a stable compaction.
        seg_key = torch.sort(torch.where(active, self._slot_ids, self._slot_ids + L)).values
        used = seg_key < L
        seg_slot = torch.where(used, seg_key, -1)
        seg_counts = torch.where(used, slot_counts[seg_key % L], 0)
        seg_ends = torch.cumsum(seg_counts, 0)
        self.seg_slots.copy_(seg_slot)
        self.seg_starts[:1].zero_()   # a fill kernel: `[0] = 0` copies from a CPU scalar, which graph capture refuses
        self.seg_starts[1:].copy_(seg_ends)
        self.num_segments.copy_(used.sum().view(1))

        # Tiles: segment i owns cdiv(count_i, BM) consecutive tile ids.
        seg_tiles = (seg_counts + BM - 1) // BM
        tile_cum = torch.cumsum(seg_tiles, 0)
        tile_seg = torch.searchsorted(tile_cum, self._tile_ids, right=True)
        valid = tile_seg < L
        seg = tile_seg.clamp(max=L - 1)
        first_tile = tile_cum[seg] - seg_tiles[seg]
        seg_start = seg_ends[seg] - seg_counts[seg]
        self.tile_starts.copy_(torch.where(valid, seg_start + (self._tile_ids - first_tile) * BM, 0))
        self.tile_ends.copy_(torch.where(valid, seg_ends[seg], 0))
        self.tile_slots.copy_(torch.where(valid, seg_slot[seg], -1))
        self.num_tiles.copy_(tile_cum[-1:])

        return self._meta(ts, T, BM, L, max_segments)

    def _meta(self, ts: Tensor, T: int, BM: int, L: int, max_segments: int | None) -> LoRAMeta:
        return LoRAMeta(
            token_slot=ts, sorted_token_ids=self.sorted_token_ids, seg_starts=self.seg_starts,
            seg_slots=self.seg_slots, num_segments=self.num_segments, tile_slots=self.tile_slots,
            tile_starts=self.tile_starts, tile_ends=self.tile_ends, num_tiles=self.num_tiles,
            num_tokens=T, block_m=BM, max_slots=L,
            grid_tiles=grid_tiles_for(T, BM, L if max_segments is None else max(1, min(L, max_segments))),
        )
