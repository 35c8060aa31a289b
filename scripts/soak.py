"""`make soak`: the reliability suite of issue 9 (fuzz, soak, faults) on loopback servers.

    python scripts/soak.py            # the issue's sizes (minutes)
    python scripts/soak.py --quick    # seconds (what tests/reliability/test_soak.py runs)
    python scripts/soak.py --help     # every size can be set, e.g. --kills 10 --streams 64

The suite itself lives in tests/reliability/soak.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
