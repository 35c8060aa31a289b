"""HF PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors (or .bin).

Tensor keys look like `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, optionally
with an adapter-name infix (`lora_A.default.weight`) and optionally without `base_model.model.`.
PEFT stores lora_A as [r, in] and lora_B as [out, r] for every base layer type, also when
`fan_in_fan_out` is set (that flag only transposes the merged delta for Conv1D bases), so no
transpose is applied here. DoRA adapters (use_dora=true) also hold `<module>.lora_magnitude_vector`
[out] for every adapted linear layer (PEFT's checkpoint key; a raw module state dict has it as
`lora_magnitude_vector.<adapter>.weight`, also accepted); DoRA on embeddings is refused (and
conv, which Llama has none of). Per-module r and alpha follow PEFT's rank_pattern/alpha_pattern rule:
a pattern key applies to module path P if `(.*\\.)?(key)$` matches P, first match in dict order.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import regex
import torch

from .adapter import LoraAdapter, build_adapter, check_lora_scale, fold_scale, fold_scales_in_place, lora_scale
from . import staged as staged_mod
from .archives import STAGED_IN_PROGRESS
from .bundle import Bundle
from .errors import AdapterFormatError, shorten
from .modules import HF_LINEAR_MODULES
from .tensors import check_lora_tensor, load_tensor_file, pair_factors

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_MAGNITUDE_KEY = re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(?:(?:\.(?P<adapter>[^.]+))?\.weight)?$")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PREFIX = "base_model.model."
_MAX_CONFIG_BYTES = 1 << 20
_REGEX_TIMEOUT_S = 0.5  # patterns come from untrusted uploads: bound the matching time
# Config fields whose non-empty value changes the math beyond plain LoRA.
_UNSUPPORTED_FIELDS = {
    "lora_bias": "a bias on lora_B (lora_bias=true)",
    "modules_to_save": "modules_to_save (fully fine-tuned extra modules)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


@dataclass
class PeftSettings:
    r: int
    alpha: float
    use_rslora: bool
    target_modules: list[str] | str | None
    layers_to_transform: list[int] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_dora: bool = False


def parse_peft_config(raw: bytes, origin: str) -> PeftSettings:
    """Parse and vet adapter_config.json; unsupported features raise AdapterFormatError."""
    if len(raw) > _MAX_CONFIG_BYTES:  # real ones are ~1 KB; parsing gigabytes of JSON costs ~10x in objects
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} is not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} is nested too deeply to be an adapter config") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} must be a JSON object")
    peft_type = str(cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} peft_type={shorten(peft_type)} is not LORA")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterFormatError(
            f"{origin}: {CONFIG_NAME} bias={shorten(bias)} is not supported (only 'none')")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if cfg.get(field):
            raise AdapterFormatError(
                f"{origin}: {CONFIG_NAME} uses {what}: {field}={shorten(cfg[field])} is not supported")
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} r={shorten(r)} must be a positive integer")
    alpha = _number(cfg.get("lora_alpha", 8), "lora_alpha", origin)
    rank_pattern = _pattern_dict(cfg.get("rank_pattern"), "rank_pattern", origin, integer=True)
    alpha_pattern = _pattern_dict(cfg.get("alpha_pattern"), "alpha_pattern", origin, integer=False)
    target = cfg.get("target_modules")
    if target is not None and not (isinstance(target, str)
                                   or isinstance(target, list) and all(isinstance(t, str) for t in target)):
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} target_modules must be a list of names or a regex")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list)
                                   and all(isinstance(i, int) for i in layers)):
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} layers_to_transform={shorten(layers)} is invalid")
    return PeftSettings(r=r, alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)),
                        target_modules=target, layers_to_transform=layers or None,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                        use_dora=_flag(cfg.get("use_dora", False), "use_dora", origin))


def parse_peft(bundle: Bundle, digest: str) -> LoraAdapter:
    """Load a PEFT adapter from a bundle whose root holds adapter_config.json."""
    origin = bundle.origin
    if not bundle.has(CONFIG_NAME):
        raise AdapterFormatError(f"{origin}: missing {CONFIG_NAME} (not an HF PEFT adapter)")
    settings = parse_peft_config(bundle.read(CONFIG_NAME), origin)
    weights_name = bundle.weights_hint or next((n for n in WEIGHT_NAMES if bundle.has(n)), None)
    if weights_name is None:
        raise AdapterFormatError(f"{origin}: missing adapter weights ({' or '.join(WEIGHT_NAMES)})")
    tensors = load_tensor_file(bundle.read(weights_name), weights_name)
    # one pass over the file found every value finite with max |x| <= peak: no per-tensor checks
    known = getattr(tensors, "finite_peak", None)
    peak = known[1] if known is not None and known[0] else None
    factors, magnitudes = _group_factors(tensors, weights_name, known_finite=peak is not None)
    # the decoded tensors are this parse's own, none sharing bytes with another: fold scales in place
    # (B is a view of the file's buffer; pair_factors' fp32 upcast of mixed pairs makes new tensors)
    in_place = getattr(tensors, "in_place_ok", False)
    if magnitudes and not settings.use_dora:
        raise AdapterFormatError(
            f"{weights_name}: holds DoRA lora_magnitude_vector tensors but {CONFIG_NAME} has use_dora=false")
    if settings.use_dora and not magnitudes:
        raise AdapterFormatError(
            f"{weights_name}: {CONFIG_NAME} has use_dora=true but the weights hold no lora_magnitude_vector")
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    dora: dict[tuple[int, str], torch.Tensor] = {}
    max_scale = 0.0
    staged = STAGED_IN_PROGRESS.get()  # the bytes may still be arriving: wait for those read
    folds: list[tuple[torch.Tensor, float]] = []  # (B, scale) folded in place after the loop, on a few threads
    for path, (layer, module, a, b) in sorted(factors.items()):
        _check_targeted(settings, path, layer, weights_name)
        r = _pattern_value(settings.rank_pattern, path, settings.r, weights_name)
        alpha = _pattern_value(settings.alpha_pattern, path, settings.alpha, weights_name)
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterFormatError(
                f"{weights_name}: {path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not "
                f"have rank {r} from {CONFIG_NAME} (r / rank_pattern)")
        if (layer, module) in pairs:
            raise AdapterFormatError(f"{weights_name}: two LoRA pairs for layer {layer} {module}")
        scale = lora_scale(alpha, r, settings.use_rslora)
        max_scale = max(max_scale, abs(scale))
        if in_place and b.is_contiguous() and scale != 1.0:
            check_lora_scale(scale, f"{weights_name}: {path}")
            folds.append((b, scale))
            pairs[(layer, module)] = (a.contiguous(), b)
        else:
            if staged is not None and scale != 1.0:
                staged.wait_tensor(b)  # (a copy or a fold reads b's bytes)
            pairs[(layer, module)] = (a.contiguous(), fold_scale(b, scale, f"{weights_name}: {path}", in_place))
        if path in magnitudes:
            dora[(layer, module)] = magnitudes.pop(path)
    if magnitudes:
        raise AdapterFormatError(f"{weights_name}: DoRA lora_magnitude_vector for {shorten(next(iter(magnitudes)))} "
                                 f"has no lora_A/lora_B beside it")
    if staged is not None and staged_mod.FOLD_ON_LANDING:
        staged.fold_on_landing(folds)  # (on the download's threads as the bytes land; the rest here)
        staged.wait_folds()
    else:
        fold_scales_in_place(folds, ready=None if staged is None else staged.wait_tensor)
    if staged is not None and dora:
        staged.wait_all()  # DoRA's magnitudes are checked (read) next
    return build_adapter("hf", pairs, alpha=settings.alpha, use_rslora=settings.use_rslora,
                         digest=digest, origin=weights_name, magnitudes=dora if settings.use_dora else None,
                         peaks=None if peak is None else (peak, peak * max_scale))


def _group_factors(tensors: dict[str, torch.Tensor], origin: str, known_finite: bool = False
                   ) -> tuple[dict[str, tuple[int, str, torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Pair lora_A/lora_B per module path -> (layer, module, A, B), with every key accounted for;
    also DoRA's magnitude vectors by module path (shapes and values checked by build_adapter)."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    adapter_names: set[str] = set()
    for key, tensor in tensors.items():
        mag = _MAGNITUDE_KEY.match(key)
        if mag is not None:
            path = mag["path"].removeprefix(_PREFIX)
            module = path.rsplit(".", 1)[-1]
            if module not in HF_LINEAR_MODULES:
                raise AdapterFormatError(
                    f"{origin}: DoRA on {shorten(module)} ({shorten(key)}) is not supported; only the decoder "
                    f"linear layers {list(HF_LINEAR_MODULES)} can carry DoRA")
            if path in magnitudes:
                raise AdapterFormatError(f"{origin}: duplicate DoRA lora_magnitude_vector for {shorten(path)}")
            adapter_names.add(mag["adapter"] or "")
            magnitudes[path] = tensor
            continue
        m = _LORA_KEY.match(key)
        if m is None:
            raise AdapterFormatError(f"{origin}: {_describe_foreign_key(key)}")
        path = m["path"].removeprefix(_PREFIX)
        adapter_names.add(m["adapter"] or "")
        module = path.rsplit(".", 1)[-1]
        if module in ("embed_tokens", "lm_head"):
            raise AdapterFormatError(
                f"{origin}: LoRA on {module} ({shorten(key)}) is not supported; only the decoder linear "
                f"layers {list(HF_LINEAR_MODULES)} can carry LoRA")
        if module not in HF_LINEAR_MODULES:
            raise AdapterFormatError(
                f"{origin}: unknown LoRA target module {shorten(module)} ({shorten(key)}); supported: "
                f"{list(HF_LINEAR_MODULES)}")
        slot = halves.setdefault(path, {})
        if m["which"] in slot:
            raise AdapterFormatError(f"{origin}: duplicate lora_{m['which']} for {path}")
        slot[m["which"]] = check_lora_tensor(tensor, key, origin, known_finite)
    if len(adapter_names) > 1:
        raise AdapterFormatError(
            f"{origin}: holds several adapters {sorted(n or '<none>' for n in adapter_names)}; "
            f"expected one")
    out: dict[str, tuple[int, str, torch.Tensor, torch.Tensor]] = {}
    for path, slot in halves.items():
        a, b = pair_factors(slot, "A", "B", "lora_A", "lora_B", f"{origin}: {path}")
        layer_match = _LAYER_INDEX.search(path)
        if layer_match is None:
            raise AdapterFormatError(f"{origin}: cannot find a decoder layer index in {shorten(path)}")
        out[path] = (int(layer_match.group(1)), path.rsplit(".", 1)[-1], a, b)
    return out, magnitudes


def _describe_foreign_key(key: str) -> str:
    if "lora_embedding_" in key:
        return f"LoRA on embed_tokens ({shorten(key)}) is not supported"
    if "lora_magnitude_vector" in key:
        return f"DoRA magnitude vector {shorten(key)} is not a linear layer's (DoRA on embeddings is not supported)"
    if ".lora_B" in key and key.endswith(".bias"):
        return f"bias on lora_B ({shorten(key)}) is not supported"
    if "modules_to_save" in key:
        return f"modules_to_save tensor {shorten(key)} is not supported"
    return (f"tensor {shorten(key)} is not a LoRA factor (expected '<module>.lora_A.weight' / "
            f"'<module>.lora_B.weight'); full weights (modules_to_save, lm_head, ...) are not supported")


def _check_targeted(settings: PeftSettings, path: str, layer: int, origin: str) -> None:
    """The weights must agree with target_modules / layers_to_transform, as PEFT would select."""
    target = settings.target_modules
    if target is None or target == "all-linear":
        return
    if isinstance(target, str):
        if not _fullmatch(target, path, "target_modules", origin):
            raise AdapterFormatError(
                f"{origin}: weights have LoRA on {shorten(path)} but {CONFIG_NAME} target_modules regex "
                f"{shorten(target)} does not select it")
        return  # PEFT ignores layers_to_transform for regex targets
    if not (path in target or any(path.endswith("." + t) for t in target)):
        raise AdapterFormatError(
            f"{origin}: weights have LoRA on {shorten(path)} but {CONFIG_NAME} target_modules={target} "
            f"does not include it")
    if settings.layers_to_transform is not None and layer not in settings.layers_to_transform:
        raise AdapterFormatError(
            f"{origin}: weights have LoRA on layer {layer} ({shorten(path)}) but {CONFIG_NAME} "
            f"layers_to_transform={settings.layers_to_transform}")


def _pattern_value(patterns: dict[str, Any], path: str, default: Any, origin: str) -> Any:
    for key, value in patterns.items():
        if _match(rf"(.*\.)?({key})$", path, "rank_pattern/alpha_pattern", origin):
            return value
    return default


def _match(pattern: str, text: str, what: str, origin: str, *, full: bool = False) -> bool:
    matcher = regex.fullmatch if full else regex.match
    try:
        return matcher(pattern, text, timeout=_REGEX_TIMEOUT_S) is not None
    except regex.error as e:
        raise AdapterFormatError(f"{origin}: invalid regex in {what}: {shorten(pattern)} ({e})") from None
    except TimeoutError:
        raise AdapterFormatError(f"{origin}: regex in {what} is too expensive: {shorten(pattern)}") from None


def _fullmatch(pattern: str, text: str, what: str, origin: str) -> bool:
    return _match(pattern, text, what, origin, full=True)


def _flag(value: Any, field: str, origin: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise AdapterFormatError(f"{origin}: {CONFIG_NAME} {field}={shorten(value)} must be true or false")


def _number(value: Any, field: str, origin: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} {field}={shorten(value)} must be a finite number")
    return float(value)


def _pattern_dict(value: Any, field: str, origin: str, *, integer: bool) -> dict:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{origin}: {CONFIG_NAME} {field} must be an object")
    for key, v in value.items():
        if integer and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise AdapterFormatError(f"{origin}: {CONFIG_NAME} {field}[{shorten(key)}]={shorten(v)} must be a positive integer")
        if not integer:
            _number(v, f"{field}[{shorten(key)}]", origin)
    return value
