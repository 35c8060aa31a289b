"""One record per request, made once in InferenceCore.generate for every front (gRPC, OpenAI
HTTP, anything else calling the core), then logged (one INFO line) and counted (Prometheus).

    tracker = RequestTracker(request_id, model_name)     # at entry: the clock starts
    tracker.seen(out)                                    # each RequestOutput as it streams
    record = tracker.close(code)                         # once, on whatever path the request ends

An OpenAI request with n choices (or a list of prompts) is one engine request, and one record,
per choice (request ids "<id>-0", "<id>-1", ...). Times are the core's own clock, so that they include what the client waits for before the
engine sees the request (adapter download and load): e2e = entry to end, TTFT = entry to the
first output token; queue time is the engine's (arrival to first scheduling).

Prometheus names follow its conventions and vLLM's (`vllm:e2e_request_latency_seconds`,
`vllm:request_prompt_tokens`, ...): counters end in `_total`, units in the name (`_seconds`),
request and engine series carry `model_name`; `code` (gRPC code name: OK, INVALID_ARGUMENT, CANCELLED, ...)
and `finish_reason` (stop, length, abort; "none" when no output finished) are separate labels.
Per-adapter series use AdapterLabels' bounded `adapter` label (vLLM's lora_requests_info lists
adapter names in label values, unbounded; here at most max_labels + 2 series per metric).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass

log = logging.getLogger("loraserve.requests")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    model_name: str
    adapter: str                 # LoRARequest name ("name:version" for registry adapters); "" = base model
    prompt_tokens: int
    output_tokens: int
    finish_reason: str           # stop | length | abort | none (the request ended before any finish)
    code: str                    # gRPC code name: OK, INVALID_ARGUMENT, ..., CANCELLED, INTERNAL
    e2e_s: float
    ttft_s: float | None
    queue_s: float | None
    tpot_s: float | None         # mean time per output token after the first


class RequestTracker:
    __slots__ = ("request_id", "model_name", "adapter", "start", "first_token", "last")

    def __init__(self, request_id: str, model_name: str, adapter: str = ""):
        self.request_id, self.model_name, self.adapter = request_id, model_name, adapter
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.last = None               # the latest RequestOutput (cumulative)

    def seen(self, out) -> None:
        if self.first_token is None and out.outputs and out.outputs[0].token_ids:
            self.first_token = time.monotonic()
        self.last = out
        if out.lora_request is not None:
            self.adapter = out.lora_request.lora_name

    def close(self, code: str) -> RequestRecord:
        now = time.monotonic()
        out = self.last
        comp = out.outputs[0] if out is not None and out.outputs else None
        n_out = len(comp.token_ids) if comp is not None else 0
        finish = (comp.finish_reason if comp is not None and out.finished else None) or "none"
        m = out.metrics if out is not None else None
        tpot = None
        if m is not None and m.first_token_time is not None and m.finished_time is not None and n_out > 1:
            tpot = (m.finished_time - m.first_token_time) / (n_out - 1)
        return RequestRecord(
            self.request_id, self.model_name, self.adapter, len(out.prompt_token_ids) if out is not None else 0,
            n_out, finish, code, now - self.start,
            None if self.first_token is None else self.first_token - self.start,
            m.queue_time if m is not None else None, tpot)


def log_record(r: RequestRecord) -> None:
    """The request's one INFO line; JSON logs (--log-format json) get its fields as keys."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info("request %s adapter=%s prompt_tokens=%d output_tokens=%d finish=%s status=%s e2e=%.3fs ttft=%s",
             r.request_id, r.adapter or "-", r.prompt_tokens, r.output_tokens, r.finish_reason, r.code, r.e2e_s,
             "-" if r.ttft_s is None else f"{r.ttft_s:.3f}s", extra={"request": asdict(r)})


class AdapterLabels:
    """The `adapter` label of per-adapter series, bounded: the first `max_labels` adapter names seen
    keep their own label for the life of the process (stable series; registry versions of a name
    share it), every later one is 'other', requests without an adapter are 'none'. So at most
    max_labels + 2 series per metric, whatever clients send; raise it for more detail."""

    def __init__(self, max_labels: int = 32):
        self.max_labels = max_labels
        self._known: set[str] = set()
        self._lock = threading.Lock()   # the event loop and the scrape thread both label

    def label(self, adapter: str | None) -> str:
        if not adapter:
            return "none"
        name = adapter.split(":", 1)[0][:100]  # "name:version" from the registry
        with self._lock:
            if name in self._known:
                return name
            if len(self._known) < self.max_labels:
                self._known.add(name)
                return name
        return "other"


class RequestMetrics:
    """The Prometheus request series, fed one RequestRecord per request (InferenceCore listeners)."""

    def __init__(self, registry, adapter_labels: AdapterLabels):
        from prometheus_client import Counter, Histogram

        self.labels = adapter_labels
        model = ["model_name"]
        self.requests = Counter("loraserve_requests", "Requests by gRPC status code and finish reason (every front)",
                                model + ["code", "finish_reason"], registry=registry)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens of finished and failed requests",
                                     model, registry=registry)
        self.generation_tokens = Counter("loraserve_generation_tokens", "Tokens generated", model, registry=registry)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "Request entry to its first output token",
                              model, buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("loraserve_e2e_request_latency_seconds", "Request entry to its end, any outcome",
                             model, buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("loraserve_time_per_output_token_seconds", "Mean time per output token after the first",
                              model, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
                              registry=registry)
        self.queue_time = Histogram("loraserve_queue_time_seconds", "Engine arrival to first scheduling",
                                    model, buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_len = Histogram("loraserve_request_prompt_tokens", "Prompt length of each request", model,
                                    buckets=TOKEN_BUCKETS, registry=registry)
        self.generation_len = Histogram("loraserve_request_generation_tokens", "Output length of each request",
                                        model, buckets=TOKEN_BUCKETS, registry=registry)
        per = f"(first {adapter_labels.max_labels} adapter names, later ones 'other', base model 'none')"
        adapter = ["adapter"]   # bounded (AdapterLabels); no model_name: one base model per process
        self.adapter_requests = Counter("loraserve_adapter_requests", f"Requests by adapter {per}", adapter,
                                        registry=registry)
        self.adapter_tokens = Counter("loraserve_adapter_generation_tokens", f"Tokens generated by adapter {per}",
                                      adapter, registry=registry)
        self.adapter_ttft = Histogram("loraserve_adapter_time_to_first_token_seconds",
                                      f"Request entry to first token by adapter {per}", adapter,
                                      buckets=LATENCY_BUCKETS, registry=registry)

    def observe(self, r: RequestRecord) -> None:
        m = r.model_name
        self.requests.labels(m, r.code, r.finish_reason).inc()
        self.prompt_tokens.labels(m).inc(r.prompt_tokens)
        self.generation_tokens.labels(m).inc(r.output_tokens)
        self.e2e.labels(m).observe(r.e2e_s)
        label = self.labels.label(r.adapter)
        self.adapter_requests.labels(label).inc()
        self.adapter_tokens.labels(label).inc(r.output_tokens)
        if r.code == "OK":   # lengths of requests that ran to their end
            self.prompt_len.labels(m).observe(r.prompt_tokens)
            self.generation_len.labels(m).observe(r.output_tokens)
        if r.ttft_s is not None:
            self.ttft.labels(m).observe(r.ttft_s)
            self.adapter_ttft.labels(label).observe(r.ttft_s)
        if r.queue_s is not None:
            self.queue_time.labels(m).observe(r.queue_s)
        if r.tpot_s is not None:
            self.tpot.labels(m).observe(r.tpot_s)
