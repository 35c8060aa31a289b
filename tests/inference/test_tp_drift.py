"""benchmarks/tp_drift.py's scoring (where an engine leaves the float64 reference's argmax, at what margin; which
token the reference prefers where two engines part) on a toy model whose logits are known exactly."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from benchmarks.tp_drift import parting, score  # noqa: E402

V = 5


class NextTokenTable:
    """logits at each position depend only on the token there: row table[token] (float64, [V, V])."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, ids: torch.Tensor):
        return SimpleNamespace(logits=self.table[ids])


def _model() -> NextTokenTable:
    t = torch.full((V, V), -5.0, dtype=torch.float64)
    t[0, 1], t[0, 2] = 3.0, 2.9     # after 0: 1 (by 0.1 over 2)
    t[1, 2], t[1, 3] = 4.0, 1.0     # after 1: 2 (by 3.0 over 3)
    t[2, 0], t[3, 0] = 2.0, 2.0     # after 2 or 3: 0
    return NextTokenTable(t)


def test_score_margin_where_an_engine_leaves_the_reference() -> None:
    ref = _model()
    heads = [[0], [1]]
    ref_conts = [[1, 2, 0], [2, 0, 1]]
    near_tie = [[2, 0, 1], [2, 0, 1]]     # head 0: takes 2 (0.1 below 1); head 1: follows the reference
    r = score(ref, heads, ref_conts, near_tie, noise_p99=0.5)
    assert r["identical_vs_ref"] == 0.5 and r["left_ref_argmax"] == 0.5 and r["first_left_at_mean"] == 0
    assert abs(r["margin_where_left_max"] - 0.1) < 1e-12 and r["left_above_bf16_noise_p99"] == 0
    wrong = [[1, 3, 0], [2, 0, 1]]         # head 0, second token: 3 where the reference has 2 by 3.0
    r = score(ref, heads, ref_conts, wrong, noise_p99=0.5)
    assert r["first_left_at_mean"] == 1 and abs(r["margin_where_left_max"] - 3.0) < 1e-12
    assert r["left_above_bf16_noise_p99"] == 1


def test_parting_names_the_reference_choice() -> None:
    ref = _model()
    heads = [[0], [1]]
    a = [[1, 2, 0], [2, 0, 1]]
    b = [[2, 0, 1], [2, 0, 1]]             # parts from a at head 0's first token (2 vs the reference's 1)
    r = parting(ref, heads, a, b)
    assert r["identical"] == 0.5 and r["ref_prefers_first"] == 1 and r["ref_prefers_second"] == 0
    assert abs(r["ref_gap_where_parted_max"] - 0.1) < 1e-12
    r = parting(ref, heads, b, a)
    assert r["ref_prefers_first"] == 0 and r["ref_prefers_second"] == 1
