"""Triton shrink/expand vs the torch reference, run on the CPU by Triton's interpreter.

Triton honours TRITON_INTERPRET only if it is set before Triton is imported, and the rest of
this pytest session must keep the ordinary import (the CPU engine's tests take the reference
path). So the checks (interp_cases.py) run in one spawned worker process started with
TRITON_INTERPRET=1; failures come back as the worker's AssertionError. bf16 is left to the GPU
tests: the interpreter mishandles it.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest

from loraserve.kernels import triton_available

from . import interp_cases
from .lora_cases import COMPOSITIONS
from .interpreter import interpreter_pool

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")

WIDTHS = {1: [40], 2: [48, 40], 3: [40, 24, 24]}  # unequal, and not multiples of the column block


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(interp_cases.worker_ready)


def _run(pool: ProcessPoolExecutor, fn, *args, **kwargs) -> None:
    pool.submit(fn, *args, **kwargs).result(timeout=300)


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("hidden,max_rank", [(64, 16), (80, 32)])  # 80: a ragged K tail
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_triton_matches_reference(interp, dtype, hidden, max_rank, num_slices, composition) -> None:
    # Two slices also run split-K (partials + a fixed-order sum); the others the direct store.
    shrink_cfg = {"SPLIT_K": 2, "BLOCK_K": 16} if num_slices == 2 else {"SPLIT_K": 1, "BLOCK_K": 32}
    _run(interp, interp_cases.check_matches_reference, dtype, hidden, max_rank, WIDTHS[num_slices],
         num_tokens=24, num_slots=5, composition=composition, shrink_cfg=shrink_cfg)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_prefill_tiles_and_wide_rank_blocks(interp, dtype) -> None:
    """Long segments (several 32-row tiles per slot) with the prefill launch configuration."""
    _run(interp, interp_cases.check_matches_reference, dtype, 64, 32, [64, 16, 16], num_tokens=150,
         num_slots=3, composition="mixed-ranks", block_m=32, expand_cfg={"BLOCK_N": 32})


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_decode_defaults_with_split_k(interp, num_tokens) -> None:
    """The default decode configuration (a many-way split-K for a handful of tokens)."""
    _run(interp, interp_cases.check_matches_reference, "float16", 512, 16, [32, 16, 16],
         num_tokens=num_tokens, num_slots=4, composition="no-adapter-rows" if num_tokens > 3 else "uniform")


def test_lora_apply_picks_triton_when_interpreting(interp) -> None:
    _run(interp, interp_cases.check_lora_apply_uses_triton)


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("num_slices", [1, 3])
@pytest.mark.parametrize("num_tokens", [1, 6, 20])  # 20: two tiles for one slot
def test_fused_shrink_expand_matches_reference(interp, num_tokens, num_slices, composition) -> None:
    # 80: a ragged K tail under BLOCK_K=32; BLOCK_N=16 makes column blocks straddle slices.
    _run(interp, interp_cases.check_fused_matches_reference, "float32", 80, 32, WIDTHS[num_slices],
         num_tokens=num_tokens, num_slots=4, composition=composition,
         config={"BLOCK_K": 32, "BLOCK_N": 16})


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fused_shrink_expand_default_config(interp, dtype) -> None:
    _run(interp, interp_cases.check_fused_matches_reference, dtype, 512, 16, [48, 16, 16],
         num_tokens=2, num_slots=3, composition="mixed-ranks")


@pytest.mark.parametrize("composition", ["no-adapter-rows", "mixed-ranks", "distinct"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_split_k_partials_summed_by_expand(interp, split_k, composition) -> None:
    _run(interp, interp_cases.check_partials_path_matches_reference, "float32", 96, 16, [40, 24],
         num_tokens=24, num_slots=4, composition=composition, split_k=split_k)


def test_lora_apply_fused_and_two_launch_paths(interp) -> None:
    _run(interp, interp_cases.check_lora_apply_paths)
