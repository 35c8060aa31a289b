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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (a shared CPU is noisy)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also print cProfile's top N functions")
    ap.add_argument("--stream-interval", type=int, default=1, help="the engine's stream_interval")
    a = ap.parse_args()

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
