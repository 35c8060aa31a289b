"""A short run of the adapter fuzzer (fuzz_adapters.py): a few hundred structure-aware mutations
of valid PEFT and NeMo adapters through the lora_path parser, every 5th also uploaded to a real
registry over gRPC. Zero crashes, zero unforeseen errors, zero raw Python messages, and the
registry answers only OK / INVALID_ARGUMENT. `make soak` runs the same with
LORASERVE_FUZZ_CASES=10000."""
from __future__ import annotations

import os

from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry
from tests.reliability.fuzz_adapters import run


def test_fuzzed_adapters_never_crash_the_parser_or_the_registry(tmp_path):
    cases = int(os.environ.get("LORASERVE_FUZZ_TEST_CASES", "200"))
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry")) as reg:
        stats = run(cases, seed=int(os.environ.get("LORASERVE_FUZZ_SEED", "7")), upload_every=5,
                    registry_address=reg.address)
    print(stats.summary())
    assert stats.ok, stats.summary()
    assert stats.cases >= cases * 0.9
    # the mutations must actually reach the parser's checks, not just break the packaging
    assert stats.outcomes["format_error"] >= cases * 0.3 and stats.outcomes["accepted"] >= 1
    assert set(stats.statuses) <= {"OK", "INVALID_ARGUMENT", "ALREADY_EXISTS"} and stats.statuses["INVALID_ARGUMENT"]
