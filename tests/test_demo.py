"""`make run`'s demo end to end: registry and inference as real processes on the embedded
default model, demo adapters pushed, and the `upper` adapter visibly changing the output."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "models", "default", "config.json")),
                    reason="embedded default model not built")
def test_demo_runs_and_adapter_changes_output(tmp_path):
    ports = [free_port() for _ in range(4)]
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--once", "--port", str(ports[0]),
           "--registry-port", str(ports[1]), "--metrics-port", str(ports[2]), "--openai-port", str(ports[3]),
           "--data-dir", str(tmp_path), "--max-tokens", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    logs = "".join((tmp_path / f).read_text() for f in ("registry.log", "inference.log") if (tmp_path / f).exists())
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    out = proc.stdout
    assert "pushed adapter upper v1" in out
    base = out.split("=== base model")[1].split("===")[0]
    upper = out.split("=== with adapter 'upper'")[1].split("(")[0]
    letters = [c for c in upper if c.isalpha()]
    assert letters and sum(c.isupper() for c in letters) / len(letters) > 0.7, upper
    base_letters = [c for c in base if c.isalpha()]
    assert sum(c.isupper() for c in base_letters) / max(1, len(base_letters)) < 0.5, base
    assert "grpcurl -plaintext" in out
    # a second run on the same data dir reuses the pushed versions (idempotent make run)
    proc2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    assert "pushed adapter upper v1" in proc2.stdout
