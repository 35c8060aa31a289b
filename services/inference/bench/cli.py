"""`loraserve bench`: trtllm-bench style LoRA benchmarks.

    loraserve bench prepare-dataset --num-requests 512 --input-mean 128 --output-mean 64 \\
        --rand-task-id 0 7 --lora-dir /loras --popularity zipf --output data.jsonl
    loraserve bench make-adapters --count 8 --rank 16 --output /loras     # random, shaped for the model
    loraserve bench throughput --dataset data.jsonl --concurrency 32 \\
        [--address 127.0.0.1:50051 [--registry 127.0.0.1:50052] | --openai-url http://127.0.0.1:8000/v1
         | --model PATH --extra_llm_api_options lora.yaml] \\
        [--request-rate 20] [--streaming] [--goodput ttft:200 tpot:50] \\
        [--percentile-metrics ttft,tpot,itl,e2el] [--metric-percentiles 50,90,99] \\
        [--report-json report.json] [--plot latency.png]

Without --address / --openai-url the engine runs in this process (loraserve.LLM), like trtllm-bench.
Against a server started as the README says (no --allowed-lora-dir), a --lora-dir dataset needs
--registry: its adapters are pushed there and the requests name them.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (prepare-dataset, throughput)",
                                  description="trtllm-bench style benchmarks of LoRA serving")
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    _add_prepare(sub)
    _add_throughput(sub)
    _add_make_adapters(sub)


# ---- prepare-dataset -----------------------------------------------------------------------------
def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare-dataset", help="write synthetic LoRA requests as JSON lines (trtllm-bench format)")
    p.add_argument("--model", default=None, help="model directory for the tokenizer's vocabulary "
                                                 "(default: the embedded default model)")
    p.add_argument("--num-requests", "--num_requests", dest="num_requests", type=int, required=True)
    for side, default in (("input", 128), ("output", 64)):
        g = p.add_argument_group(f"{side} lengths: normal(mean, stdev) or uniform [min, max]")
        g.add_argument(f"--{side}-mean", type=float, default=None, help=f"default {default} when no min/max")
        g.add_argument(f"--{side}-stdev", type=float, default=0.0)
        g.add_argument(f"--{side}-min", type=int, default=None)
        g.add_argument(f"--{side}-max", type=int, default=None)
    a = p.add_argument_group("adapters")
    a.add_argument("--rand-task-id", "--rand_task_id", dest="rand_task_id", type=int, nargs=2, metavar=("MIN", "MAX"),
                   default=None, help="draw each request's adapter task id from [MIN, MAX]")
    a.add_argument("--task-id", "--task_id", dest="task_id", type=int, default=-1,
                   help="one adapter task id for every request (-1: none)")
    a.add_argument("--lora-dir", "--lora_dir", dest="lora_dir", default=None,
                   help="adapter k is <lora-dir>/<k> (TensorRT-LLM layout); rows get a lora_request")
    a.add_argument("--adapters", nargs="+", default=None, metavar="NAME[:REF]",
                   help="registry adapters; task id k selects the k-th (default ids: all of them)")
    a.add_argument("--popularity", choices=["uniform", "zipf"], default="uniform")
    a.add_argument("--zipf-alpha", dest="zipf_s", type=float, default=1.0, help="Zipf exponent s (default 1.0)")
    p.add_argument("--random-seed", "--seed", dest="seed", type=int, default=0)
    p.add_argument("--output", "-o", default="-", help="JSON lines file ('-': stdout)")
    p.set_defaults(func=_prepare)


def _prepare(args) -> int:
    from loraserve.inference.llm import default_model_path

    from .dataset import DatasetSpec, generate, model_vocab, write_jsonl

    model = args.model or default_model_path()
    try:
        vocab, special, max_pos = model_vocab(model)
        if args.input_mean is None and args.input_min is None:
            args.input_mean = 128
        if args.output_mean is None and args.output_min is None:
            args.output_mean = 64
        spec = DatasetSpec(
            num_requests=args.num_requests, input_mean=args.input_mean, input_stdev=args.input_stdev,
            input_min=args.input_min, input_max=args.input_max, output_mean=args.output_mean,
            output_stdev=args.output_stdev, output_min=args.output_min, output_max=args.output_max,
            rand_task_id=tuple(args.rand_task_id) if args.rand_task_id else None, task_id=args.task_id,
            lora_dir=args.lora_dir, adapters=args.adapters, popularity=args.popularity, zipf_s=args.zipf_s,
            seed=args.seed)
        requests = generate(spec, vocab, special, max_input_len=(max_pos - 1) if max_pos else None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output == "-":
        write_jsonl(requests, sys.stdout)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            n = write_jsonl(requests, f)
        print(f"wrote {n} requests to {args.output}", file=sys.stderr)
    return 0


# ---- make-adapters -------------------------------------------------------------------------------
def _add_make_adapters(sub) -> None:
    p = sub.add_parser("make-adapters", help="write random PEFT adapters shaped for a model (<out>/<k>)")
    p.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--modules", nargs="+", default=None, help="HF module names (default q/k/v/o_proj)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", required=True, help="directory; adapter k goes to <output>/<k>")
    p.set_defaults(func=_make_adapters)


def _make_adapters(args) -> int:
    from loraserve.inference.llm import default_model_path

    from .adapters import DEFAULT_MODULES, make_random_adapters

    try:
        paths = make_random_adapters(args.model or default_model_path(), args.output, args.count, args.rank,
                                     tuple(args.modules or DEFAULT_MODULES), seed=args.seed)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} adapters (rank {args.rank}) to {args.output}/0..{len(paths) - 1}")
    return 0


# ---- throughput ----------------------------------------------------------------------------------
def _add_throughput(sub) -> None:
    p = sub.add_parser("throughput", help="replay a dataset and report throughput, TTFT, TPOT, adapter cache hits")
    p.add_argument("--dataset", required=True, help="JSON lines from prepare-dataset (or trtllm-bench's)")
    p.add_argument("--num-requests", "--num_requests", dest="num_requests", type=int, default=None,
                   help="use the first N requests (default: all)")
    t = p.add_argument_group("target: a running server (--address) or an in-process engine (default)")
    t.add_argument("--address", default=None, help="gRPC inference server host:port")
    t.add_argument("--openai-url", dest="openai_url", default=None,
                   help="OpenAI-compatible HTTP front, e.g. http://127.0.0.1:8000/v1 (/v1/completions)")
    t.add_argument("--token", default=os.environ.get("LORASERVE_AUTH_TOKEN"),
                   help="bearer token for --address / --openai-url (env LORASERVE_AUTH_TOKEN)")
    t.add_argument("--registry", default=None, metavar="HOST:PORT",
                   help="with --address/--openai-url: push the dataset's lora_path adapters to this registry and "
                        "send registry references (needed unless the server runs with --allowed-lora-dir)")
    t.add_argument("--registry-token", dest="registry_token", default=os.environ.get("LORASERVE_REGISTRY_TOKEN"),
                   help="write token of --registry (env LORASERVE_REGISTRY_TOKEN)")
    t.add_argument("--model", default=None, help="in-process: model directory (default: the embedded model)")
    t.add_argument("--extra_llm_api_options", "--extra-llm-api-options", dest="extra", default=None,
                   help="in-process: TensorRT-LLM style YAML of engine options (lora_config, ...)")
    t.add_argument("--dtype", default=None)
    t.add_argument("--device", default=None)
    t.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int, default=None)
    l = p.add_argument_group("load")
    l.add_argument("--concurrency", type=int, default=None, help="max requests in flight (default: no cap)")
    l.add_argument("--request-rate", dest="request_rate", type=float, default=None,
                   help="Poisson arrivals at this many req/s (default: all at once)")
    l.add_argument("--warmup", type=int, default=2, help="requests run one by one before measuring (default 2)")
    l.add_argument("--respect-eos", action="store_true",
                   help="stop at EOS (default: ignore EOS so each request makes exactly output_tokens)")
    l.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    l.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True,
                   help="stream tokens and time TTFT/TPOT/ITL (default); --no-streaming: whole responses, E2E only")
    m = p.add_argument_group("metrics (vLLM's benchmark names)")
    m.add_argument("--percentile-metrics", dest="percentile_metrics", default="ttft,tpot,itl,e2el",
                   help="comma-separated metrics to report percentiles of: ttft, tpot, itl, e2el")
    m.add_argument("--metric-percentiles", dest="metric_percentiles", default="50,90,99",
                   help="comma-separated percentiles, e.g. 25,50,75,99.9")
    m.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. ttft:200 tpot:50 e2el:2000 (ms): requests/s meeting all of them")
    o = p.add_argument_group("output")
    o.add_argument("--report-json", "--report_json", dest="report_json", default=None)
    o.add_argument("--plot", default=None, metavar="PNG",
                   help="PNG: latency CDF per adapter-popularity bucket and throughput over time")
    o.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_throughput)


def _in_process_kwargs(args, requests) -> dict:
    from loraserve.config import load_extra_llm_api_options

    kwargs = load_extra_llm_api_options(args.extra) if args.extra else {}
    for key in ("dtype", "device", "max_batch_size"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if "lora_config" not in kwargs and any(r.lora_request for r in requests):
        kwargs["lora_config"] = {}  # the dataset uses adapters: enable LoRA with the defaults (max rank 64)
    return kwargs


def _throughput(args) -> int:
    from .dataset import read_jsonl
    from .remote import LORA_PATH_HINT, OpenAITarget, push_dataset_adapters
    from .report import METRICS, build_report, format_report, parse_slos, plot_latency, write_json
    from .runner import GrpcTarget, InProcessTarget, run_benchmark

    try:
        if args.address and args.openai_url:
            raise ValueError("give --address (gRPC) or --openai-url (HTTP), not both")
        metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"--percentile-metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
        try:
            percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"--metric-percentiles {args.metric_percentiles!r}: numbers, comma-separated") from None
        if not all(0 < p <= 100 for p in percentiles):
            raise ValueError("--metric-percentiles must lie in (0, 100]")
        slos = parse_slos(args.goodput)
        if slos and not args.streaming and set(slos) & {"ttft", "tpot"}:
            raise ValueError("--goodput ttft/tpot need --streaming (without it only e2el is measured)")
        requests = read_jsonl(args.dataset, args.num_requests)
        remote = bool(args.address or args.openai_url)
        if remote and args.registry:
            requests, refs = push_dataset_adapters(requests, args.registry, args.registry_token)
            if refs:
                print(f"pushed {len(refs)} adapters to {args.registry}: {', '.join(sorted(refs.values()))}",
                      file=sys.stderr)
        if args.address:
            target = GrpcTarget(args.address, args.token, streaming=args.streaming)
        elif args.openai_url:
            target = OpenAITarget(args.openai_url, args.token, streaming=args.streaming)
        else:
            target = InProcessTarget(args.model, _in_process_kwargs(args, requests), streaming=args.streaming)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the registry refused a push (gRPC error), ...
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"error: pushing the dataset's adapters to {args.registry}: {type(exc).__name__}: {details}",
              file=sys.stderr)
        return 1
    lora_path_rows = remote and any(r.lora_request and r.lora_request.get("lora_path") for r in requests)

    async def main():
        await target.start()
        try:
            return await run_benchmark(target, requests, concurrency=args.concurrency,
                                       request_rate=args.request_rate, warmup=args.warmup,
                                       ignore_eos=not args.respect_eos, progress=args.progress, seed=args.seed)
        finally:
            await target.close()

    try:
        result = asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - a target that cannot start (bad model, server down)
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"error: {type(exc).__name__}: {details}", file=sys.stderr)
        if lora_path_rows and ("PERMISSION_DENIED" in f"{exc!r} {details}" or "allowed" in str(details)):
            print(f"hint: {LORA_PATH_HINT}", file=sys.stderr)
        return 1
    report = build_report(result, percentiles=percentiles, percentile_metrics=metrics, slos=slos,
                          dataset=os.path.abspath(args.dataset))
    print(format_report(report))
    if lora_path_rows and report["num_failed"] and any("allowed" in e or "PERMISSION" in e for e in report["errors"]):
        print(f"hint: {LORA_PATH_HINT}", file=sys.stderr)
    if args.report_json:
        write_json(report, args.report_json)
        print(f"report: {args.report_json}")
    if args.plot:
        plot_latency(report, args.plot)
        print(f"plot: {args.plot}")
    return 0 if report["num_completed"] == report["num_requests"] else 1
