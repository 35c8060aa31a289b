"""LoRAMetaBuilder.build as one Triton launch (kernels/lora_meta_build.py, LORASERVE_LORA_META_KERNEL) gives
every buffer of the torch build, bit for bit: the Triton kernel under the interpreter (a worker), over punica's
batch compositions, token counts from 1 to 2048, 16-64-row tiles, few and many slots, int32 and int64 slots."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from loraserve.kernels import triton_available

from .interpreter import interpreter_pool, interpreting
from .lora_cases import COMPOSITIONS, token_slots
from .sm90 import compile_sm90

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")

BUFFERS = ("seg_slots", "seg_starts", "num_segments", "tile_slots", "tile_starts", "tile_ends", "num_tiles")


def check_kernel_build(composition: str, num_tokens: int, num_slots: int, block_m: int, dtype: str,
                       device: str = "cpu") -> None:
    from loraserve.kernels import lora_meta
    from loraserve.kernels.lora_meta import LoRAMetaBuilder

    slots = token_slots(composition, num_tokens, num_slots, torch.Generator().manual_seed(num_tokens + num_slots))
    slots = slots.to(getattr(torch, dtype)).to(device)
    builders = {}
    lora_meta.META_KERNEL_INTERPRETED = True
    for on in (False, True):
        lora_meta.LORA_META_KERNEL = on
        b = builders[on] = LoRAMetaBuilder(max(num_tokens, 64), num_slots, device, block_m=block_m)
        for buf in (b.sorted_token_ids, b.tile_starts, b.tile_ends, b.seg_starts):   # stale values to overwrite
            buf.fill_(12345)
        b.tile_slots.fill_(7)
        meta = b.build(slots, max_segments=None)
        assert meta.num_tokens == num_tokens and meta.block_m == block_m
    lora_meta.LORA_META_KERNEL = False
    ref, got = builders[False], builders[True]
    T = num_tokens
    assert torch.equal(got.token_slot[:T], ref.token_slot[:T])
    assert torch.equal(got.sorted_token_ids[:T], ref.sorted_token_ids[:T])
    for name in BUFFERS:
        assert torch.equal(getattr(got, name), getattr(ref, name)), (name, getattr(got, name), getattr(ref, name))


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(interpreting)


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("num_tokens,num_slots,block_m", [(1, 7, 16), (37, 7, 16), (200, 300, 32)])
def test_kernel_build_equals_torch_build(interp, composition, num_tokens, num_slots, block_m) -> None:
    interp.submit(check_kernel_build, composition, num_tokens, num_slots, block_m, "int32").result(timeout=300)


@pytest.mark.parametrize("composition,num_slots,block_m", [("zipf:1.5", 40, 64), ("no-adapter-rows", 8000, 16)])
def test_kernel_build_long_steps_with_int64_slots(interp, composition, num_slots, block_m) -> None:
    # (the interpreter's sort makes 2048 tokens ~15 s: that size runs in the GPU test)
    interp.submit(check_kernel_build, composition, 600, num_slots, block_m, "int64").result(timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens,num_slots", [(64, 8000), (352, 33), (2048, 1000)])
def test_kernel_build_equals_torch_build_on_the_gpu(num_tokens, num_slots) -> None:
    for composition in ("distinct", "no-adapter-rows", "identical"):
        check_kernel_build(composition, num_tokens, num_slots, 16, "int64", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test compiles the kernel for real")
@pytest.mark.parametrize("tp", [16, 512, 2048])
def test_kernel_compiles_for_sm90_offline(tp) -> None:
    """triton.compile for sm_90 without a GPU (the whole NVIDIA pipeline): the H200 run must not meet a
    compile error in its first graph capture (the torch build is then the only fallback: env off)."""
    from loraserve.kernels.lora_meta_build import _lora_meta_kernel

    ptrs = ["slot_in_ptr", "token_slot_ptr", "sorted_ids_ptr", "scratch_ptr", "seg_slots_ptr", "seg_starts_ptr",
            "num_segments_ptr", "tile_slots_ptr", "tile_starts_ptr", "tile_ends_ptr", "num_tiles_ptr"]
    sig = {p: ("*i64" if p == "slot_in_ptr" else "*i32") for p in ptrs}
    sig.update(T="i32", L="i32", BM="i32", MAX_TILES="i32")
    k = compile_sm90(_lora_meta_kernel, sig, dict(TP=tp, FILL=1024), div16=ptrs, num_warps=8 if tp >= 1024 else 4)
    assert "bar.sync" in k.asm["ptx"], "the CTA barriers between the fills and the scatters are missing"
