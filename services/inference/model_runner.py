"""Runs one scheduled batch through the model: builds inputs and the per-step Context,
allocates the paged KV cache, and samples the next token of every sequence that needs one."""
from __future__ import annotations

import logging

import torch

from loraserve.config import EngineConfig

from .context import Context, reset_context, set_context, split_mixed
from .models.llama import LlamaForCausalLM, ModelArgs
from .sampler import sample
from .scheduler import ScheduledBatch

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: LlamaForCausalLM, args: ModelArgs, dtype: torch.dtype,
                 device: torch.device, lora_manager=None):
        self.config, self.model, self.args = config, model, args
        self.dtype, self.device = dtype, device
        self.lora_manager = lora_manager
        self.block_size = config.kv_cache_config.tokens_per_block
        self.num_blocks = self._size_kv_cache()
        # one extra block: the scratch block that padded CUDA-graph rows write into
        shape = (args.num_hidden_layers, self.num_blocks + 1, self.block_size, args.num_key_value_heads, args.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.k_cache[i], self.v_cache[i]
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                 2 * self.k_cache.numel() * self.k_cache.element_size() / 2**20)
        self.graph_runner = None
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
            runner.capture()
            self.graph_runner = runner
        except Exception:  # noqa: BLE001 - eager decode still works
            log.exception("CUDA graph capture failed; decode runs eagerly")

    def _size_kv_cache(self) -> int:
        a = self.args
        bytes_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * torch.finfo(self.dtype).bits // 8
        kv = self.config.kv_cache_config
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            # free memory already excludes the LoRA slots: the manager allocated them before this runs
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * kv.free_gpu_memory_fraction) - (1 << 30)  # 1 GiB for activations
        else:
            budget = 1 << 30
        tokens = max(budget // bytes_per_token, self.block_size)
        if kv.max_tokens:
            tokens = min(tokens, kv.max_tokens)
        max_len = self.config.max_seq_len or a.max_position_embeddings
        tokens = min(tokens, max(max_len, 1) * self.config.max_num_seqs)
        return max(tokens // self.block_size, 1)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[int, tuple[int, float]]:
        """Compute the batch; returns {seq_id: (next token, logprob, top logprobs)} for sequences that
        reached their end."""
        input_ids, positions, slots, ctx_lens = [], [], [], []
        sample_idx, sample_seqs = [], []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            bs = self.block_size
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n))
            ctx_lens.append(start + n)
            offset += n
            if start + n == seq.num_tokens:
                sample_idx.append(offset - 1)
                sample_seqs.append(seq)
        dev = self.device
        decode_only = all(n == 1 for n in batch.num_new_tokens)
        if decode_only and self.graph_runner is not None and self.graph_runner.can_run(len(batch.seqs)):
            token_slot = None
            if self.lora_manager is not None:
                token_slot = [-1 if s.lora is None else s.lora.slot for s in batch.seqs]
            hidden = self.graph_runner.run(input_ids, positions, slots, ctx_lens, [s.block_table for s in batch.seqs],
                                           token_slot)
            return self._sample(hidden, sample_idx, sample_seqs)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs],
                              dtype=torch.long, device=dev)
        ctx = Context(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_lens=list(batch.num_new_tokens),
            context_lens=torch.tensor(ctx_lens, dtype=torch.long, device=dev),
            context_lens_list=ctx_lens,
            block_tables=tables,
            decode_only=decode_only,
        )
        if not decode_only:
            split_mixed(ctx, dev)
        if self.lora_manager is not None:
            ctx.lora = self.lora_manager.prepare_batch(batch.seqs, batch.num_new_tokens)
        set_context(ctx)
        try:
            hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=dev),
                                torch.tensor(positions, dtype=torch.long, device=dev))
        finally:
            reset_context()
        return self._sample(hidden, sample_idx, sample_seqs)

    def _sample(self, hidden: torch.Tensor, sample_idx: list[int], sample_seqs: list) -> dict[int, tuple]:
        if not sample_seqs:
            return {}
        dev = self.device
        logits = self.model.compute_logits(hidden[torch.tensor(sample_idx, device=dev)])
        params = [s.sampling_params for s in sample_seqs]
        gens = []
        for s in sample_seqs:
            if s.generator is None and s.sampling_params.seed is not None and not s.sampling_params.greedy:
                s.generator = torch.Generator(device=dev).manual_seed(s.sampling_params.seed)
            gens.append(s.generator)
        tokens, logprobs, top = sample(logits, params, gens)
        return {s.seq_id: (t, lp, tp) for s, t, lp, tp in zip(sample_seqs, tokens, logprobs, top)}
