"""LLMEngine: request -> sequence -> scheduler -> model runner -> sampler -> detokenizer -> output.

`step()` runs one batch and returns a RequestOutput for every request that made progress.
Synchronous and single-threaded; `AsyncLLM` (async_llm.py) drives it from a thread.
"""
from __future__ import annotations

import logging
import time

import torch

from loraserve.config import EngineConfig, LoRARequest, SamplingParams

from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, TokenizerWrapper
from .model_runner import ModelRunner
from .models.loader import load_model
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = pick_device(config.device)
        torch.manual_seed(config.seed)
        self.model, self.args, self.dtype = load_model(config.model, config.dtype, self.device)
        self.tokenizer = TokenizerWrapper(config.model)
        self.max_seq_len = config.max_seq_len or self.args.max_position_embeddings
        if self.args.sliding_window and self.max_seq_len > self.args.sliding_window:
            # attention here is full-context: within the window it equals sliding-window attention
            log.warning("model uses sliding-window attention (%d); max_seq_len capped from %d to %d",
                        self.args.sliding_window, self.max_seq_len, self.args.sliding_window)
            self.max_seq_len = self.args.sliding_window
        self.eos_ids = set(self.args.eos_token_id)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.lora_manager = None
        if config.lora_config is not None:
            from .lora.manager import LoRAManager

            self.lora_manager = LoRAManager(config.lora_config, config.peft_cache_config, self.args, self.dtype,
                                            self.device, allowed_dirs=config.allowed_lora_dirs)
        self.runner = ModelRunner(config, self.model, self.args, self.dtype, self.device, self.lora_manager)
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size,
                                          config.kv_cache_config.enable_block_reuse)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_tokens,
                                   config.enable_chunked_prefill, self.lora_manager)
        self.seqs: dict[str, Sequence] = {}

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None, lora_handle=None) -> Sequence:
        """lora_handle: an adapter the caller already resolved (and holds) for this request."""
        try:
            return self._add_request(request_id, prompt, sampling_params, lora_request, lora_handle)
        except BaseException:
            if lora_handle is not None and self.lora_manager is not None:
                self.lora_manager.release(lora_handle)
            raise

    def _add_request(self, request_id, prompt, sampling_params, lora_request, lora_handle) -> Sequence:
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("n > 1 is served by LLM.generate and the OpenAI front (one engine request per "
                             "completion); an engine request takes n=1")
        if request_id in self.seqs:
            raise ValueError(f"duplicate request_id {request_id!r}")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.args.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_seq_len is {self.max_seq_len}")
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(ids) + params.max_tokens > capacity:
            raise ValueError(f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) exceeds the KV cache "
                             f"capacity of {capacity} tokens")
        handle = lora_handle
        if handle is None and lora_request is not None:
            if self.lora_manager is None:
                raise ValueError("a lora_request was given but the engine was built without lora_config")
            handle = self.lora_manager.resolve(lora_request)
        seq = Sequence(request_id, ids, params, prompt=text, lora=handle, lora_request=lora_request)
        seq.detok = IncrementalDetokenizer(self.tokenizer, ids)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return None
        seq.finish_reason = "abort"
        seq.finished_time = time.monotonic()
        self.scheduler.finish(seq)
        self._release_adapter(seq)
        return self._output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.seqs)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        # requests whose adapter failed to load end alone, with finish_reason "abort"
        failed = [self.abort_request(seq.request_id) for seq, _ in self.scheduler.take_failed()]
        failed = [out for out in failed if out is not None]
        if not batch:
            if not failed and self.lora_manager is not None and self.scheduler.waiting:
                self.lora_manager.wait_for_load(0.01)  # nothing runnable now: adapters are loading
            return failed
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.scheduled_time is None:
                seq.scheduled_time = now
        sampled = self.runner.run(batch)
        outputs = failed
        now = time.monotonic()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            if seq.seq_id not in sampled:
                continue
            token, logprob, top = sampled[seq.seq_id]
            if seq.first_token_time is None:
                seq.first_token_time = now
            self._append_token(seq, token, logprob, top)
            if seq.finish_reason is not None:
                seq.finished_time = now
                self.scheduler.finish(seq)
                self.seqs.pop(seq.request_id, None)
                self._release_adapter(seq)
            outputs.append(self._output(seq))
        return outputs

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora is not None and self.lora_manager is not None:
            self.lora_manager.release_request(seq)

    def _append_token(self, seq: Sequence, token: int, logprob: float, top: dict[int, float] | None = None) -> None:
        p = seq.sampling_params
        seq.token_ids.append(token)
        if p.logprobs is not None:
            seq.logprobs.append(logprob)
            if p.logprobs:
                seq.top_logprobs.append(top)
        seq.cumulative_logprob += logprob
        n_out = seq.num_output_tokens
        may_stop = n_out > p.min_tokens or p.min_tokens == 0
        if may_stop and token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return
        if may_stop and not p.ignore_eos and token in self.eos_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return
        before = len(seq.output_text)
        seq.output_text += seq.detok.add(token)
        if may_stop and p.stop:
            longest = max(len(s) for s in p.stop)
            window_start = max(0, before - longest + 1)
            hits = [(seq.output_text.find(s, window_start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                seq.output_text = seq.output_text[: i + len(s) if p.include_stop_str_in_output else i]
                seq.finish_reason, seq.stop_reason = "stop", s
                return
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_seq_len:
            seq.finish_reason = "length"

    def _output(self, seq: Sequence) -> RequestOutput:
        finished = seq.finish_reason is not None
        text = seq.output_text
        visible = len(text)
        if not finished and seq.sampling_params.stop:
            # hold back a tail that could still grow into a stop string
            visible = max(seq.sent_text, len(text) - max(len(s) for s in seq.sampling_params.stop) + 1)
        ids = seq.output_token_ids  # a fresh list (slice); the diff is sliced from it
        comp = CompletionOutput(
            index=0, text=text[:visible], token_ids=ids, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if seq.sampling_params.logprobs is not None else None,
            top_logprobs=list(seq.top_logprobs) if seq.sampling_params.logprobs else None,
            cumulative_logprob=seq.cumulative_logprob,
            text_diff=text[seq.sent_text:visible], token_ids_diff=ids[seq.sent_tokens:])
        seq.sent_text, seq.sent_tokens = visible, len(ids)
        metrics = RequestMetrics(seq.arrival_time, seq.scheduled_time, seq.first_token_time, seq.finished_time,
                                 seq.num_preemptions)
        # the prompt list is shared, not copied per step: the engine never changes it
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [comp], finished, metrics,
                             seq.lora_request, seq.adapter_key)
