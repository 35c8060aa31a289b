"""End-to-end engine benchmark on a Llama-3-8B-shaped model with random bf16 weights (GPU).

Every figure sits next to a limit measured in the same run, so runs on any card compare:
  * copy bandwidth (device-to-device copy, read + write) and bf16 GEMM peak (8192^3 on random data)
  * decode at batch 1 and 64: tokens/s vs the roofline counting every byte a step must read
    (all weights but the embedding table, the embedding rows, the KV cache of every sequence)
  * prefill of 8 fresh 1024-token prompts: model FLOP/s vs the GEMM peak, and vs HF transformers
  * decode at batch 64 with 32 distinct rank-16 adapters (all projections) vs no LoRA
Every timed run uses prompts the prefix cache has not seen (fresh random ids per run) and the
run prints how many KV blocks the prefix cache reused while timing (`timed_prefix_cache_hits`,
which must be 0).

    python3 benchmarks/bench_engine.py [--layers 32] [--skip-hf] [--json out.json] [--profile DIR]

`make bench-gpu` runs this and benchmarks/bench_lora_kernels.py and merges both into
benchmarks/results/engine_h200.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.hf_baseline import HFPrefill, time_hf  # noqa: E402


def copy_bandwidth() -> float:
    x = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")  # 1 GiB, not zeros
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 20
    start.record()
    for _ in range(n):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    dt = start.elapsed_time(end) / 1e3 / n
    del x, y
    return 2 * (1 << 30) / dt  # read + write


def gemm_peak() -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data, rotating 4 input sets (no L2 reuse)."""
    n = 8192
    sets = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
             torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for a, b in sets:
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for i in range(reps):
        a, b = sets[i % 4]
        torch.matmul(a, b, out=out)
    end.record()
    torch.cuda.synchronize()
    dt = start.elapsed_time(end) / 1e3 / reps
    del sets, out
    torch.cuda.empty_cache()
    return 2 * n ** 3 / dt


# the checkpoint builder and the profiler tables live in their own files; importable from here as before
from benchmarks.checkpoints import LLAMA3_70B, LLAMA3_8B, build_checkpoint, checkpoint_dir  # noqa: E402,F401
from benchmarks.engine_profile import profile_decode, profile_steps  # noqa: E402,F401


def decode_bench_parser(repeats: int):
    """The options the decode benchmarks built on run_decode share (bench_dora, bench_fp8)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random Llama")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--json", default=None)
    return ap


class Prompts:
    """Fresh random prompts: no two runs share a prefix, so the prefix cache can never hit."""

    def __init__(self, seed: int = 1234):
        self.g = torch.Generator().manual_seed(seed)

    def make(self, n: int, length: int) -> list[list[int]]:
        return torch.randint(2, 100000, (n, length), generator=self.g).tolist()


def reused_blocks(engine) -> int:
    return engine.block_manager.num_reused_blocks


def sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def run_decode(engine, prompt_ids: list[list[int]], steps: int, loras=None, tag: str = "d") -> dict:
    """The decode timing every benchmark here uses: prefill the prompts (fresh ones: the prefix
    cache cannot hit), 3 warm-up steps, then `steps` timed steps. loras: cycled over the requests."""
    from loraserve import SamplingParams

    stamp = time.monotonic_ns()
    # Early prompts decode while later ones prefill (the prefill budget per mixed step), so no request
    # may finish before the timed steps end: max_tokens covers every prefill step, and the timed
    # window checks that the whole batch stayed in flight.
    prefill_steps = sum(len(ids) for ids in prompt_ids) // 256 + len(prompt_ids) + 8
    params = SamplingParams(max_tokens=steps + 16 + prefill_steps, temperature=0, ignore_eos=True)
    rids = [f"{tag}-{i}-{stamp}" for i in range(len(prompt_ids))]
    for rid, ids, i in zip(rids, prompt_ids, range(len(prompt_ids))):
        engine.add_request(rid, ids, params, None if loras is None else loras[i % len(loras)])
    seqs = [engine.seqs[rid] for rid in rids]  # kept: a finished sequence leaves engine.seqs
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in seqs):
        engine.step()  # prefill (and first tokens)
    for _ in range(3):
        engine.step()
    sync(engine)
    hits0, tok0 = reused_blocks(engine), sum(s.num_output_tokens for s in seqs)
    ctx0 = sum(s.num_tokens for s in seqs)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine)
    dt = time.perf_counter() - t
    # counts only tokens handed back (an in-flight step is not)
    produced = sum(s.num_output_tokens for s in seqs) - tok0
    ctx1 = sum(s.num_tokens for s in seqs)
    hits = reused_blocks(engine) - hits0
    in_flight = sum(rid in engine.seqs for rid in rids)
    assert in_flight == len(rids), f"{len(rids) - in_flight} requests finished inside the timed window"
    for rid in rids:
        engine.abort_request(rid)
    return {"tok_s": produced / dt, "steps": steps, "s_per_step": dt / steps,
            "mean_context": (ctx0 + ctx1) / 2 / len(prompt_ids), "prefix_hits": hits}


def time_engine_decode(engine, prompts: Prompts, batch: int, prompt_len: int, steps: int, loras=None) -> dict:
    return run_decode(engine, prompts.make(batch, prompt_len), steps, loras, tag=f"d{batch}")


def prefill_run(engine, prompts: Prompts, batch: int, prompt_len: int, tag: str, trace: bool = True,
                marks: dict | None = None):
    """One timed prefill of `batch` fresh prompts (one sampled token each) -> (seconds, the step
    trace or None: per step, host time to the launch and device time from CUDA events).
    marks (a dict, CUDA): gets "t0_event", a CUDA event recorded on the idle device when the clock
    starts, so that the trace's events can be placed on the same time line (host gaps at the ends)."""
    from loraserve import SamplingParams

    for i, ids in enumerate(prompts.make(batch, prompt_len)):
        engine.add_request(f"p{tag}-{i}", ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    engine.step_trace = [] if trace else None
    sync(engine)
    if marks is not None and engine.device.type == "cuda":
        marks["t0_event"] = torch.cuda.Event(enable_timing=True)
        marks["t0_event"].record()
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync(engine)
    dt = time.perf_counter() - t
    rec, engine.step_trace = engine.step_trace, None
    return dt, rec


class GcWatch:
    """Python garbage collections (count, seconds) between start() and stop(), via gc.callbacks: a
    full collection of a process holding a model's worth of objects is a multi-millisecond host stall."""

    def __init__(self):
        self.count, self.seconds, self._t = 0, 0.0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.count += 1
            self.seconds += time.perf_counter() - self._t
            self._t = None

    def start(self) -> "GcWatch":
        gc.callbacks.append(self)
        return self

    def stop(self) -> "GcWatch":
        gc.callbacks.remove(self)
        return self


def time_engine_prefill(engine, prompts: Prompts, batch: int, prompt_len: int, repeats: int = 3,
                        other=None) -> dict:
    """Median of `repeats` timed prefills of fresh prompts, after two warm-up ones. Per run, where the
    wall time goes: host time before the device starts (scheduling, input building), device time of
    the launched steps (CUDA events), and the tail after the device finished (fetch, post-processing).
    other (callable, e.g. HF's prefill): run once beside each timed run, before it in odd rounds and
    after it in even ones (ABBA), so that both sides see the same clocks (the H200 runs a long prefill
    under its power cap: the clocks, and so every figure, drift 5-10% over a run)."""
    def once(tag):
        hits0 = reused_blocks(engine)
        marks, watch = {}, GcWatch().start()
        try:
            dt, trace = prefill_run(engine, prompts, batch, prompt_len, tag, marks=marks)
        finally:
            watch.stop()
        launched = [r for r in trace if r.events]
        host = sum(r.launched_at - r.start for r in launched)
        device = sum(r.events[0].elapsed_time(r.events[1]) / 1e3 for r in launched)
        ends = {"gc_count": watch.count, "gc_ms": watch.seconds * 1e3,
                "steps": [(r.kind, r.done_kind, round((r.launched_at - r.start) * 1e3, 2),
                           round((r.end - r.start) * 1e3, 2), round(r.wait_s * 1e3, 2)) for r in trace]}
        t0 = marks.get("t0_event")
        if t0 is not None and launched:
            ends["gap_before_ms"] = t0.elapsed_time(launched[0].events[0])     # host work before the first launch
            ends["tail_ms"] = dt * 1e3 - t0.elapsed_time(launched[-1].events[1])  # after the device finished
        print(f"  prefill {tag}: {dt * 1e3:.2f} ms = device {device * 1e3:.2f} + ends {ends}", flush=True)
        return dt, reused_blocks(engine) - hits0, host, device, len(trace), ends

    once("warm0")
    once("warm1")
    runs = []
    for i in range(repeats):
        if other is not None and i % 2:
            other()
        runs.append(once(f"run{i}"))
        if other is not None and not i % 2:
            other()
    times = sorted(runs, key=lambda r: r[0])
    dt, _, host, device, steps, ends = times[len(times) // 2]  # median, each on fresh prompts
    return {"tok_s": batch * prompt_len / dt, "s": dt, "prefix_hits": sum(r[1] for r in times),
            "host_launch_s": host, "device_s": device, "steps": steps,
            "gap_before_ms": ends.get("gap_before_ms"), "tail_ms": ends.get("tail_ms"), "gc_ms": ends["gc_ms"]}


def prefill_flops(args, batch: int, prompt_len: int, last_rows_only: bool = False) -> float:
    """Model FLOPs of a prefill with one sampled token per sequence: every linear layer over every
    token, causal attention (QK^T and PV over the lower triangle), lm_head for the last tokens.
    last_rows_only (models/llama.py LAST_LAYER_ROWS): the last layer's MLP runs on the sampled rows
    alone, and the FLOPs it skips are not counted (a FLOP/s figure counts work done, not work avoided)."""
    h, i, L = args.hidden_size, args.intermediate_size, args.num_hidden_layers
    linear = h * (args.q_size + 2 * args.kv_size) + args.q_size * h + 3 * h * i
    tokens = batch * prompt_len
    attn = 2 * 2 * args.num_attention_heads * args.head_dim * batch * prompt_len * (prompt_len + 1) / 2
    skipped = 2 * 3 * h * i * (tokens - batch) if last_rows_only else 0
    return L * (2 * linear * tokens + attn) + 2 * h * args.vocab_size * batch - skipped


def decode_step_bytes(engine, batch: int, mean_context: float) -> float:
    a = engine.args
    embed = a.vocab_size * a.hidden_size
    weight = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    if not a.tie_word_embeddings:  # the table is read one row per token, not whole
        weight -= embed * engine.model.embed_tokens.weight.element_size()
    kv_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * engine.runner.k_cache.element_size()
    return weight + batch * (a.hidden_size * 2 + mean_context * kv_per_token)


def random_adapters(args, n: int, rank: int, dtype, device: str = "cuda", first_digest: int = 0):
    """n adapters of `rank` on every module, random (x0.01) weights drawn on `device`, held on the host.
    Each adapter is drawn as one flat buffer and copied to the host once (views per layer and module: the
    8B shape has 32 x 7 x 2 tensors per adapter, and one copy each took seconds of a time-limited run)."""
    from loraserve.adapters import LoraAdapter

    shapes = args.lora_module_shapes()
    adapters = []
    g = torch.Generator(device=device).manual_seed(0)
    per_layer = sum(rank * fi + fo * rank for fi, fo in shapes.values())
    for i in range(n):
        flat = (torch.randn(args.num_hidden_layers * per_layer, generator=g, device=device) * 0.01).to(dtype).cpu()
        w, at = {}, 0
        for layer in range(args.num_hidden_layers):
            for m, (fi, fo) in shapes.items():
                a = flat[at:at + rank * fi].view(rank, fi)
                b = flat[at + rank * fi:at + rank * fi + fo * rank].view(fo, rank)
                w[(layer, m)] = (a, b)
                at += rank * fi + fo * rank
        adapters.append(LoraAdapter("hf", rank, float(rank), False, sorted(shapes), args.num_hidden_layers, w,
                                    f"sha256:{first_digest + i:064x}"))
    return adapters


class _Printing(dict):
    """Prints each result as soon as it is measured (with the seconds since the start: where a time limit
    goes), and rewrites the JSON file (if any): a run cut short still reports what it measured."""

    path: str | None = None
    t0 = time.perf_counter()

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        at = f"[{time.perf_counter() - self.t0:6.1f}s]"
        print(f"{k:40s} {v:.4f} {at}" if isinstance(v, float) else f"{k:40s} {v} {at}", flush=True)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self, f, indent=2)

    def update(self, other):
        for k, v in other.items():
            self[k] = v


SECTIONS = ("decode", "prefill", "lora")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-repeats", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (enforce_eager): a prefill-only run "
                    "starts faster; decode figures then are not the serving path's")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, help="write torch.profiler tables to this directory")
    ap.add_argument("--profile-after-s", type=float, default=None,
                    help="skip the profiles when this many seconds have passed (a time-limited run keeps its figures)")
    ap.add_argument("--last-rows-compare", action="store_true",
                    help="prefill again with models/llama.py LAST_LAYER_ROWS flipped (what skipping the rows saves)")
    ap.add_argument("--gc-freeze-compare", action="store_true",
                    help="prefill again with gc.freeze() (diagnostic of the GC's share of the host time)")
    ap.add_argument("--hf-prefill-only", action="store_true", help="HF: the prefill figure only (no decode runs)")
    ap.add_argument("--hf-alone", action="store_true",
                    help="HF's prefill timed only before the engine starts (default: HF stays loaded and its timed "
                         "prefills alternate with the engine's, so both run at the same clocks)")
    ap.add_argument("--tiny", action="store_true", help="CPU check of the script: a tiny random Llama, fp32")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    assert sections <= set(SECTIONS), f"--sections: {sections - set(SECTIONS)} not in {SECTIONS}"
    from loraserve import LoraConfig
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine

    res = _Printing()
    res.path = a.json
    dev = "cpu" if a.tiny else "cuda"
    res.update({"gpu": "cpu (--tiny)" if a.tiny else torch.cuda.get_device_name(), "layers": a.layers,
                "prompt_len": a.prompt_len})
    # the engine switches this run used (kernels/PERF_NOTES.md says what each does)
    res["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORASERVE_")}
    bw = 1e11 if a.tiny else copy_bandwidth()
    res["copy_bandwidth_GBps"] = bw / 1e9
    peak = 1e12 if a.tiny else gemm_peak()
    res["bf16_gemm_peak_TFLOPs"] = peak / 1e12
    prompts = Prompts()
    path = tempfile.mkdtemp(prefix="llama8b-") if a.tiny else checkpoint_dir(a.layers)
    # a time limit's SIGTERM (timeout) unwinds through the finally below: the checkpoint may sit in RAM
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    hf = None
    try:
        t = time.perf_counter()
        if a.tiny:   # ids up to 100000 (Prompts), 1024-token prompts
            from tests.inference.conftest import make_random_model

            make_random_model(path, "llama", vocab_size=100352, max_position_embeddings=4096,
                              num_hidden_layers=a.layers)
        else:
            build_checkpoint(path, a.layers)
        res["checkpoint_dir"] = os.path.dirname(path)
        res["checkpoint_build_s"] = time.perf_counter() - t
        if not a.skip_hf and "prefill" in sections:
            out = time_hf(path, prompts, a.prompt_len, a.steps, a.prefill_batch,
                          decode=not a.hf_prefill_only and "decode" in sections, device=dev,
                          keep=not a.hf_alone)
            hf = out.pop("hf_prefill", None)
            res.update(out)
        lora = not a.skip_lora and "lora" in sections
        t = time.perf_counter()
        cfg = engine_config_from_kwargs(path, dtype="float32" if a.tiny else "bfloat16", device=dev,
                                        max_num_tokens=8192, max_batch_size=256, enforce_eager=a.eager,
                                        lora_config=LoraConfig(max_lora_rank=16, max_loras=32, max_cpu_loras=32)
                                        if lora else None,
                                        kv_cache_config={"free_gpu_memory_fraction": 0.5})
        engine = LLMEngine(cfg)
        res["engine_start_s"] = time.perf_counter() - t    # weights, KV cache, CUDA-graph capture (compiles)
        measure(engine, a, res, sections, prompts, bw, peak, dev, hf)
    finally:
        if hf is not None:
            hf.close()
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    return 0


def measure(engine, a, res: _Printing, sections: set, prompts: Prompts, bw: float, peak: float, dev: str,
            hf: HFPrefill | None = None) -> None:
    """The engine's figures, in the order of the time they need (the LoRA decode last, then profiles).
    hf: HF's prefill, still loaded: its timed runs alternate with the engine's (prefill_vs_hf from the
    medians of the same rounds); hf_prefill_tok_s_alone stays the figure HF got before the engine."""
    from loraserve import LoRARequest

    hits = 0
    for batch in ((1, 64) if "decode" in sections else ()):
        r = time_engine_decode(engine, prompts, batch, a.prompt_len, a.steps)
        hits += r["prefix_hits"]
        res["timed_prefix_cache_hits"] = hits   # so far (a run cut short still says)
        res[f"loraserve_decode_bs{batch}_tok_s"] = r["tok_s"]
        res[f"loraserve_decode_bs{batch}_ms_per_step"] = r["s_per_step"] * 1e3
        limit = batch * bw / decode_step_bytes(engine, batch, r["mean_context"])
        res[f"roofline_decode_bs{batch}_tok_s"] = limit
        res[f"decode_bs{batch}_roofline_fraction"] = r["tok_s"] / limit
    if "prefill" in sections:
        first = len(hf.times) if hf is not None else 0
        r = time_engine_prefill(engine, prompts, a.prefill_batch, 1024, a.prefill_repeats, other=hf)
        hits += r["prefix_hits"]
        res["timed_prefix_cache_hits"] = hits
        res["loraserve_prefill_tok_s"] = r["tok_s"]
        if hf is not None:
            res["hf_prefill_tok_s"] = hf.tok_s(first=first)
            res["hf_prefill_interleaved"] = True
            res["hf_prefill_ms_runs"] = [round(t * 1e3, 2) for t in hf.times[first:]]
            hf.close()
        from loraserve.inference.models import llama

        res["prefill_last_layer_rows_only"] = bool(llama.LAST_LAYER_ROWS)   # FLOPs below: the work done
        flops = prefill_flops(engine.args, a.prefill_batch, 1024, llama.LAST_LAYER_ROWS)   # no adapter in this batch
        res["prefill_wall_ms"] = r["s"] * 1e3
        res["prefill_device_ms"] = r["device_s"] * 1e3   # CUDA events around the launched steps
        res["prefill_host_launch_ms"] = r["host_launch_s"] * 1e3
        for k in ("gap_before_ms", "tail_ms", "gc_ms"):    # the wall's host parts (see time_engine_prefill)
            if r[k] is not None:
                res[f"prefill_{k}"] = r[k]
        res["prefill_steps"] = r["steps"]
        res["prefill_TFLOPs"] = flops / r["s"] / 1e12
        res["prefill_gemm_peak_fraction"] = flops / r["s"] / peak
        if "hf_prefill_tok_s" in res:
            res["prefill_vs_hf"] = r["tok_s"] / res["hf_prefill_tok_s"]
        if a.last_rows_compare:   # diagnostic: the same runs with the last layer on every row
            llama.LAST_LAYER_ROWS = not llama.LAST_LAYER_ROWS
            r3 = time_engine_prefill(engine, prompts, a.prefill_batch, 1024, a.prefill_repeats)
            llama.LAST_LAYER_ROWS = not llama.LAST_LAYER_ROWS
            res[f"prefill_wall_ms_last_rows_{'on' if not llama.LAST_LAYER_ROWS else 'off'}"] = r3["s"] * 1e3
            res[f"prefill_device_ms_last_rows_{'on' if not llama.LAST_LAYER_ROWS else 'off'}"] = r3["device_s"] * 1e3
        if a.gc_freeze_compare:   # diagnostic: the same runs with the start-up heap frozen (vLLM's gc.freeze)
            gc.collect()
            gc.freeze()
            r2 = time_engine_prefill(engine, prompts, a.prefill_batch, 1024, a.prefill_repeats)
            gc.unfreeze()
            res["prefill_wall_ms_gc_frozen"] = r2["s"] * 1e3
            res["prefill_tail_ms_gc_frozen"] = r2["tail_ms"]
    for k in (("1", "64") if "hf_decode_bs1_tok_s" in res and "decode" in sections else ()):
        res[f"speedup_vs_hf_decode_bs{k}"] = res[f"loraserve_decode_bs{k}_tok_s"] / res[f"hf_decode_bs{k}_tok_s"]
    reqs = None
    if engine.lora_manager is not None and "lora" in sections:
        lm = engine.lora_manager
        reqs = []
        for i, ad in enumerate(random_adapters(engine.args, 32, 16, engine.dtype, device=dev)):
            req = LoRARequest(f"bench-{i}", i, "")
            lm.release(lm.add_adapter(ad, req))
            reqs.append(req)
        res["lora_adapters_ready_s"] = time.perf_counter() - res.t0
        with_lora = time_engine_decode(engine, prompts, 64, a.prompt_len, a.steps, reqs)
        without = time_engine_decode(engine, prompts, 64, a.prompt_len, a.steps)
        hits += with_lora["prefix_hits"] + without["prefix_hits"]
        res["loraserve_decode_bs64_32lora_tok_s"] = with_lora["tok_s"]
        res["loraserve_decode_bs64_nolora_tok_s"] = without["tok_s"]
        res["lora32_vs_nolora_decode"] = with_lora["tok_s"] / without["tok_s"]
    res["timed_prefix_cache_hits"] = hits
    late = a.profile_after_s is not None and time.perf_counter() - res.t0 > a.profile_after_s
    if a.profile and not a.tiny and not late:
        profile_steps(engine, prompts, a.profile, reqs, decode="decode" in sections)
    elif a.profile and late:
        print(f"profiles skipped: {time.perf_counter() - res.t0:.0f} s > --profile-after-s {a.profile_after_s}")


if __name__ == "__main__":
    sys.exit(main())
