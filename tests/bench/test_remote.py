"""bench throughput against servers started as the README says (issue 13.9): a --lora-dir dataset is
refused with a hint unless --registry is given (then its adapters are pushed and named); the OpenAI
HTTP target; ITL, goodput with SLOs, --percentile-metrics / --metric-percentiles, --no-streaming."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from loraserve.cli import main
from loraserve.inference.bench.dataset import read_jsonl
from loraserve.inference.bench.report import build_report, parse_slos
from loraserve.inference.bench.runner import InProcessTarget, run_benchmark
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry

NUM = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bench_model, lora_dir) -> str:
    out = str(tmp_path_factory.mktemp("remote_data") / "data.jsonl")
    assert main(["bench", "prepare-dataset", "--model", bench_model, "--num-requests", str(NUM),
                 "--input-min", "6", "--input-max", "16", "--output-min", "3", "--output-max", "8",
                 "--rand-task-id", "0", "3", "--lora-dir", lora_dir, "--popularity", "zipf", "--output", out]) == 0
    return out


@pytest.fixture(scope="module")
def readme_stack(tmp_path_factory, bench_model):
    """Registry + inference (gRPC and OpenAI HTTP) as the README starts them: no --allowed-lora-dir."""
    root = tmp_path_factory.mktemp("readme")
    with RunningRegistry(RegistryConfig(data_dir=root / "registry")) as reg:
        cfg = ServeConfig(model=bench_model, port=0, openai_port=0, registry_address=reg.address,
                          adapter_cache_dir=str(root / "cache"),
                          llm_kwargs=dict(dtype="float32", device="cpu", lora_config={"max_lora_rank": 8}))
        with RunningInference(cfg) as srv:
            yield reg, srv


def test_lora_dir_dataset_needs_registry_and_says_so(readme_stack, dataset, tmp_path, capsys):
    reg, srv = readme_stack
    rc = main(["bench", "throughput", "--dataset", dataset, "--address", srv.address, "--warmup", "0",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--registry HOST:PORT" in err and "--allowed-lora-dir" in err
    report_path = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--dataset", dataset, "--address", srv.address, "--registry", reg.address,
               "--warmup", "0", "--no-progress", "--report-json", str(report_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(report_path.read_text())
    reqs = read_jsonl(dataset)
    assert report["num_completed"] == NUM and report["total_output_tokens"] == sum(r.output_tokens for r in reqs)
    used = {r.lora_request["lora_path"] for r in reqs if r.lora_request}
    assert f"pushed {len(used)} adapters" in captured.err
    assert all(k.startswith("bench-") and k.endswith(":1") for k in report["requests_per_adapter"] if k != "<base>")
    # pushing again is idempotent: the same bytes are the same version
    assert main(["bench", "throughput", "--dataset", dataset, "--address", srv.address, "--registry", reg.address,
                 "--warmup", "0", "--no-progress", "--num-requests", "2"]) == 0


def test_openai_http_target(readme_stack, dataset, tmp_path, capsys):
    reg, srv = readme_stack
    url = f"http://127.0.0.1:{srv.running.openai.port}/v1"
    report_path = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--dataset", dataset, "--openai-url", url, "--registry", reg.address,
               "--concurrency", "4", "--warmup", "1", "--no-progress", "--report-json", str(report_path)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    reqs = read_jsonl(dataset)
    assert report["target"].startswith("openai:") and report["num_completed"] == NUM
    assert report["total_output_tokens"] == sum(r.output_tokens for r in reqs)
    assert report["total_input_tokens"] == sum(len(r.input_ids) for r in reqs)
    assert report["ttft_s"]["p50"] is not None and report["itl_s"]["p50"] is not None


@pytest.fixture(scope="module")
def in_process_result(bench_model, dataset):
    async def run():
        target = InProcessTarget(bench_model, dict(dtype="float32", device="cpu", lora_config={"max_lora_rank": 8}))
        await target.start()
        try:
            return await run_benchmark(target, read_jsonl(dataset), concurrency=4, progress=False)
        finally:
            await target.close()

    return asyncio.run(run())


def test_itl_is_the_gaps_between_chunks(in_process_result):
    result = in_process_result
    for r in result.records:
        assert r.ok and len(r.itl) <= r.output_tokens - 1  # one gap per later chunk (a chunk may hold > 1 token)
        assert all(g >= 0 for g in r.itl)
        assert sum(r.itl) <= r.latency - r.ttft + 1e-9  # the gaps lie between the first token and the end
    report = build_report(result, percentiles=(25, 99.9))
    gaps = np.concatenate([r.itl for r in result.records])
    assert report["itl_s"]["p25"] == pytest.approx(float(np.percentile(gaps, 25)))
    assert report["itl_s"]["p99.9"] == pytest.approx(float(np.percentile(gaps, 99.9)))


def test_goodput_counts_requests_meeting_every_slo(in_process_result):
    result = in_process_result
    ttfts = sorted(r.ttft for r in result.records)
    cut = ttfts[len(ttfts) // 2]  # about half meet a TTFT SLO at the median
    slos = parse_slos([f"ttft:{cut * 1000}", "e2el:100000"])
    report = build_report(result, slos=slos)
    expected = sum(1 for r in result.records if r.ttft <= cut and r.latency <= 100.0)
    assert report["num_good"] == expected and 0 < expected < len(result.records)
    assert report["goodput_rps"] == pytest.approx(expected / result.duration)
    assert build_report(result, slos=parse_slos(["tpot:0.000001"]))["num_good"] <= sum(
        1 for r in result.records if r.output_tokens < 2)
    with pytest.raises(ValueError, match="ttft:MS"):
        parse_slos(["latency:5"])


def test_percentile_flags_and_no_streaming(bench_model, dataset, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--dataset", dataset, "--model", bench_model, "--device", "cpu",
               "--dtype", "float32", "--warmup", "0", "--no-progress", "--num-requests", "4",
               "--percentile-metrics", "ttft,itl", "--metric-percentiles", "25,99.9", "--goodput", "e2el:60000",
               "--report-json", str(report_path), "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert rc == 0
    header = next(line for line in out.splitlines() if line.startswith("latency (ms)"))
    assert header.split()[2:] == ["avg", "p25", "p99.9", "max"]
    lines = out.splitlines()
    after = lines[lines.index(header) + 1:]
    assert [line.split()[0] for line in after[:2]] == ["TTFT", "ITL"] and not after[2].strip()  # only those two
    assert "Goodput (req/s)" in out and json.loads(report_path.read_text())["num_good"] == 4
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    rc = main(["bench", "throughput", "--dataset", dataset, "--model", bench_model, "--device", "cpu",
               "--dtype", "float32", "--warmup", "0", "--no-progress", "--num-requests", "3", "--no-streaming",
               "--report-json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert rc == 0 and report["ttft_s"]["avg"] is None and report["e2e_latency_s"]["avg"] > 0
    assert main(["bench", "throughput", "--dataset", dataset, "--model", bench_model, "--no-streaming",
                 "--goodput", "ttft:5", "--no-progress"]) == 2
