"""Shared problem generators for the LoRA kernel tests (punica-style batch compositions)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

COMPOSITIONS = ["distinct", "uniform", "zipf:1.5", "identical", "no-adapter-rows", "mixed-ranks"]
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=2e-2),
}


def token_slots(composition: str, num_tokens: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """[T] int32 slot per token (-1 = no adapter) for a named batch composition."""
    T, L = num_tokens, num_slots
    if composition == "distinct":  # as many adapters as possible, one token run each
        slots = torch.randperm(T, generator=gen) % L
    elif composition in ("uniform", "mixed-ranks"):
        slots = torch.randint(0, L, (T,), generator=gen)
    elif composition.startswith("zipf:"):
        alpha = float(composition.split(":")[1])
        weights = 1.0 / torch.arange(1, L + 1, dtype=torch.float64) ** alpha
        slots = torch.multinomial(weights, T, replacement=True, generator=gen)
        slots = torch.randperm(L, generator=gen)[slots]  # the popular adapter is not always slot 0
    elif composition == "identical":
        slots = torch.full((T,), int(torch.randint(0, L, (1,), generator=gen)))
    elif composition == "no-adapter-rows":
        slots = torch.randint(-1, L, (T,), generator=gen)
        slots[:3] = -1
    else:
        raise ValueError(composition)
    return slots.to(torch.int32)


@dataclass
class LoRAProblem:
    x: torch.Tensor          # [T, H]
    lora_a: torch.Tensor     # [L, S, R, H]
    lora_b: torch.Tensor     # [L, N, R]
    ranks: torch.Tensor      # [L] int32
    slice_offsets: torch.Tensor  # [S+1] int32
    token_slot: torch.Tensor  # [T] int32
    y0: torch.Tensor          # [T, N]


def make_problem(*, num_tokens: int, hidden: int, max_rank: int, widths: list[int], num_slots: int,
                 composition: str, dtype: torch.dtype, seed: int, device: str = "cpu") -> LoRAProblem:
    """Random adapters with rows/columns past each slot's rank zeroed (as the cache stores them)."""
    gen = torch.Generator().manual_seed(seed)
    T, H, R, L, S, N = num_tokens, hidden, max_rank, num_slots, len(widths), sum(widths)
    if composition == "mixed-ranks":
        ranks = torch.randint(1, R + 1, (L,), generator=gen)
        ranks[0] = 0  # an adapter that does not target this module
    else:
        ranks = torch.full((L,), R)
    lora_a = torch.randn(L, S, R, H, generator=gen) / H ** 0.5
    lora_b = torch.randn(L, N, R, generator=gen) / R ** 0.5
    for slot, r in enumerate(ranks.tolist()):
        lora_a[slot, :, r:] = 0
        lora_b[slot, :, r:] = 0
    offsets = torch.tensor([0] + torch.tensor(widths).cumsum(0).tolist(), dtype=torch.int32)
    to = dict(device=device)
    return LoRAProblem(
        x=torch.randn(T, H, generator=gen).to(dtype=dtype, **to),
        lora_a=lora_a.to(dtype=dtype, **to), lora_b=lora_b.to(dtype=dtype, **to),
        ranks=ranks.to(dtype=torch.int32, **to), slice_offsets=offsets.to(**to),
        token_slot=token_slots(composition, T, L, gen).to(**to),
        y0=torch.randn(T, N, generator=gen).to(dtype=dtype, **to),
    )


def naive_lora_delta(p: LoRAProblem) -> torch.Tensor:
    """Per-token loop in float64, obviously right: the expected y (before the final rounding)."""
    y = p.y0.double().clone()
    offs = p.slice_offsets.tolist()
    for t, slot in enumerate(p.token_slot.tolist()):
        if slot < 0:
            continue
        r = int(p.ranks[slot])
        for s in range(len(offs) - 1):
            h = p.x[t].double() @ p.lora_a[slot, s, :r].double().T
            # The kernels feed the rank-r intermediate to B in B's dtype.
            h = h.float().to(p.lora_b.dtype).double()
            y[t, offs[s]:offs[s + 1]] += h @ p.lora_b[slot, offs[s]:offs[s + 1], :r].double().T
    return y


def shrink_defined_mask(p: LoRAProblem, max_rank: int, num_slices: int) -> torch.Tensor:
    """[S, T, R] bool: entries of the shrink output the contract defines."""
    slot = p.token_slot.long()
    r = torch.where(slot >= 0, p.ranks.long()[slot.clamp(min=0)], 0)
    cols = torch.arange(max_rank, device=slot.device)
    return (cols[None, :] < r[:, None]).unsqueeze(0).expand(num_slices, -1, -1)


@contextlib.contextmanager
def without_dense_paths():
    """lora_apply's dense shrink / expand off (LORASERVE_LORA_DENSE, LORASERVE_LORA_DENSE_EXPAND) and the
    segment-tiled pair off (LORASERVE_LORA_SEG, lora_seg.py; its own tests turn it on inside) for the duration: for
    checks of the tiled paths' own choice (partials / reduced / fused / onelaunch)."""
    import importlib

    mod = importlib.import_module("loraserve.kernels.lora_apply")
    seg = importlib.import_module("loraserve.kernels.lora_seg")
    old = mod.DENSE_MODE, mod.DENSE_EXPAND, seg.SEG_ENABLED
    mod.DENSE_MODE, mod.DENSE_EXPAND, seg.SEG_ENABLED = "", False, False
    try:
        yield
    finally:
        mod.DENSE_MODE, mod.DENSE_EXPAND, seg.SEG_ENABLED = old
