"""Options are honoured or refused by name (issue 13.2): every key of the YAML (--extra_llm_api_options /
--config) and of LLM(**kwargs) works or fails with a message naming it, its file, and a 'did you mean'."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from loraserve.config import LoraConfig, engine_config_from_kwargs
from loraserve.inference.serve_config import load_serve_config
from loraserve.options import ACCEPTED_VALUES, ConfigError


def write(tmp_path, text: str, name: str = "opts.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("yaml_text, needle", [
    ("lora_confg:\n  max_lora_rank: 8\n", "unknown option 'lora_confg' (did you mean 'lora_config'?)"),
    ("lora_config:\n  max_lora_rnk: 8\n", "lora_config.max_lora_rnk (did you mean 'max_lora_rank'?)"),
    ("peft_cache_config:\n  host_cache_sise: 10\n", "did you mean 'host_cache_size'?"),
    ("kv_cache_config:\n  enable_partial_reuse: true\n", "unknown option kv_cache_config.enable_partial_reuse"),
    ("pipeline_parallel_size: 8\n", "pipeline_parallel_size: 8 is refused: pipeline parallelism"),
    ("tensor_parallel_size: 0\n", "tensor_parallel_size must be an integer >= 1"),
    ("max_lora_rank: 8\n", "'max_lora_rank' belongs under lora_config"),
    ("metrics_prt: 9400\n", "did you mean 'metrics_port'?"),
    ("loraserve:\n  registry_adress: x:1\n", "unknown loraserve option 'registry_adress' (did you mean 'registry_address'?)"),
    ("max_batch_size: 0\n", "max_num_seqs must be >= 1"),
    ("backend: tensorrt\n", "backend: 'tensorrt' is refused"),
    ("cuda_graph_config:\n  batch_sizes: [1, 2]\n", "cuda_graph_config"),
    ("lora_config: [1\n", "not a valid options file"),
])
def test_yaml_keys_are_refused_by_name_with_the_file(tmp_path, yaml_text, needle):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_serve_config([path], {})
    assert needle in str(info.value)
    assert str(info.value).startswith(path)  # the file is named


def test_accepted_keys_work(tmp_path):
    path = write(tmp_path, "backend: pytorch\ntensor_parallel_size: 1\nmax_beam_width: 1\ntrust_remote_code: true\n"
                           "cuda_graph_config: null\nenable_lora: true\nmax_batch_size: 4\nport: 6001\n")
    cfg = load_serve_config([path], {})
    ec = engine_config_from_kwargs("m", **cfg.llm_kwargs)
    assert cfg.port == 6001 and ec.max_num_seqs == 4
    assert ec.enforce_eager is True  # TensorRT-LLM: cuda_graph_config null = no CUDA graphs
    assert isinstance(ec.lora_config, LoraConfig)  # enable_lora turns LoRA on with defaults


def test_llm_kwargs_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"unknown engine option 'lora_confg' \(did you mean 'lora_config'\?\)"):
        engine_config_from_kwargs("m", lora_confg={})
    with pytest.raises(ConfigError, match=r"max_lora_rnk \(did you mean 'max_lora_rank'\?\)"):
        engine_config_from_kwargs("m", lora_config={"max_lora_rnk": 8})
    for key, rule in ACCEPTED_VALUES.items():  # every refusal says why, with the key's name
        if rule.why:
            with pytest.raises(ConfigError, match=key):
                engine_config_from_kwargs("m", **{key: 99})


def test_serve_refuses_a_typo_before_binding_any_port(tmp_path):
    """`loraserve serve --extra_llm_api_options bad.yaml` exits 2 with the message, no traceback, and never
    binds its port (a listener checks it stayed free)."""
    path = write(tmp_path, "lora_config:\n  max_lora_rnk: 8\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "loraserve.cli", "serve", "--port", str(port), "--registry", "none",
                           "--extra_llm_api_options", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: unknown option lora_config.max_lora_rnk (did you mean 'max_lora_rank'?)" in proc.stderr
    assert "Traceback" not in proc.stderr and "listening" not in proc.stdout
