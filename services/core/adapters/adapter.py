"""The normalised in-memory form of a LoRA adapter, whatever format it came from.

Per decoder layer and HF module the adapter holds A [r, in_features] and B [out_features, r] with
the LoRA scale already folded into B, so that for an input row x the adapter adds

    delta(x) = x @ A.T @ B.T          (= s * x @ A.T @ B_raw.T,  s = alpha/r, or alpha/sqrt(r) for rsLoRA)
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .errors import AdapterFormatError
from .tensors import finite_and_peak

WeightKey = tuple[int, str]  # (layer index, HF module name)


@dataclass
class LoraAdapter:
    format: str                       # "hf" | "nemo"
    rank: int                         # max rank over all modules
    alpha: float                      # base lora_alpha; informational (scales are folded into B)
    use_rslora: bool
    target_modules: list[str]         # sorted HF module names present
    num_layers: int                   # 1 + max layer index present
    weights: dict[WeightKey, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    digest: str = ""                  # "sha256:<hex>" of the artifact
    # DoRA: (layer, module) -> magnitude m [out] as stored (empty for plain LoRA), and, once the
    # server computed them from its base weights, g = m / ||W + B@A||_row [out] float32, and for
    # base layers with a bias b (Qwen2 q/k/v) the shift (1 - g) * b [out] float32 (DoRA leaves b unscaled).
    magnitudes: dict[WeightKey, torch.Tensor] = field(default_factory=dict, repr=False)
    dora_scales: dict[WeightKey, torch.Tensor] = field(default_factory=dict, repr=False)
    dora_shifts: dict[WeightKey, torch.Tensor] = field(default_factory=dict, repr=False)
    # bounds the parser proved in one pass over the file: every A and every folded B finite with
    # max |A| <= peaks[0] and max |B| <= peaks[1] (None: unknown, checks look at each tensor)
    # (bounds of the weights the parser built: assigning new `weights` drops them)
    peaks: tuple[float, float] | None = field(default=None, repr=False)

    def __setattr__(self, name, value):  # type: ignore[no-untyped-def]
        if name == "weights" and "weights" in self.__dict__:
            object.__setattr__(self, "peaks", None)
        object.__setattr__(self, name, value)

    @property
    def is_dora(self) -> bool:
        return bool(self.magnitudes)

    def nbytes(self) -> int:
        """Bytes held by all A and B tensors (and DoRA's magnitude and factor vectors)."""
        vectors = (*self.magnitudes.values(), *self.dora_scales.values(), *self.dora_shifts.values())
        return (sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())
                + sum(v.numel() * v.element_size() for v in vectors))

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """HF module -> (in_features, out_features), the same for every layer."""
        shapes: dict[str, tuple[int, int]] = {}
        for (_, module), (a, b) in sorted(self.weights.items()):
            shapes.setdefault(module, (a.shape[1], b.shape[0]))
        return shapes

    def ranks(self) -> dict[WeightKey, int]:
        """(layer, module) -> rank r of that module's A/B pair."""
        return {key: a.shape[0] for key, (a, _) in self.weights.items()}

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the weights (all pairs share it)."""
        return next(iter(self.weights.values()))[0].dtype


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# The largest effective LoRA scale (alpha/r, alpha/sqrt(r)) accepted: float16's max, so that the
# scale times a unit activation is finite in every serving dtype. Trained adapters use 0.5-16;
# lora_alpha=1e38 is a bug or an attack and would turn every logit into NaN.
MAX_LORA_SCALE = 65504.0


def check_lora_scale(scale: float, where: str = "") -> None:
    """Refuses a non-finite scale or one above MAX_LORA_SCALE (`where` prefixes the message)."""
    if not (math.isfinite(scale) and abs(scale) <= MAX_LORA_SCALE):
        raise AdapterFormatError(
            f"{where + ': ' if where else ''}the effective LoRA scale {scale:.3g} (lora_alpha / r) is beyond "
            f"{MAX_LORA_SCALE:g}, the largest any serving dtype can apply safely; check lora_alpha")


# in-place folds of one adapter spread over a few threads (torch releases the GIL in mul_; each op on
# one intra-op thread: OpenMP workers stalled the parse on a busy host): 224 B factors of the 8B
# adapter, 44 MB, one thread ~10 ms
_FOLD_THREADS = max(1, int(os.environ.get("LORASERVE_FOLD_THREADS", 1)))  # 1 (default until measured on the GPU host): inline
_FOLDS = ThreadPoolExecutor(_FOLD_THREADS, thread_name_prefix="loraserve-fold")


def fold_scales_in_place(items: list[tuple[torch.Tensor, float]], ready=None) -> None:
    """b.mul_(scale) for each (contiguous b the caller owns, checked scale != 1), bit for bit what
    fold_scale(in_place=True) gives, on up to _FOLD_THREADS threads when there is enough work.
    ready(b): blocks until b's bytes are there (a download still arriving); folds go in memory order."""
    if ready is not None:
        items = sorted(items, key=lambda it: it[0].data_ptr())  # the order the bytes arrive in
    total = sum(b.numel() for b, _ in items)
    if total < (4 << 20) or len(items) < 2 or _FOLD_THREADS == 1:
        for b, scale in items:
            if ready is not None:
                ready(b)
            b.mul_(scale)
        return
    groups: list[list[tuple[torch.Tensor, float]]] = [[] for _ in range(_FOLD_THREADS)]
    sizes = [0] * _FOLD_THREADS
    if ready is not None:  # bytes still arriving: interleaved groups, each in memory order
        for k, it in enumerate(items):
            groups[k % _FOLD_THREADS].append(it)
    else:
        for b, scale in sorted(items, key=lambda it: -it[0].numel()):  # largest first, to the lightest group
            i = sizes.index(min(sizes))
            groups[i].append((b, scale))
            sizes[i] += b.numel()

    def run(group: list[tuple[torch.Tensor, float]]) -> None:
        from .threads import one_cpu_thread

        with one_cpu_thread():
            for b, scale in group:
                if ready is not None:
                    ready(b)
                b.mul_(scale)
    for job in [_FOLDS.submit(run, g) for g in groups if g]:
        job.result()


def fold_scale(b: torch.Tensor, scale: float, where: str = "", in_place: bool = False) -> torch.Tensor:
    """B * scale computed in fp32 and rounded once back to B's dtype; contiguous.

    Refuses a non-finite scale or one above MAX_LORA_SCALE (`where` prefixes the message).
    in_place: scale b itself (a tensor the caller owns, sharing bytes with no other)."""
    check_lora_scale(scale, where)
    if scale == 1.0:
        return b.contiguous()
    # in b's own dtype: torch computes a half/bfloat16 product in fp32 and rounds once, bit for bit
    # what b.float() * scale rounded back gives (tests/adapters/test_fast_checks.py), in one pass
    if in_place and b.is_contiguous():  # b is the caller's own (no other tensor shares its bytes)
        return b.mul_(scale)
    return torch.mul(b, scale).contiguous()


def build_adapter(fmt: str, pairs: dict[WeightKey, tuple[torch.Tensor, torch.Tensor]], *,
                  alpha: float, use_rslora: bool, digest: str, origin: str,
                  magnitudes: dict[WeightKey, torch.Tensor] | None = None,
                  peaks: tuple[float, float] | None = None) -> LoraAdapter:
    """Check cross-module consistency of already-scaled pairs and wrap them in a LoraAdapter.

    Checks: at least one pair; one float dtype; A is [r, in], B is [out, r]; every layer of a
    module has the same (in, out); all values finite (scaling may overflow fp16). DoRA
    `magnitudes` (None: plain LoRA): one finite vector [out] for every pair, kept in float32.
    peaks: (max |A|, max |B|) bounds the caller proved with every value finite; B's finite check
    is skipped when its bound stays clear of the dtype's largest value.
    """
    if not pairs:
        raise AdapterFormatError(f"{origin}: no LoRA weights found")
    shapes: dict[str, tuple[int, int, WeightKey]] = {}
    dtypes = {a.dtype for a, _ in pairs.values()} | {b.dtype for _, b in pairs.values()}
    dtype = next(iter(dtypes))
    b_known_finite = (peaks is not None and len(dtypes) == 1 and dtype.is_floating_point
                      and peaks[1] * 1.01 < torch.finfo(dtype).max)  # 1.01: the rounding of the fold
    if len(dtypes) > 1:
        # Mixed-precision checkpoints are rare; normalise to fp32 rather than guess a precision.
        pairs = {k: (a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous())
                 for k, (a, b) in pairs.items()}
    for key, (a, b) in sorted(pairs.items()):
        layer, module = key
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{origin}: layer {layer} {module}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                f"are not [r, in] and [out, r]")
        seen = shapes.setdefault(module, (a.shape[1], b.shape[0], key))
        if seen[:2] != (a.shape[1], b.shape[0]):
            raise AdapterFormatError(
                f"{origin}: {module} has (in, out)={seen[:2]} in layer {seen[2][0]} but "
                f"{(a.shape[1], b.shape[0])} in layer {layer}")
        if not b_known_finite and not finite_and_peak(b)[0]:
            raise AdapterFormatError(
                f"{origin}: layer {layer} {module}: lora_B overflows {b.dtype} after scaling "
                f"(non-finite values)")
    mags = _check_magnitudes(pairs, magnitudes, origin) if magnitudes is not None else {}
    return LoraAdapter(
        format=fmt,
        rank=max(a.shape[0] for a, _ in pairs.values()),
        alpha=float(alpha),
        use_rslora=use_rslora,
        target_modules=sorted(shapes),
        num_layers=1 + max(layer for layer, _ in pairs),
        weights=dict(sorted(pairs.items())),
        digest=digest,
        magnitudes=mags,
        peaks=peaks if b_known_finite else None,
    )


def _check_magnitudes(pairs: dict[WeightKey, tuple[torch.Tensor, torch.Tensor]],
                      magnitudes: dict[WeightKey, torch.Tensor], origin: str) -> dict[WeightKey, torch.Tensor]:
    """DoRA magnitude vectors: exactly one per LoRA pair, shape [out] of its B, finite; -> float32."""
    missing = sorted(set(pairs) - set(magnitudes))
    extra = sorted(set(magnitudes) - set(pairs))
    if missing or extra:
        what = (f"no lora_magnitude_vector for {missing[:4]}" if missing
                else f"a lora_magnitude_vector without lora_A/lora_B for {extra[:4]}")
        raise AdapterFormatError(f"{origin}: DoRA adapter (use_dora=true) has {what} ((layer, module))")
    out: dict[WeightKey, torch.Tensor] = {}
    for key, m in sorted(magnitudes.items()):
        n_out = pairs[key][1].shape[0]
        if m.dim() != 1 or m.shape[0] != n_out:
            raise AdapterFormatError(
                f"{origin}: layer {key[0]} {key[1]}: DoRA lora_magnitude_vector has shape {list(m.shape)}, "
                f"expected [{n_out}] (one magnitude per output feature)")
        if not m.is_floating_point():
            raise AdapterFormatError(f"{origin}: layer {key[0]} {key[1]}: DoRA lora_magnitude_vector has "
                                     f"dtype {m.dtype}, expected a float dtype")
        m = m.to(torch.float32).contiguous()
        if not bool(torch.isfinite(m).all()):
            raise AdapterFormatError(
                f"{origin}: layer {key[0]} {key[1]}: DoRA lora_magnitude_vector has non-finite values")
        out[key] = m
    return out
