"""One rank's view of the tensor-parallel group: which shard it holds and the collectives the
model calls (Megatron-LM, Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism", section 3).

The model holds a `TPGroup` only when tensor_parallel_size > 1; with one rank nothing here is
imported or called. Collectives go through torch.distributed: gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


# the vocabulary-parallel lookup as one Triton launch on CUDA (kernels/tp_embed.py); =0: six torch ops
FUSED_EMBED = os.environ.get("LORASERVE_TP_FUSED_EMBED", "1").strip().lower() not in ("", "0", "false", "off", "no")


class TensorParallelError(ValueError):
    """A model or option that cannot be split over the requested ranks; the message says why."""


@dataclass
class TPGroup:
    rank: int
    size: int
    vocab_size: int            # the full vocabulary (logits are cut back to it after the gather)
    vocab_per_rank: int        # ceil(vocab / size): every rank's embedding shard has this many rows
    executor: object = None    # rank 0 only: the TPExecutor that drives the workers
    custom_ar: object = None   # allreduce.SymmMemAllReduce on CUDA where it works (else NCCL / gloo)
    hidden_size: int = 0
    fused_norm: object = None  # fused_norm.LamportNorm (CUDA, checked at start-up; LORASERVE_TP_FUSED_NORM=0: off)
    defer_reduce: bool = False  # set once the model's norms hold this group (fused_norm.attach_norms)
    clock: object = None       # startup.StartupClock of this rank's start (phase times, logged)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the ranks' partial outputs of a row-parallel layer, in place."""
        if self.custom_ar is not None:
            return self.custom_ar(x)
        dist.all_reduce(x)
        return x

    def setup_all_reduce(self, device: torch.device) -> None:
        """Collective: every rank right after joining the process group, before any model work."""
        from .allreduce import make_all_reduce
        from .fused_norm import make_fused_norm

        self.custom_ar = make_all_reduce(device)
        self.fused_norm = make_fused_norm(device, self.hidden_size)

    def defers(self, x: torch.Tensor) -> bool:
        """True: a row-parallel layer returns its partial output x and the RMSNorm after it all-reduces it
        (all_reduce_add_rms_norm). Depends only on x's shape, dtype and device: both sides agree."""
        return self.defer_reduce and self.fused_norm.takes(x)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """x [T, H] a row-parallel partial: (norm(sum of partials + residual), sum + residual), in place."""
        if weight.dtype != x.dtype or residual.stride(-1) != 1:   # not what the kernel takes: unfused
            from loraserve.kernels.rmsnorm import fused_add_rms_norm

            if getattr(self.fused_norm, "_pushed", None) is not None:   # its rows sit in the peers' buffers
                raise RuntimeError("tensor parallelism: a pushed partial reached the unfused norm")

            return fused_add_rms_norm(self.all_reduce(x), residual, weight, eps)
        return self.fused_norm(x, residual, weight, eps)

    def embed(self, embedding: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: ids [N] -> [N, hidden]. Each rank looks up the ids in its vocabulary
        range (others get zero rows) and the all-reduce assembles the full embeddings. On CUDA one Triton
        launch (kernels/tp_embed.py; LORASERVE_TP_FUSED_EMBED=0: the torch ops below)."""
        w = embedding.weight
        if FUSED_EMBED and ids.is_cuda and w.dim() == 2 and w.stride(1) == 1 and ids.dim() == 1 and ids.stride(0) == 1:
            from loraserve.kernels import triton_available

            if triton_available():
                from loraserve.kernels.tp_embed import vocab_parallel_embed

                return self.all_reduce(vocab_parallel_embed(ids, w, self.vocab_start))
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        x = embedding(local.masked_fill(outside, 0))
        x.masked_fill_(outside[:, None], 0)
        return self.all_reduce(x)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """local [T, V/size] -> float32 [T, V] on every rank (only rank 0 samples from it)."""
        T, Vr = local.shape
        ar = self.custom_ar
        if ar is not None and local.numel() * self.size * local.element_size() <= ar.gather_bytes:
            # small batches (decode): the gather as a symmetric-memory sum of disjoint parts, [T, size, V/size]
            # zero but for this rank's columns (x + 0 is exact), one kernel instead of NCCL's gather + cat
            full = local.new_zeros(T, self.size, Vr)
            full[:, self.rank].copy_(local)
            out = ar(full).view(T, -1).float()
        else:
            # [size * T, Vr] rank-major from one gather, then one copy into [T, size, Vr] that also casts
            # (no per-rank list, no cat, no separate cast of the [T, V] logits)
            gathered = local.new_empty(self.size * T, Vr)
            # all_gather_single: the name in torch >= 2.13 (all_gather_into_tensor deprecated there)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(gathered, local.contiguous())
            out = torch.empty(T, self.size, Vr, dtype=torch.float32, device=local.device)
            out.copy_(gathered.view(self.size, T, Vr).transpose(0, 1))
            out = out.view(T, -1)
        return out if out.shape[1] == self.vocab_size else out[:, :self.vocab_size].contiguous()


def shard_args(args, size: int):
    """The ModelArgs of one rank's shard: heads, KV heads and the MLP width divided by `size`, the
    vocabulary padded up to a multiple of it. Raises TensorParallelError if the model does not split."""
    if size == 1:
        return args
    problems = []
    if args.num_attention_heads % size:
        problems.append(f"num_attention_heads={args.num_attention_heads}")
    if args.num_key_value_heads % size:
        problems.append(f"num_key_value_heads={args.num_key_value_heads} (the KV cache is sharded by KV heads)")
    if args.intermediate_size % size:
        problems.append(f"intermediate_size={args.intermediate_size}")
    if problems:
        raise TensorParallelError(f"tensor_parallel_size={size} does not divide " + ", ".join(problems)
                                  + "; choose a tensor_parallel_size that divides them")
    return dataclasses.replace(args, num_attention_heads=args.num_attention_heads // size,
                               num_key_value_heads=args.num_key_value_heads // size,
                               intermediate_size=args.intermediate_size // size,
                               vocab_size=-(-args.vocab_size // size))


def make_group(args, rank: int, size: int) -> TPGroup:
    return TPGroup(rank, size, args.vocab_size, -(-args.vocab_size // size), hidden_size=args.hidden_size)
