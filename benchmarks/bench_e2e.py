"""End-to-end serving benchmark against the hardware's limit (issue 11), plus the LoRA flow.

On a Llama-3-8B-shaped checkpoint with random bf16 weights (built on the spot: nothing can be
downloaded), R requests of input ~ normal(512, 128), output ~ normal(128, 32) tokens, fresh random
prompts (the prefix cache has never seen them; the run checks that no block was reused), no adapters,
at most C in flight (closed loop):

  1. measure the device's limits in this run: bf16 GEMM peak and copy bandwidth;
  2. in-process (loraserve.LLM streamed through AsyncLLM): wall time, tok/s, TTFT, TPOT, after an
     unmeasured warm-up (2 x C requests of short outputs, then 2 x C of the load's own lengths: the clock
     starts in the load's steady state);
  3. the physical-limit time of that load: prefill FLOPs at the GEMM peak + the decode steps'
     bytes (weights once per step, ceil(decode tokens / C) steps, plus every decode token's KV
     context) at the copy bandwidth; printed with the measured wall time and their ratio;
  4. host time per decode step at batch B (default 64): the engine thread's step_pending() wall time
     minus the time it spent blocked on the device, over decode-only steps of B fresh requests (the
     stream messages, built on the consumer's thread in the server, are timed apart);
  5. --grpc: the same load through a real `loraserve serve` subprocess on loopback (closed loop),
     and --grpc-rate R: Poisson arrivals at R req/s through gRPC and in-process;
  6. variants (--sweep-prefill-cap, --sweep-capture-after, --sweep-mixed-graphs): the same load again on
     the step-2 engine with one option flipped (benchmarks/e2e_runs.py); never a second engine in the process;
  7. --with-lora: the older flow (N Zipf-popular rank-r adapters vs base, in-process and gRPC).

    python3 benchmarks/bench_e2e.py --out OUTDIR --grpc --json benchmarks/results/e2e_h200.json
    python3 benchmarks/bench_e2e.py --out /tmp/x --tiny --grpc     # the same flow on CPU, tiny model
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.common import write_json  # noqa: E402
from benchmarks.e2e_limit import device_limits, physical_limit  # noqa: E402
from benchmarks.e2e_runs import (capture_after, combined, engine_target, graph_counts, graphs_off,  # noqa: E402
                                 prefill_cap, run_load, variant_run)
from benchmarks.e2e_steps import (host_time_per_decode_step, print_breakdown, print_host,  # noqa: E402
                                  profile_mixed_steps, step_breakdown)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model(path: str, tiny: bool, layers: int) -> None:
    if tiny:
        from tests.inference.conftest import make_random_model

        make_random_model(path, "llama")
    else:
        from benchmarks.bench_engine import build_checkpoint

        build_checkpoint(path, layers)
    free_memory()


# ---- the runs --------------------------------------------------------------------------------------
def warm_set(rows, n: int, max_output: int = 48):
    """The unmeasured warm-up: n requests at full concurrency with outputs of 4..max_output tokens, so that
    requests end at different steps and new prompts join running decodes: prefill-only, mixed and decode
    steps of the load's shapes, every Triton specialisation compiled (and mixed-step graphs captured)
    before the clock starts, in-process and in the server alike."""
    from dataclasses import replace

    return [replace(r, output_tokens=min(r.output_tokens, 4 + (7 * i) % (max_output - 3))) for i, r in enumerate(rows[:n])]


def brief(report: dict) -> dict:
    keys = ("num_requests", "num_completed", "num_failed", "errors", "duration_s", "total_input_tokens",
            "total_output_tokens", "output_tokens_per_s", "total_tokens_per_s", "ttft_s", "tpot_s", "concurrency",
            "request_rate")
    return {k: report.get(k) for k in keys}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`loraserve serve` in a subprocess on loopback (its own interpreter: the client's Python work
    does not share the server's GIL)."""

    def __init__(self, model: str, yaml_path: str, tiny: bool, log_path: str, extra: list[str] = ()):
        self.port = free_port()
        cmd = [sys.executable, "-c", "import sys; from loraserve.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", model, "--port", str(self.port), "--registry", "none", "--extra_llm_api_options", yaml_path,
               "--max-queue-size", "100000"]
        if tiny:
            cmd += ["--device", "cpu", "--dtype", "float32"]
        cmd += list(extra)
        self.log = open(log_path, "w")
        env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if tiny else {}))  # as the in-process run (--tiny)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.address = f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 900) -> None:
        """Until GetModelInfo answers (UNAVAILABLE while the model loads)."""
        import grpc

        from loraserve.v1 import inference_pb2 as pb
        from loraserve.v1 import inference_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
                try:
                    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    time.sleep(0.5)
        raise TimeoutError(f"server not serving after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU (a dry run of the flow)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--input-mean", type=int, default=512)
    ap.add_argument("--output-mean", type=int, default=128)
    ap.add_argument("--decode-batch", type=int, default=64, help="batch of the host-time measurement")
    ap.add_argument("--warmup-steady", type=int, default=None,
                    help="warm-up requests with the load's own lengths, after the short ones (default 2 x concurrency, "
                         "--tiny 0): the measured run starts in the steady state")
    ap.add_argument("--overlap", choices=["auto", "on", "off"], default="auto", help="engine async_scheduling")
    ap.add_argument("--stream-interval", type=int, default=1, help="engine stream_interval (tokens per stream message)")
    ap.add_argument("--prefill-cap", type=int, default=None,
                    help="engine max_num_prefill_tokens_with_decode (default: the engine's)")
    ap.add_argument("--sweep-prefill-cap", default=None, metavar="N,N",
                    help="also in-process runs of the same load at these max_num_prefill_tokens_with_decode values")
    ap.add_argument("--variant-host-steps", type=int, default=0,
                    help="decode steps of the host-time measurement after each variant run (0: none)")
    ap.add_argument("--sweep-previous-defaults", action="store_true",
                    help="also an in-process run with the defaults before issue 11's second pass: prefill cap 512, "
                         "every new mixed-step shape captured at once")
    ap.add_argument("--sweep-capture-after", type=int, default=None, metavar="K",
                    help="also an in-process run with mixed-step shapes captured on their K-th sighting")
    ap.add_argument("--sweep-mixed-graphs", action="store_true",
                    help="also an in-process run with LORASERVE_MIXED_GRAPHS flipped (mixed-step CUDA graphs)")
    ap.add_argument("--profile-mixed", action="store_true",
                    help="print a torch.profiler op table of mixed steps (--decode-batch decodes + one prompt)")
    ap.add_argument("--grpc", action="store_true", help="also run the same load through a loopback gRPC server")
    ap.add_argument("--grpc-rate", type=float, default=None, help="also Poisson arrivals at this req/s (both targets)")
    ap.add_argument("--json", default=None, help="write the headline figures here")
    ap.add_argument("--profile", default=None, metavar="DIR", help="torch.profiler trace of decode steps at --decode-batch")
    ap.add_argument("--with-lora", action="store_true", help="also the LoRA-vs-base flow (adapters, gRPC)")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gpu-slots", type=int, default=16, help="lora_config.max_loras (device tier)")
    ap.add_argument("--rate", type=float, default=16.0, help="request rate of the LoRA flow's gRPC run (req/s)")
    ap.add_argument("--grpc-requests", type=int, default=256)
    a = ap.parse_args()
    if a.tiny:   # small defaults; values given on the command line are kept (a CPU load test of the server)
        small = dict(requests=24, concurrency=8, input_mean=24, output_mean=8, decode_batch=8, adapters=4, rank=4,
                     gpu_slots=2, grpc_requests=12)
        given = {act.dest for act in ap._actions if any(o in sys.argv for o in act.option_strings)}
        for name, value in small.items():
            if name not in given:
                setattr(a, name, value)
    os.makedirs(a.out, exist_ok=True)

    import torch

    if a.tiny:
        torch.set_num_threads(1)   # a shared CPU: spinning thread pools make step times meaningless

    from loraserve.cli import main as cli
    from loraserve.inference.bench.dataset import read_jsonl
    from loraserve.inference.bench.runner import GrpcTarget, InProcessTarget

    work = tempfile.mkdtemp(prefix="bench_e2e_")
    model = os.path.join(work, "model")
    s: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and not a.tiny else "cpu",
               "layers": 2 if a.tiny else a.layers, "requests": a.requests, "concurrency": a.concurrency}
    t = time.perf_counter()
    build_model(model, a.tiny, a.layers)
    s["setup_s"] = time.perf_counter() - t
    peak, bw = device_limits(a.tiny)
    s["gemm_peak_tflops"], s["copy_bandwidth_gbps"] = peak / 1e12, bw / 1e9

    warmup = max(2, 2 * a.concurrency)
    steady = a.warmup_steady if a.warmup_steady is not None else (0 if a.tiny else 2 * a.concurrency)
    data = os.path.join(work, "base.jsonl")
    lens = ["--input-mean", str(a.input_mean), "--input-stdev", str(a.input_mean // 4),
            "--output-mean", str(a.output_mean), "--output-stdev", str(a.output_mean // 4)]
    assert cli(["bench", "prepare-dataset", "--model", model, "--num-requests", str(a.requests + warmup + steady), *lens,
                "--random-seed", str(time.time_ns() % 100000), "--output", data]) == 0
    rows = read_jsonl(data)
    # warm-up prompts are not among the measured ones; the steady part (the load's own lengths) runs last, so
    # the measured run starts from the load's steady state (its mixed-step shapes met, their graphs captured)
    warm, reqs = warm_set(rows, warmup) + rows[warmup:warmup + steady], rows[warmup + steady:]
    s["warmup"] = {"short_requests": warmup, "steady_requests": steady}
    yaml_path = os.path.join(work, "base.yaml")
    with open(yaml_path, "w") as f:
        f.write("kv_cache_config:\n  free_gpu_memory_fraction: 0.5\n")
        if a.overlap != "auto":
            f.write(f"async_scheduling: {'true' if a.overlap == 'on' else 'false'}\n")
        f.write(f"stream_interval: {a.stream_interval}\n")
        if a.prefill_cap is not None:
            f.write(f"max_num_prefill_tokens_with_decode: {a.prefill_cap}\n")
    kwargs = {"kv_cache_config": {"free_gpu_memory_fraction": 0.5}, "stream_interval": a.stream_interval}
    if a.prefill_cap is not None:
        kwargs["max_num_prefill_tokens_with_decode"] = a.prefill_cap
    if a.overlap != "auto":
        kwargs["async_scheduling"] = a.overlap == "on"
    if a.tiny:
        kwargs.update(device="cpu", dtype="float32")

    target = InProcessTarget(model, kwargs)

    def trace_on(t):   # after the warm-up
        s["engine_warmup"] = t.llm.engine.warmup   # the engine's own start-up warm-up (warmup.py), before ours
        s["mixed_graphs_before_measure"] = graph_counts(t.llm.engine)
        t.llm.engine.step_trace = []
    report = run_load(target, warm, reqs, a.concurrency, None, trace_on)
    target.llm.shutdown()   # the engine thread stops: this thread drives the engine below (one driver only)
    engine = target.llm.engine
    trace, engine.step_trace = engine.step_trace, None
    s["steps"] = step_breakdown(trace)
    s["graphs_env"] = {k: os.environ.get(k) for k in ("LORASERVE_MIXED_GRAPHS", "LORASERVE_SAMPLER_GRAPHS")}
    mixed = getattr(engine.runner, "mixed_graphs", None)
    s["mixed_graphs"] = None if mixed is None else {
        "captured": len(mixed.graphs), "replays": mixed.num_replays, "covered": mixed.num_covered,
        "captured_in_measured_run": len(mixed.graphs) - s["mixed_graphs_before_measure"][0],
        "replays_in_measured_run": mixed.num_replays - s["mixed_graphs_before_measure"][1]}
    del trace
    print_breakdown(s["steps"], "in-process run")   # now: a later stage may run out of time
    print(f"in-process: wall {report['duration_s']:.3f} s, TPOT p50 {1e3 * ((report['tpot_s'] or {}).get('p50') or 0):.2f}"
          f" ms, output tok/s {report['output_tokens_per_s']:.0f}, mixed graphs {s['mixed_graphs']}", flush=True)
    stats = engine.stats()
    s["in_process"] = brief(report)
    s["in_process"]["prefix_reused_blocks"] = stats["reused_kv_blocks"]
    s["async_scheduling"] = engine.async_scheduling
    s["stream_interval"] = a.stream_interval
    s["limit"] = physical_limit(engine, reqs, a.concurrency, peak, bw)
    s["wall_s"] = report["duration_s"]
    s["wall_over_limit"] = report["duration_s"] / s["limit"]["limit_s"]
    s["tpot_p50_s"] = (report["tpot_s"] or {}).get("p50")
    s["host"] = host_time_per_decode_step(engine, a.decode_batch, a.input_mean, 32 if a.tiny else 128,
                                          engine.args.vocab_size, a.profile)
    s["host_ms_per_decode_step"] = s["host"]["host_ms"]
    write_outputs(a, s)   # the in-process figures now: a later stage may run out of time
    print_host(s["host"])
    if a.profile_mixed:
        s["mixed_profile"] = profile_mixed_steps(engine, a.decode_batch, a.input_mean, engine.args.vocab_size)
    del engine, mixed   # the LLM stays for the variants below (no second engine in this process)
    if a.grpc_rate:
        s["in_process_poisson"] = brief(run_load(engine_target(target.llm), warm, reqs, None, a.grpc_rate))
        target.llm.shutdown()

    if a.grpc:
        srv = ServerProcess(model, yaml_path, a.tiny, os.path.join(a.out, "server.log"))
        try:
            srv.wait_serving()
            s["grpc"] = brief(run_load(GrpcTarget(srv.address), warm, reqs, a.concurrency, None))
            s["grpc_over_inprocess_tok_s"] = (s["grpc"]["output_tokens_per_s"] /
                                              s["in_process"]["output_tokens_per_s"])
            if a.grpc_rate:
                s["grpc_poisson"] = brief(run_load(GrpcTarget(srv.address), warm, reqs, None, a.grpc_rate))
                s["grpc_poisson_over_inprocess_tok_s"] = (s["grpc_poisson"]["output_tokens_per_s"] /
                                                          s["in_process_poisson"]["output_tokens_per_s"])
        except Exception as exc:  # noqa: BLE001 - keep the in-process figures
            s["grpc_error"] = f"{type(exc).__name__}: {exc}"
            print(f"gRPC run failed: {s['grpc_error']}", file=sys.stderr)
        finally:
            srv.stop()
        free_memory()

    write_outputs(a, s)   # the headline figures now; the variants below may run out of time
    print_headline(s)
    variants = [(f"prefill cap {c}", prefill_cap(int(c)))
                for c in (a.sweep_prefill_cap.split(",") if a.sweep_prefill_cap else [])]
    runner = target.llm.engine.runner
    if a.sweep_previous_defaults:
        variants.append(("previous defaults (prefill cap 512, mixed graphs captured at once)",
                         combined(prefill_cap(512), capture_after(1))))
    if a.sweep_capture_after and runner.mixed_graphs is not None:
        variants.append((f"mixed graphs captured after {a.sweep_capture_after} sightings", capture_after(a.sweep_capture_after)))
    if a.sweep_mixed_graphs:   # the other side of the graphs: before/after in one run, on the same engine
        if runner.mixed_graphs is not None or getattr(runner.graph_runner, "sampler_graphs", None) is not None:
            variants.append(("mixed + sampler graphs off", graphs_off))
        else:
            print("--sweep-mixed-graphs: the engine was built without them (LORASERVE_MIXED_GRAPHS=0 or "
                  "LORASERVE_SAMPLER_GRAPHS=0): no variant", flush=True)
    for label, apply in variants:
        try:
            s.setdefault("variants", {})[label] = variant_run(label, target.llm, apply, warm, reqs, a.concurrency,
                                                              s["limit"]["limit_s"], a.decode_batch, a.input_mean,
                                                              a.variant_host_steps)
        except Exception as exc:  # noqa: BLE001 - keep the figures so far
            s.setdefault("variants", {})[label] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"variant {label} failed: {exc!r}", file=sys.stderr, flush=True)
            break
        write_outputs(a, s)
    target.llm.shutdown()
    del target, runner
    free_memory()
    if a.with_lora:
        s["lora_flow"] = lora_flow(a, model, work)
    write_outputs(a, s)
    for label, v in s.get("variants", {}).items():
        if "error" in v:
            print(f"variant {label}: {v['error']}")
            continue
        host = f"host ms per decode step {v['host']['host_ms']:.3f}, " if v.get("host") else ""
        print(f"variant {label}: wall/limit {v['wall_over_limit']:.2f}, TPOT p50 {1e3 * v['tpot_p50_s']:.2f} ms, "
              f"{host}output tok/s {v['output_tokens_per_s']:.0f}")
    if a.json:
        print(f"wrote {a.json}")
    return 0 if s["in_process"]["num_failed"] == 0 else 1


def write_outputs(a, s: dict) -> None:
    write_json(os.path.join(a.out, "summary.json"), s)
    keys = ("wall_over_limit", "tpot_p50_s", "host_ms_per_decode_step", "grpc_over_inprocess_tok_s")
    write_json(a.json, {**{k: s.get(k) for k in keys}, "details": s})


def print_headline(s: dict) -> None:
    lim, ip = s["limit"], s["in_process"]
    print("=" * 72)
    if "steps" in s:
        print_breakdown(s["steps"], "in-process run")
    print(f"device {s['gpu']}: GEMM peak {s['gemm_peak_tflops']:.1f} TFLOP/s, copy {s['copy_bandwidth_gbps']:.0f} GB/s")
    print(f"load: {ip['num_requests']} requests ({ip['total_input_tokens']} prompt + {ip['total_output_tokens']} "
          f"output tokens), concurrency {s['concurrency']}, async_scheduling={s['async_scheduling']}")
    print(f"physical limit: {lim['limit_s']:.3f} s = prefill {lim['prefill_s']:.3f} s ({lim['prefill_tflop']:.1f} TFLOP)"
          f" + decode {lim['decode_s']:.3f} s ({lim['decode_steps']} steps, {lim['decode_gb']:.1f} GB)")
    print(f"measured wall:  {s['wall_s']:.3f} s   wall / limit = {s['wall_over_limit']:.2f}")
    print(f"output tok/s {ip['output_tokens_per_s']:.0f}   TPOT p50 {1e3 * (s['tpot_p50_s'] or 0):.2f} ms   "
          f"prefix-reused blocks {ip['prefix_reused_blocks']}")
    h = s["host"]
    print(f"decode step at batch {h['batch']}: {h['step_ms']:.3f} ms wall, HOST {h['host_ms']:.3f} ms per decode step "
          f"(target <= 1) = schedule+inputs+launch {h.get('launch_ms', 0):.3f} ms + post-processing "
          f"{h.get('post_ms', 0):.3f} ms; messages built off the engine thread {h.get('build_ms', 0):.3f} ms")
    print(f"  ({h.get('definition', '')})")
    if s.get("engine_warmup"):
        print(f"engine start-up warm-up: {s['engine_warmup']}")
    if "grpc_error" in s:
        print(f"gRPC run failed: {s['grpc_error']}")
    if "grpc" in s:
        print(f"gRPC (same load, loopback server): {s['grpc']['output_tokens_per_s']:.0f} output tok/s = "
              f"{s['grpc_over_inprocess_tok_s']:.3f} x in-process")
    if "grpc_poisson" in s:
        print(f"gRPC Poisson: {s['grpc_poisson_over_inprocess_tok_s']:.3f} x in-process Poisson")
    print("=" * 72)


# ---- the LoRA flow (adapters vs base, trtllm-bench style) ------------------------------------------
def lora_summary(report: dict) -> dict:
    out = brief(report)
    out["adapter_hit_rate"] = report["adapter_cache"]["hit_rate"]
    return out


def lora_flow(a, model: str, work: str) -> dict:
    """N random rank-r adapters on q/k/v/o_proj with Zipf popularity: in-process with adapters, the same
    requests without, and through a real gRPC server at Poisson --rate."""
    import torch

    from loraserve.cli import main as cli
    from loraserve.inference.bench.adapters import make_random_adapters
    from loraserve.inference.bench.dataset import read_jsonl
    from loraserve.inference.bench.report import build_report
    from loraserve.inference.bench.runner import GrpcTarget, InProcessTarget, run_benchmark

    lora_dir = os.path.join(work, "loras")
    make_random_adapters(model, lora_dir, a.adapters, a.rank, dtype=torch.float32 if a.tiny else torch.bfloat16)
    data = os.path.join(work, "lora.jsonl")
    lens = ["--input-mean", str(a.input_mean), "--input-stdev", str(a.input_mean // 4),
            "--output-mean", str(a.output_mean), "--output-stdev", str(a.output_mean // 4)]
    assert cli(["bench", "prepare-dataset", "--model", model, "--num-requests", str(a.requests + 2), *lens,
                "--rand-task-id", "0", str(a.adapters - 1), "--lora-dir", lora_dir, "--popularity", "zipf",
                "--output", data]) == 0
    rows = read_jsonl(data)
    warm, reqs = rows[:2], rows[2:]
    base = [r.__class__.from_json({k: v for k, v in r.to_json().items() if k != "lora_request"}) for r in rows]
    lora_cfg = {"max_lora_rank": a.rank, "max_loras": a.gpu_slots, "max_cpu_loras": a.adapters}
    kwargs = {"lora_config": lora_cfg, "kv_cache_config": {"free_gpu_memory_fraction": 0.5}}
    if a.tiny:
        kwargs.update(device="cpu", dtype="float32")
    out = {"adapters": a.adapters, "rank": a.rank, "gpu_slots": a.gpu_slots}
    out["lora"] = lora_summary(run_load(InProcessTarget(model, kwargs), warm, reqs, a.concurrency, None))
    free_memory()
    out["base"] = lora_summary(run_load(InProcessTarget(model, kwargs), base[:2], base[2:], a.concurrency, None))
    free_memory()
    out["lora_vs_base_output_tok_s"] = out["lora"]["output_tokens_per_s"] / out["base"]["output_tokens_per_s"]
    yaml_path = os.path.join(work, "lora.yaml")
    with open(yaml_path, "w") as f:
        json.dump(kwargs, f)   # JSON is YAML
    srv = ServerProcess(model, yaml_path, a.tiny, os.path.join(a.out, "server_lora.log"),
                        ["--allowed-lora-dir", lora_dir])
    try:
        srv.wait_serving()

        async def grpc_run():
            target = GrpcTarget(srv.address)
            await target.start()
            try:
                return await run_benchmark(target, reqs[:a.grpc_requests], request_rate=a.rate, warmup=0,
                                           progress=False)
            finally:
                await target.close()
        out["grpc"] = lora_summary(build_report(asyncio.run(grpc_run()), include_requests=False))
    except Exception as exc:  # noqa: BLE001 - keep the in-process numbers
        out["grpc"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        srv.stop()
    return out


if __name__ == "__main__":
    sys.exit(main())
