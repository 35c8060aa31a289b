"""prepare-dataset: JSON-lines fields (trtllm-bench's), length distributions, task id popularity."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from loraserve.cli import main
from loraserve.inference.bench.dataset import BenchRequest, model_vocab, popularity_weights, read_jsonl


def prepare(tmp_path, *args) -> str:
    out = str(tmp_path / "data.jsonl")
    assert main(["bench", "prepare-dataset", *args, "--output", out]) == 0
    return out


def test_lora_dir_rows_roundtrip(tmp_path, bench_model):
    out = prepare(tmp_path, "--model", bench_model, "--num-requests", "200", "--input-min", "5", "--input-max", "9",
                  "--output-mean", "7", "--output-stdev", "2", "--rand-task-id", "2", "5", "--lora-dir", "/loras")
    lines = [json.loads(x) for x in open(out)]
    assert len(lines) == 200
    vocab, special, _ = model_vocab(bench_model)
    for i, d in enumerate(lines):
        assert set(d) == {"task_id", "input_ids", "output_tokens", "lora_request"}
        assert d["task_id"] == i
        assert 5 <= len(d["input_ids"]) <= 9
        assert all(0 <= t < vocab and t not in special for t in d["input_ids"])
        assert d["output_tokens"] >= 1
        k = d["lora_request"]["lora_int_id"]
        assert 2 <= k <= 5
        assert d["lora_request"] == {"lora_name": f"lora_{k}", "lora_int_id": k, "lora_path": os.path.join("/loras", str(k))}
    assert {len(d["input_ids"]) for d in lines} == set(range(5, 10))       # uniform covers [min, max]
    assert {d["lora_request"]["lora_int_id"] for d in lines} == {2, 3, 4, 5}
    assert abs(np.mean([d["output_tokens"] for d in lines]) - 7.5) < 0.6  # ceil(normal(7, 2)): mean ~ 7.5
    reqs = read_jsonl(out)
    assert [r.to_json() for r in reqs] == lines
    assert prepare(tmp_path, "--model", bench_model, "--num-requests", "200", "--input-min", "5", "--input-max", "9",
                   "--output-mean", "7", "--output-stdev", "2", "--rand-task-id", "2", "5", "--lora-dir", "/loras")
    assert [json.loads(x) for x in open(out)] == lines  # deterministic given the seed


def test_zipf_popularity_matches_its_law(tmp_path, bench_model):
    n = 4000
    out = prepare(tmp_path, "--model", bench_model, "--num-requests", str(n), "--input-mean", "4",
                  "--output-mean", "2", "--rand-task-id", "10", "17", "--lora-dir", "/l", "--popularity", "zipf",
                  "--zipf-alpha", "1.2")
    counts = Counter(r.lora_request["lora_int_id"] for r in read_jsonl(out))
    assert set(counts) <= set(range(10, 18))
    expected = popularity_weights(8, "zipf", 1.2) * n   # p_k ~ (k+1)^-1.2, independently computed below too
    ref = np.array([(k + 1) ** -1.2 for k in range(8)])
    assert np.allclose(expected, ref / ref.sum() * n)
    observed = np.array([counts.get(10 + k, 0) for k in range(8)])
    chi2 = float((((observed - expected) ** 2) / expected).sum())
    assert chi2 < 24.3, (observed, expected)  # chi-square, 7 dof, p = 0.001
    assert observed[0] > 2 * observed[3]


def test_registry_adapter_rows_and_constant_lengths(tmp_path, bench_model):
    out = prepare(tmp_path, "--model", bench_model, "--num-requests", "50", "--input-mean", "6",
                  "--output-mean", "3", "--adapters", "alpha", "beta:2", "gamma:prod")
    reqs = read_jsonl(out)
    assert {r.adapter for r in reqs} == {"alpha", "beta:2", "gamma:prod"}
    assert all(r.lora_request is None and len(r.input_ids) == 6 and r.output_tokens == 3 for r in reqs)


def test_base_only_rows_and_trtllm_prompt_rows(tmp_path, bench_model):
    out = prepare(tmp_path, "--model", bench_model, "--num-requests", "3", "--input-mean", "4", "--output-mean", "2")
    assert all(set(json.loads(x)) == {"task_id", "input_ids", "output_tokens"} for x in open(out))
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"task_id": 0, "prompt": "hello", "output_tokens": 5}\n\n')
    (r,) = read_jsonl(str(p))
    assert r.prompt == "hello" and r.input_ids is None and r.output_tokens == 5 and r.adapter_key is None


@pytest.mark.parametrize("args", [
    ["--rand-task-id", "5", "2", "--lora-dir", "/l"],
    ["--rand-task-id", "0", "3"],                                  # task ids without adapters
    ["--adapters", "a", "b", "--rand-task-id", "0", "2"],          # id 2 does not index 2 adapters
    ["--input-min", "9", "--input-max", "3"],
    ["--num-requests", "0"],
])
def test_bad_arguments_exit_2(tmp_path, bench_model, args, capsys):
    argv = ["bench", "prepare-dataset", "--model", bench_model, "--output", str(tmp_path / "x.jsonl")]
    if "--num-requests" not in args:
        argv += ["--num-requests", "4"]
    assert main(argv + args) == 2
    assert "error:" in capsys.readouterr().err


def test_bad_dataset_lines_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"task_id": 0, "input_ids": [1, 2], "output_tokens": 3}\n{"task_id": 1, "input_ids": [1]}\n')
    with pytest.raises(ValueError, match="line 2: output_tokens"):
        read_jsonl(str(p))
    with pytest.raises(ValueError, match="input_ids or prompt"):
        BenchRequest.from_json({"output_tokens": 3})
