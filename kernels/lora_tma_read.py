"""Pure-read streaming kernels: how fast can one launch read a LoRA projection's adapter bytes?

A measuring tool for the LoRA kernels' bandwidth question (kernels/PERF_NOTES.md, issue 10): every
LoRA kernel streams its adapter bytes at ~1.9-2.0 TB/s at the 64-token layer case (gate_up's expand:
29.4 MB of B in ~15 us) while copies move ~4.2 TB/s (read + write). These kernels read the same bytes
(a flat bf16 buffer, e.g. the pool's B of 32 slots) and sum them, so only the read path differs:

    out[p] = sum of src[p's contiguous run] (fp32)       src: [E] (flat), out: [P] fp32

  * read_plain: P programs, each walks its run in UNROLL x BLOCK-element steps of plain tl.load into
    registers (STAGES > 1: the loop goes to Triton's pipeliner, cp.async into shared memory);
  * read_tma: the same runs through a host TMA descriptor over a 2D view [E / COLS, COLS], boxes of
    [ROWS, COLS], the loop pipelined by Triton with STAGES boxes in flight (shared memory, mbarriers:
    STAGES x ROWS x COLS x 2 bytes per program in flight without holding a register).

Runs are split in whole blocks (boxes): program p takes blocks [p * per, min((p + 1) * per, nblocks)),
so a run is one contiguous byte range, as an expand program's run of B columns is. Reference: the sum of
the same range in fp32 (torch); the order of the fp32 adds differs, so compare with a tolerance.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _read_plain_kernel(src_ptr, out_ptr, nblocks, per_prog, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
                           STAGES: tl.constexpr):
        pid = tl.program_id(0)
        b0 = pid * per_prog
        n = tl.minimum(per_prog, nblocks - b0)   # whole UNROLL * BLOCK steps: the mask is a per-step scalar
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        base = src_ptr + b0.to(tl.int64) * (UNROLL * BLOCK)
        for i in tl.range(0, n, num_stages=STAGES):
            for u in tl.static_range(UNROLL):   # UNROLL independent loads in flight per step
                acc += tl.load(base + (i * UNROLL + u) * BLOCK + offs).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _read_tma_kernel(desc, out_ptr, nblocks, per_prog, ROWS: tl.constexpr, COLS: tl.constexpr,
                         STAGES: tl.constexpr):
        pid = tl.program_id(0)
        b0 = pid * per_prog
        n = tl.minimum(per_prog, nblocks - b0)
        acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
        for i in tl.range(0, n, num_stages=STAGES):   # Triton pipelines descriptor loads (TMA) on sm_90
            acc += desc.load([(b0 + i) * ROWS, 0]).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


def _runs(num_blocks: int, programs: int) -> tuple[int, int]:
    """(blocks per program, programs actually launched) for num_blocks split into <= programs runs."""
    per = -(-num_blocks // max(1, programs))
    return per, -(-num_blocks // per)


def read_plain(src: Tensor, programs: int, block: int = 4096, unroll: int = 1, stages: int = 1,
               num_warps: int = 4, out: Tensor | None = None) -> Tensor:
    """Sum of src (flat, contiguous) per program run, plain loads. src.numel() must be a multiple of
    block * unroll. Returns out [programs launched] fp32."""
    assert src.is_contiguous() and src.numel() % (block * unroll) == 0, "src: whole UNROLL x BLOCK steps"
    nblocks = src.numel() // (block * unroll)
    per, grid = _runs(nblocks, programs)
    if out is None:
        out = torch.empty(grid, dtype=torch.float32, device=src.device)
    _read_plain_kernel[(grid,)](src, out, nblocks, per, BLOCK=block, UNROLL=unroll, STAGES=stages,
                                num_warps=num_warps, num_stages=max(1, stages))
    return out


def tma_view(src: Tensor, cols: int) -> Tensor:
    """src (flat, contiguous) as [E / cols, cols]: TMA's 2D view (rows of cols x 2 bytes, a multiple of 16)."""
    assert src.is_contiguous() and src.numel() % cols == 0
    return src.view(-1, cols)


def read_tma(src: Tensor, programs: int, rows: int = 128, cols: int = 64, stages: int = 4, num_warps: int = 4,
             out: Tensor | None = None, desc=None) -> Tensor:
    """Sum of src per program run through a TMA descriptor (boxes [rows, cols] of the [E / cols, cols]
    view). src.numel() must be a multiple of rows * cols. desc: a prebuilt descriptor (make_desc)."""
    assert src.numel() % (rows * cols) == 0, "src: whole boxes"
    view = tma_view(src, cols)
    nblocks = view.shape[0] // rows
    per, grid = _runs(nblocks, programs)
    if out is None:
        out = torch.empty(grid, dtype=torch.float32, device=src.device)
    if desc is None:
        desc = make_desc(view, rows, cols)
    _read_tma_kernel[(grid,)](desc, out, nblocks, per, ROWS=rows, COLS=cols, STAGES=stages, num_warps=num_warps,
                              num_stages=max(1, stages))
    return out


def make_desc(view: Tensor, rows: int, cols: int):
    """A host TMA descriptor over a 2D contiguous view with [rows, cols] boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(view, list(view.shape), list(view.stride()), [rows, cols])


def read_ref(src: Tensor, programs: int, step: int) -> Tensor:
    """What read_plain / read_tma return: fp32 sums of src's runs of whole `step`-element blocks."""
    flat = src.reshape(-1).float()
    per, grid = _runs(flat.numel() // step, programs)
    return torch.stack([flat[p * per * step:(p + 1) * per * step].sum() for p in range(grid)])
