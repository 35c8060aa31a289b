"""LoRAMetaBuilder: grouping, segments and tiles checked against a plain Python recount."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import LoRAMetaBuilder

from .lora_cases import COMPOSITIONS, token_slots


def _expected_groups(slots: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for t, s in enumerate(slots):
        if s >= 0:
            groups.setdefault(s, []).append(t)
    return dict(sorted(groups.items()))


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("num_tokens,block_m", [(1, 16), (37, 16), (200, 32)])
def test_segments_and_tiles(composition: str, num_tokens: int, block_m: int) -> None:
    L = 7
    slots = token_slots(composition, num_tokens, L, torch.Generator().manual_seed(num_tokens))
    builder = LoRAMetaBuilder(max_tokens=256, max_slots=L, device="cpu", block_m=block_m)
    meta = builder.build(slots)
    groups = _expected_groups(slots.tolist())

    # Segments: active slots ascending, each holding its tokens in order.
    n = int(meta.num_segments)
    assert n == len(groups)
    assert meta.seg_slots[:n].tolist() == list(groups)
    assert (meta.seg_slots[n:] == -1).all()
    ids = meta.sorted_token_ids.tolist()
    starts = meta.seg_starts.tolist()
    for i, (slot, toks) in enumerate(groups.items()):
        assert ids[starts[i]:starts[i + 1]] == toks
    assert all(s == starts[n] for s in starts[n:])
    assert [(s, t.tolist()) for s, t in meta.segments()] == list(groups.items())

    # Tiles: cover every adapted token exactly once, never mix slots, never exceed block_m.
    covered = []
    used = int(meta.num_tiles)
    assert used == sum(-(-len(t) // block_m) for t in groups.values()) <= meta.grid_tiles
    for i in range(meta.grid_tiles):
        slot = int(meta.tile_slots[i])
        if i >= used:
            assert slot == -1
            continue
        lo, end = int(meta.tile_starts[i]), int(meta.tile_ends[i])
        rows = ids[lo:min(lo + block_m, end)]
        assert rows and all(slots[t] == slot for t in rows)
        covered += rows
    assert sorted(covered) == [t for t, s in enumerate(slots.tolist()) if s >= 0]


def test_rebuild_reuses_buffers_and_forgets_old_step() -> None:
    builder = LoRAMetaBuilder(max_tokens=64, max_slots=4, device="cpu")
    ptr = builder.tile_slots.data_ptr()
    builder.build(torch.arange(64, dtype=torch.int32) % 4)
    meta = builder.build(torch.tensor([2, -1, 2], dtype=torch.int32))
    assert meta.tile_slots.data_ptr() == ptr
    assert int(meta.num_segments) == 1 and int(meta.num_tiles) == 1
    assert meta.tile_slots[:meta.grid_tiles].tolist() == [2, -1, -1, -1]
    assert meta.sorted_token_ids[:2].tolist() == [0, 2]


def test_all_tokens_without_adapter() -> None:
    meta = LoRAMetaBuilder(16, 3, "cpu").build(torch.full((5,), -1, dtype=torch.int32))
    assert int(meta.num_segments) == 0 and int(meta.num_tiles) == 0
    assert (meta.tile_slots == -1).all() and meta.segments() == []


@pytest.mark.parametrize("bad,message", [
    (torch.tensor([0, 4], dtype=torch.int32), r"\[-1, 3\]"),
    (torch.tensor([-2], dtype=torch.int32), r"\[-1, 3\]"),
    (torch.zeros(17, dtype=torch.int32), "max_tokens"),
    (torch.zeros(2, dtype=torch.float32), "int32 or int64"),
    (torch.zeros(2, 2, dtype=torch.int32), "1-D"),
])
def test_bad_input_is_rejected(bad: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAMetaBuilder(16, 4, "cpu").build(bad)


def test_block_m_must_suit_tl_dot() -> None:
    with pytest.raises(ValueError, match="block_m"):
        LoRAMetaBuilder(16, 4, "cpu", block_m=8)


def test_auto_block_m_from_host_sizes_only() -> None:
    builder = LoRAMetaBuilder(2048, 8, "cpu")
    small = builder.build(torch.zeros(511, dtype=torch.int32))
    assert small.block_m == 16 and int(small.num_tiles) == 32
    large = builder.build(torch.arange(600, dtype=torch.int32) % 8)
    assert large.block_m == 32 and int(large.num_tiles) == 8 * 3  # 75 tokens a slot
    assert large.grid_tiles == -(-600 // 32) + 8
    prefill = builder.build(torch.zeros(2048, dtype=torch.int32), num_segments_hint=1)
    assert prefill.block_m == 64 and int(prefill.num_tiles) == 32
    forced = builder.build(torch.zeros(100, dtype=torch.int32), block_m=128)
    assert forced.block_m == 128 and int(forced.num_tiles) == 1
    with pytest.raises(ValueError, match="block_m"):
        builder.build(torch.zeros(4, dtype=torch.int32), block_m=24)


def test_stream_expand_column_loop_rule() -> None:
    """The expand's column loop by step size (H200 final run of 2026-11-30): Triton-pipelined up to
    STREAM_SLOTS_MAX_TOKENS tokens (where the BGMV shrink runs too), the hand-rotated loop above
    (it kept the PDL overlap at 64 tokens / 32 adapters) except for runs of >= STREAM_PIPE_MIN_BLOCKS column
    blocks up to 256 tokens (gate_up at 64 tokens: 15 blocks a program, H200 probe 2026-12-01); an explicit
    STREAM_SLOTS overrides all of it."""
    from loraserve.kernels import lora_expand_stream as les

    old = les.STREAM_SLOTS, les.DEFAULT_STREAM_SLOTS, les.STREAM_SLOTS_MAX_TOKENS, les.STREAM_PIPE_MIN_BLOCKS
    try:
        les.STREAM_SLOTS, les.DEFAULT_STREAM_SLOTS, les.STREAM_SLOTS_MAX_TOKENS = None, -4, 32
        les.STREAM_PIPE_MIN_BLOCKS = 10
        small = les.stream_expand_config(1, 6144, 16, 3, 16, 2, 16)
        edge = les.stream_expand_config(32, 28672, 16, 2, 16, 34, 4)
        long_run = les.stream_expand_config(64, 28672, 16, 2, 16, 36, 4)   # 15 blocks a program
        short_run = les.stream_expand_config(64, 6144, 16, 3, 16, 36, 4)   # 4 blocks a program
        assert small["SLOTS"] == edge["SLOTS"] == long_run["SLOTS"] == -4
        assert short_run["SLOTS"] == 0 and short_run["Y_AHEAD"] == 1 and short_run["B_AHEAD"] == 2  # rotating
        nine = les.stream_expand_config(256, 6144, 64, 3, 16, 48, 1)   # qkv r64 / 32 adapters: 9 blocks a program
        assert nine["COLS_PER_PROG"] // nine["BLOCK_N"] == 9 and nine["SLOTS"] == 0
        les.STREAM_PIPE_MIN_BLOCKS = 0
        large = les.stream_expand_config(64, 28672, 16, 2, 16, 36, 4)
        assert large["SLOTS"] == 0 and large["Y_AHEAD"] == 1 and large["B_AHEAD"] == 3  # the 12:20 default
        les.STREAM_SLOTS = 3
        assert les.stream_expand_config(64, 28672, 16, 2, 16, 36, 4)["SLOTS"] == 3
    finally:
        les.STREAM_SLOTS, les.DEFAULT_STREAM_SLOTS, les.STREAM_SLOTS_MAX_TOKENS, les.STREAM_PIPE_MIN_BLOCKS = old
