"""The fused one-shot all-reduce + residual add + RMSNorm (kernels/allreduce_rmsnorm.py) on the CPU under
TRITON_INTERPRET=1 (run in the interpreter worker of test_tp_allreduce_rmsnorm.py). The W ranks' symmetric
buffers are W host tensors in one process, and the ranks run one after another: rank q's kernel pushes
its rows into the other buffers and finds its peers' rows already there (ranks < q pushed them when they
ran; ranks > q are emulated by writing their rows into q's buffer first, as their push would). Each
function raises AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels.allreduce_rmsnorm import EMPTY_BITS, allreduce_add_rms_norm, allreduce_add_rms_norm_ref

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _deltas(bufs: list[torch.Tensor], q: int) -> torch.Tensor:
    """Rank p's buffer address minus rank q's, in 2-byte elements (what LamportNorm passes)."""
    return torch.tensor([(b.data_ptr() - bufs[q].data_ptr()) // 2 for b in bufs], dtype=torch.int64)


def _empty(buf: torch.Tensor) -> torch.Tensor:
    return buf.view(torch.int16) == EMPTY_BITS


def check_ranks(dtype: str, world: int, rows: int, hidden: int, calls: int = 3) -> None:
    """`calls` calls in a row (both slots, and the first again) of `world` ranks: every rank's output
    equals the reference bit for bit (fp16; the interpreter rounds bf16 its own way: one ulp), every
    rank's output is the same, every buffer is empty again after each call, the counters advance."""
    dt, max_rows = DTYPES[dtype], rows + 2
    g = torch.Generator().manual_seed(world * 100 + rows)
    bufs = [torch.full((2, world, max_rows, hidden), EMPTY_BITS, dtype=torch.int16).view(dt) for _ in range(world)]
    counters = [torch.zeros(max_rows, dtype=torch.int32) for _ in range(world)]
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dt)
    for call in range(calls):
        slot = call % 2
        xs = [torch.randn(rows, hidden, generator=g).to(dt) for _ in range(world)]
        xs[-1][0, :3] = -0.0   # a real -0.0 must not read as "empty" (sent as +0.0)
        res = torch.randn(rows, hidden, generator=g).to(dt)
        ref_x, ref_r = allreduce_add_rms_norm_ref(xs, res, w, 1e-5)
        outs = []
        for q in range(world):
            for p in range(q + 1, world):   # later ranks' pushes, as they would land
                bufs[q][slot, p, :rows] = torch.where(xs[p] == 0, torch.zeros_like(xs[p]), xs[p])
            x, r = xs[q].clone(), res.clone()
            out_x, out_r = allreduce_add_rms_norm(x, r, w, 1e-5, bufs[q], _deltas(bufs, q), counters[q], q, world,
                                                  max_rows, max_spin=4)
            assert out_x.data_ptr() == x.data_ptr() and out_r.data_ptr() == r.data_ptr(), "not in place"
            outs.append((x, r))
        for q, (x, r) in enumerate(outs):
            assert torch.equal(x, outs[0][0]) and torch.equal(r, outs[0][1]), f"rank {q} differs from rank 0"
            assert counters[q][:rows].eq(call + 1).all() and counters[q][rows:].eq(0).all(), counters[q]
        if dt == torch.float16:
            assert torch.equal(outs[0][1], ref_r), "residual + sum differs from the reference"
            torch.testing.assert_close(outs[0][0], ref_x, rtol=2e-3, atol=2e-3)
        else:   # the interpreter's bf16 rounding is not round-to-nearest-even
            torch.testing.assert_close(outs[0][1], ref_r, rtol=1.6e-2, atol=1.6e-2)
            torch.testing.assert_close(outs[0][0], ref_x, rtol=1.6e-2, atol=1.6e-2)
        for q in range(world):
            for p in range(q + 1, world):   # the real pushes of later ranks, landed after q had read the emulated ones
                sent = torch.where(xs[p] == 0, torch.zeros_like(xs[p]), xs[p])
                assert torch.equal(bufs[q][slot, p, :rows], sent), f"rank {p}'s push into rank {q} differs"
                assert not _empty(bufs[q][slot, p, :rows]).any(), "a -0.0 was sent as the empty marker"
                bufs[q][slot, p].view(torch.int16).fill_(EMPTY_BITS)
            assert _empty(bufs[q]).all(), f"rank {q}'s buffer not cleared after call {call}"


def check_missing_peer_gives_up(hidden: int = 64) -> None:
    """A peer that never sends: the kernel stops waiting after max_spin reads (it must not hang)."""
    dt = torch.float16
    bufs = [torch.full((2, 2, 2, hidden), EMPTY_BITS, dtype=torch.int16).view(dt) for _ in range(2)]
    counters = torch.zeros(2, dtype=torch.int32)
    x, r, w = torch.ones(1, hidden, dtype=dt), torch.zeros(1, hidden, dtype=dt), torch.ones(hidden, dtype=dt)
    allreduce_add_rms_norm(x, r, w, 1e-5, bufs[0], _deltas(bufs, 0), counters, 0, 2, 2, max_spin=3)
    assert counters[0].item() == 1
    assert torch.equal(bufs[1][0, 0, 0], torch.ones(hidden, dtype=dt)), "rank 0's row not pushed to rank 1"


def ready() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
