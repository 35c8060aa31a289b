"""Issue 13.4: request metrics are recorded once, in InferenceCore, for every front. An OpenAI HTTP
request and a gRPC request each move the request series by what their own responses report
(usage / GenerateComplete), read back by scraping the metrics port over HTTP and parsing with
prometheus_client's parser; a refused request counts under its code with finish_reason "none";
each request logs one INFO line that the JSON formatter turns into its fields."""
from __future__ import annotations

import io
import json
import logging
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraserve.adapters.testing import make_peft_adapter
from loraserve.config import LoraConfig
from loraserve.inference.request_metrics import AdapterLabels
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.logging_setup import JsonFormatter, setup_logging
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.inference.conftest import make_random_model


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics_fronts")
    model = str(root / "model")
    make_random_model(model, "llama")
    allowed = root / "allowed"
    make_peft_adapter(allowed / "local", seed=7, r=4)
    cfg = ServeConfig(model=model, port=0, openai_port=0, metrics_port=0, registry_address=None,
                      allowed_lora_dirs=[str(allowed)], adapter_cache_dir=str(root / "cache"),
                      llm_kwargs=dict(dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8)))
    with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as channel:
        yield dict(srv=srv, stub=pb_grpc.InferenceServiceStub(channel), model=model, allowed=allowed,
                   http=f"http://127.0.0.1:{srv.running.openai.port}",
                   metrics=f"http://127.0.0.1:{srv.running.metrics_port}/metrics")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def http_post(base: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_moved(before: dict, after: dict, model: str, finish: str, prompt_tokens: int, output_tokens: int,
                 adapter: str = "none") -> None:
    m = dict(model_name=model)
    assert value(after, "loraserve_requests_total", code="OK", finish_reason=finish, **m) \
        == value(before, "loraserve_requests_total", code="OK", finish_reason=finish, **m) + 1
    for name, delta in (("loraserve_prompt_tokens_total", prompt_tokens),
                        ("loraserve_generation_tokens_total", output_tokens),
                        ("loraserve_e2e_request_latency_seconds_count", 1),
                        ("loraserve_time_to_first_token_seconds_count", 1),
                        ("loraserve_request_prompt_tokens_count", 1),
                        ("loraserve_request_prompt_tokens_sum", prompt_tokens),
                        ("loraserve_request_generation_tokens_sum", output_tokens)):
        assert value(after, name, **m) - value(before, name, **m) == delta, name
    assert value(after, "loraserve_e2e_request_latency_seconds_sum", **m) > \
        value(before, "loraserve_e2e_request_latency_seconds_sum", **m)
    assert value(after, "loraserve_adapter_requests_total", adapter=adapter) == \
        value(before, "loraserve_adapter_requests_total", adapter=adapter) + 1


def test_http_completion_moves_the_request_metrics(stack, caplog):
    before = scrape(stack["metrics"])
    with caplog.at_level(logging.INFO, logger="loraserve.requests"):
        status, body = http_post(stack["http"], "/v1/completions", {"prompt": "The quick brown", "max_tokens": 5,
                                                                    "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    usage = body["usage"]
    assert_moved(before, scrape(stack["metrics"]), stack["model"], "length", usage["prompt_tokens"],
                 usage["completion_tokens"])
    # one INFO line for the request, its fields as JSON keys with --log-format json
    lines = [r for r in caplog.records if r.name == "loraserve.requests" and body["id"] in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    entry = json.loads(JsonFormatter().format(lines[0]))
    assert entry["level"] == "INFO" and entry["request"]["request_id"].startswith(body["id"])
    assert entry["request"]["prompt_tokens"] == usage["prompt_tokens"]
    assert entry["request"]["output_tokens"] == usage["completion_tokens"]
    assert entry["request"]["finish_reason"] == "length" and entry["request"]["code"] == "OK"


def test_http_chat_and_adapter_move_the_metrics(stack):
    before = scrape(stack["metrics"])
    status, body = http_post(stack["http"], "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0, "ignore_eos": True,
        "lora_request": {"lora_name": "local", "lora_int_id": 5, "lora_path": str(stack["allowed"] / "local")}})
    assert status == 200, body
    assert_moved(before, scrape(stack["metrics"]), stack["model"], "length", body["usage"]["prompt_tokens"],
                 body["usage"]["completion_tokens"], adapter="local")


def test_grpc_generate_moves_the_request_metrics(stack):
    before = scrape(stack["metrics"])
    req = pb.GenerateRequest(text="The quick brown", sampling_params=pb.SamplingParams(max_tokens=4, temperature=0,
                                                                                        ignore_eos=True))
    complete = [m.complete for m in stack["stub"].Generate(req, timeout=60) if m.WhichOneof("response") == "complete"]
    assert len(complete) == 1
    assert_moved(before, scrape(stack["metrics"]), stack["model"], "length", complete[0].prompt_tokens,
                 complete[0].completion_tokens)


def test_refused_requests_count_under_their_code_on_both_fronts(stack):
    m = dict(model_name=stack["model"], code="INVALID_ARGUMENT", finish_reason="none")
    before = value(scrape(stack["metrics"]), "loraserve_requests_total", **m)
    status, _ = http_post(stack["http"], "/v1/completions", {"prompt": [5, 10**6], "max_tokens": 2})
    assert status == 400
    with pytest.raises(grpc.RpcError) as err:
        list(stack["stub"].Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10**6])), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(stack["metrics"])
    assert value(after, "loraserve_requests_total", **m) == before + 2
    assert all(name != "loraserve_requests_total" or dict(labels).get("code") != "OK" or
               dict(labels)["finish_reason"] != "none" for name, labels in after)  # OK always has a finish


def test_adapter_labels_are_bounded():
    labels = AdapterLabels(max_labels=3)
    got = [labels.label(f"a{i}:1") for i in range(10)] + [labels.label(None), labels.label("a0:7")]
    assert got[:3] == ["a0", "a1", "a2"] and set(got[3:10]) == {"other"}
    assert got[10:] == ["none", "a0"]   # versions share their name's series


def test_setup_logging_json_writes_one_object_a_line():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers[:] = []   # as in a fresh `loraserve serve` process (pytest's handlers back below)
        setup_logging("INFO", "json", stream=stream)
        logging.getLogger("loraserve.test").info("hello %s", "world", extra={"request": {"request_id": "r1"}})
        try:
            raise KeyError("boom")
        except KeyError:
            logging.getLogger("loraserve.test").exception("failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["message"] == "hello world" and first["request"] == {"request_id": "r1"}
    assert first["logger"] == "loraserve.test" and first["level"] == "INFO"
    assert second["level"] == "ERROR" and "KeyError" in second["exc_info"]
    with pytest.raises(ValueError, match="log format"):
        setup_logging("INFO", "xml")


def test_per_adapter_running_and_active_requests(stack):
    """vLLM's lora_requests_info, per bounded label: a stream in flight on adapter 'local' shows as
    running (the engine's count, GetServerStats, is the reference) and active; gone when it ends."""
    stub = stack["stub"]
    stream = stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[5, 6]), sampling_params=pb.SamplingParams(max_tokens=400, ignore_eos=True),
        lora_request=pb.LoraRequest(lora_name="local", lora_int_id=5, lora_path=str(stack["allowed"] / "local"))),
        timeout=60)
    next(stream)   # its first token: admitted and running
    during = scrape(stack["metrics"])
    assert stub.GetServerStats(pb.GetServerStatsRequest(), timeout=30).running_requests == 1
    assert value(during, "loraserve_adapter_running_requests", adapter="local") == 1
    assert value(during, "loraserve_adapter_active_requests", adapter="local") == 1
    assert value(during, "loraserve_adapter_waiting_requests", adapter="local") == 0
    stream.cancel()
    for _ in range(100):
        after = scrape(stack["metrics"])
        if value(after, "loraserve_adapter_active_requests", adapter="local") == 0 and \
                value(after, "loraserve_adapter_running_requests", adapter="local") == 0:  # the abort reached the engine
            break
        time.sleep(0.05)
    assert value(after, "loraserve_adapter_running_requests", adapter="local") == 0
    assert value(after, "loraserve_adapter_active_requests", adapter="local") == 0


@pytest.mark.parametrize("argv", [["serve", "--log-format", "json"], ["--log-format", "json", "serve"],
                                  ["registry", "serve", "--log-format", "json"]])
def test_log_format_option_on_both_servers(argv):
    from loraserve.cli import build_parser

    assert build_parser().parse_known_args(argv)[0].log_format == "json"
    plain = [a for a in argv if a not in ("--log-format", "json")]
    assert build_parser().parse_known_args(plain)[0].log_format == "text"
