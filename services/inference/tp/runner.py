"""TPModelRunner: the ModelRunner of rank 0 when tensor_parallel_size > 1.

It builds each step's inputs as ModelRunner does, sends them to the workers (tp/step.py), runs
shard 0 and samples from the all-gathered logits. The LoRA manager keeps its tiers and its
scheduling in this process only; its GPU slots are replaced by `ShardedSlots`, which hold shard 0
and forward each adapter placed on a slot to the workers, which copy their shard into the same
slot (adapters are parsed and fetched once per host, here).

CUDA graphs are not captured under TP (eager steps; NCCL capture is not done yet).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..lora.slots import DeviceSlots
from ..model_runner import ModelRunner, StepOutput
from .step import forward, load_slot, pack_adapter, pack_step

log = logging.getLogger(__name__)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ShardedSlots(DeviceSlots):
    """Rank 0's slots (sized by the shard's ModelArgs); `load` also sends the full adapter to the workers."""

    def __init__(self, executor, local_args, *args):
        super().__init__(local_args, *args)
        self.executor, self.local = executor, local_args

    def load(self, slot: int, adapter) -> int:
        index, flat = pack_adapter(adapter.weights, MODULES, self.dtype, self.device)
        self.executor.send(("load", slot, index, flat.numel(), adapter.rank, MODULES))
        self.executor.broadcast(flat)
        load_slot(super(), slot, adapter.weights, adapter.rank, self.local, 0)
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in adapter.weights.values())


class TPModelRunner(ModelRunner):
    def __init__(self, config, model, args, dtype, device, lora_manager=None):
        self.tp, self.executor = model.tp, model.tp.executor
        local = model.args
        if lora_manager is not None:   # replace the full-size slots before the KV cache is sized by free memory
            old = lora_manager.slots
            slots = ShardedSlots(self.executor, local, lora_manager.enabled, old.num_slots, old.max_rank, dtype, device)
            lora_manager.slots = lora_manager.device_tier.slots = slots
            del old
            # DoRA's g = m / ||W + B@A||_row needs whole rows of W, which no rank holds for o/down:
            # without a model the manager refuses DoRA adapters at load (AdapterFormatError)
            lora_manager.model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()   # the full-size slots' memory back to the device: KV sizing reads free memory
        super().__init__(dataclasses.replace(config, enforce_eager=True), model, local, dtype, device, lora_manager)
        self.executor.send(("setup", self.num_blocks, lora_manager.num_slots if lora_manager is not None else 0))

    @torch.inference_mode()
    def run(self, batch, prev: StepOutput | None = None) -> StepOutput:
        prev_rows = None
        if prev is not None and any(s.num_pending for s in batch.seqs):
            prev_rows = {s.seq_id: r for r, s in enumerate(prev.seqs)}
        inp, ph_dst, ph_src = self.inputs.build(batch.seqs, batch.num_new_tokens, prev_rows)
        if ph_dst is not None:
            inp.input_ids.index_put_((ph_dst,), prev.sampled.tokens[ph_src])
        sample_seqs = [batch.seqs[i] for i in inp.sample_rows]
        lora = None
        if self.lora_manager is not None:
            lora = self.lora_manager.prepare_batch(batch.seqs, batch.num_new_tokens)
        query_lens = list(batch.num_new_tokens)
        N, (B, W), S = inp.input_ids.numel(), inp.block_tables.shape, inp.sample_idx.numel()
        self.executor.send(("step", N, B, W, S, lora is not None, query_lens, list(inp.context_lens_list)))
        self.executor.broadcast(pack_step(inp, query_lens, self.device))
        try:
            hidden = forward(self.model, inp, query_lens, inp.context_lens_list, lora, self.device)
            return self._sample(hidden, inp.sample_idx, sample_seqs)
        except Exception as exc:  # noqa: BLE001 - a collective in the forward failed: the group is broken
            if self.executor.dead is not None or _is_collective_error(exc):
                self.executor._fail(f"tensor-parallel step failed: {exc!r}")
            raise

    def shutdown(self) -> None:
        self.executor.shutdown()


def _is_collective_error(exc: BaseException) -> bool:
    text = repr(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "peer", "timed out", "process group"))
