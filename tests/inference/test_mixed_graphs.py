"""Mixed steps (prompt chunks + decode rows) replayed from CUDA graphs (mixed_graphs.py) against eager
steps and HF: the same greedy tokens, with graphs actually replayed, for every step kind of a staggered
load (prefill-only, mixed with padding sequences, decode)."""
from __future__ import annotations

import pytest
import torch

from loraserve import SamplingParams
from loraserve.config import EngineConfig
from loraserve.inference.engine import LLMEngine

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [list(range(20, 57)), [5, 6, 7, 8, 9], [3] * 70, list(range(100, 133)), [10, 11], list(range(40, 140))]


def staggered(engine: LLMEngine, steps_between: int = 3) -> dict[str, list[int]]:
    """A new request every few steps, so that prompt chunks ride with running decodes."""
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    done: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, p)
        for _ in range(steps_between):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


@gpu[0]
@gpu[1]
@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_graphs_match_eager_and_hf(tiny_llama, monkeypatch, overlap):
    path, hf = tiny_llama
    cfg = dict(model=path, dtype="float32", device="cuda", async_scheduling=overlap, max_num_prefill_tokens_with_decode=48)
    monkeypatch.setenv("LORASERVE_MIXED_GRAPHS", "1")
    graphed = LLMEngine(EngineConfig(**cfg))
    assert graphed.runner.mixed_graphs is not None
    a = staggered(graphed)
    assert graphed.runner.mixed_graphs.num_replays > 0
    monkeypatch.setenv("LORASERVE_MIXED_GRAPHS", "0")
    eager = LLMEngine(EngineConfig(**cfg))
    assert eager.runner.mixed_graphs is None
    b = staggered(eager)
    assert a == b
    for i, prompt in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert a[f"r{i}"] == ref


def test_padding_keeps_the_real_rows():
    """CPU: a mixed step padded as a graph replays it (padding sequences into the scratch block, the
    bucket's query starts) attends exactly as the unpadded step on every real row (attention's
    semantics: kernels.unified_attention_ref, which the kernel's own tests hold the kernel to)."""
    import numpy as np

    from loraserve.inference.mixed_graphs import MixedGraphRunner, padded_metadata
    from loraserve.kernels.unified_attention import unified_attention_ref

    g = torch.Generator().manual_seed(0)
    bs, kvh, h, d, num_blocks = 16, 2, 4, 16, 64
    scratch = num_blocks          # the extra block after the cache's own
    k_cache = torch.randn(num_blocks + 1, bs, kvh, d, generator=g)
    v_cache = torch.randn(num_blocks + 1, bs, kvh, d, generator=g)
    query_lens = [1, 1, 37, 1, 5, 1]            # decodes next to prompt chunks
    context_lens = [20, 50, 60, 3, 5, 33]
    b, n = len(query_lens), sum(query_lens)
    width = 4
    tables = torch.randperm(num_blocks, generator=g)[:b * width].view(b, width)
    q = torch.randn(n, h, d, generator=g)
    qsl = torch.tensor([0] + np.cumsum(query_lens).tolist())
    want = unified_attention_ref(q, k_cache, v_cache, tables, torch.tensor(context_lens), qsl, 0.25)

    runner = MixedGraphRunner.__new__(MixedGraphRunner)
    runner.seq_buckets, runner.token_buckets = [2, 4, 8, 16], [32, 64, 96]
    bp, t = runner.pick(n, b)
    assert bp >= b + 1 and t >= n + bp - b
    meta = torch.from_numpy(padded_metadata(query_lens, n, bp, t)).long()
    qsl_p, pad_ctx = meta[:bp + 1], meta[bp + 1:]
    ctx_p = torch.cat([torch.tensor(context_lens), pad_ctx])
    tables_p = torch.full((bp, -(-t // bs)), scratch)
    tables_p[:b, :width] = tables
    q_p = torch.cat([q, torch.randn(t - n, h, d, generator=g)])
    assert int(qsl_p[-1]) == t and bool((qsl_p[1:] - qsl_p[:-1] >= 1).all()) and bool((ctx_p >= qsl_p[1:] - qsl_p[:-1]).all())
    got = unified_attention_ref(q_p, k_cache, v_cache, tables_p, ctx_p, qsl_p, 0.25)
    torch.testing.assert_close(got[:n], want)


@gpu[0]
@gpu[1]
def test_greedy_sampler_graphs_match_eager(tiny_llama, monkeypatch):
    """LORASERVE_SAMPLER_GRAPHS=1 (the default): greedy decode steps sample inside a CUDA graph; tokens equal the eager
    sampler's and HF's, logprobs equal the eager sampler's (same ops over the bucket's rows)."""
    path, hf = tiny_llama
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=None)
    prompts = [list(range(20, 57)), [5, 6, 7, 8, 9], [3] * 17]

    def run(flag: str):
        monkeypatch.setenv("LORASERVE_SAMPLER_GRAPHS", flag)
        engine = LLMEngine(EngineConfig(model=path, dtype="float32", device="cuda"))
        assert (engine.runner.graph_runner.sampler_graphs is not None) == (flag == "1")
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, p)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].cumulative_logprob)
        return done
    a, b = run("1"), run("0")
    assert [a[k][0] for k in sorted(a)] == [b[k][0] for k in sorted(b)]
    for k in a:
        assert abs(a[k][1] - b[k][1]) < 1e-3
    for i, prompt in enumerate(prompts):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert a[f"r{i}"][0] == ref


class _Replay:
    """CPU stand-in for torch.cuda.CUDAGraph: these tests check what a replay would read."""

    def replay(self):
        pass


def _seq(i: int, n_new: int, total: int, blocks: int):
    from loraserve.inference.sequence import Sequence

    s = Sequence(f"s{i}", list(range(100 + i, 100 + i + total)), SamplingParams())
    s.num_computed_tokens, s.block_table = total - n_new, list(range(i * 10, i * 10 + blocks))
    return s


def test_static_buffers_hold_the_step_and_valid_padding():
    """CPU: the decode graphs' static inputs equal the step's rows and every padding row points at the
    scratch slot/block with length 1, whether the batch shrinks or grows between steps (padding rewritten
    only where a larger step left real rows); the mixed graphs' buffers likewise, with the padding
    sequences' query starts and lengths."""
    from loraserve.inference.cuda_graphs import CudaGraphRunner
    from loraserve.inference.mixed_graphs import MixedGraphRunner
    from loraserve.inference.step_inputs import StepInputBuilder

    cpu, pad, bs = torch.device("cpu"), 999, 16
    r = CudaGraphRunner(None, cpu, 8, 8, pad, bs)
    r.graphs = {(b, False): (_Replay(), torch.zeros(b, 3), None) for b in r.buckets}
    for n in (7, 3, 5, 2, 8, 1):
        inp, _, _ = StepInputBuilder(bs, pad, cpu).build([_seq(i, 1, 30 + i, 3) for i in range(n)], [1] * n)
        assert r.run(inp).shape == (n, 3)
        assert r.input_ids[:n].tolist() == inp.input_ids.tolist() and r.positions[:n].tolist() == inp.positions.tolist()
        assert r.slot_mapping.tolist() == inp.slot_mapping.tolist() + [pad * bs] * (8 - n)
        assert r.context_lens.tolist() == inp.context_lens.tolist() + [1] * (8 - n)
        assert r.block_tables[:n, :3].tolist() == inp.block_tables.tolist() and (r.block_tables[n:, 0] == pad).all()

    m = MixedGraphRunner(None, cpu, 8, 64, 8, pad, bs, 4, 2, 4)
    query_lens = [1, 20, 1]
    inp, _, _ = StepInputBuilder(bs, pad, cpu).build([_seq(0, 1, 30, 2), _seq(1, 20, 40, 3), _seq(2, 1, 5, 1)],
                                                     query_lens)
    bp, t = m.pick(22, 3)
    m.graphs = {(bp, t, s): (_Replay(), torch.zeros(t, 3)) for s in range(1, 65)}
    assert m.run(inp, query_lens).shape == (22, 3)
    assert m.input_ids[:t].tolist() == inp.input_ids.tolist() + [0] * (t - 22)
    assert m.slot_mapping[:t].tolist() == inp.slot_mapping.tolist() + [pad * bs] * (t - 22)
    qsl, lens = m.query_start_loc[:bp + 1].tolist(), m.context_lens[:bp].tolist()
    assert qsl[:4] == [0, 1, 21, 22] and qsl[-1] == t and lens[:3] == [30, 40, 5]
    assert all(lens[j] == qsl[j + 1] - qsl[j] >= 1 for j in range(3, bp))
    assert (m.block_tables[3:bp] == pad).all() and m.block_tables[:3, :3].tolist() == inp.block_tables.tolist()


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("off", False), ("FALSE", False)])
def test_graph_switches_default_on(monkeypatch, value, on):
    """Mixed-step and greedy-sampler graphs are the default on CUDA; LORASERVE_*_GRAPHS=0 turns each off."""
    from loraserve.inference.mixed_graphs import mixed_graphs_enabled
    from loraserve.inference.model_runner import sampler_graphs_enabled

    for name in ("LORASERVE_MIXED_GRAPHS", "LORASERVE_SAMPLER_GRAPHS"):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert mixed_graphs_enabled() is on
    assert sampler_graphs_enabled() is on


def test_cover_picks_the_smallest_graph_that_fits():
    """A step whose own bucket is not captured may replay a larger captured graph: same split count, room for
    its tokens plus one per padding sequence, at most COVER_SLACK (>= 32 tokens) above its own bucket."""
    from loraserve.inference.mixed_graphs import cover

    keys = [(72, 352, 1), (72, 384, 1), (80, 384, 1), (80, 384, 2), (72, 416, 2), (72, 608, 1), (16, 352, 1)]
    # 65 sequences, 320 tokens: own bucket (72, 352); 7 padding sequences need 327 tokens
    assert cover(keys, 320, 65, 1, 352) == (72, 352, 1)
    assert cover([k for k in keys if k != (72, 352, 1)], 320, 65, 1, 352) == (72, 384, 1)
    assert cover(keys, 320, 65, 2, 352) == (80, 384, 2)          # only its split count (416 > 352 + 44)
    assert cover(keys, 320, 65, 3, 352) is None                  # (the runner captures then)
    assert cover([(72, 608, 1)], 320, 65, 1, 352) is None        # 608 > 352 + 44: too much padding
    assert cover([(72, 352, 1)], 346, 65, 1, 384) is None        # 346 + 7 padding tokens > 352
    assert cover([(64, 384, 1)], 320, 65, 1, 352) is None        # no room for a padding sequence


@gpu[0]
@gpu[1]
def test_covered_steps_match_eager_and_hf(tiny_llama, monkeypatch):
    """Covering (mixed_graphs.CAPTURE_AFTER): steps whose own bucket is not captured replay a larger captured
    graph (more padding tokens and sequences) when one is within COVER_SLACK, and are captured otherwise;
    greedy tokens equal the eager engine's and HF's."""
    path, hf = tiny_llama
    cfg = dict(model=path, dtype="float32", device="cuda", max_num_prefill_tokens_with_decode=48)
    monkeypatch.setenv("LORASERVE_MIXED_GRAPH_CAPTURE_AFTER", "1000000")   # covered whenever something covers
    engine = LLMEngine(EngineConfig(**cfg))
    mixed = engine.runner.mixed_graphs
    for bp, t in ((8, 96), (8, 128), (16, 128)):   # larger than the buckets this load's mixed steps pick
        mixed._capture(bp, t, 1)
    a = staggered(engine)
    assert mixed.num_covered > 0 and mixed.num_replays > mixed.num_covered   # some steps had nothing to cover them
    monkeypatch.setenv("LORASERVE_MIXED_GRAPHS", "0")
    b = staggered(LLMEngine(EngineConfig(**cfg)))
    assert a == b
    for i, prompt in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert a[f"r{i}"] == ref
