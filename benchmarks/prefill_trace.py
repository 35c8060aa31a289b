"""Where the prefill step's device time goes (issue 10): the engine's prefill of 8 fresh 1024-token prompts on a
Llama-3-8B-shaped checkpoint of --layers layers, timed (CUDA events around the step, as bench_engine) with PDL on
and off in alternation, then one step of each under torch.profiler: from its chrome trace, the GPU's idle time
between kernels (the sum, the biggest gaps and the kernels on both sides) next to the kernels' own time.

    python3 benchmarks/prefill_trace.py [--layers 8] [--out DIR] [--rounds 3] [--env NAME=A,B ...]

--env LORASERVE_PDL=1,0 (the default) alternates a switch read at launch time; several --env flags: each in turn.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_engine import Prompts, prefill_run  # noqa: E402
from benchmarks.checkpoints import build_checkpoint, checkpoint_dir  # noqa: E402

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def short(name: str, n: int = 48) -> str:
    return name if len(name) <= n else name[:n - 3] + "..."


def gpu_gaps(events: list[dict], top: int = 12) -> dict:
    """Idle time between consecutive GPU activities (kernels, memsets, copies) of the busiest stream, from the
    first to the last: span, busy (union of the activities), the gaps (sum, count over 2 us, the biggest with the
    activities on both sides) and the kernels' time by name."""
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    if not gpu:
        return {}
    per_stream = defaultdict(list)
    for e in gpu:
        per_stream[(e.get("pid"), e.get("tid"))].append(e)
    stream = max(per_stream.values(), key=len)
    stream.sort(key=lambda e: e["ts"])
    gaps, by_name, end, busy, overlap = [], defaultdict(float), stream[0]["ts"], 0.0, 0.0
    prev = None
    for e in stream:
        ts, dur = float(e["ts"]), float(e["dur"])
        by_name[short(e["name"], 40)] += dur
        if prev is not None:
            g = ts - end
            if g > 0:
                gaps.append((g, prev["name"], e["name"], ts))
            else:
                overlap += -g
        busy += max(0.0, ts + dur - max(ts, end))
        end = max(end, ts + dur)
        prev = e
    span = end - float(stream[0]["ts"])
    gaps.sort(reverse=True)
    total = sum(g for g, *_ in gaps)
    small = sum(g for g, *_ in gaps if g <= 2.0)
    pairs = defaultdict(lambda: [0, 0.0])
    for g, a, b, _ in gaps:
        k = f"{short(a, 30)} -> {short(b, 30)}"
        pairs[k][0] += 1
        pairs[k][1] += g
    return {"span_us": span, "busy_us": busy, "gap_us": total, "gaps": len(gaps), "gap_us_le_2us": small,
            "overlap_us": overlap, "activities": len(stream), "other_streams": len(per_stream) - 1,
            "biggest": [(round(g, 1), short(a), short(b), round(ts - float(stream[0]["ts"]), 1))
                        for g, a, b, ts in gaps[:top]],
            "gap_pairs_us": sorted(((k, n, round(s, 1)) for k, (n, s) in pairs.items()), key=lambda r: -r[2])[:top],
            "kernel_us": dict(sorted(((k, round(v, 1)) for k, v in by_name.items()), key=lambda kv: -kv[1])[:12])}


def host_syncs(events: list[dict]) -> dict:
    """CPU-side CUDA runtime calls that block (synchronisations, blocking copies) in the trace: count, us."""
    out = defaultdict(lambda: [0, 0.0])
    for e in events:
        n = e.get("name", "")
        if e.get("cat") == "cuda_runtime" and any(s in n for s in ("Synchronize", "Memcpy", "Malloc", "Free",
                                                                      "Memset", "Wait", "Query")):
            out[n][0] += 1
            out[n][1] += float(e.get("dur", 0))
    return {k: (n, round(us, 1)) for k, (n, us) in out.items()}


def timed_prefill(engine, prompts: Prompts) -> dict:
    dt, trace = prefill_run(engine, prompts, 8, 1024, f"t{time.monotonic_ns()}")
    launched = [r for r in trace if r.events]
    dev = sum(r.events[0].elapsed_time(r.events[1]) for r in launched)
    return {"wall_ms": dt * 1e3, "device_ms": dev, "host_launch_ms": sum(r.launched_at - r.start for r in launched) * 1e3}


def profiled_prefill(engine, prompts: Prompts, path: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = timed_prefill(engine, prompts)
        torch.cuda.synchronize()
    raw = path + ".json"
    prof.export_chrome_trace(raw)
    with open(raw) as f:
        events = json.load(f).get("traceEvents", [])
    with open(raw, "rb") as f, gzip.open(path + ".json.gz", "wb", compresslevel=6) as g:
        g.write(f.read())
    os.remove(raw)
    return {"timed": r, "gaps": gpu_gaps(events), "host_syncs": host_syncs(events)}


def hf_model(path: str):
    """HF transformers on the same checkpoint, SDPA attention, bf16 (bench_engine's time_hf setup)."""
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16,
                                                         attn_implementation="sdpa").to("cuda").eval()


@torch.inference_mode()
def hf_prefill_ms(model, prompts: Prompts) -> float:
    """One HF forward of 8 fresh 1024-token prompts, logits of the last token only (bench_engine's HF figure)."""
    ids = torch.tensor(prompts.make(8, 1024), device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    model(ids, logits_to_keep=1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def parse_envs(specs: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for s in specs:
        name, _, vals = s.partition("=")
        out.append((name, vals.split(",")))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="timed prefills per setting, settings alternating")
    ap.add_argument("--env", action="append", default=None, help="NAME=A,B: values alternated (read at launch)")
    ap.add_argument("--out", default=None, help="traces (gzip) and prefill_trace.json here")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--hf", action="store_true", help="HF transformers' prefill interleaved with the engine's rounds")
    a = ap.parse_args()
    envs = parse_envs(a.env or ["LORASERVE_PDL=1,0"])
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine

    path = checkpoint_dir(a.layers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = {"layers": a.layers, "gpu": torch.cuda.get_device_name(), "env": {k: v for k, v in os.environ.items()
                                                                            if k.startswith("LORASERVE_")}}
    out = a.out or "."
    os.makedirs(out, exist_ok=True)
    try:
        build_checkpoint(path, a.layers)
        say(f"checkpoint {a.layers} layers")
        cfg = engine_config_from_kwargs(path, dtype="bfloat16", device="cuda", max_num_tokens=8192,
                                        max_batch_size=256, enforce_eager=True,
                                        kv_cache_config={"free_gpu_memory_fraction": 0.5})
        engine = LLMEngine(cfg)
        say("engine up")
        prompts = Prompts()
        hf = hf_model(path) if a.hf else None
        if hf is not None:
            hf_prefill_ms(hf, prompts)
            say("HF up")
        for _ in range(2):
            timed_prefill(engine, prompts)
        say("warm")
        for name, vals in envs:
            old = os.environ.get(name)
            times = {v: [] for v in vals}
            for v in vals:   # each setting's first steps (compiles, cuDNN plans) outside the timed rounds
                os.environ[name] = v
                for _ in range(2):
                    timed_prefill(engine, prompts)
            for rnd in range(a.rounds):
                for v in (vals if rnd % 2 == 0 else vals[::-1]):   # ABBA: clocks drift, neither side first always
                    os.environ[name] = v
                    times[v].append(timed_prefill(engine, prompts))
                if hf is not None:
                    times.setdefault("hf_ms", []).append(hf_prefill_ms(hf, prompts))
            hf_ms = sorted(times.get("hf_ms", []))
            if hf_ms:
                say(f"HF prefill ms {[round(x, 2) for x in hf_ms]} (median {hf_ms[len(hf_ms) // 2]:.2f})")
            for v in vals:
                walls = sorted(r["wall_ms"] for r in times[v])
                if hf_ms:
                    say(f"{name}={v}: engine wall median {walls[len(walls) // 2]:.2f} ms -> prefill_vs_hf "
                        f"{hf_ms[len(hf_ms) // 2] / walls[len(walls) // 2]:.3f} (medians, interleaved rounds)")
                dev = sorted(r["device_ms"] for r in times[v])
                say(f"{name}={v}: device ms {[round(x, 2) for x in dev]} wall ms "
                    f"{[round(r['wall_ms'], 2) for r in times[v]]} host launch ms "
                    f"{[round(r['host_launch_ms'], 2) for r in times[v]]}")
            res[f"timed {name}"] = times
            if not a.no_trace:
                for v in vals:
                    os.environ[name] = v
                    tag = f"{name.lower().replace('loraserve_', '')}_{v}"
                    r = profiled_prefill(engine, prompts, os.path.join(out, f"trace_{tag}"))
                    res[f"trace {name}={v}"] = r
                    g = r["gaps"]
                    say(f"trace {name}={v}: event window {r['timed']['device_ms']:.2f} ms; GPU span "
                        f"{g['span_us'] / 1e3:.2f} ms, busy {g['busy_us'] / 1e3:.2f}, idle {g['gap_us'] / 1e3:.2f} "
                        f"in {g['gaps']} gaps ({g['gap_us_le_2us'] / 1e3:.2f} ms in gaps <= 2 us), overlap "
                        f"{g['overlap_us'] / 1e3:.2f} ms, {g['activities']} activities, other streams "
                        f"{g['other_streams']}")
                    print("   biggest gaps (us, before, after, at us):")
                    for row in g["biggest"]:
                        print("    ", row)
                    print("   gap sums by kernel pair (pair, count, us):")
                    for row in g["gap_pairs_us"]:
                        print("    ", row)
                    print("   kernel us:", g["kernel_us"])
                    print("   host-side blocking runtime calls:", r["host_syncs"], flush=True)
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        with open(os.path.join(out, "prefill_trace.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
