"""The malformed-artifact corpus: every entry must be rejected with AdapterFormatError.

Each entry is one file (an archive, as a registry upload would be) whose only defect is the one
its name says; everything else about it is a valid tiny adapter. Entries `rank_over_max_rank`,
`size_over_max_bytes` and `zip_bomb` are only invalid under `testing.CORPUS_LIMITS`.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import save as safetensors_save

from .testing import (CORPUS_LIMITS, PWNED_MARKER, TINY_MODULE_SHAPES, TINY_NEMO_CONFIG,
                      TINY_NEMO_SHAPES, random_pairs)
from .writer import nemo_key, peft_key, write_files

Files = dict[str, bytes]
Tensors = dict[str, torch.Tensor]
_CFG, _ST = "adapter_config.json", "adapter_model.safetensors"


class _RunsShellOnUnpickle:
    """Pickles to a call of os.system: a safe loader must refuse it, never run it."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _peft_tensors(modules=("q_proj", "v_proj"), r: int = 4, **kw) -> Tensors:
    pairs = random_pairs({m: TINY_MODULE_SHAPES[m] for m in modules}, r, **kw)
    return {peft_key(layer, m, which): t for (layer, m), ab in pairs.items()
            for which, t in zip("AB", ab)}


def _peft_config(**overrides) -> bytes:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none",
           "target_modules": ["q_proj", "v_proj"], "modules_to_save": None, "use_dora": False}
    cfg.update(overrides)
    return json.dumps(cfg).encode()


def _hf(tensors: Tensors | None = None, **config_overrides) -> Files:
    tensors = _peft_tensors() if tensors is None else tensors
    return {_CFG: _peft_config(**config_overrides), _ST: safetensors_save(tensors)}


def _nemo(tensors: Tensors | None = None, config: dict | None = None, r: int = 4) -> Files:
    if tensors is None:
        pairs = random_pairs({"lora_kqv_adapter": TINY_NEMO_SHAPES["lora_kqv_adapter"]}, r)
        tensors = {nemo_key(layer, a, part): t for (layer, a), pair in pairs.items()
                   for part, t in zip(("linear_in", "linear_out"), pair)}
    cfg = config or {**TINY_NEMO_CONFIG, "peft": {"lora_tuning": {"adapter_dim": r, "alpha": 8}}}
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return {"model_config.yaml": yaml.safe_dump(cfg).encode(), "model_weights.ckpt": buf.getvalue()}


def _with(tensors: Tensors, key_suffix: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tensors:
    key = next(k for k in sorted(tensors) if k.endswith(key_suffix))
    return {**tensors, key: fn(tensors[key])}


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[0, 0] = value
        return t
    return apply


def _tar_with(files: Files, *extra: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            data = b"evil\n" if info.isreg() else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _tarinfo(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info


def _zip_with(files: Files, extra: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue()


def _symlink_zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    return info


Entry = tuple[str, "Files | bytes", str]  # (name, files to pack or raw bytes, file suffix)


def _hf_entries(evil: _RunsShellOnUnpickle) -> list[Entry]:
    good = _hf()
    cfg, st = good[_CFG], good[_ST]
    header_len = int.from_bytes(st[:8], "little")
    bad_header = st[:8] + b"{" + b"\xff" * (header_len - 1) + st[8 + header_len:]
    evil_bin = io.BytesIO()
    torch.save({peft_key(0, "q_proj", "A"): evil}, evil_bin)
    t = _peft_tensors()
    layer0 = "base_model.model.model.layers.0.self_attn"
    big_rank = 2 * CORPUS_LIMITS["max_rank"]
    wide_r = 48  # all 7 modules x 2 layers in fp32: ~390 KiB, over max_bytes
    entries: list[tuple[str, Files | bytes]] = [
        ("hf_missing_config", {_ST: st}),
        ("hf_missing_weights", {_CFG: cfg}),
        ("hf_config_not_json", {_CFG: b"{'r': 4,", _ST: st}),
        ("hf_truncated_safetensors", {_CFG: cfg, _ST: st[:-37]}),
        ("hf_corrupt_safetensors_header", {_CFG: cfg, _ST: bad_header}),
        ("hf_safetensors_header_length_huge", {_CFG: cfg, _ST: (1 << 40).to_bytes(8, "little") + st[8:]}),
        ("hf_pickled_code_bin", {_CFG: cfg, "adapter_model.bin": evil_bin.getvalue()}),
        ("hf_pickled_code_legacy_bin", {_CFG: cfg, "adapter_model.bin": pickle.dumps({"w": evil}, protocol=2)}),
        ("hf_config_rank_mismatch", _hf(r=8)),
        ("hf_pair_rank_inconsistent",
         _hf(_with(t, "layers.0.self_attn.q_proj.lora_B.weight", lambda x: x[:, :3].contiguous()))),
        ("hf_module_shape_differs_between_layers",
         _hf(_with(t, "layers.1.self_attn.q_proj.lora_A.weight", lambda x: x[:, :32].contiguous()))),
        ("hf_nan_values", _hf(_with(t, "q_proj.lora_B.weight", _poison(float("nan"))))),
        ("hf_inf_values", _hf(_with(t, "v_proj.lora_A.weight", _poison(float("inf"))))),
        ("hf_int_dtype", _hf(_with(t, "q_proj.lora_A.weight", lambda x: (x * 100).to(torch.int32)))),
        ("hf_3d_tensor", _hf(_with(t, "q_proj.lora_A.weight", lambda x: x.unsqueeze(0).contiguous()))),
        ("hf_bias_all", _hf(bias="all")),
        ("hf_modules_to_save",
         _hf({**t, "base_model.model.lm_head.weight": torch.zeros(8, 64)}, modules_to_save=["lm_head"])),
        ("hf_dora", _hf({**t, f"{layer0}.q_proj.lora_magnitude_vector": torch.ones(64)}, use_dora=True)),
        ("hf_lora_a_without_b",
         _hf({k: v for k, v in t.items() if ".layers.1.self_attn.v_proj.lora_B" not in k})),
        ("hf_embed_tokens_lora",
         _hf({**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 100)})),
        ("hf_lm_head_lora", _hf({**t, "base_model.model.lm_head.lora_A.weight": torch.ones(4, 64),
                                 "base_model.model.lm_head.lora_B.weight": torch.ones(100, 4)})),
        ("hf_unknown_module", _hf({**t, f"{layer0}.foo_proj.lora_A.weight": torch.ones(4, 64),
                                   f"{layer0}.foo_proj.lora_B.weight": torch.ones(64, 4)})),
        ("hf_target_modules_disagree", _hf(target_modules=["q_proj"])),
        ("hf_layers_to_transform_violated", _hf(layers_to_transform=[0])),
        ("hf_no_tensors", _hf({})),
        ("hf_peft_type_not_lora", _hf(peft_type="IA3")),
        ("rank_over_max_rank", _hf(_peft_tensors(modules=("q_proj",), r=big_rank, num_layers=1),
                                   r=big_rank, target_modules=["q_proj"])),
        ("size_over_max_bytes", _hf(_peft_tensors(modules=tuple(TINY_MODULE_SHAPES), r=wide_r),
                                    r=wide_r, target_modules=list(TINY_MODULE_SHAPES))),
    ]
    return [(name, content, ".tar.gz") for name, content in entries]


def _archive_entries() -> list[Entry]:
    """Unsafe or broken packaging around an otherwise valid adapter."""
    good = _hf()
    bomb = zipfile.ZipInfo("padding.bin")
    bomb.compress_type = zipfile.ZIP_DEFLATED  # a few KiB on disk, 8 x max_bytes unpacked
    return [
        ("tar_member_dotdot", _tar_with(good, _tarinfo("../escaped.txt")), ".tar.gz"),
        ("tar_member_absolute_path", _tar_with(good, _tarinfo("/tmp/loraserve_escaped.txt")), ".tar.gz"),
        ("tar_member_symlink",
         _tar_with(good, _tarinfo("link_to_passwd", tarfile.SYMTYPE, "/etc/passwd")), ".tar.gz"),
        ("tar_member_hardlink", _tar_with(good, _tarinfo("hard_copy.json", tarfile.LNKTYPE, _CFG)), ".tar.gz"),
        ("tar_member_device", _tar_with(good, _tarinfo("null_device", tarfile.CHRTYPE)), ".tar.gz"),
        ("tar_truncated", _tar_with(good)[:-200], ".tar.gz"),
        ("zip_member_dotdot", _zip_with(good, [(zipfile.ZipInfo("../escaped.txt"), b"evil")]), ".zip"),
        ("zip_member_symlink",
         _zip_with(good, [(_symlink_zipinfo("link_to_passwd"), b"/etc/passwd")]), ".zip"),
        ("zip_bomb", _zip_with(good, [(bomb, b"\0" * (8 * CORPUS_LIMITS["max_bytes"]))]), ".zip"),
        ("not_an_archive", os.urandom(4096), ".tar.gz"),
        ("empty_file", b"", ".tar.gz"),
    ]


def _nemo_entries(evil: _RunsShellOnUnpickle) -> list[Entry]:
    nemo = _nemo()
    cfg_yaml, ckpt = nemo["model_config.yaml"], nemo["model_weights.ckpt"]
    cfg_ok = {**TINY_NEMO_CONFIG, "peft": {"lora_tuning": {"adapter_dim": 4, "alpha": 8}}}
    t = torch.load(io.BytesIO(ckpt), weights_only=True)
    evil_ckpt = io.BytesIO()
    torch.save({nemo_key(0, "lora_kqv_adapter", "linear_in"): evil}, evil_ckpt)
    kqv_out_1 = nemo_key(1, "lora_kqv_adapter", "linear_out")
    foo_in = "model.decoder.layers.0.self_attention.adapter_layer.lora_foo_adapter.linear_in.weight"
    entries: list[tuple[str, Files | bytes]] = [
        ("nemo_missing_weights", {"model_config.yaml": cfg_yaml}),
        ("nemo_missing_config", {"model_weights.ckpt": ckpt}),
        ("nemo_config_not_yaml", {**nemo, "model_config.yaml": b"hidden_size: [64\n  : :"}),
        ("nemo_qkv_rows_mismatch", _nemo(config={**cfg_ok, "num_query_groups": 4})),
        ("nemo_unknown_adapter", _nemo({**t, foo_in: torch.ones(4, 64)})),
        ("nemo_linear_in_without_out", _nemo({k: v for k, v in t.items() if k != kqv_out_1})),
        ("nemo_rank_vs_adapter_dim", _nemo(config={**cfg_ok, "peft": {"lora_tuning": {"adapter_dim": 8}}})),
        ("nemo_pickled_code", {**nemo, "model_weights.ckpt": evil_ckpt.getvalue()}),
        ("nemo_member_dotdot", _tar_with(nemo, _tarinfo("../model_weights.ckpt"))),
        ("nemo_model_parallel_shards", {"model_config.yaml": cfg_yaml, "mp_rank_00/model_weights.ckpt": ckpt,
                                        "mp_rank_01/model_weights.ckpt": ckpt}),
        ("nemo_nan_values", _nemo(_with(t, nemo_key(0, "lora_kqv_adapter", "linear_out"),
                                        _poison(float("nan"))))),
    ]
    return [(name, content, ".nemo") for name, content in entries]


def build_corpus(root: Path) -> list[tuple[str, Path]]:
    """Write every entry under `root` as one file; -> [(name, path)]."""
    root.mkdir(parents=True, exist_ok=True)
    evil = _RunsShellOnUnpickle(f"touch {shlex.quote(str(root / PWNED_MARKER))}")
    out: list[tuple[str, Path]] = []
    for name, content, suffix in _hf_entries(evil) + _archive_entries() + _nemo_entries(evil):
        path = root / f"{name}{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:  # .tar.gz for HF, plain tar for .nemo (as NeMo writes it)
            write_files(path, content, "tar" if suffix == ".nemo" else "tar.gz")
        out.append((name, path))
    return out
