"""What generation returns: TensorRT-LLM / vLLM shaped `RequestOutput` and `CompletionOutput`.

In streaming, each message carries the cumulative `text`/`token_ids` and what is new
since the previous message in `text_diff`/`token_ids_diff`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None          # stop | length | abort | None while running
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None          # chosen token's logprob per step (logprobs is not None)
    top_logprobs: list[dict[int, float]] | None = None  # top-`logprobs` alternatives per step (logprobs >= 1)
    cumulative_logprob: float | None = None
    text_diff: str = ""
    token_ids_diff: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    lora_request: object = None
    adapter_digest: str | None = None     # content identity of the adapter used
    error: str | None = None              # set when the engine failed this request alone (finish_reason abort)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.outputs[0].token_ids)


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive stream messages of one request as one: the later cumulative state, with the
    new text and tokens of both (a consumer that fell behind gets one message, not a backlog)."""
    a, b = earlier.outputs[0], later.outputs[0]
    b.text_diff = a.text_diff + b.text_diff
    b.token_ids_diff = a.token_ids_diff + b.token_ids_diff
    return later
