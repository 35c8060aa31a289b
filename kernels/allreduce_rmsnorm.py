"""One-shot all-reduce fused with the residual add and RMSNorm, for tensor parallelism on one host
(TensorRT-LLM's fused AllReduce + RMSNorm with its Lamport one-shot protocol; vLLM's custom all-reduce).

Semantics (rank q of W, row t of T; the same on every rank, bit for bit):
    s[t]        = round(sum over p = 0..W-1, in rank order, of x_p[t] in fp32)     (the all-reduce)
    residual[t] <- round(s[t].f32 + residual[t].f32)                             (in place)
    x[t]        <- w * round(residual[t].f32 * rsqrt(mean(residual[t].f32^2) + eps))  (in place)
x: [T, H] this rank's partial output of a row-parallel layer (o_proj / down_proj), bf16 or fp16;
residual: [T, H]; w: [H]. Equal to `all_reduce(x)` followed by kernels/rmsnorm.fused_add_rms_norm.

Protocol (no barrier, one launch, one program per row): every rank owns a symmetric buffer
[2 slots, W regions, max_rows, H] mapped into its peers' address space (PyTorch symmetric memory,
P2P over NVLink, no multicast), filled with -0.0, the "empty" marker. Row t's program
  1. stores its row (a real -0.0 sent as +0.0: the same sum) into region q of slot c % 2 of every
     peer's buffer, c = the row's call counter (a [max_rows] int32 on this rank, advanced by the program
     itself, so graph replays move it too; every rank runs the same calls, so the counters agree);
  2. reads the other regions of slot c % 2 of its own buffer until no element is -0.0 (each element
     is its own flag: no fence, no flag word), sums in rank order, writes -0.0 back (clear on read);
  3. adds the residual and normalises.
Two slots suffice: a peer writes slot c % 2 again only at call c + 2 of this row, which needs this
rank's data of call c + 1, which this rank sends only after this kernel (call c) ended.
A peer that never arrives: the program gives up after MAX_SPIN reads (minutes) and sums what it has;
the engine has marked the group dead by then (tp/executor.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .pdl import pdl_kwargs

EMPTY_BITS = -32768   # 0x8000 as int16: -0.0 in bf16 and fp16
# reads of a peer's row before giving up: ~2^28 L2 round trips, minutes (LORASERVE_TP_TIMEOUT_S is 300 s): a peer
# silent that long is dead and the executor has marked the engine so; the step's result is garbage by then
MAX_SPIN = 1 << 28


def allreduce_add_rms_norm_ref(partials: list[Tensor], residual: Tensor, weight: Tensor, eps: float
                               ) -> tuple[Tensor, Tensor]:
    """Pure-torch reference: (normed [T, H], new residual [T, H]) from every rank's partial [T, H]."""
    acc = torch.zeros(partials[0].shape, dtype=torch.float32, device=partials[0].device)
    for p in partials:
        acc += p.float()
    s = acc.to(partials[0].dtype)
    h = (s.float() + residual.float()).to(residual.dtype)
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * normed, h


if HAS_TRITON:
    _EMPTY = tl.constexpr(EMPTY_BITS)   # a global a @jit function may read

    @triton.jit
    def _allreduce_rms_norm_kernel(x_ptr, res_ptr, w_ptr, buf_ptr, deltas_ptr, counter_ptr, H, eps,
                                   stride_x, stride_r, slot_stride, region_stride,
                                   RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                                   MAX_SPIN: tl.constexpr, USE_PDL: tl.constexpr = False,
                                   PUSHED: tl.constexpr = False):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < H
        if USE_PDL:   # kernels/pdl.py: x, the residual and the counters come from kernels before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        dtype = x.dtype
        empty = tl.full([BLOCK], _EMPTY, tl.int16).to(dtype, bitcast=True)
        send = tl.where(x.to(tl.int16, bitcast=True) == _EMPTY, tl.zeros([BLOCK], dtype), x)
        count = tl.load(counter_ptr + row)
        at = (count % 2).to(tl.int64) * slot_stride + row * H + offs   # + region * region_stride
        # 1. push: my row into region RANK of every peer's buffer (PUSHED: the GEMM before us did, tile by tile,
        #    kernels/tp_gemm_push.py)
        for p in tl.static_range(WORLD):
            if p != RANK and not PUSHED:
                # peer p's buffer = mine + deltas[p] elements; both 16-byte aligned, so the stores go out as
                # 16-byte vectors (alignment is known from buf_ptr, not from an address loaded as an integer)
                delta = tl.multiple_of(tl.load(deltas_ptr + p), 8)
                tl.store(buf_ptr + delta + at + RANK * region_stride, send, mask=ok)
        # 2. pull: the peers' rows from my buffer, summed in rank order (the same order on every rank)
        acc = tl.zeros([BLOCK], tl.float32)
        for p in tl.static_range(WORLD):
            if p == RANK:
                acc += x.to(tl.float32)
            else:
                src = buf_ptr + at + p * region_stride
                v = tl.load(src, mask=ok, other=0.0, volatile=True)
                missing = tl.sum(((v.to(tl.int16, bitcast=True) == _EMPTY) & ok).to(tl.int32), axis=0)
                spins = tl.full([], 0, tl.int32)
                while (missing > 0) & (spins < MAX_SPIN):
                    v = tl.load(src, mask=ok, other=0.0, volatile=True)
                    missing = tl.sum(((v.to(tl.int16, bitcast=True) == _EMPTY) & ok).to(tl.int32), axis=0)
                    spins += 1
                acc += v.to(tl.float32)
                tl.store(src, empty, mask=ok)   # clear on read: empty again for call count + 2
        tl.store(counter_ptr + row, count + 1)
        # 3. residual add and RMSNorm (kernels/rmsnorm.py's numerics)
        s = acc.to(dtype)
        r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0)
        h = (s.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_ptr + row * stride_r + offs, h, mask=ok)
        hf = h.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / H + eps)
        normed = (hf * inv).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * stride_x + offs, (w * normed).to(dtype), mask=ok)


def allreduce_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, buffer: Tensor, deltas: Tensor,
                           counters: Tensor, rank: int, world: int, max_rows: int, max_spin: int = MAX_SPIN,
                           num_warps: int | None = None, pushed: bool = False) -> tuple[Tensor, Tensor]:
    """x [T, H] (this rank's partial) and residual [T, H], both updated in place (see the module doc);
    returns (x, residual). pushed: x came from kernels/tp_gemm_push.gemm_push with the same buffer and counters
    (its rows are in the peers' buffers already: step 1 is skipped). buffer: this rank's symmetric buffer, [2, world, max_rows, H] 16-bit elements;
    deltas: int64 [world], rank p's buffer address minus this one's, in elements (0 for this rank);
    counters: int32 [max_rows] on this device."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use allreduce_add_rms_norm_ref")
    assert x.dim() == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1, "x/residual: [T, H], last dim contiguous"
    T, H = x.shape
    assert x.dtype in (torch.bfloat16, torch.float16), f"bf16/fp16 only (-0.0 marks empty), got {x.dtype}"
    assert residual.shape == x.shape and residual.dtype == x.dtype and weight.shape == (H,)
    assert T <= max_rows and counters.numel() >= T and deltas.numel() == world and deltas.dtype == torch.int64
    assert buffer.numel() >= 2 * world * max_rows * H and buffer.element_size() == 2
    if T == 0:
        return x, residual
    region = max_rows * H
    block = triton.next_power_of_2(H)
    _allreduce_rms_norm_kernel[(T,)](x, residual, weight, buffer.view(x.dtype), deltas, counters, H, eps,
                                     x.stride(0), residual.stride(0), world * region, region, RANK=rank, WORLD=world,
                                     BLOCK=block, MAX_SPIN=max_spin, PUSHED=bool(pushed),
                                     num_warps=num_warps or min(16, max(1, block // 512)),
                                     **pdl_kwargs(x.device))
    return x, residual
