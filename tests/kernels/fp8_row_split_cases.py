"""kernels/fp8_row_split.py against the one-program-per-row kernels (kernels/fp8_norm_quant.py) and the torch
references, in a TRITON_INTERPRET=1 worker on the CPU and imported by the GPU tests (device="cuda"). Each function
sets LORASERVE_FP8_ROW_SPLIT(_CHUNK) itself and raises AssertionError on a mismatch."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .fp8_norm_quant_cases import DTYPES, _codes_match


@contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: str(v) for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _counters_zero(device) -> None:
    from loraserve.kernels.fp8_row_split import _counters

    assert int(_counters(torch.device(device)).abs().sum()) == 0, "a row's arrival counter was left non-zero"


def check_silu_split(dtype: str, t: int, i: int, chunk: int, device: str = "cpu") -> None:
    """silu_mul_quant over row chunks == the one-program-per-row kernel bit for bit (out, codes, scales), twice in a
    row (the counters reset themselves), and close to silu_and_mul_ref."""
    from loraserve.kernels.activation import silu_and_mul_ref
    from loraserve.kernels.fp8_norm_quant import silu_mul_quant
    from loraserve.kernels.fp8_row_split import row_split_on

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(t * 100 + i)
    gate_up = (torch.randn(t, 2 * i + 6, generator=g) * 3).to(device, dt)[:, 3:3 + 2 * i]   # strided rows
    gate_up[0, : i // 3] *= 40   # one row whose amax sits in its first chunk
    with _env(LORASERVE_FP8_ROW_SPLIT="0"):
        out0, q0, s0 = silu_mul_quant(gate_up)
    with _env(LORASERVE_FP8_ROW_SPLIT="silu", LORASERVE_FP8_ROW_SPLIT_CHUNK=chunk):
        assert row_split_on("silu", t) and not row_split_on("norm", t)
        for _ in range(2):
            out, q, s = silu_mul_quant(gate_up)
            assert torch.equal(out, out0) and torch.equal(s, s0), "split silu_mul_quant != the row kernel"
            assert torch.equal(q.float(), q0.float()), "split codes != the row kernel's"
            _counters_zero(device)
    ref = silu_and_mul_ref(gate_up.float()).to(dt)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2 if dt != torch.float32 else 1e-5, atol=2e-2)
    _codes_match(q, s, out, device)


def check_norm_split(dtype: str, t: int, h: int, chunk: int, kind: str, device: str = "cpu") -> None:
    """The split norm + codes (kind: 'plain' = rms_norm_quant without residual, 'residual' = with, 'partials' =
    splitk_add_rms_norm from 2 split-K partials, 'row_scale' = from a unit-scale GEMM's [1, T, H] + x_scale): the
    residual equal to the row kernel's bit for bit (same elementwise math), out within one rounding of the torch
    reference and of the row kernel (the sum of squares is added chunk by chunk), the codes per_token_quant_fp8's."""
    from loraserve.kernels.fp8_norm_quant import rms_norm_quant, splitk_add_rms_norm
    from loraserve.kernels.rmsnorm import fused_add_rms_norm_ref, rms_norm_ref

    dt, g = DTYPES[dtype], torch.Generator().manual_seed(t * 10 + h)
    w = (torch.rand(h, generator=g) + 0.5).to(device, dt)
    r = torch.randn(t, h, generator=g).to(device, dt)
    if kind in ("plain", "residual"):
        x = (torch.randn(t, h, generator=g) * torch.logspace(-2, 1, t)[:, None]).to(device, dt)

        def run(res):
            return rms_norm_quant(x, res, w, 1e-5)
        res_in = r if kind == "residual" else None
        ref_res = r.clone() if kind == "residual" else None
        ref = fused_add_rms_norm_ref(x.clone(), ref_res, w, 1e-5)[0] if kind == "residual" else rms_norm_ref(x, w, 1e-5)
    else:
        splits = 2 if kind == "partials" else 1
        ws = (torch.randn(splits, t, h, generator=g) * 30).to(device)
        s = (torch.rand(h, generator=g) * 0.01).to(device)
        xs = (torch.rand(t, 1, generator=g) + 0.5).to(device) if kind == "row_scale" else None

        def run(res):
            return splitk_add_rms_norm(ws, s, res, w, 1e-5, xs, True)
        y = ws.sum(0) if splits == 1 else ws[0] + ws[1]
        y = y * xs if xs is not None else y
        res_in, ref_res = r, r.clone()
        ref = fused_add_rms_norm_ref((y * s).to(dt), ref_res, w, 1e-5)[0]
    r_row = r.clone()
    with _env(LORASERVE_FP8_ROW_SPLIT="0"):
        out0, res0, q0, s0 = run(r_row if res_in is not None else None)
    with _env(LORASERVE_FP8_ROW_SPLIT="norm", LORASERVE_FP8_ROW_SPLIT_NORM_CHUNK=chunk):
        for _ in range(2):   # twice: the counters reset themselves (the residual from a fresh copy each time)
            r_split = r.clone()
            out, res, q, sc = run(r_split if res_in is not None else None)
            _counters_zero(device)
    if res_in is not None:
        assert res is r_split and torch.equal(r_split, r_row), "residual differs from the row kernel's"
        assert torch.equal(r_split, ref_res), "residual not updated as x + residual"
    else:
        assert res is None
    tol = dict(rtol=1e-2, atol=1e-2) if dt != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(out.float(), out0.float(), **tol)
    ulp = (out.float() - out0.float()).abs() / out0.float().abs().clamp_min(1e-6)
    assert float(ulp.max()) <= (2.0 ** -7 if dt == torch.bfloat16 else 2.0 ** -10 if dt == torch.float16 else 1e-6), \
        f"split norm further than one rounding from the row kernel: rel {float(ulp.max())}"
    _codes_match(q, sc, out, device)


def check_attention_quant_out(batch_name: str, H: int, KVH: int, D: int, BS: int, dtype_name: str,
                              num_splits: int | None = None, device: str = "cpu") -> None:
    """unified_attention(..., quant_out=[codes, scale, counters]) over an e4m3 cache: out bit for bit as without it,
    codes and scales per_token_quant_fp8(out.view(N, H * D))'s bit for bit (folded into the epilogue at unsplit decode
    launches, by the quantization launch otherwise), counters left zero; twice (graph replays reuse the counters)."""
    from loraserve.kernels.fp8_gemm import FP8, per_token_quant_fp8
    from loraserve.kernels.unified_attention import unified_attention

    from . import unified_attention_cases as ua
    from .fp8_attention_cases import make_fp8_problem

    dtype = getattr(torch, dtype_name)
    batch = ua.BATCHES[batch_name]
    q, k, v, tables, lens, qsl, ks, vs = make_fp8_problem(batch, H, KVH, D, BS, dtype, 3, device)
    N = q.shape[0]
    max_q = max(ql for ql, _ in batch)
    plain = unified_attention(q, k, v, tables, lens, qsl, max_q, D ** -0.5, num_splits=num_splits, k_scale=ks,
                              v_scale=vs)
    cnt = torch.zeros(64, dtype=torch.int32, device=device)
    for _ in range(2):
        quant = [torch.full((N, H * D), 7.0, device=device).to(FP8), torch.zeros(N, 1, device=device), cnt]
        codes_in = quant[0]
        out = unified_attention(q, k, v, tables, lens, qsl, max_q, D ** -0.5, num_splits=num_splits, k_scale=ks,
                                v_scale=vs, quant_out=quant)
        assert torch.equal(out, plain), "quant_out changed the attention output"
        # folded (the epilogue filled the caller's buffer) exactly where expected: unsplit decode launches
        assert (quant[0] is codes_in) == (max_q == 1 and num_splits == 1), "fold taken / not taken unexpectedly"
        q_ref, s_ref = per_token_quant_fp8(out.reshape(N, H * D))
        assert torch.equal(quant[1], s_ref), f"scales differ: {quant[1].flatten()[:4]} vs {s_ref.flatten()[:4]}"
        assert torch.equal(quant[0].float(), q_ref.float()), "codes differ from per_token_quant_fp8(out)"
        assert int(cnt.abs().sum()) == 0, "a token's counter was left non-zero"


def check_attend_quant_glue() -> None:
    """models/fp8_fused.attend_quant (the engine's call, _prequant_ok forced: on the CPU no FP8 GEMM quantizes) on a
    decode Context as the engine builds it: o == _kernel_attention's, the codes riding on o == per_token_quant_fp8(o),
    filled by the attention's epilogue; off without the switch or on a step that is not decode-only."""
    from types import SimpleNamespace

    from loraserve.inference import attention as attn_mod
    from loraserve.inference.context import Context
    from loraserve.inference.models import fp8_fused
    from loraserve.inference.models.fp8 import PREQUANT_ATTR
    from loraserve.kernels.fp8_gemm import per_token_quant_fp8

    from . import unified_attention_cases as ua
    from .fp8_attention_cases import make_fp8_problem

    H, KVH, D, BS = 8, 2, 16, 16
    batch = ua.BATCHES["decode"]
    q, k, v, tables, lens, qsl, ks, vs = make_fp8_problem(batch, H, KVH, D, BS, torch.float16, 5, "cpu")
    attn = SimpleNamespace(tp=None, k_cache=k, v_cache=v, scale=D ** -0.5, o_proj=None)

    def ctx():
        return Context(block_tables=tables, context_lens=lens, context_lens_list=lens.tolist(), decode_only=True,
                       query_lens=[1] * len(batch), max_seq_len=int(lens.max()))
    plain = attn_mod._kernel_attention(q, k, v, ctx(), D ** -0.5, ks, vs).reshape(q.shape[0], -1)
    saved = fp8_fused._prequant_ok
    fp8_fused._prequant_ok = lambda x, proj, tp: True
    try:
        with _env(LORASERVE_FP8_ATTN_QUANT="0"):
            assert fp8_fused.attend_quant(attn, q, ctx(), ks, vs) is None
        with _env(LORASERVE_FP8_ATTN_QUANT="1"):
            mixed = ctx()
            mixed.decode_only = False
            assert fp8_fused.attend_quant(attn, q, mixed, ks, vs) is None
            o = fp8_fused.attend_quant(attn, q, ctx(), ks, vs)
    finally:
        fp8_fused._prequant_ok = saved
    assert o is not None and "attn_quant" not in fp8_fused._BROKEN, "attend_quant fell back"
    assert torch.equal(o, plain), "attend_quant's o != _kernel_attention's"
    codes, scale = getattr(o, PREQUANT_ATTR)
    q_ref, s_ref = per_token_quant_fp8(o)
    assert torch.equal(scale, s_ref) and torch.equal(codes.float(), q_ref.float()), "codes != per_token_quant_fp8(o)"
