"""Segment-tiled multi-LoRA shrink and expand for large steps (SGMV style, > 64 tokens).

Semantics (as lora_shrink + lora_expand), for every token t with slot a = token_slot[t] >= 0:
    parts[k, s, t, :r_a] = x[t, K_k] @ lora_a[a, s, :r_a, K_k].T        (K_k: the k-th K chunk, fp32)
    y[t, off_s:off_{s+1}] += (sum_k parts[k, s, t, :r_a]) @ lora_b[a, off_s:off_{s+1}, :r_a].T
r_a = min(ranks[a], R); the partial sum is rounded to lora_b's dtype before the product, the product
accumulates in fp32 and y is rounded once (as punica / vLLM and our other expands). DoRA's epilogue
(scale / shift / scale_on) as in lora_expand.

Kernels in lora_seg_kernels.py. Why another pair: at 256-1024 tokens the LoRA step is a pair of skinny GEMMs whose bytes are x (shrink)
and y read + written (expand). The tile kernels (lora_shrink / lora_expand_stream) run one program per
(16-32-row tile, rank block, slice) for the shrink, so x is read once per slice and A once per 16-32
rows, and the 1024-token "reduced" path adds a torch.sum launch between them.
Here:
  * shrink: program (row block, K chunk); a row block is GROUP consecutive meta tiles (GROUP * block_m
    rows); ALL slices and ranks in one [BLOCK_M, BLOCK_N >= S * R] accumulator, so x is read once per
    K chunk and A once per row block; the split-K partials go to [SPLIT_K, S, T, R] (no torch.sum).
  * expand: program (row block, column group); the row block's partials are summed once (fixed order)
    into h [BLOCK_M, R] per slice, kept in registers while the program walks its column blocks: per
    block one B load [BLOCK_N, R], one tl.dot, one y tile read and written.
A row block whose tiles belong to several slots runs one pass per slot over the whole block, rows of
other slots masked off (masked lanes move no bytes; the MMA work is repeated, so GROUP > 1 is for long
segments: 1 token run per block).
Switched by LORASERVE_LORA_SEG (lora_apply's "seg" path; see seg_applies).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import HAS_TRITON
from .lora_meta import LoRAMeta, pdl_launch

# lora_apply takes the "seg" path for steps of SEG_MIN_TOKENS.. tokens (LORASERVE_LORA_SEG=0: off); read at each call.
# On by default: H200 probe 2026-12-01 04:34 (bench_lora_kernels --compare, the 10 >= 32 MB shapes, same run): median
# 0.512 -> 0.554 of copy with probe 1's rules (each seg shape faster but o r64 / 32 adapters / 1024 tokens, 26.2 ->
# 29.7 us, fixed since by the expand's rank-64 rule); GPU tests (8B widths vs float64, graph == eager) passed.
SEG_ENABLED = os.environ.get("LORASERVE_LORA_SEG", "1").strip().lower() not in ("", "0", "false", "off", "no")
SEG_MIN_TOKENS = max(65, int(os.environ.get("LORASERVE_LORA_SEG_MIN_TOKENS", "256")))
SEG_MAX_NR_LONG = int(os.environ.get("LORASERVE_LORA_SEG_MAX_NR_LONG", str(1 << 20)))   # see seg_applies
SEG_MAX_RANK = 64   # the ranks compiled (sm_90 offline) and measured; larger pools keep the tile kernels
_SEG_FAILED: set[tuple] = set()   # (S, R, device) whose seg kernels failed to compile: the tile path then

if HAS_TRITON:
    from .lora_seg_kernels import _seg_expand_kernel, _seg_shrink_kernel  # noqa: F401  (tests import them here)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _num_sms(device: torch.device) -> int:
    from .lora_shrink import _num_sms as sms

    return sms(device.index if device.type == "cuda" else None)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def seg_applies(num_tokens: int, rank: int, num_slices: int, x: Tensor, n_total: int = 0) -> bool:
    """lora_apply takes the "seg" path: on, >= SEG_MIN_TOKENS tokens, rank <= 64, <= 3 slices, bf16/fp16 on a GPU
    (fp32 only under the interpreter) and no earlier compile failure for these shapes; not for 257..384 tokens
    (lora_apply.partials_max_tokens: the mixed steps keep their measured partials path); not for >= 512 tokens of a
    projection with N * R >= 2^20 (gate_up at rank 64): its B (3.7 MB per adapter) is re-read per 32-row tile, as
    many bytes as the tile's y, and the tile kernels measured faster there (H200 probe 2026-12-01 04:10, one adapter,
    1024 tokens: 68.7 us tile vs 99.8 seg)."""
    if num_tokens >= 512 and n_total * rank >= SEG_MAX_NR_LONG:
        return False
    from .lora_apply import partials_max_tokens

    if 256 < num_tokens <= partials_max_tokens():   # the mixed steps (a 256-token chunk + decode rows): the
        return False   # "partials" path measured there (bench_churn, issue 12); seg unmeasured at those steps
    return (SEG_ENABLED and num_tokens >= SEG_MIN_TOKENS and rank <= SEG_MAX_RANK and num_slices <= 3
            and not (x.is_cuda and x.dtype == torch.float32) and (num_slices, rank, x.device) not in _SEG_FAILED)


def seg_adapt() -> bool:
    """Row blocks of GROUP > 1 tiles take one pass when their tiles share a slot, else one TILE_M-row pass per tile
    (decided on the device per block): LORASERVE_LORA_SEG_ADAPT (default off); read at each call."""
    return bool(_env_int("LORASERVE_LORA_SEG_ADAPT", 0))


def seg_group(num_tokens: int, block_m: int, num_slices: int = 1) -> int:
    """Meta tiles per row block (GROUP): LORASERVE_LORA_SEG_GROUP, else 1 (the tiles as built). Always 1 for 3 or more
    slices: there the GROUP > 1 kernels fail triton 3.6's pipeliner (H200 05:33 and 05:43: PassManager failure for qkv
    at max rank 64 and 16), and a launch that fell back would run the tile kernels instead."""
    if num_slices >= 3:
        return 1
    return max(1, _env_int("LORASERVE_LORA_SEG_GROUP", 1))


def seg_shrink_config(num_tokens: int, rank: int, hidden_in: int, num_slices: int, block_m: int, grid_tiles: int,
                      num_sms: int = 132) -> dict:
    """Launch parameters from host-known sizes: K split until the grid holds ~SEG_SHRINK_PER_SM programs per SM
    (every tile assumed active), each K chunk a whole number of BLOCK_K, at least 2 blocks."""
    group = seg_group(num_tokens, block_m, num_slices)
    rp = max(16, _pow2(rank))
    block_n = max(16, _pow2(num_slices * rp))
    group = max(1, min(group, 128 * 128 // (block_m * block_n)))   # the fp32 accumulator <= 64 KB (no spills)
    block_m_rows = block_m * group
    stages = _env_int("LORASERVE_LORA_SEG_SHRINK_STAGES", 4)
    block_k = 128 if block_n * block_m_rows <= 64 * 64 else 64
    while block_k > 32 and stages * (block_m_rows + block_n) * block_k * 2 > 160 * 1024:   # x + A stages in shared
        block_k //= 2
    block_k = _env_int("LORASERVE_LORA_SEG_SHRINK_BK", block_k)
    # rank > 32: ~1 program per SM (fewer K splits: longer K loops, fewer planes for the last split to sum). H200 probe
    # 2026-12-01 04:34 vs 2 per SM: qkv r64 / 32 adapters / 256 tokens shrink 22.7 -> 20.5 us (pair 34.8 -> 32.0),
    # gate_up r64 / 16 / 256 16.3 -> 11.4 (43.8 -> 39.9), o r64 / 32 / 1024 14.2 -> 11.0 (29.6 -> 25.9). Rank <= 32
    # keeps 2 per SM (as measured there: gate_up r16 / 16 / 256 19.5 us, down r16 / 4 / 1024 16.6; 1 per SM unmeasured)
    # Rank <= 32 on inputs <= 8192 wide: LORASERVE_LORA_SEG_SHRINK_PER_SM_NARROW (default 1; 2 as before). H200 final
    # 2026-12-01 05:29, 1 per SM at rank 16: gate_up r16 / 16 adapters / 256 tokens 19.24 -> 17.91 us, qkv r16 / 1 / 1024
    # 17.26 -> 16.45, but down r16 / 4 / 1024 (14336 wide) 17.13 -> 19.36, hence the width bound; probe 22:04 (same run,
    # twice): gate_up r16 19.21 / 19.26 -> 18.03 / 18.15, qkv r16 17.35 / 17.21 -> 16.43 / 16.44.
    narrow = _env_int("LORASERVE_LORA_SEG_SHRINK_PER_SM_NARROW", 1) if hidden_in <= 8192 else 2
    per_sm = _env_int("LORASERVE_LORA_SEG_SHRINK_PER_SM", 1 if rank > 32 else narrow)
    rows = -(-grid_tiles // group)
    k_blocks = -(-hidden_in // block_k)
    split = 1
    while rows * split < per_sm * num_sms and k_blocks >= 4 * split:
        split *= 2
    split = _env_int("LORASERVE_LORA_SEG_SPLIT", split)
    warps = _env_int("LORASERVE_LORA_SEG_SHRINK_WARPS", 8 if block_n * block_m_rows >= 128 * 64 else 4)
    # the reduction's unroll: planes in flight at once, each [rows, BLOCK_N] fp32 = tile_regs registers a thread
    tile_regs = max(1, block_m_rows * block_n // (32 * warps))
    red_unroll = max(1, min(4, 96 // tile_regs))
    return dict(GROUP=group, RP=rp, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps, ADAPT=seg_adapt(),
                RED_UNROLL=red_unroll,
                num_stages=stages)


def seg_early() -> tuple[bool, bool]:
    """(EARLY, TRIGGER_EARLY) for PDL launches: LORASERVE_LORA_SEG_EARLY (the pair's metadata chains before their
    griddepcontrol.wait, the shrink letting the expand launch right after its own wait) and LORASERVE_LORA_SEG_XTRIGGER
    (the expand letting the next kernel launch right after its wait); both default off (probe knobs); read at each
    call. Results are bit-identical either way (only when the loads and launches happen changes)."""
    return bool(_env_int("LORASERVE_LORA_SEG_EARLY", 0)), bool(_env_int("LORASERVE_LORA_SEG_XTRIGGER", 0))


def seg_reduce(planes: int | None = None) -> bool:
    """The shrink's last K split of each row block sums the partials into one more plane of the workspace (the
    expand then reads that plane only): LORASERVE_LORA_SEG_REDUCE (default on), and only where the workspace has
    more than LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT planes (default 4: splits of <= 4 are summed by the expand, each
    column group's program loading the <= 4 planes itself, with no arrival counter, no last-split tail in the shrink;
    1: wherever there is a split, the default before the fourteenth session). planes: the workspace's leading dim
    (None: the switch alone). Read at each call.
    H200 probe 2026-12-01 22:05 (same run, ~1 shrink program per SM, split 4, us): o r64 / 32 adapters / 1024 tokens
    23.28 / 22.90 (default, twice) -> 22.48 without the reduction, qkv r64 / 32 / 256 33.07 / 32.57 -> 30.95; probe
    22:28 (10 shapes): >= 32 MB median 0.613 -> 0.630 with 4, 0.629 with 8, layer 0.327 -> 0.321, 1 token 3.38 -> 3.35
    (the tenth session: no reduction at 16 planes lost, hence the floor)."""
    on = os.environ.get("LORASERVE_LORA_SEG_REDUCE", "1").strip().lower() not in ("", "0", "false", "off", "no")
    return on and (planes is None or planes > max(1, seg_reduce_min_split()))


def seg_reduce_min_split() -> int:
    return _env_int("LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT", 4)


def seg_split_k(x: Tensor, lora_a: Tensor, meta: LoRAMeta) -> int:
    """The workspace's leading dim for lora_seg_shrink: SPLIT_K partial planes, plus the reduced plane when
    seg_reduce() is on and SPLIT_K > 1."""
    _, S, R, H = lora_a.shape
    sk = seg_shrink_config(x.shape[0], R, H, S, meta.block_m, meta.grid_tiles, _num_sms(x.device))["SPLIT_K"]
    if x.is_cuda and x.device not in _COUNTERS and not torch.cuda.is_current_stream_capturing():
        _counters(x.device, meta.grid_tiles)   # now, so that a graph captured before any seg launch finds them
    return sk + 1 if seg_reduce(sk) else sk


_COUNTERS: dict[torch.device, Tensor] = {}


def _counters(device: torch.device, num: int) -> Tensor:
    """Zeroed int32 arrival counters, one per row block; every launch leaves them zero again."""
    cnt = _COUNTERS.get(device)
    if cnt is None or cnt.numel() < num:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("lora_seg: counters first needed inside CUDA graph capture; run this step eagerly first")
        cnt = _COUNTERS[device] = torch.zeros(max(num, 4096), dtype=torch.int32, device=device)
    return cnt


def seg_expand_config(num_tokens: int, n_total: int, rank: int, block_m: int, grid_tiles: int,
                      num_sms: int = 132, num_slices: int = 1) -> dict:
    """Column blocks of BLOCK_N (256; 128 at rank > 64), grouped so that the grid holds ~SEG_EXPAND_PER_SM programs
    per SM (every tile assumed active)."""
    group = seg_group(num_tokens, block_m, num_slices)
    block_n = _env_int("LORASERVE_LORA_SEG_BN", 256 if rank <= 64 else 128)
    # accumulator <= 32 KB fp32 (with h of 3 slices and y, two blocks of it with Y_AHEAD: no spills at 8 warps)
    block_n = min(block_n, max(16, _pow2(n_total)), max(16, 128 * 64 // (block_m * group)))
    nblocks = -(-n_total // block_n)
    rows = -(-grid_tiles // group)
    # H200 probe 04:10: 4 programs per SM at rank 64 (o r64 / 32 adapters / 1024 tokens 11.9 -> 10.4 us, qkv r64 /
    # 256 tokens 13.3 -> 11.6), 8 at rank 16 (gate_up r16 / 16 adapters / 256 tokens 11.4 vs 15.8 with 4)
    per_sm = _env_int("LORASERVE_LORA_SEG_EXPAND_PER_SM", 8 if rank <= 32 else 4)
    groups = max(1, min(nblocks, -(-per_sm * num_sms // rows)))
    bpp = _env_int("LORASERVE_LORA_SEG_BPP", -(-nblocks // groups))
    return dict(GROUP=group, BLOCK_N=block_n, BLOCKS_PER_PROG=bpp, num_warps=_env_int("LORASERVE_LORA_SEG_WARPS", 8),
                # (not with 128-row blocks of 3 rank-64 slices: h alone takes 48 registers there, sm_90 spills)
                # y one block ahead at 32-row tiles (>= 512 tokens) and rank <= 32 (down r16 / 4 adapters expand 5.6 ->
                # 5.4 us, qkv r16 / 1 adapter 9.5 -> 9.4), not at 16 rows (256 tokens: qkv r64 13.3 -> 15.8, gate_up r16
                # 11.4 -> 14.5; probe 04:10) nor at rank 64 with 4 programs per SM (o r64 / 32 adapters / 1024 tokens
                # 10.4 -> 13.3, down r64 10.8 -> 13.8; probes 04:10 / 04:34)
                Y_AHEAD=bool(_env_int("LORASERVE_LORA_SEG_YAHEAD", int(block_m >= 32 and rank <= 32)))
                and block_m * group * num_slices * rank < 128 * 192,
                ADAPT=seg_adapt(),
                num_stages=_env_int("LORASERVE_LORA_SEG_STAGES", 2))


def lora_seg_shrink(x: Tensor, lora_a: Tensor, meta: LoRAMeta, ranks: Tensor, out: Tensor, *,
                    config: dict | None = None) -> Tensor:
    """out[k, s, t, :r] = x[t, K_k] @ lora_a[slot(t), s, :r, K_k].T: the split-K partials, one launch.

    x [T, H] fp16/bf16 (fp32 under the interpreter); lora_a [L, S, R, H] same dtype (any strides);
    out [P, S, T, R] float32 (seg_split_k gives P): P split-K partials, or with seg_reduce(P) on,
    P - 1 partials and their fixed-order sum in out[P - 1]; entries of tokens without an adapter and columns
    >= rank undefined."""
    T, H = x.shape
    L, S, R, H2 = lora_a.shape
    assert H2 == H and x.dtype == lora_a.dtype, f"x [{T}, {H}] {x.dtype} vs lora_a {tuple(lora_a.shape)} {lora_a.dtype}"
    assert out.dim() == 4 and out.shape[1:] == (S, T, R) and out.dtype == torch.float32, \
        f"out must be float32 [SPLIT_K, S={S}, T={T}, R={R}], got {out.dtype} {tuple(out.shape)}"
    assert meta.num_tokens == T and ranks.shape == (L,) and ranks.dtype == torch.int32
    assert S <= 3 and R <= SEG_MAX_RANK, f"seg kernels take <= 3 slices and rank <= {SEG_MAX_RANK}"
    if T == 0:
        return out
    cfg = dict(seg_shrink_config(T, R, H, S, meta.block_m, meta.grid_tiles, _num_sms(x.device)), **(config or {}))
    reduce = seg_reduce(out.shape[0])
    SK, BK = out.shape[0] - reduce, cfg["BLOCK_K"]
    k_chunk = -(-(-(-H // SK)) // BK) * BK
    grid = (-(-meta.grid_tiles // cfg["GROUP"]), SK)
    count = _counters(x.device, grid[0]) if reduce else ranks
    _seg_shrink_kernel[grid](
        x, lora_a, out, ranks, count, meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        meta.grid_tiles, H, R, k_chunk,
        x.stride(0), x.stride(1), *lora_a.stride(), *out.stride(),
        NUM_SLICES=S, RP=cfg["RP"], TILE_M=meta.block_m, GROUP=cfg["GROUP"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BK,
        EVEN_K=H == k_chunk * SK, IEEE=x.dtype == torch.float32, REDUCE=reduce, ADAPT=cfg["ADAPT"],
        RED_UNROLL=cfg["RED_UNROLL"], **_early_kw(x.device, shrink=True),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(x.device),
    )
    return out


def lora_seg_expand(parts: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta, ranks: Tensor, y: Tensor,
                    *, scale: Tensor | None = None, shift: Tensor | None = None, scale_on: Tensor | None = None,
                    config: dict | None = None) -> Tensor:
    """y[t, off_s:off_{s+1}] += (sum_k parts[k, s, t, :r]) @ lora_b[slot(t), off_s:off_{s+1}, :r].T, one launch.

    parts [P, S, T, R] float32 as lora_seg_shrink leaves it (with seg_reduce(P) on only the last plane,
    the sum, is read; else the P planes are summed here); [S, T, R] also taken; lora_b [L, N, R] with y's dtype;
    slice_offsets [S+1] int32 on the device; y [T, N] (column views allowed), updated in place, rows of tokens
    without an adapter untouched; scale / shift [L, N] float32 and scale_on [L] int32 as for lora_expand."""
    if parts.dim() == 3:
        parts = parts.unsqueeze(0)
    elif seg_reduce(parts.shape[0]):   # lora_seg_shrink left the sum in the last plane
        parts = parts[-1:]
    SK, S, T, R = parts.shape
    L, N, R2 = lora_b.shape
    assert R2 == R and parts.dtype == torch.float32, f"parts {parts.dtype} {tuple(parts.shape)} vs lora_b rank {R2}"
    assert y.shape == (T, N) and y.dtype == lora_b.dtype, f"y must be [{T}, {N}] {lora_b.dtype}"
    assert slice_offsets.shape == (S + 1,) and slice_offsets.dtype == torch.int32
    assert meta.num_tokens == T and ranks.shape == (L,) and ranks.dtype == torch.int32
    if scale is not None:
        assert scale.shape == (L, N) and scale.dtype == torch.float32, "scale must be float32 [L, N]"
    if shift is not None:
        assert scale is not None and shift.shape == scale.shape and shift.stride() == scale.stride() \
            and shift.dtype == torch.float32, "shift must match scale (float32 [L, N])"
    if T == 0 or N == 0:
        return y
    cfg = dict(seg_expand_config(T, N, R, meta.block_m, meta.grid_tiles, _num_sms(y.device), S), **(config or {}))
    BN, bpp = cfg["BLOCK_N"], cfg["BLOCKS_PER_PROG"]
    grid = (-(-meta.grid_tiles // cfg["GROUP"]), -(-(-(-N // BN)) // bpp))
    _seg_expand_kernel[grid](
        parts, lora_b, y, ranks, slice_offsets, y if scale is None else scale, y if shift is None else shift,
        ranks if scale_on is None else scale_on,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        meta.grid_tiles, N, R, bpp,
        *parts.stride(), *lora_b.stride(), y.stride(0), y.stride(1), *((0, 0) if scale is None else scale.stride()),
        NUM_SLICES=S, BOUNDS_P2=max(2, _pow2(S - 1)), RP=max(16, _pow2(R)), TILE_M=meta.block_m, GROUP=cfg["GROUP"],
        BLOCK_N=BN, SPLIT_K=SK, EVEN_N=N % BN == 0, EVEN_R=R == max(16, _pow2(R)), HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_FLAGS=scale is not None and scale_on is not None, Y_AHEAD=cfg["Y_AHEAD"], ADAPT=cfg["ADAPT"],
        **_early_kw(y.device, shrink=False), PF_THREADS=32 * cfg["num_warps"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(y.device),
    )
    return y


def _early_kw(device: torch.device, shrink: bool) -> dict:
    """seg_early()'s constexprs where set (nothing when off: the default kernels' compiled keys stay as they were)."""
    early, trig = seg_early()
    if not pdl_launch(device):
        return {}
    kw = {"EARLY": True} if early else {}
    if trig and not shrink:
        kw["TRIGGER_EARLY"] = True
    if early and not shrink and _env_int("LORASERVE_LORA_SEG_EARLY_B", 0):   # + the expand's B run into L2 first
        kw["PREFETCH_B"] = True
    return kw


def seg_apply(x: Tensor, y: Tensor, lora_a: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta,
              ranks: Tensor, buf: Tensor, scale: Tensor | None, shift: Tensor | None,
              scale_on: Tensor | None) -> bool:
    """lora_apply's "seg" path: shrink into buf (seg_split_k planes), expand into y. False (y untouched) when the
    kernels failed to compile for these shapes on a GPU: they are then off for them (seg_applies), and lora_apply
    takes the tile path."""
    try:
        lora_seg_shrink(x, lora_a, meta, ranks, buf)
    except Exception as exc:  # noqa: BLE001 - compile / resource failure: the tile kernels instead
        if not x.is_cuda:
            raise
        _fail(x, lora_a, exc)
        return False
    try:
        lora_seg_expand(buf, lora_b, slice_offsets, meta, ranks, y, scale=scale, shift=shift, scale_on=scale_on)
    except Exception as exc:  # noqa: BLE001 - (the shrink wrote only buf: nothing of y changed)
        if not x.is_cuda:
            raise
        _fail(x, lora_a, exc)
        return False
    return True


def _fail(x: Tensor, lora_a: Tensor, exc: Exception) -> None:
    import warnings

    _, S, R, _ = lora_a.shape
    _SEG_FAILED.add((S, R, x.device))
    warnings.warn(f"segment-tiled LoRA kernels failed for S={S}, R={R} ({exc!r}); using the tile kernels")

