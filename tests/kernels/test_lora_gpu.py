"""GPU checks at Llama-3-8B shapes (bf16) and CUDA-graph replay of the decode path."""
from __future__ import annotations

import pytest
import torch

from loraserve.kernels import LoRAMetaBuilder, lora_apply, lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

from loraserve.kernels.lora_apply import workspace_shape

from . import interp_cases
from .lora_cases import TOLERANCES, make_problem, shrink_defined_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Llama-3-8B: hidden 4096, 32 q heads / 8 kv heads of 128, intermediate 14336.
PROJECTIONS = {
    "qkv": (4096, [4096, 1024, 1024]),
    "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
    "o": (4096, [4096]),
}


@pytest.mark.parametrize("num_tokens,composition,block_m", [  # block_m None: auto (16, 16, 16, 32)
    (1, "uniform", None), (7, "no-adapter-rows", None), (256, "mixed-ranks", None), (1024, "zipf:1.5", None),
    (2048, "no-adapter-rows", 64),
])
@pytest.mark.parametrize("proj", list(PROJECTIONS))
def test_llama3_8b_shapes_bf16(proj: str, num_tokens: int, composition: str, block_m: int | None) -> None:
    hidden, widths = PROJECTIONS[proj]
    S, R, L = len(widths), 64, 32
    p = make_problem(num_tokens=num_tokens, hidden=hidden, max_rank=R, widths=widths, num_slots=L,
                     composition=composition, dtype=torch.bfloat16, seed=num_tokens, device="cuda")
    meta = LoRAMetaBuilder(4096, L, "cuda").build(p.token_slot, block_m=block_m)
    buf_tri = torch.full((S, num_tokens, R), float("nan"), device="cuda")
    buf_ref = buf_tri.clone()
    lora_shrink(p.x, p.lora_a, meta, p.ranks, buf_tri)
    lora_shrink_ref(p.x, p.lora_a, meta, p.ranks, buf_ref)
    defined = shrink_defined_mask(p, R, S)
    # bf16 x bf16 products are exact in fp32: only the summation order differs.
    torch.testing.assert_close(buf_tri[defined], buf_ref[defined], rtol=1e-3, atol=1e-3)

    # y as a column view of a wider output, as a fused projection's output would be.
    wide = torch.randn(num_tokens, sum(widths) + 64, device="cuda", dtype=torch.bfloat16)
    y_tri = wide[:, 32:32 + sum(widths)]
    y_tri.copy_(p.y0)
    y_ref = p.y0.clone()
    lora_expand(buf_ref, p.lora_b, p.slice_offsets, meta, p.ranks, y_tri)
    lora_expand_ref(buf_ref, p.lora_b, p.slice_offsets, meta, p.ranks, y_ref)
    torch.testing.assert_close(y_tri.float(), y_ref.float(), **TOLERANCES[torch.bfloat16])
    untouched = (p.token_slot < 0) | (p.ranks[p.token_slot.clamp(min=0).long()] == 0)
    assert torch.equal(y_tri[untouched], p.y0[untouched])
    rel = (y_tri.float() - y_ref.float()).norm() / (y_ref.float() - p.y0.float()).norm()
    assert rel < 1e-2, f"relative error of the LoRA delta {rel:.2e}"


FUSED_CASES = [(1, "uniform", 16), (1, "mixed-ranks", 64), (2, "identical", 64), (3, "mixed-ranks", 16),
               (4, "distinct", 16)]


def _fused_cases_in_this_process() -> int:
    """Run every fused case that fits the one-launch kernel; returns how many ran."""
    from loraserve.kernels.lora_fused import fused_plan

    ran = 0
    for proj, (hidden, widths) in PROJECTIONS.items():
        for num_tokens, composition, max_rank in FUSED_CASES:
            if fused_plan(num_tokens, 8, 16, max_rank, hidden, sum(widths), len(widths),
                          torch.device("cuda")) is None:
                continue  # grid too large for the fused kernel: lora_apply takes two launches
            interp_cases.check_fused_matches_reference("bfloat16", hidden, max_rank, widths, num_tokens, 8,
                                                       composition, device="cuda")
            ran += 1
    import importlib

    importlib.import_module("loraserve.kernels.lora_apply").FUSED_ENABLED = True  # this child only
    check_graph_replay_matches_eager(1, 16)  # lora_apply takes the fused kernel: replay == eager
    return ran


def test_fused_one_launch_llama3_8b_bf16() -> None:
    """The one-launch kernel with its spin grid barrier, each case run twice (identical bits,
    counters reset), in a child process with a time limit: a barrier that never opens must
    fail this test, not hang the suite."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("from tests.kernels.test_lora_gpu import _fused_cases_in_this_process as f; "
            "n = f(); assert n >= 8, n; print('fused cases', n)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("fused LoRA kernel did not finish in 240 s: its grid barrier deadlocked")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("num_tokens,split_k", [(64, 8), (300, 3)])
@pytest.mark.parametrize("proj", ["qkv", "down"])
def test_split_k_partials_llama3_8b_bf16(proj: str, num_tokens: int, split_k: int) -> None:
    hidden, widths = PROJECTIONS[proj]
    interp_cases.check_partials_path_matches_reference("bfloat16", hidden, 16, widths, num_tokens, 32,
                                                       "no-adapter-rows", split_k, device="cuda")


# rank 16: the partials path (expand sums split-K partials); rank 64: shrink, sum, expand.
@pytest.mark.parametrize("num_tokens,max_rank", [(1, 16), (8, 64), (64, 16), (256, 64)])
def test_cuda_graph_replay_matches_eager_bitwise(num_tokens: int, max_rank: int) -> None:
    check_graph_replay_matches_eager(num_tokens, max_rank)


def check_graph_replay_matches_eager(num_tokens: int, max_rank: int) -> None:
    hidden, widths = PROJECTIONS["qkv"]
    S, R, L, T = len(widths), max_rank, 32, num_tokens
    first = make_problem(num_tokens=T, hidden=hidden, max_rank=R, widths=widths, num_slots=L,
                         composition="identical", dtype=torch.bfloat16, seed=1, device="cuda")
    builder = LoRAMetaBuilder(T, L, "cuda")
    meta = builder.build(first.token_slot)
    x, y, y_init = first.x.clone(), first.y0.clone(), first.y0.clone()
    buf = torch.empty(workspace_shape(x, first.lora_a, first.lora_b, meta), device="cuda")
    args = (first.lora_a, first.lora_b, first.slice_offsets, meta, first.ranks)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        lora_apply(x, y, *args, buf=buf)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(y_init)
        lora_apply(x, y, *args, buf=buf)

    # Replay with a different batch: new slots (many segments, no-adapter rows), new inputs.
    for composition in ("no-adapter-rows", "mixed-ranks", "distinct"):
        nxt = make_problem(num_tokens=T, hidden=hidden, max_rank=R, widths=widths, num_slots=L,
                           composition=composition, dtype=torch.bfloat16, seed=2, device="cuda")
        builder.build(nxt.token_slot)
        x.copy_(nxt.x)
        y_init.copy_(nxt.y0)
        first.ranks.copy_(nxt.ranks)
        graph.replay()
        torch.cuda.synchronize()
        replayed = y.clone()

        y.copy_(y_init)
        lora_apply(x, y, *args, buf=buf)
        assert torch.equal(replayed, y), f"graph replay differs from eager ({composition})"

        ref_meta = LoRAMetaBuilder(T, L, "cuda").build(nxt.token_slot)
        y_ref = nxt.y0.clone()
        ref_buf = torch.empty(S, T, R, device="cuda")
        lora_shrink_ref(nxt.x, first.lora_a, ref_meta, nxt.ranks, ref_buf)
        lora_expand_ref(ref_buf, first.lora_b, first.slice_offsets, ref_meta, nxt.ranks, y_ref)
        torch.testing.assert_close(replayed.float(), y_ref.float(), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("num_tokens,num_slots,composition,split_k", [
    (1, 1, "uniform", 32), (64, 32, "distinct", 4), (64, 32, "mixed-ranks", 8)])
@pytest.mark.parametrize("proj", ["qkv", "down"])  # 3 slices; the 14336-wide input
def test_stream_expand_llama3_8b_bf16(proj: str, num_tokens: int, num_slots: int, composition: str,
                                      split_k: int) -> None:
    """The streaming expand (default variant) at Llama-3-8B shapes from split-K partials, with
    the DoRA epilogue, vs the reference; and lora_apply with both variants."""
    from . import stream_interp_cases

    hidden, widths = PROJECTIONS[proj]
    stream_interp_cases.check_stream_expand("bfloat16", 64, 64 if composition == "mixed-ranks" else 16,
                                            widths, num_tokens, num_slots, composition, split_k=split_k,
                                            with_scale=num_tokens == 64, device="cuda")
    stream_interp_cases.check_stream_apply("bfloat16", hidden, 16, widths, num_tokens, num_slots, composition,
                                           device="cuda")


@pytest.mark.parametrize("stream", [False, True])
def test_cuda_graph_replay_matches_eager_both_variants(stream: bool) -> None:
    from loraserve.kernels import lora_meta

    old = lora_meta.LORA_STREAM
    lora_meta.LORA_STREAM = stream
    try:
        check_graph_replay_matches_eager(64, 16)
        check_graph_replay_matches_eager(1, 16)
    finally:
        lora_meta.LORA_STREAM = old


ONELAUNCH_CASES = [(1, 1, "uniform", 16), (3, 8, "mixed-ranks", 64), (64, 32, "distinct", 16),
                   (64, 32, "no-adapter-rows", 16), (200, 8, "zipf:1.5", 32)]


def _onelaunch_cases_in_this_process() -> int:
    """Every one-launch case at Llama-3-8B shapes (each run twice: identical bits, counters reset)
    and lora_apply's graph replay with the one-launch path on; returns how many cases ran."""
    from . import onelaunch_cases

    ran = 0
    for proj, (hidden, widths) in PROJECTIONS.items():
        for num_tokens, num_slots, composition, max_rank in ONELAUNCH_CASES:
            onelaunch_cases.check_onelaunch_matches_reference("bfloat16", hidden, max_rank, widths, num_tokens,
                                                              num_slots, composition, device="cuda")
            ran += 1
    import importlib

    importlib.import_module("loraserve.kernels.lora_apply").ONELAUNCH_ENABLED = True  # this child only
    check_graph_replay_matches_eager(1, 16)
    check_graph_replay_matches_eager(64, 16)
    return ran


def test_onelaunch_llama3_8b_bf16() -> None:
    """The ticketed one-launch kernel (spin waits on per-tile counters) in a child process with a
    time limit: a wait that never ends must fail this test, not hang the suite."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("from tests.kernels.test_lora_gpu import _onelaunch_cases_in_this_process as f; "
            "n = f(); assert n == 20, n; print('onelaunch cases', n)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("one-launch LoRA kernel did not finish in 240 s: a wait never ended")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_pdl_graph_replay_and_reference() -> None:
    """LORASERVE_LORA_PDL: the shrink -> streaming expand pair with programmatic dependent launch,
    captured in a CUDA graph: replay == eager bit for bit, and both equal the reference."""
    from loraserve.kernels import lora_meta

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    old = lora_meta.LORA_PDL
    lora_meta.LORA_PDL = True
    try:
        check_graph_replay_matches_eager(64, 16)
        check_graph_replay_matches_eager(1, 16)
        interp_cases.check_partials_path_matches_reference("bfloat16", 4096, 16, [4096, 1024, 1024], 64, 32,
                                                           "no-adapter-rows", 4, device="cuda")
    finally:
        lora_meta.LORA_PDL = old


@pytest.mark.parametrize("dense", ["", "triton"])
@pytest.mark.parametrize("mode", ["shrink", "full"])
def test_overlap_linear_equals_sequential_and_replays(mode: str, dense: str) -> None:
    """LORASERVE_LORA_OVERLAP: LoRABatch.linear with the shrink ("shrink": same bits as GEMM-then-
    apply) or the whole delta ("full": d rounded to bf16 first, so within bf16 tolerance, DoRA
    scale and shift included) on a side stream during the GEMM; graph replay == eager bit for bit.
    dense: LORASERVE_LORA_DENSE for both paths (the dense shrink on the side stream)."""
    import importlib
    import types

    import torch.nn.functional as F

    from loraserve.inference.lora import batch as lora_batch

    hidden, widths = PROJECTIONS["gate_up"]
    p = make_problem(num_tokens=64, hidden=hidden, max_rank=16, widths=widths, num_slots=32,
                     composition="distinct", dtype=torch.bfloat16, seed=3, device="cuda")
    N = sum(widths)
    weight = torch.randn(N, hidden, device="cuda", dtype=torch.bfloat16) / hidden ** 0.5
    slots = types.SimpleNamespace(a={"gate_up": p.lora_a[None]}, b={"gate_up": p.lora_b[None]},
                                  scale={"gate_up": 0.5 + torch.rand(1, 32, N, device="cuda")},
                                  shift={"gate_up": torch.randn(1, 32, N, device="cuda")},
                                  slice_offsets={"gate_up": p.slice_offsets}, ranks=p.ranks)
    meta = LoRAMetaBuilder(64, 32, "cuda").build(p.token_slot)
    old = lora_batch.OVERLAP
    apply_mod = importlib.import_module("loraserve.kernels.lora_apply")
    old_dense, apply_mod.DENSE_MODE = apply_mod.DENSE_MODE, dense
    try:
        assert (apply_mod.choose_path(p.x, p.lora_a, p.lora_b, meta)[0] == "dense") == bool(dense)
        lora_batch.OVERLAP = ""
        seq = lora_batch.LoRABatch(slots, meta)
        y_seq = F.linear(p.x, weight)
        seq.apply(0, "gate_up", p.x, y_seq)
        lora_batch.OVERLAP = mode
        ovl = lora_batch.LoRABatch(slots, meta)
        y_ovl = ovl.linear(0, "gate_up", p.x, weight, None)
        torch.cuda.synchronize()
        if mode == "shrink":
            assert torch.equal(y_ovl, y_seq), "overlapped LoRA differs from the sequential path"
        else:
            torch.testing.assert_close(y_ovl.float(), y_seq.float(), **TOLERANCES[torch.bfloat16])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ovl.linear(0, "gate_up", p.x, weight, None)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ovl.linear(0, "gate_up", p.x, weight, None)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y_ovl), "graph replay of the overlapped LoRA differs from eager"
    finally:
        lora_batch.OVERLAP = old
        apply_mod.DENSE_MODE = old_dense


@pytest.mark.parametrize("num_tokens,num_slots,composition", [
    (1, 1, "uniform"), (64, 32, "distinct"), (64, 32, "mixed-ranks"), (200, 8, "zipf:1.5")])
@pytest.mark.parametrize("proj", ["qkv", "down"])  # 3 slices; the 14336-wide input (14-56 K chunks)
def test_bgmv_shrink_and_y_ahead_llama3_8b_bf16(proj: str, num_tokens: int, num_slots: int, composition: str) -> None:
    """LORASERVE_LORA_BGMV (the BGMV shrink's per-chunk partials) vs the reference at Llama-3-8B
    shapes, then lora_apply with it and each column loop of the streaming expand (pipelined: the
    default; hand-rotated with y 1 / 2 ahead; fixed slots): vs the reference, and graph replay ==
    eager bit for bit."""
    from loraserve.kernels import lora_expand_stream, lora_meta

    from . import bgmv_interp_cases

    hidden, widths = PROJECTIONS[proj]
    rank = 64 if composition == "mixed-ranks" else 16
    bgmv_interp_cases.check_bgmv_shrink("bfloat16", hidden, rank, widths, num_tokens, num_slots, composition,
                                        device="cuda")
    old = (lora_meta.LORA_BGMV, lora_meta.LORA_BGMV_MAX_TOKENS, lora_expand_stream.STREAM_Y_AHEAD,
           lora_expand_stream.STREAM_B_AHEAD, lora_expand_stream.STREAM_SLOTS)
    try:
        lora_meta.LORA_BGMV_MAX_TOKENS = 256
        # column loops: the default rule, Triton-pipelined, hand-rotated with y 1 / 2 ahead, fixed slots
        for slots, y_ahead, b_ahead in ((None, None, None), (-4, None, None), (0, None, None), (0, 2, None),
                                        (3, None, None)):
            lora_expand_stream.STREAM_SLOTS = slots
            lora_expand_stream.STREAM_Y_AHEAD, lora_expand_stream.STREAM_B_AHEAD = y_ahead, b_ahead
            bgmv_interp_cases.check_bgmv_apply("bfloat16", hidden, rank, widths, num_tokens, num_slots, composition,
                                               device="cuda")
            lora_meta.LORA_BGMV = True
            check_graph_replay_matches_eager(num_tokens, rank)
            lora_meta.LORA_BGMV = old[0]
    finally:
        (lora_meta.LORA_BGMV, lora_meta.LORA_BGMV_MAX_TOKENS, lora_expand_stream.STREAM_Y_AHEAD,
         lora_expand_stream.STREAM_B_AHEAD, lora_expand_stream.STREAM_SLOTS) = old


@pytest.mark.parametrize("backend", ["triton", "mm"])
def test_dense_path_llama3_8b_bf16_and_graph_replay(backend: str) -> None:
    """LORASERVE_LORA_DENSE: the dense shrink (every token against every slot) + the streaming expand
    reading each token's own slot, at 64 tokens / 32 slots on qkv and down (14336-wide input): vs the
    float64 reference, rows without an adapter untouched; and a CUDA graph replay == eager bit for bit."""
    import importlib

    from . import dense_interp_cases

    apply_mod = importlib.import_module("loraserve.kernels.lora_apply")
    for proj in ("qkv", "down"):
        hidden, widths = PROJECTIONS[proj]
        dense_interp_cases.check_dense_shrink("bfloat16", hidden, 16, widths, 64, 32, backend, device="cuda")
        for composition in ("distinct", "no-adapter-rows", "mixed-ranks"):
            dense_interp_cases.check_dense_apply("bfloat16", hidden, 16, widths, 64, 32, composition, backend,
                                                 device="cuda")
    old = apply_mod.DENSE_MODE
    apply_mod.DENSE_MODE = backend
    try:
        check_graph_replay_matches_eager(64, 16)
    finally:
        apply_mod.DENSE_MODE = old


@pytest.mark.parametrize("shrink", ["", "triton"])
def test_dense_expand_llama3_8b_bf16_and_graph_replay(shrink: str) -> None:
    """LORASERVE_LORA_DENSE_EXPAND: the dense expand on gate_up (64 tokens / 32 slots, unused slots' B NaN)
    after the tiled or the dense shrink, vs the float64 reference (DoRA epilogue too), rows without an
    adapter untouched; and a CUDA graph replay == eager bit for bit (qkv, all slots)."""
    import importlib

    from . import dense_interp_cases

    hidden, widths = PROJECTIONS["gate_up"]
    for composition, dora in (("distinct", False), ("no-adapter-rows", True), ("mixed-ranks", False)):
        dense_interp_cases.check_dense_expand_apply("bfloat16", hidden, 16, widths, 64, 32, composition, shrink,
                                                    with_scale=dora, device="cuda")
    apply_mod = importlib.import_module("loraserve.kernels.lora_apply")
    old = apply_mod.DENSE_MODE, apply_mod.DENSE_EXPAND, apply_mod.DENSE_EXPAND_MIN_N
    apply_mod.DENSE_MODE, apply_mod.DENSE_EXPAND, apply_mod.DENSE_EXPAND_MIN_N = shrink, True, 1
    try:
        check_graph_replay_matches_eager(64, 16)
    finally:
        apply_mod.DENSE_MODE, apply_mod.DENSE_EXPAND, apply_mod.DENSE_EXPAND_MIN_N = old


@pytest.mark.parametrize("proj", ["qkv", "gate_up", "down"])
def test_expand_bgmv_llama3_8b_bf16_and_graph_replay(proj: str) -> None:
    """LORASERVE_LORA_EXPAND_BGMV: the BGMV-style expand at Llama-3-8B widths (1-64 tokens, split-K partials
    with NaN where undefined) vs the reference, rows without an adapter untouched; then lora_apply through it
    in a CUDA graph == eager bit for bit, and vs the reference (qkv, 1 and 64 tokens)."""
    import importlib

    from . import expand_bgmv_cases

    _, widths = PROJECTIONS[proj]
    for T, L, composition, sk in ((64, 32, "distinct", 4), (64, 8, "no-adapter-rows", 2), (1, 1, "distinct", 4),
                                  (16, 16, "mixed-ranks", 7)):
        expand_bgmv_cases.check_expand_bgmv("bfloat16", 16, widths, T, L, composition, split_k=sk, via_switch=True,
                                            device="cuda")
    for T, L, sk in ((64, 32, 4), (1, 1, 2)):   # the DoRA epilogue with per-slot flags (the engine's call)
        expand_bgmv_cases.check_scale_on("bfloat16", 16, widths, T, L, split_k=sk, bgmv=True, device="cuda")
    mod = importlib.import_module("loraserve.kernels.lora_expand")
    old = mod.EXPAND_BGMV, mod.EXPAND_BGMV_MAX_SLICES
    mod.EXPAND_BGMV, mod.EXPAND_BGMV_MAX_SLICES = True, 3
    try:
        check_graph_replay_matches_eager(64, 16)
        check_graph_replay_matches_eager(1, 16)
        assert not mod._BGMV_FAILED, f"the BGMV expand fell back: {mod._BGMV_FAILED}"
    finally:
        mod.EXPAND_BGMV, mod.EXPAND_BGMV_MAX_SLICES = old
