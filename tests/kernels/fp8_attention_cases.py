"""Problems and checks for the attention kernels over an FP8 (e4m3, per-tensor scales) KV cache,
shared by the TRITON_INTERPRET=1 worker (test_attention_fp8.py) and the GPU tests.

The cache is built as the engine writes it: K / k_scale rounded to e4m3 by torch's own cast
(saturating at +-448). The reference is the existing fp32 reference run on the dequantized cache
(codes x scale), so the kernels' in-register dequantization is checked against torch arithmetic.
"""
from __future__ import annotations

import torch

from . import unified_attention_cases as ua

FP8 = torch.float8_e4m3fn
# K with an outlier channel (RoPE'd keys have some), V plain; the scales put the largest |x| at ~400
K_SPREAD, V_SPREAD = 2.0, 1.0


def quantize_cache(cache: torch.Tensor, scale: float) -> torch.Tensor:
    return (cache.float() / scale).clamp(-448.0, 448.0).to(FP8)


def make_fp8_problem(batch, H, KVH, D, BS, dtype, seed=0, device="cpu", index_dtype=torch.int32):
    """-> (q, k_cache_fp8, v_cache_fp8, tables, seq_lens, qsl, k_scale [1] fp32, v_scale [1] fp32)."""
    q, k, v, tables, lens, qsl = ua.make_problem(batch, H, KVH, D, BS, torch.float32, seed, "cpu", index_dtype)
    k = k * K_SPREAD
    k[..., 0] *= 3.0
    v = v * V_SPREAD
    k_scale, v_scale = float(k.abs().amax()) / 400.0, float(v.abs().amax()) / 400.0
    k_q, v_q = quantize_cache(k, k_scale), quantize_cache(v, v_scale)
    dev = dict(device=device)
    scales = [torch.tensor([s], dtype=torch.float32, **dev) for s in (k_scale, v_scale)]
    return (q.to(dtype).to(**dev), k_q.to(**dev), v_q.to(**dev), tables.to(**dev), lens.to(**dev), qsl.to(**dev),
            *scales)


def check_unified(batch_name: str, H: int, KVH: int, D: int, BS: int, dtype_name: str, seed: int = 0,
                  num_splits: int | None = None, device: str = "cpu", scales_as: str = "tensor",
                  check_wrong_scale: bool = True) -> None:
    from loraserve.kernels.unified_attention import unified_attention, unified_attention_ref

    dtype = getattr(torch, dtype_name)
    batch = ua.BATCHES[batch_name]
    q, k, v, tables, lens, qsl, ks, vs = make_fp8_problem(batch, H, KVH, D, BS, dtype, seed, device)
    # reference: the bf16-cache reference on the dequantized cache, in fp32
    ref = unified_attention_ref(q.float(), k.float() * ks, v.float() * vs, tables, lens, qsl, D ** -0.5)
    scales = (ks, vs) if scales_as == "tensor" else (float(ks), float(vs))
    out = unified_attention(q, k, v, tables, lens, qsl, max(ql for ql, _ in batch), D ** -0.5,
                            num_splits=num_splits, k_scale=scales[0], v_scale=scales[1])
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **ua.TOLERANCES[dtype])
    if not check_wrong_scale:  # (a second interpreter run is slow; some cases skip it)
        return
    # the scales matter: a kernel that ignored k_scale would fail this
    wrong = unified_attention(q, k, v, tables, lens, qsl, max(ql for ql, _ in batch), D ** -0.5,
                              num_splits=num_splits, k_scale=ks * 2, v_scale=vs)
    assert (wrong.float() - ref).abs().max() > 0.05


def check_decode(B: int, H: int, KVH: int, D: int, BS: int, dtype_name: str, seed: int = 0,
                 num_splits: int | None = None, device: str = "cpu") -> None:
    from loraserve.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 5 * BS + 1, (B,), generator=g)
    lens[0] = 1
    batch = [(1, int(L)) for L in lens]
    q, k, v, tables, lens_t, _, ks, vs = make_fp8_problem(batch, H, KVH, D, BS, dtype, seed, device)
    ref = paged_decode_attention_ref(q.float(), k, v, tables, lens_t, D ** -0.5, k_scale=ks, v_scale=vs)
    ref_deq = paged_decode_attention_ref(q.float(), k.float() * ks, v.float() * vs, tables, lens_t, D ** -0.5)
    torch.testing.assert_close(ref, ref_deq)   # the reference's own FP8 branch is the dequantized cache
    out = paged_decode_attention(q, k, v, tables, lens_t, D ** -0.5, num_splits=num_splits, k_scale=ks, v_scale=vs)
    tol = ua.TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref, **tol)
    wrong = paged_decode_attention(q, k, v, tables, lens_t, D ** -0.5, num_splits=num_splits, k_scale=ks, v_scale=vs * 2)
    assert (wrong.float() - ref).abs().max() > 0.05


def check_engine_store_and_read(batch_name: str, H: int, KVH: int, D: int, BS: int, seed: int = 0,
                                device: str = "cpu") -> None:
    """The engine's FP8 attention step (attention.paged_attention_fp8: quantize + slot write + read) on
    a batch whose last tokens are the step's, against the fp32 reference over the dequantized cache."""
    from loraserve.inference.attention import paged_attention_fp8
    from loraserve.inference.context import Context, prepare_attention, reset_context, set_context
    from loraserve.kernels.unified_attention import unified_attention_ref

    batch = ua.BATCHES[batch_name]
    q, k8, v8, tables, lens, qsl, ks, vs = make_fp8_problem(batch, H, KVH, D, BS, torch.float32, seed,
                                                           index_dtype=torch.long)
    # the step's new K/V (fp32, unquantized): rows of fresh values at each sequence's last Q positions
    g = torch.Generator().manual_seed(seed + 1)
    N = q.shape[0]
    k_new = torch.randn(N, KVH, D, generator=g) * K_SPREAD
    v_new = torch.randn(N, KVH, D, generator=g) * V_SPREAD
    slots = []
    for b, (ql, L) in enumerate(batch):
        for p in range(L - ql, L):
            slots.append(int(tables[b, p // BS]) * BS + p % BS)
    slot_mapping = torch.tensor(slots)
    # expected cache after the write, on CPU: the new rows quantized with the same scales (true division;
    # CUDA divides by a host scalar through its reciprocal, which could move a code by one step)
    k_exp, v_exp = k8.float().clone().view(-1, KVH, D), v8.float().clone().view(-1, KVH, D)
    k_exp[slot_mapping] = quantize_cache(k_new, float(ks)).float()
    v_exp[slot_mapping] = quantize_cache(v_new, float(vs)).float()
    k_exp, v_exp = k_exp.view(k8.shape), v_exp.view(v8.shape)
    ref = unified_attention_ref(q, k_exp * ks, v_exp * vs, tables, lens, qsl, D ** -0.5)
    q, k8, v8, tables, lens, qsl, ks, vs, k_new, v_new, slot_mapping = (
        t.to(device) for t in (q, k8, v8, tables, lens, qsl, ks, vs, k_new, v_new, slot_mapping))
    ctx = Context(slot_mapping=slot_mapping, query_lens=[ql for ql, _ in batch], context_lens=lens,
                  context_lens_list=lens.tolist(), block_tables=tables, decode_only=all(ql == 1 for ql, _ in batch))
    prepare_attention(ctx, q.device)
    set_context(ctx)
    try:
        out = paged_attention_fp8(q, k_new, v_new, k8, v8, D ** -0.5, ks, vs)
    finally:
        reset_context()
    assert torch.equal(k8.float().cpu(), k_exp) and torch.equal(v8.float().cpu(), v_exp)   # in place, same codes
    torch.testing.assert_close(out.float().cpu(), ref, rtol=1e-4, atol=1e-4)


def check_store(N: int, KVH: int, D: int, BS: int, dtype_name: str, seed: int = 0, device: str = "cpu") -> None:
    """kernels/kv_store.py against its torch reference: the same codes at the step's slots (k a strided
    view, as the split of the fused qkv projection gives), every other slot untouched."""
    from loraserve.kernels.kv_store import store_kv_fp8, store_kv_fp8_ref

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    num_blocks = N // BS + 3
    kv = (torch.randn(N, 3 * KVH * D, generator=g) * 3).to(dtype)   # [N, (q | k | v)] like a qkv output
    kv[0, KVH * D] = 1e4                                              # saturates at +448 codes
    k = kv[:, KVH * D:2 * KVH * D].view(N, KVH, D)
    v = kv[:, 2 * KVH * D:].view(N, KVH, D)
    slots = torch.randperm(num_blocks * BS, generator=g)[:N]
    ks, vs = torch.tensor([float(k.float().abs().amax()) / 1000]), torch.tensor([0.01])
    base = torch.randn(num_blocks, BS, KVH, D, generator=g).to(FP8)
    ref_k, ref_v = base.clone(), base.clone()
    store_kv_fp8_ref(k, v, ref_k, ref_v, slots, ks, vs)
    got_k, got_v = base.clone().to(device), base.clone().to(device)
    store_kv_fp8(k.to(device), v.to(device), got_k, got_v, slots.to(device), ks.to(device), vs.to(device))
    for got, ref in ((got_k.cpu(), ref_k), (got_v.cpu(), ref_v)):
        if device != "cpu":
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
            continue
        # Triton's interpreter (3.x) casts to float8 wrongly where rounding carries into the next power
        # of two (-124.6 at step 8 -> -64, not -128) and for subnormals: there the slots, strides and
        # scales are checked (90% of the codes exact, the rest within the interpreter's error)
        same = got.view(torch.uint8) == ref.view(torch.uint8)
        assert float(same.float().mean()) > 0.9
        torch.testing.assert_close(got.float(), ref.float(), rtol=0.5, atol=2.0 ** -6)
    assert float(ref_k.view(-1, KVH, D)[slots[0], 0, 0].float()) == 448.0
    assert float(got_k.view(-1, KVH, D)[slots[0].to(device), 0, 0].float()) == 448.0
