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


def load_slot(slots, slot: int, weights: dict, rank_of_adapter: int, local, tp_rank: int, model=None,
              magnitudes: dict | None = None, load=None) -> None:
    """This rank's shard of an adapter into its DeviceSlots (which were sized by the shard's args).
    Every rank calls it for every adapter in the same order (the DoRA factors take an all-reduce).
    A DoRA adapter whose factor is not finite on some rank is loaded nowhere; rank 0 raises
    AdapterFormatError (the workers, which must not die of a bad adapter, skip it silently)."""
    shard = shard_lora(weights, local, tp_rank)
    scales, shifts = ({}, {}) if not magnitudes else dora_factors(model, shard, magnitudes, local, tp_rank)
    if scales is None:
        if tp_rank == 0:
            from loraserve.adapters import AdapterFormatError

            raise AdapterFormatError("DoRA factor m / ||W + s*B@A|| is not finite (a zero-norm output row)")
        return
    stream = getattr(slots, "copy_stream", None)
    if scales and stream is not None:   # the side-stream slot copies read what this stream computed
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        for t in (*scales.values(), *shifts.values()):
            t.record_stream(stream)
    (load or slots.load)(slot, SimpleNamespace(weights=shard, rank=rank_of_adapter, dora_scales=scales,
                                               dora_shifts=shifts))


@torch.no_grad()
def dora_factors(model, shard: dict, magnitudes: dict, local, tp_rank: int) -> tuple[dict | None, dict]:
    """This rank's DoRA factors g = m / ||W + s*B@A||_row (float32, on the weights' device):
      * column-parallel q/k/v, gate/up: the rank holds whole rows of W for its output features, and B's
        rows for them: its g is local (m's rows of this rank);
      * row-parallel o, down: the rank holds W[:, its inputs] and A[:, its inputs]: the squared row norms
        are partial sums over the input dimension, all-reduced (one collective for every such module),
        and g covers every output feature (the expand epilogue scales each rank's partial output by g
        before the layer's all-reduce sums them: g * sum_i y_i = sum_i g * y_i).
    Returns (None, {}) on every rank when any rank's factor is not finite (the flag rides the all-reduce)."""
    import torch.distributed as dist

    from ..lora.dora import base_projection, base_weight, row_norms

    sizes = {"q": local.q_size, "kv": local.kv_size, "mlp": local.intermediate_size}
    scales, shifts, partial_keys, partials = {}, {}, [], []
    ok = True
    for key in sorted(magnitudes):
        layer, module = key
        lin, lo, hi = base_projection(model, layer, module)
        weight, wscale = base_weight(lin, module)
        a, b = shard[key]
        ws = None if wscale is None else wscale[lo:hi]
        which, kind = _LORA_SPLIT[module]
        m = torch.as_tensor(magnitudes[key]).to(weight.device, torch.float32)
        if which == "b":   # column-parallel: this rank's output rows
            n = sizes[kind]
            g = m[tp_rank * n:(tp_rank + 1) * n] / row_norms(weight[lo:hi], a, b, ws)
            ok &= bool(torch.isfinite(g).all())
            scales[key] = g
            if getattr(lin, "bias", None) is not None:
                shifts[key] = (1 - g) * lin.bias[lo:hi].detach().to(torch.float32)
        else:
            if getattr(lin, "bias", None) is not None:
                raise NotImplementedError(f"DoRA on a row-parallel {module} with a bias under tensor parallelism")
            partial_keys.append(key)
            partials.append(row_norms(weight[lo:hi], a, b, ws, squared=True))
    device = next(model.parameters()).device
    flat = torch.cat([*(p.to(device) for p in partials), torch.tensor([0.0 if ok else 1.0], device=device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    if flat[-1].item() > 0:
        return None, {}
    sums = flat[:-1].split([p.numel() for p in partials]) if partials else []
    for key, sq in zip(partial_keys, sums):
        g = torch.as_tensor(magnitudes[key]).to(device, torch.float32) / sq.sqrt()
        if not bool(torch.isfinite(g).all()):   # the same on every rank (the all-reduced sums agree)
            return None, {}
        scales[key] = g
    return scales, shifts


def pack_step(inp, query_lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.cat([inp.input_ids, inp.positions, inp.slot_mapping, inp.context_lens, inp.block_tables.reshape(-1),
                      inp.token_slot, inp.sample_idx]).to(device)


def unpack_step(flat: torch.Tensor, N: int, B: int, W: int, S: int) -> SimpleNamespace:
    sizes = [N, N, N, B, B * W, B, S]
    ids, pos, slots, ctx_lens, tables, token_slot, sample_idx = flat.split(sizes)
    # ids | positions | slots are adjacent in flat: the [3, N] view lets a graph replay copy them at once
    return SimpleNamespace(input_ids=ids, positions=pos, slot_mapping=slots, context_lens=ctx_lens,
                           block_tables=tables.view(B, W), token_slot=token_slot, sample_idx=sample_idx,
                           ids_positions_slots=flat[:3 * N].view(3, N))


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
