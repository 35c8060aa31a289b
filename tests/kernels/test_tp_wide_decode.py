"""Unified attention's wide decode tiles (128 keys, no split) for decode grids of 3/8..1/2 of the target program count
(tensor parallelism's 4 KV heads a rank at batch 64): equal to the reference in Triton's interpreter, taken only in
that range, and off unless LORASERVE_ATTN_WIDE_DECODE is set."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import tp_wide_decode_cases as cases
from .interpreter import interpreter_pool, interpreting


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    old = os.environ.get("LORASERVE_ATTN_WIDE_DECODE")
    os.environ["LORASERVE_ATTN_WIDE_DECODE"] = "1"   # inherited by the spawned worker (read at import there)
    try:
        yield from interpreter_pool(interpreting)
    finally:
        if old is None:
            os.environ.pop("LORASERVE_ATTN_WIDE_DECODE")
        else:
            os.environ["LORASERVE_ATTN_WIDE_DECODE"] = old


def test_wide_decode_interp(interp) -> None:
    # 50 sequences x 4 KV heads: 200 programs, in [198, 264): the wide path (the range: test_wide_decode_range)
    assert interp.submit(cases.check_wide_decode, 50, 16, 4, 16, 16).result(timeout=600)


def test_wide_decode_range() -> None:
    import importlib

    ua = importlib.import_module("loraserve.kernels.unified_attention")   # (the package exports a function by that name)

    cpu = torch.device("cpu")
    old = ua.WIDE_DECODE
    try:
        ua.WIDE_DECODE = True
        assert [n for n in (197, 198, 256, 263, 264, 512) if ua.wide_decode(n, 2, cpu)] == [198, 256, 263]
        assert not ua.wide_decode(256, 4, cpu)   # fp32 queries keep their halved tiles
        ua.WIDE_DECODE = False
        assert not ua.wide_decode(256, 2, cpu)
    finally:
        ua.WIDE_DECODE = old
