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
    # the batched paged-attention kernel (CUDA): [B + 1] int32 first row of each sequence in the
    # step's flat token order (cu_seqlens_q), and host upper bounds of the query and context lengths
    # (they pick the tile shape and the split count); context_lens above are the kernel's seq_lens
    query_start_loc: torch.Tensor | None = None
    max_query_len: int | None = None
    max_seq_len: int | None = None
    # split-KV ways for the step (attention plans it on the first layer from the host lengths)
    num_splits: int | None = None
    # batch LoRA state (loraserve.inference.lora.layers.LoRABatch) or None when no row has an adapter
    lora: Any = None
    # the caller reads only each sequence's last row of the output (the model runner's eager steps: it samples
    # last rows only): the model may then run the last layer's MLP on those rows alone (models/llama.py)
    last_rows_only: bool = False
    # every sequence of the step is a whole fresh prompt of this many tokens (no cached prefix, no decode row):
    # attention may run as one dense causal call over [B, L] (attention.py, LORASERVE_PREFILL_CUDNN); 0: not such
    # a step; None: not decided yet (the first layer decides, from the host lengths)
    dense_prefill: int | None = None


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


def uses_attention_kernel(device: torch.device) -> bool:
    """CUDA with Triton: attention is the one-launch paged kernel; otherwise the torch path."""
    if device.type != "cuda":
        return False
    from loraserve.kernels import triton_available

    return triton_available()


def prepare_attention(ctx: Context, device: torch.device) -> None:
    """Fill the step's attention metadata once (every layer reads it): for the kernel,
    query_start_loc from query_lens in one host cumsum and one copy; for the torch path, the
    decode/prefill split of a mixed step."""
    qlens = torch.as_tensor(ctx.query_lens, dtype=torch.int32)
    ctx.max_query_len = int(qlens.max())
    if ctx.context_lens_list is not None:
        ctx.max_seq_len = max(ctx.context_lens_list)
    if uses_attention_kernel(device):
        starts = torch.zeros(len(qlens) + 1, dtype=torch.int32, pin_memory=True)
        torch.cumsum(qlens, 0, out=starts[1:])
        ctx.query_start_loc = starts.to(device, non_blocking=True)
    elif not ctx.decode_only:
        split_mixed(ctx, device)


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = Context()
