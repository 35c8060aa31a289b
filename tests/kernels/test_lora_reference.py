"""The torch references against a naive per-token float64 loop, and the CPU dispatch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_expand_ref, lora_shrink_ref, use_triton

from .lora_cases import COMPOSITIONS, TOLERANCES, make_problem, naive_lora_delta, shrink_defined_mask

WIDTHS = {1: [48], 2: [40, 40], 3: [48, 24, 24]}  # qkv under GQA: q wider than k, v


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_naive_loop(composition: str, num_slices: int, dtype: torch.dtype) -> None:
    p = make_problem(num_tokens=33, hidden=64, max_rank=16, widths=WIDTHS[num_slices], num_slots=5,
                     composition=composition, dtype=dtype, seed=num_slices)
    meta = LoRAMetaBuilder(64, 5, "cpu").build(p.token_slot)
    buf = torch.full((num_slices, 33, 16), float("nan"))
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf)
    y = p.y0.clone()
    lora_expand_ref(buf, p.lora_b, p.slice_offsets, meta, p.ranks, y)

    expected = naive_lora_delta(p)
    torch.testing.assert_close(y.double(), expected.to(dtype).double(), **TOLERANCES[dtype])
    untouched = (p.token_slot < 0) | (p.ranks[p.token_slot.clamp(min=0).long()] == 0)
    assert torch.equal(y[untouched], p.y0[untouched])
    # Undefined shrink entries stay as they were (NaN poison), defined ones are written.
    defined = shrink_defined_mask(p, 16, num_slices)
    assert not buf[defined].isnan().any() and buf[~defined].isnan().all()


def test_expand_into_column_view_of_wider_output() -> None:
    p = make_problem(num_tokens=9, hidden=32, max_rank=8, widths=[16, 8, 8], num_slots=3,
                     composition="uniform", dtype=torch.float32, seed=3)
    meta = LoRAMetaBuilder(16, 3, "cpu").build(p.token_slot)
    wide = torch.zeros(9, 50)
    wide[:, 10:42] = p.y0
    view = wide[:, 10:42]
    lora_apply(p.x, view, p.lora_a, p.lora_b, p.slice_offsets, meta, p.ranks)
    torch.testing.assert_close(wide[:, 10:42].double(), naive_lora_delta(p), rtol=1e-5, atol=1e-5)
    assert (wide[:, :10] == 0).all() and (wide[:, 42:] == 0).all()


def test_cpu_dispatch_uses_reference_unless_interpreting(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(x)


def test_package_imports_without_triton() -> None:
    """A machine without Triton still gets the references and lora_apply."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('no triton here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, loraserve.kernels as k\n"
        "assert not k.triton_available()\n"
        "m = k.LoRAMetaBuilder(4, 2, 'cpu').build(torch.tensor([1, -1], dtype=torch.int32))\n"
        "x = torch.ones(2, 8); y = torch.zeros(2, 4)\n"
        "a = torch.ones(2, 1, 4, 8); b = torch.ones(2, 4, 4)\n"
        "k.lora_apply(x, y, a, b, torch.tensor([0, 4], dtype=torch.int32), m,\n"
        "             torch.tensor([4, 2], dtype=torch.int32))\n"
        "assert y[0].tolist() == [16.0] * 4 and y[1].tolist() == [0.0] * 4, y\n"
        "try:\n"
        "    k.lora_shrink(x, a, m, torch.tensor([4, 2], dtype=torch.int32), torch.empty(1, 2, 4))\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('lora_shrink ran without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
