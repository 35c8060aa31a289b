"""The row-parallel GEMM that pushes its output into the peers' Lamport buffers (kernels/tp_gemm_push.py)
followed by the fused all-reduce + RMSNorm with pushed=True (kernels/allreduce_rmsnorm.py), on the CPU under
TRITON_INTERPRET=1 (run in the interpreter worker of test_tp_gemm_push.py). The W ranks' symmetric buffers are
W host tensors in one process: every rank's GEMM runs first (pushing into the others' buffers), then every
rank's norm (its peers' rows already landed). Each function raises AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels.allreduce_rmsnorm import EMPTY_BITS, allreduce_add_rms_norm, allreduce_add_rms_norm_ref
from loraserve.kernels.skinny_gemm import skinny_gemm_ref
from loraserve.kernels.tp_gemm_push import gemm_push

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _deltas(bufs: list[torch.Tensor], q: int) -> torch.Tensor:
    return torch.tensor([(b.data_ptr() - bufs[q].data_ptr()) // 2 for b in bufs], dtype=torch.int64)


def check_push_then_norm(dtype: str, world: int, rows: int, hidden: int, K: int, config: tuple[int, ...],
                         calls: int = 3) -> None:
    """`calls` layers' worth (both slots, then the first again): each rank's GEMM output equals the fp32
    reference within the dtype's rounding; the peers' pushed rows equal the GEMM's own output bit for bit;
    after the norms every rank holds the same result, equal to the reference all-reduce + norm of the GEMM
    outputs; every buffer is empty again and the counters advanced once per call."""
    dt, max_rows = DTYPES[dtype], rows + 2
    g = torch.Generator().manual_seed(world * 1000 + rows * 10 + K)
    bufs = [torch.full((2, world, max_rows, hidden), EMPTY_BITS, dtype=torch.int16).view(dt) for _ in range(world)]
    counters = [torch.zeros(max_rows, dtype=torch.int32) for _ in range(world)]
    norm_w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dt)
    ws = [(torch.randn(hidden, K, generator=g) / K ** 0.5).to(dt) for _ in range(world)]   # each rank's shard
    for call in range(calls):
        slot = call % 2
        xs = [torch.randn(rows, K, generator=g).to(dt) for _ in range(world)]
        xs[0][-1] = 0   # a zero row: +0.0 everywhere, never the -0.0 "empty" marker
        res = torch.randn(rows, hidden, generator=g).to(dt)
        ys = []
        for q in range(world):
            y = torch.empty(rows, hidden, dtype=dt)
            gemm_push(xs[q], ws[q], y, bufs[q], _deltas(bufs, q), counters[q], q, world, max_rows, config=config)
            torch.testing.assert_close(y, skinny_gemm_ref(xs[q], ws[q]), rtol=2e-2, atol=2e-2)
            ys.append(y)
        for q in range(world):
            for p in range(world):
                if p != q:   # rank p's tiles in rank q's buffer, region p, this call's slot
                    assert torch.equal(bufs[q][slot, p, :rows], ys[p]), f"rank {p}'s push into rank {q} differs"
                    assert bufs[q][1 - slot].view(torch.int16).eq(EMPTY_BITS).all(), "pushed into the wrong slot"
        ref_x, ref_r = allreduce_add_rms_norm_ref(ys, res, norm_w, 1e-5)
        outs = []
        for q in range(world):
            x, r = ys[q].clone(), res.clone()
            allreduce_add_rms_norm(x, r, norm_w, 1e-5, bufs[q], _deltas(bufs, q), counters[q], q, world, max_rows,
                                   max_spin=4, pushed=True)
            outs.append((x, r))
        for q, (x, r) in enumerate(outs):
            assert torch.equal(x, outs[0][0]) and torch.equal(r, outs[0][1]), f"rank {q} differs from rank 0"
            assert counters[q][:rows].eq(call + 1).all() and counters[q][rows:].eq(0).all(), counters[q]
            assert bufs[q].view(torch.int16).eq(EMPTY_BITS).all(), f"rank {q}'s buffer not cleared after call {call}"
        tol = dict(rtol=2e-3, atol=2e-3) if dt == torch.float16 else dict(rtol=1.6e-2, atol=1.6e-2)
        torch.testing.assert_close(outs[0][1], ref_r, **tol)
        torch.testing.assert_close(outs[0][0], ref_x, **tol)


def ready() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
