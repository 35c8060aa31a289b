"""DeviceSlots._bulk_copy (one host->GPU copy of an adapter's block, then one strided copy per
module and factor) leaves every slot exactly as the per-(layer, module) copies do. Run on the CPU
with the pinned-memory check replaced (pinned memory needs CUDA); test_cold_path_gpu.py checks
real pinned blocks on the GPU."""
from __future__ import annotations

import pytest
import torch

from loraserve.inference.lora import slots as slots_mod
from tests.inference.test_rank_packing import ALL, small_args


class FakeStream:
    pass


def one_block_weights(args, ranks: dict, layers=None, dtype=torch.float32, seed=0, text_order=True):
    """{(layer, module): (A, B)} as views of ONE buffer, in a safetensors file's order (sorted keys:
    layer by layer, modules interleaved), with a header-like gap in front."""
    g = torch.Generator().manual_seed(seed)
    shapes = args.lora_module_shapes()
    layers = range(args.num_hidden_layers) if layers is None else layers
    keys = sorted(((l, m) for l in layers for m in ranks),   # a file's order: keys as text (layer 10 < 2)
                  key=lambda k: (str(k[0]), k[1]) if text_order else k)
    sizes = [ranks[m] * (shapes[m][0] + shapes[m][1]) for _, m in keys]
    buf = torch.randn(24 + sum(sizes), generator=g).to(dtype)
    out, o = {}, 24
    for (l, m) in keys:
        r, (n_in, n_out) = ranks[m], shapes[m]
        a = buf[o:o + r * n_in].view(r, n_in)
        o += r * n_in
        b = buf[o:o + n_out * r].view(n_out, r)
        o += n_out * r
        out[(l, m)] = (a, b)
    return out


class Adapter:
    def __init__(self, weights, rank):
        self.weights, self.rank = weights, rank


@pytest.mark.parametrize("packed,text_order", [(False, True), (True, True), (False, False)])
def test_bulk_copy_matches_per_tensor_copies(monkeypatch, packed, text_order):
    from loraserve.inference.lora.slots import DeviceSlots

    monkeypatch.setattr(slots_mod, "_is_pinned", lambda t: True)
    args = small_args(12)
    ranks = {"q_proj": 8, "v_proj": 8, "gate_proj": 4, "down_proj": 8, "k_proj": 2}
    w = one_block_weights(args, ranks, text_order=text_order)
    made = [DeviceSlots(args, set(ALL), 8, 16, torch.float32, torch.device("cpu"), packed=packed) for _ in range(2)]
    bulk, plain = made
    bulk.copy_stream = FakeStream()
    assert bulk._bulk_copy(3, w)
    for (layer, module), (a, b) in w.items():   # the reference: the per-(layer, module) copies
        proj, s, off = plain.slice_index[module]
        plain.a[proj][layer, 3, s, :a.shape[0]].copy_(a)
        plain.b[proj][layer, 3, off:off + b.shape[0], :a.shape[0]].copy_(b)
    for proj in bulk.a:
        assert torch.equal(bulk.a[proj][:, 3], plain.a[proj][:, 3]) and torch.equal(bulk.b[proj][:, 3], plain.b[proj][:, 3])
        assert bulk.a[proj][:, 3].abs().sum() > 0 or proj == "o_proj"


def test_bulk_copy_declines_what_it_cannot_do_in_one_pass(monkeypatch):
    from loraserve.inference.lora.slots import DeviceSlots

    monkeypatch.setattr(slots_mod, "_is_pinned", lambda t: True)
    args = small_args(3)
    s = DeviceSlots(args, set(ALL), 4, 16, torch.float32, torch.device("cpu"))
    s.copy_stream = FakeStream()
    gap = one_block_weights(args, {"q_proj": 8}, layers=[0, 2])          # layer 1 missing
    assert not s._bulk_copy(0, gap)
    w = one_block_weights(args, {"q_proj": 8})
    w[(1, "q_proj")] = (w[(1, "q_proj")][0].clone(), w[(1, "q_proj")][1])   # one factor in another block
    assert not s._bulk_copy(0, w)
    w = one_block_weights(args, {"q_proj": 8})
    w[(2, "q_proj")] = (w[(2, "q_proj")][0][:4], w[(2, "q_proj")][1][:, :4])   # one layer of another rank
    assert not s._bulk_copy(0, w)
    mixed = one_block_weights(args, {"q_proj": 8}, dtype=torch.float16)   # not the serving dtype
    assert not s._bulk_copy(0, mixed)
    assert torch.count_nonzero(s.a["qkv_proj"]) == 0                       # nothing was written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("text_order", [True, False])
def test_bulk_copy_on_the_gpu_from_a_pinned_block(text_order):
    from loraserve.inference.lora.slots import DeviceSlots

    args = small_args(12)
    ranks = {"q_proj": 8, "v_proj": 8, "gate_proj": 4, "down_proj": 8, "k_proj": 2}
    host = one_block_weights(args, ranks, dtype=torch.bfloat16, text_order=text_order)
    block = next(iter(host.values()))[0]
    pinned = torch.empty(block.untyped_storage().nbytes() // 2, dtype=torch.bfloat16, pin_memory=True)
    pinned.copy_(torch.empty(0, dtype=torch.bfloat16).set_(block.untyped_storage(), 0, (pinned.numel(),), (1,)))
    base = block.untyped_storage().data_ptr()
    w = {k: tuple(pinned.as_strided(t.shape, t.stride(), (t.data_ptr() - base) // 2) for t in ab)
         for k, ab in host.items()}
    slots = DeviceSlots(args, set(ALL), 8, 16, torch.bfloat16, torch.device("cuda"))
    with torch.cuda.stream(slots.copy_stream):
        assert slots._bulk_copy(5, w)
    torch.cuda.synchronize()
    for (layer, module), (a, b) in host.items():
        proj, s, off = slots.slice_index[module]
        assert torch.equal(slots.a[proj][layer, 5, s, :a.shape[0]].cpu(), a)
        assert torch.equal(slots.b[proj][layer, 5, off:off + b.shape[0], :a.shape[0]].cpu(), b)
