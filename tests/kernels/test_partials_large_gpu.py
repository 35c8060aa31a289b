"""The "partials" path above 256 tokens on a GPU (LORASERVE_LORA_PARTIALS_MAX_TOKENS): bench_churn's steady mixed
step on the 8B shape's fused qkv (q_proj + v_proj merged slices: widths 5120 and 1024), 35 decode rows over 32
adapters of rank 8-64 in max-rank-64 slots plus one adapter's 256-token chunk and 29 padding rows (T 320), bf16.
The partials path (split-K by the rule, or capped at 2) == the float64 reference within bf16 tolerance, and its
CUDA-graph replay == its eager run bit for bit (the split-K partials are summed in a fixed order)."""
from __future__ import annotations

import os

import pytest
import torch

from .lora_cases import TOLERANCES, LoRAProblem, naive_lora_delta, without_dense_paths

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def mixed_step_problem(seed: int = 0) -> LoRAProblem:
    gen = torch.Generator().manual_seed(seed)
    H, R, L, widths, T = 4096, 64, 40, [5120, 1024], 320
    ranks = torch.tensor([(8, 16, 32, 64)[i % 4] for i in range(L)], dtype=torch.int32)
    lora_a = torch.randn(L, 2, R, H, generator=gen) / H ** 0.5
    lora_b = torch.randn(L, sum(widths), R, generator=gen) / R ** 0.5
    for slot, r in enumerate(ranks.tolist()):
        lora_a[slot, :, r:] = 0
        lora_b[slot, :, r:] = 0
    lora_b[:, 4096:5120] = 0   # k's columns in the merged q slice: zero B rows (slots.lora_slices)
    slots = [k % 32 for k in range(35)] + [5] * 256 + [-1] * 29
    dev, bf = "cuda", torch.bfloat16
    return LoRAProblem(x=torch.randn(T, H, generator=gen).to(dev, bf), lora_a=lora_a.to(dev, bf),
                       lora_b=lora_b.to(dev, bf), ranks=ranks.to(dev),
                       slice_offsets=torch.tensor([0, 5120, 6144], dtype=torch.int32, device=dev),
                       token_slot=torch.tensor(slots, dtype=torch.int32, device=dev),
                       y0=torch.randn(T, sum(widths), generator=gen).to(dev, bf))


@pytest.mark.parametrize("split_cap", ["32", "2"])
def test_partials_path_at_the_mixed_step_equals_reference_and_replays(split_cap, monkeypatch) -> None:
    from loraserve.kernels import LoRAMetaBuilder, lora_apply
    from loraserve.kernels.lora_apply import choose_path

    monkeypatch.setenv("LORASERVE_LORA_PARTIALS_MAX_TOKENS", "1024")
    monkeypatch.setenv("LORASERVE_LORA_SHRINK_SPLIT_LARGE", split_cap)
    p = mixed_step_problem()
    T = p.x.shape[0]
    meta = LoRAMetaBuilder(T, p.ranks.shape[0], "cuda").build(p.token_slot, max_segments=39)
    with without_dense_paths():
        path, shape, _ = choose_path(p.x, p.lora_a, p.lora_b, meta)
        assert path == "partials" and len(shape) == 4 and shape[0] <= int(split_cap), (path, shape)
        buf = torch.empty(shape, dtype=torch.float32, device="cuda")
        y_eager = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, buf)
        y_graph = p.y0.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):   # warm-up on the capture stream
            lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, buf)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            lora_apply(p.x, y_graph, p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks, buf)
        y_graph.copy_(p.y0)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(y_graph, y_eager), "graph replay != eager on the partials path"
    ref = naive_lora_delta(LoRAProblem(**{k: v.cpu() for k, v in vars(p).items()}))
    torch.testing.assert_close(y_eager.float().cpu(), ref.float(), **TOLERANCES[torch.bfloat16])
    assert torch.equal(y_eager[291:], p.y0[291:]), "padding rows (no adapter) changed"
    assert os.environ["LORASERVE_LORA_PARTIALS_MAX_TOKENS"] == "1024"
