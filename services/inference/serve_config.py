"""Configuration of the inference service: loraserve's own keys plus the engine's.

One YAML file may hold both: TensorRT-LLM's `extra_llm_api_options` keys (lora_config,
peft_cache_config, kv_cache_config, max_batch_size, ...) go to the engine, loraserve's keys
(below) configure the service. `--extra_llm_api_options FILE` and `--config FILE` are read
the same way; command-line flags win over files.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from loraserve.config import (EngineConfig, KvCacheConfig, LoraConfig, PeftCacheConfig, engine_config_from_kwargs,
                              load_extra_llm_api_options)
from loraserve.options import ConfigError, known_engine_keys, normalize_engine_options, unknown_key

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
_NESTED = {"lora_config": LoraConfig, "peft_cache_config": PeftCacheConfig, "kv_cache_config": KvCacheConfig}
_NESTED_FIELDS = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in _NESTED.items()}
_ENGINE_KEYS = known_engine_keys(_ENGINE_FIELDS)


@dataclass(slots=True)
class ServeConfig:
    model: str | None = None                 # None: the embedded default model
    host: str = "127.0.0.1"
    port: int = 50051
    registry_address: str | None = "127.0.0.1:50052"
    registry_token: str | None = None
    registry_timeout_s: float = 30.0
    allowed_lora_dirs: list[str] = field(default_factory=list)  # lora_path must lie under one; [] = none allowed
    adapter_cache_dir: str = "var/adapter-cache"
    metrics_port: int | None = None          # Prometheus /metrics on a side HTTP port
    openai_port: int | None = None           # OpenAI-compatible HTTP front
    openai_host: str | None = None           # default: same as host
    max_queue_size: int = 1024               # waiting + running requests before RESOURCE_EXHAUSTED
    auth_token: str | None = None            # bearer token required on every inference call when set
    tls_cert_file: str | None = None         # serve gRPC over TLS with this certificate chain (PEM) ...
    tls_key_file: str | None = None          # ... and private key
    registry_ca_file: str | None = None      # talk TLS to the registry, trusting this CA (PEM)
    llm_kwargs: dict[str, Any] = field(default_factory=dict)   # engine options (TensorRT-LLM names)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        self.allowed_lora_dirs = [os.path.abspath(d) for d in self.allowed_lora_dirs]
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        # an empty token would silently mean "no auth" (issue 9.5): refuse it instead
        for key in ("auth_token", "registry_token"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ValueError(f"{key} is empty; leave it unset for no token")


_OWN_KEYS = {f.name for f in dataclasses.fields(ServeConfig)} - {"llm_kwargs"}


def _yaml_error() -> type[Exception]:
    import yaml

    return yaml.YAMLError


def load_serve_config(paths: list[str], overrides: dict[str, Any]) -> ServeConfig:
    """Merge YAML files (in order) and then non-None command-line overrides. Every key is checked here,
    before any port is bound: an unknown or unsupported one is a ConfigError naming it and its file."""
    own: dict[str, Any] = {}
    llm: dict[str, Any] = {}
    for path in paths:
        try:
            data = load_extra_llm_api_options(path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except (ValueError, _yaml_error()) as exc:
            raise ConfigError(f"{path}: not a valid options file: {exc}") from exc
        nested = data.pop("loraserve", None) or {}
        if not isinstance(nested, dict):
            raise ConfigError(f"{path}: 'loraserve' must be a mapping of loraserve's own keys")
        for key in nested:
            if key not in _OWN_KEYS:
                raise unknown_key(key, _OWN_KEYS, f"{path}: ", kind="loraserve option")
        file_llm = {k: v for k, v in data.items() if k not in _OWN_KEYS}
        for key in file_llm:
            if key not in _ENGINE_KEYS:
                raise unknown_key(key, _ENGINE_KEYS | _OWN_KEYS, f"{path}: ", _NESTED_FIELDS, kind="option")
        # the engine keys of this file alone, so that a typo is reported with this file's name
        normalize_engine_options(file_llm, _ENGINE_FIELDS, _NESTED, f"{path}: ") if file_llm else None
        for key, value in {**data, **nested}.items():
            (own if key in _OWN_KEYS else llm)[key] = value
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _OWN_KEYS:
            own[key] = value
        else:
            llm[key] = value
    where = f"{', '.join(paths)}: " if paths else ""
    engine_config_from_kwargs(own.get("model") or "<model>", where, **llm)  # values checked now, not after load
    try:
        return ServeConfig(**own, llm_kwargs=llm)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}{exc}") from exc
