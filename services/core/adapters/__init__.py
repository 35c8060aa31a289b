"""LoRA adapter formats (HF PEFT, NeMo) normalised to per-layer, per-module A/B with the scale in B.

Shared by the inference engine (loading adapters) and the registry (validating uploads).
"""
from .adapter import LoraAdapter
from .bundle import ArchiveLimits, artifact_digest
from .errors import AdapterFormatError
from .loader import check_compatible, detect_format, load_adapter, validate_artifact
from .modules import DEFAULT_TRTLLM_MODULES_TO_HF_MODULES, HF_LINEAR_MODULES, trtllm_to_hf_modules
from .writer import write_nemo_adapter, write_peft_adapter

__all__ = [
    "AdapterFormatError", "ArchiveLimits", "LoraAdapter", "artifact_digest", "check_compatible", "detect_format",
    "load_adapter", "validate_artifact", "DEFAULT_TRTLLM_MODULES_TO_HF_MODULES",
    "HF_LINEAR_MODULES", "trtllm_to_hf_modules", "write_peft_adapter", "write_nemo_adapter",
]
