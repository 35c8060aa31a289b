"""The inference gRPC service over real loopback gRPC, with the real registry behind it."""
from __future__ import annotations

import concurrent.futures
import time
import urllib.request

import grpc
import pytest

from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams
from loraserve.adapters.testing import make_peft_adapter
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry
from tests.certs import self_signed_cert
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

PROMPT = list(range(20, 40))


@pytest.fixture(scope="module")
def stack(tiny_llama, tmp_path_factory):
    model_path, _ = tiny_llama
    root = tmp_path_factory.mktemp("stack")
    adapters = {}
    for i, (name, kw) in enumerate({"alpha": dict(r=4), "beta": dict(r=8, modules=("q_proj", "k_proj", "v_proj",
                                                                                      "o_proj", "down_proj")),
                                    "gamma": dict(r=2, modules=("gate_proj", "up_proj")),
                                    "delta": dict(r=4, use_rslora=True)}.items()):
        adapters[name] = str(make_peft_adapter(root / "src" / name, seed=10 + i, **kw))
    allowed = root / "allowed"
    make_peft_adapter(allowed / "local", seed=99, r=4)
    with RunningRegistry(RegistryConfig(data_dir=root / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            for name, path in adapters.items():
                client.push(path, name, base_model="tiny")
        cfg = ServeConfig(model=model_path, port=0, registry_address=reg.address, allowed_lora_dirs=[str(allowed)],
                          adapter_cache_dir=str(root / "cache"), metrics_port=0, max_queue_size=64,
                          llm_kwargs=dict(dtype="float32", device="cpu",
                                          lora_config=LoraConfig(max_lora_rank=8, max_loras=2)))
        with RunningInference(cfg) as srv:
            channel = grpc.insecure_channel(srv.address)
            yield dict(srv=srv, stub=pb_grpc.InferenceServiceStub(channel), adapters=adapters, model=model_path,
                       allowed=allowed, registry=reg)
            channel.close()


@pytest.fixture(scope="module")
def offline(stack):
    llm = LLM(model=stack["model"], dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8))
    return llm


def greedy_request(adapter=None, max_tokens=10, **extra):
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT),
                             sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                             **extra)
    if adapter:
        req.adapter_ref.name = adapter
    return req


def collect(stream):
    tokens, text, complete = [], "", None
    for msg in stream:
        if msg.WhichOneof("response") == "chunk":
            tokens += list(msg.chunk.token_ids)
            text += msg.chunk.text
        else:
            complete = msg.complete
    return tokens, text, complete


def test_concurrent_streams_match_offline_engine(stack, offline):
    """Several concurrent streams, different adapters (all cold at first, more adapters than
    GPU slots), each exactly the offline engine's greedy output."""
    names = [None, "alpha", "beta", "gamma", "delta", "alpha", None, "delta"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: collect(stack["stub"].Generate(greedy_request(n), timeout=60)), names))
    for name, (tokens, text, complete) in zip(names, results):
        lora = None if name is None else LoRARequest(name, 1 + hash(name) % 1000, stack["adapters"][name])
        ref = offline.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                               lora_request=lora).outputs[0]
        assert tokens == ref.token_ids, name
        assert text == ref.text
        assert complete.finish_reason == pb.FINISH_REASON_LENGTH
        assert complete.prompt_tokens == len(PROMPT) and complete.completion_tokens == 10
        assert complete.ttft_s > 0
        assert bool(complete.adapter_digest) == (name is not None)
    outs = {n: r[0] for n, r in zip(names, results)}
    assert len({tuple(v) for v in outs.values()}) >= 4  # adapters really change the output
    loaded = stack["stub"].ListLoadedAdapters(pb.ListLoadedAdaptersRequest())
    assert loaded.disk.misses >= 4 and loaded.device_slots == 2


def test_lora_request_fields_and_allowed_dirs(stack):
    local = str(stack["allowed"] / "local")
    req = greedy_request()
    req.lora_request.CopyFrom(pb.LoraRequest(lora_name="local", lora_int_id=7, lora_path=local))
    tokens, _, complete = collect(stack["stub"].Generate(req, timeout=60))
    assert len(tokens) == 10 and complete.adapter_digest.startswith("sha256:")
    req.lora_request.lora_path = stack["adapters"]["alpha"]  # exists, but outside the allowed dir
    with pytest.raises(grpc.RpcError) as err:
        collect(stack["stub"].Generate(req, timeout=60))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("mutate,code", [
    (lambda r: r.adapter_ref.__setattr__("name", "no-such-adapter"), grpc.StatusCode.NOT_FOUND),
    (lambda r: r.sampling_params.__setattr__("max_tokens", 0), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.sampling_params.__setattr__("top_p", 2.0), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.token_ids.ids.append(10 ** 6), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.ClearField("prompt"), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_status_codes(stack, mutate, code):
    req = greedy_request()
    mutate(req)
    with pytest.raises(grpc.RpcError) as err:
        collect(stack["stub"].Generate(req, timeout=30))
    assert err.value.code() == code, err.value.details()
    assert err.value.details()
    assert len(collect(stack["stub"].Generate(greedy_request("alpha"), timeout=60))[0]) == 10  # still serving


def test_deadline_and_cancel_free_resources(stack):
    stub = stack["stub"]
    long_req = greedy_request(max_tokens=480)
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Generate(long_req, timeout=0.15))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = stub.Generate(greedy_request("beta", max_tokens=480), timeout=60)
    first = next(call)
    assert first.WhichOneof("response") == "chunk"
    call.cancel()
    deadline = time.time() + 10
    while time.time() < deadline:
        stats = stub.GetServerStats(pb.GetServerStatsRequest())
        if stats.running_requests == 0 and stats.waiting_requests == 0 and stats.device_slots_pinned == 0:
            break
        time.sleep(0.05)
    assert stats.running_requests == 0 and stats.waiting_requests == 0
    assert stats.free_kv_blocks == stats.total_kv_blocks
    assert stats.device_slots_pinned == 0
    assert stats.requests_aborted >= 2


def test_model_info_tokenize_prefetch_evict(stack):
    stub = stack["stub"]
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_type == "llama" and info.lora_enabled and info.max_lora_rank == 8
    tok = stub.Tokenize(pb.TokenizeRequest(text="hello world"))
    assert len(tok.token_ids) == len(tok.tokens) > 0
    loaded = stub.LoadAdapter(pb.LoadAdapterRequest(adapter_ref=pb.AdapterRef(name="gamma")))
    assert loaded.adapter.on_host and loaded.adapter.digest.startswith("sha256:")
    names = {a.digest for a in stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest()).adapters}
    assert loaded.adapter.digest in names
    assert stub.UnloadAdapter(pb.UnloadAdapterRequest(digest=loaded.adapter.digest)).unloaded
    names = {a.digest for a in stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest()).adapters}
    assert loaded.adapter.digest not in names


def test_metrics_endpoint(stack):
    collect(stack["stub"].Generate(greedy_request("alpha"), timeout=60))
    port = stack["srv"].running.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ("loraserve_requests_total", "loraserve_time_to_first_token_seconds_bucket",
                 "loraserve_queue_depth", 'loraserve_adapter_cache_hits_total{tier="device"}',
                 'loraserve_adapter_cache_misses_total{tier="disk"}', "loraserve_adapter_gpu_slots_used",
                 "loraserve_kv_blocks_reused_total", "loraserve_adapter_slot_handoffs_total"):
        assert name in body, name


def test_health_serving(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(stack["srv"].address)
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="loraserve.v1.InferenceService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_concurrent_cold_requests_share_one_download(stack, tmp_path):
    with RegistryClient(stack["registry"].address) as client:
        client.push(str(make_peft_adapter(tmp_path / "eps", seed=55, r=4)), "epsilon", base_model="tiny")
    stub = stack["stub"]
    before = stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest()).disk
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: collect(stub.Generate(greedy_request("epsilon"), timeout=60)), range(6)))
    after = stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest()).disk
    assert after.misses - before.misses == 1  # one download
    assert after.hits - before.hits == 5      # the other five waited for it
    assert len({tuple(r[0]) for r in results}) == 1


def test_starts_without_registry_and_answers_unavailable(tiny_llama, tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    cfg = ServeConfig(model=tiny_llama[0], port=0, registry_address=dead, adapter_cache_dir=str(tmp_path / "c"),
                      registry_timeout_s=5, llm_kwargs=dict(dtype="float32", device="cpu"))
    with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Generate(greedy_request("alpha"), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "registry" in err.value.details()
        tokens, _, complete = collect(stub.Generate(greedy_request(), timeout=30))
        assert len(tokens) == 10 and complete.finish_reason == pb.FINISH_REASON_LENGTH


def test_adapter_that_does_not_fit_is_invalid_argument(stack, tmp_path):
    with RegistryClient(stack["registry"].address) as client:
        client.push(str(make_peft_adapter(tmp_path / "big", seed=5, r=16)), "too-big", base_model="tiny")
    with pytest.raises(grpc.RpcError) as err:
        collect(stack["stub"].Generate(greedy_request("too-big"), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_lora_rank" in err.value.details()
    assert len(collect(stack["stub"].Generate(greedy_request("alpha"), timeout=60))[0]) == 10


def test_generate_cli_streams_the_same_text(stack, offline):
    import subprocess
    import sys

    ref = offline.generate("hello world", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                           lora_request=LoRARequest("alpha", 1, stack["adapters"]["alpha"])).outputs[0].text
    out = subprocess.run([sys.executable, "-m", "loraserve.cli", "generate", "hello world", "--server",
                          stack["srv"].address, "--adapter", "alpha", "--max-tokens", "8", "--stats"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == ref.rstrip("\n") or out.stdout[:-1] == ref
    assert "completion=" in out.stderr


def test_full_queue_is_resource_exhausted(tiny_llama, tmp_path):
    cfg = ServeConfig(model=tiny_llama[0], port=0, registry_address=None, adapter_cache_dir=str(tmp_path / "c"),
                      max_queue_size=1, llm_kwargs=dict(dtype="float32", device="cpu"))
    with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        first = stub.Generate(greedy_request(max_tokens=480), timeout=60)
        assert next(first).WhichOneof("response") == "chunk"
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.Generate(greedy_request(), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()
        time.sleep(0.3)
        assert len(collect(stub.Generate(greedy_request(), timeout=30))[0]) == 10


def test_health_not_serving_while_loading_and_during_shutdown(tiny_llama, tmp_path, monkeypatch):
    import asyncio
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraserve.inference import server as server_mod
    from loraserve.inference.core import InferenceCore
    from loraserve.inference.server import create_server

    may_load = threading.Event()

    class SlowCore(InferenceCore):  # holds the model load until the test has looked at health
        def __init__(self, cfg):
            may_load.wait(30)
            super().__init__(cfg)

    monkeypatch.setattr(server_mod, "InferenceCore", SlowCore)

    async def scenario():
        cfg = ServeConfig(model=tiny_llama[0], port=0, registry_address=None, adapter_cache_dir=str(tmp_path / "c"),
                          llm_kwargs=dict(dtype="float32", device="cpu"))
        running = await create_server(cfg)  # returns before the model is loaded
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="loraserve.v1.InferenceService")
            states = [(await health.Check(req)).status]
            stub = pb_grpc.InferenceServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetModelInfo(pb.GetModelInfoRequest())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
            may_load.set()
            await running.ready.wait()
            states.append((await health.Check(req)).status)
            stop = asyncio.create_task(running.stop(grace=2))
            await asyncio.sleep(0.05)
            try:
                states.append((await health.Check(req, timeout=2)).status)
            except grpc.aio.AioRpcError:
                states.append("stopped")
            await stop
        return states

    states = asyncio.run(scenario())
    assert states[0] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert states[1] == health_pb2.HealthCheckResponse.SERVING
    assert states[2] in (health_pb2.HealthCheckResponse.NOT_SERVING, "stopped")


def test_bearer_token_required_when_configured(tiny_llama, tmp_path):
    cfg = ServeConfig(model=tiny_llama[0], port=0, registry_address=None, adapter_cache_dir=str(tmp_path / "c"),
                      auth_token="s3cret", llm_kwargs=dict(dtype="float32", device="cpu"))
    with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        for md in (None, [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as err:
                collect(stub.Generate(greedy_request(), timeout=30, metadata=md))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        tokens, _, _ = collect(stub.Generate(greedy_request(), timeout=30,
                                             metadata=[("authorization", "Bearer s3cret")]))
        assert len(tokens) == 10


def test_serve_config_merges_trtllm_yaml_own_keys_and_flags(tmp_path):
    from loraserve.inference.serve_config import load_serve_config

    extra = tmp_path / "extra.yaml"
    extra.write_text("lora_config:\n  lora_target_modules: [attn_q, attn_v]\n  max_lora_rank: 8\n"
                     "peft_cache_config:\n  host_cache_size: 1048576\nmax_batch_size: 16\nport: 6000\n")
    own = tmp_path / "own.yaml"
    own.write_text("loraserve:\n  registry_address: reg:1\n  allowed_lora_dirs: [/srv/loras]\n  metrics_port: 9400\n")
    cfg = load_serve_config([str(extra), str(own)], {"port": 7000, "metrics_port": None})
    assert cfg.port == 7000 and cfg.metrics_port == 9400 and cfg.registry_address == "reg:1"
    assert cfg.allowed_lora_dirs == ["/srv/loras"]
    assert cfg.llm_kwargs["lora_config"]["max_lora_rank"] == 8 and cfg.llm_kwargs["max_batch_size"] == 16
    from loraserve.config import engine_config_from_kwargs

    ec = engine_config_from_kwargs("m", **cfg.llm_kwargs)
    assert ec.max_num_seqs == 16 and ec.lora_config.hf_target_modules() == {"q_proj", "v_proj"}
    assert ec.peft_cache_config.host_cache_size == 1048576


def test_tls(tiny_llama, tmp_path):
    cert, key = (str(p) for p in self_signed_cert(tmp_path))
    cfg = ServeConfig(model=tiny_llama[0], host="localhost", port=0, registry_address=None,
                      adapter_cache_dir=str(tmp_path / "c"), tls_cert_file=cert, tls_key_file=key,
                      llm_kwargs=dict(dtype="float32", device="cpu"))
    with RunningInference(cfg) as srv:
        with open(cert, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(srv.address, creds) as ch:
            assert len(collect(pb_grpc.InferenceServiceStub(ch).Generate(greedy_request(), timeout=30))[0]) == 10
        with grpc.insecure_channel(srv.address) as ch:
            with pytest.raises(grpc.RpcError) as err:
                collect(pb_grpc.InferenceServiceStub(ch).Generate(greedy_request(), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_adapters_from_a_tls_registry(tiny_llama, tmp_path):
    from pathlib import Path

    cert, key = (str(p) for p in self_signed_cert(tmp_path))
    reg_cfg = RegistryConfig(data_dir=tmp_path / "reg", tls_cert_file=Path(cert), tls_key_file=Path(key))
    with RunningRegistry(reg_cfg, host="localhost") as reg:
        with open(cert, "rb") as f:
            roots = f.read()
        with RegistryClient(reg.address, root_certificates=roots) as client:
            client.push(str(make_peft_adapter(tmp_path / "a", seed=1, r=4)), "secure", base_model="tiny")
        cfg = ServeConfig(model=tiny_llama[0], port=0, registry_address=reg.address, registry_ca_file=cert,
                          adapter_cache_dir=str(tmp_path / "c"), llm_kwargs=dict(dtype="float32", device="cpu"))
        with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as ch:
            tokens, _, done = collect(pb_grpc.InferenceServiceStub(ch).Generate(greedy_request("secure"), timeout=30))
            assert len(tokens) == 10 and done.adapter_digest.startswith("sha256:")


def test_logprobs_over_grpc(stack, offline):
    req = greedy_request(max_tokens=4)
    req.sampling_params.logprobs = 2  # vLLM's meaning: the chosen token's logprob plus the top 2 (issue 13.8)
    chunks = [m.chunk for m in stack["stub"].Generate(req, timeout=30) if m.WhichOneof("response") == "chunk"]
    logprobs = [lp for c in chunks for lp in c.logprobs]
    tops = [t for c in chunks for t in c.top_logprobs]
    ref = offline.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)).outputs[0]
    assert logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert [list(t.token_ids) for t in tops] == [list(d) for d in ref.top_logprobs]
    with pytest.raises(grpc.RpcError) as err:
        req.sampling_params.top_logprobs = 50
        collect(stack["stub"].Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
