"""Registry outage (issue 12): the inference service keeps serving what it has, answers
UNAVAILABLE for what it never fetched, and recovers by itself when the registry returns."""
from __future__ import annotations

import time
import urllib.request

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


class RegistryOnPort(RunningRegistry):
    """The same registry (same data dir) brought back on the port it had before."""

    def __init__(self, config: RegistryConfig, port: int):
        super().__init__(config)
        self.fixed_port = port

    async def _open(self) -> None:
        from loraserve.registry.server import start

        self._server, self.port = await start(self.config, f"{self.host}:{self.fixed_port}")
        self.service = self._server.registry_service


def generate(stub, name: str, version: int = 0) -> list[int]:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(20, 30))),
                             sampling_params=pb.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    req.adapter_ref.name, req.adapter_ref.version = name, version
    return [t for m in stub.Generate(req, timeout=30) if m.WhichOneof("response") == "chunk" for t in m.chunk.token_ids]


@pytest.fixture
def stack(tiny_llama, tmp_path):
    model_path, _ = tiny_llama
    reg_cfg = RegistryConfig(data_dir=tmp_path / "registry")
    reg = RunningRegistry(reg_cfg).start()
    with RegistryClient(reg.address) as client:
        for i, name in enumerate(("upper", "lower", "never")):
            client.push(str(make_peft_adapter(tmp_path / "src" / name, r=4, alpha=16, seed=70 + i)), name,
                        base_model="tiny")
    cfg = ServeConfig(model=model_path, port=0, registry_address=reg.address, adapter_cache_dir=str(tmp_path / "cache"),
                      metrics_port=0, llm_kwargs=dict(dtype="float32", device="cpu",
                                                      lora_config=LoraConfig(max_lora_rank=8, max_loras=2)))
    srv = RunningInference(cfg).start()
    channel = grpc.insecure_channel(srv.address)
    state = dict(srv=srv, stub=pb_grpc.InferenceServiceStub(channel), reg=reg, reg_cfg=reg_cfg)
    yield state
    channel.close()
    srv.stop()
    state["reg"].stop()


def test_registry_killed_mid_run(stack):
    stub, srv = stack["stub"], stack["srv"]
    srv.core.fetcher.ref_ttl_s = 0.0  # every latest resolution asks the registry (the outage path at once)
    pinned = generate(stub, "upper", 1)
    latest = generate(stub, "lower")
    port = stack["reg"].port
    stack["reg"].stop()  # the registry is gone

    # pinned version: served without the registry, several times (host/GPU tiers and disk cache)
    for _ in range(3):
        assert generate(stub, "upper", 1) == pinned
    # latest: the last resolution, served stale, counted
    assert generate(stub, "lower") == latest
    assert srv.core.fetcher.stale_served >= 1
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=10).read().decode()
    assert "loraserve_adapter_registry_stale_served_total" in body
    # never fetched: UNAVAILABLE (retryable), not UNKNOWN
    assert generate(stub, "lower", 1) == latest  # latest resolved to version 1, now cached as pinned too
    for ref in (("never", 0), ("never", 1), ("upper", 2)):
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, *ref)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (ref, err.value)

    # the registry comes back on the same address: everything serves, without restarting inference
    stack["reg"] = RegistryOnPort(stack["reg_cfg"], port).start()
    deadline = time.monotonic() + 20
    while True:
        try:
            never = generate(stub, "never")
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
            time.sleep(0.2)
    assert len(never) == 6 and never != pinned
    assert generate(stub, "lower", 1) == latest
    assert generate(stub, "upper", 1) == pinned


def test_pinned_versions_survive_an_inference_restart_without_registry(stack, tmp_path):
    """refs.json in the disk cache: a restarted server serves a cached {name, version} with the
    registry down."""
    stub, srv = stack["stub"], stack["srv"]
    pinned = generate(stub, "upper", 1)
    stack["reg"].stop()
    srv.stop()
    srv2 = RunningInference(srv.cfg).start()
    try:
        with grpc.insecure_channel(srv2.address) as channel:
            stub2 = pb_grpc.InferenceServiceStub(channel)
            assert generate(stub2, "upper", 1) == pinned
            with pytest.raises(grpc.RpcError) as err:
                generate(stub2, "lower")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv2.stop()
    stack["srv"] = srv2
