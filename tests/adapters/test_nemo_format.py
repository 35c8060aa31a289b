"""NeMo LoRA checkpoints: the fused qkv / fc1 splits checked against an independent reference."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml

from loraserve.adapters import (AdapterFormatError, artifact_digest, detect_format, load_adapter,
                                write_nemo_adapter, write_peft_adapter)
from loraserve.adapters.testing import TINY_NEMO_CONFIG, make_nemo_adapter

ALL_NEMO = ("lora_kqv_adapter", "lora_dense_attention_adapter", "lora_hto4h_adapter", "lora_4htoh_adapter")


def ref_deinterleave(fused: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Walk Megatron's fused qkv rows group by group: its query heads, then its k head, then its v head."""
    q, k, v = [], [], []
    row = 0
    for _ in range(groups):
        for _ in range(heads // groups):
            q.append(fused[row:row + head_dim])
            row += head_dim
        k.append(fused[row:row + head_dim])
        row += head_dim
        v.append(fused[row:row + head_dim])
        row += head_dim
    assert row == fused.shape[0]
    return torch.cat(q), torch.cat(k), torch.cat(v)


def ref_interleave(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of ref_deinterleave, written independently: head h of q belongs to group h // (heads/groups)."""
    rows = []
    per_group = heads // groups
    for g in range(groups):
        for h in range(g * per_group, (g + 1) * per_group):
            rows.append(q[h * head_dim:(h + 1) * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows)


def read_nemo(path):
    with tarfile.open(path) as tar:
        cfg = yaml.safe_load(tar.extractfile("model_config.yaml").read())
        state = torch.load(io.BytesIO(tar.extractfile("model_weights.ckpt").read()), weights_only=True)
    return cfg, state


CONFIGS = {
    "gqa_4h_2g": dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16, ffn_hidden_size=128),
    "mha_no_groups_no_kv_channels": dict(hidden_size=64, num_attention_heads=4, ffn_hidden_size=96),
    "mqa_8h_1g_kv_channels_12": dict(hidden_size=48, num_attention_heads=8, num_query_groups=1, kv_channels=12, ffn_hidden_size=64),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_matches_reference(tmp_path, name):
    cfg = {**CONFIGS[name], "num_layers": 3, "activation": "fast-swiglu"}
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    groups = cfg.get("num_query_groups", heads)
    head_dim = cfg.get("kv_channels", hidden // heads)
    q_dim, kv_dim, ffn, r = heads * head_dim, groups * head_dim, cfg["ffn_hidden_size"], 6
    shapes = {"lora_kqv_adapter": (hidden, q_dim + 2 * kv_dim), "lora_dense_attention_adapter": (q_dim, hidden),
              "lora_hto4h_adapter": (hidden, 2 * ffn), "lora_4htoh_adapter": (ffn, hidden)}
    gen = torch.Generator().manual_seed(1)
    pairs = {(layer, a): (torch.randn(r, i, generator=gen), torch.randn(o, r, generator=gen))
             for layer in (0, 2) for a, (i, o) in shapes.items()}
    path = write_nemo_adapter(tmp_path / "x.nemo", pairs, model_config=cfg, adapter_dim=r, alpha=9.0)
    adapter = load_adapter(path, "nemo")
    assert adapter.format == "nemo" and adapter.rank == r and adapter.alpha == 9.0
    assert adapter.num_layers == 3 and {layer for layer, _ in adapter.weights} == {0, 2}
    assert adapter.module_shapes() == {"q_proj": (hidden, q_dim), "k_proj": (hidden, kv_dim),
                                       "v_proj": (hidden, kv_dim), "o_proj": (q_dim, hidden),
                                       "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn),
                                       "down_proj": (ffn, hidden)}

    def delta(layer, module):
        a, b = adapter.weights[(layer, module)]
        return b.double() @ a.double()

    _, state = read_nemo(path)
    for layer in (0, 2):
        def merged(adapter_name, block):
            prefix = f"model.decoder.layers.{layer}.{block}.adapter_layer.{adapter_name}"
            return (state[f"{prefix}.linear_out.weight"].double() @ state[f"{prefix}.linear_in.weight"].double()) * (9.0 / r)
        q, k, v = ref_deinterleave(merged("lora_kqv_adapter", "self_attention"), heads, groups, head_dim)
        for module, want in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            torch.testing.assert_close(delta(layer, module), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta(layer, "o_proj"), merged("lora_dense_attention_adapter", "self_attention"), rtol=1e-5, atol=1e-6)
        fc1 = merged("lora_hto4h_adapter", "mlp")
        torch.testing.assert_close(delta(layer, "gate_proj"), fc1[:ffn], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta(layer, "up_proj"), fc1[ffn:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta(layer, "down_proj"), merged("lora_4htoh_adapter", "mlp"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nemo_equals_same_weights_written_as_peft(tmp_path, dtype):
    heads, groups, head_dim, hidden, ffn, r, alpha = 4, 2, 16, 64, 128, 4, 8.0
    gen = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    nemo_pairs, peft_pairs = {}, {}
    for layer in range(2):
        a_qkv, bq, bk, bv = rnd(r, hidden), rnd(heads * head_dim, r), rnd(groups * head_dim, r), rnd(groups * head_dim, r)
        nemo_pairs[(layer, "lora_kqv_adapter")] = (a_qkv, ref_interleave(bq, bk, bv, heads, groups, head_dim))
        peft_pairs.update({(layer, "q_proj"): (a_qkv, bq), (layer, "k_proj"): (a_qkv, bk), (layer, "v_proj"): (a_qkv, bv)})
        a_fc1, b_gate, b_up = rnd(r, hidden), rnd(ffn, r), rnd(ffn, r)
        nemo_pairs[(layer, "lora_hto4h_adapter")] = (a_fc1, torch.cat([b_gate, b_up]))
        peft_pairs.update({(layer, "gate_proj"): (a_fc1, b_gate), (layer, "up_proj"): (a_fc1, b_up)})
        for nemo_name, hf_name, (i, o) in (("lora_dense_attention_adapter", "o_proj", (hidden, hidden)),
                                           ("lora_4htoh_adapter", "down_proj", (ffn, hidden))):
            pair = (rnd(r, i), rnd(o, r))
            nemo_pairs[(layer, nemo_name)] = pair
            peft_pairs[(layer, hf_name)] = pair
    nemo = load_adapter(write_nemo_adapter(tmp_path / "a.nemo", nemo_pairs, model_config=TINY_NEMO_CONFIG,
                                           adapter_dim=r, alpha=alpha))
    peft = load_adapter(write_peft_adapter(tmp_path / "peft", peft_pairs, r, alpha))
    assert nemo.target_modules == peft.target_modules and len(nemo.target_modules) == 7
    assert (nemo.rank, nemo.num_layers, nemo.alpha) == (peft.rank, peft.num_layers, peft.alpha)
    assert set(nemo.weights) == set(peft.weights)
    for key, (a, b) in peft.weights.items():
        assert a.dtype == dtype
        assert torch.equal(nemo.weights[key][0], a), key
        assert torch.equal(nemo.weights[key][1], b), key


@pytest.mark.parametrize("prefix", ["model.decoder", "model.language_model.encoder", "model"])
@pytest.mark.parametrize("packing", ["tar", "tar.gz", "dir"])
def test_packings_and_key_prefixes(tmp_path, prefix, packing):
    ref = load_adapter(make_nemo_adapter(tmp_path / "ref.nemo", adapters=ALL_NEMO))
    path = make_nemo_adapter(tmp_path / f"x-{packing}", adapters=ALL_NEMO, packing=packing, key_prefix=prefix)
    assert detect_format(path) == "nemo"
    got = load_adapter(path)
    assert got.digest == artifact_digest(path)
    assert set(got.weights) == set(ref.weights) and len(got.weights) == 14
    for key, (a, b) in ref.weights.items():
        assert torch.equal(got.weights[key][0], a) and torch.equal(got.weights[key][1], b)
    if packing == "dir":  # the weights file itself also works as a path
        assert set(load_adapter(path / "model_weights.ckpt", "nemo").weights) == set(ref.weights)


def test_dot_slash_member_names_and_default_alpha(tmp_path):
    src = make_nemo_adapter(tmp_path / "src.nemo", r=8)  # alpha absent -> alpha = adapter_dim, scale 1
    cfg, state = read_nemo(src)
    assert "alpha" not in cfg["peft"]["lora_tuning"]
    dotted = tmp_path / "dotted.nemo"
    with tarfile.open(src) as tin, tarfile.open(dotted, "w") as tout:
        for member in tin:
            data = tin.extractfile(member).read()
            member.name = "./" + member.name
            tout.addfile(member, io.BytesIO(data))
    adapter = load_adapter(dotted)
    assert adapter.alpha == 8.0
    out = state["model.decoder.layers.1.self_attention.adapter_layer.lora_kqv_adapter.linear_out.weight"]
    q, k, v = ref_deinterleave(out, 4, 2, 16)
    assert torch.equal(adapter.weights[(1, "k_proj")][1], k) and torch.equal(adapter.weights[(1, "q_proj")][1], q)


def test_ckpt_source_mismatch(tmp_path):
    path = make_nemo_adapter(tmp_path / "a.nemo")
    with pytest.raises(AdapterFormatError, match="ckpt_source='hf' but the artifact is a NeMo"):
        load_adapter(path, "hf")


def test_non_gated_mlp_rejected(tmp_path):
    cfg = {**TINY_NEMO_CONFIG, "activation": "gelu"}
    pairs = {(0, "lora_hto4h_adapter"): (torch.randn(4, 64), torch.randn(128, 4))}
    path = write_nemo_adapter(tmp_path / "g.nemo", pairs, model_config=cfg, adapter_dim=4)
    with pytest.raises(AdapterFormatError, match="non-gated MLP"):
        load_adapter(path)
