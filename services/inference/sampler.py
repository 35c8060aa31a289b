"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, chosen-token logprobs."""
from __future__ import annotations

import torch

from loraserve.config import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> tuple[list[int], list[float], list[dict[int, float] | None]]:
    """logits: [B, V] float32 -> (token ids [B], logprob of each chosen token under the raw logits,
    the top-`logprobs` alternatives {token: logprob} of rows that asked for them (else None))."""
    logprobs_all = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    for i in sampled:
        p = params[i]
        row = logits[i] / p.temperature
        if p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cum = sorted_probs.cumsum(0)
            drop = cum - sorted_probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i]).squeeze(0)
    chosen = logprobs_all.gather(1, tokens[:, None]).squeeze(1)
    top: list[dict[int, float] | None] = [None] * len(params)
    k = max((p.logprobs or 0 for p in params), default=0)
    if k > 0:
        values, ids = torch.topk(logprobs_all, min(k, logprobs_all.shape[1]), dim=-1)
        values, ids = values.tolist(), ids.tolist()
        for i, p in enumerate(params):
            if p.logprobs:
                top[i] = dict(zip(ids[i][:p.logprobs], values[i][:p.logprobs]))
    return tokens.tolist(), chosen.tolist(), top
