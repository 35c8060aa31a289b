"""bench_e2e's step-level measurements (issue 11): host time per decode step, the per-step breakdown of a
run from the engine's StepRecords (engine.step_trace), and a profiled mixed step."""
from __future__ import annotations

import gc
import os
import time


# ---- host time per decode step ----------------------------------------------------------------------
class PhaseTimer:
    """Wall seconds inside a few engine methods (attributes wrap them; close() removes the wrappers): where
    the host time of a step goes. Nested phases overlap (run includes inputs.build, the graphs, the sampling
    metadata and the StepOutput, i.e. the device->host copy's issue); fetch is the wait for the device plus
    reading the sampled tokens, inside postprocess."""

    def __init__(self, engine):
        from loraserve.inference.model_runner import StepOutput

        self.seconds: dict[str, float] = {}
        self._undo = []
        runner = engine.runner
        graphs = runner.graph_runner
        for label, obj, name in (("schedule", engine.scheduler, "schedule"), ("run", runner, "run"),
                                 ("inputs.build", runner.inputs, "build"), ("graph copies+replay", graphs, "run"),
                                 ("sampling metadata", runner.sampling_meta, "get"),
                                 ("greedy sampler graph", graphs, "sample_greedy"), ("sampler (eager)", runner, "_sample"),
                                 ("StepOutput (D2H copy issue)", StepOutput, "__init__"),
                                 ("on_launched", engine.scheduler, "on_launched"), ("postprocess", engine, "_postprocess"),
                                 ("fetch (wait + read tokens)", StepOutput, "fetch"),
                                 ("scheduler.postprocess", engine.scheduler, "postprocess")):
            if obj is not None and hasattr(obj, name):
                self._wrap(label, obj, name)

    def _wrap(self, label: str, obj, name: str) -> None:
        fn = getattr(obj, name)
        seconds = self.seconds
        seconds[label] = 0.0
        is_class = isinstance(obj, type)
        original = obj.__dict__.get(name) if is_class else None

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - t
        setattr(obj, name, timed)
        self._undo.append((obj, name, is_class, original))

    def close(self) -> None:
        for obj, name, is_class, original in reversed(self._undo):
            if is_class:
                setattr(obj, name, original)
            else:
                delattr(obj, name)   # back to the class's method
        self._undo.clear()

    def per_step_ms(self, steps: int) -> dict[str, float]:
        return {k: 1e3 * v / steps for k, v in self.seconds.items()}


HOST_TIME_DEFINITION = (
    "host time per decode step = the engine thread's wall time in step_pending() (AsyncLLM's call) minus the time "
    "it blocked on the device (the event wait in StepOutput.fetch), per step: scheduling, step inputs, every launch "
    "call (graph replays, copies), sampling metadata, the device->host copy's issue, token append, stop checks, "
    "KV bookkeeping; the stream messages (built on the consumer's thread in the server, during the device wait) "
    "are timed apart")


class GCTimer:
    """Python's garbage collections while it is on (gc.callbacks): how many, of which generation, and their
    seconds, all of them on whatever thread allocated (in a decode step: the engine thread or the consumer's)."""

    def __init__(self):
        self.seconds, self.counts, self._t = 0.0, [0, 0, 0], None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.counts[info.get("generation", 0)] += 1
            self._t = None

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


def _decode_steps(engine, steps: int) -> tuple[float, float, float, list]:
    """steps of step_pending() + the consumer's message building, traced; (wall s without the building,
    building s, engine-thread CPU s without the building, trace)."""
    engine.step_trace, engine.step_trace_device = (trace := []), False   # no CUDA events: host time only
    build = cpu_build = 0.0
    t, c0 = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        pending = engine.step_pending()   # the engine thread's share, as AsyncLLM drives it
        c, cc = time.perf_counter(), time.thread_time()
        for p in pending:                 # the consumer's (AsyncLLM: the event-loop thread, during the wait)
            p.build().outputs[0].text_diff
        build += time.perf_counter() - c
        cpu_build += time.thread_time() - cc
    wall = time.perf_counter() - t - build
    cpu = time.thread_time() - c0 - cpu_build
    engine.step_trace, engine.step_trace_device = None, True
    return wall, build, cpu, trace


def host_time_per_decode_step(engine, batch: int, prompt_len: int, steps: int, vocab: int,
                              profile_dir: str | None = None) -> dict:
    """Decode-only steps of `batch` fresh requests: (step wall - time blocked on the device) / steps, then
    more steps with the phases timed (PhaseTimer; its wrappers add ~1 us per call), whose own launch and
    post-processing totals the phases are compared with ("unlocated": launch minus schedule, run and
    on_launched). profile_dir: also 16 more steps under torch.profiler (a Chrome trace and the op table)."""
    import torch

    from loraserve import SamplingParams

    g = torch.Generator().manual_seed(4321)
    prompts = torch.randint(2, vocab, (batch, prompt_len), generator=g).tolist()
    tag = time.monotonic_ns()
    for i, ids in enumerate(prompts):
        engine.add_request(f"host{tag}-{i}", ids, SamplingParams(max_tokens=2 * steps + 64, temperature=0,
                                                                 ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.seqs.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    n0, w0 = engine.num_steps, engine.device_wait_s
    gc_timer = GCTimer()
    wall, build, cpu, trace = _decode_steps(engine, steps)
    gc_timer.close()
    n, wait = engine.num_steps - n0, engine.device_wait_s - w0
    launch_ms = 1e3 * sum(r.launched_at - r.start for r in trace) / n
    post_ms = 1e3 * sum(r.end - r.launched_at - r.wait_s for r in trace) / n
    # the same again with the phases timed: the phases and the totals they are compared with from the same steps
    timed_steps = min(steps, 64)
    phases = PhaseTimer(engine)
    w1 = engine.device_wait_s
    pwall, _, _, ptrace = _decode_steps(engine, timed_steps)
    phases.close()
    phases_ms = phases.per_step_ms(timed_steps)
    p_launch = 1e3 * sum(r.launched_at - r.start for r in ptrace) / timed_steps
    p_post = 1e3 * sum(r.end - r.launched_at - r.wait_s for r in ptrace) / timed_steps
    located = sum(phases_ms.get(k, 0.0) for k in ("schedule", "run", "on_launched"))
    timed = {"steps": timed_steps, "host_ms": 1e3 * (pwall - (engine.device_wait_s - w1)) / timed_steps,
             "launch_ms": p_launch, "post_ms": p_post, "unlocated_launch_ms": p_launch - located}
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            for _ in range(16):
                engine.step()
        os.makedirs(profile_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(profile_dir, f"decode_b{batch}.json"))
        with open(os.path.join(profile_dir, f"decode_b{batch}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": batch, "steps": n, "step_ms": wall / n * 1e3, "host_ms": (wall - wait) / n * 1e3,
            "launch_ms": launch_ms, "post_ms": post_ms, "build_ms": build / n * 1e3,
            "engine_thread_cpu_ms": cpu / n * 1e3, "phases_ms": phases_ms, "phase_steps": timed,
            "gc": {"ms_per_step": 1e3 * gc_timer.seconds / n, "collections_by_generation": gc_timer.counts,
                   "frozen_objects": gc.get_freeze_count()},
            "async_scheduling": engine.async_scheduling, "definition": HOST_TIME_DEFINITION}


def print_host(h: dict) -> None:
    """The host-time figures with what they mean (bench_e2e, bench_host)."""
    print(f"decode step at batch {h['batch']}: {h['step_ms']:.3f} ms wall, HOST {h['host_ms']:.3f} ms = launch "
          f"{h['launch_ms']:.3f} + post {h['post_ms']:.3f} (engine-thread CPU incl. any spin-wait "
          f"{h.get('engine_thread_cpu_ms', 0):.3f}); + messages built off the engine thread {h['build_ms']:.3f}",
          flush=True)
    print(f"  ({h.get('definition', HOST_TIME_DEFINITION)})", flush=True)
    g = h.get("gc")
    if g:
        print(f"  Python GC in those steps (engine + consumer threads): {g['ms_per_step']:.3f} ms per step, collections "
              f"by generation {g['collections_by_generation']}, objects frozen at start-up {g['frozen_objects']}",
              flush=True)
    t = h.get("phase_steps")
    if t:
        print(f"  {t['steps']} more steps with phases timed: host {t['host_ms']:.3f} ms = launch {t['launch_ms']:.3f}"
              f" (unlocated {t['unlocated_launch_ms']:.3f}) + post {t['post_ms']:.3f}", flush=True)
    print("  phases (ms per step, nested: run includes inputs.build, graphs, sampling metadata, StepOutput; "
          "postprocess includes fetch):", ", ".join(f"{k} {v:.3f}" for k, v in h["phases_ms"].items()), flush=True)


def profile_mixed_steps(engine, batch: int, prompt_len: int, vocab: int, steps: int = 4, rows: int = 14) -> dict:
    """Steps of `batch` decoding requests plus one fresh prompt of prompt_len (mixed steps, as in the
    steady state of the load): host launch vs device time from the step trace, and the top ops by
    device time under torch.profiler (printed)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from loraserve import SamplingParams

    g = torch.Generator().manual_seed(99)
    tag = time.monotonic_ns()
    sp = SamplingParams(max_tokens=64 + 8 * steps, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"mix{tag}-{i}", torch.randint(2, vocab, (prompt_len,), generator=g).tolist(), sp)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.seqs.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    engine.step_trace = trace = []
    with profile(activities=acts) as prof:
        for j in range(steps):
            engine.add_request(f"mix{tag}-p{j}", torch.randint(2, vocab, (prompt_len,), generator=g).tolist(), sp)
            engine.step()
        engine.step()
    engine.step_trace = None
    mixed = [r for r in trace if r.kind == "mixed"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out = {"steps": len(mixed), "tokens": mixed[0].num_tokens if mixed else 0,
           "host_launch_ms": [round(1e3 * (r.launched_at - r.start), 3) for r in mixed],
           "device_ms": [round(r.events[0].elapsed_time(r.events[1]), 3) for r in mixed if r.events is not None]}
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"mixed steps ({batch} decodes + a {prompt_len}-token prompt, {out['tokens']} tokens): host launch ms "
          f"{out['host_launch_ms']}, device ms {out['device_ms']} (events; under the profiler)")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48), flush=True)
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return out


# ---- per-step breakdown (engine.step_trace) ---------------------------------------------------------
def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None}
    v = sorted(values)
    return {"mean": sum(v) / len(v), "p50": v[len(v) // 2]}


def step_breakdown(trace: list) -> dict:
    """Where a run's time went, from the engine's StepRecords (ms). By the kind of batch a step()
    launched: its host work up to the launch (schedule, inputs, launch; for an eager step the launch is
    every kernel of the forward) and its device time (CUDA events around the launch: the stream's time
    from the first to the last kernel, idle gaps included when the host launches slower than the device
    runs). By the kind of batch a step() waited for: the time blocked on the device, and the
    post-processing after it (tokens, stop checks, detokenization, outputs). Plus the time between
    step() calls (the driver: AsyncLLM's queues and deliveries)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out: dict = {"steps": len(trace)}
    for kind in ("decode", "mixed", "prefill"):
        launched = [r for r in trace if r.kind == kind]
        done = [r for r in trace if r.done_kind == kind]
        if not launched and not done:
            continue
        gpu = [r.events[0].elapsed_time(r.events[1]) for r in launched if r.events is not None]
        out[kind] = {
            "count": len(launched), "tokens": _stats([r.num_tokens for r in launched]),
            "host_launch_ms": _stats([1e3 * (r.launched_at - r.start) for r in launched]),
            "device_ms": _stats(gpu) if gpu else None,
            "wait_ms": _stats([1e3 * r.wait_s for r in done]),
            "post_ms": _stats([1e3 * (r.end - r.launched_at - r.wait_s) for r in done]),
        }
    wall = sum(r.end - r.start for r in trace)
    wait = sum(r.wait_s for r in trace)
    gaps = [b.start - a.end for a, b in zip(trace, trace[1:])]
    out["total_s"] = {"step_wall": wall, "host": wall - wait, "device_blocked": wait, "between_steps": sum(gaps),
                      "span": (trace[-1].end - trace[0].start) if trace else 0.0}
    return out


def print_breakdown(b: dict, title: str) -> None:
    def f(x):
        return "   -  " if x is None else f"{x:6.2f}"
    print(f"per-step breakdown ({title}): {b['steps']} steps; ms mean/p50")
    print(f"  {'kind':8} {'count':>6} {'tokens':>13} {'host launch':>15} {'device':>15} {'wait':>15} {'post':>15}")
    for kind in ("decode", "mixed", "prefill"):
        if kind not in b:
            continue
        k = b[kind]
        dev = k["device_ms"] or {"mean": None, "p50": None}
        cols = [k["tokens"], k["host_launch_ms"], dev, k["wait_ms"], k["post_ms"]]
        print(f"  {kind:8} {k['count']:6d} " + " ".join(f"{f(c['mean'])}/{f(c['p50'])}" for c in cols))
    t = b["total_s"]
    print(f"  totals: span {t['span']:.3f} s = step() {t['step_wall']:.3f} s (host {t['host']:.3f} s + blocked on "
          f"device {t['device_blocked']:.3f} s) + between steps {t['between_steps']:.3f} s")
