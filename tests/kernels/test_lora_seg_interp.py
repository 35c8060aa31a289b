"""The segment-tiled LoRA pair (kernels/lora_seg.py, lora_apply's "seg" path for large steps) vs an fp64
per-token reference, on the CPU through Triton's interpreter: slices not multiples of the column block (a
block across a slice boundary), mixed ranks incl. 0, rows without an adapter, a pool rank that is no power of
two, row blocks of several meta tiles (LORASERVE_LORA_SEG_GROUP, several slots in one block), split-K partials
summed by the shrink's last K split (LORASERVE_LORA_SEG_REDUCE, the arrival counters left at zero) or by the expand,
DoRA's epilogue with per-slot flags, and repeats bit-equal."""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from loraserve.kernels import triton_available

from .interpreter import interpreter_pool, interpreting

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(interpreting)


def check_seg(num_tokens: int, widths: list[int], max_rank: int, composition: str, env: dict, dora: bool) -> None:
    """(runs in the interpreter worker) lora_apply on the "seg" path == the fp64 reference within fp16 tolerance;
    rows without an adapter untouched; the same output twice."""
    from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_seg
    from loraserve.kernels.lora_apply import choose_path

    from .lora_cases import TOLERANCES, make_problem, naive_lora_delta, without_dense_paths

    p = make_problem(num_tokens=num_tokens, hidden=192, max_rank=max_rank, widths=widths, num_slots=5,
                     composition=composition, dtype=torch.float16, seed=num_tokens + len(widths), device="cpu")
    meta = LoRAMetaBuilder(num_tokens, 5, "cpu").build(p.token_slot)
    expected = naive_lora_delta(p)
    scale = shift = scale_on = None
    L, N = p.lora_b.shape[:2]
    if dora:   # slot 1 plain LoRA (g = 1, flag 0), the others scaled and shifted
        gen = torch.Generator().manual_seed(7)
        scale = 1 + 0.25 * torch.randn(L, N, generator=gen)
        scale[1] = 1
        shift = 0.1 * torch.randn(L, N, generator=gen)
        shift[1] = 0
        scale_on = torch.ones(L, dtype=torch.int32)
        scale_on[1] = 0
        slot = p.token_slot.long()
        adapted = (slot >= 0) & (p.ranks[slot.clamp(min=0)] > 0)
        g, c = scale[slot.clamp(min=0)].double(), shift[slot.clamp(min=0)].double()
        expected = torch.where(adapted[:, None], expected * g + c, expected)
    untouched = (p.token_slot < 0) | (p.ranks[p.token_slot.clamp(min=0).long()] == 0)
    old_min = lora_seg.SEG_MIN_TOKENS
    lora_seg.SEG_MIN_TOKENS = 65
    os.environ.update(env)
    try:
        with without_dense_paths():
            lora_seg.SEG_ENABLED = True   # (restored by the context)
            path, shape, _ = choose_path(p.x, p.lora_a, p.lora_b, meta)
            assert path == "seg", path
            outs = [lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks,
                               torch.full(shape, float("nan")), scale=scale, shift=shift, scale_on=scale_on)
                    for _ in range(2)]
    finally:
        lora_seg.SEG_MIN_TOKENS = old_min
        for k in env:
            os.environ.pop(k)
    y = outs[0]
    assert int(lora_seg._COUNTERS[torch.device("cpu")].abs().sum()) == 0 if lora_seg._COUNTERS else True
    assert torch.equal(outs[0], outs[1]), "repeats differ"
    torch.testing.assert_close(y.double(), expected.to(y.dtype).double(), **TOLERANCES[torch.float16])
    assert torch.equal(y[untouched], p.y0[untouched]), "a row without an adapter changed"
    assert not torch.equal(y[~untouched], p.y0[~untouched]), "nothing added"


CASES = [  # (tokens, widths, max rank, composition, env, dora)
    (96, [48, 40], 16, "no-adapter-rows", {}, False),                           # a block across the slice boundary
    (80, [64, 16, 16], 32, "mixed-ranks", {"LORASERVE_LORA_SEG_SPLIT": "2"}, False),   # qkv-like, split-K partials
    (80, [64, 16, 16], 32, "mixed-ranks", {"LORASERVE_LORA_SEG_SPLIT": "2", "LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT": "1"},
     True),   # ... reduced in the shrink (the default before the fourteenth session)
    (100, [72], 24, "zipf:1.5", {"LORASERVE_LORA_SEG_GROUP": "2", "LORASERVE_LORA_SEG_BN": "32"}, False),  # R = 24
    (128, [40, 40], 16, "uniform", {"LORASERVE_LORA_SEG_GROUP": "4", "LORASERVE_LORA_SEG_SPLIT": "3",
                                    "LORASERVE_LORA_SEG_BPP": "1", "LORASERVE_LORA_SEG_BN": "16"}, True),
    (72, [64, 32], 16, "mixed-ranks", {"LORASERVE_LORA_SEG_BPP": "2", "LORASERVE_LORA_SEG_BN": "32"}, True),
    (90, [48, 40], 32, "zipf:1.5", {"LORASERVE_LORA_SEG_SPLIT": "3", "LORASERVE_LORA_SEG_REDUCE": "0"}, False),
    # the reduction only above LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT planes (default 4): 3 <= 4 summed by the expand; 3 > 2
    # reduced
    (90, [64, 16, 16], 32, "mixed-ranks", {"LORASERVE_LORA_SEG_SPLIT": "3", "LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT": "4"},
     True),
    (80, [48, 40], 16, "no-adapter-rows", {"LORASERVE_LORA_SEG_SPLIT": "3", "LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT": "2"},
     False),
    (96, [32, 16, 16], 16, "no-adapter-rows", {"LORASERVE_LORA_SEG_SPLIT": "4", "LORASERVE_LORA_SEG_GROUP": "2"}, True),
    (88, [32, 16, 16], 16, "mixed-ranks", {"LORASERVE_LORA_SEG_YAHEAD": "1", "LORASERVE_LORA_SEG_BN": "32",
                                           "LORASERVE_LORA_SEG_BPP": "2"}, True),   # y one block ahead
    (70, [40, 40], 32, "uniform", {"LORASERVE_LORA_SEG_YAHEAD": "1", "LORASERVE_LORA_SEG_GROUP": "4"}, False),
    (130, [48, 40], 16, "zipf:1.5", {"LORASERVE_LORA_SEG_ADAPT": "1", "LORASERVE_LORA_SEG_GROUP": "4",
                                     "LORASERVE_LORA_SEG_SPLIT": "2"}, True),   # per-block one pass or per-tile passes
    (100, [64, 16, 16], 32, "mixed-ranks", {"LORASERVE_LORA_SEG_ADAPT": "1", "LORASERVE_LORA_SEG_GROUP": "2",
                                            "LORASERVE_LORA_SEG_YAHEAD": "1"}, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-{'x'.join(map(str, c[1]))}-r{c[2]}-{c[3]}" for c in CASES])
def test_seg_path_vs_reference(interp, case) -> None:
    interp.submit(check_seg, *case).result(timeout=600)


def check_seg_off() -> None:
    """LORASERVE_LORA_SEG's switch and the token floor: below it, or switched off, the seg path is not taken."""
    from loraserve.kernels import LoRAMetaBuilder, lora_seg
    from loraserve.kernels.lora_apply import choose_path

    from .lora_cases import make_problem, without_dense_paths

    p = make_problem(num_tokens=64, hidden=64, max_rank=16, widths=[32], num_slots=2, composition="uniform",
                     dtype=torch.float16, seed=1, device="cpu")
    meta = LoRAMetaBuilder(64, 2, "cpu").build(p.token_slot)
    with without_dense_paths():
        assert lora_seg.SEG_MIN_TOKENS > 64
        lora_seg.SEG_ENABLED = True
        assert choose_path(p.x, p.lora_a, p.lora_b, meta)[0] != "seg"   # <= 64 tokens never
        old = lora_seg.SEG_ENABLED, lora_seg.SEG_MIN_TOKENS
        try:
            lora_seg.SEG_MIN_TOKENS, lora_seg.SEG_ENABLED = 64, True
            assert choose_path(p.x, p.lora_a, p.lora_b, meta)[0] == "seg"
            lora_seg.SEG_ENABLED = False
            assert choose_path(p.x, p.lora_a, p.lora_b, meta)[0] != "seg"
        finally:
            lora_seg.SEG_ENABLED, lora_seg.SEG_MIN_TOKENS = old


def test_seg_switch(interp) -> None:
    interp.submit(check_seg_off).result(timeout=300)
