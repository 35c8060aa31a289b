"""The FP8 LM head at batch steps (models/fp8_head.py, LORASERVE_FP8_LM_HEAD_BATCH_MAX_M): W8A8 logits for steps of 5..N
rows with each row's top-8 chunk argmaxes recomputed from the bf16 head, so the argmax stays the bf16 head's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraserve.inference.models.fp8 import quantize_per_channel
from loraserve.inference.models.fp8_head import Fp8Head, lm_head_batch_config, lm_head_batch_max_m


def _head(v: int, h: int, device: str) -> tuple[Fp8Head, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(v, h, generator=g) * 0.02).to(device, torch.bfloat16)
    w_q, s = quantize_per_channel(w)
    return Fp8Head(w_q, s, exact=w, rescore=8), w


def test_switches(monkeypatch) -> None:
    monkeypatch.delenv("LORASERVE_FP8_LM_HEAD_BATCH_MAX_M", raising=False)
    monkeypatch.delenv("LORASERVE_FP8_LM_HEAD_BATCH_CFG", raising=False)
    assert lm_head_batch_max_m() == 64 and lm_head_batch_config() == ("dot8", 64, 64, 128, 1, 4, 3)
    monkeypatch.setenv("LORASERVE_FP8_LM_HEAD_BATCH_CFG", "tw:64:64:128:1:4:3")
    assert lm_head_batch_config() == ("tw", 64, 64, 128, 1, 4, 3)
    monkeypatch.setenv("LORASERVE_FP8_LM_HEAD_BATCH_MAX_M", "0")
    assert lm_head_batch_max_m() == 0


def test_cpu_batch_takes_the_bf16_head(monkeypatch) -> None:
    """Off CUDA (no FP8 GEMM) a batch step keeps the bf16 head's logits exactly."""
    monkeypatch.setenv("LORASERVE_FP8_LM_HEAD_BATCH_MAX_M", "64")
    head, w = _head(1024, 64, "cpu")
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    assert torch.equal(head(x), F.linear(x, w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", ["", "tw:64:64:128:1:4:3"])
def test_batch_head_gpu(cfg, monkeypatch) -> None:
    """64 rows at Llama-3's vocabulary: the argmax of every row is the bf16 head's, the rescored logits are the bf16
    head's own (fp32 accumulation, one rounding), the rest within e4m3 + per-token W8A8 error; graph == eager."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm >= 89")
    monkeypatch.setenv("LORASERVE_FP8_LM_HEAD_BATCH_MAX_M", "64")
    monkeypatch.setenv("LORASERVE_FP8_LM_HEAD_BATCH_CFG", cfg)
    head, w = _head(128256, 4096, "cuda")
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    y = head(x)
    ref = F.linear(x, w)
    assert torch.equal(y.argmax(-1), ref.argmax(-1))
    top = ref.argmax(-1, keepdim=True)
    torch.testing.assert_close(y.gather(1, top).float(), ref.gather(1, top).float(), rtol=1e-2, atol=1e-2)
    assert float((y.float() - ref.float()).abs().max()) < 0.1 * float(ref.float().abs().max())
    assert "head_batch" not in __import__("loraserve.inference.models.fp8", fromlist=["_BROKEN"])._BROKEN
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        head(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = head(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)
