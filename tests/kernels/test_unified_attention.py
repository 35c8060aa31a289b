"""The one-launch paged-attention kernel (kernels/unified_attention.py) vs its fp32 torch
reference: prefill, chunked prefill, decode and mixed batches, GQA groups 1/4/8, block sizes
16/32/64, with and without split-KV. On CPU the kernel runs under Triton's interpreter in a
spawned TRITON_INTERPRET=1 worker (see test_lora_triton_interp.py for why a worker); on the
GPU in bf16/fp16/fp32, plus a CUDA-graph replay that must equal eager output bit for bit.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import unified_attention_cases as cases
from .interpreter import interpreter_pool

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
needs_cuda = pytest.mark.skipif(not (triton_available() and torch.cuda.is_available()), reason="needs CUDA + triton")


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(cases.interpreting)


def _run(pool: ProcessPoolExecutor, *args, **kwargs) -> None:
    pool.submit(cases.check, *args, **kwargs).result(timeout=300)


# (H, KVH, D, BS): GQA group 1, 4, 8; block sizes 16, 32, 64; head_dim 24 pads to 32
SHAPES = [(4, 4, 16, 16), (8, 2, 16, 32), (8, 1, 32, 64), (6, 2, 24, 16)]
# every shape on the mixed batch (it holds prompts, a chunk and decode rows), each other batch
# kind on one shape: the interpreter is slow, the GPU tests take the full product
INTERP_CASES = [("mixed", s) for s in SHAPES] + [(b, SHAPES[i]) for i, b in enumerate(["prefill", "chunked", "decode"])]


@needs_triton
@pytest.mark.parametrize("batch,shape", INTERP_CASES)
def test_interpreter_matches_reference(interp, batch, shape) -> None:
    H, KVH, D, BS = shape
    _run(interp, batch, H, KVH, D, BS, "float32", seed=H * 7 + BS)


@needs_triton
@pytest.mark.parametrize("batch,num_splits", [("decode", 4), ("mixed", 3), ("chunked", 2)])
def test_interpreter_split_kv(interp, batch, num_splits) -> None:
    # splits beyond a short sequence's tiles are empty and must weigh nothing in the merge
    _run(interp, batch, 8, 2, 16, 16, "float16", seed=3, num_splits=num_splits)


@needs_triton
def test_interpreter_prefill_tile_and_int64_metadata(interp) -> None:
    """The prefill tile shape (BLOCK_M 64: 16 tokens x G 4) on a mixed batch, int64 tables/lengths."""
    _run(interp, "mixed", 8, 2, 16, 16, "float32", config=dict(BLOCK_M=64, TILE_N=32), index_dtype="int64")


@pytest.mark.parametrize("batch", list(cases.BATCHES))
def test_reference_equals_engine_torch_path(batch) -> None:
    """The kernel's reference and the engine's CPU attention agree (neither is the kernel)."""
    cases.check_matches_torch_path(batch, 8, 2, 16, 16, seed=5)


def test_launch_config_and_splits() -> None:
    from loraserve.kernels.unified_attention import choose_num_splits, launch_config, plan_num_splits

    assert launch_config(1, 4)["BLOCK_M"] == 16          # decode: one token of a group per 4 rows
    assert launch_config(1, 32)["BLOCK_M"] == 32         # the group never exceeds the tile
    assert launch_config(1024, 4)["BLOCK_M"] == 64       # prefill: 16 tokens x 4 heads
    cpu = torch.device("cpu")
    assert choose_num_splits(8, 512, cpu) == 64           # batch 1, 8 KV heads, long context: split
    assert choose_num_splits(8, 3, cpu) == 3              # never more splits than key tiles
    assert choose_num_splits(512, 512, cpu) == 1          # batch 64 fills the GPU alone
    # per-step plans from host lengths (Llama-3-8B heads, bf16)
    assert plan_num_splits([1], [32768], 32, 8, 2, cpu) > 32
    assert plan_num_splits([1] * 64, [512] * 64, 32, 8, 2, cpu) == 1
    assert plan_num_splits([1024] * 8, [1024] * 8, 32, 8, 2, cpu) == 1
    assert plan_num_splits([1] * 64 + [512], [512] * 64 + [2048], 32, 8, 2, cpu) == 1  # measured: 2 is slower
    assert plan_num_splits([1] * 4 + [128], [16384] * 4 + [128], 32, 8, 2, cpu) > 1     # long decodes dominate
    assert plan_num_splits([1], [5], 32, 8, 2, cpu) == 1  # one key tile: nothing to split


# ---- GPU ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", list(cases.BATCHES))
@pytest.mark.parametrize("H,KVH,BS", [(8, 8, 16), (32, 8, 32), (32, 4, 64)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_matches_reference(batch, H, KVH, BS, dtype) -> None:
    cases.check(batch, H, KVH, 128, BS, dtype, seed=1, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_splits", [1, 7, 32])
def test_gpu_long_context_split_kv(num_splits) -> None:
    from loraserve.kernels.unified_attention import unified_attention, unified_attention_ref

    batch = [(1, 5000), (300, 2100), (1, 9)]
    q, k, v, t, lens, qsl = cases.make_problem(batch, 32, 8, 128, 16, torch.bfloat16, 2, "cuda")
    out = unified_attention(q, k, v, t, lens, qsl, 300, 128 ** -0.5, num_splits=num_splits)
    ref = unified_attention_ref(q, k, v, t, lens, qsl, 128 ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), **cases.TOLERANCES[torch.bfloat16])


@pytest.mark.gpu
@needs_cuda
def test_gpu_graph_replay_equals_eager() -> None:
    """Capture a mixed step once, replay with other lengths/tables of the same N and B."""
    from loraserve.kernels.unified_attention import unified_attention

    batch_a = [(1, 700), (40, 40), (23, 90), (1, 3)]
    batch_b = [(1, 33), (40, 500), (23, 23), (1, 1200)]  # same query lengths, other contexts
    H, KVH, D, BS = 32, 8, 128, 16
    pa = cases.make_problem(batch_a, H, KVH, D, BS, torch.bfloat16, 3, "cuda")
    pb = cases.make_problem(batch_b, H, KVH, D, BS, torch.bfloat16, 4, "cuda")
    nb = max(pa[1].shape[0], pb[1].shape[0])
    W = max(pa[3].shape[1], pb[3].shape[1])
    # static buffers big enough for both problems
    q = pa[0].clone()
    k = torch.zeros(nb, BS, KVH, D, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros_like(k)
    tables = torch.zeros(len(batch_a), W, dtype=torch.int32, device="cuda")
    lens, qsl = pa[4].clone(), pa[5].clone()

    def load(p) -> None:
        q.copy_(p[0])
        k.zero_()
        v.zero_()
        k[: p[1].shape[0]].copy_(p[1])
        v[: p[2].shape[0]].copy_(p[2])
        tables.zero_()
        tables[:, : p[3].shape[1]].copy_(p[3])
        lens.copy_(p[4])
        qsl.copy_(p[5])

    out = torch.empty_like(q)
    load(pa)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        unified_attention(q, k, v, tables, lens, qsl, 40, D ** -0.5, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        unified_attention(q, k, v, tables, lens, qsl, 40, D ** -0.5, out=out)
    for p in (pb, pa):
        load(p)
        graph.replay()
        torch.cuda.synchronize()
        eager = unified_attention(q, k, v, tables, lens, qsl, 40, D ** -0.5)
        assert torch.equal(out, eager)
