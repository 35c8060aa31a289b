"""Multi-LoRA shrink + expand in ONE launch for small steps, with an in-kernel grid barrier.

Semantics: as lora_shrink followed by lora_expand (see those modules), for every token t with
slot a = token_slot[t] >= 0 and slice s with columns [off_s, off_{s+1}) of y:
    h = x[t] @ lora_a[a, s, :r_a].T                     (fp32 accumulate, rounded to B's dtype)
    y[t, off_s:off_{s+1}] += h @ lora_b[a, off_s:off_{s+1}, :r_a].T
Rows of tokens without an adapter (or r_a = 0) are never touched.

Why: at a few tokens the unfused kernels are 2-3 dependent launches of a few microseconds
each for well under a megabyte of weights. A first version had every program recompute the
whole rank-r intermediate of its rows before its column block of the expand: one launch, but
each program then streamed all of A (128-458 KB at Llama-3-8B shapes) alone, 10-32 us
(measured on an H200), slower than the launches it saved.

So the grid (tile, column block) works in two phases split by a grid barrier:
  1. shrink: program (tile, j) with j < S * SPLIT_K computes the fp32 partial of slice
     j // SPLIT_K over K-chunk j % SPLIT_K and stores it in ws [SPLIT_K, S, T, R];
  2. barrier: every program adds 1 to an arrival counter, then spins until all P programs
     have arrived (acquire/release atomics, partials read past L1);
  3. expand: each program sums its rows' partials in a fixed order (bitwise reproducible,
     graph replay == eager), rounds to B's dtype and adds its column block of h @ B.T to y.
The last program to leave resets the counters, so every launch (and graph replay) starts
from zero. A spin barrier needs all P programs resident at once: the launcher only takes
grids of at most FUSED_MAX_PROGRAMS_PER_SM per SM (lora_apply falls back to two launches
otherwise) and checks the compiled kernel's registers and shared memory before the first
launch (``barrier_fits``); the launches of one device must be serialised on one stream.
Where the barrier is not safe, and under TRITON_INTERPRET=1 (programs run one after
another, a barrier would never open), the two phases are two launches of the same kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta

if HAS_TRITON:

    @triton.jit
    def _lora_fused_kernel(
        x_ptr, a_ptr, b_ptr, y_ptr, ws_ptr, sync_ptr, ranks_ptr, slice_off_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        K, N, R, K_CHUNK, NUM_PROGRAMS,
        stride_xm, stride_xk,
        stride_al, stride_as, stride_ar, stride_ak,
        stride_bl, stride_bn, stride_bk,
        stride_ym, stride_yn,
        stride_wk, stride_ws, stride_wm, stride_wr,
        NUM_SLICES: tl.constexpr, BOUNDS_P2: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        PHASE: tl.constexpr, CAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        # PHASE 0: both phases with the grid barrier; 1: shrink only; 2: expand only.
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(tile_slots_ptr + tile)
        rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R)
        active = (slot >= 0) & (rank > 0)
        start = tl.load(tile_starts_ptr + tile)
        end = tl.load(tile_ends_ptr + tile)
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < tl.where(active, end, start)  # no rows for unused tiles
        tok = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank

        if PHASE != 2:
            if active & (pid_n < NUM_SLICES * SPLIT_K):
                s = pid_n // SPLIT_K
                k0 = (pid_n % SPLIT_K) * K_CHUNK
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
                a_ptrs = (a_ptr + slot.to(tl.int64) * stride_al + s * stride_as
                          + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak)
                h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for kk in range(0, K_CHUNK, BLOCK_K):
                    k_ok = offs_k < tl.minimum(K, k0 + K_CHUNK) - kk
                    xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    at = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    if IEEE:
                        h += tl.dot(xt, tl.trans(at), input_precision="ieee")
                    else:
                        h += tl.dot(xt, tl.trans(at))
                    x_ptrs += BLOCK_K * stride_xk
                    a_ptrs += BLOCK_K * stride_ak
                w_ptrs = (ws_ptr + (pid_n % SPLIT_K) * stride_wk + s * stride_ws + tok[:, None] * stride_wm
                          + offs_r[None, :] * stride_wr)
                tl.store(w_ptrs, h, mask=row_ok[:, None] & r_ok[None, :])
        if PHASE == 0:
            # Grid barrier: release our partial, wait for everyone's (see module docstring).
            tl.debug_barrier()  # all threads' partial stores precede the release (as grid.sync)
            arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel") + 1
            if active:
                while arrived < NUM_PROGRAMS:  # plain polling reads past L1, then one acquire
                    arrived = tl.load(sync_ptr, volatile=True)
            # The acquire pairs with every program's release; its value (still >= P: nobody
            # resets before all have left) feeds the row mask so the atomic is not dropped.
            arrived = tl.atomic_add(sync_ptr, 0, sem="acquire")
            row_ok = row_ok & (arrived >= NUM_PROGRAMS)
            tl.debug_barrier()
        if PHASE != 1:
            if active:
                n0 = pid_n * BLOCK_N
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < N
                if NUM_SLICES == 1:
                    s_first = 0
                    s_last = 0
                else:  # slices covered by columns [n0, min(n0 + BLOCK_N, N)), as in lora_expand
                    bi = tl.arange(0, BOUNDS_P2)
                    bounds = tl.load(slice_off_ptr + 1 + bi, mask=bi < NUM_SLICES - 1, other=2147483647)
                    n_last = tl.minimum(n0 + BLOCK_N, N) - 1
                    s_first = tl.sum((bounds <= n0).to(tl.int32), axis=0)
                    s_last = tl.sum((bounds <= n_last).to(tl.int32), axis=0)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                h_mask = row_ok[:, None] & r_ok[None, :]
                for s in range(s_first, s_last + 1):
                    if NUM_SLICES == 1:
                        col_ok = n_ok
                    else:
                        lo = tl.load(slice_off_ptr + s)
                        hi = tl.load(slice_off_ptr + s + 1)
                        col_ok = (offs_n >= lo) & (offs_n < hi)
                    h_ptrs = ws_ptr + s * stride_ws + tok[:, None] * stride_wm + offs_r[None, :] * stride_wr
                    h = tl.load(h_ptrs, mask=h_mask, other=0.0, cache_modifier=".cg")
                    for j in range(1, SPLIT_K):  # fixed order: bitwise reproducible
                        h += tl.load(h_ptrs + j * stride_wk, mask=h_mask, other=0.0, cache_modifier=".cg")
                    bt = tl.load(b_ptr + slot.to(tl.int64) * stride_bl + offs_n[:, None] * stride_bn
                                 + offs_r[None, :] * stride_bk, mask=col_ok[:, None] & r_ok[None, :], other=0.0)
                    if CAST:
                        hb = h.to(bt.dtype)
                    else:
                        hb = h
                    if IEEE:
                        acc += tl.dot(hb, tl.trans(bt), input_precision="ieee")
                    else:
                        acc += tl.dot(hb, tl.trans(bt))
                y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
                y_ok = row_ok[:, None] & n_ok[None, :]
                yv = tl.load(y_ptrs, mask=y_ok, other=0.0)
                tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(yv.dtype), mask=y_ok)
        if PHASE == 0:
            # The last program out resets both counters for the next launch.
            left = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") + 1
            if left == NUM_PROGRAMS:
                tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
                tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed")


# Tuned on an H200 at Llama-3-8B shapes, bf16 (benchmarks/bench_lora_kernels.py --sweep-fused).
FUSED_BLOCK_K = 128
FUSED_MAX_SPLIT_K = 32
FUSED_MAX_PROGRAMS_PER_SM = 2  # resident at once for sure: <= 4 warps and ~50 KB smem each
FUSED_NUM_WARPS = 4
FUSED_MAX_RANK = 64
FUSED_MAX_TOKENS = 64  # cross-over against two launches not measured beyond

_SYNC: dict[torch.device, Tensor] = {}
_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def fused_plan(num_tokens: int, max_slots: int, block_m: int, rank: int, hidden_in: int, n_total: int,
               num_slices: int, device: torch.device, *, block_n: int | None = None,
               block_k: int | None = None) -> dict | None:
    """Launch plan for these host-known shapes, or None when the fused kernel does not apply
    (the grid could not all be resident at once, the rank is too large for registers, or
    the step is past the measured range). block_n / block_k override the defaults (tests)."""
    if rank > FUSED_MAX_RANK or num_tokens == 0 or num_tokens > FUSED_MAX_TOKENS:
        return None
    block_n = block_n or (256 if n_total >= 16384 else 128 if n_total >= 1024 else 32)
    block_k = block_k or FUSED_BLOCK_K
    tiles = -(-num_tokens // block_m) + min(max_slots, num_tokens)
    n_blocks = -(-n_total // block_n)
    if tiles * n_blocks > FUSED_MAX_PROGRAMS_PER_SM * _num_sms(device) or n_blocks < num_slices:
        return None
    k_blocks = -(-hidden_in // block_k)
    split_k = max(1, min(FUSED_MAX_SPLIT_K, n_blocks // num_slices, k_blocks))
    k_chunk = -(-k_blocks // split_k) * block_k
    split_k = -(-hidden_in // k_chunk)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, K_CHUNK=k_chunk,
                grid=(tiles, n_blocks), num_warps=FUSED_NUM_WARPS, num_stages=3)


def _sync_counters(device: torch.device) -> Tensor:
    sync = _SYNC.get(device)
    if sync is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("lora fused kernel first used inside CUDA graph capture: run it eagerly once first")
        sync = _SYNC[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return sync


def lora_shrink_expand(x: Tensor, lora_a: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta,
                       ranks: Tensor, y: Tensor, ws: Tensor | None = None, *, plan: dict | None = None) -> Tensor:
    """y[t, off_s:off_s+1] += (x[t] @ A[a, s, :r].T) @ B[a, off_s:off_s+1, :r].T in one launch.

    x [T, H_in]; lora_a [L, S, R, H_in]; lora_b [L, N, R] (R <= 64), all one dtype;
    slice_offsets [S+1] int32; meta for T tokens; ranks [L] int32; y [T, N] (column view
    allowed), updated in place and returned. ws: float32 [SPLIT_K, S, T, R] workspace
    (``plan["SPLIT_K"]``; allocated when None). plan: override of :func:`fused_plan`.
    Raises ValueError when the shapes do not fit the fused kernel (fused_plan is None).
    """
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use the torch reference (loraserve.kernels.reference)")
    T, H = x.shape
    L, S, R, H2 = lora_a.shape
    L2, N, R2 = lora_b.shape
    assert H2 == H and L2 == L and R2 == R, f"shapes x {tuple(x.shape)} A {tuple(lora_a.shape)} B {tuple(lora_b.shape)}"
    assert x.dtype == lora_a.dtype == lora_b.dtype == y.dtype, "x, lora_a, lora_b and y must share a dtype"
    assert y.shape == (T, N), f"y must be [T={T}, N={N}], got {tuple(y.shape)}"
    assert slice_offsets.shape == (S + 1,) and slice_offsets.dtype == torch.int32
    assert ranks.shape == (L,) and ranks.dtype == torch.int32, "ranks must be int32 [L]"
    assert meta.num_tokens == T, f"meta built for {meta.num_tokens} tokens, x has {T}"
    if T == 0 or N == 0:
        return y
    plan = plan or fused_plan(T, meta.max_slots, meta.block_m, R, H, N, S, x.device)
    if plan is None:
        raise ValueError(f"fused LoRA kernel does not apply to T={T}, R={R}, H={H}, N={N}: use lora_apply")
    SK = plan["SPLIT_K"]
    if ws is None:
        ws = torch.empty((SK, S, T, R), dtype=torch.float32, device=x.device)
    assert ws.shape == (SK, S, T, R) and ws.dtype == torch.float32, f"ws must be float32 [{SK}, {S}, {T}, {R}]"
    grid = plan["grid"]
    assert grid[0] == meta.grid_tiles, "plan built for another tile grid"
    sync = _sync_counters(x.device)
    args = (x, lora_a, lora_b, y, ws, sync, ranks, slice_offsets,
            meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
            H, N, R, plan["K_CHUNK"], grid[0] * grid[1],
            x.stride(0), x.stride(1), *lora_a.stride(), *lora_b.stride(), y.stride(0), y.stride(1),
            *ws.stride())
    kw = dict(NUM_SLICES=S, BOUNDS_P2=max(2, 1 << max(0, (S - 2).bit_length())), SPLIT_K=SK,
              BLOCK_M=meta.block_m, BLOCK_N=plan["BLOCK_N"], BLOCK_K=plan["BLOCK_K"],
              BLOCK_R=max(16, triton.next_power_of_2(R)),
              CAST=lora_b.dtype != torch.float32, IEEE=x.dtype == torch.float32,
              num_warps=plan["num_warps"], num_stages=plan["num_stages"])
    if x.is_cuda and barrier_fits(args, grid, kw, x.device):
        _lora_fused_kernel[grid](*args, PHASE=0, **kw)
    else:  # interpreter (programs run one by one) or a grid that might not all be resident
        _lora_fused_kernel[grid](*args, PHASE=1, **kw)
        _lora_fused_kernel[grid](*args, PHASE=2, **kw)
    return y


_FITS: dict[tuple, bool] = {}


def barrier_fits(args: tuple, grid: tuple[int, int], kw: dict, device: torch.device) -> bool:
    """True when the compiled kernel's registers, shared memory and threads let all grid
    programs be resident at once (else the spin barrier could wait forever). Memoised."""
    key = (device, grid, tuple(sorted(kw.items())))
    fits = _FITS.get(key)
    if fits is None:
        try:
            k = _lora_fused_kernel.warmup(*args, grid=grid, PHASE=0, **kw)
            k._init_handles()
            props = torch.cuda.get_device_properties(device)
            threads = kw["num_warps"] * 32
            per_sm = min(getattr(props, "max_threads_per_multi_processor", 2048) // threads,
                         getattr(props, "regs_per_multiprocessor", 65536) // max(1, k.n_regs * threads),
                         getattr(props, "shared_memory_per_multiprocessor", 233472) // max(1, k.metadata.shared),
                         32)
            fits = k.n_spills == 0 and grid[0] * grid[1] <= per_sm * props.multi_processor_count
        except Exception:  # noqa: BLE001 - an API we cannot read: take the two-launch path
            fits = False
        _FITS[key] = fits
    return fits
