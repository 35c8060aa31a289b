"""Module names: TensorRT-LLM's LoRA module names and the HF (Llama) linear layers they map to.

TensorRT-LLM users name LoRA targets `attn_q`, `mlp_h_to_4h`, ...; HF PEFT checkpoints name them
`q_proj`, `gate_proj`, .... The mapping below is TensorRT-LLM's default
(`get_default_trtllm_modules_to_hf_modules`). Note that in TensorRT-LLM's GatedMLP `fc`
(`mlp_h_to_4h`) is the activated branch, i.e. HF `gate_proj`, and `gate` (`mlp_gate`) is HF
`up_proj`.
"""
from __future__ import annotations

DEFAULT_TRTLLM_MODULES_TO_HF_MODULES: dict[str, str] = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_qkv": "qkv_proj",
    "attn_dense": "o_proj",
    "mlp_h_to_4h": "gate_proj",
    "mlp_4h_to_h": "down_proj",
    "mlp_gate": "up_proj",
    "mlp_gate_up": "gate_up_proj",
    "moe_h_to_4h": "w1",
    "moe_4h_to_h": "w2",
    "moe_gate": "w3",
    "moe_router": "gate",
}

# The LoRA-capable linear layers of the Llama-family model, in forward order.
HF_LINEAR_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)

# The one table of packed modules: each fused projection of the Llama model and its HF slices, in
# row order of the fused weight. The model (models/llama.py), its checkpoint loader, the GPU adapter
# slots and the adapter parsers all read this table.
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}

# HF names of fused layers that a PEFT checkpoint may target, and the layers they stand for.
FUSED_HF_MODULES: dict[str, tuple[str, ...]] = {k: v for k, v in PACKED_MODULES.items() if len(v) > 1}

# Which sub-block of a decoder layer holds each module (for writing PEFT key names).
HF_MODULE_PARENT: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


def trtllm_to_hf_modules(trtllm_modules: list[str],
                         mapping: dict[str, str] | None = None) -> set[str]:
    """Translate TensorRT-LLM module names (`lora_target_modules`) to HF module names.

    `mapping` overrides/extends the default (TensorRT-LLM's `trtllm_modules_to_hf_modules`).
    Fused names expand: `attn_qkv` -> {q_proj, k_proj, v_proj}, `mlp_gate_up` -> {gate_proj, up_proj}.
    HF names are accepted as-is. Unknown names raise ValueError.
    """
    table = dict(DEFAULT_TRTLLM_MODULES_TO_HF_MODULES)
    if mapping:
        table.update(mapping)
    known_hf = set(table.values()) | set(HF_LINEAR_MODULES)
    result: set[str] = set()
    for name in trtllm_modules:
        if name in table:
            hf = table[name]
        elif name in known_hf:
            hf = name
        else:
            raise ValueError(
                f"unknown LoRA target module {name!r}; known TensorRT-LLM names: "
                f"{sorted(table)}, HF names: {list(HF_LINEAR_MODULES)}")
        result.update(FUSED_HF_MODULES.get(hf, (hf,)))
    return result
