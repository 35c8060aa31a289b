"""Tensor parallelism on CPU: 2 ranks over gloo (the driver is rank 0, one spawned worker).

Greedy tokens of TP=2 must equal TP=1 and the independent references (transformers; transformers +
peft for adapters) token for token in fp32; a killed worker must end the engine with a clear error
and no hang; shutdown must leave no child process. One engine at a time (one process group per
process), each started in ~3 s.
"""
from __future__ import annotations

import asyncio
import copy
import os
import signal
import time

import pytest
import torch

from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams

from tests.inference.conftest import make_random_model
from tests.inference.test_engine_vs_hf import hf_greedy
from tests.inference.test_multi_lora import peft_adapter_with_random_weights, peft_greedy

psutil = pytest.importorskip("psutil")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 57)), [3] * 17]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _children() -> list:
    """Live spawned processes under this one (not multiprocessing's resource tracker, which spawn
    starts once per process and which holds no model)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_tp2_equals_tp1_and_transformers(tmp_path):
    """Qwen2 shape (q/k/v biases), tied embeddings, a vocabulary (317) that 2 does not divide."""
    path = str(tmp_path / "m")
    hf = make_random_model(path, "qwen2", vocab_size=317, tie_word_embeddings=True)
    ref = [hf_greedy(hf, p, GREEDY.max_tokens)[0] for p in PROMPTS]
    tp1 = _tokens(LLM(model=path, dtype="float32", device="cpu").generate(PROMPTS, GREEDY))
    llm = LLM(model=path, dtype="float32", device="cpu", tensor_parallel_size=2, max_num_tokens=24)  # chunked prefill
    try:
        assert len(_children()) == 1
        m = llm.engine.model   # rank 0's shard: 2 of 4 heads, 1 of 2 KV heads (16 dims each), 159 of 317 rows
        assert m.layers[0].self_attn.qkv_proj.weight.shape == (4 * 16, 64)
        assert m.layers[0].mlp.down_proj.weight.shape == (64, 64)
        assert m.embed_tokens.weight.shape == (159, 64) and m.lm_head.weight is m.embed_tokens.weight
        assert llm.engine.runner.k_cache.shape[3] == 1
        tp2 = _tokens(llm.generate(PROMPTS, GREEDY))
        logits = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, logprobs=2)).outputs[0]
    finally:
        llm.engine.runner.shutdown()
    assert tp1 == ref
    assert tp2 == ref
    assert logits.token_ids == ref[0][:3]


def test_tp2_with_adapters_equals_peft(tiny_llama, tmp_path):
    """A mixed batch (no adapter, two HF PEFT adapters on every module, a NeMo adapter) under TP=2:
    column-parallel (q/k/v, gate/up) and row-parallel (o, down) LoRA shards."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from loraserve.adapters import load_adapter
    from loraserve.adapters.testing import make_nemo_adapter

    path, base = tiny_llama
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = {}
    for i, kw in enumerate([dict(r=8, lora_alpha=16, target_modules=mods),
                            dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "down_proj"])]):
        d = str(tmp_path / f"a{i}")
        peft[d] = peft_adapter_with_random_weights(base, d, seed=200 + i, **kw)
    nemo_path = make_nemo_adapter(tmp_path / "x.nemo", r=4, seed=3,
                                  adapters=("lora_kqv_adapter", "lora_dense_attention_adapter",
                                            "lora_hto4h_adapter", "lora_4htoh_adapter"))
    ad = load_adapter(nemo_path)
    nemo_peft = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=4, lora_alpha=4,
                                                                   target_modules=sorted(ad.target_modules)))
    with torch.no_grad():
        for (layer, module), (a, b) in ad.weights.items():
            block = nemo_peft.base_model.model.model.layers[layer]
            lin = getattr(block.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, module)
            lin.lora_A["default"].weight.copy_(a)
            lin.lora_B["default"].weight.copy_(b)
    reqs = [None, LoRARequest("a0", 1, list(peft)[0]), LoRARequest("a1", 2, list(peft)[1]),
            LoRARequest("nemo", 3, str(nemo_path), "nemo")]
    refs = [peft_greedy(base, PROMPTS[0], 10)] + [peft_greedy(m, PROMPTS[i + 1], 10) for i, m in enumerate(peft.values())]
    refs.append(peft_greedy(nemo_peft, PROMPTS[3], 10))
    kw = dict(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8, max_loras=2))
    tp1 = _tokens(LLM(**kw).generate(PROMPTS, GREEDY, lora_request=reqs))
    # 2 slots for 3 adapters: slots are reloaded mid-run; overlapped steps (CUDA's default): the decode
    # inputs take the previous step's tokens on the device before they are broadcast
    llm = LLM(**kw, tensor_parallel_size=2, async_scheduling=True)
    try:
        tp2 = _tokens(llm.generate(PROMPTS, GREEDY, lora_request=reqs))
    finally:
        llm.engine.runner.shutdown()
    assert tp1 == refs
    assert tp2 == refs
    assert len(set(map(tuple, refs[1:]))) == 3 and refs[1] != peft_greedy(base, PROMPTS[1], 10)


def test_killed_worker_ends_the_engine_clearly(tiny_llama):
    """SIGKILL the worker mid-generation: the stream fails with EngineDeadError naming the worker, the
    AsyncLLM is dead (health NOT_SERVING) within seconds, and nothing is left running after shutdown."""
    from loraserve.inference.async_llm import AsyncLLM
    from loraserve.inference.errors import EngineDeadError

    llm = LLM(model=tiny_llama[0], dtype="float32", device="cpu", tensor_parallel_size=2)
    async_llm = AsyncLLM(llm.engine)
    dead = []
    async_llm.on_dead = dead.append
    (worker,) = _children()

    async def run():
        got = 0
        async for _ in async_llm.generate([5, 6, 7], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)):
            got += 1
            if got == 3:
                os.kill(worker.pid, signal.SIGKILL)

    t = time.monotonic()
    with pytest.raises(EngineDeadError, match="loraserve-tp1.*died"):
        asyncio.run(asyncio.wait_for(run(), 60))
    assert time.monotonic() - t < 30
    deadline = time.monotonic() + 5     # on_dead runs on the engine thread just after the streams are told
    while not dead and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not async_llm.is_alive and "died" in repr(dead[0])
    async_llm.shutdown()
    llm.engine.runner.shutdown()
    assert _children() == []


def test_served_tp2_turns_not_serving_when_an_idle_worker_dies(tiny_llama, tmp_path):
    """`loraserve serve --tensor-parallel-size 2` in process, through a real gRPC stub: it generates
    what TP=1 generates; killing the worker while idle flips health to NOT_SERVING within seconds;
    stopping the server leaves no worker behind."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraserve.inference.serve_config import ServeConfig
    from loraserve.inference.server import create_server
    from loraserve.v1 import inference_pb2 as pb
    from loraserve.v1 import inference_pb2_grpc as pb_grpc

    want = LLM(model=tiny_llama[0], dtype="float32", device="cpu").generate([5, 6, 7], GREEDY).outputs[0].token_ids

    async def scenario():
        cfg = ServeConfig(model=tiny_llama[0], port=0, registry_address=None, adapter_cache_dir=str(tmp_path / "c"),
                          llm_kwargs=dict(dtype="float32", device="cpu", tensor_parallel_size=2))
        running = await create_server(cfg, wait_ready=True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
                health = health_pb2_grpc.HealthStub(ch)
                req = health_pb2.HealthCheckRequest(service="loraserve.v1.InferenceService")
                assert (await health.Check(req)).status == health_pb2.HealthCheckResponse.SERVING
                stub = pb_grpc.InferenceServiceStub(ch)
                sp = pb.SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True)
                got = []
                async for msg in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling_params=sp)):
                    if msg.WhichOneof("response") == "chunk":
                        got += list(msg.chunk.token_ids)
                (worker,) = _children()
                worker.kill()
                t = time.monotonic()
                while (await health.Check(req)).status == health_pb2.HealthCheckResponse.SERVING:
                    assert time.monotonic() - t < 10, "health still SERVING 10 s after the worker died"
                    await asyncio.sleep(0.05)
                return got
        finally:
            await running.stop(grace=1)

    assert asyncio.run(scenario()) == want
    assert _children() == []


def test_shutdown_leaves_no_process_and_bad_sizes_are_refused(tiny_llama, tmp_path):
    from loraserve.inference.tp.parallel import TensorParallelError
    from loraserve.options import ConfigError

    llm = LLM(model=tiny_llama[0], dtype="float32", device="cpu", tensor_parallel_size=2)
    assert len(_children()) == 1
    # rank 0's start-up phases, in order, each timed (tp/startup.py; what the 2-GPU runs print)
    phases = [p for p, _ in llm.engine.tp.clock.phases]
    assert phases == ["spawn + rendezvous", "all-reduce set-up", "model load", "KV cache + runner"]
    assert all(dt >= 0 for _, dt in llm.engine.tp.clock.phases) and llm.engine.tp.clock.total() > 0
    llm.engine.runner.shutdown()
    assert _children() == []
    # tiny_llama has 2 KV heads: 4 ranks cannot each hold whole heads; refused before any process starts
    with pytest.raises(TensorParallelError, match="num_key_value_heads=2"):
        LLM(model=tiny_llama[0], dtype="float32", device="cpu", tensor_parallel_size=4)
    assert _children() == []
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        LLM(model=tiny_llama[0], device="cpu", tensor_parallel_size=0)


def test_yaml_key_and_cli_flag():
    from loraserve.config import engine_config_from_kwargs
    from loraserve.cli import build_parser

    assert engine_config_from_kwargs("m", tensor_parallel_size=2).tensor_parallel_size == 2
    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2", "--device", "cpu"])
    assert args.tensor_parallel_size == 2


def test_graph_buckets_subset_keeps_the_largest(monkeypatch):
    from loraserve.inference.tp.startup import graph_buckets

    buckets = [1, 2, 4, 8, 16, 24, 32, 48, 64]
    monkeypatch.delenv("LORASERVE_TP_GRAPH_BUCKETS", raising=False)
    assert graph_buckets(buckets) == buckets
    monkeypatch.setenv("LORASERVE_TP_GRAPH_BUCKETS", "1, 16")
    assert graph_buckets(buckets) == [1, 16, 64]   # 64 sizes the static buffers and covers every batch
    monkeypatch.setenv("LORASERVE_TP_GRAPH_BUCKETS", "1,64,256")
    assert graph_buckets(buckets) == [1, 64]
