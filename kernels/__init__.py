"""Batched multi-LoRA kernels (punica SGMV style) and their pure-torch references.

Triton is optional: without it only the references (and ``lora_apply``'s CPU path) work.
"""
from ._triton import triton_available
from .lora_apply import lora_apply, use_triton
from .lora_expand import lora_expand
from .lora_meta import LoRAMeta, LoRAMetaBuilder
from .lora_shrink import lora_shrink
from .reference import lora_expand_ref, lora_shrink_ref

__all__ = [
    "LoRAMeta", "LoRAMetaBuilder", "lora_apply", "lora_expand", "lora_expand_ref",
    "lora_shrink", "lora_shrink_ref", "triton_available", "use_triton",
]
