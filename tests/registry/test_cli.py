"""`loraserve adapter push|ls|show|pull|tag|rm` against a running registry (in-process CLI)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from loraserve.cli import build_parser, main
from loraserve.registry.config import DEFAULT_ADDRESS


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_adapter_commands(start_registry, artifacts, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    reg = start_registry(auth_token="tok")
    src = artifacts(seed=120, packing="dir")
    at = ["--registry", reg.address]
    w = at + ["--token", "tok"]

    code, out, err = run(capsys, "adapter", "push", str(src), "--name", "cli-lora", "--base-model", "tiny",
                         "--tag", "team=nlp", "--alias", "prod", *w)
    assert code == 0 and out.startswith("pushed cli-lora:1 sha256:") and "rank=4" in out
    assert "push cli-lora" in err  # the progress bar
    code, out, err = run(capsys, "adapter", "push", str(artifacts(seed=121)), "--name", "cli-lora", "-q", *at)
    assert code == 1 and "UNAUTHENTICATED" in err
    code, out, _ = run(capsys, "adapter", "push", str(artifacts(seed=121)), "--name", "cli-lora", "-q", *w)
    assert code == 0 and "cli-lora:2" in out
    code, out, _ = run(capsys, "adapter", "push", str(artifacts(seed=121)), "--name", "cli-lora", "-q", "--exist-ok",
                       *w)
    assert code == 0 and out.startswith("unchanged: cli-lora:2")

    code, out, _ = run(capsys, "adapter", "ls", *at)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("NAME") and len(lines) == 2 and "latest" in lines[1]
    code, out, _ = run(capsys, "adapter", "ls", "--all-versions", "--json", *at)
    assert [(a["name"], a["version"]) for a in json.loads(out)] == [("cli-lora", 1), ("cli-lora", 2)]

    code, out, _ = run(capsys, "adapter", "show", "cli-lora:prod", *at)
    shown = json.loads(out)
    assert (shown["version"], shown["tags"], shown["format"], shown["base_model"]) == (1, {"team": "nlp"}, "hf", "tiny")

    code, out, err = run(capsys, "adapter", "pull", "cli-lora:1", "-o", str(tmp_path), *at)
    path = Path(out.strip())
    assert code == 0 and path.parent == tmp_path and "pull cli-lora" in err
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == shown["digest"]

    code, out, _ = run(capsys, "adapter", "tag", "cli-lora:2", "stage=canary", "--alias", "canary", *w)
    tagged = json.loads(out)
    assert code == 0 and tagged["tags"] == {"stage": "canary"} and "canary" in tagged["aliases"]
    code, out, _ = run(capsys, "adapter", "tag", "cli-lora:2", "--remove", "stage", "--remove-alias", "canary", *w)
    assert json.loads(out)["tags"] == {} and "canary" not in json.loads(out)["aliases"]

    code, out, err = run(capsys, "adapter", "rm", "cli-lora:1", *w)
    assert code == 1 and "FAILED_PRECONDITION" in err and "prod" in err
    code, out, _ = run(capsys, "adapter", "rm", "cli-lora", "--all", "--force", *w)
    assert code == 0 and "versions 1, 2" in out
    code, out, err = run(capsys, "adapter", "show", "cli-lora", *at)
    assert code == 1 and "NOT_FOUND" in err


def test_serve_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORASERVE_REGISTRY_TOKEN", raising=False)
    args = build_parser().parse_args(["registry", "serve"])
    from loraserve.registry.cli import build_config

    config = build_config(args)
    assert args.address is None and DEFAULT_ADDRESS == "127.0.0.1:50052"
    assert (config.data_dir, config.store, config.auth_token, config.read_token) == (
        Path("var/registry"), "local", None, None)


def test_serve_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "registry.yaml"
    cfg.write_text("registry:\n  store: s3\n  s3: {bucket: b, endpoint_url: 'http://127.0.0.1:9000'}\n"
                   "  max_rank: 32\n")
    args = build_parser().parse_args(["registry", "serve", "--config", str(cfg), "--max-rank", "16",
                                      "--data-dir", str(tmp_path / "d")])
    from loraserve.registry.cli import build_config

    config = build_config(args)
    assert (config.store, config.s3.bucket, config.s3.endpoint_url, config.max_rank) == (
        "s3", "b", "http://127.0.0.1:9000", 16)
    assert config.data_dir == tmp_path / "d"
    bad = tmp_path / "bad.yaml"
    bad.write_text("registry:\n  max_rnak: 3\n")
    with pytest.raises(ValueError, match="max_rnak"):
        build_config(build_parser().parse_args(["registry", "serve", "--config", str(bad)]))
