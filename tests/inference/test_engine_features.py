"""Sampling, stopping, detokenization and streaming behaviour of the engine."""
from __future__ import annotations

import asyncio

import pytest

from loraserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=tiny_llama[0], dtype="float32", device="cpu")


def test_text_prompt_and_full_detokenization(llm):
    out = llm.generate("The quick brown", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    comp = out.outputs[0]
    assert comp.text == llm.tokenizer.decode(comp.token_ids)
    assert out.prompt_token_ids == llm.tokenizer.encode("The quick brown")


def test_incremental_detokenizer_handles_multibyte():
    from loraserve.inference.detokenizer import IncrementalDetokenizer
    import os
    import tempfile
    from tests.inference.conftest import make_tokenizer
    from loraserve.inference.detokenizer import TokenizerWrapper

    d = tempfile.mkdtemp()
    make_tokenizer(d)
    tok = TokenizerWrapper(d)
    text = "naïve café — 東京 🚀 ok"
    ids = tok.encode(text)
    prompt = tok.encode("x ")
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert os.path.isdir(d)


def test_stop_string_truncates_and_stream_never_shows_it(llm):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    full = llm.generate("def main", params).outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate("def main", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == full[: full.index(stop)]

    async def stream():
        pieces = []
        async for o in llm.generate_async("def main", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                                      stop=[stop])):
            pieces.append(o.outputs[0].text_diff)
            assert stop not in "".join(pieces)
        return pieces, o
    pieces, last = asyncio.run(stream())
    llm.shutdown()
    assert "".join(pieces) == comp.text and last.finished


def test_stop_token_ids_and_length(llm):
    ref = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).outputs[0]
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[ref.token_ids[2]])).outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[:3]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 8


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=123, ignore_eos=True)
    a = llm.generate([5, 6, 7], p).outputs[0].token_ids
    b = llm.generate([[9, 9], [5, 6, 7], [1, 2, 3, 4]], [SamplingParams(max_tokens=5, temperature=1.0), p,
                                                         SamplingParams(max_tokens=7)])[1].outputs[0].token_ids
    assert a == b
    greedy = llm.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)).outputs[0].token_ids
    assert llm.generate([5, 6, 7], SamplingParams(max_tokens=12, top_k=1, ignore_eos=True)).outputs[0].token_ids == greedy


def test_streaming_deltas_add_up_and_abort_frees_blocks(llm):
    async def run():
        final_stream = []
        async for o in llm.generate_async([5, 6, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)):
            final_stream.extend(o.outputs[0].token_ids_diff)
        agen = llm.generate_async([8, 9], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        async for o in agen:
            if len(o.outputs[0].token_ids) >= 3:
                break
        await agen.aclose()
        await asyncio.sleep(0.2)
        return final_stream
    tokens = asyncio.run(run())
    bm = llm.engine.block_manager
    llm.shutdown()
    assert tokens == llm.generate([5, 6, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)).outputs[0].token_ids
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,msg", [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                                        ({"top_p": 0}, "top_p")])
def test_bad_sampling_params(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([10**6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))


def test_failed_step_fails_only_its_requests(tiny_llama):
    from loraserve.inference.async_llm import EngineStepError

    llm = LLM(model=tiny_llama[0], dtype="float32", device="cpu")
    runner = llm.engine.runner
    real_run, calls = runner.run, {"n": 0}

    def flaky(batch, *prev):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated CUDA out of memory")
        return real_run(batch, *prev)

    runner.run = flaky

    async def run():
        with pytest.raises(EngineStepError, match="reference"):
            async for _ in llm.generate_async([5, 6, 7], SamplingParams(max_tokens=4, temperature=0)):
                pass
        outs = [o async for o in llm.generate_async([5, 6, 7], SamplingParams(max_tokens=4, temperature=0,
                                                                                ignore_eos=True))]
        return outs[-1]
    last = asyncio.run(run())
    llm.shutdown()
    assert last.finished and len(last.outputs[0].token_ids) == 4
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_n_completions_per_prompt(llm):
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True)
    out = llm.generate([5, 6, 7], p)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    singles = [llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=1.0, seed=7 + j,
                                                      ignore_eos=True)).outputs[0].token_ids for j in range(3)]
    assert [c.token_ids for c in out.outputs] == singles
    assert len({tuple(t) for t in singles}) > 1
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)


def test_unsupported_trtllm_options_are_refused_not_ignored():
    from loraserve.config import engine_config_from_kwargs

    with pytest.raises(ValueError, match="not supported"):
        engine_config_from_kwargs("m", quant_config={"quant_algo": "W4A16_AWQ"})  # FP8 is supported (issue 14)
    with pytest.raises(ValueError, match="not supported"):
        engine_config_from_kwargs("m", kv_cache_config={"dtype": "fp8"})
    with pytest.raises(ValueError, match="beam search"):
        engine_config_from_kwargs("m", max_beam_width=4)
    with pytest.raises(ValueError, match="unknown engine option"):
        engine_config_from_kwargs("m", lora_confg={})
    cfg = engine_config_from_kwargs("m", quant_config={"quant_algo": None}, backend="pytorch", max_batch_size=8)
    assert cfg.max_num_seqs == 8


def test_chat_uses_the_chat_template():
    from loraserve.inference.llm import default_model_path
    import os

    if not os.path.isfile(os.path.join(default_model_path(), "config.json")):
        pytest.skip("embedded default model not built")
    llm = LLM(dtype="float32", device="cpu")
    msgs = [{"role": "user", "content": "write a function"}]
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = llm.chat(msgs, p)
    text = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert "# user:" in text and text.endswith("# assistant:\n")  # the model's own template
    ids = llm.tokenizer.encode_chat(msgs)  # the template writes {{ bos_token }}: exactly one BOS (issue 13.3)
    assert out.prompt_token_ids == ids and ids.count(llm.tokenizer.bos_token_id) == 1
    assert out.outputs[0].token_ids == llm.generate(ids, p).outputs[0].token_ids
    assert len(llm.chat([msgs, msgs], p)) == 2
