"""The smaller things a new user hits first (issue 13.10): clear errors instead of tracebacks, tags after
options, help on every server option, k8s secret not deployed as-is, `make run` on other ports."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from loraserve.adapters.testing import make_peft_adapter
from loraserve.cli import build_parser, main
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry

ROOT = Path(__file__).resolve().parents[2]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_push_of_a_missing_path_is_one_line(tmp_path, capsys):
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "reg")) as reg:
        code, out, err = run(capsys, "adapter", "push", str(tmp_path / "nonexistent"), "--name", "x", "-q",
                             "--registry", reg.address)
    assert code == 1 and "no such file or directory" in err and "Traceback" not in err
    assert str(tmp_path / "nonexistent") in err


def test_tag_takes_key_values_after_options(tmp_path, capsys):
    src = make_peft_adapter(tmp_path / "a", seed=3, r=4)
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "reg")) as reg:
        at = ["--registry", reg.address]
        assert run(capsys, "adapter", "push", str(src), "--name", "t", "-q", *at)[0] == 0
        code, _, err = run(capsys, "adapter", "tag", "t", "--alias", "prod", "team=nlp", "stage=beta", *at)
        assert code == 0, err
        code, out, _ = run(capsys, "adapter", "show", "t:prod", *at)
        shown = json.loads(out)
        assert shown["tags"] == {"team": "nlp", "stage": "beta"} and "prod" in shown["aliases"]
    with pytest.raises(SystemExit):  # a real unknown option is still an error
        main(["adapter", "tag", "t", "--bogus"])


def option_helps(parser, path: list[str]) -> dict[str, str | None]:
    sub = parser
    for name in path:
        action = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction")
        sub = action.choices[name]
    return {s: a.help for a in sub._actions for s in a.option_strings}


def test_server_and_push_options_have_help():
    parser = build_parser()
    serve = option_helps(parser, ["registry", "serve"])
    for flag in ("--store", "--s3-bucket", "--s3-prefix", "--s3-endpoint-url"):
        assert serve[flag], flag
    push = option_helps(parser, ["adapter", "push"])
    for flag in ("--name", "--tag", "--alias", "--base-model"):
        assert push[flag], flag


def test_k8s_secret_example_is_not_a_resource():
    kustomization = yaml.safe_load((ROOT / "deploy/k8s/kustomization.yaml").read_text())
    resources = kustomization.get("resources", [])
    assert "secret.example.yaml" not in resources  # applying as-is would deploy the known REPLACE_ME token
    text = (ROOT / "deploy/k8s/kustomization.yaml").read_text() + (ROOT / "deploy/README.md").read_text()
    assert "kubectl create secret" in text  # and how to make the real one is written down


def test_make_run_takes_ports():
    makefile = (ROOT / "Makefile").read_text()
    run_recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    for flag, var in (("--port", "INFERENCE_PORT"), ("--registry-port", "REGISTRY_PORT"),
                      ("--metrics-port", "METRICS_PORT"), ("--openai-port", "OPENAI_PORT")):
        assert f"{flag} $({var})" in run_recipe, var
        assert f'"{flag}"' in (ROOT / "scripts/demo.py").read_text()  # demo.py takes the flag


def test_cpu_kv_cache_is_sized_to_the_model(tmp_path):
    """A few-MB model on CPU gets a KV cache at the 64 MiB floor, not 1 GiB (issue 13.10). With 4096
    positions x 256 sequences the old sizing gave 512 MiB here."""
    from loraserve import LLM, SamplingParams
    from loraserve.inference.model_runner import CPU_KV_MIN_BYTES
    from tests.inference.conftest import make_random_model

    path = str(tmp_path / "m")
    make_random_model(path, "llama", max_position_embeddings=4096)
    llm = LLM(path, dtype="float32", device="cpu")
    runner = llm.engine.runner
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_bytes = 2 * runner.k_cache.numel() * runner.k_cache.element_size()
    assert weights < 8 << 20 and kv_bytes <= 1.01 * CPU_KV_MIN_BYTES  # the floor plus the scratch block
    assert llm.generate("The quick", SamplingParams(max_tokens=3)).outputs[0].token_ids  # and it still serves
