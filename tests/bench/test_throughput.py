"""bench throughput on CPU: an in-process run and a run against a real gRPC server; the report's
fields must be consistent with the dataset and with each other (not a speed test)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from loraserve.cli import main
from loraserve.inference.bench.dataset import read_jsonl
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference

NUM = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bench_model, lora_dir) -> str:
    out = str(tmp_path_factory.mktemp("bench_data") / "data.jsonl")
    assert main(["bench", "prepare-dataset", "--model", bench_model, "--num-requests", str(NUM),
                 "--input-min", "8", "--input-max", "24", "--output-min", "2", "--output-max", "10",
                 "--rand-task-id", "0", "3", "--lora-dir", lora_dir, "--popularity", "zipf", "--output", out]) == 0
    # every 4th request on the base model: a mixed batch, as in production
    rows = [json.loads(x) for x in open(out)]
    for d in rows[::4]:
        d.pop("lora_request")
    with open(out, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in rows)
    return out


def check_report(report: dict, dataset_path: str) -> None:
    reqs = read_jsonl(dataset_path)
    assert report["num_requests"] == NUM and report["num_completed"] == NUM and report["num_failed"] == 0
    assert report["num_completed"] + report["num_failed"] == report["num_requests"]
    # ignore_eos: every request produced exactly its output_tokens
    assert report["total_output_tokens"] == sum(r.output_tokens for r in reqs)
    assert report["total_input_tokens"] == sum(len(r.input_ids) for r in reqs)
    d = report["duration_s"]
    assert d > 0
    assert report["output_tokens_per_s"] == pytest.approx(report["total_output_tokens"] / d, rel=1e-9)
    assert report["total_tokens_per_s"] == pytest.approx(
        (report["total_input_tokens"] + report["total_output_tokens"]) / d, rel=1e-9)
    assert report["request_throughput_rps"] == pytest.approx(NUM / d, rel=1e-9)
    for key in ("ttft_s", "tpot_s", "e2e_latency_s"):
        s = report[key]
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], key
        assert s["min"] <= s["avg"] <= s["max"], key
    assert report["ttft_s"]["max"] <= report["e2e_latency_s"]["max"]
    rows = report["requests"]
    assert len(rows) == NUM
    for row in rows:
        assert 0 <= row["start"] < row["first_token"] <= row["end"] <= d + 1e-6
        assert row["ttft"] <= row["latency"]
        if row["output_tokens"] >= 2:  # TPOT = (end - first token) / (tokens - 1)
            assert row["tpot"] * (row["output_tokens"] - 1) + row["ttft"] == pytest.approx(row["latency"], rel=1e-6)
    expected_per_adapter = Counter(r.adapter_key or "<base>" for r in reqs)
    assert report["requests_per_adapter"] == dict(expected_per_adapter)
    assert report["num_adapters"] == len([k for k in expected_per_adapter if k != "<base>"])


def test_in_process_run(tmp_path, bench_model, dataset):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "latency.png"
    rc = main(["bench", "throughput", "--dataset", dataset, "--model", bench_model, "--device", "cpu",
               "--dtype", "float32", "--concurrency", "4", "--warmup", "0", "--no-progress",
               "--extra_llm_api_options", str(_yaml(tmp_path)),
               "--report-json", str(report_path), "--plot", str(plot_path)])
    assert rc == 0
    report = json.loads(report_path.read_text())
    check_report(report, dataset)
    assert report["target"].startswith("in-process") and report["concurrency"] == 4
    # cold start (no warm-up), a host cache large enough for all 4 adapters: each is loaded once
    n_lora = sum(1 for r in read_jsonl(dataset) if r.lora_request)
    host = report["adapter_cache"]["tiers"]["host"]
    assert host["misses"] == report["num_adapters"]
    # one lookup at admission, plus those of the prefetch at arrival / while waiting for a turn (d66fea0)
    assert host["hits"] + host["misses"] >= n_lora
    device = report["adapter_cache"]["tiers"]["device"]
    assert device["misses"] >= report["num_adapters"]             # each adapter entered a GPU slot at least once
    assert device["hits"] + device["misses"] >= n_lora             # one slot lookup per admission (or more)
    assert report["adapter_cache"]["hit_rate"] == pytest.approx(device["hits"] / (device["hits"] + device["misses"]))
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _yaml(tmp_path):
    p = tmp_path / "extra.yaml"
    p.write_text("lora_config:\n  max_lora_rank: 8\n  max_loras: 2\n  max_cpu_loras: 4\n")
    return p


def test_grpc_run_with_request_rate(tmp_path, bench_model, lora_dir, dataset, capsys):
    cfg = ServeConfig(model=bench_model, port=0, registry_address=None, allowed_lora_dirs=[lora_dir],
                      adapter_cache_dir=str(tmp_path / "cache"),
                      llm_kwargs=dict(dtype="float32", device="cpu", lora_config={"max_lora_rank": 8, "max_loras": 2}))
    with RunningInference(cfg) as srv:
        report_path = tmp_path / "report.json"
        rc = main(["bench", "throughput", "--dataset", dataset, "--address", srv.address, "--request-rate", "200",
                   "--concurrency", "8", "--warmup", "1", "--no-progress", "--report-json", str(report_path)])
        assert rc == 0
        stats = srv.core.server_stats()
    report = json.loads(report_path.read_text())
    check_report(report, dataset)
    assert report["target"].startswith("grpc://") and report["request_rate"] == 200
    tiers = report["adapter_cache"]["tiers"]
    assert set(tiers) == {"disk", "host", "device"}
    n_lora = sum(1 for r in read_jsonl(dataset) if r.lora_request)
    # the warm-up request is not counted: misses are the 4 adapters' first loads (1 was warmed up, so <= 4)
    assert tiers["host"]["misses"] <= report["num_adapters"] and tiers["host"]["hits"] + tiers["host"]["misses"] >= n_lora
    assert stats["requests_total"] == NUM + 1 and stats["requests_aborted"] == 0
    out = capsys.readouterr().out
    assert "Request throughput (req/s)" in out and "Adapter cache hit rate" in out


def test_failed_requests_are_counted(tmp_path, bench_model, dataset):
    rows = [json.loads(x) for x in open(dataset)]
    rows[1]["lora_request"] = {"lora_name": "gone", "lora_int_id": 99, "lora_path": str(tmp_path / "missing")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(d) + "\n" for d in rows))
    report_path = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--dataset", str(bad), "--model", bench_model, "--device", "cpu",
               "--warmup", "0", "--no-progress", "--num-requests", "4", "--report-json", str(report_path)])
    assert rc == 1
    report = json.loads(report_path.read_text())
    assert report["num_requests"] == 4 and report["num_failed"] == 1 and report["num_completed"] == 3
    assert any("missing" in msg or "exist" in msg for msg in report["errors"])


def test_grpc_run_with_registry_adapters(tmp_path, bench_model, lora_dir):
    """Rows naming registry adapters ("name", "name:1"): the server fetches them on demand."""
    from loraserve.registry.client import RegistryClient
    from loraserve.registry.config import RegistryConfig
    from loraserve.registry.testing import RunningRegistry

    data = str(tmp_path / "reg.jsonl")
    assert main(["bench", "prepare-dataset", "--model", bench_model, "--num-requests", "10", "--input-mean", "8",
                 "--output-mean", "3", "--adapters", "ad0", "ad1:1", "--output", data]) == 0
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(f"{lora_dir}/0", "ad0")
            client.push(f"{lora_dir}/1", "ad1")
        cfg = ServeConfig(model=bench_model, port=0, registry_address=reg.address,
                          adapter_cache_dir=str(tmp_path / "cache"),
                          llm_kwargs=dict(dtype="float32", device="cpu", lora_config={"max_lora_rank": 8}))
        with RunningInference(cfg) as srv:
            report_path = tmp_path / "report.json"
            assert main(["bench", "throughput", "--dataset", data, "--address", srv.address, "--warmup", "0",
                         "--no-progress", "--report-json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["num_completed"] == 10 and report["total_output_tokens"] == 30
    assert set(report["requests_per_adapter"]) <= {"ad0", "ad1:1"} and report["num_adapters"] >= 1
    disk = report["adapter_cache"]["tiers"]["disk"]
    assert disk["misses"] == report["num_adapters"]          # each adapter downloaded once, then served from disk
    assert disk["hits"] + disk["misses"] == 10
