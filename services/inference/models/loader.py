"""Load an HF Llama-family checkpoint directory into `LlamaForCausalLM`.

config.json + model.safetensors, or sharded with model.safetensors.index.json. q/k/v and
gate/up checkpoint tensors are copied into their slice of the fused weight as they stream
in, so peak memory is one tensor above the model itself.

Under tensor parallelism (`tp`, a tp.parallel.TPGroup) each rank builds the model of its shard
(tp.parallel.shard_args) and reads only its slice of each tensor from the safetensors file
(`get_slice`): Megatron's split, q/k/v and gate/up by output rows (whole heads), o and down by
input columns, embedding and LM head by vocabulary rows; norms are replicated.
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open

from .llama import PROJ_SLICES, LlamaForCausalLM, ModelArgs, RotaryEmbedding, rope_inv_freq

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# checkpoint sub-module -> (fused parameter, slice index), from the one table of packed modules
_PACKED = {m: (proj, i) for proj, mods in PROJ_SLICES.items() if len(mods) > 1 for i, m in enumerate(mods)}


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f)


def resolve_dtype(dtype: str, args: ModelArgs, device: torch.device) -> torch.dtype:
    """TensorRT-LLM's `dtype`: auto takes the checkpoint's dtype (fp32 stays fp32 on CPU);
    on CPU, half-precision checkpoints run in fp32 since CPU fp16 matmuls are slow."""
    if dtype != "auto":
        return _DTYPES[dtype]
    ckpt = _DTYPES.get(str(args.torch_dtype), torch.float32)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if ckpt == torch.float32 else ckpt


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    return files


def load_model(path: str, dtype: str = "auto", device: str | torch.device = "cpu", tp=None
               ) -> tuple[LlamaForCausalLM, ModelArgs, torch.dtype]:
    """(model, the full model's args, dtype). With `tp` the model is this rank's shard and its own
    `model.args` are the shard's (heads, KV heads, MLP width and vocabulary divided)."""
    hf_cfg = read_hf_config(path)
    args = ModelArgs.from_hf_config(hf_cfg)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, args, device)
    local = args
    if tp is not None:
        from ..tp.parallel import shard_args

        local = shard_args(args, tp.size)
    with torch.device("meta"):
        model = LlamaForCausalLM(local)
    model = model.to_empty(device=device).to(torch_dtype)
    if tp is not None:
        _attach_group(model, tp)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for module in model.modules():  # to_empty left the non-persistent RoPE buffers uninitialised
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = rope_inv_freq(args).float().to(device)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for file in _weight_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name) if tp is None else _read_shard(f, name, local, tp)
                _load_one(name, tensor, params, local, loaded)
    missing = {n for n in params if n not in loaded}
    if args.tie_word_embeddings or "lm_head.weight" not in loaded:
        if "lm_head.weight" not in loaded:
            model.lm_head.weight = model.embed_tokens.weight
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"{path}: checkpoint lacks weights for {sorted(missing)[:8]}")
    return model.eval(), args, torch_dtype


def _load_one(name: str, tensor: torch.Tensor, params: dict, args: ModelArgs, loaded: set[str]) -> None:
    name = re.sub(r"^model\.", "", name)
    if "rotary_emb" in name:
        return
    m = re.match(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$", name)
    if m and m.group(3) in _PACKED:
        fused, idx = _PACKED[m.group(3)]
        target = f"layers.{m.group(1)}.{m.group(2)}.{fused}.{m.group(4)}"
        param = params[target]
        if fused == "qkv_proj":
            sizes = [args.q_size, args.kv_size, args.kv_size]
        else:
            sizes = [args.intermediate_size, args.intermediate_size]
        offset = sum(sizes[:idx])
        dst = param.data.narrow(0, offset, sizes[idx])
        _copy(dst, tensor, f"{name} -> {target}[{offset}:{offset + sizes[idx]}]")
        loaded.add(target)
        return
    if name not in params:
        raise ValueError(f"unexpected checkpoint tensor {name!r}: not part of a {args.model_type} model")
    _copy(params[name].data, tensor, name)
    loaded.add(name)


def _attach_group(model: LlamaForCausalLM, tp) -> None:
    model.tp = tp
    for layer in model.layers:
        layer.self_attn.tp = layer.mlp.tp = tp


# checkpoint module -> (dim split, which size): rows of whole heads / MLP columns, or input columns
_SPLIT = {"q_proj": (0, "q"), "k_proj": (0, "kv"), "v_proj": (0, "kv"), "gate_proj": (0, "mlp"),
          "up_proj": (0, "mlp"), "o_proj": (1, "q"), "down_proj": (1, "mlp")}


def _read_shard(f, name: str, local: ModelArgs, tp) -> torch.Tensor:
    """This rank's slice of checkpoint tensor `name`, read from the file without the rest."""
    short = re.sub(r"^model\.", "", name)
    m = re.match(r"layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)$", short)
    if m and m.group(1) in _SPLIT:
        dim, kind = _SPLIT[m.group(1)]
        n = {"q": local.q_size, "kv": local.kv_size, "mlp": local.intermediate_size}[kind]
        lo = tp.rank * n
        sl = f.get_slice(name)
        if dim == 0 or m.group(2) == "bias":   # a bias follows its layer's output rows (q/k/v)
            return sl[lo:lo + n]
        return sl[:, lo:lo + n]
    if short in ("embed_tokens.weight", "lm_head.weight"):
        sl = f.get_slice(name)
        rows = sl.get_shape()[0]
        if rows != tp.vocab_size:
            raise ValueError(f"shape mismatch for {short}: {rows} rows, the model's vocab_size is {tp.vocab_size}")
        lo = min(tp.vocab_start, rows)
        part = sl[lo:min(lo + tp.vocab_per_rank, rows)]
        if part.shape[0] < tp.vocab_per_rank:   # the last shard (vocab % size): zero rows past the vocabulary
            part = torch.cat([part, part.new_zeros(tp.vocab_per_rank - part.shape[0], *part.shape[1:])])
        return part
    return f.get_tensor(name)


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch for {what}: model expects {tuple(dst.shape)}, checkpoint has {tuple(src.shape)}")
    dst.copy_(src)
