"""L2 prefetch of a LoRA kernel's adapter bytes before its griddepcontrol.wait (sm_90+, PDL launches).

Why: every LoRA shrink measured on the H200 lands on ~3 us + bytes / 2.6 TB/s (PERF_NOTES, "Dense
LoRA kernels and the overlap"): a single wave that pays its launch, a metadata chain and the first
DRAM round trip, then streams A at well under copy bandwidth. Launched as a programmatic dependent
(LORASERVE_LORA_PDL, on by default), a program already sits on its SM while the kernel before it
(the base GEMM in the engine, the previous projection's expand in a benchmark chain) finishes; it
only waits because x, the partials or y may not be written yet. The adapter weights and the step's
tile metadata are older than that kernel (the expand already reads them before its wait), so the
program can put its share of A (shrink) or its run of B columns (expand) in flight into L2 first,
with one TMA bulk prefetch per thread (`cp.async.bulk.prefetch.L2.global`: no registers, no
scoreboard, nothing to wait for); after the wait its loads hit L2. A prefetch never changes a
result: outputs are bit-identical with it on or off.

Switches (read at each launch, so CUDA graphs keep what they captured), LORASERVE_LORA_PREFETCH, a
string of letters ("" = off):
  a  the BGMV shrink loads its tile's metadata and its [16, BLOCK_K] block of A into registers before
     waiting for the kernel before it (x after the wait);
  l  the tiled dot shrink loads its metadata and bulk-prefetches its part of A into L2 before its wait;
  b  the streaming expand prefetches its whole column run of B into L2 before its wait (its first
     blocks were already loaded there);
  t  the streaming expand lets the next kernel launch at its start (griddepcontrol.launch_dependents):
     the next projection's shrink can then fetch its A while this expand streams B. Safe for the
     kernels after it: each one's first wait still orders it after the expand's completion.
Only with PDL on a Hopper-or-newer GPU (never under the interpreter: inline PTX does not run there).
H200 probe (2026-11-30 22:01, 64 tokens / 32 adapters / r16, us per layer; PERF_NOTES): the L2 bulk
prefetches lose ("l" alone 58.0 -> 67.0: each shrink alone is faster, the pair slower; "b" slows the
expand), registers ("a", with the BGMV shrink at 64 tokens) and the trigger win.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def l2_prefetch(base, nbytes, NT: tl.constexpr):
        """Bytes [base, base + nbytes) into L2: NT bulk prefetches of <= ceil16(nbytes / NT) bytes, one
        per thread of a program of NT threads (NT = num_warps * 32). base 16-byte aligned, nbytes a
        multiple of 16 (int64 scalar); nbytes <= 0 prefetches nothing."""
        p8 = base.to(tl.pointer_type(tl.int8))
        chunk = (nbytes + (NT * 16 - 1)) // (NT * 16) * 16
        offs = tl.arange(0, NT).to(tl.int64) * chunk
        size = tl.minimum(tl.maximum(nbytes - offs, 0), chunk).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [p8 + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_on(letter: str, device: torch.device, pdl_kwargs: dict) -> bool:
    """LORASERVE_LORA_PREFETCH holds `letter` and PDL is on for this launch (lora_meta.pdl_launch's
    `pdl_kwargs`): never under the interpreter or on a pre-Hopper GPU."""
    from . import lora_meta

    return bool(pdl_kwargs.get("USE_PDL")) and device.type == "cuda" and letter in lora_meta.LORA_PREFETCH
