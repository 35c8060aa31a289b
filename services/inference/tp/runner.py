"""TPModelRunner: the ModelRunner of rank 0 when tensor_parallel_size > 1.

It builds each step's inputs as ModelRunner does, sends them to the workers (tp/step.py), runs
shard 0 and samples from the all-gathered logits. The LoRA manager keeps its tiers and its
scheduling in this process only; its GPU slots are replaced by `ShardedSlots`, which hold shard 0
and forward each adapter placed on a slot to the workers, which copy their shard into the same
slot (adapters are parsed and fetched once per host, here).

CUDA graphs under TP are on by default (LORASERVE_TP_CUDA_GRAPHS=0: eager): every rank captures the
same decode buckets in the same order (the warm-up runs' all-reduces pair up, the captured NCCL calls
replay in lockstep) and a decode step that fits a bucket is replayed on every rank. Run on 2 H200s
(2026-11-30, bench_tp.py, 8B shape): decode at batch 1 and 64 with NCCL all-reduces inside the graphs;
at 2 layers also the 256-prompt agreement run and 32 adapters. Eager TP=2 was 2.4x slower at batch 1.

On CUDA the all-reduces inside the graphs, the step broadcast and small logits gathers go through
PyTorch symmetric memory (tp/allreduce.py; LORASERVE_TP_CUSTOM_AR=0: NCCL). Probe on 2 H200s
(2026-11-30, 8 layers of the 8B shape, bench_tp --decode-only --compare-ar): TP=2 batch-1 decode 686
tok/s against 472 with NCCL all-reduces (1.45x), batch 64 25.8k against 24.0k tok/s; in a graph one
8 KB all-reduce takes 6.6 us against NCCL's 16 us, 512 KB 11 us against 21 (bench_allreduce.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from ..lora.slots import DeviceSlots
from ..model_runner import ModelRunner, StepOutput
from .startup import graph_buckets
from .step import forward, load_slot, pack_adapter, pack_step

log = logging.getLogger(__name__)
GRAPHS = os.environ.get("LORASERVE_TP_CUDA_GRAPHS", "1").strip() not in ("", "0")


def _sampler_graphs() -> bool:
    """Decode steps of greedy rows: the LM head, the logits gather (or the sharded greedy stats) and (rank 0) the
    greedy sampler replayed as one graph per rank instead of ~20 eager launches. On by default (self-checked at
    start; ran on 2 H200s in the 2026-11-30 17:58 final); LORASERVE_TP_SAMPLER_GRAPHS=0: eager; =follow: as
    TP=1 (LORASERVE_SAMPLER_GRAPHS, model_runner.py)."""
    tp_only = os.environ.get("LORASERVE_TP_SAMPLER_GRAPHS", "1")
    if tp_only.strip().lower() != "follow":
        return tp_only.strip().lower() not in ("", "0", "false", "off", "no")
    from .. import model_runner

    enabled = getattr(model_runner, "sampler_graphs_enabled", None)
    return enabled() if enabled is not None else False


# with the sampler graphs: each rank reduces its vocabulary shard, one [T, size, 8] all-gather instead of the
# [T, V] logits (tp/sampling.py, Triton kernels in kernels/tp_greedy.py; self-checked at start against the
# sampler on the gathered logits; LORASERVE_TP_LOCAL_ARGMAX=0: the logits gather)
LOCAL_ARGMAX = os.environ.get("LORASERVE_TP_LOCAL_ARGMAX", "1").strip().lower() not in ("", "0", "false", "off", "no")
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ShardedSlots(DeviceSlots):
    """Rank 0's slots (sized by the shard's ModelArgs); `load` also sends the full adapter to the workers."""

    def __init__(self, executor, local_args, *args):
        super().__init__(local_args, *args)
        self.executor, self.local = executor, local_args

    model = None   # rank 0's shard of the model (DoRA factors), set by TPModelRunner

    def load(self, slot: int, adapter) -> int:
        index, flat = pack_adapter(adapter.weights, MODULES, self.dtype, self.device)
        # DoRA magnitudes (float32 [out] per module, ~6 MB for all modules of an 8B adapter) ride the pipe
        magnitudes = {k: m.detach().to(torch.float32).cpu().numpy() for k, m in
                      (getattr(adapter, "magnitudes", None) or {}).items()} or None   # pickled by value
        self.executor.send(("load", slot, index, flat.numel(), adapter.rank, MODULES, magnitudes))
        self.executor.broadcast(flat)
        load_slot(self, slot, adapter.weights, adapter.rank, self.local, 0, self.model, magnitudes, super().load)
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in adapter.weights.values())


class TPModelRunner(ModelRunner):
    def __init__(self, config, model, args, dtype, device, lora_manager=None):
        self.tp, self.executor = model.tp, model.tp.executor
        from .startup import StartupClock

        clock = self.tp.clock or StartupClock(0)
        clock.mark("model load" + (" + LoRA manager" if lora_manager is not None else ""))
        from .fused_norm import attach_norms

        attach_norms(model, model.tp)   # before any forward: the workers do it right after loading (worker.py)
        local = model.args
        if lora_manager is not None:   # replace the full-size slots before the KV cache is sized by free memory
            old = lora_manager.slots
            slots = ShardedSlots(self.executor, local, lora_manager.enabled, old.num_slots, old.max_rank, dtype, device)
            lora_manager.slots = lora_manager.device_tier.slots = slots
            del old
            # DoRA's g = m / ||W + B@A||_row needs whole rows of W, which no rank holds for o/down:
            # every rank computes its shard's g when the adapter is placed on a slot (step.py)
            lora_manager.model = None
            lora_manager.dora_per_rank = True
            slots.model = model
            if device.type == "cuda":
                torch.cuda.empty_cache()   # the full-size slots' memory back to the device: KV sizing reads free memory
        super().__init__(dataclasses.replace(config, enforce_eager=True), model, local, dtype, device, lora_manager)
        from .profile import StepProfiler

        self.profiler = StepProfiler(0, device)   # LORASERVE_TP_PROFILE (off: no-ops)
        self.lora_sampler_graphs, self._sampler_views = None, {}   # sharded sampler over the LoRA decode graphs
        self.sampler_shards = False   # the greedy sampler graphs reduce the vocabulary shards (tp/sampling.py)
        self.executor.send(("setup", self.num_blocks, lora_manager.num_slots if lora_manager is not None else 0))
        clock.mark("KV cache + runner")
        if device.type == "cuda" and not config.enforce_eager and GRAPHS:
            self._capture_tp_graphs(config, clock)
        log.info("TP start-up, rank 0: %s", clock.summary())

    def _capture_tp_graphs(self, config, clock) -> None:
        """Capture on every rank at once; a failure is fatal here (ranks must never disagree on graphs)."""
        from loraserve.kernels import triton_available

        from ..cuda_graphs import CudaGraphRunner

        if not triton_available():
            return
        max_batch = min(config.max_num_seqs, 256)
        max_blocks = -(-(config.max_seq_len or self.args.max_position_embeddings) // self.block_size)
        self.executor.send(("capture", max_batch, max_blocks))
        runner = CudaGraphRunner(self.model, self.device, max_batch, max_blocks, self.num_blocks, self.block_size,
                                 self.lora_manager)
        runner.buckets = graph_buckets(runner.buckets)   # as the workers (worker._capture)
        runner.capture()
        self.graph_runner = runner
        clock.mark(f"decode graphs {runner.buckets}")
        if _sampler_graphs():   # every rank captures its logits graphs in the same order (worker._capture_logits)
            from .sampling import capture_sampler_graphs, self_check

            self.executor.send(("capture_logits", LOCAL_ARGMAX))
            # greedy over the vocabulary shards, no logits gather (tp/sampling.py), if it passes its check
            shards = self.sampler_shards = LOCAL_ARGMAX and self_check(self.model, self.tp, self.device)
            if shards:
                runner.sampler_graphs = capture_sampler_graphs(runner, self.model, self.tp, self.device)
                if any(lora for _, lora in runner.graphs):   # steps with adapter rows sample in a graph too
                    self.lora_sampler_graphs = capture_sampler_graphs(runner, self.model, self.tp, self.device, True)
            else:
                runner.capture_greedy_sampler()
            log.info("TP sampler graphs captured (%s)", "greedy over the vocabulary shards" if shards else "logits gather")
            clock.mark("sampler graphs")

    def profile_steps(self, skip: int, count: int, tag: str) -> None:
        """Every rank profiles `count` steps after the next `skip` (tp/profile.py; LORASERVE_TP_PROFILE=DIR)."""
        self.executor.send(("profile", skip, count, tag))
        self.profiler.arm(skip, count, tag)

    def time_replays(self, bs: int, n: int = 50, with_lora: bool = False) -> float:
        """ms per decode-graph replay of bucket `bs` on every rank at once, no host in the way (idle engine
        only: worker.time_replays). What the layers cost on the device, against a served step's time."""
        from .worker import time_replays

        self.executor.send(("replay", bs, n, with_lora))
        return time_replays(self.graph_runner, bs, n, with_lora)

    @torch.inference_mode()
    def run(self, batch, prev: StepOutput | None = None) -> StepOutput:
        self.profiler.begin()
        try:
            return self._run(batch, prev)
        finally:
            self.profiler.end()
            self.profiler.waiting()

    def _run(self, batch, prev: StepOutput | None) -> StepOutput:
        prev_rows = None
        if prev is not None and any(s.num_pending for s in batch.seqs):
            prev_rows = {s.seq_id: r for r, s in enumerate(prev.seqs)}
        inp, ph_dst, ph_src = self.inputs.build(batch.seqs, batch.num_new_tokens, prev_rows)
        if ph_dst is not None:
            inp.input_ids.index_put_((ph_dst,), prev.sampled.tokens[ph_src])
        sample_seqs = [batch.seqs[i] for i in inp.sample_rows]
        query_lens = list(batch.num_new_tokens)
        N, (B, W), S = inp.input_ids.numel(), inp.block_tables.shape, inp.sample_idx.numel()
        graphed = (self.graph_runner is not None and all(n == 1 for n in query_lens) and self.graph_runner.can_run(B))
        lora = meta = None
        if self.lora_manager is not None and not graphed:   # a replay builds its LoRA metadata itself
            lora = self.lora_manager.prepare_batch(batch.seqs, batch.num_new_tokens)
        has_lora = bool(inp.has_lora) if graphed else lora is not None
        logits_graph = False
        samplers = None if not graphed else self.lora_sampler_graphs if has_lora else self.graph_runner.sampler_graphs
        if samplers is not None and S == B:
            meta = self.sampling_meta.get(sample_seqs, self._banned)
            logits_graph = meta.all_greedy and meta.masked is None and meta.max_top_logprobs == 0
        self.executor.send(("step", N, B, W, S, has_lora, query_lens, list(inp.context_lens_list), graphed,
                            logits_graph))
        self.executor.broadcast(pack_step(inp, query_lens, self.device), self.tp.custom_ar)
        try:
            if graphed:
                hidden = self.graph_runner.run(inp)
                if logits_graph and has_lora:
                    from .sampling import replay_sampler

                    sampled, packed = replay_sampler(samplers, self.graph_runner.buckets, S, self._sampler_views)
                    return StepOutput(sample_seqs, sampled, packed, self.packed_slots)
                if logits_graph:
                    sampled, packed = self.graph_runner.sample_greedy(S)
                    return StepOutput(sample_seqs, sampled, packed, self.packed_slots)
            else:
                hidden = forward(self.model, inp, query_lens, inp.context_lens_list, lora, self.device)
            return self._sample(hidden, inp.sample_idx, sample_seqs, meta)
        except Exception as exc:  # noqa: BLE001 - a collective in the forward failed: the group is broken
            if self.executor.dead is not None or _is_collective_error(exc):
                self.executor._fail(f"tensor-parallel step failed: {exc!r}")
            raise

    def shutdown(self) -> None:
        if self.graph_runner is not None and self.device.type == "cuda" and self.executor.dead is None:
            # no replay in flight; the graphs' NCCL work released first. Not after a worker died: a
            # symmetric-memory all-reduce (tp/allreduce.py) waits for its peer on the GPU with no timeout
            torch.cuda.synchronize(self.device)
            self.graph_runner = None
        self.executor.shutdown()


def _is_collective_error(exc: BaseException) -> bool:
    text = repr(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "peer", "timed out", "process group"))
