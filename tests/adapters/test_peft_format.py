"""HF PEFT adapters made by the real peft library: parsed weights must reproduce PEFT's LoRA delta."""
from __future__ import annotations

import shutil

import pytest
import torch

from loraserve.adapters import AdapterFormatError, artifact_digest, detect_format, load_adapter
from loraserve.adapters.writer import pack_dir

from .peft_helpers import assert_matches_peft, save_peft_adapter

pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "plain_all_modules": dict(r=4, lora_alpha=8, target_modules=ALL),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"]),
    "rank_and_alpha_pattern": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, r"layers\.0\.self_attn\.k_proj": 5}),
    "layers_to_transform": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                layers_to_transform=[1]),
    "target_modules_regex": dict(r=4, lora_alpha=8,
                                 target_modules=r".*\.layers\.0\.(self_attn\.(q|v)_proj|mlp\.up_proj)"),
}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_delta(tmp_path, case, safe):
    peft_model, out = save_peft_adapter(tmp_path / "adapter", safe=safe, **CASES[case])
    assert (out / ("adapter_model.safetensors" if safe else "adapter_model.bin")).exists()
    adapter = load_adapter(out)
    assert adapter.format == "hf"
    assert_matches_peft(adapter, peft_model)
    for a, b in adapter.weights.values():
        assert a.is_contiguous() and b.is_contiguous() and a.dtype == torch.float32


def test_metadata(tmp_path):
    peft_model, out = save_peft_adapter(tmp_path / "a", **CASES["rank_and_alpha_pattern"])
    adapter = load_adapter(out, "hf", max_rank=6)
    assert adapter.rank == 6 and adapter.alpha == 8 and not adapter.use_rslora
    assert adapter.target_modules == ["down_proj", "k_proj", "q_proj", "v_proj"]
    assert adapter.num_layers == 2
    assert adapter.ranks()[(0, "q_proj")] == 2 and adapter.ranks()[(1, "down_proj")] == 6
    assert adapter.ranks()[(0, "down_proj")] == 4
    assert adapter.module_shapes() == {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32),
                                       "down_proj": (128, 64)}
    assert adapter.nbytes() == sum(a.numel() * 4 + b.numel() * 4 for a, b in adapter.weights.values())
    assert adapter.digest == artifact_digest(out)
    with pytest.raises(AdapterFormatError, match="rank 6 exceeds max_rank=4"):
        load_adapter(out, max_rank=4)


def test_layers_to_transform_and_regex_select_layers(tmp_path):
    _, out = save_peft_adapter(tmp_path / "a", **CASES["layers_to_transform"])
    adapter = load_adapter(out)
    assert {layer for layer, _ in adapter.weights} == {1} and adapter.num_layers == 2
    _, out = save_peft_adapter(tmp_path / "b", **CASES["target_modules_regex"])
    assert set(load_adapter(out).weights) == {(0, "q_proj"), (0, "v_proj"), (0, "up_proj")}


@pytest.mark.parametrize("packing,name,top", [
    ("tar", "adapter.tar", None), ("tar.gz", "adapter.tar.gz", None), ("tar.gz", "adapter.tgz", "my-lora"),
    ("zip", "adapter.zip", None), ("zip", "adapter.zip", "my-lora"), ("tar", "upload.bin.part", None),
])
def test_archive_forms_load_identically(tmp_path, packing, name, top):
    _, out = save_peft_adapter(tmp_path / "adapter", **CASES["plain_all_modules"])
    reference = load_adapter(out)
    archive = pack_dir(out, tmp_path / name, packing, top_folder=top)
    assert detect_format(archive) == "hf"
    adapter = load_adapter(archive)
    assert adapter.digest == artifact_digest(archive) != reference.digest
    assert set(adapter.weights) == set(reference.weights)
    for key, (a, b) in reference.weights.items():
        assert torch.equal(adapter.weights[key][0], a) and torch.equal(adapter.weights[key][1], b)


def test_single_weights_file_path(tmp_path):
    peft_model, out = save_peft_adapter(tmp_path / "adapter", **CASES["rslora"])
    file = out / "adapter_model.safetensors"
    adapter = load_adapter(file)
    assert_matches_peft(adapter, peft_model)
    assert adapter.digest == artifact_digest(file)


def test_fan_in_fan_out_does_not_transpose_lora_factors(tmp_path):
    """PEFT on a Conv1D base (GPT-2, fan_in_fan_out=True) still stores A [r, in], B [out, r]."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    model = get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                            fan_in_fan_out=True, init_lora_weights=False))
    model.eval()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert layer.fan_in_fan_out and a.shape == (4, 32) and b.shape == (96, 4)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ a.T @ b.T * 2.0)

    # So a Llama adapter whose config says fan_in_fan_out=true loads exactly as without it.
    from loraserve.adapters import write_peft_adapter
    from loraserve.adapters.testing import TINY_MODULE_SHAPES, random_pairs
    pairs = random_pairs({"q_proj": TINY_MODULE_SHAPES["q_proj"]}, 4)
    plain = load_adapter(write_peft_adapter(tmp_path / "plain", pairs, 4, 8))
    flagged = load_adapter(write_peft_adapter(tmp_path / "fifo", pairs, 4, 8, fan_in_fan_out=True))
    for key in plain.weights:
        assert all(torch.equal(x, y) for x, y in zip(plain.weights[key], flagged.weights[key]))


def test_key_variants_without_prefix_and_with_adapter_name(tmp_path):
    from loraserve.adapters import write_peft_adapter
    from loraserve.adapters.testing import TINY_MODULE_SHAPES, random_pairs
    pairs = random_pairs(TINY_MODULE_SHAPES, 4)
    ref = load_adapter(write_peft_adapter(tmp_path / "std", pairs, 4, 16))
    for i, kw in enumerate([dict(key_prefix=""), dict(adapter_name="default"),
                            dict(key_prefix="", adapter_name="my_task")]):
        got = load_adapter(write_peft_adapter(tmp_path / f"v{i}", pairs, 4, 16, **kw))
        assert set(got.weights) == set(ref.weights)
        for key, (a, b) in ref.weights.items():
            assert torch.equal(got.weights[key][0], a) and torch.equal(got.weights[key][1], b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kept_and_scale_rounded_once(tmp_path, dtype):
    from loraserve.adapters import write_peft_adapter
    from loraserve.adapters.testing import TINY_MODULE_SHAPES, random_pairs
    pairs = random_pairs({"v_proj": TINY_MODULE_SHAPES["v_proj"]}, 8, dtype=dtype)
    adapter = load_adapter(write_peft_adapter(tmp_path / "a", pairs, 8, 12, use_rslora=True))
    for key, (a_raw, b_raw) in pairs.items():
        a, b = adapter.weights[key]
        assert a.dtype == b.dtype == dtype and torch.equal(a, a_raw)
        expected = (b_raw.float() * (12 / 8 ** 0.5)).to(dtype)
        assert torch.equal(b, expected)


def test_digest_of_directory_is_content_based(tmp_path):
    _, out = save_peft_adapter(tmp_path / "adapter", **CASES["rslora"])
    copy = shutil.copytree(out, tmp_path / "elsewhere" / "copy")
    assert artifact_digest(out) == artifact_digest(copy)
    assert artifact_digest(out).startswith("sha256:") and len(artifact_digest(out)) == 71
    (copy / "README.md").write_text("x")
    assert artifact_digest(out) != artifact_digest(copy)


def test_ckpt_source_mismatch_and_bad_value(tmp_path):
    _, out = save_peft_adapter(tmp_path / "adapter", **CASES["rslora"])
    with pytest.raises(AdapterFormatError, match="ckpt_source='nemo' but the artifact is a HF PEFT"):
        load_adapter(out, "nemo")
    with pytest.raises(AdapterFormatError, match="must be one of"):
        load_adapter(out, "gguf")
    with pytest.raises(AdapterFormatError, match="no such file or directory"):
        load_adapter(tmp_path / "missing")
