"""DoRA expand epilogue on the GPU: Llama-3-8B shapes in bf16 vs the torch reference, and a
CUDA-graph replay of lora_apply with the scale that equals eager bit for bit (issue 16)."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_expand, lora_expand_ref, lora_shrink_ref
from loraserve.kernels.lora_apply import workspace_shape

from .dora_interp_cases import dora_scale, dora_shift
from .lora_cases import TOLERANCES, make_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROJECTIONS = {"qkv": (4096, [4096, 1024, 1024]), "gate_up": (4096, [14336, 14336]), "down": (14336, [4096])}


@pytest.mark.parametrize("num_tokens,composition", [(1, "uniform"), (64, "distinct"), (300, "no-adapter-rows")])
@pytest.mark.parametrize("proj", list(PROJECTIONS))
def test_dora_epilogue_llama3_8b_bf16(proj, num_tokens, composition) -> None:
    hidden, widths = PROJECTIONS[proj]
    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=16, widths=widths, num_slots=32,
                     composition=composition, dtype=torch.bfloat16, seed=num_tokens, device="cuda")
    g = dora_scale(p, plain_slots=(0, 1)).cuda()
    meta = LoRAMetaBuilder(1024, 32, "cuda").build(p.token_slot)
    buf = torch.zeros(len(widths), num_tokens, 16, device="cuda")
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    y_tri, y_ref = p.y0.clone(), p.y0.clone()
    lora_expand(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y_tri, scale=g)
    lora_expand_ref(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref, scale=g)
    torch.testing.assert_close(y_tri, y_ref, **TOLERANCES[torch.bfloat16])
    none = p.token_slot < 0
    assert torch.equal(y_tri[none], p.y0[none])


def test_dora_graph_replay_matches_eager() -> None:
    p = make_problem(num_tokens=64, hidden=4096, max_rank=16, widths=[4096, 1024, 1024], num_slots=32,
                     composition="no-adapter-rows", dtype=torch.bfloat16, seed=5, device="cuda")
    g_host = dora_scale(p)
    g = g_host.cuda()
    c = dora_shift(g_host).cuda()   # a biased projection (Qwen2 qkv)
    builder = LoRAMetaBuilder(64, 32, "cuda")
    meta = builder.build(p.token_slot)
    buf = torch.empty(workspace_shape(p.x, p.lora_a, p.lora_b, meta), device="cuda")
    eager = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, buf, scale=g, shift=c)
    y = p.y0.clone()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (Triton compiles) outside the capture
        lora_apply(p.x, y, p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, buf, scale=g, shift=c)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        lora_apply(p.x, y, p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, buf, scale=g, shift=c)
    y.copy_(p.y0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)
