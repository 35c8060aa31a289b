"""GPU checks of LORASERVE_LORA_PREFETCH (kernels/lora_prefetch.py): the loads / L2 prefetches before
griddepcontrol.wait and the expand's early trigger change no result. A chain of projections sharing ONE
split-K workspace and ONE y (each shrink overwrites the partials the previous expand reads: a write
issued before its wait would race) must equal the same chain with the switches off, bit for bit,
eagerly and as a CUDA-graph replay, and the reference within bf16 tolerance."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_expand_ref, lora_meta, lora_shrink_ref
from loraserve.kernels.lora_apply import workspace_shape

from .lora_cases import TOLERANCES, make_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

QKV = (4096, [4096, 1024, 1024])
GATE_UP = (4096, [14336, 14336])


def _chain(x, y, problems, meta, buf, links: int):
    for i in range(links):
        p = problems[i % len(problems)]
        lora_apply(x, y, p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, buf=buf)


@pytest.mark.parametrize("num_tokens,widths,composition", [
    (64, QKV, "distinct"), (64, GATE_UP, "no-adapter-rows"), (1, QKV, "uniform"), (16, QKV, "mixed-ranks")])
@pytest.mark.parametrize("flags,bgmv_max_tokens", [("at", 64), ("albt", 32)])
def test_prefetch_chain_equals_no_prefetch_and_replays(num_tokens, widths, composition, flags, bgmv_max_tokens) -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    hidden, widths = widths
    T, L, R = num_tokens, 32, 16
    problems = [make_problem(num_tokens=T, hidden=hidden, max_rank=R, widths=widths, num_slots=L,
                             composition=composition, dtype=torch.bfloat16, seed=s, device="cuda") for s in (1, 2, 3)]
    first = problems[0]
    meta = LoRAMetaBuilder(T, L, "cuda").build(first.token_slot)
    for p in problems[1:]:  # one slot assignment and rank table for the chain (ranks vary by slot)
        p.ranks.copy_(first.ranks)
    x = first.x.clone()
    old_pdl, old_pf, old_bgmv = lora_meta.LORA_PDL, lora_meta.LORA_PREFETCH, lora_meta.LORA_BGMV_MAX_TOKENS
    try:
        # the same kernels with the loads before the wait or not; ONE workspace for the whole chain
        lora_meta.LORA_PDL, lora_meta.LORA_PREFETCH, lora_meta.LORA_BGMV_MAX_TOKENS = True, "", bgmv_max_tokens
        buf = torch.empty(workspace_shape(x, first.lora_a, first.lora_b, meta), device="cuda")
        y_off = first.y0.clone()
        _chain(x, y_off, problems, meta, buf, 6)
        lora_meta.LORA_PREFETCH = flags
        y_on = first.y0.clone()
        _chain(x, y_on, problems, meta, buf, 6)
        torch.cuda.synchronize()
        assert torch.equal(y_on, y_off), f"prefetch {flags!r} changed the chain's output (eager)"

        y_g = first.y0.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile outside the capture
            _chain(x, y_g.clone(), problems, meta, buf, 1)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_g.copy_(first.y0)
            _chain(x, y_g, problems, meta, buf, 6)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y_g, y_off), f"prefetch {flags!r}: graph replay differs from the eager chain"
        y_one = first.y0.clone()   # the chain's first link alone, against the reference below
        lora_apply(x, y_one, first.lora_a, first.lora_b, first.slice_offsets, meta, first.ranks, buf=buf)
    finally:
        lora_meta.LORA_PDL, lora_meta.LORA_PREFETCH, lora_meta.LORA_BGMV_MAX_TOKENS = old_pdl, old_pf, old_bgmv

    y_ref = first.y0.clone()
    ref_buf = torch.empty(len(widths), T, R, device="cuda")
    lora_shrink_ref(x, first.lora_a, meta, first.ranks, ref_buf)
    lora_expand_ref(ref_buf, first.lora_b, first.slice_offsets, meta, first.ranks, y_ref)
    torch.testing.assert_close(y_one.float(), y_ref.float(), **TOLERANCES[torch.bfloat16])
