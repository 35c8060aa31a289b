"""Checks of the dense shrink (kernels/lora_shrink_dense.py, LORASERVE_LORA_DENSE) and of lora_apply's
"dense" path (dense shrink + the streaming expand reading each token's own slot), run in a worker with
TRITON_INTERPRET=1 (test_lora_dense_interp.py) or on a GPU (test_lora_gpu.py). Raise AssertionError."""
from __future__ import annotations

import torch

from loraserve.kernels import LoRAMetaBuilder, lora_apply

from .lora_cases import TOLERANCES, make_problem, naive_lora_delta
from .stream_interp_cases import DTYPES, _untouched


def check_dense_shrink(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int, num_slots: int,
                       backend: str, device: str = "cpu") -> None:
    """out summed over its K splits equals x @ A[l, s, r] for every token against its own slot's rows
    (float64 reference; tokens without an adapter, and unused slots, in the mix), with A a strided slice
    of a bigger pool (the flat view, no copy); the mm backend writes every entry."""
    from loraserve.kernels.lora_shrink_dense import dense_split_k, dense_view, lora_shrink_dense

    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths,
                     num_slots=num_slots + 1, composition="distinct", dtype=DTYPES[dtype], seed=hidden + num_tokens,
                     device=device)
    lora_a = p.lora_a[1:]   # slots 1..L of the pool: a view with an offset
    assert dense_view(lora_a) is not None and dense_view(lora_a).data_ptr() == lora_a.data_ptr()
    L, S, R, H = lora_a.shape
    sk = dense_split_k(p.x, lora_a, backend)
    out = torch.full((sk, num_tokens, L * S * R), float("nan"), device=device)
    gen = torch.Generator().manual_seed(num_tokens)
    token_slot = torch.randint(-1, L - 1, (num_tokens,), generator=gen).to(torch.int32).to(device)  # slot L-1 unused
    lora_shrink_dense(p.x, lora_a, out, token_slot, backend=backend)
    ref = torch.einsum("th,lsrh->tlsr", p.x.double(), lora_a.double()).reshape(num_tokens, L * S * R)
    got = out.double().sum(0)
    own = (torch.arange(L * S * R, device=device)[None, :] // (S * R)) == token_slot.long()[:, None]  # [T, L*S*R]
    assert own.any() and not got[own].isnan().any(), "an entry a token reads was not written"
    torch.testing.assert_close(got[own], ref[own], **TOLERANCES[p.x.dtype])
    if backend == "mm":
        torch.testing.assert_close(got, ref, **TOLERANCES[p.x.dtype])


def check_dense_apply(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int, num_slots: int,
                      composition: str, backend: str, device: str = "cpu") -> None:
    """lora_apply on its "dense" path vs the float64 per-token loop; rows without an adapter (or on a
    rank-0 slot) untouched; a NaN-filled workspace leaks nothing (every read entry is written)."""
    import importlib

    apply_mod = importlib.import_module("loraserve.kernels.lora_apply")
    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths, num_slots=num_slots,
                     composition=composition, dtype=DTYPES[dtype], seed=3 * num_tokens + hidden, device=device)
    meta = LoRAMetaBuilder(num_tokens, num_slots, device).build(p.token_slot)
    old = apply_mod.DENSE_MODE
    try:
        apply_mod.DENSE_MODE = backend
        path, shape, _ = apply_mod.choose_path(p.x, p.lora_a, p.lora_b, meta)
        assert path == "dense", f"expected the dense path, got {path}"
        ws = torch.full(shape, float("nan"), device=device)
        y = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, ws)
        y2 = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, ws)
        # the same two halves run apart (LORASERVE_LORA_OVERLAP=shrink: the shrink on a side stream)
        assert apply_mod.lora_apply_split(p.x, p.lora_a, p.lora_b, meta)
        ws.fill_(float("nan"))
        apply_mod.lora_shrink_part(p.x, p.lora_a, meta, p.ranks, ws, path="dense")
        y3 = apply_mod.lora_expand_part(ws, p.y0.clone(), p.lora_b, p.slice_offsets, meta, p.ranks, path="dense")
    finally:
        apply_mod.DENSE_MODE = old
    torch.testing.assert_close(y.double(), naive_lora_delta(p).to(y.dtype).double(), **TOLERANCES[p.x.dtype])
    assert torch.equal(y, y2), "two runs from the same input differ"
    assert torch.equal(y, y3), "shrink and expand run apart differ from lora_apply"
    untouched = _untouched(p)
    assert torch.equal(y[untouched], p.y0[untouched]), "a row without an adapter was touched"
    assert not y.isnan().any()


def check_dense_expand_apply(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int,
                             num_slots: int, composition: str, shrink: str, with_scale: bool = False,
                             wide: bool = False, device: str = "cpu") -> None:
    """lora_apply with the dense expand (LORASERVE_LORA_DENSE_EXPAND) after the tiled shrink ("" ) or the
    dense shrink ("triton"), slice widths that do not divide its 128-column blocks (a block straddles two
    slices), DoRA's scale/shift optional, unused slots' B filled with NaN (must never be read): vs the float64
    per-token loop; rows without an adapter untouched; two runs bit-equal. wide: the config of wide
    projections (128 columns x 4 slots a step) whatever N (else the code's choice: 64 x 8 below 25k columns)."""
    import importlib

    from loraserve.kernels import lora_expand_dense

    apply_mod = importlib.import_module("loraserve.kernels.lora_apply")
    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths, num_slots=num_slots,
                     composition=composition, dtype=DTYPES[dtype], seed=5 * num_tokens + hidden, device=device)
    used = set(p.token_slot.tolist())
    for slot in range(num_slots):
        if slot not in used:  # an unused slot holding garbage: its B must never be read
            p.lora_b[slot] = float("nan")
    scale = shift = None
    if with_scale:
        gen = torch.Generator().manual_seed(11)
        scale = (0.5 + torch.rand(num_slots, sum(widths), generator=gen)).to(device)
        shift = torch.randn(num_slots, sum(widths), generator=gen).to(device)
    meta = LoRAMetaBuilder(num_tokens, num_slots, device).build(p.token_slot)
    old = apply_mod.DENSE_MODE, apply_mod.DENSE_EXPAND, apply_mod.DENSE_EXPAND_MIN_N
    old_cfg = lora_expand_dense.dense_expand_config
    try:
        apply_mod.DENSE_MODE, apply_mod.DENSE_EXPAND, apply_mod.DENSE_EXPAND_MIN_N = shrink, True, 1
        if wide:
            lora_expand_dense.dense_expand_config = lambda n, sms=132: old_cfg(10 ** 9, sms)
        path, shape, _ = apply_mod.choose_path(p.x, p.lora_a, p.lora_b, meta)
        assert path == ("dense" if shrink else "partials"), path
        assert apply_mod.dense_expand_taken(p.y0, p.lora_b, meta, len(widths))
        ws = torch.full(shape, float("nan"), device=device)
        ys = [lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, ws, scale=scale,
                         shift=shift) for _ in range(2)]
    finally:
        apply_mod.DENSE_MODE, apply_mod.DENSE_EXPAND, apply_mod.DENSE_EXPAND_MIN_N = old
        lora_expand_dense.dense_expand_config = old_cfg
    want = naive_lora_delta(p)
    if with_scale:
        slot = p.token_slot.clamp(min=0).long()
        want = want * scale[slot].double() + shift[slot].double()
    adapted = ~_untouched(p)
    torch.testing.assert_close(ys[0][adapted].double(), want.to(ys[0].dtype)[adapted].double(),
                               **TOLERANCES[p.x.dtype])
    assert torch.equal(ys[0], ys[1]), "two runs from the same input differ"
    untouched = _untouched(p)
    assert torch.equal(ys[0][untouched], p.y0[untouched]), "a row without an adapter was touched"
    assert not ys[0].isnan().any(), "NaN (an unused slot's B or an unwritten partial) leaked into y"
