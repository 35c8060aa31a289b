"""Which engine options exist, which work, and which are refused: one declarative table.

`LLM(**kwargs)` and TensorRT-LLM's `extra_llm_api_options` YAML share these keys. Every key
either works (it is an `EngineConfig` field, a TensorRT-LLM alias of one, or a TensorRT-LLM key
whose accepted values are what loraserve does anyway) or is refused with a `ConfigError` that
names it, says why, and for a typo suggests the closest known key ("did you mean ...").
Nested mappings (lora_config, peft_cache_config, kv_cache_config) are checked the same way
against their dataclass fields.

Why a table and not pydantic (TensorRT-LLM's LlmArgs uses pydantic `extra="forbid"`): pydantic
is not installed on the GPU image, and the config dataclasses already check every value in
`__post_init__`; what was missing is the key check, which is a set lookup plus difflib.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration key or value that loraserve does not honour; the message names it."""


@dataclasses.dataclass(frozen=True)
class Accepted:
    """A TensorRT-LLM key that is accepted only with values that match what loraserve does."""

    ok: Callable[[Any], bool]
    why: str                      # said when the value is refused


def _falsy(v: Any) -> bool:
    return v in (None, False, 0, "", {}, [])


def _one(v: Any) -> bool:
    return v in (None, 1)


# TensorRT-LLM spellings of EngineConfig fields.
ALIASES = {"max_batch_size": "max_num_seqs"}

# TensorRT-LLM / vLLM keys with no EngineConfig field: accepted with these values, refused otherwise.
ACCEPTED_VALUES: dict[str, Accepted] = {
    "backend": Accepted(lambda v: v in (None, "pytorch"),
                        "loraserve runs its own PyTorch engine; use backend: pytorch or leave it out"),
    "pipeline_parallel_size": Accepted(_one, "pipeline parallelism is not supported: one engine runs on one GPU"),
    "context_parallel_size": Accepted(_one, "context parallelism is not supported"),
    "moe_expert_parallel_size": Accepted(lambda v: v in (None, 1, -1), "MoE models are not supported"),
    "moe_tensor_parallel_size": Accepted(lambda v: v in (None, 1, -1), "MoE models are not supported"),
    "gpus_per_node": Accepted(lambda v: True, ""),  # placement hint only: meaningful for any count
    "enable_attention_dp": Accepted(_falsy, "attention data parallelism is not supported"),
    "max_beam_width": Accepted(_one, "beam search is not supported (max_beam_width must be 1)"),
    "trust_remote_code": Accepted(lambda v: True, ""),  # loraserve never runs model code from the checkpoint
    "skip_tokenizer_init": Accepted(_falsy, "the tokenizer is needed for text prompts, stop strings and streaming"),
    "disable_overlap_scheduler": Accepted(_falsy, "the scheduler cannot be switched to a non-overlapped mode"),
    "print_iter_log": Accepted(_falsy, "per-iteration logs are not implemented; use --metrics-port (Prometheus)"),
    "enable_iter_perf_stats": Accepted(_falsy, "iteration stats are not implemented; use --metrics-port (Prometheus)"),
    "build_config": Accepted(_falsy, "build_config is for the TensorRT engine build; set max_batch_size, "
                                     "max_num_tokens and max_seq_len at the top level instead"),
    "scheduler_config": Accepted(_falsy, "scheduler policies are not configurable (FCFS with fairness across adapters)"),
    "speculative_config": Accepted(_falsy, "speculative decoding is not supported"),
    "guided_decoding_backend": Accepted(_falsy, "guided decoding is not supported"),
    "enable_prompt_adapter": Accepted(_falsy, "prompt adapters are not supported (LoRA only)"),
    "max_input_len": Accepted(lambda v: v is None, "use max_seq_len (prompt + generated tokens)"),
    "tokenizer": Accepted(lambda v: v is None, "a separate tokenizer is not supported: the model directory's "
                                               "tokenizer.json is used"),
}
# Keys handled by engine_config_from_kwargs itself (mapped onto EngineConfig fields).
MAPPED = {"quant_config", "cuda_graph_config", "enable_lora"}


def known_engine_keys(engine_fields: set[str]) -> set[str]:
    return engine_fields | set(ALIASES) | set(ACCEPTED_VALUES) | MAPPED


def suggest(key: str, known: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(key: str, known: set[str], where: str, nested_owner: dict[str, set[str]] | None = None,
                kind: str = "engine option") -> ConfigError:
    """The error for a key nobody knows: a 'did you mean', or the section it belongs in."""
    msg = f"{where}unknown {kind} {key!r}{suggest(key, known)}"
    for owner, fields in (nested_owner or {}).items():
        if key in fields:
            msg = f"{where}{key!r} belongs under {owner} (write `{owner}: {{{key}: ...}}`)"
            break
    return ConfigError(msg)


def check_nested(name: str, value: Any, cls: type, where: str) -> None:
    """Refuse unknown keys of a nested section (lora_config: {max_lora_rnk: 8}) before the dataclass
    turns them into a TypeError."""
    if not isinstance(value, dict):
        return
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            raise ConfigError(f"{where}unknown option {name}.{key}{suggest(key, fields)}; "
                              f"{name} takes {', '.join(sorted(fields))}")


def normalize_engine_options(kwargs: dict[str, Any], engine_fields: set[str], nested: dict[str, type],
                             where: str = "") -> dict[str, Any]:
    """LLM(...) / YAML keys -> EngineConfig keyword arguments; refuses what does not work.
    `where` prefixes messages (a file name, or 'LLM(): ')."""
    args: dict[str, Any] = {}
    known = known_engine_keys(engine_fields)
    nested_fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in nested.items()}
    for key, value in kwargs.items():
        if key == "quant_config":
            args["quant_config"] = _quant_config(value, where)
        elif key == "cuda_graph_config":  # TensorRT-LLM: null disables CUDA graphs, a mapping enables them
            if value is None or value is False:
                args["enforce_eager"] = True
            elif isinstance(value, dict) and not value or value is True:
                args.setdefault("enforce_eager", False)
            else:
                raise ConfigError(f"{where}cuda_graph_config {value!r}: graph batch sizes are chosen by the engine; "
                                  "use cuda_graph_config: {} (graphs on) or null (off, = enforce_eager: true)")
        elif key == "enable_lora":
            if value and kwargs.get("lora_config") is None:
                args["lora_config"] = {}
            elif not value and kwargs.get("lora_config") is not None:
                raise ConfigError(f"{where}enable_lora: false contradicts lora_config")
        elif key in ACCEPTED_VALUES:
            rule = ACCEPTED_VALUES[key]
            if not rule.ok(value):
                raise ConfigError(f"{where}{key}: {value!r} is refused: {rule.why}")
        elif key in engine_fields or key in ALIASES:
            target = ALIASES.get(key, key)
            if target in nested:
                check_nested(target, value, nested[target], where)
            args[target] = value
        else:
            raise unknown_key(key, known, where, nested_fields)
    return args


def _quant_config(value: Any, where: str):
    """quant_config as a QuantConfig (or None): a QuantConfig, a mapping of its fields (YAML), or a bare
    algorithm name ("fp8"). Unsupported algorithms are refused naming what is supported."""
    from .config import QuantConfig

    try:
        if value is None or isinstance(value, QuantConfig):
            return value
        if isinstance(value, dict):
            check_nested("quant_config", value, QuantConfig, where)
            return QuantConfig(**value)
        return QuantConfig(quant_algo=value)
    except ValueError as exc:
        raise ConfigError(f"{where}quant_config: {exc}") from exc
