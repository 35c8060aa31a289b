"""Issue 9, item 6: every error a client can cause gets its canonical status code on both
fronts (gRPC over a real loopback stub, the OpenAI HTTP front over a real socket), bad
adapter references are refused before any registry call, and no message echoes unbounded
input or a Python exception's text."""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import grpc
import pytest

from loraserve.adapters.testing import make_peft_adapter
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.registry import metrics as registry_metrics
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc

LONG = "a" * 10_000
MAX_DETAILS = 1100  # status.MAX_MESSAGE_BYTES plus the cut marker


@pytest.fixture(scope="module")
def stack(tiny_llama, tmp_path_factory):
    """A registry that needs a read token, and an inference server that presents the wrong one:
    a reference that reached the registry would come back PERMISSION_DENIED, not INVALID_ARGUMENT."""
    root = tmp_path_factory.mktemp("status")
    allowed = root / "allowed"
    make_peft_adapter(allowed / "good", seed=3, r=4)
    broken_json = allowed / "broken-json"
    make_peft_adapter(broken_json, seed=4, r=4)
    (broken_json / "adapter_config.json").write_text("{\"r\": 4, ")
    garbage = allowed / "garbage"
    make_peft_adapter(garbage, seed=5, r=4)
    for f in garbage.glob("*.safetensors"):
        f.write_bytes(b"\xff" * 64)
    outside = make_peft_adapter(root / "outside", seed=6, r=4)
    with RunningRegistry(RegistryConfig(data_dir=root / "registry", read_token="reader-secret")) as reg:
        cfg = ServeConfig(model=tiny_llama[0], port=0, openai_port=0, registry_address=reg.address,
                          registry_token="not-the-reader-token", allowed_lora_dirs=[str(allowed)],
                          adapter_cache_dir=str(root / "cache"), llm_kwargs=dict(dtype="float32", device="cpu"))
        with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as channel:
            yield dict(srv=srv, stub=pb_grpc.InferenceServiceStub(channel), allowed=allowed, outside=outside,
                       http=f"http://127.0.0.1:{srv.running.openai.port}")


def refused_reads() -> float:
    return registry_metrics.AUTH_REFUSED.labels("GetAdapter")._value.get()


def grpc_error(stub, req: pb.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.Generate(req, timeout=30):
            pass
    return err.value


def http_post(base: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def generate_request(**adapter) -> pb.GenerateRequest:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                             sampling_params=pb.SamplingParams(max_tokens=2, temperature=0))
    if "ref" in adapter:
        req.adapter_ref.CopyFrom(adapter["ref"])
    if "lora" in adapter:
        req.lora_request.CopyFrom(adapter["lora"])
    return req


BAD_REFS = [
    pb.AdapterRef(name="../../etc/passwd"),
    pb.AdapterRef(name="evil\x00name"),
    pb.AdapterRef(name=LONG),
    pb.AdapterRef(name="ok", version=-1),
    pb.AdapterRef(name="ok", version=2, alias="prod"),
    pb.AdapterRef(name="ok", alias="../x"),
    pb.AdapterRef(name="ok", alias="b" * 10_000),
    pb.AdapterRef(name=""),
]


@pytest.mark.parametrize("ref", BAD_REFS, ids=lambda r: repr(r.name[:12]) + f"-v{r.version}-{r.alias[:6]}")
def test_bad_adapter_refs_are_invalid_argument_before_any_registry_call(stack, ref):
    before = refused_reads()
    stub = stack["stub"]
    for call in (lambda: grpc_error(stub, generate_request(ref=ref)),
                 lambda: _unary_error(stub.LoadAdapter, pb.LoadAdapterRequest(adapter_ref=ref)),
                 lambda: _unary_error(stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter_ref=ref))):
        err = call()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert 0 < len(err.details()) < MAX_DETAILS
    assert refused_reads() == before  # the registry never saw them


def _unary_error(method, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        method(req, timeout=30)
    return err.value


@pytest.mark.parametrize("model", ["../../etc/passwd", "evil\x00name", LONG, "ok:-1", "ok:0", "ok:" + "9" * 40,
                                   "ok:" + "b" * 10_000, ":3"])
def test_bad_model_names_are_400_on_http(stack, model):
    before = refused_reads()
    for path, body in (("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})):
        status, body = http_post(stack["http"], path, body)
        assert status == 400, body
        assert body["error"]["param"] == "model" and len(body["error"]["message"]) < 400
    assert refused_reads() == before


def test_registry_refusing_our_read_token_is_permission_denied(stack):
    before = refused_reads()
    err = grpc_error(stack["stub"], generate_request(ref=pb.AdapterRef(name="some-adapter")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert "registry" in err.details() and "token" in err.details()
    status, body = http_post(stack["http"], "/v1/completions", {"model": "some-adapter", "prompt": "hi"})
    assert status == 403 and "registry" in body["error"]["message"]
    assert refused_reads() == before + 2


@pytest.mark.parametrize("case,code,http", [
    ("broken-json", grpc.StatusCode.INVALID_ARGUMENT, 400),
    ("garbage", grpc.StatusCode.INVALID_ARGUMENT, 400),
    ("missing", grpc.StatusCode.NOT_FOUND, 404),
    ("outside", grpc.StatusCode.PERMISSION_DENIED, 403),
    ("nul", grpc.StatusCode.INVALID_ARGUMENT, 400),
    ("long", grpc.StatusCode.INVALID_ARGUMENT, 400),
])
def test_lora_path_errors(stack, case, code, http):
    path = {"outside": str(stack["outside"]), "nul": str(stack["allowed"] / "good") + "\x00/x",
            "long": str(stack["allowed"]) + "/x" * 5000}.get(case, str(stack["allowed"] / case))
    err = grpc_error(stack["stub"], generate_request(lora=pb.LoraRequest(lora_name=case, lora_int_id=11,
                                                                          lora_path=path)))
    assert err.code() == code, err.details()
    assert len(err.details()) < MAX_DETAILS and "Error(" not in err.details()  # no Python repr
    status, body = http_post(stack["http"], "/v1/completions", {
        "prompt": "hi", "max_tokens": 2, "lora_request": {"lora_name": case, "lora_int_id": 11, "lora_path": path}})
    assert status == http, body
    assert len(body["error"]["message"]) < MAX_DETAILS


def test_lora_request_field_checks(stack):
    for lora in (pb.LoraRequest(lora_name="", lora_int_id=1), pb.LoraRequest(lora_name=LONG, lora_int_id=1),
                 pb.LoraRequest(lora_name="x", lora_int_id=-5), pb.LoraRequest(lora_name="x\x00", lora_int_id=1),
                 pb.LoraRequest(lora_name="x", lora_int_id=1, lora_ckpt_source="pickle")):
        err = grpc_error(stack["stub"], generate_request(lora=lora))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details()) < MAX_DETAILS
        status, body = http_post(stack["http"], "/v1/completions", {"prompt": "hi", "max_tokens": 2, "lora_request": {
            "lora_name": lora.lora_name, "lora_int_id": lora.lora_int_id, "lora_path": lora.lora_path,
            "lora_ckpt_source": lora.lora_ckpt_source or "hf"}})
        assert status == 400 and len(body["error"]["message"]) < MAX_DETAILS, body


def test_unmapped_error_is_internal_with_a_generic_message(stack, caplog, monkeypatch):
    """Fault injection: the tokenizer raising an unexpected exception that carries the prompt.
    The client gets INTERNAL / 500 with a reference, not the text; the log has the traceback."""
    secret = "prompt-text-" + "z" * 50
    tokenizer = stack["srv"].core.tokenizer

    def broken_encode(text, *args, **kwargs):
        raise TypeError(f"cannot tokenize {text!r}")
    monkeypatch.setattr(tokenizer, "encode", broken_encode)
    with caplog.at_level(logging.ERROR, logger="loraserve.inference.status"):
        err = grpc_error(stack["stub"], pb.GenerateRequest(text=secret, sampling_params=pb.SamplingParams(
            max_tokens=2)))
        status, body = http_post(stack["http"], "/v1/completions", {"prompt": secret, "max_tokens": 2})
    assert err.code() == grpc.StatusCode.INTERNAL
    assert secret not in err.details() and "TypeError" not in err.details() and "reference" in err.details()
    assert status == 500 and secret not in body["error"]["message"]
    refs = [r for r in caplog.records if r.getMessage().startswith("internal error ")]
    assert len(refs) == 2 and refs[0].exc_info is not None
    assert refs[0].getMessage().split()[2] in err.details()
    monkeypatch.undo()
    ok = list(stack["stub"].Generate(generate_request(), timeout=30))  # still serving
    assert ok[-1].WhichOneof("response") == "complete"


def test_http_seed_at_and_past_the_int64_edge(stack):
    """n choices seed the engine with seed + j: at the int64 edge that must wrap, not fail the step
    (and every request co-batched with it); a seed past int64 is a 400."""
    for seed in (2**63 - 1, -2**63):
        status, body = http_post(stack["http"], "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3, "n": 3,
                                                                    "seed": seed, "ignore_eos": True})
        assert status == 200 and len(body["choices"]) == 3, body
    for seed in (2**63, 10**30, -2**63 - 1):
        status, body = http_post(stack["http"], "/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": seed})
        assert status == 400 and body["error"]["param"] == "seed", body


def test_http_integers_past_int32_are_400(stack):
    """JSON has no integer bounds: 10**30 in top_k reached torch and failed the engine step (and
    every request in it). The HTTP front bounds integers as the gRPC fields are (int32)."""
    for field, value in (("top_k", 10**30), ("min_tokens", 10**30), ("stop_token_ids", [10**30]),
                         ("max_tokens", 2**31), ("logprobs", 10**30)):
        status, body = http_post(stack["http"], "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
        assert status == 400 and field in body["error"]["message"], (field, body)
    status, body = http_post(stack["http"], "/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": 2**31 - 1})
    assert status == 200, body


def test_stop_token_ids_past_the_vocabulary_are_invalid_argument(stack):
    """min_tokens bans stop ids by indexing the logits: an id >= vocab_size failed the whole engine
    step (and every request co-batched with it). It is refused at admission on both fronts."""
    vocab = stack["srv"].core.engine.args.vocab_size
    for ids in ([vocab], [2**31 - 1]):
        req = generate_request()
        req.sampling_params.stop_token_ids.extend(ids)
        req.sampling_params.min_tokens = 2
        err = grpc_error(stack["stub"], req)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop_token_ids" in err.details(), err.details()
        status, body = http_post(stack["http"], "/v1/completions", {"prompt": [5, 6], "max_tokens": 2,
                                                                    "min_tokens": 2, "stop_token_ids": ids})
        assert status == 400 and "stop_token_ids" in body["error"]["message"], body
