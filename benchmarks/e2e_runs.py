"""bench_e2e's runs of a load (issue 11): one run through a target after its warm-up, and variant runs of the
same load on the headline run's engine with one option flipped (prefill cap, graph capture policy, graphs
off), never on a second engine built in the same process."""
from __future__ import annotations

import asyncio

from benchmarks.e2e_steps import host_time_per_decode_step, print_breakdown, step_breakdown


def run_load(target, warm, requests, concurrency: int | None, rate: float | None, on_measure=None) -> dict:
    """on_measure(target): called after the warm-up, right before the measured run (e.g. tracing on)."""
    from loraserve.inference.bench.report import build_report
    from loraserve.inference.bench.runner import run_benchmark

    async def main():
        await target.start()
        try:
            await run_benchmark(target, warm, concurrency=concurrency or len(warm), warmup=0, progress=False)
            if on_measure is not None:
                on_measure(target)
            return await run_benchmark(target, requests, concurrency=concurrency, request_rate=rate, warmup=0,
                                       progress=False)
        finally:
            await target.close()
    return build_report(asyncio.run(main()), include_requests=False)


def engine_target(llm):
    """The in-process target around an LLM already built: a variant run reuses the headline run's engine
    (an option flipped on it) instead of building a second engine in this process."""
    from loraserve.inference.bench.runner import InProcessTarget

    class BuiltTarget(InProcessTarget):
        async def start(self) -> None:   # the engine exists; its thread restarts on the first request
            self.name = f"in-process:{self.llm.config.model}"
    target = BuiltTarget(None, {})
    target.llm = llm
    return target


def graph_counts(engine) -> tuple[int, int, int]:
    """(mixed-step graphs captured, replays, replays in a larger graph) so far; zeros without them."""
    mixed = engine.runner.mixed_graphs
    return (len(mixed.graphs), mixed.num_replays, mixed.num_covered) if mixed is not None else (0, 0, 0)


def graphs_off(engine):
    """Mixed-step and greedy-sampler CUDA graphs off on a built engine (the eager paths, as with
    LORASERVE_MIXED_GRAPHS=0 LORASERVE_SAMPLER_GRAPHS=0 at build); returns the function that restores them."""
    runner = engine.runner
    graph_runner = runner.graph_runner
    mixed, sampler = runner.mixed_graphs, getattr(graph_runner, "sampler_graphs", None)
    runner.mixed_graphs = None
    if graph_runner is not None:
        graph_runner.sampler_graphs = None

    def restore():
        runner.mixed_graphs = mixed
        if graph_runner is not None:
            graph_runner.sampler_graphs = sampler
    return restore


def _swap(obj, name: str, value):
    """obj.name = value; returns the function that puts the old value back."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


def prefill_cap(cap: int):
    """A variant: the scheduler's max_num_prefill_tokens_with_decode set to cap on the built engine."""
    return lambda engine: _swap(engine.scheduler, "max_num_prefill_tokens_with_decode", cap)


def capture_after(k: int):
    """A variant: a mixed-step shape replays a larger captured graph until its k-th sighting (1: captured at once)."""
    def apply(engine):
        mixed = engine.runner.mixed_graphs
        return (lambda: None) if mixed is None else _swap(mixed, "capture_after", k)
    return apply


def combined(*variants):
    """A variant made of several (applied in order, undone in reverse)."""
    def apply(engine):
        undo = [v(engine) for v in variants]

        def restore():
            for u in reversed(undo):
                u()
        return restore
    return apply


def start_afresh(engine) -> bool:
    """Before a variant: the engine as the first run found it where the run depends on it: no prefix cache (the
    variant repeats the same prompts) and no mixed-step graph captured yet (the variant's own warm-up and run
    capture theirs, as a fresh engine's would). Compiled kernels and decode graphs stay. False: the engine
    still held requests (the prefix cache was kept)."""
    import torch

    mixed = engine.runner.mixed_graphs
    if mixed is not None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()      # no replay in flight while the graphs and their pool go
        mixed.graphs.clear()
        mixed.seen.clear()
        mixed.pool = None
    return engine.reset_prefix_cache()


def variant_run(label: str, llm, apply, warm, reqs, concurrency: int, limit_s: float, decode_batch: int,
                prompt_len: int, host_steps: int) -> dict:
    """One more in-process run of the same load on the same engine with an option flipped by apply(engine)
    (which returns the function that undoes it), started afresh (no prefix cache, no mixed-step graphs)."""
    engine = llm.engine
    if not start_afresh(engine):
        print(f"{label}: the prefix cache could not be reset (requests held blocks)", flush=True)
    reused0 = engine.block_manager.num_reused_blocks
    restore = apply(engine)
    mixed = engine.runner.mixed_graphs
    holder: dict = {}

    def trace_on(t):   # after the warm-up: graphs captured from here on are captured inside the measured run
        holder["n0"] = graph_counts(t.llm.engine)
        t.llm.engine.step_trace = holder["trace"] = []
    try:
        rep = run_load(engine_target(llm), warm, reqs, concurrency, None, trace_on)
        llm.shutdown()
        engine.step_trace = None
        host = (host_time_per_decode_step(engine, decode_batch, prompt_len, host_steps, engine.args.vocab_size)
                if host_steps else None)
    finally:
        engine.step_trace = None
        restore()
    b = step_breakdown(holder["trace"])
    n0 = holder["n0"]
    holder.clear()
    tp50 = (rep["tpot_s"] or {}).get("p50") or 0
    out = {"wall_s": rep["duration_s"], "wall_over_limit": rep["duration_s"] / limit_s, "tpot_p50_s": tp50,
           "tpot_p90_s": (rep["tpot_s"] or {}).get("p90"), "ttft_s": rep.get("ttft_s"),
           "output_tokens_per_s": rep["output_tokens_per_s"], "num_failed": rep["num_failed"], "steps": b,
           "host": host, "prefix_reused_blocks": engine.block_manager.num_reused_blocks - reused0}
    if mixed is not None and engine.runner.mixed_graphs is not None:
        out["mixed_graphs_captured"] = len(mixed.graphs) - n0[0]
        out["mixed_graph_replays"] = mixed.num_replays - n0[1]
        out["mixed_graph_covered"] = mixed.num_covered - n0[2]
    print_breakdown(b, label)
    print(f"{label}: wall {rep['duration_s']:.3f} s = {rep['duration_s'] / limit_s:.2f} x limit, TPOT p50 "
          f"{1e3 * tp50:.2f} ms (p90 {1e3 * (out['tpot_p90_s'] or 0):.2f}), output tok/s {rep['output_tokens_per_s']:.0f}, "
          f"failed {rep['num_failed']}, mixed graphs {out.get('mixed_graphs_captured')} captured in the measured run / "
          f"{out.get('mixed_graph_replays')} replays ({out.get('mixed_graph_covered')} in a larger graph), prefix-reused blocks "
          f"{out['prefix_reused_blocks']}" + (f"; decode step at batch {host['batch']}: host {host['host_ms']:.3f} ms "
          f"(launch {host['launch_ms']:.3f} + post {host['post_ms']:.3f}), wall {host['step_ms']:.3f} ms" if host else ""),
          flush=True)
    return out
