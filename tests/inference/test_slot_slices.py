"""Merged A slices (slots.py, LORASERVE_LORA_MERGE_SLICES): a fused projection with only some modules enabled
(q_proj + v_proj of qkv_proj, as bench_churn serves) keeps an A slice per enabled module, the disabled
module's columns joining a neighbour slice with zero B rows. The delta through those slots equals a pure-torch
computation from the adapters' own A and B (torch reference path; the Triton kernels under the interpreter in
a worker; a GPU), the disabled module's columns get exactly nothing, and the slot is smaller."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.interpreter import interpreter_pool

from .test_rank_packing import handle_for, small_args

QV = {"q_proj", "v_proj"}
RANKS = (4, 16, 1, 8, 12)


def test_slices_per_enabled_module():
    from loraserve.inference.lora.slots import lora_slices

    qkv, outs = ("q_proj", "k_proj", "v_proj"), [64, 32, 32]
    assert lora_slices(qkv, outs, set(qkv)) == ([0, 64, 96, 128], {"q_proj": (0, 0), "k_proj": (1, 64),
                                                                    "v_proj": (2, 96)})
    # k's columns join the q slice (zero B rows there), v keeps its own
    assert lora_slices(qkv, outs, QV) == ([0, 96, 128], {"q_proj": (0, 0), "k_proj": (0, 64), "v_proj": (1, 96)})
    assert lora_slices(qkv, outs, {"v_proj"})[0] == [0, 128]
    assert lora_slices(qkv, outs, {"v_proj"})[1]["v_proj"] == (0, 96)
    assert lora_slices(qkv, outs, {"k_proj", "v_proj"}) == ([0, 96, 128], {"q_proj": (0, 0), "k_proj": (0, 64),
                                                                         "v_proj": (1, 96)})
    assert lora_slices(qkv, outs, QV, merge=False)[0] == [0, 64, 96, 128]


def qv_adapter(args, rank: int, seed: int, dtype: torch.dtype):
    from loraserve.adapters import LoraAdapter

    g = torch.Generator().manual_seed(seed)
    shapes = args.lora_module_shapes()
    weights = {(layer, m): ((torch.randn(rank, shapes[m][0], generator=g) / shapes[m][0] ** 0.5).to(dtype),
                            (torch.randn(shapes[m][1], rank, generator=g) * 0.1).to(dtype))
               for layer in range(args.num_hidden_layers) for m in sorted(QV)}
    return LoraAdapter(format="hf", rank=rank, alpha=float(rank), use_rslora=False, target_modules=sorted(QV),
                       num_layers=args.num_hidden_layers, weights=weights, digest=f"sha256:{seed:064x}")


def qv_delta_error(device: str = "cpu", dtype: torch.dtype = torch.float32, packed: bool = False) -> float:
    """Largest |lora_apply on qkv through q+v slots - the pure-torch delta| over 2 layers, mixed ranks, rows
    with no adapter; asserts 2 A slices and that k's columns are left exactly as they were."""
    from loraserve.inference.lora.device_tier import DeviceTier
    from loraserve.inference.lora.slots import DeviceSlots
    from loraserve.kernels import LoRAMetaBuilder, lora_apply

    torch.manual_seed(0)
    args = small_args()
    slots = DeviceSlots(args, QV, 32, 16, dtype, torch.device(device), packed=packed)
    assert slots.a["qkv_proj"].shape[2] == 2 and set(slots.a) == {"qkv_proj"}
    t = DeviceTier(slots)
    adapters = [qv_adapter(args, r, 200 + i, dtype) for i, r in enumerate(RANKS)]
    handles = [handle_for(a, i) for i, a in enumerate(adapters)]
    for h in handles:
        assert t.place(h)
    if device == "cuda":
        torch.cuda.synchronize()
    shapes = args.lora_module_shapes()
    (q_out, k_out, v_out), in_f = (shapes[m][1] for m in ("q_proj", "k_proj", "v_proj")), shapes["q_proj"][0]
    T = 23
    which = [(t * 3) % (len(adapters) + 1) - 1 for t in range(T)]          # -1: no adapter
    token_slot = torch.tensor([-1 if j < 0 else handles[j].slot for j in which], dtype=torch.int32, device=device)
    meta = LoRAMetaBuilder(T, slots.num_slots, device).build(token_slot)
    worst = 0.0
    for layer in range(args.num_hidden_layers):
        x = torch.randn(T, in_f, device=device).to(dtype)
        y0 = torch.randn(T, q_out + k_out + v_out, device=device).to(dtype)
        want = y0.float().cpu().clone()
        for t, j in enumerate(which):
            if j >= 0:
                for m, off in (("q_proj", 0), ("v_proj", q_out + k_out)):
                    a, b = adapters[j].weights[(layer, m)]
                    want[t, off:off + b.shape[0]] += x[t].float().cpu() @ a.float().T @ b.float().T
        y = y0.clone()
        lora_apply(x, y, slots.a["qkv_proj"][layer], slots.b["qkv_proj"][layer], slots.slice_offsets["qkv_proj"],
                   meta, slots.ranks, scale=slots.scale["qkv_proj"][layer])
        k_cols = slice(q_out, q_out + k_out)
        assert torch.equal(y[:, k_cols], y0[:, k_cols]), "the disabled k_proj columns moved"
        worst = max(worst, float((y.float().cpu() - want).abs().max()))
    return worst


@pytest.mark.parametrize("packed", [False, True])
def test_qv_slots_give_the_reference_delta(packed):
    assert qv_delta_error("cpu", torch.float32, packed) < 1e-4


def test_merged_slot_is_smaller_and_sized_as_allocated():
    from loraserve.inference.lora import slots as slots_mod

    args = small_args()
    merged = slots_mod.DeviceSlots.bytes_per_slot(args, QV, 16, torch.float32)
    s = slots_mod.DeviceSlots(args, QV, 4, 16, torch.float32, torch.device("cpu"), packed=False)
    assert merged * 4 == s.nbytes
    shapes = args.lora_module_shapes()
    k_a_bytes = args.num_hidden_layers * 16 * shapes["k_proj"][0] * 4
    assert merged == slots_mod.DeviceSlots.bytes_per_slot(args, {"q_proj", "k_proj", "v_proj"}, 16,
                                                          torch.float32) - k_a_bytes


@pytest.fixture(scope="module")
def interp():
    from tests.kernels.interpreter import interpreting

    pytest.importorskip("triton")
    yield from interpreter_pool(interpreting)


def test_qv_slots_through_the_triton_kernels_interpreted(interp):
    assert interp.submit(qv_delta_error, "cpu", torch.float32, True).result(timeout=600) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("packed", [False, True])
def test_qv_slots_through_the_triton_kernels_on_the_gpu(packed):
    assert qv_delta_error("cuda", torch.bfloat16, packed) < 0.05   # bf16 in and out, fp32 accumulation


def test_engine_with_q_and_v_enabled_matches_peft(tiny_llama, tmp_path):
    """End to end (CPU): lora_target_modules q_proj + v_proj (merged qkv slices), greedy tokens of a q+v
    adapter equal transformers + peft."""
    from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams

    from .test_multi_lora import peft_adapter_with_random_weights, peft_greedy

    path, base = tiny_llama
    d = str(tmp_path / "qv")
    model = peft_adapter_with_random_weights(base, d, seed=77, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    llm = LLM(model=path, dtype="float32", device="cpu",
              lora_config=LoraConfig(max_lora_rank=8, lora_target_modules=["q_proj", "v_proj"]))
    assert llm.engine.lora_manager.slots.a["qkv_proj"].shape[2] == 2
    prompt = list(range(30, 52))
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                       lora_request=[LoRARequest("qv", 1, d)])
    assert out[0].outputs[0].token_ids == peft_greedy(model, prompt, 8)
