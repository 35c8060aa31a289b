"""The row-parallel all-reduce fused into the RMSNorm that follows it (kernels/allreduce_rmsnorm.py).

A Llama decoder layer under TP does, twice per layer: o_proj / down_proj partial -> all-reduce -> residual
add + RMSNorm. By default (LORASERVE_TP_FUSED_NORM=0: off) the row-parallel layer returns its partial
output and the next RMSNorm does the three in one kernel with the Lamport one-shot protocol (no barrier):
one launch and one NVLink round trip instead of the symmetric-memory all-reduce's two barriers plus a norm
launch. H200 x2, inside CUDA graphs (benchmarks/bench_tp_paths.py, 2026-11-30 20:01), [T, 4096] bf16:
T=1 3.05 us against one-shot + norm 8.47, NCCL + norm 8.05; T=64 4.80 us against 12.96 / 11.58 (4 or 16
warps instead of 8: within 0.2 us). Only rows up to
LORASERVE_TP_FUSED_NORM_ROWS (default 256: every decode bucket) take it; larger steps (prefill) keep
the all-reduce and the separate norm.

The model side (models/llama.py): Attention / MLP skip their all-reduce when `tp.defers(out)`; an
RMSNorm with a residual and a `tp` whose `defers(x)` holds calls `tp.all_reduce_add_rms_norm`. The
decision depends only on x's shape, dtype and device, so producer and consumer always agree.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def fused_norm_wanted() -> bool:
    return os.environ.get("LORASERVE_TP_FUSED_NORM", "1").strip().lower() not in ("", "0", "false", "off", "no")


class LamportNorm:
    """This rank's symmetric buffer [2, world, max_rows, hidden] (16-bit elements, -0.0 = empty), every
    rank's buffer address on the device and the per-row call counters. Build it on every rank at once."""

    def __init__(self, device: torch.device, hidden: int, max_rows: int, group=None):
        import torch.distributed._symmetric_memory as symm_mem

        device = _indexed(device)
        self.group = group or dist.group.WORLD
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.device, self.hidden, self.max_rows = device, hidden, max_rows
        from loraserve.kernels.allreduce_rmsnorm import EMPTY_BITS

        try:   # the CUDA backend (P2P over cuMem handles), as tp/allreduce.py; already chosen: kept
            if hasattr(symm_mem, "set_backend"):
                symm_mem.set_backend("CUDA")
        except Exception:  # noqa: BLE001
            log.debug("symm_mem.set_backend('CUDA') refused", exc_info=True)
        # [2 slots, world regions, max_rows, hidden] int16 bits, viewed as bf16 / fp16 per call
        self.buffer = symm_mem.empty(2 * self.world * max_rows * hidden, dtype=torch.int16, device=device)
        self.buffer.fill_(EMPTY_BITS)
        self.handle = symm_mem.rendezvous(self.buffer, self.group.group_name)
        # every rank's buffer as mapped in this process, as an element offset from this rank's own
        ptrs = [self.handle.get_buffer(p, [1], torch.int16, 0).data_ptr() for p in range(self.world)]
        mine = self.buffer.data_ptr()
        if any((p - mine) % 16 for p in ptrs):
            raise RuntimeError("symmetric buffers not 16-byte aligned")
        self.deltas = torch.tensor([(p - mine) // 2 for p in ptrs], dtype=torch.int64, device=device)
        self.counters = torch.zeros(max_rows, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
        self.handle.barrier(0, 60_000)   # every buffer filled with "empty" before any rank sends

    def takes(self, x: torch.Tensor) -> bool:
        return (x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and x.shape[1] == self.hidden
                and 0 < x.shape[0] <= self.max_rows and x.stride(-1) == 1 and x.device == self.device)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 max_spin: int | None = None):
        from loraserve.kernels.allreduce_rmsnorm import allreduce_add_rms_norm

        from loraserve.kernels.allreduce_rmsnorm import MAX_SPIN

        return allreduce_add_rms_norm(x, residual, weight, eps, self.buffer, self.deltas, self.counters, self.rank,
                                      self.world, self.max_rows, max_spin or MAX_SPIN)


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:<current>. The driver's engine device is a bare "cuda" while its tensors are on cuda:0:
    `takes` compared them unequal on rank 0 only, so rank 0 all-reduced o_proj's output while rank 1 deferred it
    to the fused norm: each rank waited for the other on the GPU (the TP=2 engine that never finished starting
    on the H200s, 2026-11-30: probe at 17:04, stacks of both ranks in the decode graph warm-up)."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def make_fused_norm(device: torch.device, hidden: int, group=None) -> LamportNorm | None:
    """Collective (every rank, after the custom all-reduce was set up): a checked LamportNorm or None on
    every rank. The check: random partials on every rank, the fused result against NCCL's all-reduce
    followed by the separate norm (kernels/rmsnorm.py), at 1 and max_rows rows, twice each (both slots)."""
    from .allreduce import _all_agree

    if device.type != "cuda" or not dist.is_initialized() or not fused_norm_wanted() or not hidden:
        return None
    device = _indexed(device)
    group = group or dist.group.WORLD
    rows = int(os.environ.get("LORASERVE_TP_FUSED_NORM_ROWS", "256") or 256)
    fn, problem = None, None
    try:
        fn = LamportNorm(device, hidden, rows, group)
    except Exception as exc:  # noqa: BLE001 - every rank learns it below
        problem = f"could not start ({exc!r})"
    if not _all_agree(fn is not None, device, group):
        log.warning("fused all-reduce + RMSNorm off (%s); all-reduce then norm", problem or "failed on another rank")
        return None
    try:
        from loraserve.kernels.rmsnorm import fused_add_rms_norm_ref

        g = torch.Generator(device=device).manual_seed(4321 + dist.get_rank(group))
        w = torch.randn(hidden, device=device, generator=torch.Generator(device=device).manual_seed(7))
        for n in (1, rows, 1, rows, 3):
            x = torch.randn(n, hidden, device=device, generator=g).to(torch.bfloat16)
            if not fn.takes(x):   # the decode path's own test (defers): a rank that refuses it deadlocks the others
                problem = problem or f"takes() refused a [{n}, {hidden}] bf16 partial on {x.device}"
            res = (torch.arange(n * hidden, device=device).view(n, hidden) % 7 - 3).to(torch.bfloat16)
            ref = x.clone()
            dist.all_reduce(ref, group=group)
            ref_x, ref_r = fused_add_rms_norm_ref(ref, res.clone(), w.to(torch.bfloat16), 1e-5)
            # a bounded wait (~seconds): a peer's stores that never show up fail the check, not hang the start
            out_x, out_r = fn(x, res, w.to(torch.bfloat16), 1e-5, max_spin=1 << 22)
            torch.cuda.synchronize(device)
            # 2 ranks: the same single rounding of a + b as NCCL; more ranks may sum in another order
            tol = 0 if fn.world == 2 else 3e-2
            if not (torch.allclose(out_r.float(), ref_r.float(), atol=tol, rtol=tol)
                    and torch.allclose(out_x.float(), ref_x.float(), atol=2 * tol + 1e-2, rtol=1e-2)):
                err = max((out_r.float() - ref_r.float()).abs().max().item(),
                          (out_x.float() - ref_x.float()).abs().max().item())
                problem = problem or f"rows={n}: max |fused - (all-reduce + norm)| = {err:g}"
    except Exception as exc:  # noqa: BLE001
        problem = f"{exc!r}"
    if not _all_agree(problem is None, device, group):
        log.warning("fused all-reduce + RMSNorm failed its self-check (%s); all-reduce then norm",
                    problem or "failed on another rank")
        return None
    log.info("fused all-reduce + RMSNorm on: Lamport one-shot over symmetric memory, <= %d rows", rows)
    return fn


def attach_norms(model, group) -> None:
    """Give every RMSNorm that follows a row-parallel layer the group (the input norms of layers 1..L-1,
    every post-attention norm, the final norm): they fuse the all-reduce when group.defers(x)."""
    if group.fused_norm is None:
        return
    for i, layer in enumerate(model.layers):
        layer.post_attention_layernorm.tp = group
        if i:
            layer.input_layernorm.tp = group
    model.norm.tp = group
    group.defer_reduce = True
