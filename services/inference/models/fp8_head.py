"""The LM head of an FP8 model (LORASERVE_FP8_LM_HEAD, on by default): an e4m3 copy with per-channel scales serves
decode steps of up to LORASERVE_FP8_LM_HEAD_MAX_M rows, each row's top logits recomputed from the bf16 head, which is
kept (so the argmax is the bf16 head's); larger steps take the bf16 head. Measured on the H200 in kernels/PERF_NOTES.md
(FP8 third pass). TensorRT-LLM (ModelOpt) and vLLM keep the head in bf16: LORASERVE_FP8_LM_HEAD=0 does too."""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import FP8, _BROKEN, _triton_failed, dequantize, gemm_path, quantize_per_channel

log = logging.getLogger(__name__)


class Fp8Head(nn.Module):
    """The LM head with an e4m3 weight (LORASERVE_FP8_LM_HEAD): logits [N, V] = hidden [N, H] @ W^T, W [V, H]
    e4m3 with fp32 per-channel scales [V], x kept in bf16 (weight-only at every M). TensorRT-LLM (ModelOpt) and vLLM
    keep the LM head in bf16 by default: it is the last GEMM before the argmax, where a rounding flips tokens. Hence
    `exact` ([V, H], the bf16 head or tied embedding, not copied): each row's top `rescore` FP8 logits are recomputed
    from it (one gather + one bmm of rescore rows), so the argmax is the bf16 head's whenever it is among the FP8 top
    `rescore` (LORASERVE_FP8_LM_HEAD_RESCORE, default 8; 0: plain FP8 logits). The other logits keep e4m3 error.
    Rows past lm_head_max_m() take the bf16 head itself (when kept)."""

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, exact: torch.Tensor | None = None, rescore: int = 0):
        super().__init__()
        self.out_features, self.in_features = w_q.shape
        self.weight = nn.Parameter(w_q, requires_grad=False)
        self.register_buffer("weight_scale", w_scale)
        self.exact = exact if rescore > 0 else None   # a plain attribute: the tied embedding stays the model's
        self.rescore = min(rescore, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact is not None and x.shape[0] > lm_head_max_m():   # larger batches: the bf16 head (H200: the
            if x.shape[0] <= lm_head_batch_max_m():                   # top-k and gather cost more than FP8 saved)
                logits = self._batch_logits(x)   # now W8A8 logits + the same rescoring (lm_head_batch_max_m)
                if logits is not None:
                    return self._rescored_torch(logits, x)
            return F.linear(x, self.exact.to(x.dtype))
        if self.exact is not None and x.shape[0] > 0 and head_fused_on():
            fused = self._fused_rescored(x)   # [N, V] or None (not this shape / path)
            if fused is not None:
                return fused
        logits = self._fp8_logits(x)                                            # [N, V]
        if self.exact is not None and x.shape[0] > 0:
            idx = self._candidates(logits)                                      # [N, k]
            rows = self.exact.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)   # [N, k, H]
            exact = torch.bmm(rows, x.to(rows.dtype)[:, :, None]).squeeze(-1)  # [N, k], fp32 accumulate
            logits.scatter_(1, idx, exact.to(logits.dtype))
        return logits

    def _candidates(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, k] token ids to rescore: the argmax of each of the k chunks (RESCORE_CHUNK ids each) with the largest
        FP8 maxima - one pass over [N, V] and a top-k over [N, V / chunk] instead of a top-k over the vocabulary
        (torch.topk of a 128k row cost ~50 us on the H200). It misses the bf16 argmax only where another id of its
        own chunk beats it in FP8; vocabularies the chunk does not divide take the plain top-k."""
        V, chunk = logits.shape[1], RESCORE_CHUNK
        if V % chunk or V // chunk < 4 * self.rescore:
            return logits.topk(self.rescore, dim=-1).indices
        best, where = logits.view(logits.shape[0], V // chunk, chunk).max(dim=-1)     # [N, V / chunk]
        top = best.topk(self.rescore, dim=-1).indices                                 # [N, k] chunk numbers
        return top * chunk + where.gather(1, top)

    def _fused_rescored(self, x: torch.Tensor) -> torch.Tensor | None:
        """CUDA, a split-K GEMV config: the split-K sum also finds each row's chunk maxima and one launch rescores the
        best `rescore` chunks' argmaxes from the bf16 rows (kernels/fp8_head_rescore.py: 2 launches after the GEMV,
        where the torch form below takes ~9); the same candidates as _candidates."""
        if gemm_path(x, self.weight) == "dequant" or "gemv" in _BROKEN or "head_rescore" in _BROKEN \
                or self.exact.dtype != x.dtype:
            return None
        from loraserve.kernels.fp8_gemv import fp8_gemv
        from loraserve.kernels.fp8_head_rescore import fp8_head_rescored, head_rescore_ok

        x = x if x.stride(-1) == 1 else x.contiguous()
        try:
            ws, _ = fp8_gemv(x, self.weight, self.weight_scale, weight_only=True, defer_sum=True)
            if not head_rescore_ok(ws, RESCORE_CHUNK, self.rescore):
                return None if ws.dim() == 3 else self._rescored_torch(ws, x)
            y = fp8_head_rescored(ws, self.weight_scale, x, self.exact, self.rescore, RESCORE_CHUNK)
            if not self.__dict__.get("_fused_checked") and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                y = self._check_fused(y, ws, x)   # once, on the first eager call (a host sync)
            return y
        except Exception as err:   # a compile error: the torch form from now on
            _BROKEN.add("head_rescore")
            log.exception("FP8 LM head: fused rescoring failed (%s); the torch form from now on", err)
            return None

    def _check_fused(self, y: torch.Tensor, ws: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The fused rescoring checked on this call's data against its contract: at most `rescore` logits per row
        changed, each the argmax of its 128-id chunk in the FP8 logits, of a chunk whose maximum is among the row's
        `rescore` largest (ties allowed: torch.topk and the kernel may break them differently), holding the bf16 head's
        logit to within rounding. Else the torch form from now on (and its logits returned)."""
        self.__dict__["_fused_checked"] = True
        plain = ws[0].clone()
        for split in range(1, ws.shape[0]):   # the split-K sum's order and rounding
            plain += ws[split]
        plain = (plain * self.weight_scale).to(x.dtype)
        M, V = plain.shape
        best = plain.float().view(M, V // RESCORE_CHUNK, RESCORE_CHUNK).amax(dim=-1)     # [M, V / chunk]
        kth = best.topk(self.rescore, dim=-1).values[:, -1]                            # [M]
        changed = y != plain
        rows, cols = changed.nonzero(as_tuple=True)
        chunk_max = best[rows, cols // RESCORE_CHUNK]
        exact = (self.exact[cols].float() * x[rows].float()).sum(-1)
        ok = (bool((changed.sum(dim=1) <= self.rescore).all()) and bool((chunk_max >= kth[rows]).all())
              and bool((plain[rows, cols].float() == chunk_max).all())
              and torch.allclose(y[rows, cols].float(), exact.to(y.dtype).float(), rtol=2e-2, atol=2e-2))
        if not ok:
            _BROKEN.add("head_rescore")
            log.warning("FP8 LM head: the fused rescoring broke its contract on %d changed logits; the torch form "
                        "from now on", int(changed.sum()))
            return self._rescored_torch(plain, x)
        return y

    def _rescored_torch(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        idx = self._candidates(logits)                                          # [N, k]
        rows = self.exact.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)   # [N, k, H]
        exact = torch.bmm(rows, x.to(rows.dtype)[:, :, None]).squeeze(-1)      # [N, k], fp32 accumulate
        return logits.scatter_(1, idx, exact.to(logits.dtype))

    def _batch_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """[N, V] W8A8 logits for a batch step (x per token in e4m3, fp8_gemv's dot8 kind: lm_head_batch_config), the
        candidates' source for the bf16 rescoring; None off CUDA or after a failure."""
        if gemm_path(x, self.weight) == "dequant" or "head_batch" in _BROKEN or self.exact.dtype != x.dtype \
                or self.out_features % 16 or self.in_features % 16:
            return None
        from loraserve.kernels.fp8_gemv import fp8_gemv

        try:
            return fp8_gemv(x if x.stride(-1) == 1 else x.contiguous(), self.weight, self.weight_scale,
                            config=lm_head_batch_config())
        except Exception as err:   # noqa: BLE001  (the bf16 head from now on)
            _BROKEN.add("head_batch")
            log.exception("FP8 LM head: the batch W8A8 logits failed (%s); the bf16 head from now on", err)
            return None

    def _fp8_logits(self, x: torch.Tensor) -> torch.Tensor:
        # CUDA: the FP8 GEMV kernels (weight-only); elsewhere the dequantized matmul
        if gemm_path(x, self.weight) != "dequant" and "gemv" not in _BROKEN:
            from loraserve.kernels.fp8_gemv import fp8_gemv

            try:
                return fp8_gemv(x if x.stride(-1) == 1 else x.contiguous(), self.weight, self.weight_scale,
                                weight_only=True)
            except Exception as err:   # a compile error: the dequantized matmul from now on
                _triton_failed("gemv", err)
        return F.linear(x, dequantize(self.weight, self.weight_scale[:, None], x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, fp8 e4m3 per-channel (LORASERVE_FP8_LM_HEAD), "
                f"top-{self.rescore if self.exact is not None else 0} rescored in bf16")


RESCORE_CHUNK = 128   # Fp8Head._candidates: vocabulary ids per chunk (Llama-3's 128256 = 1002 x 128)


def head_fused_on() -> bool:
    """LORASERVE_FP8_HEAD_FUSED=0: the rescoring as torch ops (_candidates, gather, bmm, scatter) after the GEMV."""
    return os.environ.get("LORASERVE_FP8_HEAD_FUSED", "1").strip() != "0"


def _env_rows(name: str, default: str) -> int:
    """A row-count switch from the environment: a non-negative integer, or a clear error naming the switch."""
    raw = os.environ.get(name, default).strip()
    try:
        return max(int(raw), 0)
    except ValueError:
        raise ValueError(f"{name} must be an integer row count, got {raw!r}") from None


def lm_head_max_m() -> int:
    """LORASERVE_FP8_LM_HEAD_MAX_M: with rescoring, the FP8 head serves up to this many rows (default 4), the bf16
    head above. H200 (benchmarks/fp8_probe.py --lm-head-only, 128256 x 4096, CUDA graphs): M=1 bf16 239.6 us, FP8
    136.6, FP8 + top-8 rescoring (torch.topk over the vocabulary; _candidates now) 188.8; M=64 271.8 / 238.5 / 374.8."""
    return _env_rows("LORASERVE_FP8_LM_HEAD_MAX_M", "4")


def lm_head_batch_max_m() -> int:
    """LORASERVE_FP8_LM_HEAD_BATCH_MAX_M: steps of lm_head_max_m() + 1 .. this many rows take W8A8 FP8 logits (the
    dot8 GEMM) with each row's top `rescore` chunk argmaxes recomputed from the bf16 head (the argmax stays bf16's
    unless it is outside the FP8 candidates); default 64, 0: the bf16 head there. H200 (fp8_probe.py --lm-head-only,
    128256 x 4096, CUDA graphs, 64 rows, eighth pass probe 2): bf16 271.7 us, FP8 dot8 + rescoring 211.4 (tw 235.1,
    dot16 366.4), argmax == bf16's on every row."""
    return _env_rows("LORASERVE_FP8_LM_HEAD_BATCH_MAX_M", "64")


def lm_head_batch_config() -> tuple:
    """The batch head's GEMV config: LORASERVE_FP8_LM_HEAD_BATCH_CFG="kind:bm:bn:bk:split:warps:stages" (probes),
    default dot8 64 x 64 x 128 tiles (per-token W8A8 on the FP8 MMA)."""
    raw = os.environ.get("LORASERVE_FP8_LM_HEAD_BATCH_CFG", "").strip()
    if not raw:
        return ("dot8", 64, 64, 128, 1, 4, 3)
    kind, *nums = raw.split(":")
    return (kind, *(int(v) for v in nums))


def lm_head_rescore() -> int:
    """LORASERVE_FP8_LM_HEAD_RESCORE: how many of each row's top FP8 logits the bf16 head recomputes (default 8)."""
    raw = os.environ.get("LORASERVE_FP8_LM_HEAD_RESCORE", "8").strip()
    try:
        return max(int(raw), 0)
    except ValueError:
        raise ValueError(f"LORASERVE_FP8_LM_HEAD_RESCORE must be an integer (0: off), got {raw!r}") from None


def lm_head_fp8_on() -> bool:
    """LORASERVE_FP8_LM_HEAD (default 1): an e4m3 copy of the LM head for decode steps of <= lm_head_max_m rows,
    its top-8 rescored from the bf16 head (kept: the argmax stays bf16's); 0: the bf16 head only, as TensorRT-LLM
    and vLLM."""
    return os.environ.get("LORASERVE_FP8_LM_HEAD", "1").strip() == "1"


def quantize_lm_head(model: nn.Module, rows_per_chunk: int = 16384) -> bool:
    """After loading: replace model.lm_head [V, H] with an Fp8Head (per-channel scales), where
    lm_head_fp8_on(). A tied head keeps the bf16 embedding and gets its own e4m3 copy. Quantized in row
    chunks (the fp32 temporaries of a 128k x 4k head would be 2 GB at once). Returns whether it did."""
    head = getattr(model, "lm_head", None)
    if not lm_head_fp8_on() or not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    w = head.weight.data
    w_q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r0 in range(0, w.shape[0], rows_per_chunk):
        w_q[r0:r0 + rows_per_chunk], scale[r0:r0 + rows_per_chunk] = quantize_per_channel(w[r0:r0 + rows_per_chunk])
    model.lm_head = Fp8Head(w_q, scale, exact=w, rescore=lm_head_rescore())
    log.info("FP8 e4m3 LM head [%d, %d] (LORASERVE_FP8_LM_HEAD)", *w_q.shape)
    return True
