"""The BGMV shrink's summed plane (lora_shrink.bgmv_reduced: each (tile, rank block, slice)'s last K chunk sums the
partials in a fixed order into one more plane, the expand reads that plane) on a GPU at Llama-3-8B widths: the plane
== the partials' ordered sum bit for bit with the arrival counters left at zero, lora_apply through it vs the torch
reference (the streaming expand; the BGMV expand from one plane at rank 64), and a CUDA graph == eager bit for bit over
replays with new slot mixes (the counters reset by every launch)."""
from __future__ import annotations

import pytest
import torch

from . import bgmv_interp_cases
from .test_lora_gpu import PROJECTIONS, check_graph_replay_matches_eager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("proj", ["down", "qkv"])
@pytest.mark.parametrize("xb_one", [32, 64])   # lora_expand_bgmv.EXPAND_BGMV_MAX_RANK_ONE: the BGMV expand at rank 64
def test_bgmv_reduced_plane_llama3_8b_bf16(proj: str, xb_one: int) -> None:
    from loraserve.kernels import lora_expand_bgmv as xb
    from loraserve.kernels import lora_shrink_bgmv as sb

    hidden, widths = PROJECTIONS[proj]
    old = sb.BGMV_REDUCE_MIN_RANK, xb.EXPAND_BGMV_MAX_RANK_ONE
    sb.BGMV_REDUCE_MIN_RANK, xb.EXPAND_BGMV_MAX_RANK_ONE = 32, xb_one
    try:
        for T, L, composition in ((16, 16, "distinct"), (32, 8, "mixed-ranks"), (1, 1, "uniform"),
                                  (7, 4, "no-adapter-rows")):
            bgmv_interp_cases.check_bgmv_shrink("bfloat16", hidden, 64, widths, T, L, composition, device="cuda",
                                                reduce=True)
            bgmv_interp_cases.check_bgmv_apply("bfloat16", hidden, 64, widths, T, L, composition, device="cuda",
                                               reduce_min_rank=32)
        check_graph_replay_matches_eager(8, 64)
        check_graph_replay_matches_eager(16, 64)
    finally:
        sb.BGMV_REDUCE_MIN_RANK, xb.EXPAND_BGMV_MAX_RANK_ONE = old
