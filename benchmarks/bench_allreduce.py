"""All-reduce latency on 2 GPUs: NCCL vs symmetric-memory one-shot / two-shot (services/inference/tp/allreduce.py).

Message sizes: 8 KB (a batch-1 decode step's [1, 4096] bf16), 64 KB, 512 KB (batch 64), 4 MB, 32 MB;
each timed eagerly (one launch per all-reduce, CUDA events over many) and inside a CUDA graph (K
all-reduces captured back to back, the graph replayed R times: what a graphed decode step sees).
Every algorithm's sum is checked against NCCL's first, eagerly and from a graph replay.

    python3 benchmarks/bench_allreduce.py [--json out.json]     # 2 GPUs, NCCL, ~30-50 s
        # last: a second process group in the same driver process gets the custom all-reduce again
    python3 benchmarks/bench_allreduce.py --smoke               # CPU, gloo, 2 processes: the fallback path
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.graph_timing import graph_seconds  # noqa: E402

SIZES = [8 << 10, 64 << 10, 512 << 10, 4 << 20, 32 << 20]
ALGOS = ["nccl", "one_shot", "two_shot", "two_shot_inplace"]


def _time_eager(fn, iters: int) -> float:
    """us per call, launches back to back on the current stream."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _time_graph(fn, per_graph: int, replays: int) -> float:
    """us per call: `per_graph` calls captured in one graph, replayed `replays` times."""
    return graph_seconds(fn, per_graph, replays, warmup=2) * 1e6


def _check(ar, n: int, dtype, algo: str, rank: int) -> float:
    """max |algo - exact| over one eager call and one graph replay (inputs: small integers per rank,
    exact in bf16, so every algorithm must give the exact sum)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    src = (torch.arange(n, device="cuda") % 7 + rank).to(dtype)
    exact = sum((torch.arange(n, device="cuda") % 7 + r) for r in range(world)).to(dtype)
    x = src.clone()
    ar(x, algo)
    err = (x.float() - exact.float()).abs().max().item()
    graph = torch.cuda.CUDAGraph()
    y = torch.zeros_like(src)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y.copy_(src)
        ar(y, algo)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        y.copy_(src)
        ar(y, algo)
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return max(err, (y.float() - exact.float()).abs().max().item())


def gpu_worker(rank: int, world: int, port: int, out: dict, sizes: list[int]) -> None:
    import torch.distributed as dist

    from loraserve.inference.tp.allreduce import SymmMemAllReduce, self_check

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60), device_id=dev)
    ar = SymmMemAllReduce(dev, max(sizes), 512 << 10)
    problem = self_check(ar)
    res = {"self_check": problem or "ok", "one_shot_copy_fused": ar._one_shot_copy is not None,
           "two_shot_out": ar._two_shot_out is not None, "sizes": {}}
    for nbytes in sizes:
        n = nbytes // 2
        row = res["sizes"][str(nbytes)] = {}
        for algo in ALGOS:
            try:
                row[f"{algo}_max_err"] = _check(ar, n, torch.bfloat16, algo, rank)
                x = torch.zeros(n, dtype=torch.bfloat16, device=dev)   # zeros: stays finite however often summed
                dist.barrier()
                row[f"{algo}_eager_us"] = _time_eager(lambda: ar(x, algo), 200 if nbytes <= 1 << 20 else 50)
                dist.barrier()
                per_graph = 50 if nbytes <= 1 << 20 else 10
                row[f"{algo}_graph_us"] = _time_graph(lambda: ar(x, algo), per_graph, 20)
            except Exception as exc:  # noqa: BLE001 - one algorithm's failure is a figure too
                row[f"{algo}_error"] = repr(exc)[:300]
    res["step_path_us"] = step_paths(ar, rank, dev)
    if rank == 0:
        out.update(res)
    dist.barrier()
    dist.destroy_process_group()


def step_paths(ar, rank: int, dev) -> dict:
    """The two eager collectives of a decode step besides the graphed all-reduces, us per call: the step
    broadcast (packed int64 inputs, bs1 and bs64 shapes) and the LM head's logits gather ([T, 128256/2]
    bf16 per rank), symmetric memory vs NCCL; each checked against NCCL first."""
    import torch.distributed as dist

    from loraserve.inference.tp.parallel import TPGroup

    out = {}
    for name, n in (("bcast_bs1", 64), ("bcast_bs64", 64 * 40 + 5 * 64)):
        sent = torch.arange(n, device=dev, dtype=torch.int64) - 5
        t = sent.clone() if rank == 0 else torch.zeros_like(sent)
        ok = ar.broadcast_step(t) and torch.equal(t, sent)
        out[f"{name}_ok"] = bool(ok)
        dist.barrier()
        out[f"{name}_symm_us"] = _time_eager(lambda: ar.broadcast_step(t), 200)
        dist.barrier()
        out[f"{name}_nccl_us"] = _time_eager(lambda: dist.broadcast(t, 0), 200)
    vocab = 128256
    group = TPGroup(rank, 2, vocab, vocab // 2, custom_ar=ar)
    nccl = TPGroup(rank, 2, vocab, vocab // 2)
    for rows in (1, 2):
        local = torch.randn(rows, vocab // 2, device=dev).to(torch.bfloat16)
        out[f"gather{rows}_ok"] = bool(torch.equal(group.gather_logits(local), nccl.gather_logits(local)))
        dist.barrier()
        out[f"gather{rows}_symm_us"] = _time_eager(lambda: group.gather_logits(local), 200)
        dist.barrier()
        out[f"gather{rows}_nccl_us"] = _time_eager(lambda: nccl.gather_logits(local), 200)
    return out


def fused_norm_worker(rank: int, world: int, port: int, out: dict, sizes: list[int]) -> None:
    """The fused all-reduce + residual add + RMSNorm (tp/fused_norm.py, kernels/allreduce_rmsnorm.py) on
    2 GPUs: its start-up self-check, then against NCCL's all-reduce + the separate norm (bit for bit on the
    residual) eagerly and replayed from a graph with one rank ~1 ms late, then us per call inside a graph
    (50 calls captured) against the symmetric-memory one-shot + norm and NCCL + norm, at 1 and 64 rows of
    the 8B (4096) and 70B (8192) hidden sizes."""
    import torch.distributed as dist

    from loraserve.inference.tp.allreduce import make_all_reduce
    from loraserve.inference.tp.fused_norm import LamportNorm, make_fused_norm
    from loraserve.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60), device_id=dev)
    ar = make_all_reduce(dev)
    os.environ["LORASERVE_TP_FUSED_NORM"] = "1"
    fn = make_fused_norm(dev, 4096)
    res: dict = {"fused_self_check": fn is not None, "custom_ar": ar is not None}
    if fn is None:
        if rank == 0:
            out.update(res)
        dist.destroy_process_group()
        return
    norms = {4096: fn, 8192: LamportNorm(dev, 8192, 256)}
    g = torch.Generator(device=dev).manual_seed(99 + rank)
    for hidden, f in norms.items():
        w = (torch.rand(hidden, device=dev, generator=torch.Generator(device=dev).manual_seed(3)) * 0.02).bfloat16()
        for rows in (1, 64, 256):
            # eager and graphed (3 calls in a graph, replayed 3 times, rank 1 late by a sleep kernel) vs NCCL + norm
            xs = [torch.randn(rows, hidden, device=dev, generator=g).bfloat16() for _ in range(3)]
            r0 = torch.randn(rows, hidden, device=dev, generator=g).bfloat16()
            refs = []
            for x in xs:
                y = x.clone()
                dist.all_reduce(y)
                refs.append(y)
            ok = True
            x, r = xs[0].clone(), r0.clone()
            f(x, r, w, 1e-5)
            rx, rr = fused_add_rms_norm_ref(refs[0].clone(), r0.clone(), w, 1e-5)
            ok &= bool(torch.equal(r, rr)) and bool(torch.allclose(x.float(), rx.float(), atol=1e-2, rtol=1e-2))
            bx = [x.clone() for x in xs]
            br = r0.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for k in range(3):
                    if rank == 1:
                        torch.cuda._sleep(1_000_000)
                    f(bx[k], br, w, 1e-5)
            for _ in range(3):
                for k in range(3):
                    bx[k].copy_(xs[k])
                br.copy_(r0)
                graph.replay()
                torch.cuda.synchronize()
                er = r0.clone()
                for k in range(3):
                    ex, er = fused_add_rms_norm_ref(refs[k].clone(), er, w, 1e-5)
                    ok &= bool(torch.allclose(bx[k].float(), ex.float(), atol=1e-2, rtol=1e-2))
                ok &= bool(torch.equal(br, er))
            res[f"h{hidden}_rows{rows}_ok"] = ok
            # us per call, 50 calls in a graph: fused / one-shot + norm / NCCL + norm
            x, r = xs[0].clone(), torch.zeros_like(r0)
            dist.barrier()
            res[f"h{hidden}_rows{rows}_fused_us"] = _time_graph(lambda: f(x, r, w, 1e-5), 50, 20)
            if ar is not None:
                dist.barrier()
                res[f"h{hidden}_rows{rows}_1shot_norm_us"] = _time_graph(
                    lambda: fused_add_rms_norm(ar(x), r, w, 1e-5), 50, 20)
            dist.barrier()
            res[f"h{hidden}_rows{rows}_nccl_norm_us"] = _time_graph(
                lambda: fused_add_rms_norm(ar(x, "nccl") if ar else (dist.all_reduce(x), x)[1], r, w, 1e-5), 50, 20)
    if rank == 0:
        out.update(res)
    dist.barrier()
    dist.destroy_process_group()


def cpu_worker(rank: int, world: int, port: int, out: dict, sizes: list[int]) -> None:
    """gloo: the selector must give no custom all-reduce, and TPGroup.all_reduce must still sum."""
    import torch.distributed as dist

    from loraserve.inference.tp.allreduce import make_all_reduce
    from loraserve.inference.tp.parallel import TPGroup

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    group = TPGroup(rank, world, 16, 8)
    group.setup_all_reduce(torch.device("cpu"))
    x = torch.full((4, 8), float(rank + 1))
    group.all_reduce(x)
    ok = group.custom_ar is None and make_all_reduce(torch.device("cpu")) is None and bool(
        (x == sum(range(1, world + 1))).all())
    if rank == 0:
        out.update({"smoke": "ok" if ok else "FAILED", "sum": x[0, 0].item()})
    dist.destroy_process_group()


def _reinit_round(dev: torch.device, port: int, rank: int, value: float):
    """One rank's part of one reinit_check round: join a new 2-rank group, make its all-reduce (None: NCCL's),
    all-reduce 4096 elements of `value` (rank 0 gives 1, rank 1 gives 2: the sum is 3). (all-reduce, x)."""
    import torch.distributed as dist

    from loraserve.inference.tp.allreduce import make_all_reduce

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30), device_id=dev)
    ar = make_all_reduce(dev)
    x = torch.full((4096,), value, dtype=torch.bfloat16, device=dev)
    if ar is not None:
        ar(x)
    else:
        dist.all_reduce(x)
    return ar, x


def _reinit_peer(port: int) -> None:
    """Rank 1 of one round of reinit_check: a fresh process, as a TP worker of a new engine."""
    import torch.distributed as dist

    dev = torch.device("cuda", 1)
    torch.cuda.set_device(dev)
    ar, _ = _reinit_round(dev, port, 1, 2.0)   # ar (its symmetric buffer) held until the process exits
    torch.cuda.synchronize()
    dist.barrier()
    os._exit(0)


def _reinit_driver(q) -> None:
    """Rank 0 kept across two process groups, a fresh rank 1 each time: what a serving process does when
    it closes a TP engine and starts another (bench_tp does it). The first group's buffer is kept alive."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from loraserve.inference.tp.executor import _free_port

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    kept, rounds = [], []
    for _ in range(2):
        port = _free_port()
        peer = mp.get_context("spawn").Process(target=_reinit_peer, args=(port,), daemon=True)
        peer.start()
        ar, x = _reinit_round(dev, port, 0, 1.0)
        rounds.append("custom" if ar is not None and bool((x == 3).all()) else "nccl" if ar is None else "WRONG")
        kept.append(ar)
        dist.barrier()
        dist.destroy_process_group()
        peer.join(10)
    q.put(rounds)


def reinit_check(timeout_s: float = 40) -> str:
    """'custom,custom' when a second engine's group gets the symmetric-memory all-reduce again; 'timeout'
    when the rendezvous hung (then one TP engine per process is what can be measured)."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    driver = ctx.Process(target=_reinit_driver, args=(q,))
    driver.start()
    try:
        return ",".join(q.get(timeout=timeout_s))
    except queue.Empty:
        return "timeout"
    finally:
        driver.join(5)
        if driver.is_alive():
            driver.kill()
            driver.join(5)


def _spawn(fn, world: int, sizes: list[int]) -> dict:
    import torch.multiprocessing as mp

    from loraserve.inference.tp.executor import _free_port

    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(fn, args=(world, _free_port(), out, sizes), nprocs=world, join=True, start_method="spawn")
        return dict(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, 2 processes: the fallback path only")
    ap.add_argument("--sizes", default=None, help="comma-separated bytes (default 8K..32M)")
    ap.add_argument("--fused-norm", action="store_true",
                    help="only the fused all-reduce + RMSNorm: its checks and us per call (2 GPUs)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else SIZES
    # multicast stays off whatever the caller's environment says (no multimem ops are used anyway)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if a.smoke:
        res = _spawn(cpu_worker, 2, sizes)
        print(json.dumps(res))
        return 0 if res.get("smoke") == "ok" else 1
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"bench_allreduce skipped: it needs 2 GPUs, {n} visible (--smoke runs the CPU fallback)")
        return 0
    if a.fused_norm:
        res = _spawn(fused_norm_worker, 2, sizes)
        print("fused all-reduce + RMSNorm: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
        write_json(a.json, res)
        return 0 if res.get("fused_self_check") and all(v for k, v in res.items() if k.endswith("_ok")) else 1
    res = _spawn(gpu_worker, 2, sizes)
    res["device"] = torch.cuda.get_device_name(0)
    print(f"self-check: {res.get('self_check')}; one-shot copy fused: {res.get('one_shot_copy_fused')}; "
          f"two-shot out: {res.get('two_shot_out')}")
    names = {"nccl": "nccl", "one_shot": "1shot", "two_shot": "2shot", "two_shot_inplace": "2shot_ip"}
    print("us per all-reduce (bf16, 2 ranks)")
    print(f"{'bytes':>10} " + " ".join(f"{m[0] + ' ' + names[a]:>11}" for m in ("eager", "graph") for a in ALGOS)
          + "   max err " + "/".join(names[a] for a in ALGOS))
    for nbytes, row in res.get("sizes", {}).items():
        cells = []
        for mode in ("eager", "graph"):
            for algo in ALGOS:
                v = row.get(f"{algo}_{mode}_us")
                cells.append(f"{v:11.2f}" if v is not None else f"{'ERR':>11}")
        errs = [row.get(f"{algo}_max_err") for algo in ALGOS]
        print(f"{int(nbytes):>10} " + " ".join(cells) + "   " + " ".join("-" if e is None else f"{e:g}" for e in errs))
        for algo in ALGOS:
            if f"{algo}_error" in row:
                print(f"    {algo}: {row[f'{algo}_error']}")
    print("eager, us per call: " + ", ".join(f"{k[:-3]} {v:.1f}" if k.endswith("_us") else f"{k} {v}"
                                            for k, v in res.get("step_path_us", {}).items()))
    write_json(a.json, res)   # before the reinit check, which may hang
    res["reinit"] = reinit_check()
    print(f"second TP group in the same driver process: {res['reinit']} (expect custom,custom)", flush=True)
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
