"""64 concurrent gRPC streams over 40 distinct adapters, with a host tier of 4 and 2 GPU slots:
all complete, each with the offline engine's output (an engine whose tiers hold everything)."""
from __future__ import annotations

import concurrent.futures
import re
import urllib.request

import grpc

from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.inference.test_churn import make_adapters

NUM_STREAMS, NUM_ADAPTERS = 64, 40


def test_64_streams_over_40_adapters_with_a_small_host_tier(tiny_llama, tmp_path):
    model_path, _ = tiny_llama
    allowed = tmp_path / "allowed"
    paths = make_adapters(str(allowed), NUM_ADAPTERS)
    jobs = [([3 + k % 50, 7, 11 + k % 13, 5], k % NUM_ADAPTERS) for k in range(NUM_STREAMS)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    offline = LLM(model=model_path, dtype="float32", device="cpu",
                  lora_config=LoraConfig(max_lora_rank=16, max_loras=NUM_ADAPTERS, max_cpu_loras=NUM_ADAPTERS))
    expected = [o.outputs[0].token_ids for o in offline.generate(
        [p for p, _ in jobs], params, lora_request=[LoRARequest(f"a{i}", i + 1, paths[i]) for _, i in jobs])]
    del offline

    cfg = ServeConfig(model=model_path, port=0, registry_address=None, allowed_lora_dirs=[str(allowed)],
                      adapter_cache_dir=str(tmp_path / "cache"), metrics_port=0, max_queue_size=128,
                      llm_kwargs=dict(dtype="float32", device="cpu", max_num_seqs=16,
                                      lora_config=LoraConfig(max_lora_rank=16, max_loras=2, max_cpu_loras=4)))

    def one(job):
        prompt, i = job
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=pb.SamplingParams(
            max_tokens=5, temperature=0, ignore_eos=True))
        req.lora_request.lora_name, req.lora_request.lora_int_id, req.lora_request.lora_path = f"a{i}", i + 1, paths[i]
        return [t for m in stub.Generate(req, timeout=120) if m.WhichOneof("response") == "chunk"
                for t in m.chunk.token_ids]

    with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(NUM_STREAMS) as pool:
            got = list(pool.map(one, jobs))
        assert got == expected
        stats = stub.GetServerStats(pb.GetServerStatsRequest())
        assert stats.running_requests == 0 and stats.waiting_requests == 0 and stats.device_slots_pinned == 0
        lm = srv.core.lora_manager.stats_dict()
        assert lm["host_adapters"] <= 4 and lm["adapter_holds"] == 0
        assert lm["device"]["misses"] >= NUM_ADAPTERS
        # per-adapter metrics: 40 adapters, at most 32 named series plus 'other'; nothing lost
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=10).read()
        series = dict(re.findall(r'^loraserve_adapter_requests_total\{adapter="([^"]+)"\} (\S+)$', body.decode(), re.M))
        assert len(series) == 33 and "other" in series
        assert sum(float(v) for v in series.values()) == NUM_STREAMS
