"""Entry points: detect an artifact's format, load it into a LoraAdapter, check it against a model."""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .adapter import LoraAdapter
from .archives import STAGED_IN_PROGRESS, StagedArtifact
from .bundle import ArchiveLimits, Bundle, artifact_digest, open_bundle
from .errors import AdapterFormatError, clip, shorten
from .tensors import VALUES_VERIFIED, finite_and_peak
from .nemo_format import parse_nemo
from .peft_format import parse_peft

CKPT_SOURCES = ("hf", "nemo")
SERVING_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
log = logging.getLogger(__name__)
_DIGESTS = ThreadPoolExecutor(2, thread_name_prefix="loraserve-digest")  # artifact hashing beside the parse


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
    # The files found are not listed: under --allowed-lora-dir they would tell a client what
    # else the operator's directory holds.
    raise AdapterFormatError(
        f"{bundle.origin}: neither an HF PEFT adapter (adapter_config.json + adapter_model."
        f"safetensors/.bin) nor a NeMo LoRA checkpoint (model_config.yaml + model_weights.ckpt)")


def detect_format(path: str | os.PathLike) -> str:
    """"hf" or "nemo" for a directory, weights file or archive; AdapterFormatError if neither."""
    return _detect(open_bundle(path))


def load_adapter(path: str | os.PathLike, ckpt_source: str | None = None, *,
                 max_rank: int | None = None, max_bytes: int | None = None,
                 limits: ArchiveLimits | None = None, confine_to: list[str] | None = None,
                 serving_dtype: torch.dtype | None = None, timings: dict | None = None,
                 digest: str | None = None, alloc=None, data=None, values_verified: bool = False) -> LoraAdapter:
    """Load an HF PEFT or NeMo LoRA artifact into a LoraAdapter (scales folded into B).

    path: an HF PEFT directory; a weights file (adapter_model.safetensors/.bin) beside its
    adapter_config.json; an archive (.tar, .tar.gz, .tgz, .zip) of such a directory (possibly in
    one top-level folder); a .nemo tar (plain or gzipped); or an extracted NeMo directory.
    ckpt_source: "hf" | "nemo" | None to detect; a mismatch raises AdapterFormatError.
    max_rank: reject adapters whose rank exceeds it. max_bytes: reject artifacts whose files
    (unpacked, for archives) exceed it. limits: archive-bomb limits (bundle.ArchiveLimits; the
    engine passes ArchiveLimits.for_model). confine_to: real directories every file read must
    lie in, symlinks resolved. serving_dtype: refuse weights that overflow it (check_serving_range).
    digest: the artifact's "sha256:<hex>" when the caller already verified it (a download checked
    against the registry's digest); else it is computed on a thread while the parser runs.
    alloc: nbytes -> uint8 CPU tensor that weights files are read into (bundle.writable_buffer).
    data: `path`'s bytes already in memory (a plain tar; requires `digest`), read instead of the file.
    values_verified: the artifact's values were checked before these bytes were (requires `digest`: a
    registry download, validated at upload, digest verified): the per-value scans (finite, peak,
    serving range) are skipped; structure, keys, shapes and ranks are still checked.
    timings: when given, filled with the seconds of each stage (read_s: files from disk or the
    archive, digest_s, parse_s: decode + checks + scale folding, range_s: check_serving_range).

    Every problem raises AdapterFormatError with a message for a person; input the checks did
    not foresee is logged with its traceback and raised as AdapterFormatError(unforeseen).
    """
    if data is not None and digest is None:
        raise ValueError("load_adapter(data=...) needs the digest those bytes were verified against")
    if values_verified and digest is None:
        raise ValueError("load_adapter(values_verified=True) needs the digest those values were verified under")
    if ckpt_source is not None and ckpt_source not in CKPT_SOURCES:
        raise AdapterFormatError(f"ckpt_source={shorten(ckpt_source)} must be one of {CKPT_SOURCES}")
    token = VALUES_VERIFIED.set(values_verified)
    # bytes still arriving (a download overlapped with this parse): only what the parser reads is waited
    # for, and only when no value scan reads them all (values_verified); else all of them now
    staged = data if isinstance(data, StagedArtifact) and data.in_progress() else None
    if staged is not None and not values_verified:
        staged.wait_all()
        staged = None
    staged_token = STAGED_IN_PROGRESS.set(staged)
    try:
        return _load(path, ckpt_source, max_rank, max_bytes, limits, confine_to,
                     None if values_verified else serving_dtype, timings if timings is not None else {}, digest,
                     alloc, data)
    except AdapterFormatError:
        raise
    except RecursionError:
        raise AdapterFormatError(f"{_origin_of(path)}: the adapter files are nested too deeply to parse") from None
    except MemoryError:
        raise AdapterFormatError(f"{_origin_of(path)}: the adapter files need more memory than this "
                                 "process has") from None
    except Exception as exc:  # a parser bug on hostile input: still the artifact's fault, said plainly
        log.warning("adapter parser raised %s on %s", type(exc).__name__, _origin_of(path), exc_info=True)
        err = AdapterFormatError(f"{_origin_of(path)}: the adapter files are malformed in a way the parser "
                                 f"cannot describe ({type(exc).__name__})")
        err.unforeseen = True
        raise err from None
    finally:
        VALUES_VERIFIED.reset(token)
        STAGED_IN_PROGRESS.reset(staged_token)


def _origin_of(path: str | os.PathLike) -> str:
    return clip(os.path.basename(os.fspath(path).rstrip("/\\")) or os.fspath(path))


def _load(path, ckpt_source, max_rank, max_bytes, limits, confine_to, serving_dtype, timings,  # type: ignore[no-untyped-def]
          digest, alloc, data) -> LoraAdapter:
    hashing, stop = None, threading.Event()
    if digest is None:  # sha256 releases the GIL: hash on a thread while this one reads and parses
        hashing = _DIGESTS.submit(artifact_digest, path, stop)
    try:
        return _load_hashing(path, ckpt_source, max_rank, max_bytes, limits, confine_to, serving_dtype, timings,
                             digest, hashing, alloc, data)
    finally:
        if hashing is not None and not hashing.done():
            # refused (or failed) before the digest was needed: stop hashing now, so a refused
            # multi-GB artifact is not read to its end on the thread after the refusal
            stop.set()
            hashing.cancel()


def _load_hashing(path, ckpt_source, max_rank, max_bytes, limits, confine_to, serving_dtype, timings,  # type: ignore[no-untyped-def]
                  digest, hashing, alloc, data) -> LoraAdapter:
    t0 = time.perf_counter()
    bundle = open_bundle(path, max_bytes, limits=limits, confine_to=confine_to, alloc=alloc, data=data)
    fmt = _detect(bundle)
    if ckpt_source is not None and ckpt_source != fmt:
        raise AdapterFormatError(
            f"{bundle.origin}: ckpt_source={ckpt_source!r} but the artifact is a "
            f"{'HF PEFT adapter' if fmt == 'hf' else 'NeMo checkpoint'} ({fmt!r})")
    t1 = time.perf_counter()
    staged = STAGED_IN_PROGRESS.get()
    if staged is not None and fmt != "hf":
        staged.wait_all()  # (the NeMo parser reads every tensor through torch.load)
    adapter = parse_peft(bundle, digest or "") if fmt == "hf" else parse_nemo(bundle, digest or "")
    if max_rank is not None and adapter.rank > max_rank:
        raise AdapterFormatError(
            f"{bundle.origin}: adapter rank {adapter.rank} exceeds max_rank={max_rank}")
    t2 = time.perf_counter()
    if serving_dtype is not None:
        check_serving_range(adapter, serving_dtype)
    t3 = time.perf_counter()
    if hashing is not None:
        adapter.digest = hashing.result()
    t4 = time.perf_counter()
    read_s = (t1 - t0) + bundle.read_s  # an archive is read whole when opened; a directory's files by the parser
    # digest_s: what hashing added after the parse was done (it runs beside the parse)
    timings.update(read_s=read_s, parse_s=t2 - t1 - bundle.read_s, range_s=t3 - t2, digest_s=t4 - t3)
    return adapter


def check_serving_range(adapter: LoraAdapter, dtype: torch.dtype) -> None:
    """Refuse folded weights the serving dtype cannot hold or whose output it cannot hold.

    For each module, with A [r, in] and the scaled B [out, r], the largest output of the LoRA
    path for an input with |x_i| <= 1 is  gain = max_j sum_k |B_jk| * sum_i |A_ki|  (computed in
    fp64). Both max|B| and the gain must stay within dtype's largest finite value; a trained
    adapter's gain is O(1-100), one with lora_alpha=1e38 is beyond any dtype.
    """
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"serving dtype must be one of {SERVING_DTYPES}, got {dtype}")
    limit = torch.finfo(dtype).max
    name = str(dtype).removeprefix("torch.")
    if adapter.peaks is not None and adapter.weights:  # the parser's one-pass bounds: no tensor read
        peak_a, peak_b = adapter.peaks
        most_a = max(a.numel() for a, _ in adapter.weights.values())  # sum_ki |A_ki| <= r * in * max|A|
        if peak_b <= limit and peak_b * peak_a * most_a <= limit:
            return
    for (layer, module), (a, b) in adapter.weights.items():
        # fast path: finite B with max|B| * sum_ki |A_ki| (>= the gain) within the limit passes
        # without the exact fp64 computation (one integer pass over B, one fp32 pass over A)
        finite, peak = finite_and_peak(b)
        if finite and peak <= limit and b.numel():
            bound = peak * float(a.to(torch.float32).abs().sum(dtype=torch.float64))
            if bound <= limit:
                continue
        a64, b64 = a.to(torch.float64).abs(), b.to(torch.float64).abs()
        peak = float(b64.max()) if b64.numel() else 0.0
        gain = float((b64 @ a64.sum(dim=1)).max()) if b64.numel() else 0.0
        if not (peak <= limit and gain <= limit):  # also catches NaN/Inf
            raise AdapterFormatError(
                f"layer {layer} {module}: the scaled LoRA weights overflow {name} (largest |B*scale| "
                f"{peak:.3g}, largest output for a unit input {gain:.3g}, {name} max {limit:.3g}); "
                f"check lora_alpha and the weights")


def validate_artifact(path: str | os.PathLike, *, max_rank: int | None = None,
                      max_bytes: int | None = None, limits: ArchiveLimits | None = None,
                      serving_dtype: torch.dtype | None = torch.float16) -> LoraAdapter:
    """What the registry runs on an upload: load_adapter plus whole-adapter sanity checks.

    On top of load_adapter's checks (safe loading, keys, dtypes, shapes vs rank, NaN/Inf in
    every factor, limits) it re-checks the folded factors for non-finite values and that the
    in-memory weights also fit max_bytes. serving_dtype defaults to float16, the narrowest
    dtype the engine serves in, so an accepted adapter fits every engine.
    """
    adapter = load_adapter(path, max_rank=max_rank, max_bytes=max_bytes, limits=limits,
                           serving_dtype=serving_dtype)
    for (layer, module), (a, b) in ({} if adapter.peaks is not None else adapter.weights).items():
        # (peaks: the parser's one pass over the file proved every folded factor finite)
        if not (finite_and_peak(a)[0] and finite_and_peak(b)[0]):
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
