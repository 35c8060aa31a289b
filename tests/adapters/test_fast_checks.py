"""The one-pass integer check (finite?, max |x|) used on every adapter load, against torch."""
from __future__ import annotations

import math

import pytest
import torch

from loraserve.adapters.tensors import finite_and_peak


def _cases(dtype):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(64, 9, generator=g) * 30).to(dtype)
    yield base
    yield base.t()                                   # non-contiguous
    yield -base.abs()                                # all negative: the sign bit must not count
    yield torch.zeros(4, 4, dtype=dtype).neg()       # -0.0
    yield torch.full((3, 3), torch.finfo(dtype).max, dtype=dtype)
    yield torch.full((2, 2), torch.finfo(dtype).tiny / 4, dtype=dtype)   # subnormals
    yield torch.empty(0, 5, dtype=dtype)
    for bad in (math.inf, -math.inf, math.nan):
        t = base.clone()
        t[7, 3] = bad
        yield t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_and_peak_matches_torch(dtype):
    for t in _cases(dtype):
        finite = bool(torch.isfinite(t).all())
        peak = (float(t.to(torch.float64).abs().max()) if t.numel() else 0.0) if finite else math.inf
        assert finite_and_peak(t) == (finite, peak), (dtype, t.shape)
