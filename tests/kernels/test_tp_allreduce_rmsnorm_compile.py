"""The fused all-reduce + RMSNorm kernel (kernels/allreduce_rmsnorm.py) compiled offline for sm_90 on a
machine without a GPU (as test_lora_onelaunch_compile.py): the whole NVIDIA pipeline runs (the int64 ->
pointer casts of the peer addresses, the volatile spin loop), for the 8B and 70B hidden sizes, 2 and 4
ranks, with and without programmatic dependent launch."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import triton_available

from .sm90 import compile_sm90

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernel for real"),
]


@pytest.mark.parametrize("hidden,world,rank,pdl", [(4096, 2, 0, False), (4096, 2, 1, True), (8192, 2, 1, False),
                                                   (4096, 4, 2, False)])
def test_allreduce_rmsnorm_compiles_for_sm90(hidden, world, rank, pdl):
    import triton

    from loraserve.kernels.allreduce_rmsnorm import _allreduce_rms_norm_kernel

    sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "buf_ptr": "*bf16", "deltas_ptr": "*i64",
           "counter_ptr": "*i32",
           "H": "i32", "eps": "fp32", "stride_x": "i32", "stride_r": "i32", "slot_stride": "i32",
           "region_stride": "i32"}
    const = dict(RANK=rank, WORLD=world, BLOCK=triton.next_power_of_2(hidden), MAX_SPIN=1 << 28, USE_PDL=pdl)
    # what a launch specialises on (16-divisible pointers and sizes)
    kernel = compile_sm90(_allreduce_rms_norm_kernel, sig, const, div16_except=("eps",),
                          num_warps=min(16, hidden // 512))
    ptx = kernel.asm["ptx"]
    assert "ld.volatile.global" in ptx, "the spin loop's loads must not be cached"
    # the push to the peers and the spin loads in 16-byte vectors (2-byte scalar accesses: 8x the transactions)
    assert "st.global.b16" not in ptx and "ld.volatile.global.b16" not in ptx, "2-byte scalar accesses"
    assert ("griddepcontrol" in ptx) == pdl
