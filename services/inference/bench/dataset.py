"""Benchmark datasets: synthetic LoRA requests as JSON lines, compatible with trtllm-bench.

One request per line, as TensorRT-LLM's `prepare_dataset.py ... --stdout` writes it:

    {"task_id": 0, "input_ids": [...], "output_tokens": 128,
     "lora_request": {"lora_name": "lora_3", "lora_int_id": 3, "lora_path": "<lora_dir>/3"}}

`task_id` is the row number; the adapter's task id is `lora_int_id` (TensorRT-LLM's layout:
adapter k lives in `<lora_dir>/<k>`). Adapters from the loraserve registry are written as
`"adapter": "name[:version|:alias]"` instead of a lora_request. Rows without either use the
base model. Reading also accepts trtllm-bench's `"prompt"` (text) in place of `input_ids`.

Lengths: normal(mean, stdev) rounded up and clipped to >= 1 (trtllm's token-norm-dist; stdev 0
gives constant lengths) or uniform integers in [min, max] (token-unif-dist).
Adapter popularity over task ids MIN..MAX: uniform, or Zipf with exponent s, where the k-th id
(k = 0 for MIN) is drawn with probability (k + 1)^-s / sum_j (j + 1)^-s.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass
class BenchRequest:
    task_id: int
    input_ids: list[int] | None
    output_tokens: int
    prompt: str | None = None
    lora_request: dict | None = None      # {"lora_name", "lora_int_id", "lora_path"[, "lora_ckpt_source"]}
    adapter: str | None = None            # registry reference "name", "name:3", "name:alias"

    @property
    def adapter_key(self) -> str | None:
        """Which adapter the request uses, as one label (None: the base model)."""
        if self.lora_request is not None:
            return f"{self.lora_request['lora_name']}#{self.lora_request.get('lora_int_id', 0)}"
        return self.adapter

    def to_json(self) -> dict:
        d: dict = {"task_id": self.task_id}
        if self.input_ids is not None:
            d["input_ids"] = self.input_ids
        else:
            d["prompt"] = self.prompt
        d["output_tokens"] = self.output_tokens
        if self.lora_request is not None:
            d["lora_request"] = self.lora_request
        if self.adapter is not None:
            d["adapter"] = self.adapter
        return d

    @classmethod
    def from_json(cls, d: dict, line_no: int = 0) -> "BenchRequest":
        where = f"line {line_no}" if line_no else "request"
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        ids, prompt = d.get("input_ids"), d.get("prompt")
        if ids is None and prompt is None:
            raise ValueError(f"{where}: needs input_ids or prompt")
        if ids is not None and not (isinstance(ids, list) and ids and all(isinstance(t, int) and t >= 0 for t in ids)):
            raise ValueError(f"{where}: input_ids must be a non-empty list of ints >= 0")
        out = d.get("output_tokens", d.get("output_len"))
        if not isinstance(out, int) or out < 1:
            raise ValueError(f"{where}: output_tokens must be an int >= 1, got {out!r}")
        lora = d.get("lora_request")
        if lora is not None and not (isinstance(lora, dict) and lora.get("lora_name")):
            raise ValueError(f"{where}: lora_request must be an object with lora_name")
        return cls(int(d.get("task_id", line_no)), ids, out, prompt, lora, d.get("adapter"))


# ---- sampling ------------------------------------------------------------------------------------
def sample_lengths(rng: np.random.Generator, n: int, mean: float | None = None, stdev: float = 0.0,
                   lo: int | None = None, hi: int | None = None) -> list[int]:
    """n lengths: uniform ints in [lo, hi] when both are given, else ceil(normal(mean, stdev)) >= 1."""
    if lo is not None and hi is not None:
        if not 1 <= lo <= hi:
            raise ValueError(f"need 1 <= min <= max, got min={lo} max={hi}")
        return rng.integers(lo, hi + 1, size=n).tolist()
    if mean is None or mean < 1:
        raise ValueError(f"need a mean length >= 1 (or both min and max), got {mean}")
    if stdev < 0:
        raise ValueError(f"stdev must be >= 0, got {stdev}")
    draws = rng.normal(mean, stdev, size=n) if stdev > 0 else np.full(n, float(mean))
    return [max(1, math.ceil(x)) for x in draws]


def popularity_weights(num_ids: int, popularity: str, zipf_s: float = 1.0) -> np.ndarray:
    """Probability of each of num_ids task ids (index 0 = the lowest id)."""
    if popularity == "uniform":
        w = np.ones(num_ids)
    elif popularity == "zipf":
        if zipf_s <= 0:
            raise ValueError(f"zipf exponent must be > 0, got {zipf_s}")
        w = 1.0 / np.arange(1, num_ids + 1) ** zipf_s
    else:
        raise ValueError(f"popularity must be 'uniform' or 'zipf', got {popularity!r}")
    return w / w.sum()


def sample_task_ids(rng: np.random.Generator, n: int, lo: int, hi: int, popularity: str = "uniform",
                    zipf_s: float = 1.0) -> list[int]:
    if hi < lo:
        raise ValueError(f"--rand-task-id: MAX ({hi}) < MIN ({lo})")
    p = popularity_weights(hi - lo + 1, popularity, zipf_s)
    return (lo + rng.choice(hi - lo + 1, size=n, p=p)).tolist()


def allowed_token_ids(vocab_size: int, exclude: Iterable[int]) -> np.ndarray:
    """[0, vocab_size) minus `exclude` (EOS/BOS: a random prompt should not hold them)."""
    exclude = sorted({int(t) for t in exclude})
    return np.setdiff1d(np.arange(vocab_size), np.asarray(exclude, dtype=np.int64))


@dataclass
class DatasetSpec:
    num_requests: int
    input_mean: float | None = None
    input_stdev: float = 0.0
    input_min: int | None = None
    input_max: int | None = None
    output_mean: float | None = None
    output_stdev: float = 0.0
    output_min: int | None = None
    output_max: int | None = None
    rand_task_id: tuple[int, int] | None = None
    task_id: int = -1                          # one fixed adapter id for every request (-1: none)
    lora_dir: str | None = None
    adapters: list[str] | None = None          # registry references; task id k -> adapters[k]
    popularity: str = "uniform"
    zipf_s: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"--num-requests must be >= 1, got {self.num_requests}")
        if self.lora_dir and self.adapters:
            raise ValueError("give --lora-dir or --adapters, not both")
        if self.adapters and self.rand_task_id is None and self.task_id < 0:
            self.rand_task_id = (0, len(self.adapters) - 1)
        if self.adapters and self.rand_task_id and not 0 <= self.rand_task_id[0] <= self.rand_task_id[1] < len(self.adapters):
            raise ValueError(f"--rand-task-id {self.rand_task_id} must index the {len(self.adapters)} --adapters")
        if (self.rand_task_id is not None or self.task_id >= 0) and not (self.lora_dir or self.adapters):
            raise ValueError("task ids need adapters: give --lora-dir or --adapters")


def generate(spec: DatasetSpec, vocab_size: int, exclude_ids: Iterable[int] = (),
             max_input_len: int | None = None) -> list[BenchRequest]:
    """The synthetic requests `spec` describes (deterministic given spec.seed)."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    in_lens = sample_lengths(rng, n, spec.input_mean, spec.input_stdev, spec.input_min, spec.input_max)
    out_lens = sample_lengths(rng, n, spec.output_mean, spec.output_stdev, spec.output_min, spec.output_max)
    if max_input_len is not None:
        in_lens = [min(x, max_input_len) for x in in_lens]
    if spec.rand_task_id is not None:
        task_ids = sample_task_ids(rng, n, *spec.rand_task_id, spec.popularity, spec.zipf_s)
    else:
        task_ids = [spec.task_id] * n
    allowed = allowed_token_ids(vocab_size, exclude_ids)
    out = []
    for i in range(n):
        req = BenchRequest(i, allowed[rng.integers(0, len(allowed), size=in_lens[i])].tolist(), out_lens[i])
        tid = task_ids[i]
        if tid >= 0 and spec.lora_dir:
            req.lora_request = {"lora_name": f"lora_{tid}", "lora_int_id": tid,
                                "lora_path": os.path.join(spec.lora_dir, str(tid))}
        elif tid >= 0 and spec.adapters:
            req.adapter = spec.adapters[tid]
        out.append(req)
    return out


# ---- files ---------------------------------------------------------------------------------------
def write_jsonl(requests: Iterable[BenchRequest], fh) -> int:
    n = 0
    for r in requests:
        fh.write(json.dumps(r.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n")
        n += 1
    return n


def read_jsonl(path: str, limit: int | None = None) -> list[BenchRequest]:
    """Requests of a JSON-lines dataset (blank lines skipped); errors name the line."""
    out: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {line_no}: not JSON: {exc}") from exc
            out.append(BenchRequest.from_json(d, line_no))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def model_vocab(model_dir: str) -> tuple[int, set[int], int | None]:
    """(vocab size usable for random prompts, special ids to avoid, max_position_embeddings)."""
    from loraserve.inference.detokenizer import TokenizerWrapper

    tok = TokenizerWrapper(model_dir)
    vocab = tok.vocab_size
    max_pos = None
    cfg_path = os.path.join(model_dir, "config.json")
    special = {t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        vocab = min(vocab, int(cfg.get("vocab_size", vocab)))
        max_pos = cfg.get("max_position_embeddings")
        eos = cfg.get("eos_token_id")
        special |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if cfg.get("bos_token_id") is not None:
            special.add(cfg["bos_token_id"])
    return vocab, special, max_pos
