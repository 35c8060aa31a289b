"""End-to-end LoRA serving benchmark with `loraserve bench` (GPU), trtllm-bench style.

On a Llama-3-8B-shaped checkpoint with random bf16 weights (built on the spot: nothing can be
downloaded), with N random rank-r adapters on q/k/v/o_proj (TensorRT-LLM layout <dir>/<k>):

  1. prepare-dataset: R requests, input ~ normal(512, 128), output ~ normal(128, 32),
     adapter task ids in [0, N-1] with Zipf popularity (s = 1.0);
  2. throughput, in-process, concurrency C, with the adapters       -> lora_report.json, lora_latency.png
  3. throughput, in-process, concurrency C, same requests, no adapter -> base_report.json
  4. throughput against a real gRPC server (loraserve serve in this process's background
     thread), Poisson arrivals at --rate req/s                        -> grpc_report.json, grpc_latency.png

    python3 benchmarks/bench_e2e.py --out OUTDIR [--layers 32] [--requests 512] [--adapters 32]
    python3 benchmarks/bench_e2e.py --out /tmp/x --tiny      # the same flow on CPU, tiny model
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


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


def summary_of(report: dict) -> dict:
    keys = ("num_requests", "num_completed", "num_failed", "duration_s", "total_input_tokens", "total_output_tokens",
            "request_throughput_rps", "output_tokens_per_s", "total_tokens_per_s", "ttft_s", "tpot_s",
            "e2e_latency_s", "num_adapters", "concurrency", "request_rate")
    out = {k: report.get(k) for k in keys}
    out["adapter_hit_rate"] = report["adapter_cache"]["hit_rate"]
    out["adapter_cache"] = {t: {k: v for k, v in c.items() if k != "bytes_loaded"}
                            for t, c in report["adapter_cache"]["tiers"].items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU (a dry run of the flow)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gpu-slots", type=int, default=16, help="lora_config.max_loras (device tier)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rate", type=float, default=16.0, help="request rate of the gRPC run (req/s)")
    ap.add_argument("--grpc-requests", type=int, default=256)
    ap.add_argument("--skip-grpc", action="store_true")
    a = ap.parse_args()
    if a.tiny:
        a.requests, a.adapters, a.rank, a.gpu_slots, a.concurrency, a.grpc_requests = 24, 4, 4, 2, 8, 12
    os.makedirs(a.out, exist_ok=True)

    import torch

    from loraserve.cli import main as cli
    from loraserve.inference.bench.adapters import make_random_adapters

    work = tempfile.mkdtemp(prefix="bench_e2e_")
    model, lora_dir = os.path.join(work, "model"), os.path.join(work, "loras")
    summary: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "layers": a.layers if not a.tiny else 2, "adapters": a.adapters, "rank": a.rank,
                     "gpu_slots": a.gpu_slots}
    t = time.perf_counter()
    build_model(model, a.tiny, a.layers)
    make_random_adapters(model, lora_dir, a.adapters, a.rank, dtype=torch.bfloat16 if not a.tiny else torch.float32)
    summary["setup_s"] = time.perf_counter() - t

    lens = (["--input-mean", "24", "--input-stdev", "6", "--output-mean", "8", "--output-stdev", "2"] if a.tiny else
            ["--input-mean", "512", "--input-stdev", "128", "--output-mean", "128", "--output-stdev", "32"])
    data = os.path.join(work, "lora.jsonl")
    assert cli(["bench", "prepare-dataset", "--model", model, "--num-requests", str(a.requests), *lens,
                "--rand-task-id", "0", str(a.adapters - 1), "--lora-dir", lora_dir, "--popularity", "zipf",
                "--output", data]) == 0
    base_data = os.path.join(work, "base.jsonl")
    with open(data) as src, open(base_data, "w") as dst:
        for line in src:
            d = json.loads(line)
            d.pop("lora_request", None)
            dst.write(json.dumps(d) + "\n")
    yaml_path = os.path.join(work, "extra.yaml")
    with open(yaml_path, "w") as f:
        f.write(f"lora_config:\n  max_lora_rank: {a.rank}\n  max_loras: {a.gpu_slots}\n  max_cpu_loras: {a.adapters}\n"
                "kv_cache_config:\n  free_gpu_memory_fraction: 0.5\n")
    common = ["--model", model, "--extra_llm_api_options", yaml_path, "--concurrency", str(a.concurrency),
              "--warmup", "2", "--no-progress"]
    if a.tiny:
        common += ["--device", "cpu", "--dtype", "float32"]

    for name, dataset, plot in (("lora", data, True), ("base", base_data, False)):
        report = os.path.join(a.out, f"{name}_report.json")
        args = ["bench", "throughput", "--dataset", dataset, *common, "--report-json", report]
        if plot:
            args += ["--plot", os.path.join(a.out, f"{name}_latency.png")]
        rc = cli(args)
        with open(report) as f:
            summary[name] = summary_of(json.load(f))
        summary[name]["exit_code"] = rc
        free_memory()
    summary["lora_vs_base_output_tok_s"] = (summary["lora"]["output_tokens_per_s"] /
                                            summary["base"]["output_tokens_per_s"])

    write_summary(a.out, summary)
    if not a.skip_grpc:
        try:
            summary["grpc"] = grpc_run(a, model, lora_dir, data, work)
        except Exception as exc:  # noqa: BLE001 - keep the in-process numbers
            summary["grpc"] = {"error": f"{type(exc).__name__}: {exc}"}

    write_summary(a.out, summary)
    print(json.dumps(summary, indent=2))
    return 0


def write_summary(out: str, summary: dict) -> None:
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def grpc_run(a, model: str, lora_dir: str, data: str, work: str) -> dict:
    """A real gRPC server in a background thread, driven by `bench throughput --address`."""
    from loraserve.cli import main as cli
    from loraserve.inference.serve_config import ServeConfig
    from loraserve.inference.testing import RunningInference

    llm_kwargs = {"lora_config": {"max_lora_rank": a.rank, "max_loras": a.gpu_slots, "max_cpu_loras": a.adapters},
                  "kv_cache_config": {"free_gpu_memory_fraction": 0.5}}
    if a.tiny:
        llm_kwargs.update(device="cpu", dtype="float32")
    cfg = ServeConfig(model=model, port=0, registry_address=None, allowed_lora_dirs=[lora_dir],
                      adapter_cache_dir=os.path.join(work, "cache"), llm_kwargs=llm_kwargs)
    report = os.path.join(a.out, "grpc_report.json")
    with RunningInference(cfg) as srv:
        rc = cli(["bench", "throughput", "--dataset", data, "--address", srv.address, "--num-requests",
                  str(a.grpc_requests), "--request-rate", str(a.rate), "--warmup", "2", "--no-progress",
                  "--report-json", report, "--plot", os.path.join(a.out, "grpc_latency.png")])
    with open(report) as f:
        out = summary_of(json.load(f))
    out["exit_code"] = rc
    return out


if __name__ == "__main__":
    sys.exit(main())
