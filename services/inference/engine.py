"""LLMEngine: request -> sequence -> scheduler -> model runner -> sampler -> detokenizer -> output.

`step()` runs one batch and returns a RequestOutput for every request that made progress.
Single-threaded; `AsyncLLM` (async_llm.py) drives it from a thread. With `async_scheduling` the
loop is overlapped (vLLM's async scheduling, SGLang's overlap scheduler): step N+1 is scheduled
and launched before step N's tokens are read back, so detokenization, stop checks and streaming
of step N run while the device computes N+1; decode inputs of N+1 take N's tokens on the device.
`step_pending()` is step() without building the messages: the engine thread only snapshots each
request's progress (output_builder.PendingOutput) and AsyncLLM builds the RequestOutputs (and
detokenizes requests without stop strings) on the consumers' event loop, during the device wait.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from loraserve.config import EngineConfig, LoRARequest, SamplingParams

from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, TokenizerWrapper
from .errors import InvalidRequestError
from .model_runner import ModelRunner, StepOutput
from .models.loader import load_model
from .output_builder import PendingOutput
from .outputs import RequestOutput
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, SequenceStatus
from .tp import start_tensor_parallel
from .warmup import warm_up, warmup_wanted

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def step_kind(num_new_tokens: list[int]) -> str:
    """'decode' (one token per row), 'prefill' (prompt chunks only) or 'mixed'."""
    decodes = num_new_tokens.count(1)
    return "decode" if decodes == len(num_new_tokens) else "prefill" if decodes == 0 else "mixed"


@dataclass(slots=True)
class StepRecord:
    """One step() call (engine.step_trace). Times in seconds (perf_counter). `launched` is the batch
    this call scheduled and launched; `done` the one it waited for and post-processed (the same batch
    in the serial loop, the previous one when overlapped)."""

    start: float                  # step() entered
    launched_at: float            # schedule + input building + launch returned (host work before the wait)
    end: float                    # step() returned (after the wait and the post-processing)
    wait_s: float                 # blocked on the device, inside end - launched_at
    kind: str | None              # of the launched batch (None: nothing launched)
    num_tokens: int               # tokens of the launched batch
    num_seqs: int
    done_kind: str | None         # of the post-processed batch
    events: tuple | None          # CUDA (start, end) events around the launched batch (CUDA only)

    @classmethod
    def of(cls, t0: float, t_launched: float, t_end: float, launched, done) -> "StepRecord":
        batch = launched[0] if launched is not None else None
        return cls(t0, t_launched, t_end, done[1].wait_s if done is not None else 0.0,
                   step_kind(batch.num_new_tokens) if batch else None, batch.num_tokens if batch else 0,
                   len(batch.seqs) if batch else 0, step_kind(done[0].num_new_tokens) if done is not None else None,
                   getattr(launched[1], "events", None) if launched is not None else None)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = pick_device(config.device)
        torch.manual_seed(config.seed)
        # tensor_parallel_size > 1: workers hold shards 1..N-1 and this process shard 0 (tp/); None otherwise
        self.tp = start_tensor_parallel(config, self.device)
        self.model, self.args, self.dtype = load_model(config.model, config.dtype, self.device, tp=self.tp,
                                                       quant_config=config.quant_config)
        self.tokenizer = TokenizerWrapper(config.model)
        self.max_seq_len = config.max_seq_len or self.args.max_position_embeddings
        if self.args.sliding_window and self.max_seq_len > self.args.sliding_window:
            # attention here is full-context: within the window it equals sliding-window attention
            log.warning("model uses sliding-window attention (%d); max_seq_len capped from %d to %d",
                        self.args.sliding_window, self.max_seq_len, self.args.sliding_window)
            self.max_seq_len = self.args.sliding_window
        # the fused RoPE reads a cos/sin table by position (clamped at its end): cover every position served
        self.model.rotary.num_positions = max(self.model.rotary.num_positions, self.max_seq_len)
        self.eos_ids = set(self.args.eos_token_id)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.lora_manager = None
        if config.lora_config is not None:
            from .lora.manager import LoRAManager

            self.lora_manager = LoRAManager(config.lora_config, config.peft_cache_config, self.args, self.dtype,
                                            self.device, allowed_dirs=config.allowed_lora_dirs, model=self.model)
        self.runner = ModelRunner(config, self.model, self.args, self.dtype, self.device, self.lora_manager)
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size,
                                          config.kv_cache_config.enable_block_reuse)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_tokens,
                                   config.enable_chunked_prefill, self.lora_manager,
                                   config.max_num_prefill_tokens_with_decode)
        self.seqs: dict[str, Sequence] = {}
        self.runner.eos_ids = self.eos_ids
        # overlapped loop: on by default on CUDA (the host work hides behind the device's)
        self.async_scheduling = (self.device.type == "cuda" if config.async_scheduling is None
                                 else bool(config.async_scheduling))
        self._inflight: tuple[ScheduledBatch, StepOutput] | None = None   # launched, not yet post-processed
        # called in every step() once its batch is launched, before the step waits for the device: AsyncLLM
        # hands the previous step's outputs to the event loop then, so that the loop's Python work runs
        # while this thread waits (GIL free), not while it launches (every torch call retakes the GIL)
        self.on_launched: Callable[[], None] | None = None
        # host-time accounting (benchmarks): steps run, and seconds step() spent blocked on the device
        self.num_steps, self.device_wait_s = 0, 0.0
        # a list: step() appends one StepRecord per call (bench_e2e's per-step breakdown); None: off
        self.step_trace: list[StepRecord] | None = None
        self.step_trace_device = True   # CUDA events around each traced launch (off: host timing only)
        # dummy steps that compile the eager steps' Triton variants before any request (warmup.py; CUDA only,
        # LORASERVE_WARMUP=0 skips): {'steps', 'seconds', 'failed'} or None
        self.warmup = warm_up(self) if warmup_wanted(self) else None
        if self.device.type == "cuda":
            # the objects of start-up (model, tokenizer, graphs) never become garbage: out of the collector's
            # way, so a collection during serving walks only what serving allocated (vLLM does the same)
            gc.collect()
            gc.freeze()

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
            raise InvalidRequestError("n > 1 is served by LLM.generate and the OpenAI front (one engine request "
                                      "per completion); an engine request takes n=1")
        if request_id in self.seqs:
            raise InvalidRequestError(f"duplicate request_id {request_id!r}")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids out of range [0, {self.args.vocab_size}): {bad[:5]}")
        bad = [t for t in params.stop_token_ids if t >= self.args.vocab_size]  # min_tokens bans them by index
        if bad:
            raise InvalidRequestError(f"stop_token_ids out of range [0, {self.args.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_seq_len:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; max_seq_len is {self.max_seq_len}")
        capacity = self.kv_capacity_tokens
        if len(ids) + params.max_tokens > capacity:
            raise InvalidRequestError(f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) exceeds the KV "
                                      f"cache capacity of {capacity} tokens")
        handle = lora_handle
        if handle is None and lora_request is not None:
            if self.lora_manager is None:
                raise InvalidRequestError("a lora_request was given but the engine was built without lora_config")
            handle = self.lora_manager.resolve(lora_request)
        seq = Sequence(request_id, ids, params, prompt=text, lora=handle, lora_request=lora_request)
        seq.max_num_tokens = min(len(ids) + params.max_tokens, self.max_seq_len)
        seq.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_ids))
        seq.detok = IncrementalDetokenizer(self.tokenizer, ids)
        seq.lazy_text = not params.stop    # no stop string: the text is built with the stream messages
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str, build: bool = True) -> RequestOutput | PendingOutput | None:
        """End a request now; returns its last message (build=False: unbuilt, for a caller that drops it:
        building detokenizes what no message has covered yet)."""
        pending = self._abort(request_id)
        return None if pending is None or not build else pending.build()

    def _abort(self, request_id: str) -> PendingOutput | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return None
        seq.finish_reason = "abort"
        seq.finished_time = time.monotonic()
        seq.drop_placeholders()      # a step in flight may still sample for it; that token is dropped
        self.scheduler.finish(seq)
        self._release_adapter(seq)
        return PendingOutput(seq)

    def queued_sequences(self) -> tuple[list[Sequence], list[Sequence]]:
        """(running, waiting) sequences, copies (call on the engine thread)."""
        return list(self.scheduler.running), list(self.scheduler.waiting)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.seqs)

    # ---- limits and state (what the fronts and metrics read) --------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        """The most tokens (prompt + max_tokens) one request can ever hold in the KV cache."""
        return self.block_manager.num_blocks * self.block_manager.block_size

    def stats(self) -> dict:
        """A snapshot of the engine's queues and KV cache (call on the engine thread for exact numbers)."""
        bm, sched = self.block_manager, self.scheduler
        return {"waiting": sched.num_waiting, "running": len(sched.running),
                "free_kv_blocks": bm.num_free_blocks, "total_kv_blocks": bm.num_blocks,
                "kv_block_size": bm.block_size, "reused_kv_blocks": bm.num_reused_blocks,
                "preemptions": sched.num_preemptions, "max_num_seqs": self.config.max_num_seqs,
                "max_num_tokens": self.config.max_num_tokens, "max_seq_len": self.max_seq_len,
                "max_num_prefill_tokens_with_decode": self.scheduler.max_num_prefill_tokens_with_decode,
                "kv_capacity_tokens": self.kv_capacity_tokens, "async_scheduling": self.async_scheduling}

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (as vLLM's LLM.reset_prefix_cache): later prompts are computed in full, e.g.
        a benchmark repeating its requests. Only when idle: False (nothing dropped) while requests hold blocks."""
        return not self.has_unfinished_requests() and self.block_manager.reset_prefix_cache()

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration; returns a RequestOutput for every request that made progress.
        Serial: schedule, launch, wait, post-process. Overlapped (async_scheduling): schedule and launch
        step N+1 first, then wait for step N and post-process it while the device runs N+1."""
        return [pending.build() for pending in self.step_pending()]

    def step_pending(self) -> list[PendingOutput]:
        """`step()` whose messages are built later, by the caller (AsyncLLM: on the event-loop thread);
        each PendingOutput's build() gives the RequestOutput step() would have returned. Build the
        messages of one request in order."""
        trace = self.step_trace
        t0 = time.perf_counter() if trace is not None else 0.0
        batch = self.scheduler.schedule()
        # requests whose adapter failed to load end alone, with finish_reason "abort"
        failed = []
        for seq, exc in self.scheduler.take_failed():
            seq.error = f"adapter {getattr(seq.lora, 'name', '')!r} could not be loaded: {exc}"
            failed.append(self._abort(seq.request_id))
        outputs = [out for out in failed if out is not None]
        self.num_steps += 1
        try:
            launched = self._launch(batch) if batch else None
            t_launched = time.perf_counter() if trace is not None else 0.0
            if self.on_launched is not None:
                self.on_launched()
            done, self._inflight = (self._inflight, launched) if self.async_scheduling else (launched, None)
            if done is not None:
                outputs += self._postprocess(*done)
        except BaseException:
            self._drop_inflight()
            raise
        if trace is not None:
            trace.append(StepRecord.of(t0, t_launched, time.perf_counter(), launched, done))
        if not batch and done is None and not outputs and self.lora_manager is not None and self.scheduler.waiting:
            self.lora_manager.wait_for_load(0.01)  # nothing runnable now: adapters are loading
        return outputs

    def _launch(self, batch: ScheduledBatch) -> tuple[ScheduledBatch, StepOutput]:
        timed = self.step_trace is not None and self.step_trace_device and self.device.type == "cuda"
        if timed:   # device time of the step: events around its launch (the trace only)
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        out = self.runner.run(batch, self._inflight[1] if self._inflight is not None else None)
        if timed:
            out.events = (start, torch.cuda.Event(enable_timing=True))
            out.events[1].record()
        self.scheduler.on_launched(batch, out.seqs)
        return batch, out

    def _postprocess(self, batch: ScheduledBatch, out: StepOutput) -> list[PendingOutput]:
        tokens, logprobs, ok, top = out.fetch()
        self.device_wait_s += out.wait_s
        now = time.monotonic()
        finished = SequenceStatus.FINISHED
        append_token, output = self._append_token, PendingOutput
        interval = self.config.stream_interval
        outputs, ended = [], []
        for seq, token, logprob, good, alts in zip(out.seqs, tokens, logprobs, ok, top):
            if seq.status is finished:
                continue   # aborted, or it ended one step earlier: the token computed since is dropped
            if seq.first_token_time is None:
                seq.first_token_time = now
            if good:
                append_token(seq, token, logprob, alts)
            else:          # no finite logit in its row: this request fails, its neighbours go on
                seq.drop_placeholders()
                seq.finish_reason = "abort"
                seq.error = ("the model produced no finite logit for this request (NaN/inf activations, "
                             "e.g. from an adapter's weights)")
                log.error("request %s: %s", seq.request_id, seq.error)
            if seq.finish_reason is not None:
                seq.finished_time = now
                seq.drop_placeholders()
                ended.append(seq)
            elif interval > 1:   # stream_interval: the first token, then every interval-th (and the last)
                n_out = len(seq.token_ids) - seq.num_pending - len(seq.prompt_token_ids)
                if n_out != 1 and n_out % interval:
                    continue     # the next output's diffs carry this step's tokens too
            outputs.append(output(seq))    # one pass: the output reads nothing the lines below change
        self.scheduler.postprocess(batch)   # key the filled blocks, free the finished sequences
        for seq in ended:
            self.seqs.pop(seq.request_id, None)
            self._release_adapter(seq)
        return outputs

    def _drop_inflight(self) -> None:
        """A step failed: the step in flight is lost, so its sequences cannot get their tokens."""
        if self._inflight is None:
            return
        _, out = self._inflight
        self._inflight = None
        for seq in out.seqs:
            if not seq.is_finished and seq.num_pending:
                self.abort_request(seq.request_id)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora is not None and self.lora_manager is not None:
            self.lora_manager.release_request(seq)

    def _append_token(self, seq: Sequence, token: int, logprob: float, top: dict[int, float] | None = None) -> None:
        # runs once per sampled token: plain attribute work, no property calls
        p = seq.sampling_params
        ids = seq.token_ids
        n_known = len(ids) - seq.num_pending + 1      # tokens known on the host, this one included
        ids[n_known - 1] = token                      # Sequence.resolve_placeholder, inlined
        seq.num_pending -= 1
        if p.logprobs is not None:
            seq.logprobs.append(logprob)
            if p.logprobs:
                seq.top_logprobs.append(top)
        seq.cumulative_logprob += logprob
        n_out = n_known - len(seq.prompt_token_ids)
        may_stop = n_out > p.min_tokens              # n_out >= 1: min_tokens == 0 always may stop
        if may_stop and token in seq.stop_ids:        # stop_token_ids, and EOS unless ignore_eos
            seq.finish_reason, seq.stop_reason = "stop", token
            return
        if seq.lazy_text:                             # no stop string: detokenized with the messages
            seq.num_text_tokens = n_out
        else:
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
        if n_out >= p.max_tokens or n_known >= self.max_seq_len:
            seq.finish_reason = "length"
