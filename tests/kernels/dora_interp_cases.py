"""DoRA epilogue checks run inside a process started with TRITON_INTERPRET=1 (see
test_dora_triton_interp.py): the Triton expand with a per-slot scale g vs the torch reference,
and both vs an obviously right per-token float64 loop. Each raises AssertionError on mismatch."""
from __future__ import annotations

import torch

from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_expand, lora_expand_ref, lora_shrink_ref
from loraserve.kernels.lora_apply import choose_path
from loraserve.kernels.reference import dora_scale_rows

from .lora_cases import TOLERANCES, LoRAProblem, make_problem

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def dora_scale(p: LoRAProblem, plain_slots: tuple[int, ...] = (1,), seed: int = 0) -> torch.Tensor:
    """[L, N] float32: random g in [0.5, 1.5] per slot and column; 1 for the plain LoRA slots."""
    gen = torch.Generator().manual_seed(seed)
    L, N = p.lora_b.shape[0], p.lora_b.shape[1]
    g = 0.5 + torch.rand(L, N, generator=gen)
    for s in plain_slots:
        g[s] = 1.0
    return g


def dora_shift(g: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """[L, N] float32: (1 - g) * bias for a random bias (0 where g = 1, as the slots hold it)."""
    bias = torch.randn(g.shape[1], generator=torch.Generator().manual_seed(seed))
    return ((1 - g) * bias).contiguous()


def naive_dora(p: LoRAProblem, g: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """float64 per-token loop: y[t] = (y0[t] + x A^T B^T) * g[slot] (+ c[slot]) for adapted tokens (rank > 0)."""
    y = p.y0.double().clone()
    offs = p.slice_offsets.tolist()
    for t, slot in enumerate(p.token_slot.tolist()):
        r = int(p.ranks[slot]) if slot >= 0 else 0
        if r <= 0:
            continue
        for s in range(len(offs) - 1):
            h = p.x[t].double() @ p.lora_a[slot, s, :r].double().T
            y[t, offs[s]:offs[s + 1]] += h @ p.lora_b[slot, offs[s]:offs[s + 1], :r].double().T
        y[t] *= g[slot].double()
        if c is not None:
            y[t] += c[slot].double()
    return y


def check_dora_epilogue(dtype: str, widths: list[int], composition: str, num_tokens: int = 24,
                        with_shift: bool = False) -> None:
    dt = DTYPES[dtype]
    p = make_problem(num_tokens=num_tokens, hidden=48, max_rank=16, widths=widths, num_slots=4,
                     composition=composition, dtype=dt, seed=7 + len(widths))
    g = dora_scale(p)
    c = dora_shift(g) if with_shift else None
    meta = LoRAMetaBuilder(num_tokens, 4, "cpu", block_m=16).build(p.token_slot)
    buf = torch.zeros(len(widths), num_tokens, 16)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    y_tri, y_ref = p.y0.clone(), p.y0.clone()
    lora_expand(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y_tri, scale=g, shift=c)
    lora_expand_ref(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref, scale=g, shift=c)
    tol = TOLERANCES[dt]
    torch.testing.assert_close(y_tri, y_ref, **tol)
    torch.testing.assert_close(y_ref.double(), naive_dora(p, g, c), rtol=tol["rtol"] * 4, atol=tol["atol"] * 4)
    untouched = (p.token_slot < 0) | (p.ranks[p.token_slot.clamp(min=0).long()] == 0)
    assert torch.equal(y_tri[untouched], p.y0[untouched]), "rows without an adapter must be untouched"
    # g = 1 (plain LoRA slot 1) is bit-identical to the expand without a scale
    y_plain = p.y0.clone()
    lora_expand(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y_plain)
    on_plain = p.token_slot == 1
    assert torch.equal(y_tri[on_plain], y_plain[on_plain]), "g = 1 must leave plain LoRA rows bit-identical"
    assert not torch.allclose(y_tri, y_plain), "the scale changed nothing: the test would be vacuous"


def check_lora_apply_paths_scale(dtype: str) -> None:
    """lora_apply (the Triton path it picks) and the separate scale pass the fused path uses."""
    dt = DTYPES[dtype]
    p = make_problem(num_tokens=20, hidden=32, max_rank=16, widths=[24, 16], num_slots=3,
                     composition="no-adapter-rows", dtype=dt, seed=3)
    g = dora_scale(p, plain_slots=(0,))
    c = dora_shift(g)
    meta = LoRAMetaBuilder(20, 3, "cpu").build(p.token_slot)
    assert choose_path(p.x, p.lora_a, p.lora_b, meta)[0] != "reference"
    y = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, scale=g, shift=c)
    torch.testing.assert_close(y.double(), naive_dora(p, g, c), **{k: v * 4 for k, v in TOLERANCES[dt].items()})
    # the post-pass: unscaled apply, then dora_scale_rows == the epilogue (two roundings in fp16)
    y2 = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks)
    dora_scale_rows(y2, g, meta, p.ranks, c)
    torch.testing.assert_close(y2, y, **TOLERANCES[dt])
