"""The LoRA state of one engine step: which slot each token uses, applied inside every Proj."""
from __future__ import annotations

import torch

from loraserve.kernels import LoRAMeta, lora_apply
from loraserve.kernels.lora_apply import workspace_shape


class LoRABatch:
    def __init__(self, slots, meta: LoRAMeta):
        self.slots, self.meta = slots, meta
        self._buf: dict[tuple[int, ...], torch.Tensor] = {}  # float32 workspaces by shape

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y [T, N] += LoRA delta of x [T, in] for projection `proj` of layer `layer_idx`; rows of
        tokens on a DoRA slot then become g * (y + delta) + (1 - g) * bias (y is x W^T + bias on entry)."""
        a = self.slots.a.get(proj)
        if a is None:
            return
        a = a[layer_idx]                    # [L, S, R, in]
        b = self.slots.b[proj][layer_idx]   # [L, N, R]
        key = workspace_shape(x, a, b, self.meta)
        buf = self._buf.get(key)
        if buf is None:
            buf = self._buf[key] = torch.empty(key, dtype=torch.float32, device=x.device)
        # DoRA: every adapted token's row ends as g[slot] * (x W^T + delta); g = 1 for plain LoRA
        # (+ (1 - g) * bias, so that a biased projection's bias stays unscaled, as in PEFT)
        scale = self.slots.scale[proj][layer_idx] if getattr(self.slots, "scale", None) else None  # [L, N] fp32
        shift = self.slots.shift.get(proj) if getattr(self.slots, "shift", None) else None
        lora_apply(x, y, a, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks, buf, scale=scale,
                   shift=None if shift is None else shift[layer_idx])
