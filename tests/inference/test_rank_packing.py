"""Rank packing (slots.py, LORASERVE_RANK_PACKING): adapters take GPU slot rows by their own rank.

The LoRA delta of a mixed-rank batch read through the packed slots equals a pure-torch
computation from the adapters' own A and B (torch reference path here; the Triton kernels
under TRITON_INTERPRET=1 in a worker, and on a GPU); the block allocator never lets two adapters
share a row, charges a rank-r adapter ceil_pow2(r / granule) granules, and never evicts a
pinned adapter.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.interpreter import interpreter_pool

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (2, 8, 16, 5, 4, 16, 1, 12)


def small_args(layers: int = 2):
    from loraserve.inference.models.llama import ModelArgs

    return ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                     max_position_embeddings=256, tie_word_embeddings=False, attention_bias=False,
                     model_type="llama", torch_dtype="float32", eos_token_id=[1], bos_token_id=0,
                     num_hidden_layers=layers)


def make_adapter(args, rank: int, seed: int, dtype: torch.dtype):
    from loraserve.adapters import LoraAdapter

    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(args.num_hidden_layers):
        for m, (fan_in, fan_out) in args.lora_module_shapes().items():
            weights[(layer, m)] = ((torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5).to(dtype),
                                   (torch.randn(fan_out, rank, generator=g) * 0.1).to(dtype))
    return LoraAdapter(format="hf", rank=rank, alpha=float(rank), use_rslora=False, target_modules=sorted(ALL),
                       num_layers=args.num_hidden_layers, weights=weights, digest=f"sha256:{seed:064x}")


def handle_for(adapter, i: int):
    from loraserve.inference.lora.holds import AdapterHandle

    return AdapterHandle(adapter.digest, f"a{i}", i, adapter, adapter.nbytes(), adapter.rank)


def tier(args, packed: bool, num_slots: int, device: str, dtype: torch.dtype, max_rank: int = 16):
    from loraserve.inference.lora.device_tier import DeviceTier
    from loraserve.inference.lora.slots import DeviceSlots

    slots = DeviceSlots(args, set(ALL), num_slots, max_rank, dtype, torch.device(device), packed=packed)
    return DeviceTier(slots)


def packed_delta_error(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Largest |lora_apply through packed slots - a pure-torch delta from the adapters' A and B| over
    every projection of a 2-layer model, for a batch mixing 8 adapters of ranks 1..16 and rows with
    none; raises if the packed slots are not smaller than max-rank slots."""
    from loraserve.inference.models.llama import PROJ_SLICES
    from loraserve.kernels import LoRAMetaBuilder, lora_apply

    torch.manual_seed(0)
    args = small_args()
    adapters = [make_adapter(args, r, 100 + i, dtype) for i, r in enumerate(RANKS)]
    packed = tier(args, True, 32, device, dtype)
    assert packed.slots.granule == 8 and packed.slots.packed
    handles = [handle_for(a, i) for i, a in enumerate(adapters)]
    for h in handles:
        assert packed.place(h), "32 granules of 8 rows hold these 8 adapters (11 granules)"
    if device == "cuda":
        torch.cuda.synchronize()
    shapes = args.lora_module_shapes()
    T = 19
    which = [(t * 5) % (len(adapters) + 1) - 1 for t in range(T)]            # -1: no adapter
    token_slot = torch.tensor([-1 if j < 0 else handles[j].slot for j in which], dtype=torch.int32, device=device)
    meta = LoRAMetaBuilder(T, packed.slots.num_slots, device).build(token_slot)
    worst = 0.0
    for layer in range(args.num_hidden_layers):
        for proj, modules in PROJ_SLICES.items():
            in_f = shapes[modules[0]][0]
            x = torch.randn(T, in_f, device=device).to(dtype)
            n_out = sum(shapes[m][1] for m in modules)
            y = torch.randn(T, n_out, device=device).to(dtype)
            want = y.float().clone()
            for t, j in enumerate(which):
                off = 0
                for m in modules:
                    a, b = adapters[j].weights[(layer, m)] if j >= 0 else (None, None)
                    if a is not None:
                        want[t, off:off + b.shape[0]] += (x[t].float().cpu() @ a.float().T @ b.float().T).to(device)
                    off += shapes[m][1]
            s = packed.slots
            lora_apply(x, y, s.a[proj][layer], s.b[proj][layer], s.slice_offsets[proj], meta, s.ranks,
                       scale=s.scale[proj][layer])
            worst = max(worst, float((y.float() - want).abs().max()))
    return worst


def test_packed_slots_give_the_reference_delta():
    assert packed_delta_error("cpu", torch.float32) < 1e-4


@pytest.fixture(scope="module")
def interp():
    from tests.kernels.interpreter import interpreting

    pytest.importorskip("triton")
    yield from interpreter_pool(interpreting)


def test_packed_slots_through_the_triton_kernels_interpreted(interp):
    assert interp.submit(packed_delta_error, "cpu", torch.float32).result(timeout=600) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_slots_through_the_triton_kernels_on_the_gpu():
    assert packed_delta_error("cuda", torch.bfloat16) < 0.05   # bf16 inputs and outputs, fp32 accumulation


def test_blocks_by_rank_never_overlap_and_pinned_adapters_stay():
    args = small_args(1)
    t = tier(args, True, 16, "cpu", torch.float32)     # 16 granules of 8 rows (max_rank 16: 2 a slot)
    spans = {r: t.slots.span(r) for r in (1, 8, 9, 16)}
    assert spans == {1: 1, 8: 1, 9: 2, 16: 2}
    hs = [handle_for(make_adapter(args, r, i, torch.float32), i) for i, r in enumerate([16] * 8)]
    for h in hs:
        assert t.place(h)
    assert sorted(h.slot for h in hs) == list(range(0, 16, 2))   # aligned blocks, all used
    for h in hs[:7]:
        t.pin(h)
    idle_block = hs[7].slot
    small = handle_for(make_adapter(args, 8, 50, torch.float32), 50)
    assert t.place(small) and small.slot == idle_block and hs[7].slot is None   # the one idle block went
    other = handle_for(make_adapter(args, 4, 51, torch.float32), 51)
    assert t.place(other) and other.slot == idle_block + 1                      # the freed block's other half
    t.pin(small)
    t.pin(other)
    big = handle_for(make_adapter(args, 16, 52, torch.float32), 52)
    assert not t.place(big)                                                      # every block holds a pin
    t.unpin(hs[0])
    hs[0].num_requests = 0
    assert t.place(big) and big.slot == 0 and hs[0].slot is None
    live = [h for h in t.owner if h is not None]
    rows = [set(range(h.slot, h.slot + t.slots.span(h.rank))) for h in live]
    assert sum(len(r) for r in rows) == len(set().union(*rows)), "two adapters share a granule"


def test_packed_tier_is_sized_in_granules():
    from loraserve.config import LoraConfig, PeftCacheConfig
    from loraserve.inference.lora import slots as slots_mod
    from loraserve.inference.lora.device_tier import num_device_slots

    args = small_args()
    lc, pc = LoraConfig(max_lora_rank=64, max_loras=2), PeftCacheConfig(num_device_module_layer=2 * 7 * 10)
    old = slots_mod.RANK_PACKING
    try:
        slots_mod.RANK_PACKING = False
        assert num_device_slots(lc, pc, args, set(ALL), 64, torch.float32, torch.device("cpu")) == 10
        slots_mod.RANK_PACKING = True   # same memory: 10 max-rank adapters = 80 granules of 8 rows
        assert num_device_slots(lc, pc, args, set(ALL), 64, torch.float32, torch.device("cpu")) == 80
        slots_mod.RANK_PACKING = None   # auto (the default): packed at max rank 64, max-rank slots at 16
        assert num_device_slots(lc, pc, args, set(ALL), 64, torch.float32, torch.device("cpu")) == 80
        assert slots_mod.slot_granule(64) == 8 and slots_mod.slot_granule(32) == 8
        assert slots_mod.slot_granule(16) == 16 and slots_mod.slot_granule(8) == 8
    finally:
        slots_mod.RANK_PACKING = old


def test_packing_falls_back_when_offsets_would_pass_int32():
    from loraserve.inference.lora.slots import _packing_fits_int32

    shapes = {"gate_proj": (4096, 14336), "up_proj": (4096, 14336)}
    assert _packing_fits_int32(shapes, {"gate_proj"}, 64_000)            # 28672 * 64000 < 2**31
    assert not _packing_fits_int32(shapes, {"gate_proj"}, 80_000)        # the expand's n * stride_bn would wrap
    args = small_args(1)
    t = tier(args, True, 8, "cpu", torch.float32)
    assert t.slots.packed and t.slots.num_slots == 8
