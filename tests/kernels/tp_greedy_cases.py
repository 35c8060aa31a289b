"""Cases for kernels/tp_greedy.py (greedy sampling over TP vocabulary shards), run in the interpreter worker
(CPU) or on the GPU: W ranks emulated in one process (each rank's stats, summed as the all-reduce would),
against sampler.sample() on the whole rows and tp/sampling.py's torch shard_stats / combine."""
from __future__ import annotations

import torch


def _logits(T: int, V: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(T, V, generator=g) * 3
    if T >= 8:
        x[1, V // 5] = x[1, V - 3] = x[1].max() + 5     # a tie across shards: the first index wins
        x[2, ::5] = float("nan")
        x[3, V - 4] = float("inf")                      # one +inf
        x[4, 1] = x[4, V - 2] = float("inf")            # two +inf in different shards
        x[5] = float("-inf")                            # no finite value: ok = False
        x[6] = float("nan")
        x[7, V - 1] = x[7].max() + 1                    # the max in the last column (the last shard)
    return x


def check_ranks(T: int, V: int, world: int, dtype: str = "float32", device: str = "cpu", chunk: int | None = 64
                ) -> None:
    from loraserve.inference.sampler import SamplingMetadata, sample
    from loraserve.inference.tp.sampling import combine, shard_stats
    from loraserve.kernels.tp_greedy import tp_combine, tp_shard_stats

    g = torch.Generator().manual_seed(T * 7 + V + world)
    logits = _logits(T, V, g).to(getattr(torch, dtype))
    per = -(-V // world)
    padded = torch.cat([logits, torch.zeros(T, per * world - V, dtype=logits.dtype)], -1)   # padding columns: 0
    total = torch.zeros(T, world, 8, device=device)
    total_ref = torch.zeros(T, world, 8)
    for rank in range(world):
        local = padded[:, rank * per:(rank + 1) * per].contiguous().to(device)
        stats = tp_shard_stats(local, rank * per, V, rank, world, chunk=chunk)
        others = [p for p in range(world) if p != rank]
        assert torch.equal(stats[:, others].cpu(), torch.zeros(T, world - 1, 8)), "other ranks' columns not zero"
        ref = shard_stats(local.cpu(), rank * per, V)
        got = stats[:, rank].cpu()
        no_inf = ref[:, 3] == 0
        # index fields exact; max exact; sum of exp to fp32 rounding (two-level sum); rows with +inf: only count
        # and first index are read
        assert torch.equal(got[:, 3], ref[:, 3]) and torch.equal(got[ref[:, 3] > 0, 4], ref[ref[:, 3] > 0, 4])
        assert torch.equal(got[no_inf, 0], ref[no_inf, 0])
        cand = no_inf & torch.isfinite(ref[:, 0])   # the index of a shard's max matters where the max is finite
        assert torch.equal(got[cand, 1], ref[cand, 1])
        torch.testing.assert_close(got[no_inf, 2], ref[no_inf, 2], rtol=1e-5, atol=1e-6)
        total += stats
        total_ref[:, rank] = ref
    meta = SamplingMetadata(greedy=None, temperature=None, top_k=None, top_k_max=0, top_p=None, masked=None,
                            generators=[], max_top_logprobs=0, all_greedy=True)
    want = sample(logits.float(), meta)
    tokens, logprobs, ok, packed = tp_combine(total)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32 and ok.dtype == torch.bool
    assert torch.equal(tokens.cpu(), want.tokens), (tokens, want.tokens)
    assert torch.equal(ok.cpu(), want.ok), (ok, want.ok)
    torch.testing.assert_close(logprobs.cpu(), want.logprobs, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.cpu(), torch.stack([tokens.double(), logprobs.double(), ok.double()]).cpu())
    old = combine(total_ref)   # the torch combine on the torch stats: the same tokens
    assert torch.equal(old.tokens, want.tokens)
    if T >= 8:
        assert int(tokens[1]) == V // 5 and int(tokens[3]) == V - 4 and int(tokens[4]) == 1 and int(tokens[7]) == V - 1
        assert not bool(ok[5]) and not bool(ok[6]) and bool(ok[3])
    # a packed buffer wider than T (a bucket's [3, bs]) gets its first T columns
    wide = torch.full((3, T + 3), -7.0, dtype=torch.float64, device=device)
    tp_combine(total, wide)
    assert torch.equal(wide[:, :T].cpu(), packed.cpu()) and bool((wide[:, T:] == -7).all())


def check_embed(N: int, rows: int, H: int, vocab_start: int, dtype: str = "float32", device: str = "cpu") -> None:
    """kernels/tp_embed.py against the torch ops of TPGroup.embed: ids inside, below and above this rank's
    vocabulary range (zero rows), summed over two emulated ranks = the full table's lookup."""
    from loraserve.kernels.tp_embed import vocab_parallel_embed, vocab_parallel_embed_ref

    g = torch.Generator().manual_seed(N + rows + H)
    table = torch.randn(2 * rows, H, generator=g).to(getattr(torch, dtype)).to(device)
    ids = torch.randint(0, 2 * rows, (N,), generator=g)
    ids[0] = 0
    ids[-1] = 2 * rows - 1
    ids = ids.to(device)
    full = torch.zeros(N, H, dtype=table.dtype, device=device)
    for rank in range(2):
        shard = table[rank * rows:(rank + 1) * rows]
        got = vocab_parallel_embed(ids, shard, rank * rows)
        want = vocab_parallel_embed_ref(ids, shard, rank * rows)
        assert torch.equal(got, want), (got - want).abs().max()
        full += got
    assert torch.equal(full, table[ids])
    # a shard that holds none of the ids: all zeros
    assert not vocab_parallel_embed(ids, table[:rows], 10 * rows).any()
