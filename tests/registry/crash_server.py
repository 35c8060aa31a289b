"""`loraserve ...` that SIGKILLs its own process at a chosen point of an upload.

    python crash_server.py after-blob registry serve --data-dir D --address 127.0.0.1:0

after-blob: the blob is in the store, the DB transaction has not run (an orphan blob).
"""
from __future__ import annotations

import os
import signal
import sys

from loraserve import cli
from loraserve.registry.service import RegistryService


def _die(*_args: object, **_kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    point = sys.argv[1]
    if point == "after-blob":
        RegistryService._insert_version = _die  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown crash point {point!r}")
    sys.exit(cli.main(sys.argv[2:]))
