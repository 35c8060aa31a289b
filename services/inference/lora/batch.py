"""The LoRA state of one engine step: which slot each token uses, applied inside every Proj."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from loraserve.kernels import LoRAMeta, lora_apply
from loraserve.kernels.lora_apply import choose_path, lora_expand_part, lora_shrink_part, workspace_shape

# LoRA on a side stream while the base GEMM runs (decode-size steps, CUDA), LORASERVE_LORA_OVERLAP:
#  "shrink" (or 1): the shrink needs only x, so its latency-bound launches hide behind the
#      bandwidth-bound GEMM; the expand (which adds into y, DoRA epilogue included) follows the GEMM.
#  "full": shrink and expand into a delta buffer d [T, N] (y's dtype) on the side stream; after
#      the GEMM, one kernel adds d into y with DoRA's epilogue (kernels/lora_add.py; d is rounded to
#      y's dtype first, so results are within bf16 tolerance of the sequential path, not equal).
#  "0" / off: GEMM, then the LoRA kernels.
# Default "shrink": it won in every H200 run. One 8B layer at 64 tokens / 32 adapters (benchmarks/lora_layer_overlap.py,
# 4 runs): LoRA adds 59.4-61 us sequential, 49.7-54.5 with "shrink", 64-68 with "full"; engine, batch 64, 32 adapters,
# 4 layers, each variant in its own process: 0.743 -> 0.770 (20:55 final), 0.778 -> 0.784 (22:26 probe, with the loads
# before the wait). 32 layers: the lead's bench_engine final (kernels/PERF_NOTES.md).
# Read at each call, so CUDA graphs keep what they captured.
_OVERLAP_MODES = {"1": "shrink", "true": "shrink", "on": "shrink", "yes": "shrink", "shrink": "shrink", "full": "full"}
OVERLAP = _OVERLAP_MODES.get(os.environ.get("LORASERVE_LORA_OVERLAP", "shrink").strip().lower(), "")
OVERLAP_MAX_TOKENS = 256
# ... and above OVERLAP_MAX_TOKENS (mixed steps: bench_churn's steady 63 decode rows + a 256-token chunk, graph T
# 352; prefill): LORASERVE_LORA_OVERLAP_LARGE, same values, its own switch (resident helper, issue 12).
OVERLAP_LARGE = _OVERLAP_MODES.get(os.environ.get("LORASERVE_LORA_OVERLAP_LARGE", "0").strip().lower(), "")

# Per-slot DoRA flags (slots.dora_slot) passed to the expand as scale_on: plain LoRA slots skip the epilogue's g / shift
# loads (every slot pool carries DoRA's scale, 1 for plain LoRA, so the engine's expands always ran the epilogue: a g
# load per column block, waited on in the same loop iteration). LORASERVE_LORA_DORA_FLAGS=0: the epilogue everywhere.
# Read at each call.
DORA_FLAGS = os.environ.get("LORASERVE_LORA_DORA_FLAGS", "1").strip().lower() not in ("", "0", "false", "off", "no")

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class LoRABatch:
    def __init__(self, slots, meta: LoRAMeta):
        self.slots, self.meta = slots, meta
        self._buf: dict[tuple[int, ...], torch.Tensor] = {}  # float32 workspaces by shape
        self._delta: dict[tuple[int, int], torch.Tensor] = {}  # "full" overlap: d [T, N] by shape

    def _weights(self, layer_idx: int, proj: str):
        a = self.slots.a.get(proj)
        if a is None:
            return None
        # DoRA: every adapted token's row ends as g[slot] * (x W^T + delta); g = 1 for plain LoRA
        # (+ (1 - g) * bias, so that a biased projection's bias stays unscaled, as in PEFT)
        scale = self.slots.scale[proj][layer_idx] if getattr(self.slots, "scale", None) else None  # [L, N] fp32
        shift = self.slots.shift.get(proj) if getattr(self.slots, "shift", None) else None
        # [L] int32, 0 for plain LoRA slots: the expand skips their g / shift loads (a per-program flag, so a
        # CUDA graph stays right when a DoRA adapter lands in a slot later)
        scale_on = getattr(self.slots, "dora_slot", {}).get(proj) if scale is not None and DORA_FLAGS else None
        return (a[layer_idx],                   # [L, S, R, in]
                self.slots.b[proj][layer_idx],  # [L, N, R]
                scale, None if shift is None else shift[layer_idx],
                None if scale_on is None else scale_on[layer_idx])

    def _workspace(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        key = workspace_shape(x, a, b, self.meta)
        buf = self._buf.get(key)
        if buf is None:
            buf = self._buf[key] = torch.empty(key, dtype=torch.float32, device=x.device)
        return buf

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y [T, N] += LoRA delta of x [T, in] for projection `proj` of layer `layer_idx`; rows of
        tokens on a DoRA slot then become g * (y + delta) + (1 - g) * bias (y is x W^T + bias on entry)."""
        w = self._weights(layer_idx, proj)
        if w is None:
            return
        a, b, scale, shift, scale_on = w
        lora_apply(x, y, a, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks, self._workspace(x, a, b),
                   scale=scale, shift=shift, scale_on=scale_on)

    def linear(self, layer_idx: int, proj: str, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, weight, bias) [T, N] plus this step's LoRA delta (as ``apply``). With OVERLAP on
        a GPU at <= OVERLAP_MAX_TOKENS tokens, the shrink ("shrink": needs a two-kernel path) or the
        whole delta ("full") runs on a side stream concurrently with the GEMM; otherwise GEMM, then
        apply."""
        w = self._weights(layer_idx, proj)
        if w is None:
            return F.linear(x, weight, bias)
        a, b, scale, shift, scale_on = w
        mode = (OVERLAP if x.shape[0] <= OVERLAP_MAX_TOKENS else OVERLAP_LARGE) if x.is_cuda else ""
        path = choose_path(x, a, b, self.meta)[0] if mode == "shrink" else ""
        if mode == "shrink" and path not in ("partials", "reduced", "dense", "seg"):  # two kernels to run apart
            mode = ""
        if not mode:
            y = F.linear(x, weight, bias)
            self.apply(layer_idx, proj, x, y)
            return y
        buf = self._workspace(x, a, b)      # allocated on the main stream (freed in its order)
        main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
        if mode == "full":
            T, N = x.shape[0], b.shape[1]
            d = self._delta.get((T, N))
            if d is None:
                d = self._delta[(T, N)] = torch.empty(T, N, dtype=x.dtype, device=x.device)
            side.wait_stream(main)          # x ready; d's last reader (the previous add) is done
            with torch.cuda.stream(side):
                d.zero_()                   # the kernels add into the rows of adapted tokens only
                lora_apply(x, d, a, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks, buf)
            y = F.linear(x, weight, bias)
            main.wait_stream(side)
            from loraserve.kernels.lora_add import lora_add

            return lora_add(y, d, self.meta, self.slots.ranks, scale, shift)
        side.wait_stream(main)              # x (and the step's metadata) are ready; buf's last reader is done
        with torch.cuda.stream(side):
            lora_shrink_part(x, a, self.meta, self.slots.ranks, buf, path=path)
        y = F.linear(x, weight, bias)
        main.wait_stream(side)
        return lora_expand_part(buf, y, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks,
                                scale=scale, shift=shift, path=path, scale_on=scale_on)
