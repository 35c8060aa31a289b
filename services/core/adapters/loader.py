"""Entry points: detect an artifact's format, load it into a LoraAdapter, check it against a model."""
from __future__ import annotations

import os
import re

import torch

from .adapter import LoraAdapter
from .bundle import Bundle, artifact_digest, open_bundle
from .errors import AdapterFormatError
from .nemo_format import parse_nemo
from .peft_format import parse_peft

CKPT_SOURCES = ("hf", "nemo")


def _detect(bundle: Bundle) -> str:
    hint = bundle.weights_hint
    if hint is not None and hint.endswith(".safetensors"):
        return "hf"
    names = bundle.names()
    if "adapter_config.json" in names:
        return "hf"
    if ("model_config.yaml" in names or "model_weights.ckpt" in names
            or any(re.fullmatch(r"mp_rank_\d+(?:_\d+)?/model_weights\.ckpt", n) for n in names)):
        return "nemo"
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "no files"
    raise AdapterFormatError(
        f"{bundle.origin}: neither an HF PEFT adapter (adapter_config.json + adapter_model."
        f"safetensors/.bin) nor a NeMo LoRA checkpoint (model_config.yaml + model_weights.ckpt); "
        f"found {shown}")


def detect_format(path: str | os.PathLike) -> str:
    """"hf" or "nemo" for a directory, weights file or archive; AdapterFormatError if neither."""
    return _detect(open_bundle(path))


def load_adapter(path: str | os.PathLike, ckpt_source: str | None = None, *,
                 max_rank: int | None = None, max_bytes: int | None = None) -> LoraAdapter:
    """Load an HF PEFT or NeMo LoRA artifact into a LoraAdapter (scales folded into B).

    path: an HF PEFT directory; a weights file (adapter_model.safetensors/.bin) beside its
    adapter_config.json; an archive (.tar, .tar.gz, .tgz, .zip) of such a directory (possibly in
    one top-level folder); a .nemo tar (plain or gzipped); or an extracted NeMo directory.
    ckpt_source: "hf" | "nemo" | None to detect; a mismatch raises AdapterFormatError.
    max_rank: reject adapters whose rank exceeds it. max_bytes: reject artifacts whose files
    (unpacked, for archives) exceed it.
    """
    if ckpt_source is not None and ckpt_source not in CKPT_SOURCES:
        raise AdapterFormatError(f"ckpt_source={ckpt_source!r} must be one of {CKPT_SOURCES}")
    bundle = open_bundle(path, max_bytes)
    fmt = _detect(bundle)
    if ckpt_source is not None and ckpt_source != fmt:
        raise AdapterFormatError(
            f"{bundle.origin}: ckpt_source={ckpt_source!r} but the artifact is a "
            f"{'HF PEFT adapter' if fmt == 'hf' else 'NeMo checkpoint'} ({fmt!r})")
    digest = artifact_digest(path)
    adapter = parse_peft(bundle, digest) if fmt == "hf" else parse_nemo(bundle, digest)
    if max_rank is not None and adapter.rank > max_rank:
        raise AdapterFormatError(
            f"{bundle.origin}: adapter rank {adapter.rank} exceeds max_rank={max_rank}")
    return adapter


def validate_artifact(path: str | os.PathLike, *, max_rank: int | None = None,
                      max_bytes: int | None = None) -> LoraAdapter:
    """What the registry runs on an upload: load_adapter plus whole-adapter sanity checks.

    On top of load_adapter's checks (safe loading, keys, dtypes, shapes vs rank, NaN/Inf in
    every factor, limits) it re-checks the folded factors for non-finite values and that the
    in-memory weights also fit max_bytes.
    """
    adapter = load_adapter(path, max_rank=max_rank, max_bytes=max_bytes)
    for (layer, module), (a, b) in adapter.weights.items():
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise AdapterFormatError(f"layer {layer} {module}: non-finite LoRA weights")
    if max_bytes is not None and adapter.nbytes() > max_bytes:
        raise AdapterFormatError(
            f"adapter weights take {adapter.nbytes()} bytes, over max_bytes={max_bytes}")
    return adapter


def check_compatible(adapter: LoraAdapter, *, module_shapes: dict[str, tuple[int, int]],
                     num_layers: int, enabled_modules: set[str] | None, max_rank: int) -> None:
    """Raise AdapterFormatError listing every way `adapter` does not fit the served base model.

    module_shapes: HF module -> (in_features, out_features) of the base model;
    enabled_modules: HF modules LoRA is enabled for (None = all the model has).
    """
    problems: list[str] = []
    if adapter.rank > max_rank:
        problems.append(f"adapter rank {adapter.rank} exceeds max_lora_rank={max_rank}")
    shapes = adapter.module_shapes()
    for module in adapter.target_modules:
        if module not in module_shapes:
            problems.append(f"the base model has no module {module!r} "
                            f"(it has {sorted(module_shapes)})")
            continue
        if enabled_modules is not None and module not in enabled_modules:
            problems.append(f"adapter targets {module!r}, which is not enabled in "
                            f"lora_target_modules (enabled: {sorted(enabled_modules)})")
        if tuple(shapes[module]) != tuple(module_shapes[module]):
            problems.append(f"{module} shape mismatch: base model expects (in, out)="
                            f"{tuple(module_shapes[module])}, adapter has {tuple(shapes[module])}")
    if adapter.num_layers > num_layers:
        problems.append(f"adapter has layer index {adapter.num_layers - 1} but the base model has "
                        f"only {num_layers} layers")
    if problems:
        raise AdapterFormatError("adapter is incompatible with the base model: " + "; ".join(problems))
