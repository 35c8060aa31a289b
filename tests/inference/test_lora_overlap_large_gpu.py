"""LORASERVE_LORA_OVERLAP_LARGE (lora/batch.py): above OVERLAP_MAX_TOKENS tokens, the LoRA shrink on a side stream
while the base GEMM runs, at bench_churn's steady mixed step (63 decode rows over 32 adapters of rank 1-64 + one
256-token prompt chunk + padding rows, graph T 352; q+v on the fused qkv: 2 A slices). The output must equal the
sequential GEMM-then-LoRA bit for bit (the same kernels, only the stream differs), eagerly and replayed from a
CUDA graph."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.lora_cases import make_problem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_overlap_large_equals_sequential_and_replays():
    import types

    import torch.nn.functional as F

    from loraserve.inference.lora import batch as lora_batch
    from loraserve.kernels import LoRAMetaBuilder
    from loraserve.kernels.lora_apply import choose_path

    T, H, widths = 352, 4096, [5120, 1024]          # q (+ k's zero-B columns) | v
    p = make_problem(num_tokens=T, hidden=H, max_rank=64, widths=widths, num_slots=32, composition="mixed-ranks",
                     dtype=torch.bfloat16, seed=11, device="cuda")
    slot = [k % 32 for k in range(63)] + [5] * 256 + [-1] * (T - 319)   # [T]: decodes, the chunk, padding
    token_slot = torch.tensor(slot, dtype=torch.int32, device="cuda")
    N = sum(widths)
    weight = torch.randn(N, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5
    slots = types.SimpleNamespace(a={"qkv": p.lora_a[None]}, b={"qkv": p.lora_b[None]}, scale={}, shift={},
                                  slice_offsets={"qkv": p.slice_offsets}, ranks=p.ranks)
    meta = LoRAMetaBuilder(T, 32, "cuda").build(token_slot, max_segments=71)
    assert choose_path(p.x, p.lora_a, p.lora_b, meta)[0] in ("reduced", "partials")   # a split (two-kernel) path
    old = lora_batch.OVERLAP_LARGE
    try:
        lora_batch.OVERLAP_LARGE = ""
        seq = lora_batch.LoRABatch(slots, meta)
        y_seq = seq.linear(0, "qkv", p.x, weight, None)
        lora_batch.OVERLAP_LARGE = "shrink"
        ovl = lora_batch.LoRABatch(slots, meta)
        y_ovl = ovl.linear(0, "qkv", p.x, weight, None)
        torch.cuda.synchronize()
        assert torch.equal(y_ovl, y_seq), "overlapped LoRA differs from the sequential path"
        assert not torch.equal(y_seq, F.linear(p.x, weight)), "the adapters must change the output"
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ovl.linear(0, "qkv", p.x, weight, None)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ovl.linear(0, "qkv", p.x, weight, None)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y_seq), "graph replay of the overlapped LoRA differs from eager"
    finally:
        lora_batch.OVERLAP_LARGE = old
