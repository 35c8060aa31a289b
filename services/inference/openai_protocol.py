"""OpenAI wire format: request bodies, response bodies, errors, and the mapping onto loraserve.

Requests are pydantic models that accept OpenAI's fields plus the extra fields vLLM and
TensorRT-LLM users send through `extra_body` (top_k, min_tokens, ignore_eos, stop_token_ids,
include_stop_str_in_output, lora_request). Fields loraserve does not implement are refused
with a 400 that names them, rather than silently ignored.

Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraserve.config import LoRARequest, SamplingParams


# ---- errors ------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 500: "server_error",
               502: "server_error", 503: "service_unavailable"}


class OpenAIError(Exception):
    """An error with its HTTP status; rendered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def map_exception(exc: BaseException, request_id: str | None = None) -> OpenAIError:
    """Any exception -> its HTTP error by the one table (errors.py, shared with the gRPC front);
    an undeclared one is a 500 with a generic message and one server log line."""
    from .errors import status_of

    if isinstance(exc, OpenAIError):
        return exc
    st = status_of(exc, "OpenAI HTTP request", request_id)
    return OpenAIError(st.http_status, st.message, param=st.openai_param, code=st.openai_code)


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


# Integer fields are bounded as their gRPC twins (int32): a JSON 10**30 is a 400 here, not a value
# that reaches torch and fails the whole engine step ("Overflow when unpacking long long").
Int32 = Annotated[int, Field(ge=-2**31, le=2**31 - 1)]


# ---- requests ----------------------------------------------------------------------------------
class LoraRequestBody(BaseModel):
    """TensorRT-LLM's LoRARequest, as sent in extra_body={"lora_request": {...}}."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""
    lora_ckpt_source: Literal["hf", "nemo"] = "hf"

    def to_lora_request(self) -> LoRARequest:
        return LoRARequest(self.lora_name, self.lora_int_id, self.lora_path, self.lora_ckpt_source)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")
    model: str = ""
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # int64, as torch.Generator takes
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM / TensorRT-LLM extras (extra_body)
    top_k: Int32 | None = None
    min_tokens: Int32 = 0
    ignore_eos: bool = False
    stop_token_ids: list[Int32] | None = None
    include_stop_str_in_output: bool = False
    lora_request: LoraRequestBody | None = None

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name} is not supported by loraserve (use 0 or leave it out)", param=name)
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported by loraserve", param="logit_bias")
        if self.model_extra:
            raise OpenAIError(400, f"unknown or unsupported parameters: {sorted(self.model_extra)}",
                              param=sorted(self.model_extra)[0])

    def logprobs_n(self) -> int | None:
        """How many alternatives per token the engine must return (None: no logprobs)."""
        return None

    def sampling_params(self, max_tokens: int, seed_offset: int = 0) -> SamplingParams:
        """SamplingParams for one choice; choice j of n gets seed + j so that choices differ."""
        # wrapped into int64: seed + j past 2**63 - 1 would fail the engine step that seeds it
        seed = None if self.seed is None else (self.seed + seed_offset + 2**63) % 2**64 - 2**63
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=seed,
                stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
                logprobs=self.logprobs_n())
        except ValueError as exc:
            raise OpenAIError(400, str(exc)) from exc

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Int32 | None = 16        # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    logprobs: Int32 | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1, self.n):
            raise OpenAIError(400, "best_of other than n is not supported", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise OpenAIError(400, f"logprobs must be in [0, 20], got {self.logprobs}", param="logprobs")
        if self.logprobs is not None and self.stream:
            raise OpenAIError(400, "logprobs with stream=true is not supported yet", param="logprobs")
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported", param="suffix")

    def logprobs_n(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids (OpenAI accepts all four forms)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise OpenAIError(400, "prompt is empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """Content as one string; content parts must be of type "text"."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise OpenAIError(400, f"content part of type {part.get('type')!r} is not supported (text only)",
                                  param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    logprobs: bool = False
    top_logprobs: Int32 | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not (self.logprobs and 0 <= self.top_logprobs <= 20):
            raise OpenAIError(400, "top_logprobs needs logprobs=true and must be in [0, 20]", param="top_logprobs")
        if self.logprobs and self.stream:
            raise OpenAIError(400, "logprobs with stream=true is not supported yet", param="logprobs")
        if self.tools:
            raise OpenAIError(400, "tools are not supported by loraserve", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise OpenAIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")

    def logprobs_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# ---- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[dict], usage_: dict | None, created: int | None = None,
                    chunk: bool = False) -> dict:
    """A /v1/completions body; streamed chunks have the same object name ("text_completion")."""
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": choices, "usage": usage_, "system_fingerprint": None}


def chat_body(rid: str, model: str, choices: list[dict], usage_: dict | None, created: int | None = None,
              chunk: bool = False) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created or int(time.time()), "model": model, "choices": choices, "usage": usage_,
            "system_fingerprint": None}


def model_card(model_id: str, owned_by: str, parent: str | None = None, **extra: Any) -> dict:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": owned_by,
            "root": model_id if parent is None else parent, "parent": parent, **extra}


# ---- logprobs ----------------------------------------------------------------------------------
def completion_logprobs(comp, decode, text_offset: int) -> dict | None:
    """The legacy /v1/completions `logprobs` object for one choice (None when not requested)."""
    if comp.logprobs is None:
        return None
    tokens = [decode([t]) for t in comp.token_ids]
    offsets, pos = [], text_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    tops = None
    if comp.top_logprobs is not None:
        tops = []
        for top in comp.top_logprobs:  # most likely first; ids that decode alike keep the likelier
            d: dict[str, float] = {}
            for t, lp in top.items():
                d.setdefault(decode([t]), lp)
            tops.append(d)
    return {"tokens": tokens, "token_logprobs": list(comp.logprobs), "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(comp, decode) -> dict | None:
    """The /v1/chat/completions `logprobs` object for one choice (None when not requested)."""
    if comp.logprobs is None:
        return None

    def entry(token_id: int, lp: float) -> dict:
        s = decode([token_id])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    content = []
    for i, (t, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
        item = entry(t, lp)
        top = comp.top_logprobs[i] if comp.top_logprobs is not None else {}
        item["top_logprobs"] = [entry(tt, tlp) for tt, tlp in top.items()]
        content.append(item)
    return {"content": content}
