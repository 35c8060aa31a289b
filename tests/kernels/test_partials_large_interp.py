"""lora_apply's "partials" path above 256 tokens (LORASERVE_LORA_PARTIALS_MAX_TOKENS: bench_churn's mixed steps
of 320-352 tokens without the torch.sum launch between shrink and expand; LORASERVE_LORA_SHRINK_SPLIT_LARGE caps the
split) vs the torch reference and vs the default "reduced" path, on the CPU through Triton's interpreter."""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from loraserve.kernels import triton_available

from .interpreter import interpreter_pool, interpreting

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    yield from interpreter_pool(interpreting)


def check_partials_above_256(num_tokens: int, split_cap: str, composition: str) -> None:
    """(runs in the interpreter worker) lora_apply with the partials path on at num_tokens > 256 == the reference
    shrink + expand within fp16 tolerance, rows without an adapter untouched, and the split what the cap allows."""
    from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_expand_ref, lora_shrink_ref
    from loraserve.kernels.lora_apply import choose_path

    from .lora_cases import TOLERANCES, make_problem, without_dense_paths

    widths = [48, 40]   # qkv-like: 2 slices of unequal width, not multiples of the column block
    p = make_problem(num_tokens=num_tokens, hidden=1024, max_rank=32, widths=widths, num_slots=4,
                     composition=composition, dtype=torch.float16, seed=num_tokens, device="cpu")
    S, T, R = len(widths), num_tokens, 32
    meta = LoRAMetaBuilder(T, 4, "cpu").build(p.token_slot)
    buf = torch.zeros(S, T, R)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    y_ref = p.y0.clone()
    lora_expand_ref(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref)
    untouched = (p.token_slot < 0) | (p.ranks[p.token_slot.clamp(min=0).long()] == 0)
    outs = {}
    with without_dense_paths():
        for fold in (False, True):
            os.environ["LORASERVE_LORA_PARTIALS_MAX_TOKENS"] = "1024" if fold else "256"
            os.environ["LORASERVE_LORA_SHRINK_SPLIT_LARGE"] = split_cap
            try:
                path, shape, _ = choose_path(p.x, p.lora_a, p.lora_b, meta)
                assert path == ("partials" if fold else "reduced"), (fold, path)
                if fold:
                    assert len(shape) == 4 and 1 <= shape[0] <= int(split_cap), shape
                outs[fold] = lora_apply(p.x, p.y0.clone(), p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks,
                                        torch.empty(shape))
            finally:
                os.environ.pop("LORASERVE_LORA_PARTIALS_MAX_TOKENS")
                os.environ.pop("LORASERVE_LORA_SHRINK_SPLIT_LARGE")
    for fold, y in outs.items():
        torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCES[torch.float16], msg=f"partials={fold}")
        assert torch.equal(y[untouched], p.y0[untouched]), f"partials={fold}: a row without an adapter changed"
        assert not torch.equal(y[~untouched], p.y0[~untouched]), f"partials={fold}: nothing added"


@pytest.mark.parametrize("split_cap", ["32", "1"])   # the rule's split (2 at these sizes), or none at all
@pytest.mark.parametrize("composition", ["no-adapter-rows", "mixed-ranks"])
def test_partials_path_above_256_tokens(interp, split_cap, composition) -> None:
    interp.submit(check_partials_above_256, 300, split_cap, composition).result(timeout=300)
