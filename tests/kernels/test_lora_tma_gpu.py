"""The TMA-fed expand (kernels/lora_tma_expand.py, LORASERVE_LORA_TMA_EXPAND) on a GPU at Llama-3-8B widths: vs the
torch reference through lora_expand's dispatch (decode tiles of <= 2 rows: the per-row loop with y through TMA;
larger tiles: the tl.dot loop), with DoRA's epilogue and per-slot flags, then lora_apply through it in a CUDA graph ==
eager bit for bit (new slot assignments replayed), and the pure-read kernels vs torch's sums."""
from __future__ import annotations

import pytest
import torch

from . import tma_interp_cases as cases
from .test_lora_gpu import PROJECTIONS, check_graph_replay_matches_eager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("proj", ["qkv", "gate_up"])
def test_tma_expand_llama3_8b_bf16_and_graph_replay(proj: str) -> None:
    from loraserve.kernels import lora_tma_expand

    _, widths = PROJECTIONS[proj]
    for T, L, composition, sk in ((64, 32, "distinct", 4), (64, 8, "no-adapter-rows", 2), (1, 1, "distinct", 4),
                                  (16, 16, "mixed-ranks", 7)):
        cases.check_tma_expand("bfloat16", 16, widths, T, L, composition, split_k=sk, via_switch=True, device="cuda")
    cases.check_tma_expand("bfloat16", 16, widths, 64, 32, "distinct", split_k=4, with_scale=True, device="cuda")
    cases.check_tma_expand("bfloat16", 32, widths, 64, 32, "mixed-ranks", split_k=4, device="cuda")
    old = lora_tma_expand.TMA_EXPAND
    lora_tma_expand.TMA_EXPAND = True
    try:
        check_graph_replay_matches_eager(64, 16)
        check_graph_replay_matches_eager(1, 16)
        assert not lora_tma_expand._TMA_FAILED, f"the TMA expand fell back: {lora_tma_expand._TMA_FAILED}"
    finally:
        lora_tma_expand.TMA_EXPAND = old


@pytest.mark.parametrize("proj", ["qkv", "down"])
def test_tma_shrink_llama3_8b_bf16_and_graph_replay(proj: str) -> None:
    """The TMA shrink at Llama-3-8B widths (down: BLOCK_K 2048, 8 boxes in flight) vs the reference's shrink, then
    lora_apply with both TMA kernels in a CUDA graph == eager bit for bit."""
    from loraserve.kernels import lora_tma_expand, lora_tma_shrink

    hidden, widths = PROJECTIONS[proj]
    for T, L, composition in ((64, 32, "distinct"), (64, 8, "no-adapter-rows"), (1, 1, "distinct"),
                              (16, 16, "mixed-ranks")):
        cases.check_tma_shrink("bfloat16", 16, widths, hidden, T, L, composition,
                               block_k=2048 if hidden > 8192 else 1024, via_switch=True, device="cuda")
    old = lora_tma_expand.TMA_EXPAND, lora_tma_shrink.TMA_SHRINK
    lora_tma_expand.TMA_EXPAND = lora_tma_shrink.TMA_SHRINK = True
    try:
        check_graph_replay_matches_eager(64, 16)
        check_graph_replay_matches_eager(1, 16)
        assert not lora_tma_shrink._TMA_SHRINK_FAILED, f"the TMA shrink fell back: {lora_tma_shrink._TMA_SHRINK_FAILED}"
    finally:
        lora_tma_expand.TMA_EXPAND, lora_tma_shrink.TMA_SHRINK = old


@pytest.mark.parametrize("num_tokens,num_slots,composition", [(64, 32, "distinct"), (48, 24, "mixed-ranks"),
                                                             (64, 8, "no-adapter-rows")])
def test_stream_expand_gate_up_decode_grid(num_tokens: int, num_slots: int, composition: str) -> None:
    """The streaming expand at gate_up's widths with the decode grid (6 programs per SM at 33..64 tokens where runs stay
    >= 10 blocks: lora_expand_stream.STREAM_PROGRAMS_PER_SM_DECODE) vs the reference, DoRA epilogue included."""
    from loraserve.kernels.lora_expand_stream import stream_expand_config

    from . import stream_interp_cases

    _, widths = PROJECTIONS["gate_up"]
    tiles = num_tokens // 16 + num_slots   # (the meta's grid tiles: cdiv(T, 16) + min(T, slots))
    cfg = stream_expand_config(num_tokens, sum(widths), 16, 2, 16, tiles, 4)
    # 32 / 24 slots: the decode grid (>= 10 blocks a program, pipelined); 8 slots: 4 per SM as before (rotating loop)
    assert (cfg["SLOTS"] < 0) == (num_slots >= 24), cfg
    stream_interp_cases.check_stream_expand("bfloat16", 4096, 16, widths, num_tokens, num_slots, composition,
                                            split_k=4, with_scale=True, device="cuda")


def test_read_kernels_gpu() -> None:
    cases.check_reads(device="cuda")
