"""Resident-adapter speed (issue 12 / issue 10): where a LoRA step's time goes, and the mixed-step LoRA graphs.

One engine (8B shape unless --tiny), adapters already resident on the GPU:

  1. first token of a one-token request (64-token fresh prompt): no adapter, a resident rank-16 adapter on all
     seven modules with the mixed-step LoRA graphs (mixed_graphs.py), and the same with LoRA steps eager
     (MixedGraphRunner.use_lora = False: the path before the LoRA graphs);
  2. --profile: torch.profiler over one such request, eager and graphed: host wall, device kernel time, kernel
     launches, the top host ops (where the eager step's ~80 ms on 32 layers went);
  3. closed loop as bench_churn's resident phase (32 adapters of rank 8-64 on q_proj+v_proj, fresh prompts,
     uniform over the adapters) vs the same load without adapters, LoRA graphs on and off
     -> resident32_vs_base_tok_s (bench_churn's key; target >= 0.9).

    python3 benchmarks/bench_lora_resident.py --layers 8 --profile --json /tmp/resident.json   # GPU
    python3 benchmarks/bench_lora_resident.py --tiny                                            # CPU flow check
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_churn import (ALL_MODULES, CHURN_MODULES, make_requests, make_resident,  # noqa: E402
                                    random_adapter, run_closed_loop)
from benchmarks.churn_cold import FreshPrompts, time_first_token  # noqa: E402


def add_adapter(engine, int_id: int, modules, rank: int, seed: int) -> None:
    from loraserve import LoRARequest

    adapter = random_adapter(engine.args.lora_module_shapes(), modules, engine.args.num_hidden_layers, rank, seed,
                             engine.device, engine.dtype)
    engine.lora_manager.add_adapter(adapter, LoRARequest(f"res-{int_id}", int_id)).release()


def lora_graphs(engine, on: bool) -> None:
    mixed = engine.runner.mixed_graphs
    if mixed is not None:
        mixed.use_lora = on


def graph_state(engine) -> tuple:
    """(plain graphs, LoRA graphs, capture s plain, capture s LoRA, covered steps) of the mixed-step runner."""
    m = engine.runner.mixed_graphs
    if m is None:
        return (0, 0, 0.0, 0.0, 0)
    cap = getattr(m, "capture_s", {False: 0.0, True: 0.0})
    return (len(m.graphs), len(m.lora_graphs), cap[False], cap[True], m.num_covered)


def graph_note(before: tuple, after: tuple) -> str:
    d = [b - a for a, b in zip(before, after)]
    return f"captures {d[0]} plain ({d[2]:.2f} s) + {d[1]} LoRA ({d[3]:.2f} s), {d[4]} covered steps"


def ttft_ms(engine, prompts, lora, n: int) -> float:
    from loraserve import LoRARequest

    req = None if lora is None else LoRARequest(f"res-{lora}", lora)
    time_first_token(engine, prompts(64), req)   # warm-up: any capture or compile of this path
    return 1e3 * statistics.median(time_first_token(engine, prompts(64), req) for _ in range(n))


def profile_request(engine, prompts, lora: int, tag: str, rows: int) -> dict:
    """One one-token request under torch.profiler: host wall, device kernel time and launches, top host ops."""
    from torch.profiler import ProfilerActivity, profile

    from loraserve import LoRARequest

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        wall = time_first_token(engine, prompts(64), LoRARequest(f"res-{lora}", lora))
    events = prof.key_averages()
    dev_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                        "cudaLaunchKernelExC"))
    graph_replays = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    print(f"  profile [{tag}]: wall {wall * 1e3:.1f} ms (profiled), device kernels {dev_us / 1e3:.2f} ms, "
          f"{launches} kernel launches, {graph_replays} graph launches")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    return {"wall_ms": wall * 1e3, "device_kernel_ms": dev_us / 1e3, "launches": launches,
            "graph_launches": graph_replays}


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """kernel name -> (device us, calls), kernel events only: an eager aten op's self device time counts its
    kernels a second time (the 17:56 probe's 'device 328.7 ms' in a 293 ms loop summed both)."""
    from torch.autograd import DeviceType

    return {e.key: (e.self_device_time_total, e.count) for e in prof.key_averages() if e.device_type == DeviceType.CUDA}


def profile_loop(engine, requests, conc: int, tag: str, rows: int) -> dict:
    """A short closed loop under torch.profiler: the kernels by device time (graph replays included)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    steps0 = engine.runner.mixed_graphs.num_replays if engine.runner.mixed_graphs is not None else 0
    with profile(activities=acts) as prof:
        r = run_closed_loop(engine, requests, conc, tag)
    kern = kernel_times(prof)
    total = sum(d for d, _ in kern.values())
    lora = sum(d for k, (d, _) in kern.items() if "lora" in k.lower())
    mixed = (engine.runner.mixed_graphs.num_replays - steps0) if engine.runner.mixed_graphs is not None else 0
    print(f"  loop profile [{tag}]: wall {r['wall_s'] * 1e3:.0f} ms (profiled), kernels {total / 1e3:.1f} ms, of it "
          f"LoRA kernels {lora / 1e3:.1f} ms; {mixed} mixed-graph replays; top kernels by device time (us, calls):")
    for k, (d, c) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"    {d:10.0f} {c:6d}  {k[:90]}")
    return {"wall_ms": r["wall_s"] * 1e3, "kernel_ms": total / 1e3, "lora_kernel_ms": lora / 1e3,
            "mixed_replays": mixed, "kernels": {k: list(v) for k, v in kern.items()}}


def print_kernel_diff(with_lora: dict, base: dict, rows: int) -> None:
    """Where the adapters' extra device time goes: per kernel name, LoRA loop minus base loop."""
    a, b = with_lora["kernels"], base["kernels"]
    diff = {k: (a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0], a.get(k, (0, 0))[1] - b.get(k, (0, 0))[1]) for k in {*a, *b}}
    total = with_lora["kernel_ms"] - base["kernel_ms"]
    lora = sum(d for k, (d, _) in diff.items() if "lora" in k.lower())
    print(f"  kernel time with adapters - without: {total:+.1f} ms (LoRA kernels {lora / 1e3:+.1f} ms, the rest "
          f"{total - lora / 1e3:+.1f} ms); largest differences (us, calls):")
    for k, (d, c) in sorted(diff.items(), key=lambda kv: -abs(kv[1][0]))[:rows]:
        print(f"    {d:+10.0f} {c:+6d}  {k[:90]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU (a check of the flow)")
    ap.add_argument("--model", help="an existing checkpoint dir (default: build one)")
    ap.add_argument("--layers", type=int, default=8, help="layers of the 8B-shaped checkpoint built")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--requests", type=int, help="requests per closed-loop run (128; tiny 16)")
    ap.add_argument("--concurrency", type=int, help="(64; tiny 8)")
    ap.add_argument("--input-len", type=int, help="(256; tiny 24)")
    ap.add_argument("--output-len", type=int, help="(64; tiny 8)")
    ap.add_argument("--ttft-repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-rows", type=int, default=14)
    ap.add_argument("--skip-loop", action="store_true", help="only the one-token figures")
    ap.add_argument("--skip-ttft", action="store_true", help="only the closed loop")
    ap.add_argument("--profile-loop", action="store_true",
                    help="also a short closed loop (concurrency requests) with and without adapters under torch.profiler")
    ap.add_argument("--modules", choices=("all", "qv"), default="all",
                    help="LoRA target modules the engine enables (qv: bench_churn's resident engine exactly; the "
                         "one-token adapter then has q_proj + v_proj only)")
    ap.add_argument("--buckets", help="decode CUDA-graph batch sizes, e.g. 16,64 (default: the engine's; fewer: "
                                      "fewer captures and LoRA kernel variants to compile on a cold Triton cache)")
    ap.add_argument("--repeats", type=int, default=1, help="closed loops with / without adapters, alternating (median)")
    ap.add_argument("--skip-eager-loop", action="store_true", help="no closed loop with mixed LoRA steps eager")
    ap.add_argument("--ab-bound", action="store_true",
                    help="also the LoRA loop with the mixed graphs' old LoRA grid (no segment bound), recaptured")
    ap.add_argument("--tier-adapters", type=int, default=0,
                    help="size the GPU tier for this many adapters' module layers, as bench_churn does for its 1000 "
                         "(its resident phase runs with that tier: 1000 max-rank slots or 8000 packing granules)")
    ap.add_argument("--replay-variants",
                    help="before the loops: the steady mixed step (63 decode rows over the adapters + a 256-token "
                         "chunk) replayed from the engine's graphs, plain vs LoRA, the LoRA graph recaptured under each "
                         "of these variants (benchmarks/lora_step_replay.py), e.g. default,pps16,ovl,empty")
    ap.add_argument("--replay-decode-rows", type=int, default=0,
                    help="decode rows of the replayed mixed step (default concurrency - 1; the 128-request loop's "
                         "most replayed graph is (40, 320): ~35 rows)")
    ap.add_argument("--replay-rounds", type=int, default=3, help="plain / LoRA replay rounds per variant (min kept)")
    ap.add_argument("--replay-budget-s", type=float, default=1e9, help="start no replay variant after this")
    ap.add_argument("--replay-profile", help="profile these replayed variants' two graphs (kernel differences; "
                                             "default: the first variant), e.g. default,pdloff")
    ap.add_argument("--loop-variant", default="default",
                    help="the closed loops with adapters under this variant (lora_step_replay.VARIANTS); 'best': the "
                         "fastest replayed one of --replay-variants (bar 'empty')")
    ap.add_argument("--also-variants", help="after the main loops: the same loops (with / without adapters, --repeats "
                                           "each) under each of these variants, e.g. the old defaults")
    ap.add_argument("--json")
    args = ap.parse_args()
    tiny = args.tiny
    device, dtype = ("cpu", "float32") if tiny else ("cuda", "bfloat16")
    n_req, conc = args.requests or (16 if tiny else 128), args.concurrency or (8 if tiny else 64)
    in_len, out_len = args.input_len or (24 if tiny else 256), args.output_len or (8 if tiny else 64)

    from loraserve import LLM, LoraConfig

    if args.buckets:
        from loraserve.inference import cuda_graphs

        cuda_graphs.BUCKETS = tuple(int(b) for b in args.buckets.split(","))

    t0 = time.perf_counter()
    model_dir = args.model
    if model_dir is None:
        model_dir = os.path.join(tempfile.mkdtemp(prefix="bench-resident-"), "model")
        if tiny:
            from tests.inference.conftest import make_random_model
            make_random_model(model_dir, "llama")
        else:
            from benchmarks.bench_engine import build_checkpoint
            build_checkpoint(model_dir, args.layers)
        print(f"checkpoint built  [{time.perf_counter() - t0:.0f} s]", flush=True)
    t = time.perf_counter()
    modules = ALL_MODULES if args.modules == "all" else CHURN_MODULES
    # as bench_churn's engine: max rank 64 (its 32 resident adapters are rank 8-64 on q_proj + v_proj); here all
    # seven modules enabled, for the one-token adapter (rank 16 on all seven, as bench_churn's cold adapters)
    extra = {}
    if args.tier_adapters:   # bench_churn's GPU tier: every one of its 1000 adapters' modules x layers
        from loraserve import PeftCacheConfig

        with open(os.path.join(model_dir, "config.json")) as f:
            n_layers = json.load(f)["num_hidden_layers"]
        extra["peft_cache_config"] = PeftCacheConfig(num_device_module_layer=args.tier_adapters * n_layers * len(modules))
    llm = LLM(model=model_dir, dtype=dtype, device=device, max_num_seqs=conc,
              lora_config=LoraConfig(max_lora_rank=64, max_loras=args.adapters + 1, max_cpu_loras=args.adapters + 1,
                                     lora_target_modules=list(modules)),
              kv_cache_config={"free_gpu_memory_fraction": 0.5}, **extra)
    eng = llm.engine
    ttft_id = args.adapters + 1
    add_adapter(eng, ttft_id, modules, 16, 7_000)
    ranks = [int(r) for r in np.random.default_rng(1).choice([8, 16, 32, 64], size=args.adapters)]
    for i, r in enumerate(ranks):
        add_adapter(eng, i + 1, CHURN_MODULES, r, 100_000 + i)
    make_resident(eng, list(range(1, args.adapters + 2)))
    mixed = eng.runner.mixed_graphs
    print(f"engine + {args.adapters + 1} resident adapters  [{time.perf_counter() - t:.0f} s]; mixed graphs "
          f"{'on' if mixed is not None else 'off'}, LoRA in them {'on' if mixed is not None and mixed.lora_manager else 'off'}",
          flush=True)
    out: dict = {"meta": dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              layers=eng.args.num_hidden_layers, adapters=args.adapters, requests=n_req,
                              concurrency=conc, input_len=in_len, output_len=out_len, modules=list(modules),
                              command=" ".join(sys.argv))}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    # 1) one-token requests
    prompts = FreshPrompts(eng.args.vocab_size, 4242)
    t = time.perf_counter()
    if args.skip_ttft:
        args.ttft_repeats = 0
    if args.ttft_repeats:
        base = ttft_ms(eng, prompts, None, args.ttft_repeats)
        lora_graphs(eng, True)
        graphed = ttft_ms(eng, prompts, ttft_id, args.ttft_repeats)
        lora_graphs(eng, False)
        eager = ttft_ms(eng, prompts, ttft_id, args.ttft_repeats)
        lora_graphs(eng, True)
        out["ttft_ms"] = dict(base=base, lora_graphed=graphed, lora_eager=eager)
        print(f"one-token request, 64-token prompt (median of {args.ttft_repeats}): no adapter {base:.2f} ms; resident "
              f"rank-16 adapter on {len(modules)} modules: LoRA graphs {graphed:.2f} ms, eager {eager:.2f} ms  "
              f"[{time.perf_counter() - t:.0f} s]", flush=True)
        save()

    # 2) where the time goes
    if args.profile and args.ttft_repeats:
        lora_graphs(eng, False)
        out["profile_eager"] = profile_request(eng, prompts, ttft_id, "LoRA eager", args.profile_rows)
        lora_graphs(eng, True)
        out["profile_graphed"] = profile_request(eng, prompts, ttft_id, "LoRA graphs", args.profile_rows)
        save()
    if args.skip_loop:
        llm.shutdown()
        return 0

    # 3) closed loop: 32 resident adapters vs none, LoRA graphs on / off; fresh prompts every run
    vocab = eng.args.vocab_size
    ids = [1 + (k % args.adapters) for k in range(n_req)]
    t = time.perf_counter()
    for tag, a in (("warm-base", [None] * n_req), ("warm-lora", ids)):   # first-use captures/compiles of both paths
        run_closed_loop(eng, make_requests(n_req, vocab, in_len, out_len, a, hash(tag) % 1000), conc, tag)
    print(f"warm-up  [{time.perf_counter() - t:.0f} s]", flush=True)
    loop_variant = args.loop_variant
    if args.replay_variants:
        from benchmarks.lora_step_replay import replay_decode, replay_variants

        t = time.perf_counter()
        slot_of = {i: eng.lora_manager.handles[eng.lora_manager.by_id[i]].slot for i in range(1, args.adapters + 1)}
        rows = args.replay_decode_rows or conc - 1
        seq_slots = [slot_of[1 + k % args.adapters] for k in range(rows)] + [slot_of[1 + 5 % args.adapters]]
        try:
            rv = replay_variants(eng, seq_slots, args.replay_variants.split(","), prompt=min(in_len, 256),
                                 ctx=in_len + out_len // 2, budget_s=args.replay_budget_s, rounds=args.replay_rounds,
                                 profile=args.replay_profile.split(",") if args.replay_profile else True)
            out["decode_replay"] = replay_decode(eng, [slot_of[1 + k % args.adapters] for k in range(conc)],
                                                 ctx=in_len + out_len // 2)
        except Exception as exc:  # noqa: BLE001 - the closed loops below still run
            print(f"  step replay FAILED: {exc!r}", flush=True)
            rv = {}
        out["step_replay"] = rv
        print(f"  [step replay {time.perf_counter() - t:.1f} s]", flush=True)
        ok = {v: r.get("paired_per_layer_us", r["lora_per_layer_us"]) for v, r in rv.items() if "lora_us" in r
              and "empty" not in v}
        best = min(ok, key=ok.get) if ok else "default"
        if loop_variant == "best":
            loop_variant = best
            print(f"  loops with the fastest replayed variant: {loop_variant}", flush=True)
        if args.also_variants:   # "best" there: the fastest replayed variant (not run twice)
            also = [best if v == "best" else v for v in args.also_variants.split(",")]
            args.also_variants = ",".join(v for i, v in enumerate(also) if v not in also[:i] and v != loop_variant)
        save()
    elif loop_variant == "best":
        loop_variant = "default"
    if loop_variant != "default":
        from benchmarks.lora_step_replay import apply_variant

        apply_variant(eng, loop_variant)   # LoRA graphs recaptured under it by a warm loop
        run_closed_loop(eng, make_requests(n_req, vocab, in_len, out_len, ids, 1_777), conc, "warm-variant")
    out["loop_variant"] = loop_variant
    runs = {}

    def loop(tag: str, a: list, on: bool, seed: int) -> dict:
        lora_graphs(eng, on)
        t, g0 = time.perf_counter(), graph_state(eng)
        r = run_closed_loop(eng, make_requests(n_req, vocab, in_len, out_len, a, seed), conc, tag)
        r["graphs"] = graph_note(g0, graph_state(eng))
        print(f"  {tag}: {r['tok_s']:.0f} tok/s, TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms  "
              f"[{time.perf_counter() - t:.1f} s; {r['graphs']}]", flush=True)
        return r

    # with and without adapters in interleaved pairs of alternating order (benchmarks/ab_pairs.py: drift between
    # loops cannot bias the ratio); the figure is the median of the pairs' ratios
    from benchmarks.ab_pairs import interleaved_ratio, median_run

    ab = interleaved_ratio(eng, lambda i: loop("lora_graphs", ids, True, 2_000 + i),
                           lambda i: loop("base", [None] * n_req, True, 2_000 + i), max(1, args.repeats))
    runs["lora_graphs"], runs["base"] = median_run(ab["a"]), median_run(ab["b"])
    out["pairs"] = dict(ratios=ab["ratios"], spread=ab["spread"], order=ab["order"],
                        ratio_of_medians=ab["ratio_of_medians"])
    if not args.skip_eager_loop:
        runs["lora_eager_mixed"] = loop("lora_eager_mixed", ids, False, 2_999)
    if args.ab_bound and mixed is not None and mixed.lora_manager is not None:
        # the same loop with the LoRA graphs' old grid (cdiv(T, BM) + min(slots, T) tiles): recaptured
        lora_graphs(eng, True)
        mixed.segment_bound = False
        mixed.lora_graphs.clear()
        run_closed_loop(eng, make_requests(n_req, vocab, in_len, out_len, ids, 4_999), conc, "warm-old-grid")
        t = time.perf_counter()
        r = run_closed_loop(eng, make_requests(n_req, vocab, in_len, out_len, ids, 5_000), conc, "old-grid")
        runs["lora_graphs_old_grid"] = r
        out["resident32_vs_base_tok_s_old_grid"] = r["tok_s"] / runs["base"]["tok_s"]
        print(f"  lora_graphs_old_grid: {r['tok_s']:.0f} tok/s, TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms  "
              f"[{time.perf_counter() - t:.1f} s] -> {out['resident32_vs_base_tok_s_old_grid']:.3f} of base", flush=True)
        mixed.segment_bound = True
        mixed.lora_graphs.clear()
        run_closed_loop(eng, make_requests(n_req, vocab, in_len, out_len, ids, 5_001), conc, "rewarm")
    lora_graphs(eng, True)
    out["closed_loop"] = runs
    out["resident32_vs_base_tok_s"] = ab["ratio"]
    print(f"  main loops: resident{args.adapters}_vs_base_tok_s {ab['ratio']:.3f} (median of {len(ab['ratios'])} "
          f"interleaved pairs, spread {ab['spread'][0]:.3f}-{ab['spread'][1]:.3f})", flush=True)
    save()   # (the issue's figure first: a time limit may cut what follows)
    if args.also_variants:   # the same loops under other variants (e.g. the defaults before), one engine
        from benchmarks.lora_step_replay import apply_variant

        out["also_variants"] = {}
        for i, v in enumerate(args.also_variants.split(",")):
            ctx = apply_variant(eng, v)
            t, seed = time.perf_counter(), 7_000 + 1_000 * i   # fresh prompts per variant: no prefix-cache hit
            run_closed_loop(eng, make_requests(n_req, vocab, in_len, out_len, ids, seed), conc, "warm-" + v)
            vr = {"lora": [], "base": []}
            for k in range(max(1, args.repeats)):
                for tag, a in (("lora", ids), ("base", [None] * n_req)):
                    vr[tag].append(run_closed_loop(eng, make_requests(n_req, vocab, in_len, out_len, a, seed + 100 + 2 * k
                                                                      + (tag == "base")), conc, v)["tok_s"])
            ratio = statistics.median(vr["lora"]) / statistics.median(vr["base"])
            out["also_variants"][v] = dict(ratio=ratio, **vr)
            print(f"  variant {v}: LoRA {statistics.median(vr['lora']):.0f} vs base {statistics.median(vr['base']):.0f} "
                  f"tok/s -> resident32_vs_base {ratio:.3f}  (loops {', '.join(f'{x:.0f}' for x in vr['lora'])} / "
                  f"{', '.join(f'{x:.0f}' for x in vr['base'])}; {time.perf_counter() - t:.1f} s)", flush=True)
            if ctx is not None:
                ctx.__exit__(None, None, None)
            if eng.runner.mixed_graphs is not None:   # the next loops recapture under their own switches
                eng.runner.mixed_graphs.lora_graphs.clear()
        save()
    if args.profile_loop:
        for k, (tag, a) in enumerate((("lora_graphs", ids[:conc]), ("base", [None] * conc))):
            out[f"loop_profile_{tag}"] = profile_loop(eng, make_requests(conc, vocab, in_len, out_len, a, 3_000 + k),
                                                      conc, tag, args.profile_rows)
        print_kernel_diff(out["loop_profile_lora_graphs"], out["loop_profile_base"], args.profile_rows)
    if "lora_eager_mixed" in runs:
        out["resident32_vs_base_tok_s_eager_mixed"] = runs["lora_eager_mixed"]["tok_s"] / runs["base"]["tok_s"]
    if mixed is not None:
        out["mixed_graphs"] = dict(graphs=len(mixed.graphs), lora_graphs=len(mixed.lora_graphs),
                                   replays=mixed.num_replays, lora_replays=mixed.num_lora_replays,
                                   lora_failed=mixed.lora_failed, lora_meta_in_graph=getattr(mixed, "meta_in_graph", None),
                                   covered=mixed.num_covered)
        print(f"  mixed graphs: {out['mixed_graphs']}")
        top = sorted(getattr(mixed, "key_replays", {}).items(), key=lambda kv: -kv[1])[:8]
        print("  most replayed (Bp, T, splits, LoRA): " + ", ".join(f"{k} x{n}" for k, n in top))
    extra = "".join(f", {out[k]:.3f} {what}" for k, what in (
        ("resident32_vs_base_tok_s_old_grid", "with the old LoRA grid"),
        ("resident32_vs_base_tok_s_eager_mixed", "with LoRA mixed steps eager")) if k in out)
    print(f"resident{args.adapters}_vs_base_tok_s: {out['resident32_vs_base_tok_s']:.3f} with LoRA mixed graphs"
          f"{'' if loop_variant == 'default' else ' (variant ' + loop_variant + ')'}{extra}"
          f"  (target >= 0.9; median of {max(1, args.repeats)} interleaved pairs; slots {eng.lora_manager.num_slots} x "
          f"{eng.lora_manager.slots.granule} rows, qkv A slices {eng.lora_manager.slots.a['qkv_proj'].shape[2]})")
    save()
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
