"""What every rank does with one step, and how a LoRA adapter is split over the ranks.

Step message (driver -> workers): the pipe carries ("step", N, B, W, S, has_lora, query_lens [B],
context_lens [B]) (host lists the attention path needs), and one broadcast carries the packed
int64 device tensor:
    input_ids [N] | positions [N] | slots [N] | context_lens [B] | block_tables [B*W] | token_slot [B] |
    sample_idx [S]
the layout of step_inputs.StepInputBuilder, with the in-flight placeholders already filled in.

LoRA under TP (S-LoRA, Sheng et al. 2023, section 5; vLLM's Column/RowParallelLinearWithLoRA):
  * column-parallel q/k/v, gate/up: A [r, in] replicated, B [out, r] split by rows like the weight
    (whole heads of q, k and v; the same MLP columns as gate/up);
  * row-parallel o, down: A [r, in] split by columns like the weight's input, B replicated. Each rank
    expands its partial shrink x_i A_i^T with the full B into its partial output; the all-reduce that
    follows o/down sums sum_i (x_i A_i^T) B^T = (x A^T) B^T, the shrink's all-reduce folded into the
    layer's (no extra collective, and lora_apply runs unchanged on every rank).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..context import Context, prepare_attention, reset_context, set_context

# module -> (dim of A or B to split, which local size): ("b", ...) splits B rows, ("a", ...) A columns
_LORA_SPLIT = {"q_proj": ("b", "q"), "k_proj": ("b", "kv"), "v_proj": ("b", "kv"), "gate_proj": ("b", "mlp"),
               "up_proj": ("b", "mlp"), "o_proj": ("a", "q"), "down_proj": ("a", "mlp")}


def shard_lora(weights: dict, local, rank: int) -> dict:
    """{(layer, module): (A [r, in], B [out, r])} of the full model -> this rank's views."""
    sizes = {"q": local.q_size, "kv": local.kv_size, "mlp": local.intermediate_size}
    out = {}
    for (layer, module), (a, b) in weights.items():
        which, kind = _LORA_SPLIT[module]
        n = sizes[kind]
        if which == "b":
            out[layer, module] = (a, b[rank * n:(rank + 1) * n])
        else:
            out[layer, module] = (a[:, rank * n:(rank + 1) * n], b)
    return out


def pack_adapter(weights: dict, module_names: list[str], dtype: torch.dtype, device: torch.device
                 ) -> tuple[list[tuple], torch.Tensor]:
    """Full adapter -> (index [(layer, module id, r, in, out)], flat [sum of A and B sizes] on device)."""
    index, parts = [], []
    for (layer, module), (a, b) in sorted(weights.items()):
        index.append((layer, module_names.index(module), a.shape[0], a.shape[1], b.shape[0]))
        parts += [a.reshape(-1), b.reshape(-1)]
    flat = torch.cat(parts).to(device=device, dtype=dtype) if parts else torch.empty(0, dtype=dtype, device=device)
    return index, flat


def unpack_adapter(index: list[tuple], flat: torch.Tensor, module_names: list[str]) -> dict:
    weights, o = {}, 0
    for layer, m, r, n_in, n_out in index:
        a = flat[o:o + r * n_in].view(r, n_in)
        o += r * n_in
        b = flat[o:o + n_out * r].view(n_out, r)
        o += n_out * r
        weights[layer, module_names[m]] = (a, b)
    return weights


def load_slot(slots, slot: int, weights: dict, rank_of_adapter: int, local, tp_rank: int) -> None:
    """This rank's shard of an adapter into its DeviceSlots (which were sized by the shard's args)."""
    slots.load(slot, SimpleNamespace(weights=shard_lora(weights, local, tp_rank), rank=rank_of_adapter,
                                     dora_scales={}))   # DoRA is refused under TP (runner.py)


def pack_step(inp, query_lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.cat([inp.input_ids, inp.positions, inp.slot_mapping, inp.context_lens, inp.block_tables.reshape(-1),
                      inp.token_slot, inp.sample_idx]).to(device)


def unpack_step(flat: torch.Tensor, N: int, B: int, W: int, S: int) -> SimpleNamespace:
    sizes = [N, N, N, B, B * W, B, S]
    ids, pos, slots, ctx_lens, tables, token_slot, sample_idx = flat.split(sizes)
    return SimpleNamespace(input_ids=ids, positions=pos, slot_mapping=slots, context_lens=ctx_lens,
                           block_tables=tables.view(B, W), token_slot=token_slot, sample_idx=sample_idx)


def forward(model, inp, query_lens: list[int], context_lens: list[int], lora, device: torch.device) -> torch.Tensor:
    """One step of this rank's shard: hidden [N, hidden] (the same on every rank after the last all-reduce)."""
    ctx = Context(slot_mapping=inp.slot_mapping, query_lens=list(query_lens), context_lens=inp.context_lens,
                  context_lens_list=context_lens, block_tables=inp.block_tables,
                  decode_only=all(n == 1 for n in query_lens))
    prepare_attention(ctx, device)
    ctx.lora = lora
    set_context(ctx)
    try:
        return model(inp.input_ids, inp.positions)
    finally:
        reset_context()
