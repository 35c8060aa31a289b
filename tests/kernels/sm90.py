"""Compile a Triton kernel ahead of time for an H100/H200 (sm_90) on a machine without a GPU, for the CPU CI's
*_compile tests: triton.compile with a GPUTarget runs the whole NVIDIA pipeline (TTIR, TTGIR, PTX, Triton's
bundled ptxas), so a kernel that would not compile for Hopper (the interpreter accepts code the compiler rejects),
spills registers, or lost an instruction it was written for fails here rather than first on the GPU.

    kernel = compile_sm90(fn, types, constexprs, div16_except=("M",), num_warps=4, launch_pdl=True)
    assert "griddepcontrol.wait" in kernel.asm["ptx"]
    assert_no_spills(kernel)

Skips where this machine cannot build for sm_90 offline: no Triton, a Triton whose ASTSource takes another format
(before 3.5), no NVIDIA backend, or (for the resource checks) no bundled cuobjdump. A signature that does not match
the kernel is a ValueError (a test's mistake, not a missing tool)."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable

import pytest

# what a launch specialises a 16-divisible integer or 16-byte aligned pointer argument to
DIV16 = [["tt.divisibility", 16]]


def offline_triton():
    """The triton module, or a skip where it cannot compile for sm_90 offline."""
    triton = pytest.importorskip("triton")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 5):
        pytest.skip("the ASTSource signature format of older Triton differs")
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401  (the nvidia backend is bundled)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no Triton NVIDIA backend: {err}")
    return triton


def compile_sm90(fn, types: dict[str, str], constexprs: dict, *, unit: Iterable[str] = (),
                 div16: Iterable[str] = (), div16_except: Iterable[str] | None = None, **options):
    """`fn` (a @triton.jit function) compiled for sm_90; returns Triton's CompiledKernel (.asm["ptx"], .metadata).

    types: each runtime argument's Triton type ("*bf16", "*fp8e4nv", "i32", "fp32"), may name more (one dict for
    several variants of a kernel); constexprs: each constexpr argument's value (those with a default may be left
    out); together they name every argument.
    unit: integer arguments a launch passes as 1 (Triton specialises them to the constant 1).
    div16: runtime arguments the launch sees 16-divisible (pointers 16-byte aligned); div16_except: instead, every
    runtime argument but these (the usual case: all but the token count or the rank).
    options: triton.compile's (num_warps, num_stages, launch_pdl, ...)."""
    triton = offline_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # a constexpr the caller leaves out takes its default (`PUSHED: tl.constexpr = False`), as a launch would; so does
    # a runtime argument with a default the caller does not type (`d_ptr=None`: a launch that leaves it out)
    defaults = {p.name: p.default for p in fn.params if p.has_default and p.name not in types}
    constexprs = {**defaults, **constexprs, **{name: 1 for name in unit}}
    names = list(fn.arg_names)
    missing, unknown = set(names) - set(types) - set(constexprs), set(constexprs) - set(names)
    if missing or unknown:
        raise ValueError(f"{fn.__name__}: missing {sorted(missing)}, unknown constexprs {sorted(unknown)}")
    # in the kernel's argument order: the attributes are keyed by that position
    signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
    runtime = [name for name in names if signature[name] != "constexpr"]
    if div16_except is not None:
        if div16:
            raise ValueError("div16 and div16_except exclude each other")
        div16 = [name for name in runtime if name not in set(div16_except)]
    div16 = set(div16)
    if not div16 <= set(runtime):
        raise ValueError(f"{fn.__name__}: div16 names no runtime argument: {sorted(div16 - set(runtime))}")
    attrs = {(names.index(name),): DIV16 for name in runtime if name in div16}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def pointers(types: dict[str, str]) -> list[str]:
    """The pointer arguments of a `types` dict (for div16)."""
    return [name for name, ty in types.items() if ty.startswith("*")]


def resource_usage(kernel) -> str:
    """cuobjdump's resource usage of the kernel's cubin: per function REG, STACK, SHARED, LOCAL, ... bytes."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("Triton's bundled cuobjdump is missing")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout


def stack_bytes(kernel) -> int:
    """The largest per-thread stack frame in the cubin (registers spilled to local memory land there)."""
    usage = resource_usage(kernel)
    stacks = [int(v) for v in re.findall(r"STACK:(\d+)", usage)]
    assert stacks, f"no STACK in cuobjdump's output: {usage}"
    return max(stacks)


def assert_no_spills(kernel, what: str = "") -> None:
    """No stack frame and no local memory: every value of the kernel stays in registers."""
    usage = resource_usage(kernel)
    used = [int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", usage)]
    assert used and not any(used), f"{what + ': ' if what else ''}register spills: {usage}"


def has_mma(ptx: str) -> bool:
    """Tensor-core dots: Hopper's warpgroup MMA, or the Ampere-style mma.sync Triton falls back to."""
    return "wgmma" in ptx or "mma.sync" in ptx
