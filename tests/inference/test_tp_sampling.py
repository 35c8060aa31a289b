"""Greedy sampling over the vocabulary shards under TP (services/inference/tp/sampling.py) against the
sampler on the gathered full logits (sampler.sample), over gloo with 2 and 3 processes: the same tokens,
ok flags and logprobs (float32 rounding of the log-sum-exp), including ties across shards, NaN, +inf and
all -inf rows, and a vocabulary that does not split evenly (padding rows of the last shard)."""
from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB, HIDDEN, T = 23, 8, 9


def _hidden_and_head():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(T, HIDDEN, generator=g)
    head = torch.randn(VOCAB, HIDDEN, generator=g)
    return hidden, head


def _full_logits(hidden, head):
    """The rows as the LM head gives them, then edited into the edge cases (edits apply to the head's
    output, so each rank's shard below is the same edit of its columns)."""
    logits = hidden @ head.T
    logits[1, 3] = logits[1, 17] = logits[1].max() + 5          # a tie across the shards: the first index wins
    logits[2, 5] = float("nan")
    logits[3, 20] = float("inf")                                  # one +inf
    logits[4, 2] = logits[4, 15] = float("inf")                   # two +inf in different shards
    logits[5] = float("-inf")                                     # no finite value: ok = False
    logits[6] = float("nan")
    logits[7, 22] = logits[7].max() + 1                           # the max in the last column
    return logits


def _rank(rank: int, world: int, port: int, out) -> None:
    from loraserve.inference.sampler import SamplingMetadata, sample
    from loraserve.inference.tp.parallel import TPGroup
    from loraserve.inference.tp.sampling import combine, shard_stats, tp_greedy_sample

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    per = -(-VOCAB // world)
    group = TPGroup(rank, world, VOCAB, per)
    hidden, head = _hidden_and_head()
    logits = _full_logits(hidden, head)
    padded = torch.cat([logits, torch.zeros(T, per * world - VOCAB)], -1)   # the padding rows' logits: 0
    local = padded[:, rank * per:(rank + 1) * per].contiguous()
    meta = SamplingMetadata(greedy=None, temperature=None, top_k=None, top_k_max=0, top_p=None, masked=None,
                            generators=[], max_top_logprobs=0, all_greedy=True)
    ref = sample(logits, meta)
    # the collective path (stats of this shard, all-reduced as a sum of zero-padded parts)
    full = torch.zeros(T, world, 8)
    full[:, rank] = shard_stats(local, group.vocab_start, VOCAB)
    dist.all_reduce(full)
    got = combine(full)
    # and through the model's LM head (rows of this rank's vocabulary range, zero padding rows)
    head_pad = torch.cat([head, torch.zeros(per * world - VOCAB, HIDDEN)])
    lm = torch.nn.Linear(HIDDEN, per, bias=False)
    lm.weight.data.copy_(head_pad[rank * per:(rank + 1) * per])
    plain = tp_greedy_sample(SimpleNamespace(lm_head=lm), hidden, group)
    plain_ref = sample(hidden @ head.T, meta)
    # the start-up check every rank runs before capturing the sharded sampler (against the gathered logits)
    from loraserve.inference.tp.sampling import self_check

    model = SimpleNamespace(lm_head=lm, compute_logits=lambda h: group.gather_logits(lm(h)).float())
    checked = self_check(model, group, torch.device("cpu"))
    out[rank] = {
        "tokens": got.tokens.tolist(), "ref_tokens": ref.tokens.tolist(),
        "ok": got.ok.tolist(), "ref_ok": ref.ok.tolist(),
        "lp_err": (got.logprobs - ref.logprobs).abs().max().item(),
        "plain": (torch.equal(plain.tokens, plain_ref.tokens), (plain.logprobs - plain_ref.logprobs).abs().max().item()),
        "self_check": checked,
    }
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_shard_greedy_equals_gathered_sampler(world):
    from loraserve.inference.tp.executor import _free_port

    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(world, _free_port(), out), nprocs=world, join=True, start_method="spawn")
        out = dict(out)
    for rank in range(world):
        r = out[rank]
        assert r["tokens"] == r["ref_tokens"], r
        assert r["ok"] == r["ref_ok"] and r["ok"][5] is False and r["ok"][6] is False, r
        assert r["tokens"][1] == 3 and r["tokens"][3] == 20 and r["tokens"][4] == 2 and r["tokens"][7] == 22, r
        assert r["lp_err"] < 1e-5, r
        assert r["plain"][0] and r["plain"][1] < 1e-5, r
        assert r["self_check"] is True, r
