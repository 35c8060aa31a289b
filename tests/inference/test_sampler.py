"""The batched sampler against HF's logits processors (the reference), its sampling distribution,
per-request seeds, logprobs, and numerical safety (issue 9 item 2, issue 11)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import (MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from loraserve.config import SamplingParams
from loraserve.inference.sampler import build_metadata, process_logits, sample

V = 300
CPU = torch.device("cpu")


def meta_for(params, num_outputs=None, stop_ids=None, generators=None):
    n = len(params)
    return build_metadata(params, num_outputs or [0] * n, stop_ids or [set() for _ in range(n)],
                          generators or [None] * n, CPU)


def hf_reference(row: torch.Tensor, p: SamplingParams, num_outputs: int, eos: list[int]) -> torch.Tensor:
    """HF's processors in generate()'s order on one row [V] -> its sampling distribution."""
    scores = row[None].clone()
    prompt = torch.zeros(1, 5, dtype=torch.long)
    input_ids = torch.cat([prompt, torch.zeros(1, num_outputs, dtype=torch.long)], dim=1)
    if p.min_tokens:
        scores = MinNewTokensLengthLogitsProcessor(5, p.min_tokens, eos)(input_ids, scores)
    scores = TemperatureLogitsWarper(p.temperature)(input_ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(input_ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(input_ids, scores)
    return torch.softmax(scores[0], dim=-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filtered_distributions_match_hf_processors(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, V, generator=g) * 3
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=20),
              SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.5, top_k=50, top_p=0.9),
              SamplingParams(temperature=2.0, top_k=1000), SamplingParams(temperature=0.9, top_p=0.05),
              SamplingParams(temperature=1.0, min_tokens=4), SamplingParams(temperature=0.8, top_k=5, min_tokens=1)]
    num_outputs = [0, 0, 0, 0, 0, 0, 2, 3]
    eos = [1, 7]
    stop_ids = [set(eos)] * len(params)
    ours = torch.softmax(process_logits(logits, meta_for(params, num_outputs, stop_ids)), dim=-1)
    for i, p in enumerate(params):
        ref = hf_reference(logits[i], p, num_outputs[i], eos)
        torch.testing.assert_close(ours[i], ref, rtol=1e-5, atol=1e-6, msg=f"row {i}: {p}")
        assert torch.equal(ours[i] > 0, ref > 0), f"row {i}: kept sets differ"
    assert ours[6, 1] == 0 and ours[6, 7] == 0      # min_tokens: EOS banned before 4 outputs


def test_sampled_frequencies_follow_the_distribution():
    """The exponential race draws from softmax(processed logits): 40,000 draws over 6 tokens."""
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 40_000
    params = [SamplingParams(temperature=0.8, top_p=0.9)] * rows
    meta = meta_for(params)
    logits = base.repeat(rows, 1)
    want = torch.softmax(process_logits(logits[:1], meta_for(params[:1])), dim=-1)[0]
    counts = torch.bincount(sample(logits, meta).tokens, minlength=6).double() / rows
    assert want[5] == 0 and counts[5] == 0                            # cut by top-p, never drawn
    assert torch.allclose(counts, want.double(), atol=0.01), (counts, want)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.0, seed=1234)

    def run(others: int, row: int) -> list[int]:
        gen = torch.Generator().manual_seed(1234)
        out = []
        for _ in range(5):
            params = [SamplingParams(temperature=1.0)] * others
            params.insert(row, p)
            gens = [None] * others
            gens.insert(row, gen)
            batch = torch.cat([logits[1:1 + row], logits[:1], logits[1 + row:1 + others]])
            out.append(int(sample(batch, meta_for(params, generators=gens)).tokens[row]))
        return out
    alone = run(0, 0)
    assert run(7, 3) == alone and run(15, 15) == alone
    assert len(set(alone)) > 1   # it does sample (5 equal draws at temperature 1 over 300 tokens: ~never)


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-6])
def test_tiny_temperatures_are_greedy_and_never_fail(temperature):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(5)) * 50
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=temperature),
              SamplingParams(temperature=temperature, top_p=0.5, top_k=3), SamplingParams(temperature=0.7)]
    out = sample(logits, meta_for(params))
    assert out.ok.all()
    assert int(out.tokens[1]) == int(logits[1].argmax()) and int(out.tokens[2]) == int(logits[2].argmax())
    assert torch.isfinite(out.logprobs).all()


def test_non_finite_logits_fail_only_their_row():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(6))
    logits[1] = float("nan")                          # all NaN: this row fails
    logits[2, :100] = float("nan")                    # some NaN: they count as -inf
    logits[3, 17] = float("inf")                      # +inf: the only candidate
    logits[4] = float("-inf")                         # nothing finite: fails
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.9),
              SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0), SamplingParams()]
    out = sample(logits, meta_for(params))
    assert out.ok.tolist() == [True, False, True, True, False]
    assert int(out.tokens[2]) >= 100
    assert int(out.tokens[3]) == 17 and out.logprobs[3] == 0.0
    assert torch.isfinite(out.logprobs[[0, 2, 3]]).all()
    greedy = sample(logits, meta_for([SamplingParams(temperature=0)] * 5))
    assert greedy.ok.tolist() == [True, False, True, True, False]
    assert int(greedy.tokens[2]) == 100 + int(logits[2, 100:].argmax())


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(7))
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0.5, top_k=3, logprobs=0),
              SamplingParams(temperature=1.0, logprobs=2)]
    out = sample(logits, meta_for(params))
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.tokens[:, None]).squeeze(1))
    values, ids = torch.topk(ref, 5, dim=-1)
    assert torch.equal(out.top_ids, ids)
    torch.testing.assert_close(out.top_logprobs, values)
    assert math.isclose(float(out.top_logprobs[0, 0]), float(out.logprobs[0]), rel_tol=1e-6)  # greedy = top-1


def test_any_accepted_parameter_is_numerically_safe():
    """Extremes SamplingParams accepts: every row still gets a finite, in-range token."""
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(8)) * 30
    params = [SamplingParams(temperature=float("inf")), SamplingParams(temperature=1e300, top_p=1e-300),
              SamplingParams(temperature=5e-6, top_k=10**9), SamplingParams(temperature=1.0, top_k=10**9, top_p=1.0),
              SamplingParams(temperature=1e-45, seed=3), SamplingParams(temperature=2.0, top_p=1e-300, top_k=2)]
    gens = [None] * 4 + [torch.Generator().manual_seed(3), None]
    out = sample(logits, meta_for(params, generators=gens))
    assert out.ok.all() and ((out.tokens >= 0) & (out.tokens < V)).all() and torch.isfinite(out.logprobs).all()
    # top_p ~0 keeps only the most likely token, whatever the temperature
    assert int(out.tokens[1]) == int(logits[1].argmax()) and int(out.tokens[5]) == int(logits[5].argmax())
    assert int(out.tokens[2]) == int(logits[2].argmax()) and int(out.tokens[4]) == int(logits[4].argmax())
