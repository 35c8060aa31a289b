"""NeMo (Megatron) LoRA adapters: a .nemo tar or extracted dir with model_config.yaml + model_weights.ckpt.

Tensor keys: `<prefix>.layers.{i}.<block>.adapter_layer.<adapter>.linear_in.weight` [r, in] and
`.linear_out.weight` [out, r], with prefix `model.decoder` (Megatron core),
`model.language_model.encoder` (legacy) or `model`. Adapters and the HF modules they become:

    self_attention.lora_kqv_adapter        fused linear_qkv  -> q_proj, k_proj, v_proj (A shared)
    self_attention.lora_dense_attention_adapter              -> o_proj
    mlp.lora_hto4h_adapter                 fused linear_fc1  -> gate_proj, up_proj (A shared)
    mlp.lora_4htoh_adapter                                   -> down_proj

Megatron's fused qkv output rows are interleaved per query group g (ng groups, np heads,
hn = kv_channels or hidden/np): [q heads of g (np/ng * hn rows); k head of g (hn); v head of g (hn)],
i.e. viewed as [ng, np/ng + 2, hn, r]. Gated linear_fc1 rows are [gate; up] halves (the first
half goes through the activation). NeMo scales the adapter output by alpha/adapter_dim
(`peft.lora_tuning`, alpha defaulting to adapter_dim); that scale is folded into B.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from .adapter import LoraAdapter, build_adapter, fold_scale
from .bundle import Bundle
from .errors import AdapterFormatError, shorten
from .tensors import check_lora_tensor, load_torch_bytes, pair_factors

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
_MAX_CONFIG_BYTES = 1 << 20
_KEY = re.compile(
    r"^(?:model\.decoder|model\.language_model\.encoder|model)\.layers\.(?P<layer>\d+)\."
    r"(?P<block>self_attention|mlp)\.adapter_layer\.(?P<adapter>\w+)\."
    r"(?P<part>linear_in|linear_out)\.weight$")
_ADAPTER_BLOCK = {
    "lora_kqv_adapter": "self_attention",
    "lora_dense_attention_adapter": "self_attention",
    "lora_hto4h_adapter": "mlp",
    "lora_4htoh_adapter": "mlp",
}


@dataclass
class NemoDims:
    """Model dimensions from model_config.yaml that the fused layouts depend on."""
    hidden: int
    num_heads: int
    num_groups: int
    head_dim: int
    ffn: int | None
    num_layers: int | None
    activation: str

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_groups * self.head_dim


def split_fused_qkv(out: torch.Tensor, dims: NemoDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """De-interleave Megatron's fused qkv rows: [ng*(np/ng+2)*hn, r] -> q [np*hn, r], k, v [ng*hn, r]."""
    heads_per_group = dims.num_heads // dims.num_groups
    grouped = out.reshape(dims.num_groups, heads_per_group + 2, dims.head_dim, out.shape[-1])
    q = grouped[:, :heads_per_group].reshape(dims.q_dim, -1)
    k = grouped[:, heads_per_group].reshape(dims.kv_dim, -1)
    v = grouped[:, heads_per_group + 1].reshape(dims.kv_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def parse_nemo(bundle: Bundle, digest: str) -> LoraAdapter:
    origin = bundle.origin
    config_name, weights_name = _locate_files(bundle)
    cfg = _load_yaml(bundle.read(config_name), origin)
    dims = _dims(cfg, origin)
    peft_cfg = cfg.get("peft")
    lora_cfg = peft_cfg.get("lora_tuning") if isinstance(peft_cfg, dict) else None
    lora_cfg = lora_cfg if isinstance(lora_cfg, dict) else {}
    tensors = load_torch_bytes(bundle.read(weights_name), weights_name)
    factors = _group(tensors, weights_name)
    ranks = {a.shape[0] for a, _ in factors.values()}
    dim = _positive_int(lora_cfg.get("adapter_dim", max(ranks)), "peft.lora_tuning.adapter_dim", origin)
    alpha = lora_cfg.get("alpha")
    alpha = float(dim if alpha is None else _number(alpha, origin))
    scale = alpha / dim
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, adapter), (a, b) in sorted(factors.items()):
        where = f"{weights_name}: layer {layer} {adapter}"
        if a.shape[0] != dim:
            raise AdapterFormatError(
                f"{where}: linear_in has rank {a.shape[0]} but peft.lora_tuning.adapter_dim={dim}")
        if dims.num_layers is not None and layer >= dims.num_layers:
            raise AdapterFormatError(f"{where}: layer index {layer} >= num_layers={dims.num_layers}")
        for module, in_dim, b_part in _split(adapter, b, dims, where):
            if in_dim is not None and a.shape[1] != in_dim:
                raise AdapterFormatError(
                    f"{where}: linear_in {list(a.shape)} expected [{dim}, {in_dim}] for {module}")
            pairs[(layer, module)] = (a.clone().contiguous(), fold_scale(b_part, scale, where))
    return build_adapter("nemo", pairs, alpha=alpha, use_rslora=False, digest=digest,
                         origin=weights_name)


def _split(adapter: str, b: torch.Tensor, dims: NemoDims, where: str
           ) -> list[tuple[str, int | None, torch.Tensor]]:
    """Map one NeMo adapter's B onto HF modules: [(module, expected in_features, B part)]."""
    rows = b.shape[0]

    def expect(n: int, what: str) -> None:
        if rows != n:
            raise AdapterFormatError(f"{where}: linear_out has {rows} rows, expected {n} ({what})")

    if adapter == "lora_kqv_adapter":
        expect(dims.q_dim + 2 * dims.kv_dim,
               f"q {dims.q_dim} + k {dims.kv_dim} + v {dims.kv_dim} for {dims.num_heads} heads, "
               f"{dims.num_groups} query groups, head dim {dims.head_dim}")
        q, k, v = split_fused_qkv(b, dims)
        return [("q_proj", dims.hidden, q), ("k_proj", dims.hidden, k), ("v_proj", dims.hidden, v)]
    if adapter == "lora_dense_attention_adapter":
        expect(dims.hidden, "hidden_size")
        return [("o_proj", dims.q_dim, b)]
    if adapter == "lora_hto4h_adapter":
        if dims.ffn is not None and rows == dims.ffn and "glu" not in dims.activation:
            raise AdapterFormatError(
                f"{where}: non-gated MLP (activation={shorten(dims.activation)}) cannot map onto the "
                f"gate_proj/up_proj of a gated (Llama) MLP")
        if dims.ffn is not None:
            expect(2 * dims.ffn, f"[gate; up] = 2 x ffn_hidden_size {dims.ffn}")
        elif rows % 2:
            raise AdapterFormatError(f"{where}: linear_out has an odd row count {rows}, expected [gate; up]")
        half = rows // 2
        return [("gate_proj", dims.hidden, b[:half]), ("up_proj", dims.hidden, b[half:])]
    # lora_4htoh_adapter: in = ffn (checked against linear_in when known)
    expect(dims.hidden, "hidden_size")
    return [("down_proj", dims.ffn, b)]


def _group(tensors: dict[str, torch.Tensor], origin: str) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None or _ADAPTER_BLOCK.get(m["adapter"]) != m["block"]:
            raise AdapterFormatError(
                f"{origin}: unsupported tensor {shorten(key)}; expected "
                f"'model.decoder.layers.<i>.<self_attention|mlp>.adapter_layer.<adapter>."
                f"<linear_in|linear_out>.weight' with adapter one of {sorted(_ADAPTER_BLOCK)}")
        slot = halves.setdefault((int(m["layer"]), m["adapter"]), {})
        if m["part"] in slot:
            raise AdapterFormatError(f"{origin}: duplicate {m['part']} for layer {m['layer']} {m['adapter']}")
        slot[m["part"]] = check_lora_tensor(tensor, key, origin)
    out = {}
    for (layer, adapter), slot in halves.items():
        out[(layer, adapter)] = pair_factors(slot, "linear_in", "linear_out", "linear_in", "linear_out",
                                             f"{origin}: layer {layer} {adapter}")
    if not out:
        raise AdapterFormatError(f"{origin}: no LoRA weights found")
    return out


def _locate_files(bundle: Bundle) -> tuple[str, str]:
    names = bundle.names()
    if bundle.weights_hint is not None:
        weights = bundle.weights_hint
    elif WEIGHTS_NAME in names:
        weights = WEIGHTS_NAME
    else:
        shards = sorted(n for n in names if re.fullmatch(rf"mp_rank_\d+(?:_\d+)?/{WEIGHTS_NAME}", n))
        if len(shards) > 1:
            raise AdapterFormatError(
                f"{bundle.origin}: model-parallel NeMo checkpoint with {len(shards)} shards "
                f"({', '.join(shards)}) is not supported; merge it to one shard first")
        if not shards:
            raise AdapterFormatError(f"{bundle.origin}: missing {WEIGHTS_NAME} (not a NeMo LoRA checkpoint)")
        weights = shards[0]
    if CONFIG_NAME not in names and not bundle.has(CONFIG_NAME):
        raise AdapterFormatError(f"{bundle.origin}: missing {CONFIG_NAME}")
    return CONFIG_NAME, weights


def _load_yaml(raw: bytes, origin: str) -> dict[str, Any]:
    if len(raw) > _MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        cfg = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        first = (str(e).splitlines() or [""])[0][:120]
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} is not valid YAML ({first})") from None
    except RecursionError:
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} is nested too deeply to be a model config") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} must be a YAML mapping")
    if "hidden_size" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]  # some exports nest the model config one level down
    return cfg


def _dims(cfg: dict[str, Any], origin: str) -> NemoDims:
    def field(name: str, default: Any = None, required: bool = False) -> Any:
        value = cfg.get(name)
        if value is None:
            if required:
                raise AdapterFormatError(f"{origin}: {CONFIG_NAME} lacks {name}")
            return default
        return _positive_int(value, name, origin)

    hidden = field("hidden_size", required=True)
    heads = field("num_attention_heads", required=True)
    groups = field("num_query_groups", heads)
    if heads % groups:
        raise AdapterFormatError(
            f"{origin}: num_attention_heads={heads} is not a multiple of num_query_groups={groups}")
    head_dim = field("kv_channels")
    if head_dim is None:
        if hidden % heads:
            raise AdapterFormatError(
                f"{origin}: hidden_size={hidden} not divisible by num_attention_heads={heads} "
                f"and no kv_channels given")
        head_dim = hidden // heads
    activation = str(cfg.get("activation") or "")
    if cfg.get("gated_linear_unit"):
        activation = activation or "glu"
    return NemoDims(hidden=hidden, num_heads=heads, num_groups=groups, head_dim=head_dim,
                    ffn=field("ffn_hidden_size"), num_layers=field("num_layers"),
                    activation=activation)


def _positive_int(value: Any, name: str, origin: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} {name}={shorten(value)} must be a positive integer")
    return value


def _number(value: Any, origin: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} peft.lora_tuning.alpha={shorten(value)} must be a number")
    return float(value)
