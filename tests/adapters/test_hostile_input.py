"""Issue 9 items 2, 6, 8 at the parser: hostile input gets AdapterFormatError with a short message
written for a person; scales and folded weights that overflow the serving dtype are refused;
files are confined to the allowed directories."""
from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch

from loraserve.adapters import AdapterFormatError, load_adapter, validate_artifact
from loraserve.adapters.adapter import MAX_LORA_SCALE
from loraserve.adapters.errors import MAX_MESSAGE_CHARS
from loraserve.adapters.loader import check_serving_range
from loraserve.adapters.testing import make_nemo_adapter, make_peft_adapter
from tests.reliability.hostile import KINDS, hostile_adapter

PYTHON_NOISE = ("TypeError", "RecursionError", "Traceback", "object is not", "not supported between",
                "maximum recursion", "unhashable")


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_peft_dirs_get_a_format_error_for_a_person(tmp_path, kind):
    path = hostile_adapter(tmp_path / kind, kind)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(path)
    msg = str(err.value)
    assert not err.value.unforeseen, msg
    assert not any(noise in msg for noise in PYTHON_NOISE), msg
    assert len(msg) <= MAX_MESSAGE_CHARS + 60, len(msg)
    expected = {"string_offsets": "corrupt safetensors header entry", "deep_json_config": "nested too deeply",
                "deep_json_header": "nested too deeply", "alpha_1e38": "effective LoRA scale",
                "huge_key": "(10000 characters)", "list_target_modules": "target_modules must be"}[kind]
    assert expected in msg, msg


def test_alpha_1e38_is_refused_in_nemo_too(tmp_path):
    path = make_nemo_adapter(tmp_path / "a.nemo", alpha=1e38, r=4)
    with pytest.raises(AdapterFormatError, match="effective LoRA scale 2.5e\\+37"):
        load_adapter(path)


def test_scale_limit_admits_real_scales(tmp_path):
    # rsLoRA with alpha=512, r=4: scale 256, far above what trained adapters use, still accepted
    path = make_peft_adapter(tmp_path / "big", alpha=512, r=4, use_rslora=True)
    assert load_adapter(path, serving_dtype=torch.float16).rank == 4
    assert 512 / 2 < MAX_LORA_SCALE


def test_folded_weights_overflowing_the_serving_dtype_are_refused(tmp_path):
    """B = 1e3 * 0.1-ish weights with scale 100: |B*s| ~ 1e4, gain over in=64 inputs ~1e6:
    fine in bf16/fp32, overflows fp16 -- refused only where it would overflow."""
    path = make_peft_adapter(tmp_path / "hot", alpha=400, r=4, seed=1)
    adapter = load_adapter(path)
    adapter.weights = {k: (a, b * 1e3) for k, (a, b) in adapter.weights.items()}
    check_serving_range(adapter, torch.bfloat16)
    check_serving_range(adapter, torch.float32)
    with pytest.raises(AdapterFormatError, match="overflow float16"):
        check_serving_range(adapter, torch.float16)
    # the reference: the exact largest LoRA output over inputs with |x_i| <= 1 (the inf->inf norm
    # of B @ A, reached at x = sign of a row) is beyond fp16 for some module, so refusing is right
    worst = max(float((b.double() @ a.double()).abs().sum(dim=1).max()) for a, b in adapter.weights.values())
    assert torch.finfo(torch.float16).max < worst < torch.finfo(torch.bfloat16).max
    (a, b) = max(adapter.weights.values(), key=lambda ab: float((ab[1].double() @ ab[0].double()).abs().sum(1).max()))
    row = int((b.double() @ a.double()).abs().sum(dim=1).argmax())
    x = torch.sign((b.double() @ a.double())[row])[None, :]  # |x_i| = 1
    assert float(((x @ a.double().T) @ b.double().T).abs().max()) > torch.finfo(torch.float16).max


def test_validate_artifact_checks_fp16_range_by_default(tmp_path):
    path = make_peft_adapter(tmp_path / "a", alpha=8, r=4)
    adapter = validate_artifact(path)
    assert adapter.rank == 4


def test_detect_error_does_not_list_the_directory(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "secret-payroll.csv").write_text("x")
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(d)
    assert "secret-payroll" not in str(err.value) and "neither an HF PEFT adapter" in str(err.value)


def test_file_symlink_out_of_the_allowed_dir_is_refused(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    src = make_peft_adapter(outside / "real", seed=5)
    link_dir = allowed / "linked"
    link_dir.mkdir(parents=True)
    os.symlink(src / "adapter_config.json", link_dir / "adapter_config.json")
    os.symlink(src / "adapter_model.safetensors", link_dir / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="outside the allowed adapter directories") as err:
        load_adapter(link_dir, confine_to=[os.path.realpath(allowed)])
    assert str(outside) not in str(err.value)
    # links that stay inside (an HF-cache-like layout) are followed
    inside = make_peft_adapter(allowed / "blobs", seed=5)
    ok_dir = allowed / "snapshot"
    ok_dir.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(inside / name, ok_dir / name)
    assert load_adapter(ok_dir, confine_to=[os.path.realpath(allowed)]).rank == 4
    # without confinement (operator-given lora_dir) the outside link still loads
    assert load_adapter(link_dir).rank == 4


def test_archive_member_names_are_bounded_in_messages(tmp_path):
    good = make_peft_adapter(tmp_path / "g", seed=2)
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in good.iterdir():
            tar.add(f, f.name)
        info = tarfile.TarInfo("../" + "x" * 10_000)
        tar.addfile(info)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(path)
    assert "escapes the archive" in str(err.value) and len(str(err.value)) < 600


def test_config_json_is_never_echoed_whole(tmp_path):
    path = make_peft_adapter(tmp_path / "a", seed=1)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["peft_type"] = "X" * 50_000
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(path)
    assert len(str(err.value)) <= MAX_MESSAGE_CHARS + 60


def test_oversized_configs_and_headers_are_refused_before_parsing(tmp_path):
    """JSON costs ~10x its size in Python objects: configs and safetensors headers are capped."""
    import struct

    path = make_peft_adapter(tmp_path / "cfg", seed=1)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "padding": "x" * (2 << 20)}))
    with pytest.raises(AdapterFormatError, match="adapter_config.json is larger than"):
        load_adapter(path)
    path = make_peft_adapter(tmp_path / "hdr", seed=1)
    header = json.dumps({"__metadata__": {"pad": "x" * (20 << 20)}}).encode()
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(AdapterFormatError, match="limit of 16777216 for a LoRA adapter"):
        load_adapter(path)
