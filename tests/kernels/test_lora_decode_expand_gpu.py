"""The kernels of the 64-token / 32-adapter decode step (issue 10's layer case) on a GPU at Llama-3-8B widths: the
streaming expand on the decode grid (gate_up), the BGMV expand with its decode loops Triton-pipelined one per slice
(lora_expand_bgmv.EXPAND_BGMV_SLICE_LOOPS) on qkv / gate_up widths vs the torch reference (DoRA flags included), the
BGMV shrink with two rows on its multiply-sum path and A in chunks (lora_shrink_bgmv.BGMV_ROWS / KCHUNKS), and
lora_apply through them in a CUDA graph == eager bit for bit."""
from __future__ import annotations

import pytest
import torch

from . import expand_bgmv_cases, stream_interp_cases
from .test_lora_gpu import PROJECTIONS, check_graph_replay_matches_eager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("num_tokens,num_slots,composition", [(64, 32, "distinct"), (48, 24, "mixed-ranks"),
                                                             (64, 8, "no-adapter-rows")])
def test_stream_expand_gate_up_decode_grid(num_tokens: int, num_slots: int, composition: str) -> None:
    """The streaming expand at gate_up's widths with the decode grid (6 programs per SM at 33..64 tokens where runs stay
    >= 10 blocks: lora_expand_stream.STREAM_PROGRAMS_PER_SM_DECODE) vs the reference, DoRA epilogue included."""
    from loraserve.kernels.lora_expand_stream import stream_expand_config

    _, widths = PROJECTIONS["gate_up"]
    tiles = num_tokens // 16 + num_slots   # (the meta's grid tiles: cdiv(T, 16) + min(T, slots))
    cfg = stream_expand_config(num_tokens, sum(widths), 16, 2, 16, tiles, 4)
    # 32 / 24 slots: the decode grid (>= 10 blocks a program, pipelined); 8 slots: 4 per SM as before (rotating loop)
    assert (cfg["SLOTS"] < 0) == (num_slots >= 24), cfg
    stream_interp_cases.check_stream_expand("bfloat16", 4096, 16, widths, num_tokens, num_slots, composition,
                                            split_k=4, with_scale=True, device="cuda")


@pytest.fixture
def slice_loops():
    """The BGMV expand on every projection with its decode loops one per slice (128 columns, 4 stages)."""
    from loraserve.kernels import lora_expand, lora_expand_bgmv as xb

    old = (lora_expand.EXPAND_BGMV_MAX_SLICES, xb.EXPAND_BGMV_STAGES, xb.EXPAND_BGMV_SLICE_LOOPS,
           xb.EXPAND_BGMV_BLOCK_N)
    lora_expand.EXPAND_BGMV_MAX_SLICES, xb.EXPAND_BGMV_STAGES, xb.EXPAND_BGMV_SLICE_LOOPS = 3, 4, True
    xb.EXPAND_BGMV_BLOCK_N = 128
    try:
        yield
        assert not lora_expand._BGMV_FAILED, f"the BGMV expand fell back: {lora_expand._BGMV_FAILED}"
    finally:
        (lora_expand.EXPAND_BGMV_MAX_SLICES, xb.EXPAND_BGMV_STAGES, xb.EXPAND_BGMV_SLICE_LOOPS,
         xb.EXPAND_BGMV_BLOCK_N) = old


@pytest.mark.parametrize("proj", ["qkv", "gate_up"])
def test_bgmv_slice_loops_llama3_8b_bf16(slice_loops, proj: str) -> None:
    _, widths = PROJECTIONS[proj]
    for T, L, composition, sk in ((64, 32, "distinct", 4), (64, 8, "no-adapter-rows", 2), (1, 1, "distinct", 4),
                                  (48, 24, "mixed-ranks", 7)):
        expand_bgmv_cases.check_expand_bgmv("bfloat16", 16, widths, T, L, composition, split_k=sk, via_switch=True,
                                            device="cuda")
    expand_bgmv_cases.check_scale_on("bfloat16", 16, widths, 64, 32, bgmv=True, device="cuda")


def test_bgmv_slice_loops_graph_replay(slice_loops) -> None:
    check_graph_replay_matches_eager(64, 16)
    check_graph_replay_matches_eager(1, 16)


@pytest.mark.parametrize("proj", ["qkv", "down"])   # 1024-column blocks; the 14336-wide input's 2048
@pytest.mark.parametrize("kchunks", [4, 8])
def test_bgmv_shrink_two_rows_chunks_llama3_8b_bf16(proj: str, kchunks: int) -> None:
    from loraserve.kernels import lora_shrink_bgmv as sb

    from . import bgmv_interp_cases

    hidden, widths = PROJECTIONS[proj]
    old = sb.BGMV_ROWS, sb.BGMV_KCHUNKS, sb.BGMV_KCHUNKS_WIDE
    sb.BGMV_ROWS, sb.BGMV_KCHUNKS, sb.BGMV_KCHUNKS_WIDE = 2, 4, kchunks
    try:
        for T, L, composition in ((64, 32, "distinct"), (1, 1, "uniform"), (64, 32, "mixed-ranks"), (48, 12, "uniform")):
            rank = 64 if composition == "mixed-ranks" else 16
            bgmv_interp_cases.check_bgmv_shrink("bfloat16", hidden, rank, widths, T, L, composition, device="cuda")
            bgmv_interp_cases.check_bgmv_apply("bfloat16", hidden, rank, widths, T, L, composition, device="cuda")
        check_graph_replay_matches_eager(64, 16)
        check_graph_replay_matches_eager(1, 16)
    finally:
        sb.BGMV_ROWS, sb.BGMV_KCHUNKS, sb.BGMV_KCHUNKS_WIDE = old
