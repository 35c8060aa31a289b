"""The kernels of the 64-token / 32-adapter decode step (issue 10's layer case) on a GPU at Llama-3-8B widths: the
streaming expand on the decode grid (gate_up; qkv's short runs: lora_expand_stream.STREAM_PPS_DECODE_ANY) vs the
torch reference (DoRA epilogue included), the BGMV shrink with two rows on its multiply-sum path and A in chunks (the
one-wave rule, lora_shrink_bgmv.BGMV_WAVE_CHUNKS, and explicit chunk counts), and lora_apply through them in a CUDA
graph == eager bit for bit."""
from __future__ import annotations

import pytest
import torch

from . import stream_interp_cases
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


@pytest.mark.parametrize("num_tokens,num_slots,composition", [(64, 32, "distinct"), (48, 24, "mixed-ranks")])
def test_stream_expand_qkv_decode_grid(num_tokens: int, num_slots: int, composition: str) -> None:
    """qkv's streaming expand on the decode grid (the hand-rotated loop's 3-block runs) vs the reference, DoRA too."""
    from loraserve.kernels import lora_expand_stream as les

    _, widths = PROJECTIONS["qkv"]
    args = (num_tokens, sum(widths), 16, 3, 16, num_tokens // 16 + num_slots, 4)
    cfg = les.stream_expand_config(*args)
    old = les.STREAM_PPS_DECODE_ANY
    les.STREAM_PPS_DECODE_ANY = False
    try:
        before = les.stream_expand_config(*args)
    finally:
        les.STREAM_PPS_DECODE_ANY = old
    assert cfg["SLOTS"] == 0 and cfg["groups"] > before["groups"], (cfg, before)   # (64 / 32: 12 -> 16 groups)
    stream_interp_cases.check_stream_expand("bfloat16", 4096, 16, widths, num_tokens, num_slots, composition,
                                            split_k=4, with_scale=True, device="cuda")


@pytest.mark.parametrize("proj", ["qkv", "down"])   # 1024-column blocks; the 14336-wide input's 2048
@pytest.mark.parametrize("chunks", [None, (4, 4), (8, 8)])   # None: the one-wave rule's defaults (4 / 8 chunks)
def test_bgmv_shrink_two_rows_chunks_llama3_8b_bf16(proj: str, chunks) -> None:
    from loraserve.kernels import lora_shrink_bgmv as sb

    from . import bgmv_interp_cases

    hidden, widths = PROJECTIONS[proj]
    old = sb.BGMV_WAVE_CHUNKS
    sb.BGMV_WAVE_CHUNKS = chunks or old
    try:
        # 64 tokens / 32 adapters: the grid needs > 1 wave unchunked (chunks, two rows); 1 token and 48 / 12 (fewer
        # tiles): unchunked; 64 / 32 mixed ranks at max rank 64 (4 rank blocks: chunks, some tiles of 3+ rows)
        for T, L, composition in ((64, 32, "distinct"), (1, 1, "uniform"), (64, 32, "mixed-ranks"), (48, 12, "uniform")):
            rank = 64 if composition == "mixed-ranks" else 16
            bgmv_interp_cases.check_bgmv_shrink("bfloat16", hidden, rank, widths, T, L, composition, device="cuda")
            bgmv_interp_cases.check_bgmv_apply("bfloat16", hidden, rank, widths, T, L, composition, device="cuda")
        check_graph_replay_matches_eager(64, 16)
        check_graph_replay_matches_eager(1, 16)
    finally:
        sb.BGMV_WAVE_CHUNKS = old


@pytest.mark.parametrize("proj", ["qkv", "down"])
@pytest.mark.parametrize("sk_max,wide_r64", [(1, 0), (1, 1024), (2, 512)])
def test_rank64_small_steps_partials_per_round_and_wide_block_k(proj: str, sk_max: int, wide_r64: int) -> None:
    """Rank 64 at 16 tokens (the >= 32 MB shapes' 16-token rows): the streaming expand summing at most sk_max split-K
    partials a load round (lora_expand_stream.STREAM_SK_CHUNK_MAX) after the BGMV shrink with down's BLOCK_K at rank
    > 32 (lora_shrink_bgmv.BGMV_WIDE_BLOCK_K_R64: 14 / 28 partials), lora_apply vs the reference."""
    from loraserve.kernels import lora_expand_stream as les
    from loraserve.kernels import lora_shrink_bgmv as sb

    from . import bgmv_interp_cases

    hidden, widths = PROJECTIONS[proj]
    old = les.STREAM_SK_CHUNK_MAX, sb.BGMV_WIDE_BLOCK_K_R64
    les.STREAM_SK_CHUNK_MAX, sb.BGMV_WIDE_BLOCK_K_R64 = sk_max, wide_r64
    try:
        for T, L, composition in ((16, 16, "distinct"), (16, 8, "mixed-ranks"), (4, 4, "no-adapter-rows")):
            bgmv_interp_cases.check_bgmv_apply("bfloat16", hidden, 64, widths, T, L, composition, device="cuda")
    finally:
        les.STREAM_SK_CHUNK_MAX, sb.BGMV_WIDE_BLOCK_K_R64 = old
