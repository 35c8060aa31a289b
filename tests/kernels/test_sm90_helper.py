"""tests/kernels/sm90.py, the offline sm_90 compile the *_compile tests share: its spill check fails on a kernel
that spills (the skinny GEMM's 128 x 128 tile held to 64 registers: ptxas puts the accumulator on the stack), and a
signature that does not name every kernel argument is an error, not a skip; a constexpr with a default may be
left out (it takes the default, as a launch would)."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import triton_available

from .sm90 import assert_no_spills, compile_sm90, stack_bytes

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real"),
]

SIG = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32",
       "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_xm": "i32", "stride_ym": "i32"}
CONST = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, REGPRE=False, USE_PDL=True)


def test_spill_check_fails_on_a_spilling_kernel() -> None:
    from loraserve.kernels.skinny_gemm import _skinny_gemm_kernel

    k = compile_sm90(_skinny_gemm_kernel, SIG, CONST, div16_except=("M",), num_warps=4, num_stages=4, maxnreg=64)
    assert stack_bytes(k) > 0
    with pytest.raises(AssertionError, match="register spills"):
        assert_no_spills(k)


def test_signature_must_name_every_argument() -> None:
    from loraserve.kernels.skinny_gemm import _skinny_gemm_kernel

    with pytest.raises(ValueError, match=r"missing \['K_PER_SPLIT'\]"):
        compile_sm90(_skinny_gemm_kernel, {n: t for n, t in SIG.items() if n != "K_PER_SPLIT"}, CONST, num_warps=4)
    with pytest.raises(ValueError, match=r"unknown constexprs \['BLOCK_Q'\]"):
        compile_sm90(_skinny_gemm_kernel, SIG, dict(CONST, BLOCK_Q=16), num_warps=4)
    with pytest.raises(ValueError, match="div16 names no runtime argument"):
        compile_sm90(_skinny_gemm_kernel, SIG, CONST, div16=("BLOCK_M",), num_warps=4)


def test_a_constexpr_left_out_takes_its_default() -> None:
    """The skinny GEMM's `USE_PDL: tl.constexpr = False`: left out, the launch's default (no griddepcontrol in the
    PTX), as with the same kernel given USE_PDL=False; given True, the wait is there."""
    from loraserve.kernels.skinny_gemm import _skinny_gemm_kernel

    const = {n: v for n, v in CONST.items() if n != "USE_PDL"}
    k = compile_sm90(_skinny_gemm_kernel, SIG, const, div16_except=("M",), num_warps=4, num_stages=4)
    assert "griddepcontrol.wait" not in k.asm["ptx"]
    k = compile_sm90(_skinny_gemm_kernel, SIG, dict(const, USE_PDL=True), div16_except=("M",), num_warps=4,
                     num_stages=4)
    assert "griddepcontrol.wait" in k.asm["ptx"]
