"""Programmatic dependent launch (PDL, sm_90+) for the model's own step kernels.

A decode step at batch 1 is a chain of ~12 kernels per layer, most of them a few microseconds long;
between two kernels the GPU drains one grid and ramps up the next (launch, first DRAM round trip).
With PDL a kernel may be launched while the one before it still runs: each kernel here lets its
dependents launch at its start (gdc_launch_dependents) and waits for its predecessor's completion
(gdc_wait) before it reads anything the predecessor may write. Work that needs no input (a GEMV's
first weight tile) is issued before the wait, so it overlaps the previous kernel's tail.

Rules every kernel launched with PDL follows (so that completion stays transitive along the chain and
a normally launched kernel after it sees every earlier write):
  * every program calls gdc_wait, also programs with nothing to do, and before any store;
  * before the wait it reads only data no kernel of the step writes (weights, tables built at load).

On by default (LORASERVE_PDL=0 turns it off; read at each launch, so a benchmark may flip it between
graph captures); off on CPU / the interpreter / GPUs older than Hopper / a Triton without the intrinsics.
Measured (H200, benchmarks/bench_gemv.py, 32 decoder layers at 1 token in one CUDA graph, outputs equal
bit for bit): 137.6 -> 135.0 us per layer with cuBLAS GEMMs (kernels/PERF_NOTES.md).
"""
from __future__ import annotations

import os

import torch

_OK: dict[int, bool] = {}


def pdl_enabled() -> bool:
    return os.environ.get("LORASERVE_PDL", "1").strip().lower() not in ("", "0", "false", "off", "no")


def pdl_kwargs(device: torch.device) -> dict:
    """Launch keywords for a kernel with a USE_PDL constexpr: USE_PDL=True and Triton's launch_pdl
    when PDL is on and supported on `device`, else nothing (the kernel's default USE_PDL=False)."""
    if device.type != "cuda" or not pdl_enabled():
        return {}
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _OK.get(idx)
    if ok is None:
        from ._triton import interpret_mode, tl

        cuda_ext = getattr(getattr(tl, "extra", None), "cuda", None)
        ok = _OK[idx] = (not interpret_mode() and torch.cuda.get_device_capability(idx)[0] >= 9
                         and hasattr(cuda_ext, "gdc_wait") and hasattr(cuda_ext, "gdc_launch_dependents"))
    return dict(USE_PDL=True, launch_pdl=True) if ok else {}
