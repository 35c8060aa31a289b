"""The LoRA state of one engine step: which slot each token uses, applied inside every Proj."""
from __future__ import annotations

import torch

from loraserve.kernels import LoRAMeta, lora_apply


class LoRABatch:
    def __init__(self, slots, meta: LoRAMeta):
        self.slots, self.meta = slots, meta
        self._buf: dict[tuple[int, int], torch.Tensor] = {}

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y [T, N] += LoRA delta of x [T, in] for projection `proj` of layer `layer_idx`."""
        a = self.slots.a.get(proj)
        if a is None:
            return
        a = a[layer_idx]                    # [L, S, R, in]
        b = self.slots.b[proj][layer_idx]   # [L, N, R]
        key = (a.shape[1], x.shape[0])
        buf = self._buf.get(key)
        if buf is None:
            buf = self._buf[key] = torch.empty(a.shape[1], x.shape[0], a.shape[2], dtype=torch.float32, device=x.device)
        lora_apply(x, y, a, b, self.slots.slice_offsets[proj], self.meta, self.slots.ranks, buf)
