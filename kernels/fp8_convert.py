"""e4m3 -> fp16 widening that Triton keeps where it is written (issue 14: the attention over the e4m3 KV cache).

    Semantics: y = float16(x) for x: float8_e4m3fn (exact: every e4m3 value is an fp16 value), any shape.

Why: for `tl.dot(p, v.to(tl.float16))` with v an e4m3 tile [keys, head_dim] (head_dim contiguous, the cache's layout),
Triton moves the layout conversion to the MMA operand above the cast (to copy the smaller type), but there is no
8-bit transposing ldmatrix, so every thread then gathers V's codes from shared memory one byte at a time (64
ld.shared.b8 per thread per 64 x 128 tile on sm_90, with 4-byte cp.async copies), whatever the cast is written as
(a plain cast, trans/reshape round trips, a pure inline asm: all checked in the sm_90 PTX). A non-pure inline asm is
not moved: the codes are widened in the load's layout (16-byte cp.async copies), and the fp16 tile reaches the MMA by
ldmatrix.trans, as a bf16 V does. One cvt.rn.f16x2.e4m3x2 per 2 codes either way.
"""
from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def e4m3_to_f16_pinned(x):
        # 4 codes in one 32-bit register (pack=4, byte i = element i) -> 2 f16x2 registers (elements 0, 1 and 2, 3)
        return tl.inline_asm_elementwise(
            asm="{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, $2;\n cvt.rn.f16x2.e4m3x2 $0, lo;\n"
                " cvt.rn.f16x2.e4m3x2 $1, hi;\n}",
            constraints="=r,=r,r", args=[x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)
