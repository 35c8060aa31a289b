"""Cases for unified attention's wide decode tiles (LORASERVE_ATTN_WIDE_DECODE), run in an interpreter worker."""
from __future__ import annotations

import torch

from .unified_attention_cases import make_problem


def check_wide_decode(num_seqs: int, H: int, KVH: int, D: int, BS: int, seed: int = 0) -> bool:
    """num_seqs decode rows (query length 1, contexts 1..200) -> True when the wide path was taken; the output must
    equal the reference and the 64-key / static-split path within fp16 tolerance."""
    import importlib

    ua = importlib.import_module("loraserve.kernels.unified_attention")   # (the package exports a function by that name)

    g = torch.Generator().manual_seed(seed)
    batch = [(1, int(L)) for L in torch.randint(1, 201, (num_seqs,), generator=g)]
    q, k, v, tables, lens, qsl = make_problem(batch, H, KVH, D, BS, torch.float16, seed)
    ref = ua.unified_attention_ref(q, k, v, tables, lens, qsl, D ** -0.5)
    out = ua.unified_attention(q, k, v, tables, lens, qsl, 1, D ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=5e-3, atol=5e-3)
    static = ua.unified_attention(q, k, v, tables, lens, qsl, 1, D ** -0.5, config=dict(TILE_N=64))
    torch.testing.assert_close(out.float(), static.float(), rtol=5e-3, atol=5e-3)
    return ua.wide_decode(num_seqs * KVH, q.element_size(), q.device)
