"""DoRA adapters (PEFT use_dora=True, built with peft itself) at the registry, over a real gRPC stub:
a valid one is accepted with its metadata and comes back intact; a bad magnitude vector is refused
with INVALID_ARGUMENT and a message that names it (issue 16)."""
from __future__ import annotations

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.adapters import load_adapter
from loraserve.adapters.writer import pack_dir
from loraserve.registry.client import RegistryClient
from tests.adapters.peft_helpers import save_peft_adapter


@pytest.fixture(scope="module")
def dora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dora") / "adapter"
    save_peft_adapter(d, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    return d


def test_dora_upload_roundtrip(start_registry, dora_dir, tmp_path):
    reg = start_registry()
    src = pack_dir(dora_dir, tmp_path / "dora.tar", "tar", None)
    with RegistryClient(reg.address) as c:
        v = c.push(src, "dora-qvd").adapter
        assert (v.version, v.rank, sorted(v.target_modules)) == (1, 4, ["down_proj", "q_proj", "v_proj"])
        got = load_adapter(c.pull("dora-qvd", dest=tmp_path / "pulled"))
    want = load_adapter(dora_dir)
    assert got.is_dora and set(got.magnitudes) == set(want.magnitudes) == set(want.weights)
    for key, m in want.magnitudes.items():
        assert torch.equal(got.magnitudes[key], m)


def test_bad_magnitude_refused_at_upload(start_registry, dora_dir, tmp_path):
    reg = start_registry()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((dora_dir / "adapter_config.json").read_bytes())
    t = load_file(dora_dir / "adapter_model.safetensors")
    key = next(k for k in sorted(t) if k.endswith("v_proj.lora_magnitude_vector"))
    t[key] = torch.cat([t[key], torch.ones(3)])   # [32] -> [35]: not one per output feature
    save_file(t, bad / "adapter_model.safetensors")
    with RegistryClient(reg.address) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.push(pack_dir(bad, tmp_path / "bad.tar", "tar", None), "dora-bad")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lora_magnitude_vector has shape [35], expected [32]" in err.value.details(), err.value.details()
