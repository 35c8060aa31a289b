"""check_compatible and the TensorRT-LLM module-name mapping."""
from __future__ import annotations

import pytest

from loraserve.adapters import (DEFAULT_TRTLLM_MODULES_TO_HF_MODULES, HF_LINEAR_MODULES,
                                AdapterFormatError, check_compatible, load_adapter,
                                trtllm_to_hf_modules)
from loraserve.adapters.testing import TINY_MODULE_SHAPES, make_peft_adapter


@pytest.fixture
def adapter(tmp_path):
    return load_adapter(make_peft_adapter(tmp_path / "a", modules=("q_proj", "v_proj", "down_proj"), r=8))


def test_compatible(adapter):
    check_compatible(adapter, module_shapes=TINY_MODULE_SHAPES, num_layers=2,
                     enabled_modules=None, max_rank=8)
    check_compatible(adapter, module_shapes=TINY_MODULE_SHAPES, num_layers=4,
                     enabled_modules={"q_proj", "v_proj", "down_proj"}, max_rank=64)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_rank=4), r"adapter rank 8 exceeds max_lora_rank=4"),
    (dict(enabled_modules={"q_proj", "v_proj"}), r"targets 'down_proj', which is not enabled"),
    (dict(module_shapes={k: v for k, v in TINY_MODULE_SHAPES.items() if k != "down_proj"}),
     r"the base model has no module 'down_proj'"),
    (dict(module_shapes={**TINY_MODULE_SHAPES, "v_proj": (64, 64)}),
     r"v_proj shape mismatch: base model expects \(in, out\)=\(64, 64\), adapter has \(64, 32\)"),
    (dict(num_layers=1), r"adapter has layer index 1 but the base model has only 1 layers"),
])
def test_incompatible(adapter, kwargs, message):
    args = dict(module_shapes=TINY_MODULE_SHAPES, num_layers=2, enabled_modules=None, max_rank=64)
    args.update(kwargs)
    with pytest.raises(AdapterFormatError, match=message):
        check_compatible(adapter, **args)


def test_all_problems_reported_together(adapter):
    with pytest.raises(AdapterFormatError) as err:
        check_compatible(adapter, module_shapes=TINY_MODULE_SHAPES, num_layers=1,
                         enabled_modules={"q_proj"}, max_rank=4)
    message = str(err.value)
    for part in ("max_lora_rank=4", "'v_proj', which is not enabled", "'down_proj', which is not enabled",
                 "only 1 layers"):
        assert part in message


def test_trtllm_mapping():
    assert DEFAULT_TRTLLM_MODULES_TO_HF_MODULES["attn_dense"] == "o_proj"
    assert DEFAULT_TRTLLM_MODULES_TO_HF_MODULES["mlp_h_to_4h"] == "gate_proj"  # TRT-LLM's fc = activated branch
    assert DEFAULT_TRTLLM_MODULES_TO_HF_MODULES["mlp_gate"] == "up_proj"
    assert DEFAULT_TRTLLM_MODULES_TO_HF_MODULES["moe_router"] == "gate"
    assert trtllm_to_hf_modules(["attn_q", "attn_k", "attn_v"]) == {"q_proj", "k_proj", "v_proj"}
    assert trtllm_to_hf_modules(["attn_qkv"]) == {"q_proj", "k_proj", "v_proj"}
    assert trtllm_to_hf_modules(["mlp_gate_up", "mlp_4h_to_h"]) == {"gate_proj", "up_proj", "down_proj"}
    assert trtllm_to_hf_modules(["o_proj", "attn_dense"]) == {"o_proj"}
    everything = trtllm_to_hf_modules(["attn_qkv", "attn_dense", "mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h"])
    assert everything == set(HF_LINEAR_MODULES)
    assert trtllm_to_hf_modules(["attn_q"], {"attn_q": "k_proj"}) == {"k_proj"}
    with pytest.raises(ValueError, match="unknown LoRA target module 'attn_foo'"):
        trtllm_to_hf_modules(["attn_foo"])


def test_cli_summary_and_rejection(tmp_path, capsys):
    import json

    from loraserve.adapters.cli import main
    from loraserve.adapters.testing import make_nemo_adapter
    path = make_nemo_adapter(tmp_path / "a.nemo", adapters=("lora_kqv_adapter", "lora_hto4h_adapter"))
    assert main([str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "nemo" and summary["target_modules"] == [
        "gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert main([str(path), "--max-rank", "2"]) == 2
    assert "rank 4 exceeds max_rank=2" in capsys.readouterr().err
