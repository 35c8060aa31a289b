"""Optional Triton import.

`import loraserve.kernels` must work on machines without Triton (the CPU engine only needs
the torch references), so every kernel module imports Triton from here and defines its
kernel only when ``HAS_TRITON`` is true.

``TRITON_INTERPRET=1`` (Triton's CPU interpreter) is read by Triton when it is imported and
when a kernel is decorated, so it must be set before the first import; :func:`interpret_mode`
reports the value seen at that time, which is the only one the kernels can honour.
"""
from __future__ import annotations

import os

try:  # Triton is optional: the CPU engine never needs it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "yes", "on"}


def triton_available() -> bool:
    """True when Triton imported cleanly (a GPU may still be absent: see ``interpret_mode``)."""
    return HAS_TRITON


def interpret_mode() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return HAS_TRITON and _INTERPRET



def _jit_accepts(name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(triton.jit).parameters
    except (TypeError, ValueError):
        return False


def no_specialize(*names: str, pointers: tuple[str, ...] = ()) -> dict:
    """Keywords for ``triton.jit(**...)``: integer arguments whose value changes between launches (token
    and sequence counts, table widths) and pointer arguments that may be views at any element offset (the
    step's metadata, packed back to back in one buffer: positions start at element N, so their 16-byte
    alignment flips with N's parity). Triton otherwise compiles a variant per class (an int == 1 or a
    multiple of 16; a pointer 16-byte aligned or not), so a serving process meets a new class, and a
    compile, long after its warm-up. Only metadata goes here: the K/V and activation pointers keep their
    alignment hints (vectorised loads). LORASERVE_TRITON_SPECIALIZE=1 restores Triton's default."""
    if not HAS_TRITON or os.environ.get("LORASERVE_TRITON_SPECIALIZE", "0").strip().lower() in {"1", "true", "yes", "on"}:
        return {}
    kw = {"do_not_specialize": list(names) + list(pointers)}
    if pointers and _jit_accepts("do_not_specialize_on_alignment"):
        kw["do_not_specialize_on_alignment"] = list(pointers)
    return kw
