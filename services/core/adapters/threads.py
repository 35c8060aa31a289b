"""torch CPU ops of one thread without OpenMP workers (the adapter parse: hundreds of small ops).

An adapter parse is ~300 small parallel regions (scale folds, the finite pass): on a busy or
oversubscribed host every region waits for its slowest worker to be scheduled, and the H200 host's
parse of an 84 MB adapter took 85 ms .. 1.94 s; the CPU box 65 ms vs 1.6 s under load
(benchmarks/cold_diag.py). One thread does the same work in tens of ms, whatever the load.
"""
from __future__ import annotations

import contextlib
import os

import torch


def _openmp_runtime():
    """torch's OpenMP runtime (libgomp/libiomp, already loaded), for its per-thread thread count; None
    when torch uses another backend or the library cannot be found."""
    import ctypes
    import re

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as f:
            found = re.search(r"(/\S*lib(?:gomp|iomp5|omp)[^/\s]*\.so[^\s]*)", f.read())
        lib = ctypes.CDLL(found.group(1)) if found else None
        return lib if lib is not None and hasattr(lib, "omp_set_num_threads") else None
    except (OSError, AttributeError):
        return None


_OMP = None
_OMP_LOOKED = False
# LORASERVE_PARSE_THREADS=0: parse with torch's usual intra-op threads (the old behaviour)
PARSE_ONE_THREAD = os.environ.get("LORASERVE_PARSE_THREADS", "1") != "0"


@contextlib.contextmanager
def one_cpu_thread():
    """torch CPU ops of THIS thread run without OpenMP workers inside the block (other threads keep
    theirs): OpenMP's thread count is per thread (omp_set_num_threads), torch's setter is global."""
    global _OMP, _OMP_LOOKED
    if not _OMP_LOOKED:
        _OMP, _OMP_LOOKED = _openmp_runtime(), True
    if _OMP is None or not PARSE_ONE_THREAD:
        yield
        return
    torch.get_num_threads()  # torch's lazy per-thread init first (it would reset ours at the next op)
    prev = _OMP.omp_get_max_threads()
    _OMP.omp_set_num_threads(1)
    try:
        yield
    finally:
        _OMP.omp_set_num_threads(prev)
