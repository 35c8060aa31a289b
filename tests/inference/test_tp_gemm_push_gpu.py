"""The pushing row-parallel GEMM of tensor parallelism on 2 GPUs (kernels/tp_gemm_push.py, LORASERVE_TP_GEMM_PUSH):
its start-up self-check passes (bit for bit against NCCL's all-reduce of the GEMM's own outputs + the norm), and
GEMM + push followed by the fused norm with pushed=True equals cuBLAS + NCCL + the norm within bf16 GEMM rounding,
on both ranks the same bits, from CUDA-graph replays of three
GEMM + norm pairs with one rank ~1 ms late, at 1 (the GEMV), 8 and 64 rows of the TP=2 8B o_proj / down_proj
shards. The CPU interpreter tests: tests/kernels/test_tp_gemm_push.py."""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _push_rank(rank: int, world: int, port: int, out) -> None:
    from loraserve.inference.tp.fused_norm import make_fused_norm
    from loraserve.kernels.rmsnorm import fused_add_rms_norm_ref

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60), device_id=dev)
    os.environ["LORASERVE_TP_FUSED_NORM"] = "1"
    os.environ["LORASERVE_TP_GEMM_PUSH"] = "1"
    os.environ["LORASERVE_TP_GEMM_PUSH_MAX_ROWS"] = "64"   # 2..64 rows are opt-in; this test checks them too
    fn = make_fused_norm(dev, 4096)
    res = {"self_check": bool(fn is not None and fn.push)}
    g = torch.Generator(device=dev).manual_seed(11 + rank)
    nw = (1 + 0.1 * torch.randn(4096, device=dev, generator=g)).bfloat16()
    for K in (2048, 7168) if res["self_check"] else ():
        w = (torch.randn(4096, K, device=dev, generator=g) / K ** 0.5).bfloat16()
        for rows in (1, 8, 64):
            xs = [torch.randn(rows, K, device=dev, generator=g).bfloat16() for _ in range(3)]
            r0 = torch.randn(rows, 4096, device=dev, generator=g).bfloat16()
            bx = [x.clone() for x in xs]
            br = r0.clone()
            ys = []
            graph = torch.cuda.CUDAGraph()
            fn.gemm_push(bx[0], w)   # warm-up pair outside the graph (compiles; both slots stay in step)
            fn(fn._pushed, br.clone(), nw, 1e-5)
            with torch.cuda.graph(graph):
                for k in range(3):
                    if rank == 1:
                        torch.cuda._sleep(1_000_000)
                    y = fn.gemm_push(bx[k], w)
                    ys.append(y)
                    fn(y, br, nw, 1e-5)
            ok = fn._pushed is None
            for _ in range(3):
                br.copy_(r0)
                graph.replay()
                torch.cuda.synchronize()
                # reference: cuBLAS GEMMs, NCCL, the torch norm; the push GEMM rounds its own way (tolerance),
                # the protocol errors this looks for (a stale slot, a missed row) are O(1)
                er = r0.clone()
                for k in range(3):
                    total = torch.nn.functional.linear(xs[k], w)
                    dist.all_reduce(total)
                    ex, er = fused_add_rms_norm_ref(total, er, nw, 1e-5)
                    ok &= bool(torch.allclose(ys[k].float(), ex.float(), atol=6e-2, rtol=6e-2))
                ok &= bool(torch.allclose(br.float(), er.float(), atol=6e-2, rtol=6e-2))
            # both ranks hold the same result (each summed in rank order): bit for bit
            both = torch.stack([br, ys[-1]])
            other = both.clone()
            dist.broadcast(other, 0)
            ok &= bool(torch.equal(both, other))
            res[f"k{K}_rows{rows}_ok"] = ok
    out[rank] = res
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gemm_push_then_norm_equals_nccl_graphed_with_a_late_rank():
    from loraserve.inference.tp.executor import _free_port

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(_push_rank, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
        out = dict(out)
    for rank in (0, 1):
        assert out[rank]["self_check"], out
        checks = {k: v for k, v in out[rank].items() if k.endswith("_ok")}
        assert len(checks) == 6 and all(checks.values()), checks
