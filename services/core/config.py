"""User-facing configuration: the same names, fields and defaults as TensorRT-LLM's LLM API.

`SamplingParams`, `LoRARequest`, `LoraConfig`, `PeftCacheConfig` and the engine's own
`EngineConfig` are slotted dataclasses that check themselves in `__post_init__`, so a bad
value fails where it is written, with a message naming the field.
`load_extra_llm_api_options(path)` reads TensorRT-LLM's `--extra_llm_api_options` YAML.
"""
from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from typing import Any

from .adapters.modules import DEFAULT_TRTLLM_MODULES_TO_HF_MODULES, HF_LINEAR_MODULES, trtllm_to_hf_modules

GiB = 1 << 30


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling, TensorRT-LLM / vLLM names. temperature == 0 means greedy."""

    max_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0                       # 0 (or -1): no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None          # None: none; 0: the chosen token's logprob; N: plus the top N
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    n: int = 1                           # completions per prompt (offline LLM.generate, OpenAI front)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        _check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _check(isinstance(self.top_k, int) and 0 <= self.top_k < 2**31,
               f"top_k must be an int in [0, 2**31) (or -1 for none), got {self.top_k!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**63),
               f"seed must be an int64, got {self.seed!r}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens < 2**31,
               f"min_tokens must be an int below 2**31, got {self.min_tokens!r}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"logprobs must be None or an int in [0, 20], got {self.logprobs!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be ints >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(slots=True)
class LoRARequest:
    """Which adapter a request uses (TensorRT-LLM's positional order: name, int id, path)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_ckpt_source: str = "hf"

    def __post_init__(self) -> None:
        _check(bool(self.lora_name), "lora_name must not be empty")
        _check(isinstance(self.lora_int_id, int) and self.lora_int_id >= 0, f"lora_int_id must be an int >= 0, got {self.lora_int_id!r}")
        _check(self.lora_ckpt_source in ("hf", "nemo"), f"lora_ckpt_source must be 'hf' or 'nemo', got {self.lora_ckpt_source!r}")

    # vLLM spellings
    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path


@dataclass(slots=True)
class LoraConfig:
    """TensorRT-LLM's LoraConfig. Empty lora_target_modules means: every module an adapter
    in lora_dir targets, else all attention and MLP projections."""

    lora_dir: list[str] = field(default_factory=list)
    lora_ckpt_source: str = "hf"
    max_lora_rank: int = 64
    lora_target_modules: list[str] = field(default_factory=list)
    trtllm_modules_to_hf_modules: dict[str, str] = field(default_factory=dict)
    max_loras: int | None = None          # distinct adapters in one batch (and the fewest GPU slots); None: no cap
    max_cpu_loras: int | None = None      # host slots; None: sized from PeftCacheConfig
    max_lora_bytes: int = 2 * GiB         # refuse adapters larger than this

    def __post_init__(self) -> None:
        if isinstance(self.lora_dir, (str, os.PathLike)):
            self.lora_dir = [str(self.lora_dir)]
        self.lora_dir = [str(p) for p in self.lora_dir]
        _check(self.lora_ckpt_source in ("hf", "nemo"), f"lora_ckpt_source must be 'hf' or 'nemo', got {self.lora_ckpt_source!r}")
        _check(self.max_lora_rank >= 1, f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        _check(self.max_loras is None or self.max_loras >= 1, f"max_loras must be >= 1, got {self.max_loras}")
        _check(self.max_cpu_loras is None or self.max_cpu_loras >= 1, f"max_cpu_loras must be >= 1, got {self.max_cpu_loras}")
        if self.max_loras is not None and self.max_cpu_loras is not None:
            _check(self.max_cpu_loras >= self.max_loras, f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        mapping = dict(DEFAULT_TRTLLM_MODULES_TO_HF_MODULES)
        mapping.update(self.trtllm_modules_to_hf_modules or {})
        self.trtllm_modules_to_hf_modules = mapping
        unknown = [m for m in self.lora_target_modules if m not in mapping and m not in HF_LINEAR_MODULES]
        _check(not unknown, f"unknown lora_target_modules {unknown}; known: {sorted(mapping)}")

    def hf_target_modules(self) -> set[str]:
        """HF Llama module names enabled by lora_target_modules (fused names expanded)."""
        return trtllm_to_hf_modules(list(self.lora_target_modules), self.trtllm_modules_to_hf_modules)


@dataclass(slots=True)
class PeftCacheConfig:
    """TensorRT-LLM's PeftCacheConfig. Sizes the GPU tier by memory: num_device_module_layer
    max-rank (layer, module) weights when set, else device_cache_percent of free GPU memory
    (never fewer slots than LoraConfig.max_loras); and the host tier: host_cache_size bytes, or
    LoraConfig.max_cpu_loras adapters."""

    num_host_module_layer: int = 0
    num_device_module_layer: int = 0
    optimal_adapter_size: int = 8
    max_adapter_size: int = 64
    num_put_workers: int = 1
    num_ensure_workers: int = 1
    num_copy_streams: int = 1
    max_pages_per_block_host: int = 24
    max_pages_per_block_device: int = 8
    device_cache_percent: float = 0.02
    host_cache_size: int = GiB
    lora_prefetch_dir: str | None = None

    def __post_init__(self) -> None:
        _check(0.0 < self.device_cache_percent <= 1.0, f"device_cache_percent must be in (0, 1], got {self.device_cache_percent}")
        _check(self.host_cache_size > 0, f"host_cache_size must be > 0 bytes, got {self.host_cache_size}")
        _check(self.max_adapter_size >= 1, f"max_adapter_size must be >= 1, got {self.max_adapter_size}")


class QuantAlgo(str, enum.Enum):
    """TensorRT-LLM's QuantAlgo names. loraserve runs FP8 (e4m3 weights with per-channel scales, per-token
    activation scales) and an FP8 KV cache; the other names are known so that they are refused by name."""

    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    INT8 = "INT8"
    NVFP4 = "NVFP4"
    MIXED_PRECISION = "MIXED_PRECISION"
    NO_QUANT = "NO_QUANT"


SUPPORTED_QUANT_ALGOS = (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)
SUPPORTED_KV_CACHE_QUANT_ALGOS = (QuantAlgo.FP8,)


def _quant_algo(value: Any, field_name: str, supported: tuple[QuantAlgo, ...]) -> QuantAlgo | None:
    if value is None or value == "" or value == QuantAlgo.NO_QUANT or str(value).upper() in ("NONE", "NO_QUANT"):
        return None
    name = value.value if isinstance(value, QuantAlgo) else str(value).upper()
    names = ", ".join(a.value for a in supported)
    if name not in QuantAlgo.__members__:
        raise ValueError(f"{field_name} {value!r} is not a QuantAlgo; loraserve supports {names} (or None)")
    algo = QuantAlgo[name]
    if algo not in supported:
        raise ValueError(f"{field_name} {algo.value} is not supported; loraserve supports {names} (or None)")
    return algo


@dataclass(slots=True)
class QuantConfig:
    """TensorRT-LLM's QuantConfig: QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8).
    Strings ("fp8", "FP8") are accepted and normalised; unsupported algorithms are refused by name."""

    quant_algo: QuantAlgo | str | None = None
    kv_cache_quant_algo: QuantAlgo | str | None = None
    # TensorRT-LLM's exclude_modules: fnmatch patterns of HF module names ("model.layers.0.*",
    # "*.mlp.down_proj") kept in the compute dtype; a fused projection (q/k/v, gate/up) stays
    # unquantized when any of its parts matches. Only for weights quantized at load.
    exclude_modules: list[str] | None = None

    def __post_init__(self) -> None:
        self.quant_algo = _quant_algo(self.quant_algo, "quant_algo", SUPPORTED_QUANT_ALGOS)
        self.kv_cache_quant_algo = _quant_algo(self.kv_cache_quant_algo, "kv_cache_quant_algo",
                                               SUPPORTED_KV_CACHE_QUANT_ALGOS)
        if self.exclude_modules is not None:
            _check(isinstance(self.exclude_modules, (list, tuple)) and all(isinstance(p, str) and p
                                                                           for p in self.exclude_modules),
                   f"quant_config.exclude_modules must be a list of module name patterns, got {self.exclude_modules!r}")
            self.exclude_modules = list(self.exclude_modules)

    @property
    def fp8_weights(self) -> bool:
        return self.quant_algo is not None

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_quant_algo == QuantAlgo.FP8


@dataclass(slots=True)
class KvCacheConfig:
    """TensorRT-LLM's KvCacheConfig (the fields loraserve uses)."""

    free_gpu_memory_fraction: float = 0.9
    max_tokens: int | None = None
    tokens_per_block: int = 16
    dtype: str = "auto"
    enable_block_reuse: bool = True       # prefix caching, keyed by tokens and adapter digest

    def __post_init__(self) -> None:
        _check(0.0 < self.free_gpu_memory_fraction <= 1.0, f"free_gpu_memory_fraction must be in (0, 1], got {self.free_gpu_memory_fraction}")
        _check(self.tokens_per_block in (8, 16, 32, 64, 128), f"tokens_per_block must be one of 8/16/32/64/128, got {self.tokens_per_block}")
        _check(self.dtype in ("auto", "float32", "float16", "bfloat16"),
               f"kv_cache_config.dtype {self.dtype!r} is not supported (the KV cache uses the model dtype: 'auto')")


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs; `LLM(**kwargs)` fills it."""

    model: str
    dtype: str = "auto"                   # auto | float32 | float16 | bfloat16
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    max_num_seqs: int = 256               # TensorRT-LLM: max_batch_size
    max_num_tokens: int = 8192            # token budget of one step (chunked prefill)
    # prompt tokens a step may carry while decode rows ride in it (None: max_num_tokens); keeps a long
    # prefill from stalling every running stream (inter-token latency); scheduler.py says why 256
    max_num_prefill_tokens_with_decode: int | None = 256
    max_seq_len: int | None = None        # default: the model's max_position_embeddings
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False           # vLLM's name: no CUDA graphs for decode
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    lora_config: LoraConfig | None = None
    peft_cache_config: PeftCacheConfig = field(default_factory=PeftCacheConfig)
    seed: int = 0
    num_kv_blocks: int | None = None      # override KV sizing (tests)
    allowed_lora_dirs: list[str] | None = None  # where LoRARequest.lora_path may point; None = anywhere (offline API)
    async_scheduling: bool | None = None  # overlap host work with the device's step; None: on for CUDA
    tensor_parallel_size: int = 1         # TensorRT-LLM/vLLM: shard the model over this many devices of one host
    quant_config: QuantConfig | None = None   # FP8 base weights / KV cache (None: the checkpoint's dtype)
    # TensorRT-LLM's LlmArgs.stream_interval / vLLM's --stream-interval: a running request's output is
    # handed out every N tokens (and at its first and last token), so N-token chunks per stream cost
    # the host and the gRPC side one message instead of N
    stream_interval: int = 1

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "half"),
               f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        _check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check(self.max_num_tokens >= 1, f"max_num_tokens must be >= 1, got {self.max_num_tokens}")
        _check(self.max_num_prefill_tokens_with_decode is None or self.max_num_prefill_tokens_with_decode >= 1,
               f"max_num_prefill_tokens_with_decode must be >= 1 or None, got {self.max_num_prefill_tokens_with_decode}")
        _check(isinstance(self.stream_interval, int) and not isinstance(self.stream_interval, bool)
               and self.stream_interval >= 1, f"stream_interval must be an integer >= 1, got {self.stream_interval!r}")
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
               f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if isinstance(self.kv_cache_config, dict):
            self.kv_cache_config = KvCacheConfig(**self.kv_cache_config)
        if isinstance(self.lora_config, dict):
            self.lora_config = LoraConfig(**self.lora_config)
        if isinstance(self.peft_cache_config, dict):
            self.peft_cache_config = PeftCacheConfig(**self.peft_cache_config)
        if isinstance(self.quant_config, dict):
            self.quant_config = QuantConfig(**self.quant_config)


def engine_config_from_kwargs(model: str, where: str = "", **kwargs: Any) -> EngineConfig:
    """Build an EngineConfig from LLM(...) keyword arguments or a parsed YAML mapping. Every key works
    or is refused by name (options.py holds the table); `where` prefixes messages (a file name)."""
    from .options import ConfigError, normalize_engine_options

    nested = {"lora_config": LoraConfig, "peft_cache_config": PeftCacheConfig, "kv_cache_config": KvCacheConfig}
    names = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
    args = normalize_engine_options(kwargs, names, nested, where)
    try:
        return EngineConfig(model=model, **args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}{exc}") from exc


def load_extra_llm_api_options(path: str) -> dict[str, Any]:
    """Read a TensorRT-LLM `extra_llm_api_options` YAML into a dict of LLM(...) kwargs."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
