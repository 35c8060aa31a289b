"""Replay a dataset against a target and time every request.

Targets (one small interface: start / run_one / cache_stats / close):
  * InProcessTarget: `loraserve.LLM` in this process, streamed through its AsyncLLM;
  * GrpcTarget: a running `loraserve serve` over `InferenceService.Generate` (server streaming).

Load shape: at most `concurrency` requests in flight (None: no cap), arriving as a Poisson
process of `request_rate` requests/s (None: all at once, as trtllm-bench's default).
Each request is timed on the client: start (sent), first token, every later chunk, end;
TTFT = first - start, TPOT = (end - first) / (output tokens - 1), ITL = the gaps between
successive chunks after the first (vLLM's definition), E2E = end - start. Without streaming
(trtllm-bench's default) only E2E is measured: the whole output arrives at once.
Adapter cache counters are read before and after the measured run; the report holds the
difference, so that warm-up requests do not count.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from loraserve.config import LoRARequest, SamplingParams

from .dataset import BenchRequest

log = logging.getLogger(__name__)


@dataclass
class RequestRecord:
    task_id: int
    adapter: str | None
    start: float                    # time.perf_counter() when sent
    first_token: float | None       # when the first output token arrived
    end: float
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    itl: list[float] = field(default_factory=list)   # gaps between successive chunks after the first [s]

    def token_arrived(self, now: float) -> None:
        """A chunk with >= 1 new token arrived at `now` (perf_counter)."""
        if self.first_token is None:
            self.first_token = now
        else:
            self.itl.append(now - self._last)
        self._last = now

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class BenchResult:
    records: list[RequestRecord]
    start: float
    end: float
    cache_before: dict
    cache_after: dict
    meta: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start

    def cache_delta(self) -> dict[str, dict[str, int]]:
        """Per tier (host, device, disk): counters of the measured run only."""
        out = {}
        for tier, after in self.cache_after.items():
            before = self.cache_before.get(tier, {})
            out[tier] = {k: int(v) - int(before.get(k, 0)) for k, v in after.items()}
        return out


def sampling_params(req: BenchRequest, ignore_eos: bool) -> SamplingParams:
    # Greedy with EOS ignored (trtllm-bench's --eos_id -1): every request yields exactly output_tokens.
    return SamplingParams(max_tokens=req.output_tokens, temperature=0.0, ignore_eos=ignore_eos)


# ---- targets -------------------------------------------------------------------------------------
class InProcessTarget:
    """loraserve.LLM in this process; the engine runs on its own thread (AsyncLLM)."""

    def __init__(self, model: str | None, llm_kwargs: dict | None = None, streaming: bool = True):
        self.model, self.llm_kwargs = model, dict(llm_kwargs or {})
        self.streaming = streaming
        self.llm = None
        self.name = "in-process"

    async def start(self) -> None:
        from loraserve.inference.llm import LLM

        self.llm = await asyncio.to_thread(lambda: LLM(model=self.model, **self.llm_kwargs))
        self.name = f"in-process:{self.llm.config.model}"

    async def run_one(self, req: BenchRequest, ignore_eos: bool) -> RequestRecord:
        if req.adapter is not None:
            raise ValueError(f"request {req.task_id}: registry adapter {req.adapter!r} needs a gRPC target "
                             "(--address); the in-process target takes lora_request rows only")
        lora = None
        if req.lora_request is not None:
            lr = req.lora_request
            lora = LoRARequest(lr["lora_name"], int(lr.get("lora_int_id", 0)), lr.get("lora_path", ""),
                               lr.get("lora_ckpt_source", "hf"))
        prompt = req.input_ids if req.input_ids is not None else req.prompt
        rec = RequestRecord(req.task_id, req.adapter_key, time.perf_counter(), None, 0.0)
        last, seen = None, 0
        async for out in self.llm.generate_async(prompt, sampling_params(req, ignore_eos), lora,
                                                 streaming=self.streaming):
            if self.streaming and len(out.outputs[0].token_ids) > seen:
                rec.token_arrived(time.perf_counter())
                seen = len(out.outputs[0].token_ids)
            last = out
        rec.end = time.perf_counter()
        rec.prompt_tokens = last.num_prompt_tokens
        rec.output_tokens = len(last.outputs[0].token_ids)
        return rec

    async def cache_stats(self) -> dict:
        mgr = self.llm.engine.lora_manager
        if mgr is None:
            return {}
        stats = mgr.stats_dict()
        return {tier: dict(stats[tier]) for tier in ("host", "device")}

    async def close(self) -> None:
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)


def parse_adapter_ref(ref: str):
    """'name' | 'name:3' | 'name:alias' -> AdapterRef."""
    from loraserve.v1 import inference_pb2 as pb

    name, _, tail = ref.partition(":")
    return pb.AdapterRef(name=name, version=int(tail)) if tail.isdigit() else pb.AdapterRef(name=name, alias=tail)


class GrpcTarget:
    """A running inference server (loraserve serve) over gRPC."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 600.0, streaming: bool = True):
        self.address, self.token, self.timeout_s = address, token, timeout_s
        self.streaming = streaming  # False: the chunks are still streamed by the RPC, only E2E is recorded
        self.name = f"grpc://{address}"
        self.channel = None
        self.stub = None

    @property
    def _metadata(self):
        return [("authorization", f"Bearer {self.token}")] if self.token else None

    async def start(self) -> None:
        import grpc

        from loraserve.v1 import inference_pb2 as pb
        from loraserve.v1 import inference_pb2_grpc as pb_grpc

        self.channel = grpc.aio.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 16 << 20)])
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self._metadata, timeout=30,
                                            wait_for_ready=True)
        self.name = f"grpc://{self.address} ({info.model_name})"

    def _request(self, req: BenchRequest, ignore_eos: bool):
        from loraserve.v1 import inference_pb2 as pb

        sp = pb.SamplingParams(max_tokens=req.output_tokens, temperature=0.0, ignore_eos=ignore_eos)
        msg = pb.GenerateRequest(sampling_params=sp)
        if req.input_ids is not None:
            msg.token_ids.CopyFrom(pb.TokenIds(ids=req.input_ids))
        else:
            msg.text = req.prompt
        if req.lora_request is not None:
            lr = req.lora_request
            msg.lora_request.CopyFrom(pb.LoraRequest(
                lora_name=lr["lora_name"], lora_int_id=int(lr.get("lora_int_id", 0)),
                lora_path=lr.get("lora_path", ""), lora_ckpt_source=lr.get("lora_ckpt_source", "hf")))
        elif req.adapter is not None:
            msg.adapter_ref.CopyFrom(parse_adapter_ref(req.adapter))
        return msg

    async def run_one(self, req: BenchRequest, ignore_eos: bool) -> RequestRecord:
        msg = self._request(req, ignore_eos)
        rec = RequestRecord(req.task_id, req.adapter_key, time.perf_counter(), None, 0.0)
        n_tokens = 0
        complete = None
        async for resp in self.stub.Generate(msg, metadata=self._metadata, timeout=self.timeout_s):
            if resp.WhichOneof("response") == "chunk":
                if self.streaming and resp.chunk.token_ids:
                    rec.token_arrived(time.perf_counter())
                n_tokens += len(resp.chunk.token_ids)
            else:
                complete = resp.complete
        rec.end = time.perf_counter()
        if complete is None:
            raise RuntimeError("stream ended without a GenerateComplete message")
        rec.prompt_tokens = complete.prompt_tokens
        rec.output_tokens = n_tokens
        if n_tokens != complete.completion_tokens:
            raise RuntimeError(f"received {n_tokens} tokens but the server counted {complete.completion_tokens}")
        return rec

    async def cache_stats(self) -> dict:
        from loraserve.v1 import inference_pb2 as pb

        resp = await self.stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest(), metadata=self._metadata, timeout=30)
        return {tier: {k: int(getattr(getattr(resp, tier), k)) for k in ("hits", "misses", "evictions", "bytes_loaded")}
                for tier in ("disk", "host", "device")}

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


# ---- the run -------------------------------------------------------------------------------------
def arrival_offsets(n: int, request_rate: float | None, seed: int) -> list[float]:
    """Seconds after the start at which each request is released: Poisson arrivals, or all at 0."""
    if not request_rate or request_rate == float("inf"):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


async def run_benchmark(target, requests: list[BenchRequest], *, concurrency: int | None = None,
                        request_rate: float | None = None, warmup: int = 0, ignore_eos: bool = True,
                        progress: bool = True, seed: int = 0) -> BenchResult:
    """Replay `requests` against a started target; failures are recorded, not raised."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if request_rate is not None and request_rate <= 0:
        raise ValueError(f"request rate must be > 0, got {request_rate}")
    for req in requests[:warmup]:  # one at a time: compiles kernels, fills caches; not measured
        await target.run_one(req, ignore_eos)
    from tqdm import tqdm

    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)
    limit = asyncio.Semaphore(concurrency or len(requests))
    offsets = arrival_offsets(len(requests), request_rate, seed)
    cache_before = await target.cache_stats()
    t0 = time.perf_counter()

    async def one(req: BenchRequest, offset: float) -> RequestRecord:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with limit:
            sent = time.perf_counter()
            try:
                rec = await target.run_one(req, ignore_eos)
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                details = exc.details() if hasattr(exc, "details") else str(exc)
                rec = RequestRecord(req.task_id, req.adapter_key, sent, None, time.perf_counter(),
                                    error=f"{type(exc).__name__}: {details}")
        bar.update(1)
        return rec

    records = await asyncio.gather(*(one(r, off) for r, off in zip(requests, offsets)))
    t1 = time.perf_counter()
    bar.close()
    cache_after = await target.cache_stats()
    meta = {"target": target.name, "concurrency": concurrency, "request_rate": request_rate, "warmup": warmup,
            "ignore_eos": ignore_eos}
    return BenchResult(list(records), t0, t1, cache_before, cache_after, meta)


def records_as_dicts(result: BenchResult) -> list[dict]:
    """Per-request rows with times relative to the run's start (for the JSON report and plots)."""
    rows = []
    for r in result.records:
        d = asdict(r)
        d["start"] = r.start - result.start
        d["first_token"] = None if r.first_token is None else r.first_token - result.start
        d["end"] = r.end - result.start
        d["ttft"], d["tpot"], d["latency"] = r.ttft, r.tpot, r.latency
        d.pop("itl")  # per-chunk gaps: summarised in the report, too many to list per request
        rows.append(d)
    return rows
