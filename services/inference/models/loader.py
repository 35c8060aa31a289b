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
import logging
import os
import re

import torch
from safetensors import safe_open

from .llama import PROJ_SLICES, LlamaForCausalLM, ModelArgs, RotaryEmbedding, rope_inv_freq

log = logging.getLogger(__name__)
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


def load_model(path: str, dtype: str = "auto", device: str | torch.device = "cpu", tp=None, quant_config=None
               ) -> tuple[LlamaForCausalLM, ModelArgs, torch.dtype]:
    """(model, the full model's args, dtype). With `tp` the model is this rank's shard and its own
    `model.args` are the shard's (heads, KV heads, MLP width and vocabulary divided).
    FP8 (models/fp8.py): with quant_config.quant_algo FP8, or a checkpoint whose config.json says
    quantization_config {quant_method: fp8}, every decoder projection is an Fp8Proj: bf16/fp16/fp32
    weights are quantized per output channel as they stream in, FP8 weights are taken with their
    weight_scale (and input_scale). `dtype` stays the compute dtype (activations, norms, LoRA)."""
    hf_cfg = read_hf_config(path)
    fp8_checkpoint = _fp8_checkpoint(hf_cfg, path)
    fp8_weights = fp8_checkpoint or (quant_config is not None and quant_config.fp8_weights)
    args = ModelArgs.from_hf_config(hf_cfg)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, args, device)
    local = args
    if tp is not None:
        from ..tp.parallel import shard_args

        local = shard_args(args, tp.size)
    with torch.device("meta"):
        model = LlamaForCausalLM(local)
    model = model.to(torch_dtype)   # still on meta: no memory
    fp8_mods = None
    if fp8_weights:   # swapped in on meta, so the bf16 projections never take device memory (KV sizing)
        from .fp8 import convert_projections

        exclude = quant_config.exclude_modules if quant_config is not None else None
        if exclude and fp8_checkpoint:
            raise ValueError("quant_config.exclude_modules applies to weights quantized at load; this checkpoint "
                             "is already FP8 (its own layout decides what is quantized)")
        fp8_mods = convert_projections(model, torch_dtype, torch.device("meta"), exclude)
        log.info("FP8 e4m3 weights for %d projections (%s), compute dtype %s", len(fp8_mods),
                 "from the checkpoint" if fp8_checkpoint else "quantized at load, per-channel scales", torch_dtype)
    model = model.to_empty(device=device)
    for fp8_mod in (fp8_mods or {}).values():
        fp8_mod.weight_scale.fill_(1.0)   # to_empty left it uninitialised; a checkpoint scale overwrites it
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
                if fp8_mods is None or not _load_fp8_one(name, tensor, model, fp8_mods, local, loaded):
                    _load_one(name, tensor, params, local, loaded)
    missing = {n for n in params if n not in loaded}
    if args.tie_word_embeddings or "lm_head.weight" not in loaded:
        if "lm_head.weight" not in loaded:
            model.lm_head.weight = model.embed_tokens.weight
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"{path}: checkpoint lacks weights for {sorted(missing)[:8]}")
    unscaled = sorted(k for k in loaded if k.startswith("fp8-unscaled:") and "fp8-scaled:" + k[13:] not in loaded)
    if unscaled:
        raise ValueError(f"{path}: FP8 weights without a weight_scale: {[k[13:] for k in unscaled][:8]}")
    if fp8_mods is not None and tp is None:
        from .fp8_head import quantize_lm_head

        quantize_lm_head(model)   # LORASERVE_FP8_LM_HEAD (default 1): an FP8 copy for small decode steps
    if device.type == "cuda" and fp8_mods is not None:
        torch.cuda.empty_cache()   # the quantizer's fp32 temporaries: the KV cache is sized from free memory
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


def _fp8_checkpoint(hf_cfg: dict, path: str) -> bool:
    """True for a checkpoint already in FP8 (config.json quantization_config {quant_method: fp8}, as
    AutoFP8 / vLLM / scripts/quantize_fp8.py write it); other quantized checkpoints are refused."""
    qc = hf_cfg.get("quantization_config")
    if not qc:
        return False
    method = str(qc.get("quant_method", "")).lower()
    if method != "fp8":
        raise ValueError(f"{path}: quantized checkpoint (quant_method={method!r}) is not supported; "
                         "loraserve loads bf16/fp16/fp32 checkpoints and FP8 ones (quant_method: fp8)")
    if qc.get("weight_block_size"):
        raise ValueError(f"{path}: block-wise FP8 scales (weight_block_size={qc['weight_block_size']}) are not "
                         "supported; per-tensor or per-channel weight_scale only")
    return True


def _load_fp8_one(name: str, tensor: torch.Tensor, model: LlamaForCausalLM, fp8_mods: dict, args: ModelArgs,
                  loaded: set[str]) -> bool:
    """Tensors of an Fp8Proj (weight, weight_scale, input_scale) and the KV-cache scales; False: not one
    of these (the ordinary loader takes it). Marks 'fp8-unscaled:'/'fp8-scaled:' parts so that load_model
    can refuse an FP8 weight that never got its scale."""
    from .fp8 import FP8, load_into_fp8

    name = re.sub(r"^model\.", "", name)
    kv = re.match(r"layers\.(\d+)\.self_attn\.(k_scale|v_scale)$", name)
    if kv:   # per-tensor KV-cache scales (vLLM's names); used when the KV cache is FP8
        setattr(model.layers[int(kv.group(1))].self_attn, kv.group(2), float(tensor.float().reshape(-1)[0]))
        return True
    m = re.match(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|weight_scale|input_scale)$", name)
    if not m:
        if tensor.dtype == FP8:
            raise ValueError(f"FP8 checkpoint tensor {name!r} is not a decoder projection: only q/k/v/o/gate/up/down "
                             "may be FP8 (embeddings, norms and lm_head stay in bf16/fp16/fp32)")
        return False
    mod = m.group(3)
    fused, idx = _PACKED.get(mod, (mod, 0))
    target = f"layers.{m.group(1)}.{m.group(2)}.{fused}"
    if target not in fp8_mods:
        return False
    sizes = ([args.q_size, args.kv_size, args.kv_size] if fused == "qkv_proj" else
             [args.intermediate_size, args.intermediate_size] if fused == "gate_up_proj" else
             [fp8_mods[target].out_features])
    row0, part = sum(sizes[:idx]), m.group(4)
    load_into_fp8(fp8_mods[target], part, row0, sizes[idx], tensor, f"{name} -> {target}[{row0}:{row0 + sizes[idx]}]")
    if part == "weight":
        loaded.add(f"{target}.weight")
        if tensor.dtype == FP8:
            loaded.add(f"fp8-unscaled:{target}[{row0}]")
    elif part == "weight_scale":
        loaded.add(f"fp8-scaled:{target}[{row0}]")
    return True


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
    m = re.match(r"layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.(weight|bias|weight_scale)$", short)
    if m and m.group(1) in _SPLIT:
        dim, kind = _SPLIT[m.group(1)]
        n = {"q": local.q_size, "kv": local.kv_size, "mlp": local.intermediate_size}[kind]
        lo = tp.rank * n
        sl = f.get_slice(name)
        if m.group(2) == "weight_scale":
            # FP8 checkpoint: per-output-channel scales follow the weight's rows (column-parallel); a
            # row-parallel layer keeps every output row, and a per-tensor scale is the same for all
            shape = sl.get_shape()
            return sl[lo:lo + n] if dim == 0 and len(shape) >= 1 and shape[0] > 1 else f.get_tensor(name)
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
