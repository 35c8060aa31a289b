"""loraserve: multi-LoRA LLM serving. One base model, many LoRA adapters per batch.

    from loraserve import LLM, SamplingParams, LoraConfig, LoRARequest, PeftCacheConfig
"""
from .config import (EngineConfig, KvCacheConfig, LoraConfig, LoRARequest, PeftCacheConfig,  # noqa: F401
                     QuantAlgo, QuantConfig, SamplingParams)

__all__ = ["LLM", "SamplingParams", "LoraConfig", "LoRARequest", "PeftCacheConfig", "KvCacheConfig",
           "QuantConfig", "QuantAlgo", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the engine pulls in torch and the model: import it only when asked for
    if name == "LLM":
        from loraserve.inference.llm import LLM
        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from loraserve.inference import outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'loraserve' has no attribute {name!r}")
