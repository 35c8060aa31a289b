"""The LoRA grid's segment bound (LoRAMetaBuilder.build(max_segments=...), used by mixed_graphs and the eager
prepare_batch above 256 tokens): with many slots (rank-packing granules) and few sequences the grid shrinks to
cdiv(T, BM) + bound tiles, still covers every used tile, and lora_apply through it (Triton under the
interpreter, in a worker) gives the torch reference's delta on every path it takes (partials <= 256 tokens,
the 3-launch path above) and leaves rows without an adapter alone."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from loraserve.kernels import LoRAMetaBuilder, triton_available

from .interpreter import interpreter_pool, interpreting


def seq_slots(lens: list[int], slots: list[int]) -> torch.Tensor:
    """[T] int32: sequence i's slot repeated over its lens[i] tokens (-1: no adapter)."""
    return torch.tensor([s for n, s in zip(lens, slots) for _ in range(n)], dtype=torch.int32)


def mixed_step(num_slots: int, prompt: int = 150, decodes: int = 12) -> tuple[torch.Tensor, int]:
    """A mixed step as mixed_graphs sees it: `decodes` one-token rows over slots spread through the whole
    range (and one without an adapter), one `prompt`-token chunk; returns (token slots, sequences)."""
    g = torch.Generator().manual_seed(num_slots)
    slots = torch.randperm(num_slots, generator=g)[:decodes // 2].tolist() * 2
    slots[3] = -1
    lens = [1] * decodes + [prompt]
    return seq_slots(lens, slots + [slots[0]]), decodes + 1


@pytest.mark.parametrize("num_slots", [40, 3000])
def test_bounded_grid_covers_every_used_tile(num_slots: int) -> None:
    token_slot, num_seqs = mixed_step(num_slots)
    T = token_slot.numel()
    builder = LoRAMetaBuilder(T, num_slots, "cpu")
    old = builder.build(token_slot)
    old_tiles = [(int(old.tile_slots[i]), int(old.tile_starts[i]), int(old.tile_ends[i]))
                 for i in range(int(old.num_tiles))]
    meta = builder.build(token_slot, max_segments=num_seqs)
    assert old.grid_tiles == -(-T // 16) + min(num_slots, T)
    assert meta.grid_tiles == -(-T // 16) + min(num_slots, num_seqs) < old.grid_tiles
    used = int(meta.num_tiles)
    assert used <= meta.grid_tiles
    assert [(int(meta.tile_slots[i]), int(meta.tile_starts[i]), int(meta.tile_ends[i])) for i in range(used)] \
        == old_tiles
    # a bound of 1 with many segments would drop tiles: the grid then is below the used tiles (why it must hold)
    assert builder.build(token_slot, max_segments=1).grid_tiles < used


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


def check_bounded_apply(num_tokens_prompt: int, num_slots: int, widths: list[int], max_rank: int) -> None:
    """lora_apply (Triton, interpreted) through a bounded meta == the torch reference through the full one."""
    from loraserve.kernels import lora_apply
    from loraserve.kernels.lora_apply import choose_path
    from loraserve.kernels.reference import lora_expand_ref, lora_shrink_ref

    token_slot, num_seqs = mixed_step(num_slots, prompt=num_tokens_prompt)
    T, H, S, N = token_slot.numel(), 32, len(widths), sum(widths)
    g = torch.Generator().manual_seed(T)
    ranks = torch.randint(1, max_rank + 1, (num_slots,), generator=g).to(torch.int32)
    lora_a = torch.randn(num_slots, S, max_rank, H, generator=g) / H ** 0.5
    lora_b = torch.randn(num_slots, N, max_rank, generator=g) / max_rank ** 0.5
    r = torch.arange(max_rank)
    lora_a[r[None, None, :].expand(num_slots, S, -1) >= ranks[:, None, None].long()] = 0   # rows past the rank: 0
    lora_b[(r[None, :] >= ranks[:, None].long())[:, None, :].expand(-1, N, -1)] = 0
    offsets = torch.tensor([0] + list(torch.tensor(widths).cumsum(0)), dtype=torch.int32)
    x = torch.randn(T, H, generator=g)
    y0 = torch.randn(T, N, generator=g)
    builder = LoRAMetaBuilder(T, num_slots, "cpu")
    full = builder.build(token_slot)
    buf = torch.zeros(S, T, max_rank)
    lora_shrink_ref(x, lora_a, full, ranks, buf)
    y_ref = lora_expand_ref(buf, lora_b, offsets, full, ranks, y0.clone())
    meta = LoRAMetaBuilder(T, num_slots, "cpu").build(token_slot, max_segments=num_seqs)
    assert meta.grid_tiles < full.grid_tiles
    from .lora_cases import without_dense_paths

    with without_dense_paths():  # the tiled paths are what the segment bound sizes
        path = choose_path(x, lora_a, lora_b, meta)[0]
        from loraserve.kernels.lora_apply import partials_max_tokens

        assert path == ("partials" if T <= max(256, partials_max_tokens()) else "reduced"), path
        y = lora_apply(x, y0.clone(), lora_a, lora_b, offsets, meta, ranks)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    none = token_slot < 0
    assert torch.equal(y[none], y0[none])
    assert not torch.allclose(y[~none], y0[~none])


@pytest.mark.parametrize("prompt", [100, 280])   # 113 tokens: partials path; 293: shrink, sum, expand
def test_bounded_grid_gives_the_reference_delta(interp, prompt: int) -> None:
    interp.submit(check_bounded_apply, prompt, 300, [40, 8, 8], 16).result(timeout=600)
