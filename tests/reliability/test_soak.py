"""The reliability suite's short version (issue 9): fuzz, soak and faults on loopback servers
in seconds; `make soak` runs the same code at the issue's sizes."""
from __future__ import annotations

from .soak import QUICK, run


def test_reliability_suite_quick(tmp_path):
    report = run(QUICK, tmp_path, seed=1)
    print(report.table())
    failed = [f"{name}: {detail}" for name, ok, detail in report.checks if not ok]
    assert not failed, "\n".join(failed)
