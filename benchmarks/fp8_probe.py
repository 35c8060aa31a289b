"""Device time of the FP8 engine's decode step under its switches (issue 14 probes): where does the FP8 step go?

One Llama-3-8B-shaped checkpoint of --layers layers (random weights). Each engine (bf16, then FP8 weights + FP8
KV cache; small layer counts only: a second 32-layer engine in one CUDA process is not allowed) runs a real
decode at batch 1 and --batch over --prompt-len contexts (wall ms per step), then, per variant (a set of
LORASERVE_ switches read at launch), its decode CUDA graphs are captured again at buckets 1 and --batch and replayed
back to back on the last real step's inputs (its contexts, block tables and slots): device ms per step of the
layers alone (no host, no LM head, no sampling), divided by the layer count. The 32-layer step is predicted as
32 x that + the LM head (benchmarks/fp8_gemv_sweep.py --chain-ms measures the head: bf16 284 us, FP8 156 at M=1).

    python3 benchmarks/fp8_probe.py --layers 4 --json /tmp/fp8_probe.json
    python3 benchmarks/fp8_probe.py --tiny      # CPU: the code path only (no graphs: eager wall times)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.fp8_probe_variants import VARIANTS  # noqa: E402

DEFAULT_VARIANTS = "default,gemv_pdl_early_fixup,rope_kv_unfused,gemv_pdl_early,splitk_fixup"


def capture(engine, buckets: list[int], lora: bool = False):
    """A fresh CudaGraphRunner of `engine`'s model with graphs at `buckets` only, its static inputs copied from
    the engine's own runner (the last real decode step's ids, positions, slots, context lengths, block tables; with
    lora also its token slots: the runner then holds a LoRA graph and a plain one per bucket)."""
    from loraserve.inference.cuda_graphs import CudaGraphRunner

    r, old = engine.runner, engine.runner.graph_runner
    gr = CudaGraphRunner(r.model, r.device, max(buckets), old.block_tables.shape[1], r.num_blocks, r.block_size,
                         engine.lora_manager if lora else None)
    n = gr.max_batch
    gr.ids_positions_slots.copy_(old.ids_positions_slots[:, :n])
    gr.context_lens.copy_(old.context_lens[:n])
    gr.block_tables.copy_(old.block_tables[:n])
    if lora:
        gr.token_slot.copy_(old.token_slot[:n])
    gr.buckets = list(buckets)
    gr.capture()
    return gr


def replay_ms(gr, bs: int, n: int = 30, lora: bool = False) -> float:
    graph = gr.graphs[(bs, lora)][0]
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def replay_profile(gr, bs: int, layers: int, n: int = 10, top: int = 13, lora: bool = False) -> dict:
    """Kernels of one captured decode graph (bucket `bs`) under torch.profiler over `n` replays: [(name, us per
    layer, calls per layer)] by device time, their sum per layer, and the graph's own time per layer (CUDA events,
    unprofiled): the difference is the time between kernels (launch gaps, ramps, tails not overlapped)."""
    from torch.profiler import ProfilerActivity, profile

    graph = gr.graphs[(bs, lora)][0]
    wall_us = 1e3 * replay_ms(gr, bs, n, lora) / layers
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if total > 0 and e.count:
            rows.append((e.key[:60], round(total / n / layers, 2), round(e.count / n / layers, 2)))
    rows.sort(key=lambda r: -r[1])
    kernel_sum = sum(r[1] for r in rows)
    return {"graph_us_per_layer": round(wall_us, 2), "kernels_us_per_layer": round(kernel_sum, 2),
            "between_kernels_us_per_layer": round(wall_us - kernel_sum, 2), "kernels": rows[:top]}


def engine_run(path: str, quant: dict | None, a, variants, res: dict, tag: str, t0: float) -> None:
    from benchmarks.bench_dora import time_decode
    from benchmarks.bench_fp8 import build, free

    kw = (dict(dtype="bfloat16", device="cuda", max_num_tokens=8192, max_batch_size=a.batch,
               kv_cache_config={"free_gpu_memory_fraction": 0.4}) if not a.tiny else dict(dtype="float32", device="cpu"))
    lora_cfg = reqs = None
    if a.lora:   # --lora N: N distinct rank --lora-rank adapters on every projection, the rows round-robin over them
        from loraserve import LoraConfig

        lora_cfg = LoraConfig(max_lora_rank=a.lora_rank, max_loras=a.lora, max_cpu_loras=a.lora)
    engine = build(path, quant, kw, lora_cfg)
    if a.lora:
        from benchmarks.bench_dora import make_adapters, register

        reqs = register(engine, make_adapters(engine, a.lora, a.lora_rank, dora=False, seed=1), 1)
    out = res.setdefault(tag, {})
    sizes = (a.batch,) if a.skip_bs1 else (1, a.batch)
    for bs in sizes:   # a real decode: wall ms per step, and the graphs' inputs for the replays below
        tok_s = time_decode(engine, bs, a.prompt_len, a.steps, reqs or [None], seed=bs)
        out[f"wall_bs{bs}_ms_per_step"] = round(1e3 * bs / tok_s, 3)
    print(f"[{tag}, {time.perf_counter() - t0:.0f} s] {out}", flush=True)
    if engine.device.type == "cuda" and engine.runner.graph_runner is not None:
        engine.runner.graph_runner.graphs.clear()   # the engine's own graphs: their memory back for the variants
        outputs: dict = {}   # bucket (, "lora") -> the first variant's hidden states
        for name, switches in variants:
            if time.perf_counter() - t0 > a.budget_s:
                print(f"  {tag} {name}: skipped (budget)", flush=True)
                continue
            saved = {k: os.environ.get(k) for k in switches}
            os.environ.update(switches)
            try:
                gr = capture(engine, list(sizes), lora=bool(a.lora))
                row = {}
                for bs in sizes:
                    if a.lora:   # the plain and the LoRA graph alternated, min of 3 rounds each (clock drift)
                        plain, with_lora = [], []
                        for _ in range(3):
                            plain.append(replay_ms(gr, bs))
                            with_lora.append(replay_ms(gr, bs, lora=True))
                        row[f"bs{bs}_us_per_layer"] = round(1e3 * min(plain) / a.layers, 2)
                        row[f"bs{bs}_lora_us_per_layer"] = round(1e3 * min(with_lora) / a.layers, 2)
                        row[f"bs{bs}_lora_added_us_per_layer"] = round(1e3 * (min(with_lora) - min(plain)) / a.layers, 2)
                        row[f"bs{bs}_layer_ratio"] = round(min(plain) / min(with_lora), 4)
                    else:
                        row[f"bs{bs}_us_per_layer"] = round(1e3 * replay_ms(gr, bs) / a.layers, 2)
                    # the variants change launches, not math (same codes, same summation order): the hidden
                    # states must equal the default's bit for bit. Each graph's output is read right after its own
                    # replay: the plain and the LoRA graph share a memory pool, and a graph captured later may hold
                    # its intermediates in blocks an earlier one's output used (read after the other's replay, the
                    # plain graph's output was garbage: probe 22:03)
                    graph, gout = gr.graphs[(bs, False)][:2]
                    graph.replay()
                    torch.cuda.synchronize()
                    hidden = gout.float().clone()
                    ref = outputs.setdefault(bs, hidden)
                    named = outputs.setdefault((name, bs), hidden)   # the variants with the same numerics as
                    twin = outputs.get(("w8a8_token_nodefer", bs))   # dot8 without the new deferral: bit for bit?
                    if twin is not None and named is hidden and name != "w8a8_token_nodefer":
                        row[f"bs{bs}_max_abs_diff_vs_dot8_nodefer"] = float((hidden - twin).abs().max())
                    row[f"bs{bs}_max_abs_diff_vs_first"] = float((hidden - ref).abs().max())
                    if row[f"bs{bs}_max_abs_diff_vs_first"]:   # a variant with other numerics (LORASERVE_FP8_W8A8)
                        row[f"bs{bs}_rel_diff_vs_first"] = round(float((hidden - ref).norm() / ref.norm()), 5)
                    if a.lora:   # the LoRA graph's hidden states against the first variant's (a LoRA fusion rounds
                        graph, gout = gr.graphs[(bs, True)][:2]   # in other places: bf16-level differences)
                        graph.replay()
                        torch.cuda.synchronize()
                        hl = gout.float().clone()
                        refl = outputs.setdefault((bs, "lora"), hl)
                        effect = (refl - outputs[bs]).norm()   # the adapters' own effect (the first variant's graphs)
                        row[f"bs{bs}_lora_rel_diff_vs_first"] = round(float((hl - refl).norm() / refl.norm()), 5)
                        row[f"bs{bs}_lora_diff_vs_first_over_effect"] = round(float((hl - refl).norm() / effect), 4)
                        row[f"bs{bs}_lora_vs_plain_rel"] = round(float((hl - hidden).norm() / hidden.norm()), 5)
                        # per row: the largest relative difference of a row against the first variant's (a bug in one
                        # row's adapter shows there), and the median row's
                        per_row = (hl - refl).norm(dim=1) / refl.norm(dim=1)
                        row[f"bs{bs}_lora_row_rel_max"] = round(float(per_row.max()), 5)
                        row[f"bs{bs}_lora_row_rel_median"] = round(float(per_row.median()), 5)
                    if a.profile_kernels and name in a.profile_kernels.split(",") and bs == a.batch:
                        for lo in ((False, True) if a.lora else (False,)):
                            key = f"bs{bs}_profile" + ("_lora" if lo else "")
                            try:
                                prof = replay_profile(gr, bs, a.layers, top=40 if a.lora else 13, lora=lo)
                            except Exception as err:   # noqa: BLE001  (the timing above stands)
                                row[key] = f"failed: {type(err).__name__}: {err}"[:200]
                                continue
                            row[key] = prof
                            print(f"  {tag} {name} bs{bs}{' LoRA' if lo else ''}: graph {prof['graph_us_per_layer']} "
                                  f"us/layer, kernels {prof['kernels_us_per_layer']}, between "
                                  f"{prof['between_kernels_us_per_layer']}", flush=True)
                            for k in prof["kernels"]:
                                print(f"    {k[0]:60s} {k[1]:8.2f} {k[2]:5.2f}", flush=True)
                del gr
            except Exception as err:   # noqa: BLE001  (a variant that fails must not cost the others)
                row = {"failed": f"{type(err).__name__}: {err}"[:300]}
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            out[name] = row
            print(f"  {tag} {name} ({time.perf_counter() - t0:.0f} s): "
                  f"{ {k: v for k, v in row.items() if 'profile' not in k} }", flush=True)
            if a.json:
                with open(a.json, "w") as fh:
                    json.dump(res, fh, indent=1)
    free(engine)
    engine = None


def lm_head_us(ms=(1, 64), vocab: int = 128256, hidden: int = 4096) -> dict:
    """us per LM-head call (CUDA graph, replayed back to back) at each M: bf16 F.linear, the FP8 head (Fp8Head,
    weight-only GEMV) plain and with its top-8 rescored from the bf16 head (the default when LORASERVE_FP8_LM_HEAD=1),
    and whether the rescored argmax equals the bf16 head's."""
    import torch.nn.functional as F

    from loraserve.inference.models.fp8 import quantize_per_channel
    from loraserve.inference.models.fp8_head import Fp8Head

    g = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w_q, s = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device="cuda"), torch.empty(vocab, device="cuda")
    for r in range(0, vocab, 16384):
        w_q[r:r + 16384], s[r:r + 16384] = quantize_per_channel(w[r:r + 16384])
    from loraserve.kernels import fp8_gemv_configs as fc

    heads = {"bf16": lambda x: F.linear(x, w), "fp8": Fp8Head(w_q, s), "fp8_rescore8": Fp8Head(w_q, s, w, 8),
             "fp8_rescore8_torch": Fp8Head(w_q, s, w, 8),   # the rescoring as torch ops (LORASERVE_FP8_HEAD_FUSED=0)
             # > 4 rows: FP8 logits + the rescoring (LORASERVE_FP8_LM_HEAD_BATCH_MAX_M=64): W8A8 tw / dot8, fp16 dot16
             "fp8_batch_tw": Fp8Head(w_q, s, w, 8), "fp8_batch_dot8": Fp8Head(w_q, s, w, 8),
             "fp8_batch_dot16": Fp8Head(w_q, s, w, 8)}
    batch_cfg = {"fp8_batch_tw": "tw:64:64:128:1:4:3", "fp8_batch_dot16": "dot16:64:64:128:1:4:3"}   # dot8: default
    table_head = fc._HALF_M1.get((vocab, hidden))   # the table's own head entry, restored after each forced one
    # the fp16-product GEMV (gemvh) for the head at M = 1, at gate_up's winning tile with split 1 and 2 (not in the
    # table: measured here first)
    half = {"fp8_gemvh2_s1": ("gemvh2", 1, 4, 512, 1, 4, 4), "fp8_gemvh2_s2": ("gemvh2", 1, 4, 512, 2, 4, 4),
            "fp8_gemvh4_1w": ("gemvh4", 1, 1, 512, 1, 1, 4)}
    out = {}
    for m in ms:
        x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
        row = {}
        for name, fn in list(heads.items()) + ([(k, heads["fp8"]) for k in half] if m == 1 else []):
            if name in half:
                fc._HALF_M1[(vocab, hidden)] = half[name]
            if name == "fp8_rescore8_torch":
                os.environ["LORASERVE_FP8_HEAD_FUSED"] = "0"
            os.environ["LORASERVE_FP8_LM_HEAD_BATCH_MAX_M"] = "64" if name.startswith("fp8_batch") else "0"
            os.environ["LORASERVE_FP8_LM_HEAD_BATCH_CFG"] = batch_cfg.get(name, "")
            try:
                fn(x)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = fn(x)
                graph.replay()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                row[name] = round(start.elapsed_time(end) * 1e3 / 20, 1)
                row[f"{name}_argmax_eq_bf16"] = float((y.argmax(-1) == F.linear(x, w).argmax(-1)).float().mean())
            except Exception as err:   # noqa: BLE001  (one head failing must not cost the others)
                row[name] = f"failed: {type(err).__name__}: {err}"[:200]
            os.environ.pop("LORASERVE_FP8_HEAD_FUSED", None)
            os.environ.pop("LORASERVE_FP8_LM_HEAD_BATCH_MAX_M", None)
            os.environ.pop("LORASERVE_FP8_LM_HEAD_BATCH_CFG", None)
            if table_head is None:
                fc._HALF_M1.pop((vocab, hidden), None)
            else:
                fc._HALF_M1[(vocab, hidden)] = table_head
        out[m] = row
        print(f"  lm_head M={m} (us): {row}", flush=True)
    return out


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def profile_decode(engine, batch: int, prompt_len: int, steps: int = 5, top: int = 22) -> list:
    """Device time per decode step by kernel (torch.profiler over `steps` steps at `batch`, CUDA graphs as
    served): [(name, us per step, us per call, calls per step)], the `top` largest, also printed."""
    from torch.profiler import ProfilerActivity, profile

    from loraserve import SamplingParams

    ids = torch.randint(2, engine.args.vocab_size - 1, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(99)).tolist()
    for i, p in enumerate(ids):
        engine.add_request(f"fp8-prof-{i}", p, SamplingParams(max_tokens=2 * steps + 8, ignore_eos=True,
                                                              temperature=0))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.seqs.values()):
        engine.step()
    for _ in range(2):
        engine.step()
    _sync(engine)
    host, t = [], time.perf_counter()   # unprofiled: host time inside step() against wall time per step
    for _ in range(steps):
        t1 = time.perf_counter()
        engine.step()
        host.append(time.perf_counter() - t1)
    _sync(engine)
    wall_ms, host_ms = 1e3 * (time.perf_counter() - t) / steps, 1e3 * statistics.median(host)
    cuda = engine.device.type == "cuda"   # CPU (--tiny): op times, to exercise this code
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        _sync(engine)
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    rows = []
    for e in prof.key_averages():
        total = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) if cuda
                 else e.self_cpu_time_total)
        if total > 0 and e.count:
            rows.append((e.key[:70], round(total / steps, 1), round(total / e.count, 2), round(e.count / steps, 1)))
    rows.sort(key=lambda r: -r[1])
    print(f"  decode bs{batch}: wall {wall_ms:.3f} ms/step, host in step() {host_ms:.3f} ms (median), device us per "
          f"step (all kernels): {sum(r[1] for r in rows):.0f} (kernel, us/step, us/call, calls/step)")
    for r in rows[:14]:   # the JSON keeps `top`
        print(f"    {r[0]:70s} {r[1]:9.1f} {r[2]:8.2f} {r[3]:6.1f}")
    return rows[:top]


def gemm_micro(iters: int = 50) -> dict:
    """us per GEMM and weight GB/s at Llama-3-8B projection shapes (CUDA only, eager launches: host costs
    included; benchmarks/fp8_gemv_sweep.py times CUDA graphs): bf16 F.linear, the FP8 GEMV, and _scaled_mm
    with the fused per-token quantization, at decode and prefill M."""
    import torch.nn.functional as F

    from loraserve.inference.models.fp8 import quantize_per_channel, scaled_mm_rowwise
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8
    from loraserve.kernels.fp8_gemv import fp8_gemv

    copies = 8   # weights rotate over 8 copies: > the 50 MB L2 even for o_proj in FP8 (16 MB each)

    def us(fn) -> float:
        for i in range(5):
            fn(i % copies)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fn(i % copies)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / iters

    out = {}
    for name, (n, k) in {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        qs = [quantize_per_channel(w) for w in ws]
        for m in (1, 16, 64, 256, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"bf16": us(lambda i: F.linear(x, ws[i])),
                   "scaled_mm": us(lambda i: scaled_mm_rowwise(*per_token_quant_fp8(x), *qs[i], torch.bfloat16))}
            if m <= 64:
                row["gemv"] = us(lambda i: fp8_gemv(x, *qs[i]))
                row["gemv_weight_GBps"] = n * k / row["gemv"] / 1e3
                row["bf16_weight_GBps"] = 2 * n * k / row["bf16"] / 1e3
            out[f"{name}_m{m}_us"] = {key: round(v, 2) for key, v in row.items()}
        ws = qs = None
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated names from VARIANTS, in order")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the variants left after this many seconds")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--skip-fp8", action="store_true", help="the bf16 engine only (one engine per process)")
    ap.add_argument("--tiny", action="store_true", help="CPU: a tiny random Llama, eager (the code path only)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-kernels", default="",
                    help="comma-separated variant names whose --batch graph is also replayed under torch.profiler "
                         "(kernels per layer, and the time between them)")
    ap.add_argument("--lora", type=int, default=0, help="N distinct adapters (rank --lora-rank) on every projection, "
                    "decode rows round-robin over them: each variant's LoRA graph is timed beside its plain one "
                    "(bs*_lora_us_per_layer, bs*_lora_added_us_per_layer, bs*_layer_ratio)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--skip-bs1", action="store_true", help="only the --batch bucket (capture and replay)")
    ap.add_argument("--lm-head-only", action="store_true", help="only the LM head timings (lm_head_us)")
    ap.add_argument("--ckpt", default=None, help="a checkpoint directory: built there (kept) unless it has config.json")
    ap.add_argument("--build-only", action="store_true", help="only build --ckpt (e.g. while a sweep runs) and exit")
    a = ap.parse_args()
    t0 = time.perf_counter()
    if a.lm_head_only:
        res = lm_head_us((1, a.batch))
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(res, fh, indent=1)
        return 0
    path = a.ckpt or tempfile.mkdtemp(prefix="fp8-probe-")
    if a.tiny:
        from tests.inference.conftest import make_random_model

        make_random_model(path, "llama")
        a.batch, a.prompt_len, a.steps, a.layers = 4, 16, 3, 2
    elif not os.path.exists(os.path.join(path, "config.json")):
        from benchmarks.bench_engine import build_checkpoint

        os.makedirs(path, exist_ok=True)
        build_checkpoint(path, a.layers)
        print(f"checkpoint built ({time.perf_counter() - t0:.0f} s)", flush=True)
    if a.build_only:
        return 0
    chosen = [v for name in a.variants.split(",") for v in VARIANTS if v[0] == name]
    if a.lora or a.skip_bs1:   # the engines' own decode graphs only at the probed buckets (capture time)
        from loraserve.inference import cuda_graphs

        cuda_graphs.BUCKETS = (a.batch,) if a.skip_bs1 else (1, a.batch)
    res: dict = {"layers": a.layers, "batch": a.batch, "prompt_len": a.prompt_len,
                 "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORASERVE_")}}
    try:
        if not a.skip_bf16:
            engine_run(path, None, a, [("default", {})], res, "bf16", t0)
        kv = "FP8"
        if not a.skip_fp8:
            engine_run(path, {"quant_algo": "FP8", "kv_cache_quant_algo": kv}, a, chosen, res, "fp8", t0)
    finally:
        if not a.ckpt:
            shutil.rmtree(path, ignore_errors=True)
    b, f = res.get("bf16", {}).get("default", {}), res.get("fp8", {})
    head = {"bf16": 284.0, "fp8_head": 156.0}   # us at M=1 (fp8_gemv_sweep.py --chain-ms, H200, 2026-11-30)
    if "bs1_us_per_layer" in b:   # the 32-layer step from the per-layer device times (+ the LM head)
        bf = 32 * b["bs1_us_per_layer"] + head["bf16"]
        for name, row in f.items():
            if isinstance(row, dict) and "bs1_us_per_layer" in row:
                row["predicted_32l_bs1_speedup"] = round(bf / (32 * row["bs1_us_per_layer"] + head["bf16"]), 3)
                row["predicted_32l_bs1_speedup_fp8_head"] = round(bf / (32 * row["bs1_us_per_layer"]
                                                                        + head["fp8_head"]), 3)
                row[f"bs{a.batch}_vs_bf16_layer"] = round(b[f"bs{a.batch}_us_per_layer"]
                                                          / row[f"bs{a.batch}_us_per_layer"], 3)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print("RESULT " + json.dumps({k: v for k, v in res.items() if k != "switches"}), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
