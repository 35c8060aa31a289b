"""A request's state as it moves through the engine: tokens, KV blocks, output, timings."""
from __future__ import annotations

import enum
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loraserve.config import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


_counter = itertools.count()
# token_ids entry of a token being sampled by a step still in flight (overlapped scheduling); the
# runner feeds the real id to the next step straight from the device, the engine writes it here later
PLACEHOLDER = -1


@dataclass(eq=False)   # identity: `seq in running` / `running.remove(seq)` never compare every field
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    lora: Any = None                      # resolved adapter handle (lora.manager.AdapterHandle) or None
    lora_request: Any = None
    seq_id: int = field(default_factory=lambda: next(_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)   # prompt + generated (+ trailing placeholders)
    num_pending: int = 0                  # trailing PLACEHOLDER entries: tokens sampled by steps in flight
    pending_row: int = -1                 # row of the latest in-flight step's sampled tokens for this seq
    max_num_tokens: int = 1 << 62         # prompt + max_tokens, capped by max_seq_len (set by the engine)
    num_computed_tokens: int = 0          # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0            # leading blocks keyed for reuse
    prefix_key: int | None = None         # chained key of the last keyed block
    finish_reason: str | None = None      # stop | length | abort
    stop_reason: Any = None               # the stop string or token id that matched
    error: str | None = None              # why the engine failed this request alone (finish_reason abort)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    output_text: str = ""
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    stop_ids: frozenset = frozenset()     # token ids that end it: stop_token_ids, + EOS unless ignore_eos (engine)
    detok: Any = None                     # detokenizer.IncrementalDetokenizer
    generator: Any = None                 # torch.Generator for seeded sampling
    # text: a request without stop strings is detokenized lazily, by whoever builds its stream messages
    # (output_builder.py); one with stop strings by the engine, token by token
    lazy_text: bool = False
    num_text_tokens: int = 0              # outputs whose text belongs to the output (a stop token's does not)
    num_detokenized: int = 0              # outputs already through `detok` (lazy requests)
    output_lock: Any = field(default_factory=threading.Lock)   # stream messages are built under it
    # what the last stream message covered
    sent_tokens: int = 0
    sent_text: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host (not those still in flight)."""
        return self.token_ids[self.num_prompt_tokens:self.num_tokens - self.num_pending]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens - self.num_pending

    @property
    def is_draining(self) -> bool:
        """Its last token is being sampled: nothing is left to compute for it."""
        return self.num_tokens >= self.max_num_tokens

    def add_placeholder(self, row: int) -> None:
        self.token_ids.append(PLACEHOLDER)
        self.num_pending += 1
        self.pending_row = row

    def resolve_placeholder(self, token: int) -> None:
        """The oldest in-flight token arrived."""
        self.token_ids[self.num_tokens - self.num_pending] = token
        self.num_pending -= 1

    def drop_placeholders(self) -> None:
        if self.num_pending:
            del self.token_ids[self.num_tokens - self.num_pending:]
            self.num_pending = 0

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def adapter_key(self) -> str | None:
        """Content identity of the adapter (digest) — part of any key of cached state."""
        return None if self.lora is None else self.lora.key
