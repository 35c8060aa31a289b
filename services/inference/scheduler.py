"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a token budget (max_num_tokens) and a sequence cap (max_num_seqs).
Running sequences go first — one token each when decoding, the next prompt chunk when
still prefilling — then waiting ones are admitted in arrival order, their prompts cut
into chunks to fill the budget. When KV blocks run out the most recently admitted
running sequence is preempted: its blocks are freed and it goes back to the front of
the queue to be recomputed later, so nothing deadlocks and nothing is lost.
A sequence whose adapter cannot get a GPU slot now waits without holding others up.

Prefill while decoding (Sarathi-Serve's stall-free batching; vLLM's chunked prefill with a small
max_num_batched_tokens): a step that carries decode rows takes at most
`max_num_prefill_tokens_with_decode` prompt tokens (default 256), so a burst of long prompts never
turns one step of every running stream into a long stall; a step with no decode rows takes the
whole max_num_tokens (throughput). Why 256, for the Llama-3-8B / H200 case of issue 11: a prompt
token costs ~14 GFLOP (2 x 8B params + attention over 512 of context) = ~18 us at the measured
784 TFLOP/s, while a decode step at batch 64 takes 6.6-6.9 ms (4.7 ms of weight and KV reads at the
copy bandwidth). The linear layers of a step with 64 + P tokens stay bandwidth-bound up to
M ~ 185 tokens (784 TFLOP/s / 4.2 TB/s at 2 bytes a weight), so ~128 prompt tokens ride free and
256 add ~2-3 ms, while 512 make a step of ~16.6 ms (H200, 570 tokens: 2.4x a decode step) and 8192
~150 ms (every stream stalls 20+ steps' worth). At concurrency 64 with 512-token prompts and 128-token
outputs, 64 x 512 / 128 = 256 prompt tokens arrive per decode step: with a cap of 256 every step
carries about that (steps of ~320 tokens, ~1.4x a decode step), with 512 every other step carries a
whole prompt (2.4x), so the mean step, which is the time per output token, is shorter at 256 for the
same throughput; the cost is time to first token when prompts arrive in bursts (they queue for
chunks), and throughput for prompt-heavy loads (prefill capacity 256 tokens a step): raise the cap
there. The H200 figures of both are in kernels/PERF_NOTES.md (issue 11).

Adapters (the one interface: AdapterSlots.try_acquire / release_slot; lora/manager.py):
- residency is decided here, at admission, never at submission: a waiting request holds no
  host or GPU space, so any number of distinct adapters may be queued at once; an adapter not
  yet in host memory is loaded on a background thread and its requests are skipped meanwhile;
- fairness, with a bounded wait (slot hand-off, lora/admission.py _acquire_by_handoff): requests whose
  adapter is on a GPU slot are admitted freely; those that need a slot get one in arrival order;
  when the oldest of them finds every slot pinned, one slot (an adapter with no queued work
  first, then the fewest running sequences) takes no new requests and goes to it once its
  running sequences finish. Its wait is therefore bounded by one request's lifetime (max_tokens)
  while every other slot keeps admitting (LORASERVE_SLOT_HANDOFF=0: the older bounded-bypass
  policy, 16 admissions ahead of it, then no admissions until a slot drains). Evictions pick idle
  slots whose adapter has no queued work first, so a popular adapter is not evicted for a one-off;
- max_loras caps the distinct adapters of one batch (LoRA configs as in TensorRT-LLM/vLLM);
- an adapter that fails to load fails its own requests (`take_failed`), never the step, and
  never strands the sequences skipped before it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .block_manager import BlockManager
from .sequence import PLACEHOLDER, Sequence, SequenceStatus


class AdapterSlots(Protocol):
    def try_acquire(self, seq: Sequence) -> bool: ...   # pin seq's adapter on the GPU; False: no slot yet
    def release_slot(self, seq: Sequence) -> None: ...


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]      # tokens each sequence computes this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_tokens: int,
                 enable_chunked_prefill: bool = True, adapter_slots: AdapterSlots | None = None,
                 max_num_prefill_tokens_with_decode: int | None = None):
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_tokens = max_num_seqs, max_num_tokens
        # prompt tokens of a step that also decodes (None: no cap beyond max_num_tokens); see the module doc
        self.max_num_prefill_tokens_with_decode = max_num_prefill_tokens_with_decode
        self.enable_chunked_prefill = enable_chunked_prefill
        self.adapter_slots = adapter_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.failed: list[tuple[Sequence, Exception]] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_tokens
        # prompt tokens (chunks of sequences with more than one token to compute): capped while decodes run
        prefill_budget = budget
        cap = self.max_num_prefill_tokens_with_decode
        if cap is not None and cap < budget and self.enable_chunked_prefill and \
                any(len(s.token_ids) - s.num_computed_tokens == 1 for s in self.running):
            prefill_budget = cap
        # 1) running sequences, oldest first
        bs = self.block_manager.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = len(seq.token_ids)
            if num_tokens >= seq.max_num_tokens:  # draining: its last token is being sampled by the step in flight
                i += 1
                continue
            remaining = num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if remaining > 1:    # a prompt chunk (or a recompute after preemption)
                n = min(n, prefill_budget)
                if n == 0:
                    i += 1
                    continue
                prefill_budget -= n
            if (seq.num_computed_tokens + n + bs - 1) // bs <= len(seq.block_table):
                batch.seqs.append(seq)      # fast path (most decode steps): its blocks already hold the token
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted; everything after it already was too
        # 2) admit waiting sequences while budget, slots and blocks allow
        skipped: list[Sequence] = []
        try:
            while self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                ready = self._adapter_ready(seq)
                if not ready:
                    seq = self.waiting.popleft()
                    if ready is False:
                        skipped.append(seq)  # its adapter is not on a GPU slot yet; others go on
                    continue
                if not seq.block_table:
                    self.block_manager.match_prefix(seq)  # cached K/V of its prefix (same adapter only)
                remaining = seq.num_tokens - seq.num_computed_tokens
                n = min(remaining, budget, prefill_budget) if remaining > 1 else min(remaining, budget)
                if (n < remaining and not self.enable_chunked_prefill) or \
                        not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                    self.block_manager.deallocate(seq)  # undo the prefix match; it waits for blocks
                    if seq.lora is not None and self.adapter_slots is not None:
                        self.adapter_slots.release_slot(seq)
                    break
                self.waiting.popleft()
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                seq.status = SequenceStatus.RUNNING
                if seq.scheduled_time is None:   # first admission (RequestMetrics.first_scheduled_time)
                    seq.scheduled_time = time.monotonic()
                self.running.append(seq)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                if remaining > 1:
                    prefill_budget -= n
        finally:  # whatever happened, skipped sequences go back to the front in their order
            self.waiting.extendleft(reversed(skipped))
        return batch

    def _adapter_ready(self, seq: Sequence) -> bool | None:
        """True when seq needs no adapter or its adapter is pinned on a GPU slot; False: not yet;
        None: its adapter failed to load, and seq goes to `failed` (the engine ends it with the
        error) instead of raising here every step and stranding the sequences skipped before it."""
        if seq.lora is None or self.adapter_slots is None:
            return True
        try:
            return self.adapter_slots.try_acquire(seq)
        except Exception as exc:  # noqa: BLE001 - this request's failure, not the step's
            self.failed.append((seq, exc))
            return None

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        """Sequences that left the queue because their adapter failed, with the error."""
        failed, self.failed = self.failed, []
        return failed

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        if seq.lora is not None and self.adapter_slots is not None:
            self.adapter_slots.release_slot(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- after a step (nano-vllm's postprocess, split at the launch for the overlapped loop) ----
    def on_launched(self, batch: ScheduledBatch, sampling: list[Sequence]) -> None:
        """The batch is on the device: its tokens count as computed (the next step may be scheduled
        before this one finishes), and each sampling sequence (row i of `sampling`) holds a
        placeholder for the token the step is drawing."""
        if sampling is batch.seqs:             # every row samples (decode): one pass
            for row, (seq, n) in enumerate(zip(sampling, batch.num_new_tokens)):
                seq.num_computed_tokens += n
                seq.token_ids.append(PLACEHOLDER)
                seq.num_pending += 1
                seq.pending_row = row
            return
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        for row, seq in enumerate(sampling):   # Sequence.add_placeholder, inlined (64+ calls a step)
            seq.token_ids.append(PLACEHOLDER)
            seq.num_pending += 1
            seq.pending_row = row

    def postprocess(self, batch: ScheduledBatch) -> None:
        """The step's tokens are in (the engine appended them and set finish reasons): key the blocks
        it filled for prefix reuse, then free the sequences that finished."""
        bs = self.block_manager.block_size
        for seq in batch.seqs:
            if seq.status is SequenceStatus.FINISHED:
                continue
            if (seq.num_hashed_blocks + 1) * bs <= seq.num_computed_tokens:
                self.block_manager.register_full_blocks(seq)
            if seq.finish_reason is not None:
                self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's blocks and adapter pin."""
        if seq in self.running:
            self.running.remove(seq)
            if seq.lora is not None and self.adapter_slots is not None:
                self.adapter_slots.release_slot(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
