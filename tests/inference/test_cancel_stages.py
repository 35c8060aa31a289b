"""Issue 9 item 4: a request's adapter hold lives exactly as long as the request. Cancelled at
any stage (queued, resolving, loading, prefill, decode) over real loopback gRPC, the server
ends with nothing running, pinned or held, every KV block free, and keeps serving."""
from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

from loraserve import LoraConfig
from loraserve.adapters.testing import make_peft_adapter
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

NUM_ADAPTERS = 10
NUM_LOCAL = 40
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    model_path, _ = tiny_llama
    root = tmp_path_factory.mktemp("cancel")
    with RunningRegistry(RegistryConfig(data_dir=root / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            for i in range(NUM_ADAPTERS):
                r = (4, 8, 16)[i % 3]
                path = make_peft_adapter(root / "src" / f"c{i}", modules=("q_proj", "v_proj", "down_proj"), r=r,
                                         alpha=2.0 * r, seed=300 + i)
                client.push(str(path), f"c{i}", base_model="tiny")
        allowed = root / "allowed"
        for i in range(NUM_LOCAL):  # rank 64 on every module: the largest parse the tiny model allows
            make_peft_adapter(allowed / f"l{i}", modules=ALL, r=64, alpha=64, seed=500 + i)
        cfg = ServeConfig(model=model_path, port=0, registry_address=reg.address, allowed_lora_dirs=[str(allowed)],
                          adapter_cache_dir=str(root / "cache"), metrics_port=None, max_queue_size=256,
                          llm_kwargs=dict(dtype="float32", device="cpu", max_num_seqs=2, max_num_tokens=16,
                                          lora_config=LoraConfig(max_lora_rank=64, max_loras=1, max_cpu_loras=2)))
        with RunningInference(cfg) as srv:
            channel = grpc.insecure_channel(srv.address)
            srv.allowed = allowed
            yield srv, pb_grpc.InferenceServiceStub(channel)
            channel.close()


def request(adapter: str | None, max_tokens: int = 40, prompt_len: int = 8) -> pb.GenerateRequest:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[(7 * i) % 300 + 2 for i in range(prompt_len)]),
                             sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    if adapter:
        req.adapter_ref.name = adapter
    return req


def stats(stub) -> pb.GetServerStatsResponse:
    return stub.GetServerStats(pb.GetServerStatsRequest())


def wait_for(cond, timeout: float = 20.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def assert_quiet(srv, stub) -> None:
    """Nothing running, queued, pinned or held; every KV block free."""
    wait_for(lambda: (lambda s: s.running_requests == 0 and s.waiting_requests == 0 and s.active_streams == 0)(
        stats(stub)), what="the server to go idle")
    s = stats(stub)
    assert s.free_kv_blocks == s.total_kv_blocks
    assert s.device_slots_pinned == 0
    wait_for(lambda: srv.core.lora_manager.num_holds() == 0, 5, "adapter holds to be released")
    assert all(a.active_requests == 0 for a in stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest()).adapters)


def drain(call) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED), exc


def test_cancel_at_each_stage(server):
    srv, stub = server
    # decode: cancel after the first streamed chunk
    call = stub.Generate(request("c0", max_tokens=400), timeout=60)
    assert next(call).WhichOneof("response") == "chunk"
    call.cancel()
    # prefill: a long prompt in 16-token chunks; cancel once it runs, before its first token
    call = stub.Generate(request("c1", max_tokens=5, prompt_len=480), timeout=60)
    wait_for(lambda: stats(stub).running_requests == 1, what="the long prefill to run")
    call.cancel()
    drain(call)
    assert_quiet(srv, stub)
    # queued: two long requests fill max_num_seqs=2; a third waits in the queue and is cancelled
    busy = [stub.Generate(request(None, max_tokens=400), timeout=60) for _ in range(2)]
    for c in busy:
        next(c)
    queued = stub.Generate(request("c2", max_tokens=5), timeout=60)
    wait_for(lambda: stats(stub).waiting_requests == 1, what="the third request to queue")
    queued.cancel()
    drain(queued)
    wait_for(lambda: stats(stub).waiting_requests == 0, what="the queued request to leave")
    for c in busy:
        c.cancel()
    assert_quiet(srv, stub)


def test_cancels_and_deadlines_sweep_resolving_and_loading(server):
    """Cold adapters (registry fetch + parse in a worker, then a background host load) cancelled
    or timed out after 0-80 ms: they hit resolving and loading as well as the later stages."""
    srv, stub = server
    delays = [0.0, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.05, 0.08]
    calls = []
    for i, d in enumerate(delays * 2):
        call = stub.Generate(request(f"c{(i + 3) % NUM_ADAPTERS}", max_tokens=30), timeout=60)
        time.sleep(d)
        call.cancel()
        calls.append(call)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(drain, calls))
        deadlines = [stub.Generate(request(f"c{i % NUM_ADAPTERS}", max_tokens=30), timeout=d)
                     for i, d in enumerate([0.001, 0.005, 0.01, 0.02, 0.04, 0.08] * 2)]
        list(pool.map(drain, deadlines))
    assert_quiet(srv, stub)
    # still serving, every adapter usable, and none stuck "in use"
    for i in range(0, NUM_ADAPTERS, 3):
        tokens = [t for m in stub.Generate(request(f"c{i}", max_tokens=4), timeout=60)
                  if m.WhichOneof("response") == "chunk" for t in m.chunk.token_ids]
        assert len(tokens) == 4
    assert_quiet(srv, stub)
    for a in stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest()).adapters:
        assert stub.UnloadAdapter(pb.UnloadAdapterRequest(digest=a.digest)).unloaded


def test_cancel_while_resolving_a_local_path_releases_the_hold(server):
    """The regression of issue 9.4: resolve (parse) runs in a worker; a cancel while it runs used
    to lose the hold it took. 40 cold adapters by lora_path, each cancelled 0-10 ms after the
    call starts, so many land inside the parse."""
    srv, stub = server
    calls = []
    for i in range(NUM_LOCAL):
        req = request(None, max_tokens=20)
        req.lora_request.lora_name, req.lora_request.lora_int_id = f"l{i}", 1000 + i
        req.lora_request.lora_path = str(srv.allowed / f"l{i}")
        call = stub.Generate(req, timeout=60)
        time.sleep((i % 20) * 0.0005)
        call.cancel()
        calls.append(call)
    for call in calls:
        drain(call)
    assert_quiet(srv, stub)
