"""Checks of the TMA-fed expand (kernels/lora_tma_expand.py) and the pure-read kernels (lora_tma_read.py), run in a
worker started with TRITON_INTERPRET=1 (test_lora_tma_interp.py) or on a GPU (test_lora_tma_gpu.py). Each raises
AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels import LoRAMetaBuilder, lora_expand, lora_expand_ref, lora_shrink_ref

from .lora_cases import TOLERANCES, make_problem
from .stream_interp_cases import DTYPES, _untouched


def check_tma_expand(dtype: str, max_rank: int, widths: list[int], num_tokens: int, num_slots: int,
                     composition: str, split_k: int = 1, config: dict | None = None, with_scale: bool = False,
                     via_switch: bool = False, device: str = "cpu") -> None:
    """lora_expand_tma from (split-K) partials, NaN where undefined, optionally with DoRA's scale + shift, vs the
    torch reference: rows without an adapter and rank-0 slots untouched, no NaN, every adapted row changed.
    via_switch: through lora_expand with lora_tma_expand.TMA_EXPAND on (the engine's dispatch), else the
    launcher directly."""
    from loraserve.kernels import lora_tma_expand
    from loraserve.kernels.lora_tma_expand import lora_expand_tma, tma_expand_applies

    p = make_problem(num_tokens=num_tokens, hidden=32, max_rank=max_rank, widths=widths, num_slots=num_slots,
                     composition=composition, dtype=DTYPES[dtype], seed=13 * num_tokens + split_k, device=device)
    S, T, R = len(widths), num_tokens, max_rank
    meta = LoRAMetaBuilder(max(T, 1), num_slots, device).build(p.token_slot)
    buf = torch.zeros(S, T, R, device=device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(split_k, S, T, R, generator=gen).to(device)
    partials = buf * (w / w.sum(0))   # a random split of each entry into split_k partials
    defined = torch.arange(R, device=device)[None, :] < torch.where(
        p.token_slot >= 0, p.ranks[p.token_slot.clamp(min=0).long()], 0)[:, None]
    partials[:, :, ~defined] = float("nan")   # never read: rows without adapter, columns past the rank
    buf_ref = partials.sum(0)
    buf_ref[:, ~defined] = 0
    scale = shift = scale_on = None
    if with_scale:
        g = torch.Generator().manual_seed(5)
        scale = (0.5 + torch.rand(num_slots, sum(widths), generator=g)).to(device)
        scale[1 % num_slots] = 1.0
        shift = ((1 - scale) * torch.randn(sum(widths), generator=g).to(device)).contiguous()
        scale_on = (scale != 1).any(1).to(torch.int32)
    y_ref = p.y0.clone()
    lora_expand_ref(buf_ref, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref, scale=scale, shift=shift)
    y = p.y0.clone()
    old = lora_tma_expand.TMA_EXPAND
    lora_tma_expand.TMA_EXPAND = True
    try:
        assert tma_expand_applies(p.lora_b, y, S, T), "the TMA expand should take this case"
        if via_switch:
            from loraserve.kernels import lora_meta

            old_bgmv = __import__("loraserve.kernels.lora_expand", fromlist=["X"]).EXPAND_BGMV
            __import__("loraserve.kernels.lora_expand", fromlist=["X"]).EXPAND_BGMV = False
            try:
                assert lora_meta.stream_enabled(True)
                lora_expand(partials, p.lora_b, p.slice_offsets, meta, p.ranks, y, scale=scale, shift=shift,
                            stream=True, scale_on=scale_on)
            finally:
                __import__("loraserve.kernels.lora_expand", fromlist=["X"]).EXPAND_BGMV = old_bgmv
        else:
            lora_expand_tma(partials, p.lora_b, p.slice_offsets, meta, p.ranks, y, config=config, scale=scale,
                            shift=shift, scale_on=scale_on)
    finally:
        lora_tma_expand.TMA_EXPAND = old
    torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCES[p.x.dtype])
    untouched = _untouched(p)
    assert torch.equal(y[untouched], p.y0[untouched]), "the TMA expand touched a row without adapter"
    assert not y.isnan().any(), "NaN leaked from undefined partials"
    if (~untouched).any():
        assert not torch.equal(y[~untouched], p.y0[~untouched]), "the TMA expand added nothing"


def check_reads(device: str = "cpu") -> None:
    """read_plain / read_tma sums of a buffer's runs vs the fp32 torch sums (several run splits, ragged last run)."""
    from loraserve.kernels.lora_tma_read import read_plain, read_ref, read_tma

    g = torch.Generator().manual_seed(1)
    src = torch.randn(3 * 5 * 2048, generator=g).to(device=device, dtype=torch.bfloat16)
    for programs, block, unroll, stages in ((4, 256, 2, 1), (7, 512, 1, 3), (1, 1024, 3, 1)):
        out = read_plain(src, programs, block=block, unroll=unroll, stages=stages)
        torch.testing.assert_close(out.cpu(), read_ref(src, programs, block * unroll).cpu(), rtol=1e-4, atol=1e-3)
    for programs, rows, cols, stages in ((4, 32, 64, 3), (6, 64, 16, 2), (5, 16, 32, 4)):
        out = read_tma(src, programs, rows=rows, cols=cols, stages=stages)
        torch.testing.assert_close(out.cpu(), read_ref(src, programs, rows * cols).cpu(), rtol=1e-4, atol=1e-3)


def check_tma_shrink(dtype: str, max_rank: int, widths: list[int], hidden: int, num_tokens: int, num_slots: int,
                     composition: str, block_k: int, config: dict | None = None, via_switch: bool = False,
                     device: str = "cpu") -> None:
    """lora_shrink_tma's split-K partials vs the torch reference's shrink: their sum over the K chunks equals the
    reference where defined (tokens with an adapter, columns < rank), entries elsewhere left as they were (NaN
    sentinels). via_switch: through lora_shrink_bgmv with lora_tma_shrink.TMA_SHRINK on."""
    from loraserve.kernels import lora_tma_shrink
    from loraserve.kernels.lora_shrink_bgmv import lora_shrink_bgmv
    from loraserve.kernels.lora_tma_shrink import lora_shrink_tma, tma_shrink_applies

    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths, num_slots=num_slots,
                     composition=composition, dtype=DTYPES[dtype], seed=17 * num_tokens + hidden, device=device)
    S, T, R = len(widths), num_tokens, max_rank
    meta = LoRAMetaBuilder(max(T, 1), num_slots, device).build(p.token_slot)
    ref = torch.zeros(S, T, R, device=device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, ref)
    sk = -(-hidden // block_k)
    out = torch.full((sk, S, T, R), float("nan"), device=device)
    old = lora_tma_shrink.TMA_SHRINK
    lora_tma_shrink.TMA_SHRINK = True
    try:
        assert tma_shrink_applies(p.x, p.lora_a, block_k), "the TMA shrink should take this case"
        if via_switch:
            lora_shrink_bgmv(p.x, p.lora_a, meta, p.ranks, out, config=dict(BLOCK_K=block_k))
        else:
            lora_shrink_tma(p.x, p.lora_a, meta, p.ranks, out, block_k, config=config)
    finally:
        lora_tma_shrink.TMA_SHRINK = old
    defined = torch.arange(R, device=device)[None, :] < torch.where(
        p.token_slot >= 0, p.ranks[p.token_slot.clamp(min=0).long()], 0)[:, None]   # [T, R]
    got = out.sum(0)
    torch.testing.assert_close(got[:, defined], ref[:, defined], rtol=1e-3, atol=1e-3)
    assert out[:, :, ~defined].isnan().all(), "the TMA shrink wrote entries of rows without adapter / past the rank"
