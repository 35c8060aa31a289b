"""The start-up warm-up (warmup.py): dummy steps before serving that leave the engine exactly as a fresh one
(no request, no KV block, no cached prefix; the same greedy outputs), skipped on CPU and with LORASERVE_WARMUP=0,
and on CUDA: after it, serving steps of new shapes compile no attention-kernel variant."""
from __future__ import annotations

import pytest
import torch

from loraserve import LLM, SamplingParams
from loraserve.inference.warmup import compiled_attention_variants, prefix_steps, warm_up, warmup_steps, warmup_wanted

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9)]
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


def test_warm_up_leaves_a_fresh_engine(tiny_llama, monkeypatch):
    path, _ = tiny_llama
    reference = tokens(LLM(model=path, dtype="float32", device="cpu"))
    llm = LLM(model=path, dtype="float32", device="cpu", max_seq_len=1024)
    engine = llm.engine
    assert engine.warmup is None and not warmup_wanted(engine)          # CPU: nothing to compile
    planned = warmup_steps(engine)
    assert planned and all(sum(s) <= engine.config.max_num_tokens for s in planned)
    assert {1, 16} <= {len(s) for s in planned}                        # one and many sequences per step
    assert {sum(s) % 16 == 0 for s in planned} == {True, False}        # both token-count classes
    prefixes = prefix_steps(engine)          # a short query over a long cached prefix: the many-split classes
    assert prefixes
    steps0 = engine.num_steps
    report = warm_up(engine)
    assert report["failed"] is None and report["steps"] == len(planned) + len(prefixes)
    assert engine.num_steps - steps0 >= len(planned)                   # each set ran as (at least) its own step
    assert not engine.has_unfinished_requests() and not engine.seqs
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks                          # every KV block back
    assert tokens(llm) == reference                                     # and nothing it did shows in outputs
    assert bm.num_reused_blocks == 0                                    # no warm-up prompt was kept as a prefix
    monkeypatch.setenv("LORASERVE_WARMUP", "0")
    assert not warmup_wanted(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_compile_after_warm_up_cuda(tiny_llama, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LORASERVE_WARMUP", "1")
    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cuda", max_seq_len=2048)
    report = llm.engine.warmup
    assert report is not None and report["failed"] is None and report["steps"] > 0
    before = compiled_attention_variants()
    assert before > 0                           # the count reads Triton's caches (else this test proves nothing)
    # prefill-only steps of new sizes and sequence counts (odd, multiple of 16, one), then decodes
    rng = torch.Generator().manual_seed(3)
    for lens in ([777], [45] * 16, [13, 250, 1001], [2]):
        prompts = [torch.randint(5, 250, (n,), generator=rng).tolist() for n in lens]
        llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert compiled_attention_variants() == before

