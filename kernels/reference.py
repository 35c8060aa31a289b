"""Pure-torch references for lora_shrink / lora_expand (same signatures, same rounding).

They are the ground truth for the Triton kernels and the CPU engine's fast path, so they are
written per *segment* (one slot's tokens at a time, a couple of matmuls each), never per
token. Math is done in fp32 and rounded exactly where the kernels round: shrink stores fp32;
expand rounds buf to lora_b's dtype, accumulates in fp32, then stores (y + acc) in y's dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .lora_meta import LoRAMeta


def lora_shrink_ref(x: Tensor, lora_a: Tensor, meta: LoRAMeta, ranks: Tensor, out: Tensor) -> Tensor:
    """out[s, t, :r] = x[t] @ lora_a[slot(t), s, :r].T  (shapes as in lora_shrink).

    x [T, H_in]; lora_a [L, S, R, H_in]; ranks [L] int; out [S, T, R] float32, in place.
    """
    T, H = x.shape
    L, S, R, _ = lora_a.shape
    assert out.shape == (S, T, R) and out.dtype == torch.float32, \
        f"out must be float32 [S={S}, T={T}, R={R}], got {out.dtype} {tuple(out.shape)}"
    rank_of = ranks.tolist()
    for slot, ids in meta.segments():
        r = min(int(rank_of[slot]), R)
        if r <= 0:
            continue
        ids = ids.to(x.device)
        xs = x.index_select(0, ids).float()                   # (n, H)
        a = lora_a[slot, :, :r, :].float()                    # (S, r, H)
        out[:, ids, :r] = torch.matmul(xs, a.transpose(1, 2))  # (S, n, r)
    return out


def lora_expand_ref(buf: Tensor, lora_b: Tensor, slice_offsets: Tensor, meta: LoRAMeta,
                    ranks: Tensor, y: Tensor, *, scale: Tensor | None = None,
                    shift: Tensor | None = None) -> Tensor:
    """y[t, off_s:off_s+1] += buf[s, t, :r] @ lora_b[slot(t), off_s:off_s+1, :r].T, in place;
    with a DoRA scale, y[t] = (y[t] + delta[t]) * scale[slot(t)] (+ shift[slot(t)]) (fp32, rounded once).

    buf [S, T, R] float32; lora_b [L, N, R]; slice_offsets [S+1] int; y [T, N] (may be a view);
    scale, shift [L, N] float32 or None (shift only with scale).
    """
    S, T, R = buf.shape
    offs = [int(o) for o in slice_offsets.tolist()]
    assert len(offs) == S + 1 and offs[-1] == lora_b.shape[1] == y.shape[1], \
        f"slice_offsets {offs} do not match S={S}, N={lora_b.shape[1]}, y {tuple(y.shape)}"
    rank_of = ranks.tolist()
    for slot, ids in meta.segments():
        r = min(int(rank_of[slot]), R)
        if r <= 0:
            continue
        ids = ids.to(y.device)
        # Round the fp32 intermediate to B's dtype, as the kernel feeds its tensor-core dot.
        h = buf[:, ids, :r].to(lora_b.dtype).float()          # (S, n, r)
        b = lora_b[slot, :, :r].float()                       # (N, r)
        delta = torch.cat([h[s] @ b[offs[s]:offs[s + 1]].T for s in range(S)], dim=1)  # (n, N)
        out = y.index_select(0, ids).float() + delta                       # (n, N) fp32
        if scale is not None:
            out = out * scale[slot].float()
            if shift is not None:
                out = out + shift[slot].float()
        y[ids] = out.to(y.dtype)
    return y


def dora_scale_rows(y: Tensor, scale: Tensor, meta: LoRAMeta, ranks: Tensor,
                    shift: Tensor | None = None) -> Tensor:
    """y[t] = y[t] * scale[slot(t)] (+ shift[slot(t)]) for every token whose slot has rank > 0 (what the expand epilogue
    does, as a separate pass: fp32 product rounded to y's dtype). Device ops only, no host sync
    (usable inside a CUDA graph). y [T, N] (may be a view); scale, shift [L, N] float32."""
    slot = meta.token_slot[: y.shape[0]].long()                             # (T,)
    idx = slot.clamp(min=0)
    adapted = (slot >= 0) & (ranks.index_select(0, idx) > 0)                # (T,)
    scaled = y.float() * scale.index_select(0, idx).float()                 # (T, N)
    if shift is not None:
        scaled = scaled + shift.index_select(0, idx).float()
    scaled = scaled.to(y.dtype)
    y.copy_(torch.where(adapted[:, None], scaled, y))
    return y


from .lora_apply import lora_apply  # noqa: E402,F401  (re-export: the convenience lives beside)
