"""The pieces of a TP=2 decode step of the Llama-3-8B shape, each timed inside a CUDA graph on 2 GPUs (no model,
no checkpoint: seconds on a fresh machine), against what TP=1 does for the same piece on one GPU:

  sampler  LM head + greedy sampling at T = 1 and 64 rows: TP=1 (full [128256, 4096] head + kernels/greedy.py)
           vs TP=2 per rank ([64128, 4096] shard + stats + [T, 2, 8] all-gather + combine), the torch stats
           (tp/sampling.py's reference) vs the Triton kernels (kernels/tp_greedy.py); tokens checked equal first
  attn     decode attention at the TP=1 / TP=2 head counts: the graph's static split-KV count vs fixed ones
  embed    the vocabulary-parallel lookup + its all-reduce: one Triton launch vs the torch ops
  norm     the row-parallel all-reduce + residual add + RMSNorm, [T, 4096] bf16: the fused Lamport kernel
           (tp/fused_norm.py) vs symmetric-memory one-shot / two-shot + the norm vs NCCL + the norm
  gemm     the layer's four projections at T = 1 and 64 with the TP=1 and the TP=2 shard shapes (the GEMV at
           T <= its row limit, cuBLAS above, as models/llama.py): how well halved weights halve the time

    python3 benchmarks/bench_tp_paths.py [--json out.json] [--only sampler,norm,gemm]   # 2 GPUs
    python3 benchmarks/bench_tp_paths.py --smoke    # CPU: the script's imports and argument handling only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.graph_timing import graph_seconds  # noqa: E402

VOCAB, HIDDEN, INTER, Q, KV = 128256, 4096, 14336, 4096, 1024


def _us(fn, per_graph: int = 20, replays: int = 10) -> float:
    return graph_seconds(fn, per_graph, replays, warmup=2) * 1e6


def sampler_paths(rank: int, dev, group, out: dict) -> None:
    import torch.distributed as dist

    import loraserve.inference.tp.sampling as sampling
    from loraserve.kernels.greedy import greedy_sample

    g = torch.Generator(device=dev).manual_seed(3)   # the same full head and rows on both ranks
    head = (torch.randn(VOCAB, HIDDEN, device=dev, generator=g) * 0.02).bfloat16()
    shard = torch.nn.Linear(HIDDEN, group.vocab_per_rank, bias=False, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        shard.weight.copy_(head[rank * group.vocab_per_rank:(rank + 1) * group.vocab_per_rank])
    model = SimpleNamespace(lm_head=shard)
    for T in (1, 64):
        hidden = torch.randn(T, HIDDEN, device=dev, generator=g).bfloat16()
        if rank == 0:   # TP=1: the whole head and the fused greedy kernel on one GPU
            from loraserve.inference.tp.sampling import local_logits

            full_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                full_head.weight.copy_(head)
            full = SimpleNamespace(lm_head=full_head)
            ref_tokens = greedy_sample(local_logits(full, hidden))[0]
            out[f"tp1_sampler_T{T}_us"] = _us(lambda: greedy_sample(local_logits(full, hidden)))
            out[f"tp1_lm_head_T{T}_us"] = _us(lambda: local_logits(full, hidden))
            del full_head, full
        dist.barrier()
        out[f"tp2_lm_head_T{T}_us"] = _us(lambda: sampling.local_logits(model, hidden))
        if T == 1:   # the weight-streaming GEMV on the shard (LORASERVE_GEMV_LM_HEAD; cuBLAS by default)
            from loraserve.kernels.gemv import gemv

            out["tp2_lm_head_gemv_T1_us"] = _us(lambda: gemv(hidden, shard.weight))
        for name, fused in (("torch", False), ("triton", True)):
            sampling.FUSED = fused
            got, packed = sampling._greedy(model, hidden, group)
            if rank == 0:
                out[f"tp2_sampler_{name}_T{T}_tokens_equal_tp1"] = bool(torch.equal(got.tokens, ref_tokens))
            dist.barrier()
            out[f"tp2_sampler_{name}_T{T}_us"] = _us(lambda: sampling._greedy(model, hidden, group, rank == 0))
            dist.barrier()
        sampling.FUSED = sampling.fused_greedy_wanted()


def embed_paths(rank: int, dev, group, out: dict) -> None:
    """TPGroup.embed: the Triton lookup (kernels/tp_embed.py) vs the torch ops, each followed by the all-reduce;
    equal to the full table's rows first."""
    import torch.distributed as dist

    import loraserve.inference.tp.parallel as parallel

    g = torch.Generator(device=dev).manual_seed(5)
    table = torch.randn(group.vocab_per_rank * group.size, HIDDEN, device=dev, generator=g).bfloat16()
    emb = torch.nn.Embedding.from_pretrained(table[rank * group.vocab_per_rank:(rank + 1) * group.vocab_per_rank])
    for T in (1, 64):
        ids = torch.randint(0, VOCAB, (T,), device=dev, generator=g)
        for name, fused in (("torch", False), ("triton", True)):
            parallel.FUSED_EMBED = fused
            out[f"embed_{name}_T{T}_equal"] = bool(torch.equal(group.embed(emb, ids), table[ids]))
            dist.barrier()
            out[f"embed_{name}_T{T}_us"] = _us(lambda: group.embed(emb, ids), 50, 10)
    parallel.FUSED_EMBED = True


def attn_paths(rank: int, dev, out: dict) -> None:
    """Decode attention (kernels/unified_attention.py) at batch 64 and 1 with the TP=1 (32 / 8 heads) and the TP=2
    (16 / 4) head counts, contexts 576 / 2048 / 8192, in a graph: the static split-KV count a decode graph
    captures (split=None) against fixed counts. At batch 64 TP=2 has 256 programs, under the static rule's 264:
    3 splits and a merge where TP=1 (512 programs) runs 1. Rank 0 only (one GPU)."""
    import torch.distributed as dist

    from loraserve.kernels.unified_attention import choose_num_splits, unified_attention

    if rank == 0:
        BS, D = 16, 128
        g = torch.Generator(device=dev).manual_seed(9)
        for B, ctx in ((64, 576), (64, 2048), (64, 8191), (1, 576)):
            per = ctx // BS + 1
            width = max(8192 // BS, per)   # the decode graph's block-table width (max_seq_len 8192)
            nb = B * per + 1
            for tp, H, KVH in ((1, 32, 8), (2, 16, 4)):
                k = torch.randn(nb, BS, KVH, D, device=dev, generator=g).bfloat16()
                v = torch.randn(nb, BS, KVH, D, device=dev, generator=g).bfloat16()
                q = torch.randn(B, H, D, device=dev, generator=g).bfloat16()
                tables = torch.zeros(B, width, dtype=torch.int32, device=dev)
                tables[:, :per] = torch.arange(B * per, device=dev, dtype=torch.int32).view(B, per)
                lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
                qsl = torch.arange(B + 1, dtype=torch.int32, device=dev)
                static = choose_num_splits(B * KVH, width * BS // 64, dev)
                out[f"attn_tp{tp}_B{B}_ctx{ctx}_static_splits"] = static
                ref = unified_attention(q, k, v, tables, lens, qsl, 1, D ** -0.5)
                for splits in (None, 1, 2, 3, 8):
                    if B == 1 and splits in (2, 3):
                        continue
                    got = unified_attention(q, k, v, tables, lens, qsl, 1, D ** -0.5, num_splits=splits)
                    key = f"attn_tp{tp}_B{B}_ctx{ctx}_split{splits or 'static'}"
                    out[key + "_maxdiff"] = float((got.float() - ref.float()).abs().max())
                    out[key + "_us"] = _us(lambda: unified_attention(q, k, v, tables, lens, qsl, 1, D ** -0.5,
                                                                     num_splits=splits), 20, 10)
                del k, v
    dist.barrier()


def norm_paths(rank: int, dev, group, out: dict) -> None:
    import torch.distributed as dist

    from loraserve.kernels.rmsnorm import fused_add_rms_norm

    ar, fn = group.custom_ar, group.fused_norm
    out["fused_norm_on"] = fn is not None
    w = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)
    for T in (1, 64):
        x = torch.randn(T, HIDDEN, device=dev).bfloat16() * 0.01
        r = torch.zeros_like(x)
        ways = {"nccl_norm": lambda: fused_add_rms_norm((dist.all_reduce(x), x)[1], r, w, 1e-5)}
        if ar is not None:
            ways["1shot_norm"] = lambda: fused_add_rms_norm(ar(x, "one_shot"), r, w, 1e-5)
            ways["2shot_norm"] = lambda: fused_add_rms_norm(ar(x, "two_shot"), r, w, 1e-5)
            ways["1shot_only"] = lambda: ar(x, "one_shot")
        if fn is not None:
            ways["lamport_fused"] = lambda: fn(x, r, w, 1e-5)
            from loraserve.kernels.allreduce_rmsnorm import MAX_SPIN, allreduce_add_rms_norm

            for nw in (4, 16):   # the launcher's default: 8 warps at hidden 4096
                ways[f"lamport_w{nw}"] = lambda nw=nw: allreduce_add_rms_norm(
                    x, r, w, 1e-5, fn.buffer, fn.deltas, fn.counters, fn.rank, fn.world, fn.max_rows, MAX_SPIN, nw)
        ways["norm_only"] = lambda: fused_add_rms_norm(x, r, w, 1e-5)
        for name, f in ways.items():
            dist.barrier()
            try:
                out[f"norm_{name}_T{T}_us"] = _us(f, 50, 10)
            except Exception as exc:  # noqa: BLE001 - one way's failure is a figure too
                out[f"norm_{name}_T{T}_error"] = repr(exc)[:200]


def gemm_paths(rank: int, dev, out: dict) -> None:
    import torch.nn.functional as F

    from loraserve.inference.models import llama
    from loraserve.kernels.gemv import gemv

    shapes = {"qkv": (Q + 2 * KV, HIDDEN), "o": (HIDDEN, Q), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
    split = {"qkv": (2, 1), "o": (1, 2), "gate_up": (2, 1), "down": (1, 2)}   # (N divisor, K divisor) under TP=2
    for T in (1, 64):
        for tp in (1, 2):
            total = 0.0
            for name, (n, k) in shapes.items():
                dn, dk = split[name] if tp == 2 else (1, 1)
                wt = torch.randn(n // dn, k // dk, device=dev).bfloat16()
                x = torch.randn(T, k // dk, device=dev).bfloat16()
                use_gemv = 0 < T <= llama.GEMV_MAX_M
                us = _us((lambda: gemv(x, wt)) if use_gemv else (lambda: F.linear(x, wt)))
                out[f"gemm_tp{tp}_{name}_T{T}_us"] = us
                total += us
            out[f"gemm_tp{tp}_layer_T{T}_us"] = total
        out[f"gemm_layer_T{T}_tp1_over_tp2"] = out[f"gemm_tp1_layer_T{T}_us"] / out[f"gemm_tp2_layer_T{T}_us"]


def worker(rank: int, world: int, port: int, shared: dict, only: list[str]) -> None:
    import torch.distributed as dist

    from loraserve.inference.tp.parallel import TPGroup

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300), device_id=dev)
    os.environ.setdefault("LORASERVE_TP_FUSED_NORM", "1")
    group = TPGroup(rank, world, VOCAB, -(-VOCAB // world), hidden_size=HIDDEN)
    group.setup_all_reduce(dev)
    out: dict = {"custom_ar": group.custom_ar is not None}
    printed: set = set()
    for name, fn in (("attn", lambda: attn_paths(rank, dev, out)), ("sampler", lambda: sampler_paths(rank, dev, group, out)),
                     ("norm", lambda: norm_paths(rank, dev, group, out)),
                     ("embed", lambda: embed_paths(rank, dev, group, out)), ("gemm", lambda: gemm_paths(rank, dev, out))):
        if name in only:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                out[f"{name}_error"] = repr(exc)[:300]
            torch.cuda.synchronize()
            dist.barrier()
            if rank == 0:
                shared.update(out)
                print(name + ": " + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                                for k, v in out.items() if k not in printed}), flush=True)
                printed.update(out)
    if rank == 1:   # rank 1's GEMM figures too (another GPU: the spread between the two)
        shared.update({f"rank1_{k}": v for k, v in out.items() if k.startswith("gemm_") and "layer" in k})
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default="attn,sampler,norm,embed,gemm")
    ap.add_argument("--smoke", action="store_true", help="CPU: imports and arguments only")
    a = ap.parse_args()
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if a.smoke or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        import loraserve.inference.tp.sampling  # noqa: F401
        import loraserve.kernels.tp_greedy  # noqa: F401

        print("bench_tp_paths: needs 2 GPUs (smoke: imports ok)")
        return 0
    import torch.multiprocessing as mp

    from loraserve.inference.tp.executor import _free_port

    with mp.get_context("spawn").Manager() as manager:
        shared = manager.dict()
        mp.start_processes(worker, args=(2, _free_port(), shared, a.only.split(",")), nprocs=2, join=True,
                           start_method="spawn")
        res = dict(shared)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
