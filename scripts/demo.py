"""`make run`: the local stack on the embedded default model, with the demo adapters.

Starts the registry (127.0.0.1:50052) and the inference service (127.0.0.1:50051, metrics on
:9400, OpenAI HTTP on :8000) as child processes, pushes models/adapters/* to the registry,
streams one prompt without and with each adapter so you can see the adapter change the
output, prints how to call the services yourself (grpcurl, Python), and keeps serving until
Ctrl-C. `--once` stops after the demo (used by the tests). Other ports: `make run
INFERENCE_PORT=... REGISTRY_PORT=... METRICS_PORT=... OPENAI_PORT=...` (or --port,
--registry-port, --metrics-port, --openai-port here); a taken port stops the service with an
error naming it.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "def read_config(path):\n"


def wait_serving(address: str, service: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with code {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{service} at {address} not serving after {timeout:.0f} s")


def stream(stub, pb, adapter: str | None, max_tokens: int) -> str:
    req = pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0))
    if adapter:
        req.adapter_ref.name = adapter
    text = ""
    for msg in stub.Generate(req, timeout=120):
        if msg.WhichOneof("response") == "chunk":
            text += msg.chunk.text
            sys.stdout.write(msg.chunk.text)
            sys.stdout.flush()
    print()
    return text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--once", action="store_true", help="exit after the demo instead of serving")
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--registry-port", type=int, default=50052)
    ap.add_argument("--metrics-port", type=int, default=9400)
    ap.add_argument("--openai-port", type=int, default=8000)
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "var", "demo"))
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()

    from loraserve.registry.client import RegistryClient
    from loraserve.v1 import inference_pb2 as pb
    from loraserve.v1 import inference_pb2_grpc as pb_grpc

    os.makedirs(a.data_dir, exist_ok=True)
    exe = [sys.executable, "-m", "loraserve.cli"]
    reg_addr, inf_addr = f"127.0.0.1:{a.registry_port}", f"127.0.0.1:{a.port}"
    logs = {n: open(os.path.join(a.data_dir, f"{n}.log"), "w") for n in ("registry", "inference")}
    procs = [
        subprocess.Popen(exe + ["registry", "serve", "--address", reg_addr, "--data-dir", os.path.join(a.data_dir, "registry")],
                         stdout=logs["registry"], stderr=subprocess.STDOUT),
        subprocess.Popen(exe + ["serve", "--host", "127.0.0.1", "--port", str(a.port), "--registry", reg_addr,
                                "--metrics-port", str(a.metrics_port), "--openai-port", str(a.openai_port),
                                "--adapter-cache-dir", os.path.join(a.data_dir, "adapter-cache")],
                         stdout=logs["inference"], stderr=subprocess.STDOUT),
    ]
    try:
        print(f"starting the registry on {reg_addr} and the inference service on {inf_addr} "
              f"(logs in {a.data_dir}/*.log) ...", flush=True)
        wait_serving(reg_addr, "loraserve.v1.RegistryService", procs[0])
        adapters_dir = os.path.join(ROOT, "models", "adapters")
        names = sorted(os.listdir(adapters_dir)) if os.path.isdir(adapters_dir) else []
        with RegistryClient(reg_addr) as reg:
            for name in names:
                v = reg.push(os.path.join(adapters_dir, name), name, base_model="loraserve-default",
                             description=f"demo adapter {name}", exist_ok=True).adapter
                print(f"pushed adapter {v.name} v{v.version} ({v.digest[:19]}..., rank {v.rank}, "
                      f"targets {','.join(v.target_modules)})")
        wait_serving(inf_addr, "loraserve.v1.InferenceService", procs[1])
        with grpc.insecure_channel(inf_addr) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            print(f"\n=== base model, prompt {PROMPT!r}")
            base = stream(stub, pb, None, a.max_tokens)
            for name in names:
                print(f"\n=== with adapter '{name}'")
                out = stream(stub, pb, name, a.max_tokens)
                print(f"    ({'differs from' if out != base else 'same as'} the base output)")
        print(f"""
Try it yourself:
  grpcurl -plaintext {inf_addr} list
  grpcurl -plaintext {inf_addr} describe loraserve.v1.InferenceService
  grpcurl -plaintext -d '{{"text": "import os\\n", "sampling_params": {{"max_tokens": 32, "temperature": 0}}, "adapter_ref": {{"name": "upper"}}}}' {inf_addr} loraserve.v1.InferenceService/Generate
  grpcurl -plaintext {reg_addr} loraserve.v1.RegistryService/ListAdapters
  .venv/bin/loraserve generate "import os" --adapter upper --server {inf_addr}
  .venv/bin/loraserve adapter ls --registry {reg_addr}
  curl -s localhost:{a.openai_port}/v1/completions -H 'content-type: application/json' -d '{{"model": "upper", "prompt": "import os", "max_tokens": 32}}'
  curl -s localhost:{a.metrics_port}/metrics | grep loraserve_

Python:
  from loraserve.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc; import grpc
  stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel("{inf_addr}"))
  for m in stub.Generate(pb.GenerateRequest(text="import os", adapter_ref=pb.AdapterRef(name="upper"))): print(m)
""", flush=True)
        if a.once:
            return 0
        print("serving; Ctrl-C to stop", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
