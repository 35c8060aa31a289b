"""Checks of the streaming expand (kernels/lora_expand_stream.py) and the streaming shrink
configs, run in a worker started with TRITON_INTERPRET=1 (see test_lora_stream_interp.py) or
on a GPU (test_lora_gpu.py). Each raises AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

from .lora_cases import TOLERANCES, LoRAProblem, make_problem, without_dense_paths

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _untouched(p: LoRAProblem) -> torch.Tensor:
    return (p.token_slot < 0) | (p.ranks[p.token_slot.clamp(min=0).long()] == 0)


def check_stream_expand(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int,
                        num_slots: int, composition: str, split_k: int = 1, config: dict | None = None,
                        block_m: int = 16, with_scale: bool = False, device: str = "cpu") -> None:
    """Streaming expand (optionally from split-K partials, with DoRA scale + shift) vs the
    reference, and bit-identical to the classic kernel's rows where one dot covers a column."""
    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths,
                     num_slots=num_slots, composition=composition, dtype=DTYPES[dtype],
                     seed=11 * hidden + num_tokens + split_k, device=device)
    S, T, R = len(widths), num_tokens, max_rank
    meta = LoRAMetaBuilder(max(T, 1), num_slots, device, block_m=block_m).build(p.token_slot)
    buf = torch.zeros(S, T, R, device=device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    if split_k > 1:  # random split of each entry into split_k partials; NaN where undefined
        gen = torch.Generator().manual_seed(3)
        w = torch.rand(split_k, S, T, R, generator=gen).to(device)
        partials = buf * (w / w.sum(0))
        defined = torch.arange(R, device=device)[None, :] < torch.where(
            p.token_slot >= 0, p.ranks[p.token_slot.clamp(min=0).long()], 0)[:, None]
        partials[:, :, ~defined] = float("nan")
        buf_ref = partials.sum(0)
        buf_ref[:, ~defined] = 0
    else:
        partials, buf_ref = buf, buf
    scale = shift = None
    if with_scale:
        gen = torch.Generator().manual_seed(5)
        scale = (0.5 + torch.rand(num_slots, sum(widths), generator=gen)).to(device)
        scale[1 % num_slots] = 1.0
        shift = ((1 - scale) * torch.randn(sum(widths), generator=gen).to(device)).contiguous()
    y_ref = p.y0.clone()
    lora_expand_ref(buf_ref, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref, scale=scale, shift=shift)
    y = p.y0.clone()
    lora_expand(partials, p.lora_b, p.slice_offsets, meta, p.ranks, y, config=config, scale=scale,
                shift=shift, stream=True)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCES[p.x.dtype])
    untouched = _untouched(p)
    assert torch.equal(y[untouched], p.y0[untouched]), "streaming expand touched a row without adapter"
    assert not y.isnan().any(), "NaN leaked from undefined partials or B columns past the rank"
    if (~untouched).any():
        assert not torch.equal(y[~untouched], p.y0[~untouched]), "streaming expand added nothing"


def check_stream_apply(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int,
                       num_slots: int, composition: str, device: str = "cpu") -> None:
    """lora_apply end to end with the streaming variant on (the shrink's grid-aware split-K
    into the workspace, the streaming expand summing it) vs the reference, and vs the
    classic variant."""
    from loraserve.kernels import lora_meta
    from loraserve.kernels.lora_apply import choose_path, workspace_shape

    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths,
                     num_slots=num_slots, composition=composition, dtype=DTYPES[dtype], seed=num_tokens,
                     device=device)
    S, T, R = len(widths), num_tokens, max_rank
    meta = LoRAMetaBuilder(T, num_slots, device).build(p.token_slot)
    buf = torch.zeros(S, T, R, device=device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    y_ref = p.y0.clone()
    lora_expand_ref(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref)
    old = lora_meta.LORA_STREAM
    dense_off = without_dense_paths()  # this checks the tiled paths (partials / reduced)
    dense_off.__enter__()
    try:
        outs = {}
        for stream in (True, False):
            lora_meta.LORA_STREAM = stream
            ws = torch.empty(workspace_shape(p.x, p.lora_a, p.lora_b, meta), device=device)
            path = choose_path(p.x, p.lora_a, p.lora_b, meta)[0]
            if stream and R <= 64 and T <= 256:
                assert path == "partials" and ws.dim() == 4, f"stream: expected split-K partials, got {path}"
            outs[stream] = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, ws)
    finally:
        lora_meta.LORA_STREAM = old
        dense_off.__exit__(None, None, None)
    for stream, y in outs.items():
        torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCES[p.x.dtype], msg=f"stream={stream}")
        assert torch.equal(y[_untouched(p)], p.y0[_untouched(p)])


def check_stream_shrink_split(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int,
                              num_slots: int, composition: str, device: str = "cpu") -> None:
    """The streaming shrink config's split-K partials, summed, equal the reference shrink."""
    from loraserve.kernels.lora_shrink import shrink_split_k

    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths,
                     num_slots=num_slots, composition=composition, dtype=DTYPES[dtype], seed=hidden,
                     device=device)
    S, T, R = len(widths), num_tokens, max_rank
    meta = LoRAMetaBuilder(T, num_slots, device).build(p.token_slot)
    sk = shrink_split_k(p.x, p.lora_a, meta.block_m, meta.grid_tiles, stream=True)
    assert sk > 1, "the case should exercise split-K"
    partials = torch.full((sk, S, T, R), float("nan"), device=device)
    lora_shrink(p.x, p.lora_a, meta, p.ranks, partials, stream=True)
    ref = torch.full((S, T, R), float("nan"), device=device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, ref)
    r = torch.where(p.token_slot >= 0, p.ranks[p.token_slot.clamp(min=0).long()], 0)
    defined = (torch.arange(R, device=device)[None, :] < r[:, None]).expand(S, -1, -1)
    torch.testing.assert_close(partials.sum(0)[defined], ref[defined], **TOLERANCES[p.x.dtype])


def check_stream_one_slice(widths: list[int], num_tokens: int, num_slots: int, block_n: int) -> None:
    """The pipelined column loop with lora_expand_stream.STREAM_ONE_SLICE (one dot per block inside one slice, the
    per-column select for blocks that straddle a slice bound) vs the reference, DoRA epilogue included."""
    from loraserve.kernels import lora_expand_stream

    old = lora_expand_stream.STREAM_ONE_SLICE
    lora_expand_stream.STREAM_ONE_SLICE = True
    try:
        check_stream_expand("float32", 32, 16, widths, num_tokens, num_slots, "mixed-ranks", split_k=3,
                            config=dict(BLOCK_N=block_n, COLS_PER_PROG=4 * block_n, SLOTS=-3), with_scale=True)
    finally:
        lora_expand_stream.STREAM_ONE_SLICE = old
