"""The row-parallel layers' all-reduce on one host: symmetric memory over NVLink P2P for small and
medium messages, NCCL for the rest (vLLM's custom_all_reduce / SymmMemCommunicator, SGLang's
torch_symm_mem, TensorRT-LLM's one-shot / two-shot AllReduce strategies).

Why: a decode step of the 8B shape at batch 1 makes 65 all-reduces of 8 KB ([1, 4096] bf16); inside a
CUDA graph NCCL takes 16 us for each (its protocol and the fork/join onto its own stream, not the
bytes), the one-shot kernel here 6.6 us (2 H200s, benchmarks/bench_allreduce.py). With every rank's
buffer mapped into its peers' address space (PyTorch symmetric memory, CUDA backend: cuMem + IPC
handles, no multicast) one kernel does the whole all-reduce on the current stream:

  one-shot (small):  copy x into my buffer; barrier; x = sum over ranks r of buffer_r; barrier (each rank
                     reads every peer's whole message; torch.ops.symm_mem.one_shot_all_reduce_copy_out)
  two-shot (medium): x into my buffer; barrier; rank r sums its 1/world_size slice from every peer
                     (reduce-scatter); barrier; every rank reads all slices into x (all-gather); barrier
                     (two_shot_all_reduce_out; each rank moves ~2 x bytes / world_size per direction)
  NCCL:              above LORASERVE_TP_AR_MAX_BYTES, other dtypes, non-contiguous inputs, CPU

The ops end with a barrier, so the next call may rewrite the buffer at once, and they allocate
nothing: they are captured in the decode graphs (the buffer is allocated and exchanged here, before
any capture). NVLink multicast (multimem_* ops, NVLS) is never used. The same buffer also carries
each step's packed inputs from the driver to the workers (broadcast_step: a barrier and one P2P
read instead of an NCCL broadcast) and, as a sum of zero-padded parts, the small logits gather of
the LM head (parallel.py).

Switches (read in every process; spawned workers inherit them, so every rank decides alike):
  LORASERVE_TP_CUSTOM_AR=0        NCCL only;  =1 or unset: symmetric memory where the start-up
                                  self-check passes (CUDA, 2+ ranks, the ops present, sums equal NCCL's)
  LORASERVE_TP_AR_ONE_SHOT_BYTES  one-shot up to this size (default 512 KiB)
  LORASERVE_TP_AR_MAX_BYTES       two-shot up to this size, NCCL above (default 8 MiB; the buffer size)
  LORASERVE_TP_SYMM_BCAST_BYTES   each step's packed inputs (driver -> workers) through rank 0's symmetric
                                  buffer up to this size (default 1 MiB; 0: NCCL's broadcast always)
  LORASERVE_TP_AR_GATHER_BYTES    the LM head's logits all-gather as a sum of zero-padded parts up to this
                                  full size (default: the one-shot limit; 0: NCCL's all-gather always)
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_DTYPES = (torch.bfloat16, torch.float32)   # what the symm_mem reduce kernels dispatch on
# the step broadcast's barrier waits on the GPU at most this long for a peer (then the kernel traps: a
# peer that is gone for minutes has taken the engine down anyway)
_BARRIER_TIMEOUT_MS = int(float(os.environ.get("LORASERVE_TP_TIMEOUT_S", "300")) * 1000)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def custom_all_reduce_wanted() -> bool:
    return os.environ.get("LORASERVE_TP_CUSTOM_AR", "1").strip().lower() not in ("0", "false", "off", "no")


class SymmMemAllReduce:
    """One rank's symmetric buffer of `max_bytes` and the ops on it. Build it on every rank at the same
    point (a collective); `__call__` is in place and falls back to NCCL for what it does not take."""

    def __init__(self, device: torch.device, max_bytes: int, one_shot_bytes: int, group=None):
        import torch.distributed._symmetric_memory as symm_mem

        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.max_bytes, self.one_shot_bytes = device, max_bytes, one_shot_bytes
        # the LM head's logits gather (parallel.py) goes through here up to this size: one-shot sizes only
        # (a [T, V] sum moves size x the bytes of NCCL's gather; worth it where latency, not bytes, rules)
        self.gather_bytes = _env_int("LORASERVE_TP_AR_GATHER_BYTES", min(one_shot_bytes, max_bytes))
        self.group = group or dist.group.WORLD
        self.group_name = self.group.group_name
        self.world_size = dist.get_world_size(self.group)
        try:   # the CUDA backend (P2P over cuMem handles), not NVSHMEM; refused once anything was allocated
            if hasattr(symm_mem, "set_backend"):
                symm_mem.set_backend("CUDA")
        except Exception:  # noqa: BLE001 - already chosen by the environment: keep it
            log.debug("symm_mem.set_backend('CUDA') refused", exc_info=True)
        # two regions for the step broadcast (broadcast_step), used in turn, after the all-reduce's
        self.bcast_bytes = _env_int("LORASERVE_TP_SYMM_BCAST_BYTES", 1 << 20) // 16 * 16
        # bytes, viewed as the message's dtype per call (the ops read storage_offset in its elements)
        self.buffer = symm_mem.empty(max_bytes + 2 * self.bcast_bytes, dtype=torch.uint8, device=device)
        try:
            self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        except Exception:  # noqa: BLE001 - older torch: the group must be enabled first (same on every rank)
            if not hasattr(symm_mem, "enable_symm_mem_for_group"):
                raise
            symm_mem.enable_symm_mem_for_group(self.group_name)
            self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        self._views = {dt: self.buffer[:max_bytes].view(dt) for dt in _DTYPES}
        self.rank = dist.get_rank(self.group)
        regions = [max_bytes + k * self.bcast_bytes for k in range(2)] if self.bcast_bytes else []
        self._bcast_mine = [self.buffer[o:o + self.bcast_bytes].view(torch.int64) for o in regions]
        self._bcast_src = [self.handle.get_buffer(0, [self.bcast_bytes // 8], torch.int64, o // 8) for o in regions]
        self._bcast_turn = 0
        ops = torch.ops.symm_mem
        self._one_shot_copy = getattr(ops, "one_shot_all_reduce_copy_out", None)   # torch >= 2.8: copy fused in
        self._one_shot = ops.one_shot_all_reduce_out
        self._two_shot = ops.two_shot_all_reduce_
        self._two_shot_out = getattr(ops, "two_shot_all_reduce_out", None)   # all-gather straight into x

    def takes(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (x.dtype in self._views and x.is_contiguous() and 0 < nbytes <= self.max_bytes
                and nbytes % 16 == 0 and x.data_ptr() % 16 == 0 and x.device == self.device)

    def __call__(self, x: torch.Tensor, algo: str | None = None) -> torch.Tensor:
        """x [...] summed over the ranks, in place. algo: None (by size), "one_shot", "two_shot",
        "two_shot_inplace" (the variant that reduces in the buffers, then copies back), "nccl"."""
        if algo == "nccl" or not self.takes(x):
            dist.all_reduce(x, group=self.group)
            return x
        nbytes = x.numel() * x.element_size()
        flat = x.view(-1)
        buf = self._views[x.dtype][:flat.numel()]
        if algo == "one_shot" or (algo is None and nbytes <= self.one_shot_bytes):
            if self._one_shot_copy is not None:   # one kernel: x -> my buffer, barrier, sum of all buffers -> x
                self._one_shot_copy(buf, flat, "sum", self.group_name, flat)
            else:
                buf.copy_(flat)
                self._one_shot(buf, "sum", self.group_name, flat)
        elif self._two_shot_out is not None and algo != "two_shot_inplace":
            buf.copy_(flat)   # x -> my buffer; barrier; my slice summed from all; barrier; all slices -> x
            self._two_shot_out(buf, "sum", self.group_name, flat)
        else:
            buf.copy_(flat)   # x -> my buffer; barrier; my slice summed and written into every buffer
            self._two_shot(buf, "sum", self.group_name)
            flat.copy_(buf)
        return x

    def broadcast_step(self, t: torch.Tensor) -> bool:
        """t (int64, contiguous) from rank 0 to every rank, in place on the others, through rank 0's buffer:
        rank 0 copies t in, a barrier, the others read it over NVLink. False (nothing done) when t does not
        fit: the caller broadcasts with NCCL. The regions alternate: rank 0 rewrites one only after the next
        step's barrier, which every rank reaches after reading it. Every rank calls it for the same sizes."""
        nbytes = t.numel() * t.element_size()
        if not self.bcast_bytes or t.dtype != torch.int64 or nbytes > self.bcast_bytes or not t.is_contiguous():
            return False
        k, self._bcast_turn = self._bcast_turn, 1 - self._bcast_turn
        if self.rank == 0:
            self._bcast_mine[k][:t.numel()].copy_(t)
            self.handle.barrier(0, _BARRIER_TIMEOUT_MS)   # (channel, timeout_ms)
        else:
            self.handle.barrier(0, _BARRIER_TIMEOUT_MS)   # (channel, timeout_ms)
            t.copy_(self._bcast_src[k][:t.numel()])
        return True


def self_check(ar: SymmMemAllReduce) -> str | None:
    """None if the symmetric-memory sums equal NCCL's for one message of each algorithm and dtype on
    every rank; else why not. The step broadcast is checked too: if it alone fails, it is turned off
    (bcast_bytes = 0) on every rank and the all-reduce kept. Collective (every rank gets the same answer)."""
    problem = None
    sizes = [4096, min(ar.max_bytes, max(ar.one_shot_bytes * 2, 1 << 20)) // 2]   # bf16 elements
    try:
        g = torch.Generator(device=ar.device).manual_seed(1234 + dist.get_rank(ar.group))
        for n, algo in [(sizes[0], "one_shot"), (sizes[1], "two_shot"), (sizes[0], "two_shot"),
                        (sizes[0], "two_shot_inplace")]:
            for dtype in _DTYPES:
                if n * torch.tensor([], dtype=dtype).element_size() > ar.max_bytes:
                    continue
                x = torch.randn(n, generator=g, device=ar.device).to(dtype)
                ref = x.clone()
                dist.all_reduce(ref, group=ar.group)
                ar(x, algo)
                # 2 ranks: a + b rounded once either way (equal but for a rare double rounding); more ranks
                # may sum in another order. A broken path is off by far more than an ulp.
                tol = (1e-2 if ar.world_size == 2 else 3e-2) if dtype == torch.bfloat16 else 1e-4
                if not torch.allclose(x.float(), ref.float(), rtol=tol, atol=tol):
                    err = (x.float() - ref.float()).abs().max().item()
                    problem = problem or f"{algo} {dtype} n={n}: max |custom - nccl| = {err:g}"
        torch.cuda.synchronize(ar.device)
    except Exception as exc:  # noqa: BLE001 - any failure means: NCCL only
        problem = f"{exc!r}"
    if not _all_agree(problem is None, ar.device, ar.group) and problem is None:
        problem = "the self-check failed on another rank"
    if problem is None and ar.bcast_bytes:
        bcast_problem = None
        try:
            for step in range(3):   # both regions, and the first again
                sent = torch.arange(1000 + step, device=ar.device, dtype=torch.int64) * (step + 7) - 3
                got = sent.clone() if ar.rank == 0 else torch.zeros_like(sent)
                if not ar.broadcast_step(got) or not torch.equal(got, sent):
                    bcast_problem = bcast_problem or f"step broadcast {step}: not taken or wrong values"
            torch.cuda.synchronize(ar.device)
        except Exception as exc:  # noqa: BLE001 - the broadcast off, the all-reduce kept
            bcast_problem = f"{exc!r}"
        if not _all_agree(bcast_problem is None, ar.device, ar.group):
            log.warning("step broadcast through symmetric memory off (%s); NCCL broadcasts the steps",
                        bcast_problem or "failed on another rank")
            ar.bcast_bytes = 0
    return problem


def _all_agree(ok: bool, device: torch.device, group) -> bool:
    """True on every rank iff `ok` on every rank (one small all-reduce over the group's backend)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, group=group)
    return flag.item() == 0


def make_all_reduce(device: torch.device, group=None) -> SymmMemAllReduce | None:
    """The custom all-reduce for this rank, or None (NCCL/gloo) when it is off, not applicable or not
    working. A collective: every rank of the group calls it at the same point (after joining the group,
    before any CUDA graph capture) and all get an all-reduce or all get None."""
    if device.type != "cuda" or not dist.is_initialized() or not custom_all_reduce_wanted():
        return None
    group = group or dist.group.WORLD
    max_bytes = _env_int("LORASERVE_TP_AR_MAX_BYTES", 8 << 20) // 16 * 16
    one_shot = _env_int("LORASERVE_TP_AR_ONE_SHOT_BYTES", 512 << 10)
    # a cheap local check first, agreed on by all ranks, so no rank enters the rendezvous alone
    reason = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if not hasattr(torch.ops.symm_mem, "two_shot_all_reduce_"):
            reason = "torch.ops.symm_mem.two_shot_all_reduce_ missing"
        elif group.group_name in getattr(symm_mem, "_group_name_to_store", {}):
            # torch that needs enable_symm_mem_for_group keeps the store of the first group of this name
            # for good (the default group is "0" again after destroy_process_group): this rank would
            # rendezvous through a dead group's store while a fresh worker uses the new one
            reason = f"symmetric memory registered for an earlier process group named {group.group_name!r}"
        elif max_bytes < 4096:
            reason = f"LORASERVE_TP_AR_MAX_BYTES={max_bytes} too small"
        else:
            n = dist.get_world_size(group)
            me = device.index if device.index is not None else torch.cuda.current_device()
            base = me - dist.get_rank(group)   # ranks sit on consecutive devices (executor.py / worker.py)
            peers = [base + r for r in range(n) if base + r != me]
            if any(not torch.cuda.can_device_access_peer(me, p) for p in peers):
                reason = "no P2P access between the GPUs"
    except Exception as exc:  # noqa: BLE001
        reason = repr(exc)
    if not _all_agree(reason is None, device, group):
        log.info("custom all-reduce off (%s); NCCL", reason or "unavailable on another rank")
        return None
    ar = None
    try:
        ar = SymmMemAllReduce(device, max_bytes, one_shot, group)
    except Exception as exc:  # noqa: BLE001 - every rank learns it below and none runs the self-check
        log.warning("symmetric-memory all-reduce could not start (%r); NCCL", exc)
    if not _all_agree(ar is not None, device, group):
        return None
    problem = self_check(ar)
    if problem is not None:
        log.warning("symmetric-memory all-reduce failed its self-check (%s); NCCL", problem)
        return None
    log.info("custom all-reduce on: symmetric memory, one-shot <= %d B, two-shot <= %d B, NCCL above",
             one_shot, max_bytes)
    return ar
