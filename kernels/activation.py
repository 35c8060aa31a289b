"""SiLU-and-mul on the fused gate_up projection output (vLLM's ``silu_and_mul``).

Semantics (HF LlamaMLP numerics: ``act_fn(gate) * up`` with each op rounding to the dtype):
    out[t, i] = (silu(gate[t, i].f32).to(dtype).f32 * up[t, i].f32).to(dtype)
gate_up: [T, 2I] with gate = gate_up[:, :I], up = gate_up[:, I:] (rows may be strided);
out: [T, I]. Grid (T, cdiv(I, BLOCK)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton
from .pdl import pdl_kwargs


def silu_and_mul_ref(gate_up: Tensor) -> Tensor:
    """Pure-torch reference: exactly what HF's MLP computes from the two halves."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr,
                             USE_PDL: tl.constexpr = False):
        if USE_PDL:   # kernels/pdl.py: every input comes from the kernels before us
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < I
        g = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        u = tl.load(x_ptr + row * stride_x + I + offs, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (act * u.to(tl.float32)).to(g.dtype), mask=ok)


def silu_and_mul(gate_up: Tensor, out: Tensor | None = None) -> Tensor:
    """[T, 2I] -> [T, I] = silu(gate) * up, one launch."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use silu_and_mul_ref")
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and gate_up.stride(-1) == 1, \
        f"gate_up must be [T, 2I] with a contiguous last dim, got {tuple(gate_up.shape)}"
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    assert out.shape == (T, I) and out.dtype == gate_up.dtype and out.stride(-1) == 1
    if T == 0:
        return out
    block = min(1024, triton.next_power_of_2(I))
    _silu_and_mul_kernel[(T, triton.cdiv(I, block))](gate_up, out, I, gate_up.stride(0), out.stride(0),
                                                     BLOCK=block, num_warps=4, **pdl_kwargs(gate_up.device))
    return out
