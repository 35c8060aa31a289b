"""Host time per decode step (issue 11: <= 1 ms at batch 64), measured on any machine.

The host's share of a step is what the engine thread spends outside the model in
`LLMEngine.step_pending()` (as AsyncLLM drives it): scheduling, step-input building, sampling metadata,
sampler op dispatch, post-processing (token append, stop checks). Building the stream messages
(detokenization of requests without stop strings included) runs on the consumer's thread in the server
and is reported apart ("building the messages"). None of it depends on the device,
so it is measured here on the CPU with a real, tiny model (2 layers, hidden 64): the forward pass
and the LM head are timed with module hooks and subtracted, everything else counts as host time
(the sampler's tensor ops included, which on the GPU cost about their launch time: an upper bound).
Times are this thread's CPU time (time.thread_time, one torch thread), not wall time: on a shared
machine other processes' load changes wall times by 2x from run to run, CPU time much less.

    python benchmarks/bench_host.py                       # batch 64, overlapped and serial loops
    python benchmarks/bench_host.py --batch 64 --steps 200 --profile 25   # + cProfile's top 25

--engine-run: the GPU path itself (decode CUDA graphs, the greedy-sampler graph, pinned copies) on an 8B-shaped
checkpoint of --layers layers (the host work of a step does not depend on the layer count), on CUDA: the engine's
start-up (warm-up included, warmup.py), host time per decode step at --batch as bench_e2e measures it (wall minus
the time blocked on the device, with the phases timed in their own steps), then prefill-only steps of shapes the
warm-up never ran (a 7,759-token step of 16 prompts, 16 x 45, 3 odd prompts, 1 x 777, 1 x 2): their host launch
time and the attention-kernel variants compiled during them (0 expected). --tiny: the same flow on the CPU.

    python benchmarks/bench_host.py --engine-run --layers 4 --json /tmp/host.json
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


class ModelTimer:
    """Seconds spent in the model's forward and LM head (hooks: the model itself is not changed)."""

    def __init__(self, model):
        self.seconds = 0.0
        self._t0 = 0.0
        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._stop)
        head = model.compute_logits

        def timed_logits(hidden):
            t = time.thread_time()
            try:
                return head(hidden)
            finally:
                self.seconds += time.thread_time() - t
        model.compute_logits = timed_logits

    def _start(self, *_):
        self._t0 = time.thread_time()

    def _stop(self, *_):
        self.seconds += time.thread_time() - self._t0


def measure(model_dir: str, batch: int, prompt_len: int, steps: int, overlap: bool, stream: bool,
            profile_top: int = 0, stream_interval: int = 1) -> dict:
    import torch

    from loraserve import SamplingParams
    from loraserve.config import EngineConfig
    from loraserve.inference.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", dtype="float32", max_num_seqs=max(batch, 8),
                                    max_seq_len=prompt_len + steps + 64, async_scheduling=overlap,
                                    stream_interval=stream_interval))
    timer = ModelTimer(engine.runner.model)
    g = torch.Generator().manual_seed(1)
    vocab = engine.args.vocab_size
    for i in range(batch):
        ids = torch.randint(2, vocab, (prompt_len,), generator=g).tolist()
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=steps + 32, temperature=0, ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.seqs.values()):
        engine.step()
    for _ in range(5):
        engine.step()
    prof = cProfile.Profile() if profile_top else None
    m0 = timer.seconds
    n_outputs = 0
    t = time.thread_time()
    if prof:
        prof.enable()
    consumer = 0.0
    for _ in range(steps):
        pending = engine.step_pending()   # the engine thread's share, as AsyncLLM drives it
        c = time.thread_time()
        outs = [p.build() for p in pending]   # the consumer's share (AsyncLLM: the event-loop thread)
        n_outputs += len(outs)
        if stream:   # what a streaming consumer reads of each message
            for o in outs:
                o.outputs[0].text_diff, o.outputs[0].token_ids_diff
        consumer += time.thread_time() - c
    if prof:
        prof.disable()
    wall = time.thread_time() - t - consumer
    model = timer.seconds - m0
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(profile_top)
    return {"batch": batch, "steps": steps, "overlap": overlap, "step_ms": wall / steps * 1e3,
            "model_ms": model / steps * 1e3, "host_ms": (wall - model) / steps * 1e3,
            "consumer_ms": consumer / steps * 1e3,
            "outputs_per_step": n_outputs / steps}


def engine_run(a) -> dict:
    import torch

    from benchmarks.common import write_json
    from benchmarks.e2e_steps import host_time_per_decode_step, print_host
    from loraserve import SamplingParams
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine
    from loraserve.inference.warmup import compiled_attention_variants

    cuda = torch.cuda.is_available() and not a.tiny
    path = tempfile.mkdtemp(prefix="bench_host_engine_")
    t = time.perf_counter()
    if cuda:
        from benchmarks.bench_engine import build_checkpoint

        build_checkpoint(path, a.layers)
        torch.cuda.empty_cache()
    else:
        from tests.inference.conftest import make_random_model

        make_random_model(path, "llama")
    out: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "layers": a.layers if cuda else 2,
                 "checkpoint_s": time.perf_counter() - t}
    t = time.perf_counter()
    engine = LLMEngine(engine_config_from_kwargs(path, dtype="bfloat16" if cuda else "float32",
                                                 device="cuda" if cuda else "cpu",
                                                 kv_cache_config={"free_gpu_memory_fraction": 0.5}))
    out["engine_start_s"], out["warmup"] = time.perf_counter() - t, engine.warmup
    print(f"engine start {out['engine_start_s']:.1f} s (checkpoint {out['checkpoint_s']:.1f} s); warm-up "
          f"{engine.warmup}", flush=True)

    write_json(a.json, out)   # again after each part: a later part may not finish
    h = out["host"] = host_time_per_decode_step(engine, a.batch, a.prompt_len, a.steps, engine.args.vocab_size)
    out["host_ms_per_decode_step"] = h["host_ms"]
    print_host(h)
    write_json(a.json, out)
    # prefill-only steps of shapes the warm-up did not run: a compile would show as a long host launch
    g = torch.Generator().manual_seed(7)
    shapes = {"7759 tokens / 16 prompts": [517] * 15 + [4], "16 x 45": [45] * 16, "13+250+1001": [13, 250, 1001],
              "1 x 777": [777], "1 x 2": [2]}
    before, out["new_shapes"] = compiled_attention_variants(), {}
    if not cuda:   # the tiny model's 512 positions
        shapes = {k: [min(n, 300) for n in v] for k, v in shapes.items()}
    for label, lens in shapes.items():
        engine.step_trace = trace = []
        for i, n in enumerate(lens):
            engine.add_request(f"{label}-{i}", torch.randint(2, engine.args.vocab_size, (n,), generator=g).tolist(),
                               SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        engine.step_trace = None
        first = trace[0]
        out["new_shapes"][label] = {"tokens": first.num_tokens, "seqs": first.num_seqs,
                                    "host_launch_ms": 1e3 * (first.launched_at - first.start),
                                    "step_ms": 1e3 * (first.end - first.start)}
    out["attention_variants_compiled_after_warmup"] = compiled_attention_variants() - before
    for label, r in out["new_shapes"].items():
        print(f"  new shape {label}: {r['tokens']} tokens / {r['seqs']} seqs, host launch {r['host_launch_ms']:.2f} ms,"
              f" step() {r['step_ms']:.2f} ms", flush=True)
    print(f"attention-kernel variants compiled after the warm-up: {out['attention_variants_compiled_after_warmup']}")
    write_json(a.json, out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (a shared CPU is noisy)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also print cProfile's top N functions")
    ap.add_argument("--stream-interval", type=int, default=1, help="the engine's stream_interval")
    ap.add_argument("--engine-run", action="store_true", help="the GPU flow (see above); --tiny: on the CPU")
    ap.add_argument("--layers", type=int, default=4, help="--engine-run: layers of the 8B-shaped checkpoint")
    ap.add_argument("--tiny", action="store_true", help="--engine-run on the CPU with the tiny model")
    ap.add_argument("--json", default=None, help="--engine-run: write the figures here")
    a = ap.parse_args()
    if a.engine_run:
        if a.steps == 200:
            a.steps = 128
        if a.prompt_len == 64 and not a.tiny:
            a.prompt_len = 512
        engine_run(a)
        return 0

    import torch

    torch.set_num_threads(1)   # a shared CPU: spinning thread pools make step times meaningless
    from tests.inference.conftest import make_random_model

    model_dir = tempfile.mkdtemp(prefix="bench_host_")
    make_random_model(model_dir, "llama")
    for overlap in (True, False):
        runs = [measure(model_dir, a.batch, a.prompt_len, a.steps, overlap, True, 0, a.stream_interval)
                for _ in range(a.repeat)]
        best = min(runs, key=lambda r: r["host_ms"])
        print(f"batch {best['batch']} {'overlapped' if overlap else 'serial'} stream_interval {a.stream_interval}: host {best['host_ms']:.3f} ms/step "
              f"(step {best['step_ms']:.3f} ms, model {best['model_ms']:.3f} ms; + building the messages off the engine "
              f"thread {best['consumer_ms']:.3f} ms; best of {a.repeat}, "
              f"all {[round(r['host_ms'], 3) for r in runs]})")
    if a.profile:
        measure(model_dir, a.batch, a.prompt_len, a.steps, True, True, a.profile, a.stream_interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
