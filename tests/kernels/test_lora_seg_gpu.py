"""The segment-tiled LoRA pair (kernels/lora_seg.py, lora_apply's "seg" path) on a GPU at Llama-3-8B widths, bf16:
== a float64 per-segment reference within bf16 tolerance, rows without an adapter untouched, CUDA-graph replay ==
eager bit for bit, and the same output twice; with mixed ranks in max-rank slots, long and short segments, row
blocks of 1 / 4 meta tiles (LORASERVE_LORA_SEG_GROUP) and DoRA's epilogue with per-slot flags."""
from __future__ import annotations

import warnings

import pytest
import torch

from .lora_cases import TOLERANCES, without_dense_paths

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def reference(x, lora_a, lora_b, offsets, ranks, token_slot, y0, scale=None, shift=None) -> torch.Tensor:
    """float64 per slot: h = x A^T rounded to B's dtype (as the kernels feed B), y0 + h B^T (then DoRA's g, c)."""
    y = y0.double().clone()
    offs = offsets.tolist()
    for slot in token_slot.unique().tolist():
        r = int(ranks[slot]) if slot >= 0 else 0
        if r == 0:
            continue
        rows = (token_slot == slot).nonzero().flatten()
        for s in range(len(offs) - 1):
            h = (x[rows].double() @ lora_a[slot, s, :r].double().T).float().to(lora_b.dtype).double()
            y[rows, offs[s]:offs[s + 1]] += h @ lora_b[slot, offs[s]:offs[s + 1], :r].double().T
        if scale is not None:
            y[rows] = y[rows] * scale[slot].double() + (0 if shift is None else shift[slot].double())
    return y


CASES = {  # name: (hidden, widths, max rank, tokens, slots list builder, group, dora)
    "qkv-mixed-ranks-4-adapters": (4096, [4096, 1024, 1024], 64, 1024,
                                   lambda T: [(t * 7 // T) % 5 - 1 for t in range(T)], "1", False),
    # GROUP=4 asked for on 3 slices: seg_group gives 1 there (the group-4 kernels fail triton 3.6's pipeliner for
    # qkv; H200 05:33 / 05:43), so this must still run the seg kernels, not fall back to the tile ones
    "qkv-group4": (4096, [4096, 1024, 1024], 64, 1024, lambda T: [(t * 7 // T) % 5 - 1 for t in range(T)], "4", False),
    "gate_up-one-adapter-dora": (4096, [14336, 14336], 16, 512, lambda T: [2] * (T - 40) + [-1] * 40, "4", True),
    "down-32-adapters-dora": (14336, [4096], 16, 1024, lambda T: [t % 32 for t in range(T)], "1", True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_seg_path_equals_reference_and_replays(name, monkeypatch) -> None:
    check_seg_case(name, monkeypatch)


_EARLY = {"LORASERVE_LORA_SEG_EARLY": "1"}
_EARLY_XT = {"LORASERVE_LORA_SEG_EARLY": "1", "LORASERVE_LORA_SEG_XTRIGGER": "1"}


@pytest.mark.parametrize("name,env", [("qkv-mixed-ranks-4-adapters", _EARLY), ("qkv-mixed-ranks-4-adapters", _EARLY_XT),
                                      ("down-32-adapters-dora", _EARLY_XT),
                                      ("gate_up-one-adapter-dora", dict(_EARLY, LORASERVE_LORA_SEG_EARLY_B="1")),
                                      ("gate_up-one-adapter-dora", {"LORASERVE_LORA_SEG_SHRINK_PER_SM_NARROW": "2"}),
                                      ("qkv-mixed-ranks-4-adapters", {"LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT": "1"}),
                                      ("down-32-adapters-dora", {"LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT": "8"})])
def test_seg_knobs_equal_default_and_replay(name, env, monkeypatch) -> None:
    """lora_seg's knobs: the metadata before the waits and the early launches (seg_early: bit for bit the default),
    2 shrink programs per SM at rank <= 32 (the old default: another split), the split-K planes summed by the expand
    up to 4 (the default) / 8 planes, or reduced in the shrink at any split (LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT 1);
    each == the reference, graph == eager."""
    base = check_seg_case(name, monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    y = check_seg_case(name, monkeypatch)
    if "LORASERVE_LORA_SEG_EARLY" in env:
        assert torch.equal(y, base), "seg_early changed the output"


def check_seg_case(name, monkeypatch) -> torch.Tensor:
    from loraserve.kernels import LoRAMetaBuilder, lora_apply
    from loraserve.kernels.lora_apply import choose_path

    H, widths, R, T, slots_of, group, dora = CASES[name]
    monkeypatch.setenv("LORASERVE_LORA_SEG_GROUP", group)
    monkeypatch.setattr("loraserve.kernels.lora_seg.SEG_ENABLED", True)
    monkeypatch.setattr("loraserve.kernels.lora_seg.SEG_MIN_TOKENS", 256)
    gen = torch.Generator().manual_seed(len(name))
    L, N, dev, bf = 33, sum(widths), "cuda", torch.bfloat16
    ranks = torch.tensor([(8, 16, 32, 64, 0)[i % 5] if R == 64 else R for i in range(L)], dtype=torch.int32)
    lora_a = torch.randn(L, len(widths), R, H, generator=gen) / H ** 0.5
    lora_b = torch.randn(L, N, R, generator=gen) / R ** 0.5
    for slot, r in enumerate(ranks.tolist()):
        lora_a[slot, :, r:] = 0
        lora_b[slot, :, r:] = 0
    x = torch.randn(T, H, generator=gen).to(dev, bf)
    y0 = torch.randn(T, N, generator=gen).to(dev, bf)
    lora_a, lora_b, ranks = lora_a.to(dev, bf), lora_b.to(dev, bf), ranks.to(dev)
    offsets = torch.tensor([0] + torch.tensor(widths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    token_slot = torch.tensor(slots_of(T), dtype=torch.int32, device=dev)
    scale = shift = scale_on = None
    if dora:   # every other slot plain LoRA (g = 1, flag 0)
        scale = (1 + 0.2 * torch.randn(L, N, generator=gen)).to(dev)
        shift = (0.1 * torch.randn(L, N, generator=gen)).to(dev)
        scale_on = (torch.arange(L) % 2).to(dev, torch.int32)
        scale[scale_on == 0] = 1
        shift[scale_on == 0] = 0
    meta = LoRAMetaBuilder(T, L, dev).build(token_slot)
    kw = dict(scale=scale, shift=shift, scale_on=scale_on)
    with without_dense_paths():
        monkeypatch.setattr("loraserve.kernels.lora_seg.SEG_ENABLED", True)   # (the context turned it off)
        path, shape, _ = choose_path(x, lora_a, lora_b, meta)
        assert path == "seg", path
        buf = torch.empty(shape, dtype=torch.float32, device=dev)
        with warnings.catch_warnings(record=True) as fallbacks:
            warnings.simplefilter("always")
            y_eager = lora_apply(x, y0.clone(), lora_a, lora_b, offsets, meta, ranks, buf, **kw)
            y_again = lora_apply(x, y0.clone(), lora_a, lora_b, offsets, meta, ranks, buf, **kw)
            y_graph = y0.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                lora_apply(x, y_graph, lora_a, lora_b, offsets, meta, ranks, buf, **kw)
            y_graph.copy_(y0)
            graph.replay()
            torch.cuda.synchronize()
    failed = [str(w.message) for w in fallbacks if "segment-tiled LoRA kernels failed" in str(w.message)]
    assert not failed, f"the seg kernels fell back to the tile kernels, so this case tested those: {failed}"
    assert torch.equal(y_eager, y_again), "two eager runs differ"
    assert torch.equal(y_graph, y_eager), "graph replay != eager on the seg path"
    ref = reference(x, lora_a, lora_b, offsets, ranks, token_slot, y0, scale, shift)
    torch.testing.assert_close(y_eager.double(), ref.to(bf).double(), **TOLERANCES[torch.bfloat16])
    untouched = (token_slot < 0) | (ranks[token_slot.clamp(min=0).long()] == 0)
    assert torch.equal(y_eager[untouched], y0[untouched]), "a row without an adapter changed"
    assert not torch.equal(y_eager[~untouched], y0[~untouched]), "nothing added"
    return y_eager
