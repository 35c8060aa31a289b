"""Cases for kernels/skinny_gemm.py, run in the interpreter worker (CPU) or directly on a GPU."""
from __future__ import annotations

import torch

from loraserve.kernels.skinny_gemm import _WORKSPACES, skinny_gemm, skinny_gemm_ref

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float16: dict(rtol=5e-3, atol=5e-3), torch.bfloat16: dict(rtol=3e-2, atol=2e-2)}


def check_skinny_gemm(dtype: str, M: int, N: int, K: int, config: tuple[int, ...], device: str = "cpu",
                      calls: int = 2) -> None:
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(M * 7919 + N + K)
    wide = torch.randn(M, K + 8, generator=g).to(device, dt)
    x = wide[:, 8:]                      # a row-strided view, as a slice of a wider activation
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dt)
    for call in range(calls):   # a second call reuses the split-K workspace and counters (left zero by the first)
        xc = x if call == 0 else -x.flip(0)
        y = skinny_gemm(xc, w, config=config)
        assert y.shape == (M, N) and y.dtype == dt
        torch.testing.assert_close(y, skinny_gemm_ref(xc, w), **TOL[dt])
    if config[2] > 1:   # every tile's counter back at zero
        for ws, cnt in _WORKSPACES.values():
            assert int(cnt.abs().sum()) == 0, cnt
