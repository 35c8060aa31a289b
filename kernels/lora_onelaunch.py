"""Multi-LoRA shrink + expand in ONE launch with ticketed roles (no residency requirement).

Semantics: as lora_shrink followed by lora_expand (see those modules), for every token t with
slot a = token_slot[t] >= 0 and slice s with columns [off_s, off_{s+1}) of y:
    h = x[t] @ lora_a[a, s, :r_a].T                     (fp32 accumulate, rounded to B's dtype)
    y[t, off_s:off_{s+1}] += h @ lora_b[a, off_s:off_{s+1}, :r_a].T
Rows of tokens without an adapter (or r_a = 0) are never touched.

Why: at decode sizes every launch costs ~3 us of fixed latency (launch, metadata chain, first
DRAM round trip, tail) on an H200, so shrink + expand as two launches per projection cost 8
launches per layer. lora_fused.py fuses them with a grid barrier, which needs the whole grid
resident at once. Here a 1-D grid of P_shrink + P_expand programs takes its role from a
*ticket* (an atomic counter), not from program_id:
  * tickets [0, P_shrink): shrink item (tile, slice, K chunk) -> fp32 partial in
    ws [SPLIT_K, S, T, R], then a release increment of the tile's done counter;
  * tickets [P_shrink, P): expand item (tile, column run of COLS_PER_PROG): issues its first
    B blocks and y block (B does not depend on the shrink), THEN waits for its own tile's
    done counter to reach S * SPLIT_K, sums the partials in a fixed order (bitwise
    reproducible, graph replay == eager) and streams its columns as lora_expand_stream does.
A program waits only on shrink tickets, and every shrink ticket is held by a program that is
already running and never waits: no deadlock whatever the occupancy. The last program out
resets the counters, so every launch (and graph replay) starts from zero. The counters are
per device: launches of one device must be serialised on one stream (as for lora_fused).
Under TRITON_INTERPRET=1 programs run one after another, tickets come in order, and the waits
are satisfied at once.

Opt-in: LORASERVE_LORA_ONELAUNCH=1 (lora_apply). Measured on an H200 (kernels/PERF_NOTES.md): it
is SLOWER than the two-launch default (64 tokens / 32 adapters: layer 95 vs 68 us; 1 token 10.0 vs
6.6 us per projection; 3.2 us with nothing to do, vs 2.6 for two empty launches): the ticket, release,
acquire and exit atomics make a longer dependent chain than the kernel boundary they replace. Kept
as a tested building block, not as a default.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .lora_meta import LoRAMeta

if HAS_TRITON:

    @triton.jit
    def _sum_parts(ws_ptr, s, tok, h_mask, offs_r, stride_wk, stride_ws, stride_wm, stride_wr,
                   SPLIT_K: tl.constexpr, SK_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
        """[BLOCK_M, BLOCK_R] fp32: sum over the SPLIT_K partials of slice s, in a fixed order.
        .cg: the partials were written by other SMs during this launch (L1 is not coherent)."""
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j0 in tl.static_range(0, SPLIT_K, SK_CHUNK):
            jj = j0 + tl.arange(0, SK_CHUNK)
            ptrs = (ws_ptr + s * stride_ws + jj[:, None, None] * stride_wk + tok[None, :, None] * stride_wm
                    + offs_r[None, None, :] * stride_wr)
            p = tl.load(ptrs, mask=(jj < SPLIT_K)[:, None, None] & h_mask[None, :, :], other=0.0,
                        cache_modifier=".cg")
            h += tl.sum(p, axis=0)
        return h

    @triton.jit
    def _lora_onelaunch_kernel(
        x_ptr, a_ptr, b_ptr, y_ptr, ws_ptr, sync_ptr, ranks_ptr, slice_off_ptr, scale_ptr, shift_ptr,
        sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
        K, N, R, K_CHUNK, COLS_PER_PROG, NUM_TILES, GROUPS, NUM_PROGRAMS,
        stride_xm, stride_xk,
        stride_al, stride_as, stride_ar, stride_ak,
        stride_bl, stride_bn, stride_bk,
        stride_ym, stride_yn,
        stride_wk, stride_ws, stride_wm, stride_wr, stride_sl, stride_sn,
        NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr, SK_CHUNK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        SYNC_P2: tl.constexpr, CAST: tl.constexpr, IEEE: tl.constexpr,
        HAS_SCALE: tl.constexpr = False, HAS_SHIFT: tl.constexpr = False,
    ):
        # sync: [0] ticket counter, [1] programs that left, [2 + tile] shrink items done per tile.
        item = tl.atomic_add(sync_ptr, 1, sem="relaxed")
        P_SHRINK = NUM_TILES * (NUM_SLICES * SPLIT_K)
        offs_r = tl.arange(0, BLOCK_R)
        if item < P_SHRINK:
            tile = item // (NUM_SLICES * SPLIT_K)
            j = item % (NUM_SLICES * SPLIT_K)
            s = j // SPLIT_K
            ks = j % SPLIT_K
            slot = tl.load(tile_slots_ptr + tile)
            start = tl.load(tile_starts_ptr + tile)
            end = tl.load(tile_ends_ptr + tile)
            rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R)
            if (slot >= 0) & (rank > 0):
                offs_m = start + tl.arange(0, BLOCK_M)
                row_ok = offs_m < end
                tok = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
                r_ok = offs_r < rank
                k0 = ks * K_CHUNK
                k_stop = tl.minimum(K, k0 + K_CHUNK)
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
                a_ptrs = (a_ptr + slot.to(tl.int64) * stride_al + s * stride_as
                          + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak)
                h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for kk in range(0, K_CHUNK, BLOCK_K):
                    k_ok = offs_k < k_stop - kk
                    xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    at = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    if IEEE:
                        h += tl.dot(xt, tl.trans(at), input_precision="ieee")
                    else:
                        h += tl.dot(xt, tl.trans(at))
                    x_ptrs += BLOCK_K * stride_xk
                    a_ptrs += BLOCK_K * stride_ak
                w_ptrs = (ws_ptr + ks * stride_wk + s * stride_ws + tok[:, None] * stride_wm
                          + offs_r[None, :] * stride_wr)
                tl.store(w_ptrs, h, mask=row_ok[:, None] & r_ok[None, :])
            tl.debug_barrier()  # every thread's partial store precedes the release (cumulative)
            tl.atomic_add(sync_ptr + 2 + tile, 1, sem="release")
        else:
            e = item - P_SHRINK
            tile = e // GROUPS
            col0 = (e % GROUPS) * COLS_PER_PROG
            slot = tl.load(tile_slots_ptr + tile)
            start = tl.load(tile_starts_ptr + tile)
            end = tl.load(tile_ends_ptr + tile)
            rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R)
            if (slot >= 0) & (rank > 0) & (tile < NUM_TILES):
                offs_m = start + tl.arange(0, BLOCK_M)
                row_ok = offs_m < end
                tok = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
                if NUM_SLICES >= 2:
                    lo1 = tl.load(slice_off_ptr + 1)
                if NUM_SLICES == 3:
                    lo2 = tl.load(slice_off_ptr + 2)
                col_end = tl.minimum(col0 + COLS_PER_PROG, N)
                # B's rank axis is contiguous: whole 16-wide chunks up to ceil16(rank) (vector loads);
                # the extra columns meet h = 0.
                b_mask_r = ((offs_r // 16 * 16 < rank) & (offs_r < R))[None, :]
                b_rows = b_ptr + slot.to(tl.int64) * stride_bl + offs_r[None, :] * stride_bk
                offs_nb = tl.arange(0, BLOCK_N)
                offs_n = col0 + offs_nb
                # B's first two blocks and y's first block are issued BEFORE the wait: they do not
                # depend on the shrink, so their latency overlaps it.
                b_cur = tl.load(b_rows + offs_n[:, None] * stride_bn, mask=(offs_n < col_end)[:, None] & b_mask_r,
                                other=0.0)
                offs_n1 = offs_n + BLOCK_N
                b_nxt = tl.load(b_rows + offs_n1[:, None] * stride_bn,
                                mask=(offs_n1 < col_end)[:, None] & b_mask_r, other=0.0)
                y_rows = y_ptr + tok[:, None] * stride_ym
                y_cur = tl.load(y_rows + offs_n[None, :] * stride_yn,
                                mask=row_ok[:, None] & (offs_n < col_end)[None, :], other=0.0)
                # Wait for this tile's S * SPLIT_K shrink items (plain polling, then one acquire whose
                # value feeds the row mask, so the partial loads cannot be hoisted above it).
                need = NUM_SLICES * SPLIT_K
                done = tl.load(sync_ptr + 2 + tile, volatile=True)
                while done < need:
                    done = tl.load(sync_ptr + 2 + tile, volatile=True)
                done = tl.atomic_add(sync_ptr + 2 + tile, 0, sem="acquire")
                tl.debug_barrier()
                ready = tl.full((BLOCK_M,), 0, tl.int32) + done >= need  # [BLOCK_M] bool, all true
                h_mask = (row_ok & ready)[:, None] & (offs_r < rank)[None, :]
                h0 = _sum_parts(ws_ptr, 0, tok, h_mask, offs_r, stride_wk, stride_ws, stride_wm, stride_wr,
                                SPLIT_K, SK_CHUNK, BLOCK_M, BLOCK_R)
                if NUM_SLICES >= 2:
                    h1 = _sum_parts(ws_ptr, 1, tok, h_mask, offs_r, stride_wk, stride_ws, stride_wm, stride_wr,
                                    SPLIT_K, SK_CHUNK, BLOCK_M, BLOCK_R)
                if NUM_SLICES == 3:
                    h2 = _sum_parts(ws_ptr, 2, tok, h_mask, offs_r, stride_wk, stride_ws, stride_wm, stride_wr,
                                    SPLIT_K, SK_CHUNK, BLOCK_M, BLOCK_R)
                if CAST:  # h is rounded to B's dtype before the product, as punica / vLLM do
                    h0 = h0.to(b_ptr.dtype.element_ty)
                    if NUM_SLICES >= 2:
                        h1 = h1.to(b_ptr.dtype.element_ty)
                    if NUM_SLICES == 3:
                        h2 = h2.to(b_ptr.dtype.element_ty)
                for i in tl.range(0, tl.cdiv(col_end - col0, BLOCK_N), num_stages=1):
                    n0 = col0 + i * BLOCK_N
                    offs_n = n0 + offs_nb
                    n_ok = offs_n < col_end
                    offs_n2 = offs_n + 2 * BLOCK_N
                    b_nn = tl.load(b_rows + offs_n2[:, None] * stride_bn,
                                   mask=(offs_n2 < col_end)[:, None] & b_mask_r, other=0.0)
                    offs_n1 = offs_n + BLOCK_N
                    y_nxt = tl.load(y_rows + offs_n1[None, :] * stride_yn,
                                    mask=row_ok[:, None] & (offs_n1 < col_end)[None, :], other=0.0)
                    btt = tl.trans(b_cur)
                    if IEEE:
                        acc = tl.dot(h0, btt, input_precision="ieee")
                    else:
                        acc = tl.dot(h0, btt)
                    if NUM_SLICES >= 2:  # per column, the product of the column's own slice
                        if IEEE:
                            d1 = tl.dot(h1, btt, input_precision="ieee")
                        else:
                            d1 = tl.dot(h1, btt)
                        acc = tl.where(offs_n[None, :] >= lo1, d1, acc)
                    if NUM_SLICES == 3:
                        if IEEE:
                            d2 = tl.dot(h2, btt, input_precision="ieee")
                        else:
                            d2 = tl.dot(h2, btt)
                        acc = tl.where(offs_n[None, :] >= lo2, d2, acc)
                    out = y_cur.to(tl.float32) + acc
                    if HAS_SCALE:  # DoRA: (y + delta) * g[slot] (+ shift[slot]), as lora_expand's epilogue
                        g = tl.load(scale_ptr + slot.to(tl.int64) * stride_sl + offs_n * stride_sn, mask=n_ok,
                                    other=1.0)
                        out = out * g[None, :]
                        if HAS_SHIFT:
                            c = tl.load(shift_ptr + slot.to(tl.int64) * stride_sl + offs_n * stride_sn, mask=n_ok,
                                        other=0.0)
                            out = out + c[None, :]
                    tl.store(y_rows + offs_n[None, :] * stride_yn, out.to(y_cur.dtype),
                             mask=row_ok[:, None] & n_ok[None, :])
                    b_cur = b_nxt
                    b_nxt = b_nn
                    y_cur = y_nxt
        # The last program out resets every counter for the next launch (all tickets are taken and
        # every wait is over by then).
        left = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") + 1
        if left == NUM_PROGRAMS:
            offs = tl.arange(0, SYNC_P2)
            tl.store(sync_ptr + offs, tl.zeros((SYNC_P2,), dtype=tl.int32), mask=offs < 2 + NUM_TILES)


ONELAUNCH_MAX_RANK = 64
ONELAUNCH_MAX_SLICES = 3
ONELAUNCH_MAX_TOKENS = 256  # lora_apply's range for it (benchmarks may raise it; read at each call)
SHRINK_PROGRAMS_PER_SM = 2   # shrink items: enough to fill the SMs with a K chunk each
EXPAND_PROGRAMS_PER_SM = 4   # expand items (as lora_expand_stream's grid target)

_SYNC: dict[torch.device, Tensor] = {}


def onelaunch_applies(num_tokens: int, rank: int, num_slices: int) -> bool:
    """Shapes lora_apply sends here when the switch is on (the kernel itself takes any T)."""
    return 0 < num_tokens <= ONELAUNCH_MAX_TOKENS and rank <= ONELAUNCH_MAX_RANK and num_slices <= ONELAUNCH_MAX_SLICES


def onelaunch_plan(num_tokens: int, rank: int, hidden_in: int, n_total: int, num_slices: int, block_m: int,
                   grid_tiles: int, num_sms: int = 132, *, shrink_per_sm: float | None = None,
                   expand_per_sm: float | None = None, block_k: int | None = None,
                   block_n: int | None = None, num_warps: int | None = None, num_stages: int = 3) -> dict:
    """Launch plan from host-known sizes only (a CUDA graph captured for (T, N) stays valid).

    SPLIT_K: shrink items = grid_tiles x S x SPLIT_K ~ shrink_per_sm x SMs, each >= one K block;
    expand: grid_tiles x GROUPS items of COLS_PER_PROG columns (whole BLOCK_N blocks) ~
    expand_per_sm x SMs. All grid tiles count as active (distinct adapters: the decode case)."""
    shrink_per_sm = SHRINK_PROGRAMS_PER_SM if shrink_per_sm is None else shrink_per_sm
    expand_per_sm = EXPAND_PROGRAMS_PER_SM if expand_per_sm is None else expand_per_sm
    block_r = max(16, 1 << max(0, (rank - 1).bit_length()))
    # 256-wide K blocks at 16 tokens or more, but at most 8192 A elements per block: rank 64 x 256
    # spilled registers in the sm_90 offline compile (down, 256 tokens).
    block_k = block_k or min(128 if num_tokens <= 16 else 256, 8192 // block_r)
    block_k = min(block_k, max(16, 1 << max(0, (hidden_in - 1).bit_length())))
    k_blocks = -(-hidden_in // block_k)
    split_k = max(1, min(32, k_blocks, round(shrink_per_sm * num_sms / max(1, grid_tiles * num_slices))))
    k_chunk = -(-k_blocks // split_k) * block_k
    split_k = -(-hidden_in // k_chunk)
    block_n = block_n or max(32, min(128, 4096 // block_r, 4096 // block_m))
    block_n = min(block_n, max(32, 1 << max(0, (n_total - 1).bit_length())))
    n_blocks = -(-n_total // block_n)
    groups = max(1, min(n_blocks, round(expand_per_sm * num_sms / max(1, grid_tiles))))
    blocks_per_prog = -(-n_blocks // groups)
    groups = -(-n_blocks // blocks_per_prog)
    sk_chunk = max(1, min(1 << max(0, (split_k - 1).bit_length()), 8192 // (num_slices * block_m * block_r)))
    sk_chunk = 1 << (sk_chunk.bit_length() - 1)
    num_programs = grid_tiles * num_slices * split_k + grid_tiles * groups
    return dict(BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=block_r, SPLIT_K=split_k, K_CHUNK=k_chunk,
                SK_CHUNK=sk_chunk, COLS_PER_PROG=blocks_per_prog * block_n, GROUPS=groups,
                num_programs=num_programs, num_warps=num_warps or (4 if block_m * block_n <= 2048 else 8),
                num_stages=num_stages)


def _sync_counters(device: torch.device, num_tiles: int) -> Tensor:
    sync = _SYNC.get(device)
    if sync is None or sync.numel() < 2 + num_tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("lora one-launch kernel: counters first needed inside CUDA graph capture; "
                               "run this token count eagerly once first")
        sync = _SYNC[device] = torch.zeros(max(2 + num_tiles, 1024), dtype=torch.int32, device=device)
    return sync


def _num_sms(device: torch.device) -> int:
    from .lora_shrink import _num_sms as sms

    return sms(device.index if device.type == "cuda" else None)


def onelaunch_split_k(x: Tensor, lora_a: Tensor, lora_b: Tensor, meta: LoRAMeta) -> int:
    """The SPLIT_K of the default plan (the workspace's leading dim)."""
    L, S, R, H = lora_a.shape
    return onelaunch_plan(x.shape[0], R, H, lora_b.shape[1], S, meta.block_m, meta.grid_tiles,
                          _num_sms(x.device))["SPLIT_K"]


def lora_onelaunch(x: Tensor, lora_a: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta,
                   ranks: Tensor, y: Tensor, ws: Tensor | None = None, *, config: dict | None = None,
                   scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """y[t, off_s:off_s+1] += (x[t] @ A[a, s, :r].T) @ B[a, off_s:off_s+1, :r].T in one launch.

    x [T, H_in]; lora_a [L, S, R, H_in] (S <= 3, R <= 64); lora_b [L, N, R]; all one dtype;
    slice_offsets [S+1] int32; meta for T tokens; ranks [L] int32; y [T, N] (column view
    allowed), updated in place and returned. ws: float32 [SPLIT_K, S, T, R] workspace of the
    plan (allocated when None). config: keyword overrides of :func:`onelaunch_plan` (benchmarks).
    scale, shift: DoRA's optional float32 [L, N] epilogue, exactly as lora_expand's.
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
    if scale is not None:
        assert scale.shape == (L, N) and scale.dtype == torch.float32 and scale.device == y.device, \
            f"scale must be float32 [L={L}, N={N}] on y's device, got {scale.dtype} {tuple(scale.shape)}"
    if shift is not None:
        assert scale is not None and shift.shape == scale.shape and shift.stride() == scale.stride() \
            and shift.dtype == torch.float32 and shift.device == y.device, "shift must match scale (float32 [L, N])"
    if T == 0 or N == 0:
        return y
    if R > ONELAUNCH_MAX_RANK or S > ONELAUNCH_MAX_SLICES:
        raise ValueError(f"one-launch LoRA kernel takes rank <= {ONELAUNCH_MAX_RANK} and <= "
                         f"{ONELAUNCH_MAX_SLICES} slices, got R={R}, S={S}: use lora_apply")
    plan = onelaunch_plan(T, R, H, N, S, meta.block_m, meta.grid_tiles, _num_sms(x.device), **(config or {}))
    SK = plan["SPLIT_K"]
    if ws is None:
        ws = torch.empty((SK, S, T, R), dtype=torch.float32, device=x.device)
    assert ws.shape == (SK, S, T, R) and ws.dtype == torch.float32, f"ws must be float32 [{SK}, {S}, {T}, {R}]"
    tiles = meta.grid_tiles
    sync = _sync_counters(x.device, tiles)
    grid = (plan["num_programs"],)
    _lora_onelaunch_kernel[grid](
        x, lora_a, lora_b, y, ws, sync, ranks, slice_offsets, y if scale is None else scale,
        y if shift is None else shift, meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        H, N, R, plan["K_CHUNK"], plan["COLS_PER_PROG"], tiles, plan["GROUPS"], plan["num_programs"],
        x.stride(0), x.stride(1), *lora_a.stride(), *lora_b.stride(), y.stride(0), y.stride(1), *ws.stride(),
        *((0, 0) if scale is None else scale.stride()),
        NUM_SLICES=S, SPLIT_K=SK, SK_CHUNK=plan["SK_CHUNK"], BLOCK_M=meta.block_m, BLOCK_N=plan["BLOCK_N"],
        BLOCK_K=plan["BLOCK_K"], BLOCK_R=plan["BLOCK_R"], SYNC_P2=triton.next_power_of_2(2 + tiles),
        CAST=lora_b.dtype != torch.float32, IEEE=x.dtype == torch.float32,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    return y
