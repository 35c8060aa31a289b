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
        self._defer_delta: dict[tuple[str, int, int], torch.Tensor] = {}  # around_delta's d by (proj, T, N)

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
        return self.around(layer_idx, proj, x, lambda: F.linear(x, weight, bias))

    def around(self, layer_idx: int, proj: str, x: torch.Tensor, gemm, mode: str | None = None) -> torch.Tensor:
        """gemm() (the base projection of x [T, in] -> y [T, N], any kernel: the FP8 GEMMs of models/fp8.py) plus this
        step's LoRA delta, as ``linear``: mode None = OVERLAP / OVERLAP_LARGE by T ("shrink": the shrink on a side
        stream while gemm() runs, the expand after it; "full"; "" = gemm(), then ``apply``)."""
        w = self._weights(layer_idx, proj)
        if w is None:
            return gemm()
        a, b, scale, shift, scale_on = w
        if mode is None:
            mode = (OVERLAP if x.shape[0] <= OVERLAP_MAX_TOKENS else OVERLAP_LARGE) if x.is_cuda else ""
        elif not x.is_cuda:
            mode = ""
        path = choose_path(x, a, b, self.meta)[0] if mode == "shrink" else ""
        if mode == "shrink" and path not in ("partials", "reduced", "dense", "seg"):  # two kernels to run apart
            mode = ""
        if not mode:
            y = gemm()
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
            y = gemm()
            main.wait_stream(side)
            from loraserve.kernels.lora_add import lora_add

            return lora_add(y, d, self.meta, self.slots.ranks, scale, shift)
        side.wait_stream(main)              # x (and the step's metadata) are ready; buf's last reader is done
        with torch.cuda.stream(side):
            lora_shrink_part(x, a, self.meta, self.slots.ranks, buf, path=path)
        y = gemm()
        main.wait_stream(side)
        return lora_expand_part(buf, y, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks,
                                scale=scale, shift=shift, path=path, scale_on=scale_on)

    def delta_ok(self, proj: str, n: int) -> bool:
        """Whether around_delta may serve `proj` (n output columns): its slots carry no DoRA shift ((1 - g) * bias: a
        biased projection; the deferred-epilogue consumers apply g only) and their B spans all n columns (a merged
        projection whose adapters target only some of its modules may have fewer: the consumers index d as y)."""
        if getattr(self.slots, "shift", None) and self.slots.shift.get(proj) is not None:
            return False
        b = self.slots.b.get(proj)
        return b is None or b.shape[-2] == n

    def around_delta(self, layer_idx: int, proj: str, x: torch.Tensor, gemm, side: bool | str = True):
        """(gemm(), d, dora): the base projection as gemm() returns it (models/fp8_fused.py: an FP8 GEMM whose epilogue
        is left to the kernel that consumes its output) and this step's LoRA delta of x apart, in d [T, N] (x's dtype;
        rows without an adapter 0) with no DoRA epilogue; dora = (token_slot [T] int32, g [L, N] fp32, per-slot flags
        [L] int32 or None) for the consumer (value = (y + d) * g[slot] on adapted rows, the expand's DoRA epilogue on a
        bias-free projection), None where the pool has no g. (y, None, None) where `proj` has no adapter weights.
        On CUDA d is zeroed on the side stream; side=True: the shrink runs there too, beside gemm() (as "shrink"
        overlap), else after gemm() on the current stream; side="full": the expand too (d is no GEMM output: the whole
        delta beside gemm(), the current stream waits for it after gemm()). Only where delta_ok(proj)."""
        w = self._weights(layer_idx, proj)
        if w is None:
            return gemm(), None, None
        a, b, scale, shift, scale_on = w
        assert shift is None, f"around_delta on {proj}: its slots carry DoRA shifts (delta_ok)"
        T, N = x.shape[0], b.shape[1]
        key = (proj, T, N)
        d = self._defer_delta.get(key)
        if d is None:
            d = self._defer_delta[key] = torch.zeros(T, N, dtype=x.dtype, device=x.device)
        dora = None if scale is None else (self.meta.token_slot, scale, scale_on)
        buf = self._workspace(x, a, b)
        if not x.is_cuda:
            y = gemm()
            d.zero_()
            lora_apply(x, d, a, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks, buf)
            return y, d, dora
        path = choose_path(x, a, b, self.meta)[0]
        split = path in ("partials", "reduced", "dense", "seg")
        main, stream = torch.cuda.current_stream(x.device), _side_stream(x.device)
        stream.wait_stream(main)            # x ready; d's and buf's last readers (earlier in this stream) are done
        with torch.cuda.stream(stream):
            d.zero_()                       # the kernels add into the rows of adapted tokens only
            if side == "full":
                lora_apply(x, d, a, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks, buf)
            elif split and side:
                lora_shrink_part(x, a, self.meta, self.slots.ranks, buf, path=path)
        y = gemm()
        main.wait_stream(stream)
        if side == "full":
            pass
        elif split:
            if not side:
                lora_shrink_part(x, a, self.meta, self.slots.ranks, buf, path=path)
            lora_expand_part(buf, d, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks, path=path)
        else:
            lora_apply(x, d, a, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks, buf)
        return y, d, dora
