"""Checks of the BGMV-style expand (kernels/lora_expand_bgmv.py), run in a worker started with
TRITON_INTERPRET=1 (test_lora_expand_bgmv_interp.py) or on a GPU (test_lora_gpu.py). Each raises
AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels import LoRAMetaBuilder, lora_expand, lora_expand_ref, lora_shrink_ref

from .lora_cases import TOLERANCES, make_problem
from .stream_interp_cases import DTYPES, _untouched


def check_expand_bgmv(dtype: str, max_rank: int, widths: list[int], num_tokens: int, num_slots: int,
                      composition: str, split_k: int = 1, block_n: int | None = None, cols: int | None = None, via_switch: bool = False,
                      device: str = "cpu") -> None:
    """lora_expand_bgmv from (split-K) partials vs the torch reference: rows without an adapter and
    rank-0 slots untouched, no NaN from undefined partials, every adapted row changed. via_switch: through
    lora_expand with lora_expand.EXPAND_BGMV on (the engine's dispatch), else the launcher directly."""
    from loraserve.kernels.lora_expand_bgmv import lora_expand_bgmv

    expand_mod = __import__("loraserve.kernels.lora_expand", fromlist=["EXPAND_BGMV"])  # the module, not the function
    p = make_problem(num_tokens=num_tokens, hidden=32, max_rank=max_rank, widths=widths, num_slots=num_slots,
                     composition=composition, dtype=DTYPES[dtype], seed=7 * num_tokens + split_k, device=device)
    S, T, R = len(widths), num_tokens, max_rank
    meta = LoRAMetaBuilder(max(T, 1), num_slots, device).build(p.token_slot)
    buf = torch.zeros(S, T, R, device=device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(split_k, S, T, R, generator=gen).to(device)
    partials = buf * (w / w.sum(0))  # a random split of each entry into split_k partials
    defined = torch.arange(R, device=device)[None, :] < torch.where(
        p.token_slot >= 0, p.ranks[p.token_slot.clamp(min=0).long()], 0)[:, None]
    partials[:, :, ~defined] = float("nan")  # never read: rows without adapter, columns past the rank
    buf_ref = partials.sum(0)
    buf_ref[:, ~defined] = 0
    y_ref = p.y0.clone()
    lora_expand_ref(buf_ref, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref)
    y = p.y0.clone()
    if via_switch:
        old = expand_mod.EXPAND_BGMV, expand_mod.EXPAND_BGMV_MAX_SLICES
        expand_mod.EXPAND_BGMV, expand_mod.EXPAND_BGMV_MAX_SLICES = True, 3
        try:
            lora_expand(partials, p.lora_b, p.slice_offsets, meta, p.ranks, y, stream=True)
        finally:
            expand_mod.EXPAND_BGMV, expand_mod.EXPAND_BGMV_MAX_SLICES = old
    else:
        lora_expand_bgmv(partials, p.lora_b, p.slice_offsets, meta, p.ranks, y,
                         config=dict(BLOCK_N=block_n, COLS_PER_PROG=cols or block_n) if block_n else None)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCES[p.x.dtype])
    untouched = _untouched(p)
    assert torch.equal(y[untouched], p.y0[untouched]), "BGMV expand touched a row without adapter"
    assert not y.isnan().any(), "NaN leaked from undefined partials or B columns past the rank"
    if (~untouched).any():
        assert not torch.equal(y[~untouched], p.y0[~untouched]), "BGMV expand added nothing"


def check_scale_on(dtype: str, max_rank: int, widths: list[int], num_tokens: int, num_slots: int, split_k: int = 2,
                   config: dict | None = None, bgmv: bool = False, with_shift: bool = True,
                   device: str = "cpu") -> None:
    """lora_expand's scale_on ([L] int32: 0 = a plain LoRA slot, its DoRA epilogue skipped): with DoRA factors on
    the flagged slots only (g = 1, shift 0 elsewhere, as slots.py keeps them), the result equals the reference with
    the full epilogue; and with every flag 0 it is bit-equal to no epilogue at all. bgmv: through the BGMV expand."""
    from loraserve.kernels.reference import lora_expand_ref as ref

    expand_mod = __import__("loraserve.kernels.lora_expand", fromlist=["EXPAND_BGMV"])  # the module, not the function
    p = make_problem(num_tokens=num_tokens, hidden=32, max_rank=max_rank, widths=widths, num_slots=num_slots,
                     composition="distinct", dtype=DTYPES[dtype], seed=5 + num_tokens, device=device)
    S, T, R, N = len(widths), num_tokens, max_rank, sum(widths)
    meta = LoRAMetaBuilder(T, num_slots, device).build(p.token_slot)
    buf = torch.zeros(S, T, R, device=device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    partials = (buf / split_k).expand(split_k, S, T, R).contiguous()
    gen = torch.Generator().manual_seed(9)
    dora = torch.arange(num_slots) % 2 == 1          # odd slots hold DoRA vectors
    scale = torch.ones(num_slots, N)
    scale[dora] = 0.5 + torch.rand(int(dora.sum()), N, generator=gen)
    shift = torch.zeros(num_slots, N)
    if with_shift:
        shift[dora] = torch.randn(int(dora.sum()), N, generator=gen)
    scale, shift = scale.to(device), shift.to(device) if with_shift else None
    scale_on = dora.to(torch.int32).to(device)
    old = expand_mod.EXPAND_BGMV, expand_mod.EXPAND_BGMV_MAX_SLICES
    expand_mod.EXPAND_BGMV, expand_mod.EXPAND_BGMV_MAX_SLICES = bgmv, 3
    try:
        y = p.y0.clone()
        lora_expand(partials, p.lora_b, p.slice_offsets, meta, p.ranks, y, scale=scale, shift=shift,
                    scale_on=scale_on, stream=True, config=config)
        y_ref = p.y0.clone()
        ref(partials.sum(0), p.lora_b, p.slice_offsets, meta, p.ranks, y_ref, scale=scale, shift=shift)
        torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCES[p.x.dtype])
        # every flag 0 and plain factors: bit-equal to the same kernel without an epilogue
        y_off, y_none = p.y0.clone(), p.y0.clone()
        ones = torch.ones_like(scale)
        lora_expand(partials, p.lora_b, p.slice_offsets, meta, p.ranks, y_off, scale=ones,
                    shift=None if shift is None else torch.zeros_like(shift), scale_on=torch.zeros_like(scale_on),
                    stream=True, config=config)
        lora_expand(partials, p.lora_b, p.slice_offsets, meta, p.ranks, y_none, stream=True, config=config)
        assert torch.equal(y_off, y_none), "flags off should skip the epilogue exactly"
    finally:
        expand_mod.EXPAND_BGMV, expand_mod.EXPAND_BGMV_MAX_SLICES = old


def check_launch_orders(device: str = "cpu") -> None:
    """lora_meta.LORA_GROUP_MAJOR / LORA_SHRINK_K_MAJOR (the grids' axes swapped): lora_apply end to end vs the
    reference (BGMV shrink, BGMV and streaming expands), and the BGMV expand with several column runs."""
    from loraserve.kernels import lora_meta

    from .stream_interp_cases import check_stream_apply

    old = lora_meta.LORA_GROUP_MAJOR, lora_meta.LORA_SHRINK_K_MAJOR
    lora_meta.LORA_GROUP_MAJOR = lora_meta.LORA_SHRINK_K_MAJOR = True
    try:
        check_stream_apply("float32", 256, 16, [48, 16, 16], 20, 4, "no-adapter-rows", device=device)
        check_stream_apply("float16", 256, 16, [72], 6, 3, "mixed-ranks", device=device)
        check_expand_bgmv("float32", 16, [40, 24, 24], 12, 4, "mixed-ranks", split_k=2, block_n=16, cols=48,
                          device=device)
    finally:
        lora_meta.LORA_GROUP_MAJOR, lora_meta.LORA_SHRINK_K_MAJOR = old
