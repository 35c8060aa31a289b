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
    # mixed steps: rows/sequences with one query token (batched decode path), max context among them,
    # and (seq index, first row, query len, context len) of the others
    decode_rows: torch.Tensor | None = None
    decode_seqs: torch.Tensor | None = None
    decode_max_len: int | None = None
    prefill_seqs: list[tuple[int, int, int, int]] | None = None
    # batch LoRA state (loraserve.inference.lora.layers.LoRABatch) or None when no row has an adapter
    lora: Any = None


_CONTEXT = Context()


def split_mixed(ctx: Context, device: torch.device) -> None:
    """Fill a mixed step's decode/prefill split (once per step, read by every layer)."""
    rows, seqs, prefill, start = [], [], [], 0
    max_len = 0
    for i, (qlen, total) in enumerate(zip(ctx.query_lens, ctx.context_lens_list)):
        if qlen == 1 and total > 1:
            rows.append(start)
            seqs.append(i)
            max_len = max(max_len, total)
        else:
            prefill.append((i, start, qlen, total))
        start += qlen
    if rows:
        ctx.decode_rows = torch.tensor(rows, dtype=torch.long, device=device)
        ctx.decode_seqs = torch.tensor(seqs, dtype=torch.long, device=device)
        ctx.decode_max_len = max_len
    ctx.prefill_seqs = prefill


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = Context()
