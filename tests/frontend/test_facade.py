"""Issue 13.6: InferenceCore is the one facade of both fronts. The fronts (and the metrics
collector) never reach into the engine, its scheduler / block manager, the LoRA manager, the
tokenizer or the fetcher; what the facade answers is checked against independent references
(transformers' AutoConfig / AutoTokenizer, the adapter's own adapter_config.json) through the
real gRPC and HTTP fronts, and its stats through the engine thread agree with the engine's."""
from __future__ import annotations

import ast
import asyncio
import json
import pathlib
import urllib.request

import grpc
import pytest
import transformers

from loraserve.adapters.testing import make_peft_adapter
from loraserve.config import LoraConfig
from loraserve.inference import metrics, openai_server, server
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.inference.conftest import make_random_model

INTERNALS = {"engine", "lora_manager", "tokenizer", "tok", "scheduler", "block_manager", "fetcher", "async_llm",
             "handles", "runner"}


@pytest.mark.parametrize("module", [server, openai_server, metrics], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_fronts_use_only_the_facade(module):
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    reached = sorted({f"{n.attr} (line {n.lineno})" for n in ast.walk(tree)
                      if isinstance(n, ast.Attribute) and n.attr in INTERNALS})
    assert not reached, f"{module.__name__} reaches past InferenceCore: {reached}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("facade")
    model = str(root / "model")
    make_random_model(model, "llama")
    allowed = root / "allowed"
    make_peft_adapter(allowed / "six", seed=3, r=6, modules=("q_proj", "v_proj", "o_proj"))
    cfg = ServeConfig(model=model, port=0, openai_port=0, registry_address=None, allowed_lora_dirs=[str(allowed)],
                      adapter_cache_dir=str(root / "cache"),
                      llm_kwargs=dict(dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8)))
    with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as channel:
        yield dict(srv=srv, stub=pb_grpc.InferenceServiceStub(channel), model=model, allowed=allowed,
                   http=f"http://127.0.0.1:{srv.running.openai.port}")


def on_server_loop(srv, coro):
    return asyncio.run_coroutine_threadsafe(coro, srv._loop).result(30)


def test_model_info_matches_the_hf_config(stack):
    hf = transformers.AutoConfig.from_pretrained(stack["model"])
    info = stack["stub"].GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert (info.model_type, info.vocab_size, info.num_layers, info.hidden_size) == \
        (hf.model_type, hf.vocab_size, hf.num_hidden_layers, hf.hidden_size)
    core_info = stack["srv"].core.model_info()
    assert info.model_name == core_info.model_name == stack["model"]
    assert info.lora_enabled and info.max_lora_rank == 8 and list(info.lora_target_modules) == core_info.lora_target_modules


@pytest.mark.parametrize("text", ["The quick brown fox", "def main():\n    return 42", ""])
def test_tokenize_matches_auto_tokenizer(stack, text):
    hf = transformers.AutoTokenizer.from_pretrained(stack["model"])
    resp = stack["stub"].Tokenize(pb.TokenizeRequest(text=text), timeout=30)
    expected = hf(text).input_ids
    assert list(resp.token_ids) == expected
    assert list(resp.tokens) == hf.convert_ids_to_tokens(expected)


def test_load_list_unload_through_the_facade(stack):
    stub, path = stack["stub"], stack["allowed"] / "six"
    rank = json.loads((path / "adapter_config.json").read_text())["r"]
    loaded = stub.LoadAdapter(pb.LoadAdapterRequest(lora_request=pb.LoraRequest(
        lora_name="six", lora_int_id=6, lora_path=str(path))), timeout=30).adapter
    assert loaded.name == "six" and loaded.rank == rank == 6 and loaded.on_host and loaded.size_bytes > 0
    listed = stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest(), timeout=30)
    assert [a.digest for a in listed.adapters] == [loaded.digest]
    assert listed.host.misses >= 1 and listed.device_slots > 0
    # the HTTP front sees it by name through the same facade (GET /v1/models, then a request naming it)
    models = json.loads(urllib.request.urlopen(stack["http"] + "/v1/models", timeout=30).read())
    assert "six" in {m["id"] for m in models["data"]}
    assert stack["srv"].core.loaded_adapter_ids() == {"six": 6}
    assert stub.UnloadAdapter(pb.UnloadAdapterRequest(digest=loaded.digest), timeout=30).unloaded
    assert not stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest(), timeout=30).adapters
    assert not stub.UnloadAdapter(pb.UnloadAdapterRequest(digest=loaded.digest), timeout=30).unloaded


def test_stats_on_the_engine_thread_agree_with_the_engine(stack):
    srv, stub = stack["srv"], stack["stub"]
    before = stub.GetServerStats(pb.GetServerStatsRequest(), timeout=30)
    list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                          sampling_params=pb.SamplingParams(max_tokens=3)), timeout=30))
    after = stub.GetServerStats(pb.GetServerStatsRequest(), timeout=30)
    assert after.requests_total == before.requests_total + 1
    core = srv.core
    stats = on_server_loop(srv, core.stats())
    engine_stats = core.async_llm.call(lambda e: e.stats()).result(30)   # the reference: read on the engine thread
    for key in ("waiting", "running", "free_kv_blocks", "total_kv_blocks"):
        assert stats[key] == engine_stats[key], key
    assert after.total_kv_blocks == engine_stats["total_kv_blocks"] and after.running_requests == 0


def test_health_and_max_tokens_room(stack):
    core = stack["srv"].core
    assert core.health() == (True, "ok")
    info = core.model_info()
    assert core.max_tokens_room(10) == min(info.max_seq_len, core.engine.kv_capacity_tokens) - 10
    assert core.max_tokens_room(10**9) == 1
    assert json.loads(urllib.request.urlopen(stack["http"] + "/health", timeout=30).read()) == {"status": "ok"}
