"""kernels/tp_greedy.py (greedy sampling over tensor-parallel vocabulary shards) against sampler.sample() on the
whole rows and tp/sampling.py's torch stats: ranks emulated in one process, the interpreter on the CPU (small
chunks: several per shard), the GPU at the Llama-3 vocabulary; NaN / +inf / all -inf rows, ties across shards,
a vocabulary that does not split evenly (padding columns in the last shard)."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from loraserve.kernels import triton_available

from . import tp_greedy_cases as cases
from .interpreter import interpreter_pool, interpreting
from .sm90 import compile_sm90


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


# (9, 5, 4): the last rank's shard is padding only (vocabulary 5 over 4 ranks of 2 rows)
@pytest.mark.parametrize("T,V,world,dtype", [(9, 301, 2, "float32"), (1, 200, 2, "bfloat16"),
                                             (8, 250, 3, "bfloat16"), (9, 5, 4, "float32")])
def test_tp_greedy_interp(interp, T, V, world, dtype) -> None:
    interp.submit(cases.check_ranks, T, V, world, dtype, "cpu", 64).result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,world", [(1, 2), (9, 2), (64, 2), (8, 4)])
def test_tp_greedy_gpu(T, world) -> None:
    cases.check_ranks(T, 128256, world, "bfloat16", "cuda", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test compiles the kernels for real")
@pytest.mark.parametrize("world", [2, 4])
def test_tp_greedy_compiles_for_sm90(world) -> None:
    """The stats merge and the combine through the whole NVIDIA pipeline offline (no GPU here): the interpreter
    accepts code the compiler rejects (mixed int / float selects, int64 program ids)."""
    if not triton_available():
        pytest.skip("triton not installed")
    import triton

    from loraserve.kernels.tp_embed import _vocab_parallel_embed_kernel
    from loraserve.kernels.tp_greedy import _tp_combine_kernel, _tp_stats_kernel

    w_pad = max(2, triton.next_power_of_2(world))
    kernels = [
        (_tp_stats_kernel, {"wsf_ptr": "*fp32", "wsi_ptr": "*i32", "out_ptr": "*fp32", "num_chunks": "i32",
                            "vocab_start": "i32"}, dict(RANK=1, WORLD=world, W_PAD=w_pad, C_PAD=16, USE_PDL=True)),
        (_tp_combine_kernel, {"stats_ptr": "*fp32", "tok_ptr": "*i64", "lp_ptr": "*fp32", "ok_ptr": "*i8",
                              "packed_ptr": "*fp64", "packed_stride": "i32"}, dict(WORLD=world, W_PAD=w_pad, USE_PDL=world == 2)),
        (_vocab_parallel_embed_kernel, {"ids_ptr": "*i64", "w_ptr": "*bf16", "out_ptr": "*bf16", "vocab_start": "i32",
                                        "rows": "i32", "H": "i32", "stride_w": "i32", "stride_o": "i32"},
         dict(BLOCK=2048)),
    ]
    for fn, sig, const in kernels:
        kernel = compile_sm90(fn, sig, const, num_warps=1)
        assert kernel.asm["ptx"]


@pytest.mark.parametrize("N,rows,H", [(1, 40, 64), (9, 33, 96), (5, 17, 3000)])
def test_vocab_parallel_embed_interp(interp, N, rows, H) -> None:
    """kernels/tp_embed.py (TPGroup.embed's one launch on CUDA) against its torch ops."""
    interp.submit(cases.check_embed, N, rows, H, rows, "float32", "cpu").result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("N", [1, 64])
def test_vocab_parallel_embed_gpu(N) -> None:
    cases.check_embed(N, 64128, 4096, 64128, "bfloat16", "cuda")
