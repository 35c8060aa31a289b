"""StagedArtifact.fold_on_landing (issue 12's cold path): the parser's B *= scale folds run as the download
reports each piece, on the reporting thread, each exactly once and bit for bit b.mul_(scale); wait_folds runs
what is left and raises the download's error when the bytes never came."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from loraserve.adapters.staged import StagedArtifact


def _staged_with_factors(seed: int, n: int = 40):
    """A staged bf16 buffer (as bytes) holding n factors of assorted sizes at 2-byte-aligned offsets, with gaps."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(torch.randint(1, 3000, (1,), generator=g)) for _ in range(n)]
    gaps = [int(torch.randint(0, 9, (1,), generator=g)) * 2 for _ in range(n)]
    total = sum(2 * s + gp for s, gp in zip(sizes, gaps))
    values = (torch.randn(total // 2, generator=g) * 3).to(torch.bfloat16)
    buf = values.view(torch.uint8).clone()
    staged = StagedArtifact(buf, in_progress=True)
    whole = buf.view(torch.bfloat16)
    items, o = [], 0
    for k, (s, gp) in enumerate(zip(sizes, gaps)):
        o += gp
        items.append((whole[o // 2:o // 2 + s], [1.5, 0.5, 3.0, 0.1][k % 4]))
        o += 2 * s
    ref = whole.clone()
    for b, scale in items:
        off = (b.data_ptr() - whole.data_ptr()) // 2
        ref[off:off + b.numel()].mul_(scale)  # the reference: the same op, on a copy
    return staged, items, ref, whole


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_run_as_pieces_land_on_any_thread_bit_for_bit(seed):
    staged, items, ref, whole = _staged_with_factors(seed)
    n = staged.buf.numel()
    cuts = sorted(random.Random(seed).sample(range(1, n), 25))
    pieces = list(zip([0, *cuts], [*cuts, n]))
    random.Random(seed + 7).shuffle(pieces)
    first, rest = pieces[:5], pieces[5:]
    for a, b in first:  # some bytes there before the parser registers its folds
        staged.landed(a, b)
    staged.fold_on_landing(items)
    threads = [threading.Thread(target=lambda ps=rest[k::4]: [staged.landed(a, b) for a, b in ps]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every byte reported: each fold already ran on a reporting thread, before anyone waited
    assert torch.equal(whole, ref)
    staged.finish(None)
    staged.wait_folds()
    assert torch.equal(whole, ref)  # and none ran twice


def test_a_fold_waits_for_all_its_bytes():
    staged, items, ref, whole = _staged_with_factors(3, n=2)
    (b0, s0), (b1, _) = items
    start = b0.data_ptr() - staged.buf.data_ptr()
    before = b0.clone()
    staged.fold_on_landing(items)
    staged.landed(start, start + 2 * b0.numel() - 2)  # all but its last element
    assert torch.equal(b0, before)
    staged.landed(start + 2 * b0.numel() - 2, start + 2 * b0.numel())
    assert torch.equal(b0, (before.clone().mul_(s0)))
    staged.finish(None)  # the rest arrived: wait_folds folds b1 on this thread
    staged.wait_folds()
    assert torch.equal(whole, ref)


def test_a_failed_download_fails_the_wait_for_its_folds():
    staged, items, _, _ = _staged_with_factors(4, n=3)
    staged.fold_on_landing(items)
    staged.landed(0, 16)
    staged.finish(ConnectionError("cut"))
    with pytest.raises(ConnectionError, match="cut"):
        staged.wait_folds()
