"""The weight-only FP8 decode GEMV (kernels/fp8_gemv.py) against the torch reference: on the CPU through
Triton's interpreter (a spawned TRITON_INTERPRET=1 worker) on small shapes with N/K tails, both kernels
(CUDA-core gemv for M <= 4, swap-AB tl.dot above), split-K, bias; on the GPU at Llama-3-8B shapes, with
a CUDA-graph replay; plus the config table / heuristic and models/fp8.py's dispatch switch."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import pytest
import torch

from loraserve.kernels import triton_available

from . import fp8_gemm_cases as cases
from .interpreter import interpreter_pool, interpreting
from .sm90 import compile_sm90, offline_triton, resource_usage, stack_bytes


@pytest.fixture(scope="module")
def interp() -> Iterator[ProcessPoolExecutor]:
    if not triton_available():
        pytest.skip("triton not installed")
    yield from interpreter_pool(interpreting)


def _run(pool: ProcessPoolExecutor, fn, *args) -> None:
    pool.submit(fn, *args).result(timeout=300)


@pytest.mark.parametrize("m,n,k,bias,config", [
    (1, 40, 96, False, None),                              # heuristic gemv; K tail (96 < one 128 tile)
    (1, 37, 272, True, ("gemv", 1, 8, 64, 1, 4, 2)),       # odd N (tail tile), K tail 272 = 4 x 64 + 16, prefetch
    (3, 24, 272, True, ("gemv", 4, 8, 64, 3, 4, 2)),       # 3 rows in a 4-row tile; split-K 3 (last split short)
    (3, 40, 128, False, ("gemv", 2, 8, 32, 2, 4, 1)),      # 2-row tiles: rows 0-1, then 2 (+ a masked one); no prefetch
    (2, 24, 256, False, ("gemv", 1, 8, 64, 4, 4, 1)),      # one K tile per program (split = K / BLOCK_K)
    (5, 16, 64, False, ("gemv", 1, 4, 32, 2, 4, 1)),       # 5 one-row tiles side by side, 2 even splits
    (17, 40, 96, True, None),                              # heuristic: tl.dot, 32-row tile, K tail
    (17, 37, 272, False, ("dot", 16, 16, 32, 3, 4, 2)),    # two 16-row tiles, odd N, split-K with a tail
    (1, 37, 272, True, ("gemv4", 1, 4, 64, 3, 4, 2)),      # 4 row groups share x; N tail inside a group; prefetch
    (3, 50, 128, False, ("gemv2", 1, 8, 32, 1, 4, 1)),     # 2 groups, one program per x row (M = 3), 2nd group cut
    (1, 40, 96, True, ("dot16", 16, 16, 32, 1, 4, 2)),     # fp16 MMA operands (x scaled by 2^-4), K tail
    (17, 37, 272, False, ("dot16", 16, 16, 32, 3, 4, 2)),  # ... two row tiles, split-K with a tail
    (17, 40, 96, True, ("dot8", 32, 16, 32, 1, 4, 2)),     # W8A8: x quantized per token, FP8 x FP8 dot
    (5, 37, 272, False, ("dot8", 16, 16, 32, 3, 4, 2)),    # ... split-K with a tail (x's scale before the partials)
    (17, 40, 96, True, ("dot8b", 32, 16, 32, 1, 4, 2)),    # W8A8, x quantized in-kernel per (token, 32-wide K block)
    (5, 37, 272, False, ("dot8b", 16, 16, 32, 3, 4, 2)),   # ... split-K with a tail block (zero-padded amax)
    (1, 37, 256, True, ("gemvh4", 1, 4, 32, 1, 4, 4)),     # fp16 products, 4 K tiles per fp16 partial, N tail
    (3, 50, 384, False, ("gemvh2", 1, 8, 32, 3, 4, 2)),    # 2 groups, 3 x rows, split-K 3 (whole chunks each)
    (1, 24, 272, False, ("gemvh4", 1, 4, 64, 1, 4, 2)),    # a K tail: the fp32 gemv4 instead
])
@pytest.mark.parametrize("dtype", ["float16", "float32"])   # the interpreter mishandles bf16
def test_gemv_interp(interp, dtype, m, n, k, bias, config) -> None:
    _run(interp, cases.check_gemv, dtype, m, n, k, bias, "cpu", config)


@pytest.mark.parametrize("m,n,k,config", [
    (1, 48, 256, ("gemv2", 1, 4, 32, 1, 4, 1)),         # gate row i with up row 24 + i; SiLU-mul in the epilogue
    (3, 48, 272, ("gemv2", 1, 4, 32, 3, 4, 1)),         # 3 x rows, K tail, split 3: SiLU-mul in the split-K sum
    (1, 48, 256, ("gemv4", 1, 2, 32, 1, 4, 2)),         # 4 groups: 2 gate blocks + their up blocks; prefetch
    (1, 48, 256, ("gemvh2", 1, 4, 64, 1, 4, 4)),        # fp16 products, one chunk of 4 K tiles
    (1, 48, 256, ("gemvh4", 1, 2, 32, 2, 4, 2)),        # ... 4 groups, split-K 2
])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gemv_silu_interp(interp, dtype, m, n, k, config) -> None:
    """fp8_gemv(silu=True): the torch reference, and the unfused GEMV + silu_and_mul bit for bit."""
    _run(interp, cases.check_gemv_silu, dtype, m, n, k, "cpu", config)


@pytest.mark.parametrize("m,config", [(1, ("gemv2", 1, 4, 32, 2, 4, 1, True)), (1, ("gemv", 1, 4, 64, 3, 4, 1)),
                                      (1, ("gemv2", 1, 4, 32, 1, 4, 1)),
                                      (5, ("dot8", 16, 16, 32, 3, 4, 2))])   # W8A8 tiles: x-scaled partials
def test_gemv_defer_sum_interp(interp, m, config) -> None:
    """fp8_gemv(defer_sum=True): the unsummed partials (models/fp8_fused.py sums them in the next layer's norm)."""
    _run(interp, cases.check_gemv_defer_sum, "float16", m, 40, 256, config)


@pytest.mark.parametrize("m,n,k,config", [
    (17, 37, 272, ("dot", 16, 16, 32, 3, 4, 2)),      # two row tiles x 3 N tiles, 3 splits (the last one short)
    (5, 40, 256, ("dot16", 16, 16, 32, 4, 4, 2)),     # fp16 operands, 4 even splits
    (5, 37, 272, ("dot8", 16, 16, 32, 3, 4, 2)),      # W8A8
])
def test_gemv_splitk_fixup_interp(interp, m, n, k, config) -> None:
    _run(interp, cases.check_gemv_fixup, "float16", m, n, k, config)


def _check_gemv_pdl_mode(mode: str, *args) -> None:
    # in the interpreter worker: LORASERVE_FP8_GEMV_PDL=early peels the first K tile (no PDL on the CPU: the peeled
    # tile and the loop after it are what runs), 0 the plain loop
    import os

    os.environ["LORASERVE_FP8_GEMV_PDL"] = mode
    try:
        cases.check_gemv(*args)
    finally:
        os.environ.pop("LORASERVE_FP8_GEMV_PDL")


@pytest.mark.parametrize("m,n,k,bias,config", [
    (1, 37, 272, True, ("gemv", 1, 8, 64, 1, 4, 1)),       # K tail in the last tile; one split
    (3, 24, 272, True, ("gemv", 4, 8, 64, 3, 4, 1)),       # 3 rows in a 4-row tile; split-K 3 (last split short)
    (1, 40, 64, False, ("gemv", 1, 4, 64, 1, 4, 1)),       # the peeled tile is the only one
    (1, 37, 272, True, ("gemv4", 1, 4, 64, 3, 4, 1)),      # 4 groups share x; N tail inside a group; split-K
    (3, 50, 128, False, ("gemv2", 1, 8, 32, 1, 4, 1)),     # 2 groups, one program per x row
    (5, 37, 272, False, ("dot8", 16, 16, 32, 3, 4, 2)),    # dot kinds: a plain dependent (no peel)
    (1, 37, 256, True, ("gemvh4", 1, 4, 32, 2, 4, 2)),     # fp16 products: the first chunk peeled, split-K 2
    (3, 24, 128, False, ("gemvh2", 1, 8, 32, 1, 4, 4)),    # ... the peeled chunk is the only one
])
@pytest.mark.parametrize("mode", ["early", "0"])
def test_gemv_pdl_mode_interp(interp, mode, m, n, k, bias, config) -> None:
    _run(interp, _check_gemv_pdl_mode, mode, "float16", m, n, k, bias, "cpu", config)


@pytest.mark.parametrize("x_mag", [1e5, 1e-3])   # outliers past fp16's range (x is scaled by 2^-4), tiny activations
def test_gemv_dot16_range_interp(interp, x_mag) -> None:
    _run(interp, cases.check_gemv, "float32", 5, 24, 128, False, "cpu", ("dot16", 16, 16, 64, 1, 4, 2), x_mag)


def test_gemv_configs() -> None:
    """Every config fp8_gemv would pick for the 8B decode shapes (table or heuristic) is valid: gemv tiles
    of 1/2/4 rows, dot tiles of 16-64 rows, whole K tiles per split, and >= 1 program per SM (132)."""
    from loraserve.kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton not installed")
    from loraserve.kernels import fp8_gemv as fg

    for m in range(1, 65):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
            kind, bm, bn, bk, split, warps, stages = fg.gemv_config(m, n, k, 132)[:7]
            assert kind in fg.KINDS and warps in (1, 2, 4, 8, 16)
            if kind.startswith("gemv"):
                assert bm in (1, 2, 4) and (kind == "gemv" or bm == 1)
                bn *= 1 if kind == "gemv" else int(kind[-1])   # rows per program
            else:
                assert 16 <= bm <= 64 and bm >= min(m, 16)
            assert k % bk == 0 and split >= 1 and k >= split * bk
            assert -(-n // bn) * -(-m // bm) * split >= 132, (m, n, k, fg.gemv_config(m, n, k, 132))
    assert fg.m_bucket(1) == 1 and fg.m_bucket(3) == 4 and fg.m_bucket(33) == 64 and fg.m_bucket(100) == 100


def test_env_config_table(tmp_path, monkeypatch) -> None:
    """LORASERVE_FP8_GEMV_CONFIGS (the sweep's --configs-out) overrides the table; a bad file is ignored."""
    if not triton_available():
        pytest.skip("triton not installed")
    import json

    from loraserve.kernels import fp8_gemv as fg
    from loraserve.kernels import fp8_gemv_configs as fc

    cfg = ["gemv", 1, 16, 256, 2, 4, 1]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"1,4096,4096": cfg, "4,4096,4096": ["dot16", 16, 64, 128, 2, 4, 3, True]}))
    monkeypatch.setattr(fc, "CONFIGS", {})
    monkeypatch.setattr(fc, "_env_loaded", False)
    monkeypatch.setenv("LORASERVE_FP8_GEMV_CONFIGS", str(path))
    assert fg.gemv_config(1, 4096, 4096, 132) == tuple(cfg)
    assert fg.gemv_config(3, 4096, 4096, 132) == ("dot16", 16, 64, 128, 2, 4, 3, True)
    assert fg.gemv_config(2, 4096, 4096, 132) == ("dot16", 16, 64, 128, 2, 4, 3, True)   # bucket 2 takes 4's
    assert fg.gemv_config(1, 4096, 14336, 132) == fg.heuristic_config(1, 4096, 14336, 132)   # in neither table
    monkeypatch.setattr(fc, "CONFIGS", {})
    monkeypatch.setattr(fc, "_env_loaded", False)
    monkeypatch.setenv("LORASERVE_FP8_GEMV_CONFIGS", str(tmp_path / "missing.json"))
    assert fg.gemv_config(1, 4096, 4096, 132) == fg.heuristic_config(1, 4096, 4096, 132)


def test_dispatch_gemv(monkeypatch) -> None:
    """fp8_linear's choice from (device, M, env): CPU always dequantizes; on CUDA (sm >= 89) M <=
    LORASERVE_FP8_GEMV_MAX_M takes the GEMV kernels, above it _scaled_mm, except projections below
    W8A8_MIN_WEIGHTS (LORASERVE_FP8_ACT_QUANT=auto), which stay weight-only at every M; bad values are clear errors."""
    from loraserve.inference.models import fp8

    small = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    big = torch.zeros(1024, fp8.W8A8_MIN_WEIGHTS // 1024, dtype=torch.float8_e4m3fn)
    assert fp8.gemm_path(torch.zeros(1, 64), small) == "dequant"
    monkeypatch.delenv("LORASERVE_FP8_GEMV_MAX_M", raising=False)
    monkeypatch.delenv("LORASERVE_FP8_ACT_QUANT", raising=False)
    assert fp8.gemv_max_m() == fp8.DEFAULT_GEMV_MAX_M == 64
    assert fp8.act_quant_mode() == "auto"
    assert fp8.activations_quantized(big) and not fp8.activations_quantized(small)
    monkeypatch.setenv("LORASERVE_FP8_ACT_QUANT", "on")
    assert fp8.activations_quantized(small)
    monkeypatch.setenv("LORASERVE_FP8_ACT_QUANT", "off")
    assert not fp8.activations_quantized(big)
    monkeypatch.setenv("LORASERVE_FP8_ACT_QUANT", "sometimes")
    with pytest.raises(ValueError, match="LORASERVE_FP8_ACT_QUANT"):
        fp8.act_quant_mode()
    monkeypatch.delenv("LORASERVE_FP8_ACT_QUANT")
    monkeypatch.setenv("LORASERVE_FP8_GEMV_MAX_M", "0")
    assert fp8.gemv_max_m() == 0
    monkeypatch.setenv("LORASERVE_FP8_GEMV_MAX_M", "lots")
    with pytest.raises(ValueError, match="LORASERVE_FP8_GEMV_MAX_M"):
        fp8.gemv_max_m()
    if torch.cuda.is_available() and triton_available() and torch.cuda.get_device_capability() >= (8, 9):
        wc, bc = small.cuda(), big.cuda()
        def x(m: int, w: torch.Tensor) -> torch.Tensor:
            return torch.zeros(m, w.shape[1], dtype=torch.bfloat16, device="cuda")

        monkeypatch.setenv("LORASERVE_FP8_GEMV_MAX_M", "16")
        assert fp8.gemm_path(x(16, bc), bc) == "gemv" and fp8.gemm_path(x(17, bc), bc) == "scaled_mm"
        assert fp8.gemm_path(x(4096, wc), wc) == "gemv"   # small: weight-only at every M
        monkeypatch.setenv("LORASERVE_FP8_GEMV_MAX_M", "0")
        assert fp8.gemm_path(x(1, bc), bc) == "scaled_mm"
        monkeypatch.setenv("LORASERVE_FP8_ACT_QUANT", "on")
        assert fp8.gemm_path(x(17, wc), wc) == "scaled_mm"


def test_weight_only_config_never_dot8() -> None:
    """gemv_config(weight_only=True) keeps x unquantized where the table's bucket-64 entry is W8A8 (dot8)."""
    if not triton_available():
        pytest.skip("triton not installed")
    from loraserve.kernels import fp8_gemv as fg

    for m in (33, 64, 100, 2048):
        for n, k in ((6144, 4096), (4096, 14336), (256, 128)):
            cfg = fg.gemv_config(m, n, k, 132, weight_only=True)
            assert cfg[0] not in fg.W8A8_KINDS and k >= cfg[4] * cfg[3], (m, n, k, cfg)
    assert fg.gemv_config(64, 6144, 4096, 132)[0] == "tw"     # the default at bucket 64 (LORASERVE_FP8_W8A8=auto)
    assert fg.gemv_config(64, 28672, 4096, 132)[0] == "dot8"


def test_w8a8_and_half_switches(monkeypatch) -> None:
    """LORASERVE_FP8_W8A8 forces one W8A8 kind at bucket 64 (auto, the default: the table's per shape);
    LORASERVE_FP8_GEMV_HALF (default on) takes the fp16-product gemvh at M = 1 for the shapes measured, down excepted
    (0: the fp32 CUDA-core kinds)."""
    if not triton_available():
        pytest.skip("triton not installed")
    from loraserve.kernels import fp8_gemv as fg

    for mode, kind in (("token", "dot8"), ("block", "dot8b"), ("tensorwise", "tw")):
        monkeypatch.setenv("LORASERVE_FP8_W8A8", mode)
        assert {fg.gemv_config(48, n, k, 132)[0] for n, k in ((6144, 4096), (28672, 4096), (4096, 14336))} == {kind}
    monkeypatch.setenv("LORASERVE_FP8_W8A8", "nope")
    with pytest.raises(ValueError, match="LORASERVE_FP8_W8A8"):
        fg.gemv_config(64, 6144, 4096, 132)
    monkeypatch.setenv("LORASERVE_FP8_W8A8", "auto")
    assert [fg.gemv_config(64, n, k, 132)[0] for n, k in ((6144, 4096), (28672, 4096), (4096, 14336))] == \
        ["tw", "dot8", "tw"]
    assert fg.gemv_config(1, 28672, 4096, 132)[0] == "gemvh2"   # the default: fp16 products
    assert fg.gemv_config(1, 128256, 4096, 132)[0] == "gemvh2"  # the FP8 LM head
    monkeypatch.setenv("LORASERVE_FP8_GEMV_HALF", "0")
    assert fg.gemv_config(1, 28672, 4096, 132)[0] == "gemv2" and fg.gemv_config(1, 128256, 4096, 132)[0] == "gemv"
    monkeypatch.setenv("LORASERVE_FP8_GEMV_HALF", "1")
    assert fg.gemv_config(1, 28672, 4096, 132)[0] == "gemvh2" and fg.gemv_config(1, 4096, 14336, 132)[0] == "gemv2"
    assert fg.gemv_config(1, 256, 128, 132)[0] == "gemv"   # a shape not measured: the fp32 kind


def _gpu_fp8() -> bool:
    return torch.cuda.is_available() and triton_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16, 33, 64])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (28672, 4096), (4096, 4096)])
def test_gemv_gpu(dtype, m, n, k) -> None:
    cases.check_gemv(dtype, m, n, k, bias=(m == 3), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [("gemv", 1, 8, 512, 1, 4, 1), ("gemv", 4, 4, 512, 4, 4, 2),
                                    ("gemv4", 1, 4, 512, 2, 4, 1), ("gemv2", 1, 8, 256, 1, 8, 2),
                                    ("dot", 16, 64, 128, 4, 4, 3), ("dot", 64, 128, 64, 2, 4, 3),
                                    ("dot16", 16, 64, 128, 4, 4, 3), ("dot16", 64, 128, 64, 2, 4, 3),
                                    ("gemv4", 1, 4, 512, 2, 4, 1, True), ("dot", 16, 64, 128, 8, 4, 3, True),
                                    ("dot8", 64, 128, 128, 4, 4, 3), ("dot8", 16, 64, 128, 1, 4, 3),
                                    ("dot8b", 64, 128, 128, 4, 4, 3), ("dot8b", 64, 64, 128, 1, 4, 3),
                                    ("tw", 64, 64, 128, 1, 4, 3), ("gemvh4", 1, 1, 1024, 1, 2, 4),
                                    ("gemvh2", 1, 4, 512, 2, 4, 2)])
def test_gemv_gpu_forced_configs(config) -> None:
    _forced_configs(config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [("dot8", 64, 128, 128, 8, 4, 3, True), ("dot16", 16, 64, 128, 4, 2, 3),
                                    ("dot", 64, 64, 64, 4, 4, 3)])
def test_gemv_gpu_splitk_fixup(config, monkeypatch) -> None:
    """The in-kernel split-K sum (LORASERVE_FP8_SPLITK_FIXUP=1) at real shapes, twice in a row (counters reset)."""
    monkeypatch.setenv("LORASERVE_FP8_SPLITK_FIXUP", "1")
    _forced_configs(config)
    _forced_configs(config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [None, ("gemv2", 1, 4, 512, 1, 4, 1), ("gemvh2", 1, 4, 512, 2, 4, 4, True),
                                    ("gemv4", 1, 4, 512, 2, 4, 1)])
def test_gemv_silu_gpu(config) -> None:
    """gate_up GEMV + SiLU-and-mul in one kernel (or in the split-K sum) at the 8B shape: the reference, and the
    unfused GEMV + silu_and_mul bit for bit (None: the table's one-token config, gemvh2 split 2)."""
    cases.check_gemv_silu("bfloat16", 1, 28672, 4096, "cuda", config)


def _forced_configs(config) -> None:
    # every kernel kind at a real shape, with and without split-K, tails included (N 4100, M 3/17)
    cases.check_gemv("bfloat16", 3 if config[0] == "gemv" else 17, 4100, 4096, True, "cuda", config)
    cases.check_gemv("bfloat16", 1, 4096, 14336, False, "cuda", config)
    # outliers past fp16's range; gemvh's fp16 partials hold |x| < 9362 (GEMVH_X_SCALE): outliers of 1e3 there
    cases.check_gemv("bfloat16", 5, 4096, 4096, False, "cuda", config, x_mag=1e3 if config[0].startswith("gemvh") else 1e5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,config", [(1, None), (4, None), (64, None), (1, ("gemv", 1, 4, 512, 4, 4, 1, True)),
                                      (64, ("dot16", 64, 64, 64, 8, 4, 3, True))])
@pytest.mark.parametrize("switch", [None, "LORASERVE_FP8_GEMV_PDL", "LORASERVE_FP8_SPLITK_FIXUP", "early"])
def test_gemv_cuda_graph_replay(m, config, switch, monkeypatch) -> None:
    """Captured in a CUDA graph (workspace allocated in the graph's pool), replay equals eager bit for bit;
    also with the split-K sum as a programmatic dependent launch (config[7]), with the GEMV itself launched
    as one (LORASERVE_FP8_GEMV_PDL=1), and with the split-K partials summed in-kernel (LORASERVE_FP8_SPLITK_FIXUP=1:
    deterministic, so also bit for bit)."""
    from loraserve.kernels.fp8_gemv import fp8_gemv

    monkeypatch.setenv("LORASERVE_FP8_GEMV_PDL", "0")
    monkeypatch.setenv("LORASERVE_FP8_SPLITK_FIXUP", "0")
    if switch == "early":   # LORASERVE_FP8_GEMV_PDL=early: dependents that load their first weight tile early
        monkeypatch.setenv("LORASERVE_FP8_GEMV_PDL", "early")
    elif switch:
        monkeypatch.setenv(switch, "1")

    w_q, w_scale = cases.make_weight(4096, 14336, 0, "cuda")
    x = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)
    eager = fp8_gemv(x, w_q, w_scale, config=config)
    out = torch.empty_like(eager)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8_gemv(x, w_q, w_scale, out=out, config=config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_gemv(x, w_q, w_scale, out=out, config=config)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 4, 64])
def test_fp8_linear_gemv_path_gpu(m, monkeypatch) -> None:
    """fp8_linear through the GEMV path (dispatch on) within bf16 rounding of the weight-only reference."""
    from loraserve.inference.models import fp8

    if not _gpu_fp8():
        pytest.skip("FP8 path needs sm >= 89")
    monkeypatch.setenv("LORASERVE_FP8_GEMV_MAX_M", "64")
    w_q, w_scale = cases.make_weight(6144, 4096, 5, "cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    assert fp8.gemm_path(x, w_q) == "gemv"
    y = fp8.fp8_linear(x, w_q, w_scale, None).float()
    if m > 32:   # the table's W8A8 bucket (dot8): x rounded per token as _scaled_mm's path rounds it
        x_q, x_s = cases.per_token_quant_fp8(x)
        x = x_q.float() * x_s
    ref = x.float() @ (w_q.float() * w_scale[:, None]).t()
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    assert not fp8._BROKEN, fp8._BROKEN


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines launch the kernels instead")
def test_gemv_tiles_compile_for_sm90_without_spills() -> None:
    """No GPU here: compile the tiles the table / heuristic picks for the 8B decode shapes ahead of time for
    sm_90 (Triton's bundled ptxas) and read the cubin's resources: a tile that does not compile or spills
    registers to local memory would otherwise first show on the H200."""
    import re

    offline_triton()
    from loraserve.kernels import fp8_gemv as fg

    sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16",
           "ws_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_xm": "i32",
           "stride_ym": "i32"}
    # what the launch specialises: 16-byte aligned pointers, N, K, the split length and strides divisible by 16
    aligned = [name for name in sig if name != "M"]
    variants = set()
    for m in fg.M_BUCKETS:
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
            kind, bm, bn, bk, split, warps, stages = fg.gemv_config(m, n, k, 132)[:7]
            if not kind.startswith(("tw", "gemvh")):   # cuBLAS (tw), and gemvh's own kernel: checked below
                variants.add((kind, bm, bn, bk, split > 1, warps, stages))
    # and a few of the other kinds the sweep's table (LORASERVE_FP8_GEMV_CONFIGS) may pick
    variants |= {("gemv4", 1, 4, 512, False, 4, 1), ("gemv4", 1, 4, 512, True, 4, 2), ("gemv2", 1, 4, 512, False, 4, 1),
                 ("dot16", 16, 64, 128, True, 4, 3), ("dot16", 64, 64, 64, False, 4, 3), ("dot8", 64, 128, 128, True, 4, 3),
                 ("dot8f", 64, 64, 128, True, 4, 3), ("dot8b", 64, 128, 128, True, 4, 3), ("dot8b", 64, 64, 128, False, 4, 3)}
    # LORASERVE_FP8_GEMV_PDL=early (EARLY): launched as a dependent that loads its first weight tile before the wait
    early = {(v, True) for v in variants if v[0].startswith("gemv") and v[6] == 1} | {(("dot8", 64, 128, 128, True, 4, 3), True)}
    for (kind, bm, bn, bk, use_ws, warps, stages), is_early in sorted({(v, False) for v in variants} | early):
        constexprs = {"HAS_BIAS": False, "EVEN_K": True, "USE_WS": use_ws, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                      "PDL": use_ws and kind == "dot",   # the dependent-launch trigger on a few
                      "WAIT": not use_ws or is_early,   # and the in-kernel wait of a GEMV launched as a dependent
                      "EARLY": is_early}
        fn = {"gemv": fg._fp8_gemv_kernel, "gemv2": fg._fp8_gemv_groups_kernel,
              "gemv4": fg._fp8_gemv_groups_kernel}.get(kind, fg._fp8_skinny_dot_kernel)
        if kind.startswith("gemv"):
            constexprs["PREFETCH"] = stages >= 2
            if kind != "gemv":
                del constexprs["BLOCK_M"]
                constexprs["GROUPS"] = int(kind[-1])
                constexprs["SILU"] = False   # kernels/fp8_gemv_silu.py's form: tests/kernels/test_fp8_fused_compile.py
        else:
            constexprs["F16"] = kind == "dot16"
            constexprs["FP8X"] = kind.startswith("dot8")
            constexprs["XQ"] = kind == "dot8b"           # x quantized in-kernel per (token, K block)
            constexprs["PRECISE"] = kind != "dot8f"      # the FP8 MMA's partials promoted to fp32 every K tile
            constexprs["FIXUP"] = use_ws   # the split-K partials summed by each tile's last program
        base = sig if kind.startswith("gemv") else {**sig, "x16_scale": "fp32", "xs_ptr": "*fp32", "cnt_ptr": "*i32",
                                                    "SPLITS": "i32",
                                                    **({"x_ptr": "*fp8e4nv"} if kind in ("dot8", "dot8f") else {})}
        kernel = compile_sm90(fn, base, constexprs, div16=aligned, num_warps=warps,
                              num_stages=1 if kind.startswith("gemv") else stages, launch_pdl=constexprs["WAIT"])
        assert stack_bytes(kernel) == 0, (kind, bm, bn, bk, use_ws, warps, stages, resource_usage(kernel))
        # the weight stream: 16-byte vector loads into registers (gemv kinds), or cp.async into shared
        # memory, pipelined over num_stages (dot kinds; 8-byte copies for the e4m3 tile in the SASS)
        ptx = kernel.asm["ptx"]
        assert not kind.startswith("dot8") or re.search(r"wgmma\.mma_async[\w.]*\.e4m3\.e4m3", ptx)   # FP8 MMA
        assert kind != "dot8b" or "cvt.rn.satfinite.e4m3x2.f32" in ptx   # x rounded to e4m3 in-kernel
        assert re.search(r"ld\.global[\w:.]*\.v4" if kind.startswith("gemv") else r"cp\.async\.c[ag]\.shared\.global",
                         ptx), kind
        assert not constexprs["PDL"] or "griddepcontrol.launch_dependents" in ptx
        assert ("griddepcontrol.wait" in ptx) == constexprs["WAIT"]
        # the weights' L2 prefetch before the wait (LORASERVE_FP8_GEMV_PDL=1), or (early) the first weight tile
        assert ("prefetch.global.L2" in ptx) == (constexprs["WAIT"] and not is_early)
        assert not constexprs["WAIT"] or is_early or ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")
        if is_early and kind.startswith("gemv"):
            assert re.search(r"ld\.global[\w:.]*\.v4", ptx[:ptx.index("griddepcontrol.wait")]), kind
        assert not constexprs.get("FIXUP") or re.search(r"atom\.[\w.]*acq_rel[\w.]*\.add", ptx), kind
        # dot16 scales x by 2^-4 in fp32 before rounding to fp16; a constant scale was moved after the rounding
        # by Triton (mul.f16x2: overflow for |x| > 65504), hence the runtime argument
        assert kind != "dot16" or "mul.f16x2" not in ptx
    ptx = compile_sm90(fg._splitk_sum_kernel, {"ws_ptr": "*fp32", "s_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16",
                                               "M": "i32", "N": "i32", "SPLITS": "i32", "stride_ym": "i32"},
                       {"HAS_BIAS": True, "BLOCK": 1024, "PDL": True}, num_warps=4, launch_pdl=True).asm["ptx"]
    assert "griddepcontrol.wait" in ptx
    # gemvh: the fp16-product GEMV (packed f16x2 FMAs into fp16 partials), no spills, at the sweep's tiles
    for groups, bn, bk, warps, flush, use_ws, early in ((4, 1, 1024, 2, 4, False, True), (4, 1, 2048, 4, 2, True, False),
                                                        (2, 4, 512, 4, 4, False, True)):
        constexprs = {"HAS_BIAS": False, "USE_WS": use_ws, "GROUPS": groups, "BLOCK_N": bn, "BLOCK_K": bk, "FLUSH": flush,
                      "PDL": False, "WAIT": True, "EARLY": early, "SILU": False}
        kernel = compile_sm90(fg._fp8_gemv_half_kernel, {**sig, "x16_scale": "fp32"}, constexprs, div16=aligned,
                              num_warps=warps, num_stages=1, launch_pdl=True)
        assert stack_bytes(kernel) == 0, (groups, bn, bk, resource_usage(kernel))
        ptx = kernel.asm["ptx"]
        assert "fma.rn.f16x2" in ptx and "griddepcontrol.wait" in ptx and re.search(r"ld\.global[\w:.]*\.v4", ptx)
        # EARLY: the first weight tiles' 16-byte loads are issued before the wait
        assert bool(re.search(r"ld\.global[\w:.]*\.v4", ptx[:ptx.index("griddepcontrol.wait")])) == early


def test_tile64_overrides(monkeypatch) -> None:
    """LORASERVE_FP8_TILE64 replaces the 33..64-token bucket's config of the shapes it names (read at each call), and
    a malformed item is refused with the expected form."""
    from loraserve.kernels import fp8_gemv_configs as fg

    table = fg.gemv_config(64, 6144, 4096, 132)
    monkeypatch.setenv("LORASERVE_FP8_TILE64", "6144x4096=dot8:64:64:128:4:4:3")
    assert fg.gemv_config(64, 6144, 4096, 132) == ("dot8", 64, 64, 128, 4, 4, 3)
    assert fg.gemv_config(40, 6144, 4096, 132) == ("dot8", 64, 64, 128, 4, 4, 3)   # bucket 64
    assert fg.gemv_config(16, 6144, 4096, 132) == fg.CONFIGS[(16, 6144, 4096)]      # other buckets untouched
    assert fg.gemv_config(64, 4096, 4096, 132) == fg.CONFIGS[(64, 4096, 4096)]      # other shapes untouched
    monkeypatch.setenv("LORASERVE_FP8_TILE64", "6144x4096=dot9:64:64:128:4:4:3")
    with pytest.raises(ValueError, match="NxK=kind"):
        fg.gemv_config(64, 6144, 4096, 132)
    monkeypatch.delenv("LORASERVE_FP8_TILE64")
    assert fg.gemv_config(64, 6144, 4096, 132) == table
