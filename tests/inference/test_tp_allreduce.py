"""The tensor-parallel all-reduce selector (services/inference/tp/allreduce.py).

CPU (gloo, 2 processes): no symmetric-memory path is chosen whatever the switch says, and the
row-parallel all-reduce still returns the ranks' exact sum, the logits gather their concatenation. GPU (2 CUDA devices, NCCL): the
symmetric-memory one-shot and two-shot sums equal NCCL's, eagerly and replayed from a CUDA graph;
LORASERVE_TP_CUSTOM_AR=0 gives NCCL only; messages over the size limit go to NCCL; the logits gather
and the step broadcast through the symmetric buffer equal NCCL's all-gather and broadcast.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run(fn, world: int, *args) -> dict:
    from loraserve.inference.tp.executor import _free_port

    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(fn, args=(world, _free_port(), out, *args), nprocs=world, join=True,
                           start_method="spawn")
        return dict(out)


def _cpu_rank(rank: int, world: int, port: int, out) -> None:
    from loraserve.inference.tp.parallel import TPGroup

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    parts = [torch.randn(3, 40, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    res = []
    for switch in ("1", "0"):   # on (the default) and forced off: gloo either way
        os.environ["LORASERVE_TP_CUSTOM_AR"] = switch
        group = TPGroup(rank, world, 15, 8)
        group.setup_all_reduce(torch.device("cpu"))
        x = parts[rank].clone()
        reduced = group.all_reduce(x)
        # the logits gather: [T, V/size] per rank -> float32 [T, V] (V = 15: the padding column cut off)
        logits = [torch.randn(3, 8, generator=torch.Generator().manual_seed(10 + r)).bfloat16() for r in range(world)]
        gathered = group.gather_logits(logits[rank])
        ok_gather = gathered.dtype == torch.float32 and torch.equal(gathered, torch.cat(logits, -1)[:, :15].float())
        res.append((group.custom_ar is None, reduced is x, bool(torch.allclose(x, sum(parts), rtol=0, atol=1e-6)),
                    bool(ok_gather)))
    out[rank] = res
    dist.destroy_process_group()


def test_cpu_falls_back_to_gloo_and_sums():
    out = _run(_cpu_rank, 2)
    assert out == {r: [(True, True, True, True)] * 2 for r in (0, 1)}


def _gpu_rank(rank: int, world: int, port: int, out) -> None:
    from loraserve.inference.tp.allreduce import make_all_reduce

    os.environ["LORASERVE_TP_AR_MAX_BYTES"] = str(1 << 20)
    os.environ["LORASERVE_TP_AR_ONE_SHOT_BYTES"] = str(64 << 10)
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60), device_id=dev)
    ar = make_all_reduce(dev)
    res = {"custom": ar is not None}
    if ar is not None:
        for n, algo in [(4096, None), (64 * 4096, None), (4096, "two_shot"), (4096, "two_shot_inplace"),
                        (1 << 20, None)]:
            for dtype in (torch.bfloat16, torch.float32):
                g = torch.Generator(device=dev).manual_seed(10 + rank)
                src = torch.randn(n, generator=g, device=dev).to(dtype)
                ref = src.clone()
                dist.all_reduce(ref)
                x = src.clone()
                ar(x, algo)
                # replayed from a graph: the buffer exchange and the barriers work captured
                y = torch.zeros_like(src)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    y.copy_(src)
                    ar(y, algo)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y.copy_(src)
                    ar(y, algo)
                for _ in range(3):
                    y.zero_()
                    graph.replay()
                torch.cuda.synchronize()
                # 2 ranks: a + b rounded once either way: exact
                res[f"{n}-{algo}-{dtype}"] = (bool(torch.equal(x, ref)), bool(torch.equal(y, ref)),
                                              ar.takes(x), x.numel() * x.element_size() <= 1 << 20)
        # the logits gather through the symmetric buffer (a sum of zero-padded parts) == NCCL's all-gather
        from loraserve.inference.tp.parallel import TPGroup

        group = TPGroup(rank, world, 2 * 1000 - 3, 1000, custom_ar=ar)
        for rows in (1, 3, 64):   # [rows, 2, 1000] bf16: 1 and 3 rows within the one-shot limit (64 KiB here); 64: NCCL
            local = torch.randn(rows, 1000, device=dev).to(torch.bfloat16)
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local)
            ref = torch.cat(parts, -1)[:, :2 * 1000 - 3].float()
            res[f"gather{rows}"] = bool(torch.equal(group.gather_logits(local), ref))
        # the step broadcast: both regions in turn, sizes up and down, one over the region (NCCL)
        for step, n in enumerate([7, 100_000, 3, 50, 200_000]):
            sent = torch.arange(n, device=dev, dtype=torch.int64) * (step + 3) - 1
            got = sent.clone() if rank == 0 else torch.full_like(sent, -7)
            if not ar.broadcast_step(got):
                dist.broadcast(got, 0)
            res[f"bcast{step}"] = bool(torch.equal(got, sent))
        torch.cuda.synchronize()
    os.environ["LORASERVE_TP_CUSTOM_AR"] = "0"
    res["switched_off"] = make_all_reduce(dev) is None
    out[rank] = res
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_symmetric_memory_sums_equal_nccl_eager_and_graphed():
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    out = _run(_gpu_rank, 2)
    for rank in (0, 1):
        res = out[rank]
        assert res["custom"], "the self-check refused the symmetric-memory all-reduce on 2 GPUs"
        assert res["switched_off"]
        assert all(v for k, v in res.items() if k.startswith(("gather", "bcast"))), res
        for key, (eager_ok, graph_ok, taken, fits) in ((k, v) for k, v in res.items() if "-" in k):
            assert eager_ok and graph_ok, key
            assert taken == fits, key   # 2^20 elements (2 or 4 MiB) are over the 1 MiB limit set here: NCCL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fused_allreduce_rmsnorm_equals_nccl_then_norm():
    """LORASERVE_TP_FUSED_NORM: the Lamport one-shot all-reduce + residual add + RMSNorm passes its start-up
    self-check and equals NCCL's all-reduce followed by the separate norm (residual bit for bit), eagerly
    and from graph replays with one rank late, at 1, 64 and 256 rows of hidden 4096 and 8192."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from benchmarks.bench_allreduce import fused_norm_worker

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    out = _run(fused_norm_worker, 2, [])
    assert out["fused_self_check"], out
    checks = {k: v for k, v in out.items() if k.endswith("_ok")}
    assert len(checks) == 6 and all(checks.values()), checks
