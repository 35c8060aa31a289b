"""Per-step batch metadata shared by every layer, so that layers keep `forward(positions, x)`.

The model runner fills one `Context` before the forward pass and resets it after; the
attention op reads the KV layout from it and the LoRA layers read the batch's adapters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Context:
    # [N] flat KV-cache slot (block * block_size + offset) of each token of the step
    slot_mapping: torch.Tensor | None = None
    # [B] number of query tokens of each sequence in the step (1 for decode)
    query_lens: list[int] | None = None
    # [B] tokens in the KV cache for each sequence after this step (context + new)
    context_lens: torch.Tensor | None = None
    context_lens_list: list[int] | None = None
    # [B, max_blocks] int64 block table of each sequence
    block_tables: torch.Tensor | None = None
    decode_only: bool = False
    # batch LoRA state (loraserve.inference.lora.layers.LoRABatch) or None when no row has an adapter
    lora: Any = None


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = Context()
