"""FP8 weights under tensor parallelism (CPU, 2 ranks over gloo, fp32 compute, weight-only emulation).

Quantized at load, every rank quantizes its own shard per output row: column-parallel q/k/v and
gate/up get the same codes and scales as one device would; row-parallel o and down hold half of each
row, so each rank's half gets its own scale. The reference is transformers with exactly those
dequantized weights. An FP8 checkpoint is only sliced (codes and per-row scales as stored), so TP=2
must equal TP=1 on it token for token.
"""
from __future__ import annotations

import copy

import torch

from loraserve import LLM, SamplingParams

from .test_engine_vs_hf import hf_greedy

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 57)), [3] * 17]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
FP8 = {"quant_algo": "FP8"}


def _qdq(w: torch.Tensor) -> torch.Tensor:
    from loraserve.inference.models.fp8 import dequantize, quantize_per_channel

    q, s = quantize_per_channel(w)
    return dequantize(q, s[:, None], torch.float32)


def _sharded_fp8_reference(base, size: int = 2):
    """transformers model whose projections hold what `size` ranks serve: column-parallel weights
    quantized per row (sharding rows changes nothing), row-parallel ones per row of each rank's columns."""
    hf = copy.deepcopy(base)
    with torch.no_grad():
        for blk in hf.model.layers:
            for lin in (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj,
                        blk.mlp.gate_proj, blk.mlp.up_proj):
                lin.weight.copy_(_qdq(lin.weight.float()))
            for lin in (blk.self_attn.o_proj, blk.mlp.down_proj):
                cols = lin.weight.shape[1] // size
                lin.weight.copy_(torch.cat([_qdq(lin.weight[:, r * cols:(r + 1) * cols].float())
                                            for r in range(size)], dim=1))
    return hf


def _tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_tp2_quantized_at_load_equals_transformers_on_the_sharded_codes(tiny_llama):
    path, base = tiny_llama
    ref_model = _sharded_fp8_reference(base)
    refs = [hf_greedy(ref_model, p, GREEDY.max_tokens)[0] for p in PROMPTS]
    llm = LLM(model=path, dtype="float32", device="cpu", tensor_parallel_size=2, quant_config=FP8)
    try:
        layer = llm.engine.model.layers[1]   # rank 0's shard (this process)
        assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
        ref_layer = ref_model.model.layers[1]
        o, down = ref_layer.self_attn.o_proj.weight, ref_layer.mlp.down_proj.weight
        # row-parallel: rank 0 holds the first half of every row, quantized with that half's own scale
        assert torch.equal(layer.self_attn.o_proj.dequantized_weight(), o[:, :o.shape[1] // 2])
        assert torch.equal(layer.mlp.down_proj.dequantized_weight(), down[:, :down.shape[1] // 2])
        assert not torch.equal(o[:, :o.shape[1] // 2], _qdq(base.model.layers[1].self_attn.o_proj.weight.float())[
            :, :o.shape[1] // 2]), "half-row scales equal whole-row ones here: the check would be vacuous"
        gate = ref_layer.mlp.gate_proj.weight
        assert torch.equal(layer.mlp.gate_up_proj.dequantized_weight()[:gate.shape[0] // 2], gate[:gate.shape[0] // 2])
        got = _tokens(llm)
    finally:
        llm.engine.runner.shutdown()
    assert got == refs


def test_tp2_on_an_fp8_checkpoint_equals_tp1(tiny_llama, tmp_path):
    from scripts.quantize_fp8 import convert

    path, _ = tiny_llama
    ckpt = str(tmp_path / "fp8")
    assert convert(path, ckpt) > 0
    tp1 = _tokens(LLM(model=ckpt, dtype="float32", device="cpu"))
    llm = LLM(model=ckpt, dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        o_proj = llm.engine.model.layers[0].self_attn.o_proj
        assert o_proj.weight.dtype == torch.float8_e4m3fn
        tp2 = _tokens(llm)
    finally:
        llm.engine.runner.shutdown()
    assert tp2 == tp1
