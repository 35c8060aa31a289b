"""Batched multi-LoRA kernels (punica SGMV style) and their pure-torch references.

Triton is optional: without it only the references (and ``lora_apply``'s CPU path) work.
"""
from ._triton import triton_available
from .activation import silu_and_mul, silu_and_mul_ref
from .lora_apply import lora_apply, use_triton
from .lora_expand import lora_expand
from .lora_fused import lora_shrink_expand
from .lora_meta import LoRAMeta, LoRAMetaBuilder
from .lora_shrink import lora_shrink
from .reference import lora_expand_ref, lora_shrink_ref
from .rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from .rope import apply_rope, apply_rope_ref, rope_cos_sin_cache
from .unified_attention import unified_attention, unified_attention_ref

__all__ = [
    "LoRAMeta", "LoRAMetaBuilder", "lora_apply", "lora_expand", "lora_expand_ref",
    "lora_shrink", "lora_shrink_ref", "triton_available", "unified_attention", "unified_attention_ref",
    "use_triton",
    # fused small ops (llama.py's CUDA path) and the one-launch LoRA kernel
    "apply_rope", "apply_rope_ref", "fused_add_rms_norm", "fused_add_rms_norm_ref", "lora_shrink_expand",
    "rms_norm", "rms_norm_ref", "rope_cos_sin_cache", "silu_and_mul", "silu_and_mul_ref",
]
