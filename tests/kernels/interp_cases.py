"""Kernel-vs-reference checks executed inside a process started with TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when it is first imported, so these run in a spawned worker
(see test_lora_triton_interp.py) rather than in the pytest process, whose other modules must
keep the ordinary, non-interpreted import. Each function raises AssertionError on mismatch.
"""
from __future__ import annotations

import os

import torch

from loraserve.kernels import (LoRAMetaBuilder, lora_apply, lora_expand, lora_expand_ref, lora_shrink,
                               lora_shrink_ref)
from loraserve.kernels.lora_apply import use_triton
from loraserve.kernels.lora_shrink import shrink_config

from .lora_cases import TOLERANCES, LoRAProblem, make_problem, shrink_defined_mask, without_dense_paths

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def worker_ready() -> bool:
    """Warm-up call: the worker imported Triton in interpreter mode."""
    import triton  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction

    from loraserve.kernels.lora_shrink import _lora_shrink_kernel

    return os.environ.get("TRITON_INTERPRET") == "1" and isinstance(_lora_shrink_kernel, InterpretedFunction)


def _run_both(p: LoRAProblem, meta, num_slices: int, max_rank: int, shrink_cfg=None, expand_cfg=None):
    T = p.x.shape[0]
    poison = torch.full((num_slices, T, max_rank), float("nan"))
    buf_tri, buf_ref = poison.clone(), poison.clone()
    lora_shrink(p.x, p.lora_a, meta, p.ranks, buf_tri, config=shrink_cfg)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf_ref)
    y_tri, y_ref = p.y0.clone(), p.y0.clone()
    # Expand alone from the same input, so its error is not mixed with shrink's.
    lora_expand(buf_ref, p.lora_b, p.slice_offsets, meta, p.ranks, y_tri, config=expand_cfg)
    lora_expand_ref(buf_ref, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref)
    return buf_tri, buf_ref, y_tri, y_ref


def _check(p: LoRAProblem, buf_tri, buf_ref, y_tri, y_ref, num_slices: int, max_rank: int,
           split_k: bool) -> None:
    tol = TOLERANCES[p.x.dtype]
    defined = shrink_defined_mask(p, max_rank, num_slices)
    torch.testing.assert_close(buf_tri[defined], buf_ref[defined], **tol)
    if not split_k:  # without split-K the kernel must leave undefined entries alone
        assert buf_tri[~defined].isnan().all(), "shrink wrote past a rank or into a no-adapter row"
    torch.testing.assert_close(y_tri.float(), y_ref.float(), **tol)
    untouched = (p.token_slot < 0) | (p.ranks[p.token_slot.clamp(min=0).long()] == 0)
    assert torch.equal(y_tri[untouched], p.y0[untouched]), "expand touched a row without adapter"
    if (~untouched).any():
        assert not torch.equal(y_tri[~untouched], p.y0[~untouched]), "expand added nothing"


def check_matches_reference(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int,
                            num_slots: int, composition: str, block_m: int = 16,
                            shrink_cfg: dict | None = None, expand_cfg: dict | None = None) -> None:
    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths,
                     num_slots=num_slots, composition=composition, dtype=DTYPES[dtype],
                     seed=hidden + len(widths) + num_tokens)
    meta = LoRAMetaBuilder(max(num_tokens, 1), num_slots, "cpu", block_m=block_m).build(p.token_slot)
    out = _run_both(p, meta, len(widths), max_rank, shrink_cfg, expand_cfg)
    cfg = dict(shrink_config(num_tokens, max_rank, hidden, len(widths), meta.block_m), **(shrink_cfg or {}))
    split_k = cfg["SPLIT_K"] > 1
    _check(p, *out, len(widths), max_rank, split_k=split_k)


def check_lora_apply_uses_triton() -> None:
    p = make_problem(num_tokens=8, hidden=32, max_rank=16, widths=[32], num_slots=2,
                     composition="uniform", dtype=torch.float32, seed=5)
    assert use_triton(p.x), "lora_apply should pick Triton under TRITON_INTERPRET=1"
    meta = LoRAMetaBuilder(8, 2, "cpu").build(p.token_slot)
    y = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks)
    expected = p.y0.clone()
    buf = torch.empty(1, 8, 16)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    lora_expand_ref(buf, p.lora_b, p.slice_offsets, meta, p.ranks, expected)
    torch.testing.assert_close(y, expected, **TOLERANCES[torch.float32])


def _reference_y(p: LoRAProblem, meta, num_slices: int, max_rank: int) -> torch.Tensor:
    buf = torch.zeros(num_slices, p.x.shape[0], max_rank, device=p.x.device)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    y = p.y0.clone()
    lora_expand_ref(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y)
    return y


def _check_y(p: LoRAProblem, y: torch.Tensor, y_ref: torch.Tensor, tol: dict) -> None:
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    untouched = (p.token_slot < 0) | (p.ranks[p.token_slot.clamp(min=0).long()] == 0)
    assert torch.equal(y[untouched], p.y0[untouched]), "touched a row without adapter"
    if (~untouched).any():
        assert not torch.equal(y[~untouched], p.y0[~untouched]), "added nothing"


def check_fused_matches_reference(dtype: str, hidden: int, max_rank: int, widths: list[int], num_tokens: int,
                                  num_slots: int, composition: str, config: dict | None = None,
                                  device: str = "cpu") -> None:
    """lora_shrink_expand (one launch) against shrink_ref + expand_ref."""
    from loraserve.kernels.lora_fused import fused_plan, lora_shrink_expand

    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths,
                     num_slots=num_slots, composition=composition, dtype=DTYPES.get(dtype) or getattr(torch, dtype),
                     seed=7 * hidden + num_tokens, device=device)
    meta = LoRAMetaBuilder(max(num_tokens, 1), num_slots, device).build(p.token_slot)
    plan = fused_plan(num_tokens, num_slots, meta.block_m, max_rank, hidden, sum(widths), len(widths),
                      p.x.device, block_n=(config or {}).get("BLOCK_N"), block_k=(config or {}).get("BLOCK_K"))
    assert plan is not None, "the fused kernel should apply to this case"
    y = p.y0.clone()
    lora_shrink_expand(p.x, p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, y, plan=plan)
    if device == "cuda":  # the barrier version again: identical bits, counters reset
        y2 = p.y0.clone()
        lora_shrink_expand(p.x, p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, y2, plan=plan)
        assert torch.equal(y, y2), "fused kernel not reproducible"
    _check_y(p, y, _reference_y(p, meta, len(widths), max_rank), TOLERANCES[p.x.dtype])


def check_partials_path_matches_reference(dtype: str, hidden: int, max_rank: int, widths: list[int],
                                          num_tokens: int, num_slots: int, composition: str, split_k: int,
                                          device: str = "cpu") -> None:
    """Shrink into un-reduced split-K partials [SK, S, T, R], expand summing them."""
    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=max_rank, widths=widths,
                     num_slots=num_slots, composition=composition, dtype=DTYPES.get(dtype) or getattr(torch, dtype),
                     seed=3 * hidden + num_tokens, device=device)
    meta = LoRAMetaBuilder(max(num_tokens, 1), num_slots, device).build(p.token_slot)
    partials = torch.full((split_k, len(widths), num_tokens, max_rank), float("nan"), device=device)
    lora_shrink(p.x, p.lora_a, meta, p.ranks, partials, config={"BLOCK_K": 16})
    y = p.y0.clone()
    lora_expand(partials, p.lora_b, p.slice_offsets, meta, p.ranks, y)
    _check_y(p, y, _reference_y(p, meta, len(widths), max_rank), TOLERANCES[p.x.dtype])


def check_lora_apply_paths() -> None:
    """lora_apply's own choice (fused at 3 tokens, two launches with partials at 100) == reference."""
    import importlib

    lora_apply_module = importlib.import_module("loraserve.kernels.lora_apply")  # not the function
    from loraserve.kernels.lora_apply import choose_path

    lora_apply_module.FUSED_ENABLED = True  # opt-in in production; this worker is throwaway

    for T in (3, 100):
        p = make_problem(num_tokens=T, hidden=256, max_rank=16, widths=[32, 16], num_slots=3,
                         composition="no-adapter-rows", dtype=torch.float32, seed=T)
        meta = LoRAMetaBuilder(T, 3, "cpu").build(p.token_slot)
        with without_dense_paths():  # this checks the tiled paths' choice
            path, shape, _ = choose_path(p.x, p.lora_a, p.lora_b, meta)
        assert path == ("fused" if T == 3 else "partials"), f"T={T}: unexpected path {path}"
        with without_dense_paths():
            y = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks,
                           buf=torch.empty(shape))
        _check_y(p, y, _reference_y(p, meta, 2, 16), TOLERANCES[torch.float32])
