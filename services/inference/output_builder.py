"""Stream messages built off the engine thread: the engine takes a snapshot per request and step (a few
attribute reads), and whoever delivers it builds the RequestOutput (AsyncLLM: the event-loop thread,
while the engine thread waits for the device; `LLMEngine.step()`: at once, on the caller's thread).

A request without stop strings is also detokenized here, lazily: its text cannot end it, so the
engine never needs it. Snapshots of one request are built in order (one consumer per request), so
the detokenizer advances exactly as it would token by token on the engine thread, and the messages
are identical to those built at once. A request with stop strings is detokenized by the engine (the
text decides when it ends); its snapshot holds the text as it was (str is immutable).
"""
from __future__ import annotations

from .outputs import CompletionOutput, RequestMetrics, RequestOutput


class PendingOutput:
    """What one stream message of `seq` covers, taken on the engine thread."""

    __slots__ = ("seq", "num_out", "num_text", "text", "cumulative_logprob", "finish_reason", "stop_reason",
                 "finished_time", "num_preemptions", "error")

    def __init__(self, seq):
        self.seq = seq
        self.num_out = len(seq.token_ids) - seq.num_pending - len(seq.prompt_token_ids)   # host-known outputs
        self.num_text = seq.num_text_tokens     # outputs whose text the message carries (lazy requests)
        self.text = None if seq.lazy_text else seq.output_text
        self.cumulative_logprob = seq.cumulative_logprob
        self.finish_reason, self.stop_reason = seq.finish_reason, seq.stop_reason
        self.finished_time, self.num_preemptions, self.error = seq.finished_time, seq.num_preemptions, seq.error

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def build(self) -> RequestOutput:
        seq = self.seq
        with seq.output_lock:   # normally uncontended: one builder per request
            return self._build(seq)

    def _build(self, seq) -> RequestOutput:
        p = seq.sampling_params
        finished = self.finish_reason is not None
        text = self.text
        if text is None:
            text = _detokenize_upto(seq, self.num_text)
        visible = len(text)
        if not finished and p.stop:
            # hold back a tail that could still grow into a stop string
            visible = max(seq.sent_text, len(text) - max(len(s) for s in p.stop) + 1)
        n_prompt = len(seq.prompt_token_ids)
        ids = seq.token_ids[n_prompt:n_prompt + self.num_out]   # a fresh list: this message's outputs
        want_logprobs = p.logprobs
        comp = CompletionOutput(
            0, text if visible == len(text) else text[:visible], ids, self.finish_reason, self.stop_reason,
            seq.logprobs[:self.num_out] if want_logprobs is not None else None,
            seq.top_logprobs[:self.num_out] if want_logprobs else None,
            self.cumulative_logprob, text[seq.sent_text:visible], ids[seq.sent_tokens:])
        seq.sent_text, seq.sent_tokens = visible, len(ids)
        metrics = RequestMetrics(seq.arrival_time, seq.scheduled_time, seq.first_token_time, self.finished_time,
                                 self.num_preemptions)
        # the prompt list is shared, not copied per message: the engine never changes it
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [comp], finished, metrics,
                             seq.lora_request, seq.adapter_key, error=self.error)


def _detokenize_upto(seq, num_text: int) -> str:
    """seq.output_text after its first num_text output tokens (advances the detokenizer; in order)."""
    done = seq.num_detokenized
    if num_text > done:
        base = len(seq.prompt_token_ids)
        add = seq.detok.add
        seq.output_text += "".join([add(t) for t in seq.token_ids[base + done:base + num_text]])
        seq.num_detokenized = num_text
    return seq.output_text
