"""Issue 13.5: one error table. Every inference error is declared once (errors.py) with its gRPC code
and HTTP status; both fronts answer from it (real gRPC stub and real HTTP socket against one
server); an exception our own code did not declare, a KeyError or ValueError included, is
INTERNAL / 500 with one log line carrying the request id, never NOT_FOUND / INVALID_ARGUMENT;
bearer tokens are compared with hmac.compare_digest on both fronts."""
from __future__ import annotations

import hmac
import inspect
import json
import logging
import urllib.error
import urllib.request

import grpc
import pytest

from loraserve.adapters import AdapterFormatError
from loraserve.config import LoraConfig
from loraserve.adapters.testing import make_peft_adapter
from loraserve.inference import adapter_source, async_llm, chat_template, core, errors
from loraserve.inference.lora import manager
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.inference.conftest import make_random_model

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("error_table")
    model = str(root / "model")
    make_random_model(model, "llama")
    allowed = root / "allowed"
    make_peft_adapter(allowed / "good", seed=3, r=4)
    outside = make_peft_adapter(root / "outside", seed=4, r=4)
    cfg = ServeConfig(model=model, port=0, openai_port=0, registry_address=None, auth_token=TOKEN,
                      allowed_lora_dirs=[str(allowed)], adapter_cache_dir=str(root / "cache"),
                      llm_kwargs=dict(dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8)))
    with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as channel:
        yield dict(srv=srv, stub=pb_grpc.InferenceServiceStub(channel), allowed=allowed, outside=outside,
                   http=f"http://127.0.0.1:{srv.running.openai.port}")


AUTH = [("authorization", f"Bearer {TOKEN}")]


def grpc_generate(stub, req: pb.GenerateRequest, metadata=AUTH) -> grpc.RpcError | None:
    try:
        list(stub.Generate(req, metadata=metadata, timeout=30))
    except grpc.RpcError as exc:
        return exc
    return None


def http_post(base: str, path: str, body: dict, token: str = TOKEN) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---- the table itself ---------------------------------------------------------------------------------
def declared_classes() -> list[type]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, errors.InferenceError) and c is not errors.InferenceError]


def test_every_declared_error_has_a_real_code_and_its_http_status():
    classes = declared_classes()
    assert len(classes) >= 17
    for cls in classes:
        code = grpc.StatusCode[cls.grpc_code]                    # a real canonical code
        assert cls.http_status == errors.HTTP_STATUS[code.name], cls  # one gRPC -> HTTP mapping for all
        assert code != grpc.StatusCode.OK


def test_errors_are_declared_once():
    """The modules that raise them re-export errors.py's classes; none declares its own."""
    for module, names in ((manager, ["AdapterAccessError", "AdapterNotFoundError", "AdapterCapacityError",
                                     "AdapterBusyError", "AdapterLoadError"]),
                          (adapter_source, ["RegistryUnavailableError", "RegistryAdapterNotFound", "DigestMismatchError",
                                            "RegistryAccessError", "RegistryRequestError"]),
                          (async_llm, ["EngineDeadError", "EngineStepError"]),
                          (core, ["InvalidRequestError", "QueueFullError", "ShuttingDownError"]),
                          (chat_template, ["ChatTemplateError"])):
        for name in names:
            assert getattr(module, name) is getattr(errors, name), f"{module.__name__}.{name}"


@pytest.mark.parametrize("cls", [KeyError, IndexError, ValueError, PermissionError, LookupError, RuntimeError])
def test_builtin_exceptions_are_internal(cls, caplog):
    with caplog.at_level(logging.ERROR, logger="loraserve.inference.errors"):
        st = errors.status_of(cls("/srv/secret/path"), "unit test", "req-42")
    assert (st.code, st.http_status) == ("INTERNAL", 500)
    assert st.message.startswith("internal error (reference ") and "secret" not in st.message
    assert "req-42" in caplog.records[-1].getMessage() and caplog.records[-1].exc_info is not None


def test_adapter_format_error_is_a_client_error():
    st = errors.status_of(AdapterFormatError("tensor 'x' has shape (3,)"))
    assert (st.code, st.http_status) == ("INVALID_ARGUMENT", 400) and "shape" in st.message


# ---- both fronts, one server ---------------------------------------------------------------------------
def test_internal_exception_is_internal_on_both_fronts_with_the_request_id_logged(stack, caplog, monkeypatch):
    """Fault injection: the tokenizer (our code, on the engine thread) raising KeyError / ValueError,
    which the old tables turned into NOT_FOUND / INVALID_ARGUMENT."""
    tokenizer = stack["srv"].core.tokenizer
    for raised in (KeyError("vocab slot 17"), ValueError("bad merge table")):
        def broken_encode(text, *args, **kwargs):
            raise raised
        monkeypatch.setattr(tokenizer, "encode", broken_encode)
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            err = grpc_generate(stack["stub"], pb.GenerateRequest(text="hello", request_id="rid-grpc-1",
                                                                  sampling_params=pb.SamplingParams(max_tokens=2)))
            status, body = http_post(stack["http"], "/v1/completions", {"prompt": "hello", "max_tokens": 2})
        assert err is not None and err.code() == grpc.StatusCode.INTERNAL, err
        assert status == 500 and body["error"]["type"] == "server_error", body
        assert str(raised.args[0]) not in err.details() + body["error"]["message"]
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("internal error ")]
        assert len(lines) == 2, lines
        assert "rid-grpc-1" in lines[0] and lines[0].split()[2] in err.details()
        assert "cmpl-" in lines[1] and lines[1].split()[2] in body["error"]["message"]
        monkeypatch.undo()
    assert grpc_generate(stack["stub"], pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]))) is None  # still serving


def test_internal_exception_in_a_unary_call_is_internal(stack, monkeypatch):
    """Every unary RPC answers from the table too (grpc's default would be UNKNOWN with the text)."""
    def broken(*args, **kwargs):
        raise KeyError("no such id")
    core = stack["srv"].core
    monkeypatch.setattr(core.tokenizer, "id_to_tokens", broken)
    for name in ("model_info", "adapter_cache", "stats"):
        monkeypatch.setattr(core, name, broken)
    for method, req in ((stack["stub"].Tokenize, pb.TokenizeRequest(text="hi")),
                        (stack["stub"].GetModelInfo, pb.GetModelInfoRequest()),
                        (stack["stub"].ListLoadedAdapters, pb.ListLoadedAdaptersRequest()),
                        (stack["stub"].GetServerStats, pb.GetServerStatsRequest())):
        with pytest.raises(grpc.RpcError) as err:
            method(req, metadata=AUTH, timeout=30)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "no such id" not in err.value.details(), method
    with pytest.raises(grpc.RpcError) as err:  # declared errors from unary calls keep their code
        stack["stub"].UnloadAdapter(pb.UnloadAdapterRequest(), metadata=AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def cases(stack) -> list[tuple[str, pb.GenerateRequest, dict, str]]:
    lora = lambda **kw: dict(lora_int_id=9, **kw)  # noqa: E731
    return [
        ("token id out of range", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10**6])),
         {"prompt": [5, 10**6]}, "INVALID_ARGUMENT"),
        ("prompt longer than max_seq_len", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 5000)),
         {"prompt": [5] * 5000}, "INVALID_ARGUMENT"),
        ("adapter neither loaded nor given a path", pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[5]), lora_request=pb.LoraRequest(**lora(lora_name="ghost"))),
         {"prompt": [5], "lora_request": lora(lora_name="ghost")}, "NOT_FOUND"),
        ("lora_path outside the allowed dirs", pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[5]), lora_request=pb.LoraRequest(**lora(lora_name="o", lora_path=str(stack["outside"])))),
         {"prompt": [5], "lora_request": lora(lora_name="o", lora_path=str(stack["outside"]))}, "PERMISSION_DENIED"),
        ("lora_path missing", pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[5]), lora_request=pb.LoraRequest(**lora(lora_name="m", lora_path=str(stack["allowed"] / "nope")))),
         {"prompt": [5], "lora_request": lora(lora_name="m", lora_path=str(stack["allowed"] / "nope"))}, "NOT_FOUND"),
    ]


def test_declared_errors_map_identically_on_both_fronts(stack):
    for what, req, body, code in cases(stack):
        req.sampling_params.CopyFrom(pb.SamplingParams(max_tokens=2))
        err = grpc_generate(stack["stub"], req)
        assert err is not None and err.code().name == code, (what, err)
        status, resp = http_post(stack["http"], "/v1/completions", {**body, "max_tokens": 2})
        assert status == errors.HTTP_STATUS[code], (what, status, resp)
        assert resp["error"]["message"] == err.details(), what  # one message too


def test_busy_adapter_unload_is_failed_precondition(stack):
    """AdapterBusyError: FAILED_PRECONDITION (409 in the table) while a request holds the adapter."""
    stub = stack["stub"]
    loaded = stub.LoadAdapter(pb.LoadAdapterRequest(lora_request=pb.LoraRequest(
        lora_name="good", lora_int_id=21, lora_path=str(stack["allowed"] / "good"))), metadata=AUTH, timeout=30)
    stream = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), lora_request=pb.LoraRequest(
        lora_name="good", lora_int_id=21), sampling_params=pb.SamplingParams(max_tokens=400, ignore_eos=True)),
        metadata=AUTH, timeout=60)
    next(stream)   # running: it holds the adapter
    with pytest.raises(grpc.RpcError) as err:
        stub.UnloadAdapter(pb.UnloadAdapterRequest(digest=loaded.adapter.digest), metadata=AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and errors.AdapterBusyError.http_status == 409
    stream.cancel()


# ---- bearer tokens --------------------------------------------------------------------------------------
def test_bearer_tokens_compare_with_hmac_compare_digest_on_both_fronts(stack, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", counting)
    err = grpc_generate(stack["stub"], pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5])),
                        metadata=[("authorization", "Bearer wrong-token")])
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert calls and calls[-1] == (b"wrong-token", TOKEN.encode())
    calls.clear()
    status, _ = http_post(stack["http"], "/v1/completions", {"prompt": [5], "max_tokens": 1}, token="other")
    assert status == 401 and calls and calls[-1] == (b"other", TOKEN.encode())
    calls.clear()
    status, _ = http_post(stack["http"], "/v1/completions", {"prompt": [5], "max_tokens": 1})
    assert status == 200 and calls[-1] == (TOKEN.encode(), TOKEN.encode())


def test_internal_exception_in_the_http_front_logs_the_request_id(stack, caplog, monkeypatch):
    """Outside generate too (here the echo of a token-id prompt): 500, and the one log line names the
    request id the client got nothing else of."""
    def broken_decode(ids):
        raise KeyError("decoder table")
    monkeypatch.setattr(stack["srv"].core, "decode", broken_decode)
    with caplog.at_level(logging.ERROR):
        status, body = http_post(stack["http"], "/v1/completions", {"prompt": [5, 6], "max_tokens": 1, "echo": True})
    assert status == 500 and "decoder table" not in body["error"]["message"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("internal error ")]
    assert len(lines) == 1 and "(request cmpl-" in lines[0] and lines[0].split()[2] in body["error"]["message"]
