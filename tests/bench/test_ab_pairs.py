"""benchmarks/ab_pairs.interleaved_ratio: pairs of alternating order make a drifting machine's A / B ratio
unbiased, where one A loop then one B loop (bench_churn's resident phase before) carries the drift whole."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from benchmarks.ab_pairs import interleaved_ratio, median_run  # noqa: E402


class DriftingMachine:
    """Loops whose throughput drifts by `drift` (relative) per loop: A runs at `ratio` x B's speed."""

    def __init__(self, ratio: float, drift: float):
        self.ratio, self.drift, self.loops, self.calls = ratio, drift, 0, []

    def _loop(self, speed: float, i: int) -> dict:
        self.calls.append(i)
        tok_s = speed * (1 + self.drift * self.loops)
        self.loops += 1
        return {"tok_s": tok_s}

    def a(self, i: int) -> dict:
        return self._loop(1000.0 * self.ratio, i)

    def b(self, i: int) -> dict:
        return self._loop(1000.0, i)


@pytest.mark.parametrize("drift", [0.03, -0.03])
def test_alternating_pairs_cancel_a_linear_drift(drift):
    m = DriftingMachine(ratio=0.9, drift=drift)
    res = interleaved_ratio(None, m.a, m.b, pairs=4, log=None)
    assert res["order"] == "ABBAABBA"
    assert m.calls == list(range(8)), "every loop gets its own index (fresh prompts)"
    assert res["ratio"] == pytest.approx(0.9, rel=2e-3)   # the 3% a loop drift is gone
    assert min(res["ratios"]) < 0.9 < max(res["ratios"]) and res["spread"] == (min(res["ratios"]), max(res["ratios"]))
    naive = DriftingMachine(ratio=0.9, drift=drift)   # one A loop, then one B loop: biased by the drift
    assert naive.a(0)["tok_s"] / naive.b(1)["tok_s"] == pytest.approx(0.9 / (1 + drift), rel=1e-9)
    assert res["captures_in_timed_loops"] == 0 and all(r["captures"] == [0, 0, 0] for r in res["a"] + res["b"])


def test_pairs_must_be_positive_and_median_run_picks_the_middle():
    with pytest.raises(ValueError, match="pairs"):
        interleaved_ratio(None, lambda i: {"tok_s": 1.0}, lambda i: {"tok_s": 1.0}, pairs=0)
    runs = [{"tok_s": v} for v in (5.0, 1.0, 3.0, 4.0)]
    assert median_run(runs)["tok_s"] == 3.0
    assert median_run(runs[:3])["tok_s"] == 3.0
