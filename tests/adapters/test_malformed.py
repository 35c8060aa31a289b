"""Every artifact of the malformed corpus is rejected with a message naming what is wrong."""
from __future__ import annotations

import re

import pytest

from loraserve.adapters import AdapterFormatError, load_adapter, validate_artifact
from loraserve.adapters.testing import (CORPUS_LIMITS, PWNED_MARKER, make_malformed_corpus,
                                        make_nemo_adapter, make_peft_adapter)

# name -> regex the error message must match (so each is rejected for *its* defect).
EXPECTED = {
    "hf_missing_config": r"neither an HF PEFT adapter",
    "hf_missing_weights": r"missing adapter weights",
    "hf_config_not_json": r"adapter_config\.json is not valid JSON",
    "hf_truncated_safetensors": r"truncated safetensors file",
    "hf_corrupt_safetensors_header": r"corrupt safetensors header",
    "hf_safetensors_header_length_huge": r"truncated or corrupt safetensors file \(header claims",
    "hf_pickled_code_bin": r"weights_only=True.*GLOBAL posix\.system",
    "hf_pickled_code_legacy_bin": r"weights_only=True.*GLOBAL posix\.system",
    "hf_config_rank_mismatch": r"do not have rank 8",
    "hf_pair_rank_inconsistent": r"q_proj: lora_A \[4, 64\] and lora_B \[64, 3\] disagree on the rank",
    "hf_module_shape_differs_between_layers": r"q_proj has \(in, out\)=\(64, 64\) in layer 0 but \(32, 64\) in layer 1",
    "hf_nan_values": r"q_proj\.lora_B\.weight' contains NaN",
    "hf_inf_values": r"v_proj\.lora_A\.weight' contains Inf",
    "hf_int_dtype": r"has dtype int32",
    "hf_bias_all": r"bias='all' is not supported",
    "hf_modules_to_save": r"modules_to_save",
    "hf_dora": r"DoRA",
    "hf_lora_a_without_b": r"layers\.1\.self_attn\.v_proj has lora_A but no lora_B",
    "hf_embed_tokens_lora": r"LoRA on embed_tokens",
    "hf_lm_head_lora": r"LoRA on lm_head",
    "hf_unknown_module": r"unknown LoRA target module 'foo_proj'",
    "hf_target_modules_disagree": r"v_proj' but adapter_config\.json target_modules=\['q_proj'\]",
    "hf_layers_to_transform_violated": r"layer 1 .* layers_to_transform=\[0\]",
    "hf_no_tensors": r"no LoRA weights found",
    "hf_peft_type_not_lora": r"peft_type='IA3' is not LORA",
    "hf_3d_tensor": r"shape \[1, 4, 64\], expected 2-D",
    "rank_over_max_rank": r"rank 128 exceeds max_rank=64",
    "size_over_max_bytes": r"over max_bytes=262144",
    "tar_member_dotdot": r"'\.\./escaped\.txt' escapes the archive",
    "tar_member_absolute_path": r"'/tmp/loraserve_escaped\.txt' has an absolute path",
    "tar_member_symlink": r"'link_to_passwd' is a symlink",
    "tar_member_hardlink": r"'hard_copy\.json' is a hardlink",
    "tar_member_device": r"'null_device' is a device",
    "tar_truncated": r"not a readable .*archive",
    "zip_member_dotdot": r"'\.\./escaped\.txt' escapes the archive",
    "zip_member_symlink": r"'link_to_passwd' is a symlink",
    "zip_bomb": r"unpacked content exceeds max_bytes=262144",
    "not_an_archive": r"not a readable .*archive",
    "empty_file": r"not a readable .*archive",
    "nemo_missing_weights": r"missing model_weights\.ckpt",
    "nemo_missing_config": r"missing model_config\.yaml",
    "nemo_config_not_yaml": r"model_config\.yaml is not valid YAML",
    "nemo_qkv_rows_mismatch": r"linear_out has 128 rows, expected 192",
    "nemo_unknown_adapter": r"unsupported tensor .*lora_foo_adapter",
    "nemo_linear_in_without_out": r"layer 1 lora_kqv_adapter has linear_in but no linear_out",
    "nemo_rank_vs_adapter_dim": r"rank 4 but peft\.lora_tuning\.adapter_dim=8",
    "nemo_pickled_code": r"weights_only=True.*GLOBAL posix\.system",
    "nemo_member_dotdot": r"escapes the archive",
    "nemo_model_parallel_shards": r"model-parallel NeMo checkpoint with 2 shards",
    "nemo_nan_values": r"linear_out\.weight' contains NaN",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_malformed_corpus(root)


def test_corpus_is_complete(corpus):
    _, entries = corpus
    names = [name for name, _ in entries]
    assert len(names) == len(set(names)) >= 20
    assert set(names) == set(EXPECTED)
    assert all(path.is_file() for _, path in entries)  # single files: uploadable as-is


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rejected_with_clear_message(corpus, name):
    root, entries = corpus
    path = dict(entries)[name]
    with pytest.raises(AdapterFormatError) as err:
        validate_artifact(path, **CORPUS_LIMITS)
    assert re.search(EXPECTED[name], str(err.value)), str(err.value)
    assert not (root / PWNED_MARKER).exists(), "pickled code was executed"


def test_limit_entries_are_fine_without_limits(corpus):
    """rank/size/zip-bomb entries are otherwise valid adapters: the limits are what rejects them."""
    _, entries = corpus
    for name in ("rank_over_max_rank", "size_over_max_bytes", "zip_bomb"):
        assert load_adapter(dict(entries)[name]).num_layers >= 1


def test_valid_fixtures_pass_corpus_limits(tmp_path):
    for path in (make_peft_adapter(tmp_path / "p.tar.gz", packing="tar.gz"),
                 make_peft_adapter(tmp_path / "p.zip", packing="zip", top_folder="x"),
                 make_nemo_adapter(tmp_path / "n.nemo")):
        assert validate_artifact(path, **CORPUS_LIMITS).rank == 4


def test_pickled_code_would_have_run_without_weights_only(corpus):
    """Guard against a vacuous marker check: the payload really is a call of os.system that
    would create the marker. Read statically (pickletools): nothing is ever unpickled unsafely."""
    import io
    import pickletools
    import tarfile
    import zipfile

    root, entries = corpus
    with tarfile.open(dict(entries)["hf_pickled_code_bin"]) as tar:
        data = tar.extractfile("adapter_model.bin").read()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:  # torch.save's zip format: <archive>/data.pkl
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(pkl))
    strings = [arg for _, arg, _ in ops if isinstance(arg, str)]
    assert any(s.split() in (["posix", "system"], ["nt", "system"], ["os", "system"]) for s in strings)
    assert any(op.name == "REDUCE" for op, _, _ in ops)
    assert any(str(root / PWNED_MARKER) in s for s in strings)
    assert not (root / PWNED_MARKER).exists()


@pytest.mark.parametrize("name", ["hf_pickled_code_bin", "hf_truncated_safetensors", "hf_nan_values",
                                  "hf_bias_all", "nemo_pickled_code", "nemo_qkv_rows_mismatch"])
def test_rejected_as_extracted_directory(corpus, tmp_path, name):
    """The same defects are caught when the artifact is a directory on disk (the engine's case)."""
    import tarfile
    root, entries = corpus
    with tarfile.open(dict(entries)[name]) as tar:
        tar.extractall(tmp_path / name, filter="data")
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(tmp_path / name)
    assert re.search(EXPECTED[name], str(err.value)), str(err.value)
    assert not (root / PWNED_MARKER).exists()
