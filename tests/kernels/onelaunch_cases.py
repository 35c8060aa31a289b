"""One-launch (ticketed) LoRA kernel vs the torch reference; run inside a TRITON_INTERPRET=1
worker (test_lora_onelaunch.py) or on a GPU (test_lora_gpu.py)."""
from __future__ import annotations

import torch

from loraserve.kernels import LoRAMetaBuilder

from .interp_cases import DTYPES, _check_y, _reference_y
from .lora_cases import TOLERANCES, make_problem


def check_onelaunch_matches_reference(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int,
                                      num_slots: int, composition: str, config: dict | None = None,
                                      device: str = "cpu", repeats: int = 2) -> None:
    """lora_onelaunch against shrink_ref + expand_ref; run `repeats` times from the same input:
    identical bits each time (the counters were reset by the previous launch)."""
    from loraserve.kernels.lora_onelaunch import _SYNC, lora_onelaunch

    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths,
                     num_slots=num_slots, composition=composition, dtype=DTYPES.get(dtype) or getattr(torch, dtype),
                     seed=11 * hidden + num_tokens, device=device)
    meta = LoRAMetaBuilder(max(num_tokens, 1), num_slots, device).build(p.token_slot)
    ys = []
    for _ in range(repeats):
        y = p.y0.clone()
        lora_onelaunch(p.x, p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, y, config=config)
        ys.append(y)
    for y in ys[1:]:
        assert torch.equal(ys[0], y), "one-launch kernel not reproducible (counters not reset?)"
    sync = _SYNC[torch.device(device) if device == "cpu" else p.x.device]
    assert int(sync.abs().sum()) == 0, f"counters left non-zero: {sync[:8].tolist()}"
    _check_y(p, ys[0], _reference_y(p, meta, len(widths), max_rank), TOLERANCES[p.x.dtype])


def check_lora_apply_onelaunch() -> None:
    """LORASERVE_LORA_ONELAUNCH on: lora_apply takes the one-launch path up to 256 tokens (DoRA's
    scale and shift in its epilogue) and two launches above; both equal the reference."""
    import importlib

    from loraserve.kernels import lora_apply
    from loraserve.kernels.lora_apply import choose_path
    from loraserve.kernels.reference import dora_scale_rows

    importlib.import_module("loraserve.kernels.lora_apply").ONELAUNCH_ENABLED = True  # throwaway worker
    try:
        from loraserve.kernels.lora_apply import partials_max_tokens

        for T, want in ((3, "onelaunch"), (300, "partials" if 300 <= partials_max_tokens() else "reduced")):
            p = make_problem(num_tokens=T, hidden=96, max_rank=16, widths=[32, 16], num_slots=3,
                             composition="no-adapter-rows", dtype=torch.float32, seed=T)
            meta = LoRAMetaBuilder(T, 3, "cpu").build(p.token_slot)
            path, shape, _ = choose_path(p.x, p.lora_a, p.lora_b, meta)
            assert path == want, f"T={T}: path {path}, expected {want}"
            gen = torch.Generator().manual_seed(T)
            scale, shift = 1 + 0.1 * torch.randn(3, 48, generator=gen), 0.1 * torch.randn(3, 48, generator=gen)
            y = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks,
                           buf=torch.empty(shape), scale=scale, shift=shift)
            y_ref = dora_scale_rows(_reference_y(p, meta, 2, 16), scale, meta, p.ranks, shift)
            _check_y(p, y, y_ref, TOLERANCES[torch.float32])
    finally:
        importlib.import_module("loraserve.kernels.lora_apply").ONELAUNCH_ENABLED = False


def check_lora_add(dtype: str, with_scale: bool, device: str = "cpu") -> None:
    """lora_add (the join of the overlapped delta) against a per-row float64 loop: adapted rows become
    (y + d) * g + c, rows without an adapter or with rank 0 stay untouched."""
    from loraserve.kernels.lora_add import lora_add

    dt = DTYPES.get(dtype) or getattr(torch, dtype)
    gen = torch.Generator().manual_seed(17)
    T, N, L = 12, 200, 4                                     # N not a multiple of the column block
    token_slot = torch.tensor([-1, 0, 1, 2, 3, 0, -1, 3, 2, 1, 0, 3], dtype=torch.int32)
    ranks = torch.tensor([8, 0, 16, 4], dtype=torch.int32)  # slot 1 has no weights for this module
    y0 = torch.randn(T, N, generator=gen).to(dt)
    d = torch.randn(T, N, generator=gen).to(dt)
    scale = (0.5 + torch.rand(L, N, generator=gen)) if with_scale else None
    shift = torch.randn(L, N, generator=gen) if with_scale else None
    to = dict(device=device)
    y = y0.to(**to).clone()
    meta_dev = LoRAMetaBuilder(T, L, device).build(token_slot.to(**to))
    lora_add(y, d.to(**to), meta_dev, ranks.to(**to), None if scale is None else scale.to(**to),
             None if shift is None else shift.to(**to), block_n=64)
    expect = y0.clone()
    for t, s in enumerate(token_slot.tolist()):
        if s < 0 or int(ranks[s]) == 0:
            continue
        row = y0[t].double() + d[t].double()
        if scale is not None:
            row = row * scale[s].double() + shift[s].double()
        expect[t] = row.to(dt)
    tol = dict(rtol=1e-6, atol=1e-5) if dt == torch.float32 else TOLERANCES[dt]
    torch.testing.assert_close(y.cpu().float(), expect.float(), **tol)
    untouched = torch.tensor([s < 0 or int(ranks[s]) == 0 for s in token_slot.tolist()])
    assert torch.equal(y.cpu()[untouched], y0[untouched]), "touched a row without an adapter"
