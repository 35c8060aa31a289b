"""Greedy sampling over the vocabulary shards, without gathering the logits (LORASERVE_TP_LOCAL_ARGMAX=1).

Under TP each rank's LM head holds V/size rows. The plain path all-gathers the [T, V] logits (16 MB at
batch 64 of a 128k vocabulary, bf16) and samples from them on rank 0 (sampler.sample: ~10 passes over
[T, V] float32). For greedy rows without masks or top-logprobs only five numbers per row and rank are
needed: every rank reduces its shard (max, its first index, the sum of exp(x - max), the count and first
index of +inf) and one all-gather of [T, size, 8] float32 (3 fields padding) combines them. The result equals
sampler.sample's on the whole row: the same token (the first maximal index: ranks hold increasing vocab
ranges, so the lowest rank among those holding the max), ok, and the logprob up to float32 rounding of
the log-sum-exp (computed per shard, then combined); NaN, +inf and all -inf rows as sanitize() treats them.
"""
from __future__ import annotations

import torch

from ..sampler import SamplerOutput

_BIG = float(1 << 30)


def _gemv_lm_head() -> bool:
    """LORASERVE_TP_GEMV_LM_HEAD=1/0: the shard's LM head through kernels/gemv.py at small T or cuBLAS; unset:
    as TP=1 (models/llama.py's LORASERVE_GEMV_LM_HEAD)."""
    import os

    from ..models import llama

    v = os.environ.get("LORASERVE_TP_GEMV_LM_HEAD", "").strip().lower()
    return bool(getattr(llama, "GEMV_LM_HEAD", False)) if not v else v not in ("0", "false", "off", "no")


def local_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """This rank's LM head shard: hidden [T, H] -> [T, V/size] (the weight-streaming GEMV at small T where
    models/llama.py uses it for TP=1, or LORASERVE_TP_GEMV_LM_HEAD says so)."""
    from ..models import llama

    w = model.lm_head.weight
    if (_gemv_lm_head() and 0 < hidden.shape[0] <= getattr(llama, "GEMV_MAX_M", 0)
            and hidden.is_cuda and hidden.stride(-1) == 1 and hidden.dtype == w.dtype):
        from loraserve.kernels.gemv import gemv

        return gemv(hidden, w)
    return model.lm_head(hidden)


def shard_stats(local: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """local [T, Vr] -> float32 [T, 8]: (max, global index of its first occurrence, sum exp(x - max),
    number of +inf, global index of the first +inf) over the shard's columns inside the vocabulary,
    NaN read as -inf (sanitize). Indices < 2^24 are exact in float32."""
    T, Vr = local.shape
    x = local.float()
    valid = max(0, min(Vr, vocab_size - vocab_start))
    if valid < Vr:   # the last shard's padding rows are not tokens (a shard may be padding only)
        x[:, valid:] = float("-inf")
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    posinf = torch.isposinf(x)
    n_inf = posinf.sum(-1)
    first_inf = torch.where(n_inf > 0, posinf.to(torch.int32).argmax(-1), 0)
    m, idx = x.max(-1)                                    # the first maximal index on ties
    m_safe = torch.where(torch.isfinite(m), m, 0.0)       # all -inf: exp(-inf) = 0; +inf rows: ignored later
    s = torch.exp(x - m_safe[:, None]).sum(-1)
    pad = torch.zeros_like(m)   # 8 fields: a [T, size, 8] float32 message is a multiple of 16 bytes (symmetric memory)
    return torch.stack([m, (idx + vocab_start).float(), s, n_inf.float(), (first_inf + vocab_start).float(),
                        pad, pad, pad], -1)


def combine(stats: torch.Tensor) -> SamplerOutput:
    """stats [T, size, 8] (rank-major along dim 1) -> the greedy SamplerOutput of the whole rows."""
    m, idx, s, n_inf, first_inf = stats[..., :5].unbind(-1)   # each [T, size]
    tot_inf = n_inf.sum(-1)
    has_inf = tot_inf > 0
    M = m.max(-1).values
    r_star = (m == M[:, None]).to(torch.int32).argmax(-1)   # the lowest rank holding the max
    tok_fin = idx.gather(1, r_star[:, None].long()).squeeze(1)
    M_safe = torch.where(torch.isfinite(M), M, 0.0)
    lse_fin = M_safe + torch.log((s * torch.exp(m - M_safe[:, None])).sum(-1))
    tok_inf = torch.where(n_inf > 0, first_inf, _BIG).min(-1).values
    lse_inf = torch.log(tot_inf.clamp(min=1))
    ok = has_inf | torch.isfinite(lse_fin)
    tokens = torch.where(has_inf, tok_inf, torch.where(ok, tok_fin, 0.0)).long()
    # logprob = clean[token] - lse: +inf rows: 0 - log(count); finite rows: M - lse; failed rows: 0
    logprobs = torch.where(has_inf, -lse_inf, torch.where(ok, M - lse_fin, 0.0))
    return SamplerOutput(tokens, logprobs.float(), None, None, ok)


def fused_greedy_wanted() -> bool:
    """LORASERVE_TP_FUSED_GREEDY=0: the torch shard_stats / combine (the reference) instead of the Triton kernels."""
    import os

    return os.environ.get("LORASERVE_TP_FUSED_GREEDY", "1").strip().lower() not in ("", "0", "false", "off", "no")


# the Triton shard pass and combine (kernels/tp_greedy.py) where they apply; off on every rank when their
# start-up check fails (self_check)
FUSED = fused_greedy_wanted()


def _fused_ok(local: torch.Tensor) -> bool:
    if not FUSED or not local.is_cuda:
        return False
    from loraserve.kernels.tp_greedy import tp_stats_ok

    return tp_stats_ok(local)


def _greedy(model, hidden: torch.Tensor, group, with_combine: bool = True
            ) -> tuple[SamplerOutput | None, torch.Tensor | None]:
    """Every rank, the same call: hidden [T, H] (identical on every rank) -> (the greedy SamplerOutput of the
    full vocabulary, packed [3, T] float64 (token, logprob, ok)), or (None, None) without the combine (the
    workers: only rank 0 samples). One all-gather of [T, size, 8] float32 (symmetric memory where it takes it:
    a sum of zero-padded parts, exact)."""
    import torch.distributed as dist

    local = local_logits(model, hidden)   # [T, V/size]
    fused = _fused_ok(local)
    if fused:   # 2 launches: this rank's [T, 8] stats in its column of a zeroed [T, size, 8]
        from loraserve.kernels.tp_greedy import tp_combine, tp_shard_stats

        full = tp_shard_stats(local, group.vocab_start, group.vocab_size, group.rank, group.size)
    else:
        stats = shard_stats(local, group.vocab_start, group.vocab_size)   # [T, 8]
        full = stats.new_zeros(stats.shape[0], group.size, stats.shape[-1])
        full[:, group.rank].copy_(stats)
    ar = group.custom_ar
    if ar is not None and ar.takes(full):
        ar(full)
    elif dist.is_initialized() and group.size > 1:
        dist.all_reduce(full)
    if not with_combine:
        return None, None
    if fused:   # 1 launch, the packed block for the device->host copy included
        tokens, logprobs, ok, packed = tp_combine(full)
        return SamplerOutput(tokens, logprobs, None, None, ok), packed
    out = combine(full)
    return out, torch.stack([out.tokens.double(), out.logprobs.double(), out.ok.double()])


def tp_greedy_sample(model, hidden: torch.Tensor, group) -> SamplerOutput:
    """Every rank, the same call: hidden [T, H] (identical on every rank) -> the greedy SamplerOutput of the
    full vocabulary, on every rank."""
    return _greedy(model, hidden, group)[0]


@torch.inference_mode()
def capture_sampler_graphs(graph_runner, model, group, device: torch.device, with_lora: bool = False) -> dict:
    """Every rank at once, per decode bucket (largest first): a graph of the sharded greedy sampling over the
    hidden states of the bucket's decode graph (with_lora: the variant with the LoRA kernels) (its all-gather
    pairs up across the ranks; one eager warm-up each, as CudaGraphRunner.capture_greedy_sampler). Rank 0's
    graphs end with the combine; the workers' end with the all-gather (they sample nothing).
    {bs: (graph, SamplerOutput, packed [3, bs] float64)}, the format CudaGraphRunner.sample_greedy replays
    (None, None on the workers)."""
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    with_combine = group.rank == 0
    for bs in reversed(graph_runner.buckets):
        hidden = graph_runner.graphs[(bs, with_lora)][1]
        with torch.cuda.stream(stream):
            _greedy(model, hidden, group, with_combine)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out, packed = _greedy(model, hidden, group, with_combine)
        graphs[bs] = (graph, out, packed)
    current.wait_stream(stream)
    return graphs


@torch.inference_mode()
def self_check(model, group, device: torch.device) -> bool:
    """Collective, every rank before capturing: the sharded greedy sampler against sampler.sample on the
    gathered logits of a few random rows (the same on every rank); True on every rank iff it matched on every
    rank (a failure turns the sharded path off everywhere: the logits gather is used). The Triton kernels
    (kernels/tp_greedy.py) are checked first; if they fail on any rank, every rank takes the torch ops and
    checks those."""
    global FUSED
    from .allreduce import _all_agree

    ok = _check_once(model, group, device)
    if _all_agree(ok, device, None):
        return True
    if not FUSED:
        return False
    import logging

    logging.getLogger(__name__).warning("Triton sharded greedy sampler failed its check; the torch ops instead")
    FUSED = False
    return _all_agree(_check_once(model, group, device), device, None)


def _check_once(model, group, device: torch.device) -> bool:
    from ..sampler import SamplingMetadata, sample

    try:
        g = torch.Generator(device=device).manual_seed(11)
        w = model.lm_head.weight
        for rows in (5, 1):
            hidden = torch.randn(rows, w.shape[1], device=device, generator=g).to(w.dtype)
            got, packed = _greedy(model, hidden, group)
            meta = SamplingMetadata(greedy=None, temperature=None, top_k=None, top_k_max=0, top_p=None,
                                    masked=None, generators=[], max_top_logprobs=0, all_greedy=True)
            # the reference samples the same LM head output, gathered (the check is about the sampler: the GEMV
            # head, LORASERVE_TP_GEMV_LM_HEAD, rounds differently from cuBLAS's)
            ref = sample(group.gather_logits(local_logits(model, hidden)).float(), meta)
            if not (bool(torch.equal(got.tokens, ref.tokens)) and bool(torch.equal(got.ok, ref.ok))
                    and bool(torch.allclose(got.logprobs, ref.logprobs, atol=1e-3, rtol=1e-3))
                    and bool(torch.equal(packed[0].long(), ref.tokens))):
                return False
        return True
    except Exception:  # noqa: BLE001 - every rank learns it (self_check)
        import logging

        logging.getLogger(__name__).exception("sharded greedy sampler self-check failed")
        return False


def replay_sampler(graphs: dict, buckets: list[int], n: int, views: dict) -> tuple[SamplerOutput, torch.Tensor]:
    """Replay the sampler graph of n rows' bucket: (SamplerOutput of the n rows, packed [3, bs]); views caches
    the [:n] views per (graph set, n)."""
    bs = next(b for b in buckets if b >= n)
    graph, out, packed = graphs[bs]
    graph.replay()
    key = (id(graphs), n)
    view = views.get(key)
    if view is None:
        view = views[key] = SamplerOutput(out.tokens[:n], out.logprobs[:n], None, None, out.ok[:n])
    return view, packed
