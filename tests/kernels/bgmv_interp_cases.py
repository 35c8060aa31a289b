"""Checks of the BGMV shrink (kernels/lora_shrink_bgmv.py, LORASERVE_LORA_BGMV), run in a worker with
TRITON_INTERPRET=1 (test_lora_bgmv_interp.py) or on a GPU (test_lora_gpu.py). Raise AssertionError."""
from __future__ import annotations

import torch

from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_expand_ref, lora_meta, lora_shrink_ref

from .lora_cases import TOLERANCES, make_problem, without_dense_paths
from .stream_interp_cases import DTYPES, _untouched


def check_bgmv_shrink(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int, num_slots: int,
                      composition: str, block_k: int | None = None, block_m: int = 16, device: str = "cpu",
                      kchunks: int | None = None, rows: int | None = None) -> None:
    """The BGMV shrink's per-chunk partials, summed, equal the reference shrink on every defined
    entry, and leave every other entry as it was (NaN stays NaN)."""
    from loraserve.kernels.lora_shrink_bgmv import bgmv_shrink_config, lora_shrink_bgmv

    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths, num_slots=num_slots,
                     composition=composition, dtype=DTYPES[dtype], seed=hidden + num_tokens, device=device)
    S, T, R = len(widths), num_tokens, max_rank
    meta = LoRAMetaBuilder(T, num_slots, device, block_m=block_m).build(p.token_slot)
    cfg = bgmv_shrink_config(T, R, hidden, S, meta.grid_tiles)
    if block_k:
        cfg["BLOCK_K"] = block_k
    if kchunks:   # A's block as separate loads (lora_shrink_bgmv.BGMV_KCHUNKS)
        cfg["KCHUNKS"] = kchunks
    if rows:   # rows a tile takes on the multiply-sum path (lora_shrink_bgmv.BGMV_ROWS)
        cfg["ROWS"] = rows
    sk = -(-hidden // cfg["BLOCK_K"])
    partials = torch.full((sk, S, T, R), float("nan"), device=device)
    lora_shrink_bgmv(p.x, p.lora_a, meta, p.ranks, partials, config=cfg)
    ref = torch.zeros((S, T, R), device=device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, ref)
    r = torch.where(p.token_slot >= 0, p.ranks[p.token_slot.clamp(min=0).long()], 0)
    defined = (torch.arange(R, device=device)[None, :] < r[:, None]).expand(S, -1, -1)
    got = partials.sum(0)
    assert not got[defined].isnan().any(), "a defined entry was not written"
    torch.testing.assert_close(got[defined], ref[defined], **TOLERANCES[p.x.dtype])
    assert partials[:, ~defined].isnan().all(), "an undefined entry (no adapter / past the rank) was written"


def check_bgmv_apply(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int, num_slots: int,
                     composition: str, device: str = "cpu") -> None:
    """lora_apply with LORA_BGMV on (BGMV shrink partials summed by the streaming expand) vs the
    reference; rows without an adapter untouched."""
    from loraserve.kernels.lora_apply import choose_path, workspace_shape

    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths, num_slots=num_slots,
                     composition=composition, dtype=DTYPES[dtype], seed=7 * num_tokens, device=device)
    S, T, R = len(widths), num_tokens, max_rank
    meta = LoRAMetaBuilder(T, num_slots, device).build(p.token_slot)
    buf = torch.zeros(S, T, R, device=device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    y_ref = p.y0.clone()
    lora_expand_ref(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref)
    old = lora_meta.LORA_BGMV, lora_meta.LORA_STREAM, lora_meta.LORA_BGMV_MAX_TOKENS, lora_meta.LORA_BGMV_WIDE_MAX_RANK
    dense_off = without_dense_paths()  # this checks the BGMV shrink's partials path
    dense_off.__enter__()
    try:
        (lora_meta.LORA_BGMV, lora_meta.LORA_STREAM, lora_meta.LORA_BGMV_MAX_TOKENS,
         lora_meta.LORA_BGMV_WIDE_MAX_RANK) = True, True, 256, 64
        shape = workspace_shape(p.x, p.lora_a, p.lora_b, meta)
        assert choose_path(p.x, p.lora_a, p.lora_b, meta)[0] == "partials"
        from loraserve.kernels.lora_shrink import _num_sms
        from loraserve.kernels.lora_shrink_bgmv import bgmv_shrink_config

        cfg = bgmv_shrink_config(T, R, hidden, S, meta.grid_tiles, _num_sms(p.x.device.index if p.x.is_cuda else None))
        assert shape[0] == -(-hidden // cfg["BLOCK_K"]), f"workspace {shape} is not the BGMV split ({cfg})"
        ws = torch.full(shape, float("nan"), device=device)
        y = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, ws)
    finally:
        (lora_meta.LORA_BGMV, lora_meta.LORA_STREAM, lora_meta.LORA_BGMV_MAX_TOKENS,
         lora_meta.LORA_BGMV_WIDE_MAX_RANK) = old
        dense_off.__exit__(None, None, None)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCES[p.x.dtype])
    untouched = _untouched(p)
    assert torch.equal(y[untouched], p.y0[untouched]), "a row without an adapter was touched"
    assert not y.isnan().any(), "NaN from undefined partials leaked into y"
