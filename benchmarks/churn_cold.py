"""The cold-adapter phase of bench_churn (issue 12): a new adapter's time to first token at no load, rank 16 on all
seven modules, through a registry on loopback in its own process (or a local PEFT directory), with the time split
into its stages (cold_path.cold_stages). Also the two small helpers bench_churn's loops share with it: fresh prompts
the prefix cache has never seen, and dropping an engine's memory between phases."""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.cold_path import (LoopThread, blob_use, registry_available, start_registry,  # noqa: E402
                                  vary_context, watching, write_peft_dir)

class FreshPrompts:
    """Random prompts never used before in this process: the prefix cache can never hit."""

    def __init__(self, vocab: int, seed: int):
        self.rng, self.vocab = np.random.default_rng(seed), vocab

    def __call__(self, length: int) -> list[int]:
        return self.rng.integers(2, self.vocab, size=length).tolist()


def time_first_token(engine, prompt: list[int], lora_request=None, resolve=None, timeline: list | None = None) -> float:
    """Seconds from the request (including resolve(), when given) to its first token. timeline: gets the
    seconds (from the request) at which resolve() returned and each engine step ended (where the rest goes)."""
    from loraserve import SamplingParams

    t0 = time.perf_counter()
    hold = resolve() if resolve is not None else None
    marks = timeline if timeline is not None else []
    marks.append(time.perf_counter() - t0)
    engine.add_request(f"cold-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=1, temperature=0,
                                                                              ignore_eos=True),
                       None if hold is not None else lora_request, lora_handle=hold)
    while True:
        outs = engine.step()
        marks.append(time.perf_counter() - t0)
        for out in outs:
            if out.finished:
                return time.perf_counter() - t0


def cold_adapter(model_dir: str, dtype: str, device: str, n: int, workdir: str, use_registry: bool,
                 registry_process: bool = True, watch: bool = False, vary: str = "") -> dict:
    """vary: runtime toggles (cold_path.vary_context) for every other cold adapter from the second measured on
    (an A/B in one engine: cold_ttft_varied_s beside the rest); the headline figure is then of the others."""
    from loraserve import LLM, LoraConfig, LoRARequest

    llm = LLM(model=model_dir, dtype=dtype, device=device, max_num_seqs=8,
              lora_config=LoraConfig(max_lora_rank=16, max_loras=4),
              kv_cache_config={"free_gpu_memory_fraction": 0.3})
    eng = llm.engine
    shapes = eng.args.lora_module_shapes()
    if watch:
        from benchmarks.thread_watch import numa_report
        arena = eng.lora_manager.arena
        print("numa: " + numa_report(arena.base if arena is not None else None), flush=True)
    prompt = FreshPrompts(eng.args.vocab_size, 4242)  # 64 tokens each, never seen by the prefix cache
    # PEFT dirs on local disk, bf16, rank 16 on all seven modules (8B shape: an 84 MB dir), alpha = 2r
    n += 1  # adapter 0 warms the LoRA path up (kernel compiles for these shapes); not counted
    paths = [write_peft_dir(os.path.join(workdir, f"cold-{i}"), shapes, eng.args.num_hidden_layers, 16, 7_000 + i)
             for i in range(n)]
    time_first_token(eng, prompt(64))  # warm-up
    base = [time_first_token(eng, prompt(64)) for _ in range(3)]
    result = {"base_ttft_s": statistics.median(base)}
    cold, warm, stages, timelines, watches, varies, dirty = [], [], [], [], [], [], []
    if use_registry:
        from loraserve.inference.adapter_source import AdapterFetcher
        from loraserve.registry.client import RegistryClient

        with start_registry(os.path.join(workdir, "registry"), as_process=registry_process) as (reg, kind):
            with RegistryClient(reg.address) as client:
                for i, p in enumerate(paths):
                    client.push(p, f"cold-{i}", base_model="bench", chunk_size=1 << 20)
            # the set-up's own writes (a 16 GB checkpoint written just before, the adapter dirs, the pushes) go to
            # disk now, not as a writeback storm beside the timed requests (nothing is read or cached by this)
            t_sync = time.perf_counter()
            os.sync()
            result["setup_sync_s"] = time.perf_counter() - t_sync
            fetcher = AdapterFetcher(reg.address, os.path.join(workdir, "fetch-cache"),  # as the service does
                                     stage_alloc=eng.lora_manager.staging_alloc)
            loop = LoopThread()  # the fetcher's event loop on its own thread, as in the service
            for i in range(n):
                fetched = []

                varied = bool(vary) and i >= 2 and i % 2 == 0
                varies.append(varied)

                def resolve(i=i, varied=varied):
                    with (vary_context(vary) if varied else contextlib.nullcontext()), watching(watch) as w:  # (--watch: who ran and who held the GIL meanwhile)
                        f = loop.run(fetcher.fetch(f"cold-{i}", 1))
                        fetched.append(f)
                        hold = eng.lora_manager.resolve(LoRARequest(f"cold-{i}", 10_000 + i, f.path, f.format),
                                                        trusted=True, digest=f.digest, data=f.data)  # as the service does
                    if w is not None:
                        watches.append(w)  # (summarised after the timing: gc.get_objects() is not free)
                    return hold
                timeline: list = []
                dirty.append(_dirty_mb())  # (before the clock starts: the host's page cache, writeback under way?)
                cold.append(time_first_token(eng, prompt(64), resolve=resolve, timeline=timeline))
                st = _handle_timings(eng, 10_000 + i)  # (an overlapped download: its time is the handle's)
                stages.append(dict(st, resolve_s=fetched[0].resolve_s,
                                   download_s=max(fetched[0].download_s, st.get("download_s", 0.0))))
                timelines.append(timeline)
                loop.run(fetcher.flush())  # its disk copy, written meanwhile, done before the next
                warm.append(time_first_token(eng, prompt(64), LoRARequest(f"cold-{i}", 10_000 + i)))
            loop.run(fetcher.close())
            kind += "; " + blob_use(fetcher, n)
            loop.close()
        result["cold_source"] = f"registry on loopback, {kind} (download + digest check + parse + stage + copy)"
    else:
        for i, p in enumerate(paths):
            req = LoRARequest(f"cold-{i}", 10_000 + i, p)
            cold.append(time_first_token(eng, prompt(64), req))
            stages.append(_handle_timings(eng, 10_000 + i))
            warm.append(time_first_token(eng, prompt(64), req))
        result["cold_source"] = f"local PEFT dir via lora_path (no registry here: {registry_available()})"
    if any(varies):  # (--vary: the varied adapters reported apart; the figure is of the others)
        result["cold_ttft_varied_s"] = [c for c, v in zip(cold, varies) if v]
        result["vary"] = vary
        print(f"  cold ms: " + ", ".join(f"{c * 1e3:.1f}{' (varied)' if v else ''}" for c, v in zip(cold[1:], varies[1:])))
        keep = [k for k, v in enumerate(varies) if not v]
        cold, warm, stages, timelines = ([x[k] for k in keep] for x in (cold, warm, stages, timelines))
    cold, warm, stages = cold[1:], warm[1:], stages[1:]
    for st, total in zip(stages, cold):  # the rest: admission wait + the forward + host->GPU copy wait
        # (an overlapped download, verify_wait_s present, ran beside read + parse: not on the critical path)
        skip = ("place_s", "pin_alloc_s") + (("download_s",) if "verify_wait_s" in st else ())
        st["rest_s"] = total - sum(v for k, v in st.items() if k not in skip)
    result.update(cold_ttft_s=statistics.median(cold), resident_ttft_s=statistics.median(warm),
                  cold_ttft_all_s=cold, cold_stages=stages, cold_timelines_s=timelines[1:],
                  dirty_writeback_mb_at_start=dirty,
                  cold_watch=[("(varied) " if v else "") + w.summary() for w, v in zip(watches[1:], varies[1:])],
                  adapter_dir_bytes=sum(os.path.getsize(os.path.join(paths[0], f)) for f in os.listdir(paths[0])))
    llm.shutdown()
    llm = eng = None  # drop the engine before the next one loads (a del would hide eng from resolve's closure)
    free_memory()
    return result


def _dirty_mb() -> tuple[float, float]:
    from benchmarks.thread_watch import _dirty_mb as read

    return read()


def _handle_timings(engine, int_id: int) -> dict:
    mgr = engine.lora_manager
    with mgr.lock:
        return dict(mgr.handles[mgr.by_id[int_id]].timings)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
