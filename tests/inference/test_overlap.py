"""Issue 11: the overlapped loop (async_scheduling: step N+1 launched before step N's tokens are read,
decode inputs fed from the device) must give exactly what the serial loop gives: the same tokens,
text, logprobs, finish and stop reasons, under stop strings, stop ids, EOS, min_tokens, max_tokens,
max_seq_len, preemption, chunked prefill, prefix reuse, seeded sampling, aborts and failing rows.
Forced on here on CPU (its default is on for CUDA only)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from loraserve import LLM, SamplingParams

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 64, 23, 5, 31)]


def make(path: str, overlap: bool, **kw) -> LLM:
    llm = LLM(model=path, dtype="float32", device="cpu", async_scheduling=overlap, **kw)
    assert llm.engine.async_scheduling is overlap
    return llm


def as_tuple(out):
    c = out.outputs[0]
    top = None if c.top_logprobs is None else [sorted(t) for t in c.top_logprobs]
    floats = (c.logprobs or []) + [v for t in c.top_logprobs or [] for v in t.values()] + [c.cumulative_logprob]
    return (c.token_ids, c.text, c.finish_reason, c.stop_reason, top), floats


def assert_same(serial, overlapped):
    """Tokens, text and reasons exactly; logprobs to 1e-4 (the two loops batch rows differently, and a
    matmul's rounding depends on its row count)."""
    assert [r[0] for r in serial] == [r[0] for r in overlapped]
    for (_, a), (_, b) in zip(serial, overlapped):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)


def run_both(path, params, prompts=PROMPTS, **kw):
    res = []
    for overlap in (False, True):
        llm = make(path, overlap, **kw)
        res.append([as_tuple(o) for o in llm.generate(prompts, params)])
        eng = llm.engine
        assert not eng.has_unfinished_requests()
        assert eng.stats()["free_kv_blocks"] == eng.stats()["total_kv_blocks"]
    return res


@pytest.fixture(scope="module")
def serial_text(tiny_llama):
    llm = make(tiny_llama[0], False)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0,
                                                                             ignore_eos=True))]


def test_greedy_outputs_identical_with_stops(tiny_llama, serial_text):
    path = tiny_llama[0]
    stops = sorted({t[4:7] for t in serial_text if len(t) > 8})[:3]
    mixed = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2),
             SamplingParams(max_tokens=7, temperature=0),                                 # EOS may stop it
             SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stops),
             SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[40, 41, 42, 43, 44, 45]),
             SamplingParams(max_tokens=1, temperature=0),
             SamplingParams(max_tokens=24, temperature=0, min_tokens=10, stop_token_ids=list(range(0, 320, 3))),
             SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=7, logprobs=0),
             SamplingParams(max_tokens=20, temperature=1.0, top_k=20, seed=11, stop=stops)]
    serial, overlapped = run_both(path, mixed)
    assert_same(serial, overlapped)
    reasons = {r[0][2] for r in serial}
    assert "stop" in reasons and "length" in reasons           # both ways of ending were exercised
    assert len(serial[5][0][0]) >= 10                             # min_tokens held back the frequent stop ids


def test_identical_under_preemption_chunking_and_limits(tiny_llama):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    # 12 blocks of 16 tokens for 8 requests: preemptions; 24-token budget: prompts cut in chunks
    serial, overlapped = run_both(tiny_llama[0], params, num_kv_blocks=12, max_num_tokens=24, max_num_seqs=6)
    assert_same(serial, overlapped)
    serial, overlapped = run_both(tiny_llama[0], params, max_seq_len=70)    # max_seq_len ends the long prompt
    assert_same(serial, overlapped)
    assert serial[4][0][2] == "length" and len(serial[4][0][0]) == 70 - 64


def test_prefix_reuse_identical(tiny_llama):
    shared = list(range(100, 150))
    prompts = [shared + [7], shared + [8, 9], shared + [10]]
    serial, overlapped = run_both(tiny_llama[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                                  prompts=prompts)
    assert_same(serial, overlapped)


def _stream_and_abort(llm: LLM) -> tuple[list, list]:
    """Four streams; one is cancelled after 3 messages. Returns (finished outputs, the cancelled one's tokens)."""
    async def one(prompt, cancel_after=None):
        seen = []
        async for out in llm.generate_async(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)):
            seen.append(out)
            if cancel_after is not None and len(seen) == cancel_after:
                break
        return seen

    async def main():
        return await asyncio.gather(one(PROMPTS[0]), one(PROMPTS[1], cancel_after=3), one(PROMPTS[2]),
                                    one(PROMPTS[3]))
    results = asyncio.run(main())
    llm.shutdown()
    return [as_tuple(r[-1]) for i, r in enumerate(results) if i != 1], results[1][-1].outputs[0].token_ids


def test_stream_abort_identical(tiny_llama):
    serial = _stream_and_abort(make(tiny_llama[0], False))
    llm = make(tiny_llama[0], True)
    overlapped = _stream_and_abort(llm)
    assert_same(serial[0], overlapped[0])
    assert len(overlapped[1]) >= 3
    state = llm.engine.stats()
    assert state["running"] == state["waiting"] == 0 and state["free_kv_blocks"] == state["total_kv_blocks"]


def test_abort_while_step_in_flight(tiny_llama):
    """An abort between launch and post-processing: the in-flight token is dropped, blocks freed."""
    llm = make(tiny_llama[0], True)
    eng = llm.engine
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    eng.add_request("a", PROMPTS[0], p)
    eng.add_request("b", PROMPTS[1], p)
    assert eng.step() == []                     # launches the prefill; nothing read back yet
    assert eng.has_unfinished_requests()
    out = eng.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort" and -1 not in out.outputs[0].token_ids
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    assert "a" not in done and len(done["b"].outputs[0].token_ids) == 10
    assert eng.stats()["free_kv_blocks"] == eng.stats()["total_kv_blocks"]


@pytest.mark.parametrize("overlap", [False, True])
def test_non_finite_logits_fail_one_request_alone(tiny_llama, overlap):
    """Issue 9 item 2: NaN logits in one row (as an overflowing adapter produces) end that request
    with an error; its co-batched neighbours, including temperature=1e-38/1e-30 ones, finish normally."""
    from loraserve.inference.async_llm import EngineStepError

    llm = make(tiny_llama[0], overlap)
    model = llm.engine.model
    real = model.compute_logits
    poisoned = {"steps": 0}

    def fault_injected(hidden):   # fault injection: row 0 of the 3rd sampling step turns NaN
        logits = real(hidden)
        poisoned["steps"] += 1
        if poisoned["steps"] == 3:
            logits[0] = float("nan")
        return logits
    model.compute_logits = fault_injected
    params = [SamplingParams(max_tokens=8, temperature=t, seed=1, ignore_eos=True) for t in (0.7, 1e-38, 1e-30, 0)]

    async def one(prompt, p):
        last = None
        try:
            async for last in llm.generate_async(prompt, p):
                pass
        except EngineStepError as exc:
            return "error", str(exc), last
        return "ok", last.outputs[0].finish_reason, last

    async def main():
        return await asyncio.gather(*(one(PROMPTS[i], params[i]) for i in range(4)))
    results = asyncio.run(main())
    llm.shutdown()
    assert results[0][0] == "error" and "finite" in results[0][1]
    assert [r[:2] for r in results[1:]] == [("ok", "length")] * 3
    model.compute_logits = real
    greedy = llm.generate(PROMPTS[1:3], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for r, g in zip(results[1:3], greedy):   # tiny temperatures are greedy, with finite logprobs
        assert r[2].outputs[0].token_ids == g.outputs[0].token_ids
        assert torch.isfinite(torch.tensor(r[2].outputs[0].cumulative_logprob))


def test_slow_consumer_gets_coalesced_messages(tiny_llama):
    """Issue 11: a stream that falls behind gets one message with the union of what is queued
    (tokens and text in order, nothing lost), not one message per step."""
    llm = make(tiny_llama[0], False)
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=1)
    want = llm.generate(PROMPTS[2], p).outputs[0]

    async def slow():
        msgs = []
        async for out in llm.generate_async(PROMPTS[2], p):
            msgs.append(out.outputs[0])
            if len(msgs) == 1:
                await asyncio.sleep(1.0)     # the engine runs ahead meanwhile
        return msgs
    msgs = asyncio.run(slow())
    llm.shutdown()
    assert len(msgs) < 40 and max(len(m.token_ids_diff) for m in msgs) > 1
    assert [t for m in msgs for t in m.token_ids_diff] == want.token_ids == msgs[-1].token_ids
    assert "".join(m.text_diff for m in msgs) == want.text
    assert len(msgs[-1].top_logprobs) == 40


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [False, True])
def test_overlap_on_cuda_matches_serial_and_hf(tiny_llama, eager):
    """On CUDA the overlapped loop is the default: with CUDA graphs (decode inputs fed from the
    device buffer of the previous step) and eagerly, token-identical to the serial loop and to HF."""
    path, hf = tiny_llama
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = {}
    for overlap in (False, True):
        llm = LLM(model=path, dtype="float32", device="cuda", enforce_eager=eager, async_scheduling=overlap)
        outs[overlap] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, p)]
        assert llm.engine.stats()["free_kv_blocks"] == llm.engine.stats()["total_kv_blocks"]
        del llm
    assert outs[False] == outs[True]
    for prompt, toks in zip(PROMPTS[:3], outs[True]):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert toks == ref


@pytest.mark.parametrize("overlap", [False, True])
def test_stream_messages_built_off_the_engine_thread(tiny_llama, serial_text, overlap):
    """Issue 11: AsyncLLM builds the stream messages on the event loop (requests without stop strings
    detokenized there, lazily): every message's cumulative text is the concatenation of the diffs so far,
    and the last one equals what LLM.generate (built at once on the engine thread) returns, with and
    without stop strings, stop ids and logprobs."""
    path = tiny_llama[0]
    stops = sorted({t[4:7] for t in serial_text if len(t) > 8})[:2]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stops, logprobs=1),
              SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[int(PROMPTS[3][0]) + 7])]
    want = [o.outputs[0] for o in make(path, overlap).generate(PROMPTS[:3], params)]
    llm = make(path, overlap)

    async def stream(prompt, p):
        msgs = []
        async for out in llm.generate_async(prompt, p):
            msgs.append(out.outputs[0])
        return msgs

    async def main():
        return await asyncio.gather(*[stream(pr, p) for pr, p in zip(PROMPTS[:3], params)])
    got = asyncio.run(main())
    llm.shutdown()
    for msgs, w in zip(got, want):
        text = ""
        for m in msgs:
            text += m.text_diff
            assert m.text == text
        assert (msgs[-1].text, msgs[-1].token_ids, msgs[-1].finish_reason, msgs[-1].stop_reason) == \
            (w.text, w.token_ids, w.finish_reason, w.stop_reason)
        assert [t for m in msgs for t in m.token_ids_diff] == w.token_ids
