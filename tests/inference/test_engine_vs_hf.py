"""The engine against HF transformers (the independent reference): greedy tokens must be
identical and per-step logprobs/logits close, in fp32 on CPU, across architectures."""
from __future__ import annotations

import pytest
import torch

from loraserve import LLM, SamplingParams
from loraserve.inference.context import Context, reset_context, set_context, split_mixed

from tests.inference.conftest import make_random_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 57)), [3] * 17, [200, 100, 50, 25, 12, 6, 3]]


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])  # explicit mask: generate would take a BOS equal to pad_token_id for padding
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    # raw logits (generate's `scores` are after its logits processors)
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens)]
    return tokens, logprobs


CASES = {
    "llama": dict(kind="llama"),
    "llama-tied": dict(kind="llama", tie_word_embeddings=True),
    "llama-sharded": dict(kind="llama", shard=True),
    "llama3-rope": dict(kind="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-mha": dict(kind="llama", num_key_value_heads=4),
    "qwen2-bias": dict(kind="qwen2"),
    "mistral": dict(kind="mistral"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(tmp_path, case):
    kw = dict(CASES[case])
    hf = make_random_model(str(tmp_path), seed=1, **kw)
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ref_tokens, ref_logprobs = hf_greedy(hf, prompt, 10)
        assert out.outputs[0].token_ids == ref_tokens, f"{case}: prompt {prompt[:5]}..."
        assert out.outputs[0].finish_reason == "length"
        torch.testing.assert_close(torch.tensor(out.outputs[0].logprobs), torch.tensor(ref_logprobs),
                                   rtol=1e-4, atol=1e-4)


def test_prefill_logits_match_transformers(tiny_llama):
    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=16)
    runner = llm.engine.runner
    ids = list(range(30, 70))
    bs = runner.block_size
    blocks = list(range((len(ids) + bs - 1) // bs))
    ctx = Context(slot_mapping=torch.tensor([blocks[p // bs] * bs + p % bs for p in range(len(ids))]),
                  query_lens=[len(ids)], context_lens=torch.tensor([len(ids)]), context_lens_list=[len(ids)],
                  block_tables=torch.tensor([blocks]), decode_only=False)
    split_mixed(ctx, torch.device("cpu"))
    set_context(ctx)
    try:
        with torch.inference_mode():
            logits = llm.engine.model.compute_logits(llm.engine.model(torch.tensor(ids), torch.arange(len(ids))))
    finally:
        reset_context()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_num_tokens,num_kv_blocks", [(7, None), (64, 4), (5, 4)])
def test_chunked_prefill_and_preemption_keep_outputs(tiny_llama, max_num_tokens, num_kv_blocks):
    """A small token budget (chunked prefill) and a KV cache too small for the whole batch
    (preemption + recompute) must not change greedy outputs, nor lose a request."""
    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", max_num_tokens=max_num_tokens, num_kv_blocks=num_kv_blocks,
              kv_cache_config={"tokens_per_block": 16})
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    # with a tiny cache: four 15-token prompts fit one block each, then all need a second one
    prompts = PROMPTS if num_kv_blocks is None else [list(range(10 + i, 25 + i)) for i in range(4)] + [[7, 8]]
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)[0]
    if num_kv_blocks:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_unsupported_architecture_is_refused(tmp_path):
    import json

    make_random_model(str(tmp_path), "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        LLM(model=str(tmp_path), device="cpu")


def test_prefix_blocks_are_reused_and_outputs_unchanged(tiny_llama):
    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", kv_cache_config={"tokens_per_block": 16})
    bm = llm.engine.block_manager
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    shared = list(range(40, 80))  # 40 tokens: two full blocks to reuse
    first = llm.generate(shared + [5], params).outputs[0].token_ids
    assert bm.num_reused_blocks == 0
    second = llm.generate(shared + [6, 7], params).outputs[0].token_ids
    assert bm.num_reused_blocks == 2
    assert first == hf_greedy(hf, shared + [5], 8)[0]
    assert second == hf_greedy(hf, shared + [6, 7], 8)[0]
    again = llm.generate(shared + [5], params).outputs[0].token_ids  # blocks of generated tokens too
    assert again == first and bm.num_reused_blocks >= 4
    off = LLM(model=path, dtype="float32", device="cpu", kv_cache_config={"enable_block_reuse": False})
    assert off.generate(shared + [6, 7], params).outputs[0].token_ids == second
    assert off.engine.block_manager.num_reused_blocks == 0


@pytest.mark.skipif(not __import__("os").path.isfile(
    __import__("os").path.join(__import__("loraserve.inference.llm", fromlist=["x"]).default_model_path(), "config.json")),
    reason="embedded default model not built")
def test_default_model_matches_transformers():
    """The embedded default model (fp16 checkpoint, run in fp32 here) against transformers."""
    import transformers

    from loraserve.inference.llm import default_model_path

    path = default_model_path()
    llm = LLM(dtype="float32", device="cpu")  # no model given: the embedded default
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    prompts = ["def main():\n", "import os\nimport sys\n", "class Config:\n    def __init__(self", "# "]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1))
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt)
        tokens, logprobs = hf_greedy(hf, ids, 16)
        assert out.outputs[0].token_ids == tokens, prompt
        torch.testing.assert_close(torch.tensor(out.outputs[0].logprobs), torch.tensor(logprobs), rtol=1e-4, atol=1e-4)
        assert out.outputs[0].text == llm.tokenizer.decode(tokens)


def test_sliding_window_caps_context(tmp_path):
    """Mistral-style sliding-window attention equals full attention inside the window; the
    engine keeps every sequence inside it, so outputs stay exact."""
    hf = make_random_model(str(tmp_path), "mistral", seed=2, sliding_window=32)
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu")
    assert llm.engine.max_seq_len == 32
    out = llm.generate(list(range(20, 40)), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)).outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    assert out.token_ids == hf_greedy(hf, list(range(20, 40)), 12)[0]


def test_top_logprobs_match_transformers(tiny_llama):
    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu")
    prompt = list(range(20, 37))
    out = llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)).outputs[0]
    ids = torch.tensor([prompt])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, eos_token_id=None,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert len(out.top_logprobs) == 5
    for step, (top, logits) in enumerate(zip(out.top_logprobs, ref.logits)):
        values, idx = torch.topk(torch.log_softmax(logits[0].float(), -1), 3)
        assert list(top) == idx.tolist()
        torch.testing.assert_close(torch.tensor(list(top.values())), values, rtol=1e-4, atol=1e-4)
        assert out.token_ids[step] == idx[0].item() and out.logprobs[step] == pytest.approx(values[0].item(), abs=1e-4)
    plain = llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)).outputs[0]
    assert plain.top_logprobs is None and len(plain.logprobs) == 5
