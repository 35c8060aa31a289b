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

By default (LORASERVE_TP_GEMM_PUSH=1) o_proj / down_proj of batch-1 decode steps (rows
LORASERVE_TP_GEMM_PUSH_MIN_ROWS..MAX_ROWS, default 1..1; MAX_ROWS=64 also takes 2..64-row steps: measured only in
GEMM + norm pairs, not yet in a 32-layer engine; no adapters in the step) run kernels/tp_gemm_push.py (one row: the GEMV; more:
the skinny GEMM), whose programs push their output tiles into the peers' buffers as they finish; the norm kernel
after it then skips its own push (pushed=True) and only waits for the peers' last tiles. Checked at start-up against
NCCL + the separate norm like the fused norm itself. H200 x2 (probe 2026-12-01 02:00, benchmarks/bench_tp_push.py,
GEMM + norm pairs in graphs): 1 row o 7.75 us vs GEMV + norm 8.61, down 18.97 vs 19.63; 64 rows o 11.64 vs cuBLAS +
norm 12.01, down 23.86 vs 24.16 (the skinny GEMM alone costs ~0.7 of the ~1 us the push saves); TP=2 engine, 8
layers, batch-1 decode graph 0.6547 -> 0.6418 ms (-1.6 us a layer).
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def fused_norm_wanted() -> bool:
    return os.environ.get("LORASERVE_TP_FUSED_NORM", "1").strip().lower() not in ("", "0", "false", "off", "no")


def gemm_push_wanted() -> bool:
    return os.environ.get("LORASERVE_TP_GEMM_PUSH", "1").strip().lower() not in ("", "0", "false", "off", "no")


def _gemm_push_rows() -> tuple[int, int]:
    """The row counts the pushing GEMM takes (default 1..1: one row runs the GEMV with the push, the row count whose
    engine gain was measured on 2 H200s; LORASERVE_TP_GEMM_PUSH_MAX_ROWS=64 adds 2..64 rows on the skinny GEMM,
    opt-in until a 32-layer batch-64 engine run measures it); LORASERVE_TP_GEMM_PUSH_MIN_ROWS=2 leaves batch 1 to
    Proj's GEMV and the norm's push."""
    def env(name: str, default: int) -> int:
        try:
            return min(64, max(1, int(os.environ.get(name, "") or default)))
        except ValueError:
            return default

    return env("LORASERVE_TP_GEMM_PUSH_MIN_ROWS", 1), env("LORASERVE_TP_GEMM_PUSH_MAX_ROWS", 1)


class LamportNorm:
    """This rank's symmetric buffer [2, world, max_rows, hidden] (16-bit elements, -0.0 = empty), every
    rank's buffer address on the device and the per-row call counters. Build it on every rank at once."""

    def __init__(self, device: torch.device, hidden: int, max_rows: int, group=None):
        import torch.distributed._symmetric_memory as symm_mem

        device = _indexed(device)
        self.group = group or dist.group.WORLD
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.device, self.hidden, self.max_rows = device, hidden, max_rows
        self.push, self.push_rows = False, (1, 64)   # gemm_push: set by make_fused_norm after its self-check
        self._pushed: torch.Tensor | None = None    # the partial the last gemm_push produced, until its norm
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
        from loraserve.kernels.allreduce_rmsnorm import MAX_SPIN, allreduce_add_rms_norm

        pushed = self._pushed is not None
        if pushed and self._pushed is not x:   # the peers hold rows no norm will clear: every later sum is wrong
            self._pushed = None
            raise RuntimeError("tensor parallelism: a GEMM pushed its partial to the peers but the next fused norm "
                               "got another tensor (the o_proj/down_proj -> norm pairing broke)")
        self._pushed = None
        return allreduce_add_rms_norm(x, residual, weight, eps, self.buffer, self.deltas, self.counters, self.rank,
                                      self.world, self.max_rows, max_spin or MAX_SPIN, pushed=pushed)

    def gemm_push(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] @ weight [N, K]^T through kernels/tp_gemm_push.py (its tiles pushed to the peers), or None
        where it does not apply (then the caller's GEMM runs and the norm pushes). Depends only on shapes, dtypes,
        devices and the step's adapters (LoRA adds to the partial after the GEMM): every rank decides the same."""
        if not (self.push and self.push_rows[0] <= x.shape[0] <= self.push_rows[1] and x.device == self.device):
            return None
        from loraserve.kernels.tp_gemm_push import gemm_push, gemm_push_fits

        if not gemm_push_fits(x, weight):
            return None
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        if not self.takes(out):
            return None
        if self._pushed is not None:
            raise RuntimeError("tensor parallelism: two pushed partials without a fused norm between them")
        gemm_push(x, weight, out, self.buffer, self.deltas, self.counters, self.rank, self.world, self.max_rows)
        self._pushed = out
        return out


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
    if gemm_push_wanted():
        _check_gemm_push(fn, device, group)
    return fn


def _check_gemm_push(fn: LamportNorm, device: torch.device, group) -> None:
    """Collective: turn fn.push on on every rank iff on every rank the pushing GEMM + the waiting norm equal NCCL's
    all-reduce of the GEMM's own outputs + the separate norm bit for bit (2 ranks; more: sum order), at a decode
    bucket's rows and a few, both slots, with the GEMM within bf16 rounding of F.linear."""
    import torch.nn.functional as F

    from loraserve.kernels.rmsnorm import fused_add_rms_norm_ref

    from .allreduce import _all_agree

    problem = None
    try:
        fn.push, fn.push_rows = True, (1, 64)
        g = torch.Generator(device=device).manual_seed(999 + dist.get_rank(group))
        K = 2048
        w = (torch.randn(fn.hidden, K, device=device, generator=g) / K ** 0.5).to(torch.bfloat16)
        nw = (1 + 0.1 * torch.randn(fn.hidden, device=device, generator=g)).to(torch.bfloat16)
        for n in (64, 1, 8, 1):   # the skinny GEMM (BLOCK_M 64 / 16) and the GEMV, both slots of row 0
            x = torch.randn(n, K, device=device, generator=g).to(torch.bfloat16)
            res = torch.randn(n, fn.hidden, device=device, generator=g).to(torch.bfloat16)
            out = fn.gemm_push(x, w)
            if out is None:
                problem = f"gemm_push refused [{n}, {K}] x [{fn.hidden}, {K}]"
                break
            mine = out.clone()
            ref = mine.clone()
            dist.all_reduce(ref, group=group)
            ref_x, ref_r = fused_add_rms_norm_ref(ref, res.clone(), nw, 1e-5)
            out_x, out_r = fn(out, res, nw, 1e-5, max_spin=1 << 22)
            torch.cuda.synchronize(device)
            tol = 0 if fn.world == 2 else 3e-2
            gemm_err = (mine.float() - F.linear(x, w).float()).abs().max().item()
            if gemm_err > 0.05:
                problem = f"rows={n}: the GEMM is {gemm_err:g} from F.linear"
            elif not (torch.allclose(out_r.float(), ref_r.float(), atol=tol, rtol=tol)
                      and torch.allclose(out_x.float(), ref_x.float(), atol=2 * tol + 1e-2, rtol=1e-2)):
                err = max((out_r.float() - ref_r.float()).abs().max().item(),
                          (out_x.float() - ref_x.float()).abs().max().item())
                problem = f"rows={n}: max |pushed + norm - (all-reduce + norm)| = {err:g}"
    except Exception as exc:  # noqa: BLE001 - every rank learns it below
        problem = f"{exc!r}"
    fn._pushed = None
    fn.push = _all_agree(problem is None, device, group)
    fn.push_rows = _gemm_push_rows()
    if fn.push:
        log.info("row-parallel GEMMs push their tiles to the peers (kernels/tp_gemm_push.py), %d..%d rows",
                 *fn.push_rows)
    else:
        log.warning("pushing row-parallel GEMM off (%s): the norm pushes", problem or "failed on another rank")


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
    if group.fused_norm.push:
        from ..models.llama import Proj

        for layer in model.layers:   # FP8 projections (another class) keep their own GEMMs
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if type(proj) is Proj:
                    proj.__class__ = push_proj_class()
                    proj.tp_norm = group.fused_norm


@functools.cache
def push_proj_class():
    from ..context import get_context
    from ..models.llama import Proj

    class PushProj(Proj):
        """A row-parallel projection (o_proj / down_proj) whose decode GEMM pushes its partial output to the
        peers (LamportNorm.gemm_push); with adapters in the step, or shapes it does not take, Proj's path."""
        tp_norm: LamportNorm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.bias is None and get_context().lora is None:
                out = self.tp_norm.gemm_push(x, self.weight)
                if out is not None:
                    return out
            return super().forward(x)

    return PushProj
