"""Problems and checks for the unified paged-attention kernel, shared by the interpreter worker
(test_unified_attention.py runs `check` in a TRITON_INTERPRET=1 process) and the GPU tests.

A batch is a list of (query_len, seq_len) per sequence: (L, L) a whole prompt, (Q, L) with
Q < L a prompt chunk over a cached prefix (chunked prefill), (1, L) a decode token.
"""
from __future__ import annotations

import torch

BATCHES = {
    "prefill": [(21, 21), (9, 9), (3, 3)],
    "chunked": [(12, 45), (5, 20), (17, 17)],
    "decode": [(1, 1), (1, 40), (1, 70), (1, 17)],
    "mixed": [(1, 50), (11, 11), (1, 3), (6, 30), (1, 1)],
}
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=5e-3, atol=5e-3),
              torch.bfloat16: dict(rtol=3e-2, atol=2e-2)}


def interpreting() -> bool:
    """Worker warm-up: the kernel was built for Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    from loraserve.kernels.unified_attention import _unified_attention_kernel

    return isinstance(_unified_attention_kernel, InterpretedFunction)


def make_problem(batch: list[tuple[int, int]], H: int, KVH: int, D: int, BS: int, dtype: torch.dtype,
                 seed: int = 0, device: str = "cpu", index_dtype: torch.dtype = torch.int32):
    """-> (q [N, H, D], k_cache, v_cache [num_blocks, BS, KVH, D], block_tables [B, W], seq_lens [B],
    query_start_loc [B + 1]); each sequence's blocks are scattered over the cache, table rows
    padded with a block the sequence does not own (the kernel must not read past seq_len)."""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-L // BS) for _, L in batch]
    num_blocks = sum(widths) + 3
    perm = torch.randperm(num_blocks, generator=g)
    W = max(widths) + 1
    tables = torch.full((len(batch), W), int(perm[-1]), dtype=torch.long)
    used = 0
    for b, w in enumerate(widths):
        tables[b, :w] = perm[used:used + w]
        used += w
    k_cache = torch.randn(num_blocks, BS, KVH, D, generator=g)
    v_cache = torch.randn(num_blocks, BS, KVH, D, generator=g)
    N = sum(q for q, _ in batch)
    q = torch.randn(N, H, D, generator=g)
    qsl = torch.tensor([0] + [q for q, _ in batch]).cumsum(0)
    seq_lens = torch.tensor([L for _, L in batch])
    dev = dict(device=device)
    return (q.to(dtype).to(**dev), k_cache.to(dtype).to(**dev), v_cache.to(dtype).to(**dev),
            tables.to(index_dtype).to(**dev), seq_lens.to(index_dtype).to(**dev), qsl.to(index_dtype).to(**dev))


def check(batch_name: str, H: int, KVH: int, D: int, BS: int, dtype_name: str, seed: int = 0,
          num_splits: int | None = None, config: dict | None = None, device: str = "cpu",
          index_dtype: str = "int32") -> None:
    from loraserve.kernels.unified_attention import unified_attention, unified_attention_ref

    dtype = getattr(torch, dtype_name)
    batch = BATCHES[batch_name]
    q, k, v, tables, lens, qsl = make_problem(batch, H, KVH, D, BS, dtype, seed, device, getattr(torch, index_dtype))
    ref = unified_attention_ref(q, k, v, tables, lens, qsl, D ** -0.5)
    max_q = max(ql for ql, _ in batch)
    out = unified_attention(q, k, v, tables, lens, qsl, max_q, D ** -0.5, num_splits=num_splits, config=config)
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCES[dtype])


def check_matches_torch_path(batch_name: str, H: int, KVH: int, D: int, BS: int, seed: int = 0) -> None:
    """The reference equals the engine's CPU attention path (attention.py, SDPA + decode rows)."""
    from loraserve.inference.attention import paged_attention
    from loraserve.inference.context import Context, reset_context, set_context, split_mixed
    from loraserve.kernels.unified_attention import unified_attention_ref

    batch = BATCHES[batch_name]
    q, k_cache, v_cache, tables, lens, qsl = make_problem(batch, H, KVH, D, BS, torch.float32, seed,
                                                          index_dtype=torch.long)
    ref = unified_attention_ref(q, k_cache, v_cache, tables, lens, qsl, D ** -0.5)
    # the step's own K/V, taken back out of the cache so store_kv writes what is already there
    slots = []
    for b, (ql, L) in enumerate(batch):
        slots += [int(tables[b, p // BS]) * BS + p % BS for p in range(L - ql, L)]
    slots = torch.tensor(slots)
    k = k_cache.view(-1, KVH, D)[slots].clone()
    v = v_cache.view(-1, KVH, D)[slots].clone()
    ctx = Context(slot_mapping=slots, query_lens=[ql for ql, _ in batch], context_lens=lens,
                  context_lens_list=lens.tolist(), block_tables=tables,
                  decode_only=all(ql == 1 for ql, _ in batch))
    if not ctx.decode_only:
        split_mixed(ctx, torch.device("cpu"))
    set_context(ctx)
    try:
        out = paged_attention(q, k, v, k_cache, v_cache, D ** -0.5)
    finally:
        reset_context()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
