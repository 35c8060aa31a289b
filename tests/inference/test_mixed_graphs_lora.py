"""Mixed steps with adapter rows replayed from LoRA CUDA graphs (mixed_graphs.py, issue 12).

CPU: the static LoRA metadata a LoRA graph reads, refilled for a step, gives every real row exactly the delta of
the eager step's metadata (manager.prepare_batch) and the padding rows none. GPU: a staggered load over several
adapters (prompt chunks riding with adapter decodes) gives the same greedy tokens with the LoRA graphs as eagerly
and as transformers + peft, with LoRA graphs replayed; and the greedy-sampler graphs now serve LoRA decode steps.
"""
from __future__ import annotations

import pytest
import torch

from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams
from loraserve.config import EngineConfig
from loraserve.inference.engine import LLMEngine

from .test_multi_lora import peft_adapter_with_random_weights, peft_greedy

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KINDS = {"all-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]),
         "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, tmp_path_factory):
    _, base = tiny_llama
    out = {}
    for i, (name, kw) in enumerate(KINDS.items()):
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (d, peft_adapter_with_random_weights(base, d, seed=300 + i, **kw))
    return out


class _Replay:
    """CPU stand-in for torch.cuda.CUDAGraph: replays what the graph would have captured before the forward
    (the LoRA metadata build, when captured inside); the test checks what the forward would then read."""

    def __init__(self, captured=None):
        self.captured = captured

    def replay(self):
        if self.captured is not None:
            self.captured()


def _seq(i: int, n_new: int, total: int, blocks: int, hold=None):
    from loraserve.inference.sequence import Sequence

    s = Sequence(f"s{i}", list(range(100 + i, 100 + i + total)), SamplingParams(), lora=hold)
    s.num_computed_tokens, s.block_table = total - n_new, list(range(i * 10, i * 10 + blocks))
    return s


@pytest.mark.parametrize("in_graph", [True, False])
def test_lora_graph_metadata_gives_the_eager_delta(tiny_llama, two_adapters, in_graph):
    """CPU, real manager and slots: a mixed step (decodes and prompt chunks, with and without adapters) run
    through MixedGraphRunner with a stand-in replay leaves the LoRA graph's static metadata such that the
    captured LoRABatch adds, on every real row, the delta of the eager step's LoRABatch, and nothing to the
    padding rows; the token slots are the sequences' slots repeated by query length, then -1."""
    from loraserve.inference.mixed_graphs import MixedGraphRunner
    from loraserve.inference.step_inputs import StepInputBuilder

    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8, max_loras=4))
    mgr = llm.engine.lora_manager
    reqs = [LoRARequest(name, i + 1, d) for i, (name, (d, _)) in enumerate(two_adapters.items())]
    llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=1), lora_request=reqs)   # both placed on slots
    holds = [mgr.resolve(r) for r in reqs]
    assert all(h.slot is not None for h in holds) and holds[0].slot != holds[1].slot

    cpu, pad, bs = torch.device("cpu"), 999, 16
    query_lens = [1, 20, 1, 7, 1]
    seqs = [_seq(0, 1, 30, 2, holds[1]), _seq(1, 20, 40, 3, holds[0]), _seq(2, 1, 5, 1),
            _seq(3, 7, 7, 1, holds[1]), _seq(4, 1, 9, 1, holds[0])]
    n = sum(query_lens)
    inp, _, _ = StepInputBuilder(bs, pad, cpu).build(seqs, query_lens)
    assert inp.has_lora
    m = MixedGraphRunner(None, cpu, 8, 64, 8, pad, bs, 4, 2, 4, lora_manager=mgr)
    bp, t = m.pick(n, len(seqs))
    ctx = type("Ctx", (), {})()
    ctx.lora = m._lora_context(bp, t)      # what _capture hands the graph: the static metadata's views for t tokens
    replay = _Replay((lambda: m._build_lora_meta(bp, t)) if in_graph else None)
    m.lora_graphs = {(bp, t, s): (replay, torch.zeros(t, 3), ctx, in_graph) for s in range(1, 65)}
    assert m.run(inp, query_lens).shape == (n, 3) and m.num_lora_replays == 1
    want_slots = [s.lora.slot if s.lora is not None else -1 for s in seqs]
    expect = [slot for slot, k in zip(want_slots, query_lens) for _ in range(k)] + [-1] * (t - n)
    assert m.token_slot[:t].tolist() == expect

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():   # as the engine's step (the manager's metadata buffers are inference tensors)
        eager = mgr.prepare_batch(seqs, query_lens)
        for layer in range(llm.engine.args.num_hidden_layers):
            for proj, a in mgr.slots.a.items():
                x = torch.randn(t, a.shape[-1], generator=g)                  # [T, in]; rows >= n: padding tokens
                n_out = mgr.slots.b[proj].shape[2]
                y_graph, y_eager = torch.zeros(t, n_out), torch.zeros(n, n_out)
                ctx.lora.apply(layer, proj, x, y_graph)
                eager.apply(layer, proj, x[:n], y_eager)
                torch.testing.assert_close(y_graph[:n], y_eager, rtol=1e-5, atol=1e-6)
                assert not y_graph[n:].any()
                # all-r8 adapts every projection of every layer: rows of its tokens must move
                assert y_eager[1:21].abs().sum() > 0


def test_seg_bucket_graph_bounds_the_grid_by_the_steps_adapters(tiny_llama, two_adapters):
    """CPU, real manager and slots, LORASERVE_LORA_SEG_BUCKETS on: a mixed step of 12 sequences over 2 adapters
    (graph Bp 16) takes the LoRA graph keyed by its segment bucket (2 < Bp - 1 = 15), whose grid is cdiv(T, BM)
    + 2 tiles, and its delta on every real row equals the eager step's; a step of 3 distinct slots (more than
    the bucket holds) may not replay that graph (cover refuses it)."""
    from loraserve.inference.mixed_graphs import MixedGraphRunner, cover, seg_bucket
    from loraserve.inference.step_inputs import StepInputBuilder

    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8, max_loras=12))
    mgr = llm.engine.lora_manager
    reqs = [LoRARequest(name, i + 1, d) for i, (name, (d, _)) in enumerate(two_adapters.items())]
    llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=1), lora_request=reqs)
    holds = [mgr.resolve(r) for r in reqs]
    assert mgr.num_slots > 2   # (12 slots: the bucket, not the tier, bounds the grid)
    cpu, pad, bs = torch.device("cpu"), 999, 16
    query_lens = [1] * 11 + [24]
    seqs = [_seq(i, 1, 10 + i, 1, holds[i % 3] if i % 3 < 2 else None) for i in range(11)] + \
        [_seq(11, 24, 24, 2, holds[0])]
    n = sum(query_lens)
    inp, _, _ = StepInputBuilder(bs, pad, cpu).build(seqs, query_lens)
    assert inp.has_lora and inp.num_adapters == 2
    m = MixedGraphRunner(None, cpu, 16, 64, 8, pad, bs, 4, 2, 4, lora_manager=mgr)
    m.seg_buckets = True
    bp, t = m.pick(n, len(seqs))
    seg = seg_bucket(2, bp)
    assert (bp, seg) == (16, 2)
    ctx = type("Ctx", (), {})()
    ctx.lora = m._lora_context(bp, t, seg)
    assert ctx.lora.meta.grid_tiles == -(-t // ctx.lora.meta.block_m) + 2
    replay = _Replay(lambda: m._build_lora_meta(bp, t, seg))
    m.lora_graphs = {(bp, t, s, seg): (replay, torch.zeros(t, 3), ctx, True) for s in range(1, 65)}
    assert m.run(inp, query_lens).shape == (n, 3) and m.num_lora_replays == 1
    assert cover(m.lora_graphs, n, len(seqs), 1, t, 3) is None and cover(m.lora_graphs, n, len(seqs), 1, t, 2)
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        eager = mgr.prepare_batch(seqs, query_lens)
        for proj, a in mgr.slots.a.items():
            x = torch.randn(t, a.shape[-1], generator=g)
            n_out = mgr.slots.b[proj].shape[2]
            y_graph, y_eager = torch.zeros(t, n_out), torch.zeros(n, n_out)
            ctx.lora.apply(0, proj, x, y_graph)
            eager.apply(0, proj, x[:n], y_eager)
            torch.testing.assert_close(y_graph[:n], y_eager, rtol=1e-5, atol=1e-6)
            assert not y_graph[n:].any() and y_eager[11:].abs().sum() > 0


@gpu[0]
@gpu[1]
@pytest.mark.parametrize("seg_buckets", ["0", "1"])
def test_lora_mixed_graphs_match_eager_and_peft(tiny_llama, two_adapters, monkeypatch, seg_buckets):
    """GPU: requests over two adapters and none, arriving every few steps (prompt chunks next to adapter
    decodes): greedy tokens with the mixed-step LoRA graphs (LoRA graphs replayed, decode steps with adapters
    sampled by the greedy-sampler graphs) equal the engine with every mixed step eager, and transformers + peft
    per adapter. max_num_seqs=8: few decode buckets, so a cold Triton cache compiles few kernel variants."""
    path, base = tiny_llama
    names = [None, "all-r8", "qv-r4", "all-r8", "qv-r4", None]
    prompts = [list(range(20, 57)), [5, 6, 7, 8, 9], [3] * 70, list(range(100, 133)), [10, 11], list(range(40, 80))]
    ids = {name: i + 1 for i, name in enumerate(two_adapters)}

    def run(mixed: str, lora: str) -> tuple[dict, LLMEngine]:
        monkeypatch.setenv("LORASERVE_MIXED_GRAPHS", mixed)
        monkeypatch.setenv("LORASERVE_MIXED_GRAPH_LORA", lora)
        monkeypatch.setenv("LORASERVE_MIXED_GRAPH_CAPTURE_AFTER", "1")
        monkeypatch.setenv("LORASERVE_LORA_SEG_BUCKETS", seg_buckets)
        engine = LLMEngine(EngineConfig(model=path, dtype="float32", device="cuda", max_num_prefill_tokens_with_decode=48,
                                        max_num_seqs=8, lora_config=LoraConfig(max_lora_rank=8, max_loras=4)))
        p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        done: dict[str, list[int]] = {}
        for i, (prompt, name) in enumerate(zip(prompts, names)):
            lr = None if name is None else LoRARequest(name, ids[name], two_adapters[name][0])
            engine.add_request(f"r{i}", prompt, p, lr)
            for _ in range(3):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.outputs[0].token_ids
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        return done, engine

    graphed, engine = run("1", "1")
    mixed = engine.runner.mixed_graphs
    assert mixed.num_lora_replays > 0 and not mixed.lora_failed, (mixed.num_lora_replays, mixed.lora_failed)
    eager, _ = run("0", "0")
    assert graphed == eager
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        model = base if name is None else two_adapters[name][1]
        assert graphed[f"r{i}"] == peft_greedy(model, prompt, 12), (i, name)


def test_eager_step_grid_is_bounded_by_its_adapters(tiny_llama, two_adapters):
    """CPU, real manager: an eager step above 256 tokens launches cdiv(T, BM) + (distinct slots) tiles, not
    cdiv(T, BM) + min(slots, T) (on a GPU the tier has hundreds of slots by memory, thousands of packing
    granules), and its delta equals the one through the unbounded grid."""
    from loraserve.kernels import LoRAMetaBuilder

    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8))
    mgr = llm.engine.lora_manager
    reqs = [LoRARequest(name, i + 1, d) for i, (name, (d, _)) in enumerate(two_adapters.items())]
    llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=1), lora_request=reqs)
    holds = [mgr.resolve(r) for r in reqs]
    assert mgr.num_slots > 2   # (8 on the CPU; hundreds by memory on a GPU)
    seqs = [_seq(0, 200, 200, 13, holds[0]), _seq(1, 1, 30, 2, holds[1]), _seq(2, 90, 90, 6), _seq(3, 1, 9, 1, holds[0])]
    lens = [200, 1, 90, 1]
    with torch.inference_mode():
        batch = mgr.prepare_batch(seqs, lens)
        T = sum(lens)
        assert batch.meta.grid_tiles == -(-T // batch.meta.block_m) + 2
        full = LoRAMetaBuilder(T, mgr.num_slots, "cpu").build(batch.meta.token_slot.clone())
        assert full.grid_tiles > batch.meta.grid_tiles
        from loraserve.inference.lora.batch import LoRABatch

        unbounded = LoRABatch(mgr.slots, full)
        g = torch.Generator().manual_seed(1)
        for proj, a in mgr.slots.a.items():
            x = torch.randn(T, a.shape[-1], generator=g)
            y1, y2 = torch.zeros(T, mgr.slots.b[proj].shape[2]), torch.zeros(T, mgr.slots.b[proj].shape[2])
            batch.apply(0, proj, x, y1)
            unbounded.apply(0, proj, x, y2)
            torch.testing.assert_close(y1, y2)
            assert y1[:200].abs().sum() > 0 and not y1[201:291].any()


def test_decode_seg_bucket_choice(monkeypatch):
    """CPU: which LoRA graph a decode step of bucket 64 replays with LORASERVE_LORA_SEG_BUCKETS on: a (64, 32)
    graph for 32 distinct adapters (captured once, then reused), the bucket's own for 64 (no tighter bucket) or
    an uncounted step; a failed capture turns the buckets off and falls back to the bucket's graph."""
    from loraserve.inference.cuda_graphs import CudaGraphRunner

    lm = type("LM", (), {"num_slots": 8000})()
    r = CudaGraphRunner(None, torch.device("cpu"), 64, 4, 0, 16, lora_manager=lm)
    r.graphs = {(64, True): ("bucket", None, None)}
    r.seg_buckets = True
    captured = []

    def fake_capture(bs, seg):
        captured.append((bs, seg))
        r.seg_graphs[(bs, seg)] = entry = ("seg", bs, seg)
        return entry

    monkeypatch.setattr(r, "_capture_seg", fake_capture)
    assert r._lora_graph(64, 32) == (("seg", 64, 32), 32)
    assert r._lora_graph(64, 30) == (("seg", 64, 32), 32) and captured == [(64, 32)]
    assert r._lora_graph(64, 64)[1] is None and r._lora_graph(64, None)[1] is None

    def failing(bs, seg):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(r, "_capture_seg", failing)
    assert r._lora_graph(64, 5) == (("bucket", None, None), None) and not r.seg_buckets
