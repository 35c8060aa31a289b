"""Runs one scheduled batch through the model: builds inputs and the per-step Context,
allocates the paged KV cache, and samples the next token of every sequence that needs one."""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from loraserve.config import EngineConfig

from .context import Context, prepare_attention, reset_context, set_context
from .models.llama import LlamaForCausalLM, ModelArgs
from .sampler import MetadataCache, SamplerOutput, sample
from .scheduler import ScheduledBatch
from .step_inputs import StepInputBuilder

log = logging.getLogger(__name__)
CPU_KV_MIN_BYTES = 64 << 20   # the CPU KV cache floor (then 2x the weights, at most 1 GiB)


def sampler_graphs_enabled() -> bool:
    """Greedy decode steps sample inside a CUDA graph per decode bucket (cuda_graphs.capture_greedy_sampler):
    on by default; LORASERVE_SAMPLER_GRAPHS=0 samples eagerly."""
    return os.environ.get("LORASERVE_SAMPLER_GRAPHS", "1").lower() not in ("0", "false", "off", "no", "")


class ModelRunner:
    def __new__(cls, config, model, *args, **kwargs):
        if cls is ModelRunner and getattr(getattr(model, "tp", None), "executor", None) is not None:  # TP rank 0
            from .tp.runner import TPModelRunner

            cls = TPModelRunner
        return super().__new__(cls)

    def __init__(self, config: EngineConfig, model: LlamaForCausalLM, args: ModelArgs, dtype: torch.dtype,
                 device: torch.device, lora_manager=None):
        self.config, self.model, self.args = config, model, args
        self.dtype, self.device = dtype, device
        self.lora_manager = lora_manager
        self.block_size = config.kv_cache_config.tokens_per_block
        # FP8 KV cache (quant_config.kv_cache_quant_algo): e4m3 blocks, half the bytes of bf16 per token
        quant = getattr(config, "quant_config", None)
        self.kv_dtype = torch.float8_e4m3fn if quant is not None and quant.fp8_kv_cache else dtype
        if self.kv_dtype != dtype:
            from .models.fp8 import enable_fp8_kv_cache

            enable_fp8_kv_cache(model, device)   # CUDA: the Triton kernels read e4m3; CPU: torch
        self.num_blocks = self._size_kv_cache()
        # one extra block: the scratch block that padded CUDA-graph rows write into
        shape = (args.num_hidden_layers, self.num_blocks + 1, self.block_size, args.num_key_value_heads, args.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.k_cache[i], self.v_cache[i]
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                 2 * self.k_cache.numel() * self.k_cache.element_size() / 2**20)
        # padded block-table entries point at the scratch block (CUDA-graph padding rows write there)
        # CUDA: block tables padded to 16 columns (one Triton variant of the attention kernel for every step;
        # see StepInputBuilder), at most the graphs' static width
        max_len = config.max_seq_len or args.max_position_embeddings
        self.inputs = StepInputBuilder(self.block_size, self.num_blocks, device, 16 if device.type == "cuda" else 1,
                                       -(-max_len // self.block_size), with_lora=lora_manager is not None)
        self.eos_ids: set[int] = set()    # the engine fills it (min_tokens bans EOS)
        self.sampling_meta = MetadataCache(device)   # sampling metadata, reused while the rows repeat
        self.packed_slots = PackedSlots() if device.type == "cuda" else None   # pinned blocks of the token copies
        self.graph_runner = None
        self.mixed_graphs = None     # mixed_graphs.MixedGraphRunner (prompt chunks + decodes), when on
        if device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        from loraserve.kernels import triton_available

        from .cuda_graphs import CudaGraphRunner

        if not triton_available():
            log.warning("triton unavailable: decode runs without CUDA graphs")
            return
        max_len = self.config.max_seq_len or self.args.max_position_embeddings
        runner = CudaGraphRunner(self.model, self.device, min(self.config.max_num_seqs, 256),
                                 -(-max_len // self.block_size), self.num_blocks, self.block_size, self.lora_manager)
        try:
            try:
                runner.capture()
            except Exception:  # noqa: BLE001 - the LoRA metadata build in the graphs is the newer part: without it
                if not getattr(runner, "lora_meta_in_graph", False):
                    raise
                log.exception("decode CUDA graph capture with the LoRA metadata build inside failed; capturing "
                              "without it (LORASERVE_LORA_META_IN_GRAPH=0)")
                runner.lora_meta_in_graph = False
                runner.graphs.clear()
                runner.capture()
            self.graph_runner = runner
        except Exception:  # noqa: BLE001 - eager decode still works
            log.exception("CUDA graph capture failed; decode runs eagerly")
            return
        if sampler_graphs_enabled() and type(self) is ModelRunner:
            try:
                runner.capture_greedy_sampler()
            except Exception:  # noqa: BLE001 - the eager sampler still works
                log.exception("greedy-sampler CUDA graph capture failed; sampling runs eagerly")
                runner.sampler_graphs = None
        from .mixed_graphs import MixedGraphRunner, mixed_graphs_enabled

        if mixed_graphs_enabled() and type(self) is ModelRunner and self.kv_dtype == self.dtype:
            cfg, a = self.config, self.args
            # steps of up to max(cap, 512) prompt tokens + a full batch of decodes (static buffers only: graphs
            # are captured per shape met, so a cap raised at run time, as bench_e2e's sweep does, stays graphed)
            cap = max(cfg.max_num_prefill_tokens_with_decode or cfg.max_num_tokens, 512)
            self.mixed_graphs = MixedGraphRunner(
                self.model, self.device, runner.max_batch, min(cfg.max_num_tokens, cap + runner.max_batch),
                -(-max_len // self.block_size), self.num_blocks, self.block_size, a.num_attention_heads,
                a.num_key_value_heads, torch.finfo(self.dtype).bits // 8, lora_manager=self.lora_manager)

    def _size_kv_cache(self) -> int:
        a = self.args
        bytes_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * torch.finfo(self.kv_dtype).bits // 8
        kv = self.config.kv_cache_config
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            # free memory already excludes the LoRA slots: the manager allocated them before this runs
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * kv.free_gpu_memory_fraction) - (1 << 30)  # 1 GiB for activations
        else:
            # CPU: sized to the model (a few-MB model gets no 1 GiB cache): twice the weights, 64 MiB..1 GiB
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            budget = min(1 << 30, max(CPU_KV_MIN_BYTES, 2 * weights))
        tokens = max(budget // bytes_per_token, self.block_size)
        self.kv_blocks_by_memory = tokens // self.block_size   # before the caps below (benchmarks/bench_fp8.py)
        if kv.max_tokens:
            tokens = min(tokens, kv.max_tokens)
        max_len = self.config.max_seq_len or a.max_position_embeddings
        tokens = min(tokens, max(max_len, 1) * self.config.max_num_seqs)
        return max(tokens // self.block_size, 1)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, prev: StepOutput | None = None) -> StepOutput:
        """Launch the batch and its sampling without waiting for the device. prev: the step still in
        flight, whose sampled tokens feed this step's placeholder inputs on the device. The returned
        StepOutput's `fetch()` waits for and returns the sampled tokens."""
        dev = self.device
        # placeholders are fed from prev's sampled rows: each sequence's pending_row (set when prev launched)
        inp, ph_dst, ph_src = self.inputs.build(batch.seqs, batch.num_new_tokens, True if prev is not None else None)
        if ph_dst is not None and inp.placeholders_everywhere:   # one gather straight into the ids: one op fewer
            torch.index_select(prev.sampled.tokens, 0, ph_src, out=inp.input_ids)
        elif ph_dst is not None:
            inp.input_ids.index_put_((ph_dst,), prev.sampled.tokens[ph_src])  # [P] ids still on the device
        # every row samples in a decode step: the batch's own list (a fresh list per schedule, never changed)
        sample_seqs = batch.seqs if len(inp.sample_rows) == len(batch.seqs) else [batch.seqs[i] for i in inp.sample_rows]
        decode_only = len(batch.num_new_tokens) == batch.num_tokens
        if decode_only and self.graph_runner is not None and self.graph_runner.can_run(len(batch.seqs)):
            hidden = self.graph_runner.run(inp)
            if self.graph_runner.sampler_graphs is not None and len(sample_seqs) == len(batch.seqs):
                meta = self.sampling_meta.get(sample_seqs, self._banned)
                if meta.all_greedy and meta.masked is None and meta.max_top_logprobs == 0:
                    if inp.has_lora:   # the sampler graph reads the no-LoRA graph's output rows: hand it these
                        bs = next(b for b in self.graph_runner.buckets if b >= len(sample_seqs))
                        self.graph_runner.graphs[(bs, False)][1][:len(sample_seqs)].copy_(hidden)
                    sampled, packed = self.graph_runner.sample_greedy(len(sample_seqs))
                    return StepOutput(sample_seqs, sampled, packed, self.packed_slots)
                return self._sample(hidden, inp.sample_idx, sample_seqs, meta)
            return self._sample(hidden, inp.sample_idx, sample_seqs)
        if not decode_only and self.mixed_graphs is not None:   # (LoRA rows: its LoRA graphs, or None)
            hidden = self.mixed_graphs.run(inp, batch.num_new_tokens)   # None: this step runs eagerly
            if hidden is not None:
                return self._sample(hidden, inp.sample_idx, sample_seqs)
        ctx = Context(
            slot_mapping=inp.slot_mapping,
            query_lens=list(batch.num_new_tokens),
            context_lens=inp.context_lens,
            context_lens_list=inp.context_lens_list,
            block_tables=inp.block_tables,
            decode_only=decode_only,
            last_rows_only=True,   # _sample reads hidden[sample_idx]: last rows of sequences only
        )
        prepare_attention(ctx, dev)  # once per step: query_start_loc for the kernel, or the torch path's split
        if self.lora_manager is not None:
            ctx.lora = self.lora_manager.prepare_batch(batch.seqs, batch.num_new_tokens)
        set_context(ctx)
        try:
            hidden = self.model(inp.input_ids, inp.positions)
        finally:
            reset_context()
        return self._sample(hidden, inp.sample_idx, sample_seqs)

    def _sample(self, hidden: torch.Tensor, sample_idx: torch.Tensor, sample_seqs: list, meta=None) -> StepOutput:
        if not sample_seqs:
            return StepOutput([], None)
        logits = self.model.compute_logits(hidden[sample_idx])
        if meta is None:
            meta = self.sampling_meta.get(sample_seqs, self._banned)   # reused while the rows repeat
        out = sample(logits, meta)
        return StepOutput(sample_seqs, out, slots=self.packed_slots)

    def _banned(self, p) -> tuple[int, ...]:
        """Token ids min_tokens keeps from being sampled: the stop ids, and EOS unless ignored."""
        return tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(self.eos_ids))


class StepOutput:
    """One launched step's sampled tokens: device tensors, plus their host copy in flight."""

    def __init__(self, seqs: list, sampled: SamplerOutput | None, packed: torch.Tensor | None = None,
                 slots: "PackedSlots | None" = None):
        """packed: the [3, >= S] float64 (token, logprob, ok) block when the caller has it (sampler graphs);
        slots: the runner's reusable pinned blocks and events for its copy (None: fresh ones)."""
        self.seqs, self.sampled = seqs, sampled       # seqs: [S] sampling sequences, in row order
        self._host = self._host_np = self._top = self._event = None
        self.events = None    # (start, end) CUDA events around the launch (engine.step_trace only)
        self.wait_s = 0.0     # how long fetch() blocked on the device (the host's idle time)
        if sampled is None:
            return
        # [3, S] float64 (token ids < 2**53 are exact): one device->host copy for the common fields
        if packed is None:
            packed = torch.stack([sampled.tokens.double(), sampled.logprobs.double(), sampled.ok.double()])
        non_blocking = packed.is_cuda
        if non_blocking and slots is not None:
            self._host, self._host_np, self._event = slots.take(packed.shape[1])
            self._host.copy_(packed, non_blocking=True)
        else:
            self._host = _to_host(packed)
        if sampled.top_ids is not None:
            self._top = (_to_host(sampled.top_ids), _to_host(sampled.top_logprobs))
        if non_blocking:
            self._event = self._event or torch.cuda.Event()
            self._event.record()

    def fetch(self) -> tuple[list[int], list[float], list[bool], list[dict[int, float] | None]]:
        """Wait for the step; (tokens, chosen logprobs, ok, top logprobs {id: logprob} per row or None)."""
        if self._host is None:
            return [], [], [], []
        if self._event is not None:
            t = time.perf_counter()
            self._event.synchronize()
            self.wait_s = time.perf_counter() - t
        n = len(self.seqs)
        # numpy over the [3, >= n] float64 block (a sampler graph's covers its bucket): three C-level conversions
        host = self._host_np if self._host_np is not None else self._host.numpy()
        tokens, logprobs, ok = host[0, :n].astype(np.int64).tolist(), host[1, :n].tolist(), (host[2, :n] != 0).tolist()
        top: list[dict[int, float] | None] = [None] * n
        if self._top is not None:
            ids, values = self._top[0].tolist(), self._top[1].tolist()
            for i, s in enumerate(self.seqs):
                k = s.sampling_params.logprobs
                if k:
                    top[i] = dict(zip(ids[i][:k], values[i][:k]))
        return tokens, logprobs, ok, top


class PackedSlots:
    """Pinned [3, S] float64 host blocks and their events, used in turn (two fewer allocations a step).
    At most two steps' blocks are alive at once (the one in flight, the one being read), so a block
    comes round again only long after it was read."""

    def __init__(self, num: int = 8):
        self._blocks: list[torch.Tensor | None] = [None] * num
        self._events = [None] * num
        self._views: list[dict[int, tuple]] = [{} for _ in range(num)]   # width -> [3, width] view, its numpy view
        self._i = 0

    def take(self, width: int) -> tuple[torch.Tensor, np.ndarray, "torch.cuda.Event"]:
        i = self._i = (self._i + 1) % len(self._blocks)
        # a contiguous [3, width] view: a strided host target would make the copy go through a pageable
        # temporary, and the host would wait for the whole step. Made once per (block, width): no torch call
        # here in the steady state (each costs ~10-20 us on the H200 host)
        views = self._views[i].get(width)
        if views is None:
            block = self._blocks[i]
            if block is None or block.numel() < 3 * width:
                block = self._blocks[i] = torch.empty(3 * max(width, 256), dtype=torch.float64, pin_memory=True)
                self._events[i] = torch.cuda.Event()
                self._views[i] = {}
            view = block[:3 * width].view(3, width)
            views = self._views[i][width] = (view, view.numpy())
        return views[0], views[1], self._events[i]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A device->host copy that does not block: into pinned memory (a pageable target would make the
    copy synchronous, and the host would wait for the whole step right after launching it)."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
