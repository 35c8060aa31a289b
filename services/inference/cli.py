"""`loraserve serve` (the inference service) and `loraserve generate` (a streaming client)."""
from __future__ import annotations

import asyncio
import os
import sys


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the inference gRPC service",
                              description="Serve a base model with per-request LoRA adapters over gRPC. "
                                          "With no model, serves the embedded default model.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="HF model directory (default: embedded model)")
    p.add_argument("--model", help="same as MODEL")
    from loraserve.cli import add_log_format

    add_log_format(p)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 50051)")
    p.add_argument("--registry", dest="registry_address", default=None,
                   help="registry address host:port (default 127.0.0.1:50052; 'none' to disable)")
    p.add_argument("--registry-token", dest="registry_token", default=os.environ.get("LORASERVE_REGISTRY_TOKEN"),
                   help="bearer token for the registry (env LORASERVE_REGISTRY_TOKEN)")
    p.add_argument("--extra_llm_api_options", "--extra-llm-api-options", dest="extra", action="append", default=[],
                   help="TensorRT-LLM style YAML of engine options (lora_config, peft_cache_config, ...)")
    p.add_argument("--config", action="append", default=[], help="YAML with loraserve's own keys (and engine keys)")
    p.add_argument("--metrics-port", dest="metrics_port", type=int, default=None, help="Prometheus /metrics port")
    p.add_argument("--openai-port", dest="openai_port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API on this port")
    p.add_argument("--allowed-lora-dir", dest="allowed_lora_dirs", action="append", default=None,
                   help="directory under which lora_request.lora_path may point (repeatable)")
    p.add_argument("--adapter-cache-dir", dest="adapter_cache_dir", default=None,
                   help="local disk cache of downloaded adapters (default var/adapter-cache)")
    p.add_argument("--max-queue-size", dest="max_queue_size", type=int, default=None)
    p.add_argument("--auth-token", dest="auth_token", default=os.environ.get("LORASERVE_AUTH_TOKEN"),
                   help="require this bearer token on inference calls (env LORASERVE_AUTH_TOKEN)")
    p.add_argument("--tls-cert", dest="tls_cert_file", default=None, help="serve gRPC over TLS: certificate (PEM)")
    p.add_argument("--tls-key", dest="tls_key_file", default=None, help="serve gRPC over TLS: private key (PEM)")
    p.add_argument("--registry-ca", dest="registry_ca_file", default=None,
                   help="connect to the registry over TLS, trusting this CA certificate (PEM)")
    p.add_argument("--dtype", default=None, help="auto | float32 | float16 | bfloat16")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: FP8 e4m3 base weights (per-channel scales); = quant_config: {quant_algo: FP8}")
    p.add_argument("--kv_cache_dtype", "--kv-cache-dtype", dest="kv_cache_dtype", choices=["auto", "fp8"], default=None,
                   help="fp8: FP8 e4m3 KV cache (half the bytes per token); = quant_config: {kv_cache_quant_algo: FP8}")
    p.add_argument("--max_batch_size", "--max-batch-size", dest="max_batch_size", type=int, default=None)
    p.add_argument("--max_num_tokens", "--max-num-tokens", dest="max_num_tokens", type=int, default=None)
    p.add_argument("--stream_interval", "--stream-interval", dest="stream_interval", type=int, default=None,
                   help="stream a running request's tokens every N steps (first and last at once); default 1")
    p.add_argument("--tensor_parallel_size", "--tensor-parallel-size", "--tp", dest="tensor_parallel_size", type=int,
                   default=None, help="shard the model over N devices of this host (workers started by the server)")
    p.set_defaults(func=_serve)

    g = subparsers.add_parser("generate", help="stream a completion from a running inference service")
    g.add_argument("prompt", help="prompt text ('-' reads stdin)")
    g.add_argument("--server", default="127.0.0.1:50051")
    g.add_argument("--adapter", default=None, help="registry adapter: name, name:VERSION or name:ALIAS")
    g.add_argument("--lora-path", default=None, help="TensorRT-LLM lora_path (under a server-allowed dir)")
    g.add_argument("--lora-name", default="lora")
    g.add_argument("--lora-int-id", type=int, default=0)
    g.add_argument("--lora-ckpt-source", default="hf", choices=["hf", "nemo"])
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="print each token's logprob and the N most likely alternatives (0: the chosen one only) "
                        "to stderr, as vLLM's logprobs=N")
    g.add_argument("--token", default=os.environ.get("LORASERVE_AUTH_TOKEN"))
    g.add_argument("--ca-cert", default=None, help="connect over TLS, trusting this CA certificate (PEM)")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("--stats", action="store_true", help="print token counts and timings at the end")
    g.set_defaults(func=_generate)


def _serve(args) -> int:
    from loraserve.options import ConfigError
    from loraserve.ports import PortInUseError

    from .serve_config import load_serve_config
    from .server import serve

    no_registry = args.registry_address in ("none", "")
    overrides = dict(
        model=args.model or args.model_pos, host=args.host, port=args.port,
        registry_address=None if no_registry else args.registry_address, registry_token=args.registry_token,
        metrics_port=args.metrics_port, openai_port=args.openai_port, allowed_lora_dirs=args.allowed_lora_dirs,
        adapter_cache_dir=args.adapter_cache_dir, max_queue_size=args.max_queue_size, auth_token=args.auth_token,
        tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file, registry_ca_file=args.registry_ca_file,
        dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
        tensor_parallel_size=args.tensor_parallel_size, quant_config=_quant_flags(args),
        stream_interval=args.stream_interval)
    try:
        cfg = load_serve_config(args.extra + args.config, overrides)
    except ConfigError as exc:  # before any port is bound or the model loads
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if no_registry:  # an explicit "none" wins over files (None overrides mean "not given")
        cfg.registry_address = None
    try:
        return asyncio.run(serve(cfg))
    except PortInUseError as exc:
        print(f"error: {exc.strerror}", file=sys.stderr)
        return 1


def _quant_flags(args) -> dict | None:
    """--quantization / --kv_cache_dtype as a quant_config mapping (None: neither given, files decide)."""
    if args.quantization is None and args.kv_cache_dtype in (None, "auto"):
        return None
    return {"quant_algo": "FP8" if args.quantization == "fp8" else None,
            "kv_cache_quant_algo": "FP8" if args.kv_cache_dtype == "fp8" else None}


def _generate(args) -> int:
    import grpc

    from loraserve.v1 import inference_pb2 as pb
    from loraserve.v1 import inference_pb2_grpc as pb_grpc

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sp = pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop)
    for name in ("top_p", "top_k", "seed", "logprobs"):
        if getattr(args, name) is not None:
            setattr(sp, name, getattr(args, name))
    req = pb.GenerateRequest(text=prompt, sampling_params=sp)
    if args.adapter:
        name, _, ref = args.adapter.partition(":")
        req.adapter_ref.name = name
        if ref.isdigit():
            req.adapter_ref.version = int(ref)
        elif ref:
            req.adapter_ref.alias = ref
    elif args.lora_path:
        req.lora_request.CopyFrom(pb.LoraRequest(lora_name=args.lora_name, lora_int_id=args.lora_int_id,
                                                 lora_path=args.lora_path, lora_ckpt_source=args.lora_ckpt_source))
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    if args.ca_cert:
        with open(args.ca_cert, "rb") as f:
            channel = grpc.secure_channel(args.server, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(args.server)
    with channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        steps = []  # (token id, logprob, {alternative id: logprob}) with --logprobs
        try:
            for msg in stub.Generate(req, metadata=metadata, timeout=args.timeout):
                if msg.WhichOneof("response") == "chunk":
                    sys.stdout.write(msg.chunk.text)
                    sys.stdout.flush()
                    tops = list(msg.chunk.top_logprobs) or [None] * len(msg.chunk.logprobs)
                    steps += [(t, lp, dict(zip(top.token_ids, top.logprobs)) if top else {})
                              for t, lp, top in zip(msg.chunk.token_ids, msg.chunk.logprobs, tops)]
                else:
                    c = msg.complete
                    sys.stdout.write("\n")
                    for token, lp, alts in steps:
                        alt = " ".join(f"{i}:{v:.3f}" for i, v in alts.items())
                        print(f"token {token} logprob {lp:.4f}" + (f"  top {alt}" if alt else ""), file=sys.stderr)
                    if args.stats:
                        print(f"[{pb.FinishReason.Name(c.finish_reason)} prompt={c.prompt_tokens} "
                              f"completion={c.completion_tokens} ttft={c.ttft_s * 1000:.1f}ms "
                              f"total={c.total_time_s * 1000:.1f}ms]", file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0
