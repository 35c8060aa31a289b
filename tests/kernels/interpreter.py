"""A worker process that runs Triton kernels under TRITON_INTERPRET=1 (CPU CI), one per test module.

The variable must be set before Triton is imported, so the kernels run in a spawned worker that
inherits it, while the test process itself keeps compiling normally (GPU tests)."""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor


def interpreting() -> bool:
    """A `ready` check for modules with nothing else to warm up."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_pool(ready: Callable[[], bool]) -> Iterator[ProcessPoolExecutor]:
    """Generator for a module-scoped fixture: `yield from interpreter_pool(cases.ready)`.
    `ready` runs first in the worker and must return True (e.g. that Triton is interpreting)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned worker only
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:  # the worker starts at the first submit: while the variable is still set
        assert pool.submit(ready).result(timeout=300)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
    yield pool
    pool.shutdown(cancel_futures=True)
