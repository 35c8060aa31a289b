"""CUDA-graph replay of decode steps (one token per sequence), as vLLM and SGLang do.

A decode step of a model this size is hundreds of small kernels; launching them one by one
costs more than the weights take to stream at small batch. Each batch-size bucket's forward
is captured once into a graph that reads static input buffers: token ids, positions, KV
slots, context lengths and block tables (attention is the Triton paged-decode kernel, whose
loop bounds come from device memory), plus the LoRA metadata buffers. A step copies its
inputs into the buffers device to device (they arrive packed in one host->device copy, see
step_inputs.py), pads the bucket with rows that write a scratch KV block, and replays.
Prefill and mixed steps run eagerly (or from mixed_graphs.py).

LoRA grids: a bucket's LoRA graph launches cdiv(bs, 16) + min(slots, bs) tiles (the most distinct adapters bs
rows can have). With segment buckets (LORASERVE_LORA_SEG_BUCKETS=decode, the default, or 1) a step whose distinct
adapters (StepInputs.num_adapters) fit a smaller mixed_graphs.seg_bucket replays a graph of (bucket, segments),
captured on first use: 36 tiles instead of 68 at 64 rows over 32 adapters, and the kernels' configs (expand
column groups) sized for them. H200 (8 layers, q+v, 32 adapters of rank 8-64): +37.2 -> +27.1 us a layer over
the graph without LoRA.
"""
from __future__ import annotations

import logging

import torch

from .context import Context, reset_context, set_context

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class CudaGraphRunner:
    def __init__(self, model, device: torch.device, max_batch: int, max_blocks_per_seq: int, scratch_block: int,
                 block_size: int, lora_manager=None):
        self.model, self.device, self.lora_manager = model, device, lora_manager
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        B = self.buckets[-1]
        self.max_batch = B
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        i64 = dict(dtype=torch.long, device=device)
        # ids, positions, slots: rows of one [3, B] buffer, so a step's three arrive in one copy
        self.ids_positions_slots = torch.zeros(3, B, **i64)
        self.input_ids, self.positions, self.slot_mapping = self.ids_positions_slots.unbind(0)
        self.slot_mapping.fill_(self.scratch_slot)
        self.context_lens = torch.ones(B, dtype=torch.int32, device=device)
        self.block_tables = torch.full((B, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        # rows [_real_rows, B) of slot_mapping / context_lens / block_tables[:, 0] hold padding values (the
        # scratch slot, length 1, the scratch block): a step pads only the rows a larger step left behind
        self._real_rows = 0
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, object]] = {}  # (bucket, lora)
        self.sampler_graphs: dict | None = None    # bucket -> (graph, SamplerOutput, packed [3, bs])
        self._sampler_views: dict[int, tuple] = {}  # n -> (the bucket's SamplerOutput, its first n rows)
        self._step_views: dict[tuple[int, int], tuple] = {}   # (n, width) -> the static inputs' [:n] views
        self._out_views: dict[tuple[int, bool], torch.Tensor] = {}   # (n, lora) -> the graph output's [:n] rows
        self._last_run = (-1, 0, 0)   # (build_id, n, width) of the inputs the static buffers hold
        self.lora_builder = None
        if lora_manager is not None:
            from loraserve.kernels import LoRAMetaBuilder

            from .mixed_graphs import lora_meta_in_graph

            self.lora_builder = LoRAMetaBuilder(B, lora_manager.num_slots, device)
            self.token_slot = torch.full((B,), -1, dtype=torch.int32, device=device)
            # the LoRA metadata build captured inside each LoRA graph (a step copies its [n] slots only; ~30
            # host launches fewer); LORASERVE_LORA_META_IN_GRAPH=0: built eagerly before each replay
            self.lora_meta_in_graph = lora_meta_in_graph()
            from .mixed_graphs import lora_seg_buckets

            # never under tensor parallelism: a capture on first use would run collectives the other ranks don't
            self.seg_buckets = lora_seg_buckets("decode") and getattr(model, "tp", None) is None
            self.seg_graphs: dict[tuple[int, int], tuple] = {}   # (bucket, segments) -> (graph, out, ctx)
            self._seg_pool = None

    def _context(self, bs: int, with_lora: bool, segments: int | None = None) -> Context:
        ctx = Context(slot_mapping=self.slot_mapping[:bs], query_lens=[1] * bs, context_lens=self.context_lens[:bs],
                      block_tables=self.block_tables[:bs], decode_only=True)
        if with_lora:
            from .lora.batch import LoRABatch

            ctx.lora = LoRABatch(self.lora_manager.slots,
                                 self.lora_builder.build(self.token_slot[:bs], max_segments=segments))
        return ctx

    @torch.inference_mode()
    def _capture_seg(self, bs: int, segments: int) -> tuple:
        """The LoRA graph of bucket bs with its grid bounded by `segments` distinct adapters (what capture() does
        for one bucket, on first use: the static buffers hold the current step, whose rows it computes)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        ctx = self._context(bs, True, segments)
        set_context(ctx)
        try:
            with torch.cuda.stream(stream):
                self.model(self.input_ids[:bs], self.positions[:bs])   # warm-up: any compile, the allocator
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            if self._seg_pool is None:
                self._seg_pool = torch.cuda.graph_pool_handle()
            # thread_local: the engine's other threads (adapter copies, detokenizer) keep running meanwhile
            with torch.cuda.graph(graph, pool=self._seg_pool, stream=stream, capture_error_mode="thread_local"):
                if self.lora_meta_in_graph:
                    self.lora_builder.build(self.token_slot[:bs], max_segments=segments)
                out = self.model(self.input_ids[:bs], self.positions[:bs])
        finally:
            reset_context()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.seg_graphs[(bs, segments)] = entry = (graph, out, ctx)
        log.debug("captured a decode CUDA graph for %d rows with a LoRA grid for %d adapters", bs, segments)
        return entry

    def _lora_graph(self, bs: int, num_adapters: int | None) -> tuple[tuple, int | None]:
        """(graph entry, its segment bound) a step of bucket bs with num_adapters distinct adapters replays: the
        (bs, segments) graph when seg buckets are on and a bucket tighter than min(slots, bs) holds them, else
        the bucket's own (None)."""
        if self.seg_buckets and num_adapters:
            from .mixed_graphs import seg_bucket

            seg = seg_bucket(num_adapters, bs + 1)
            if seg < min(self.lora_manager.num_slots, bs):
                entry = self.seg_graphs.get((bs, seg))
                if entry is not None:
                    return entry, seg
                try:
                    return self._capture_seg(bs, seg), seg
                except Exception:  # noqa: BLE001 - the bucket's own graph is exact for any adapters
                    log.exception("decode LoRA graph capture with a bounded grid failed; bucket graphs from now on")
                    self.seg_buckets = False
        return self.graphs[(bs, True)], None

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream(self.device)
        # The warm-up runs on `stream`: it must see every buffer the current stream filled (the static
        # inputs' torch.full/zeros above, the weights, the KV cache). Without this wait the warm-up read
        # block tables before their fill ran: harmless on fresh (zeroed) cudaMalloc memory, an out-of-bounds
        # gather on memory the caching allocator handed back from an earlier engine in the same process.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # Two graphs per bucket when adapters are configured: one with the LoRA kernels and one
        # without, so that a batch with no adapter row pays no LoRA launches (at batch 64 on the
        # 8B shape the no-op LoRA kernels cost ~0.6 ms of an 11 ms step, profile 2026-11-30).
        variants = (True, False) if self.lora_manager is not None else (False,)
        for bs, with_lora in ((b, v) for b in reversed(self.buckets) for v in variants):
            ctx = self._context(bs, with_lora)
            set_context(ctx)
            try:
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm up: compile Triton kernels, settle the allocator
                        self.model(self.input_ids[:bs], self.positions[:bs])
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    if with_lora and self.lora_meta_in_graph:
                        self.lora_builder.build(self.token_slot[:bs])   # refills the buffers ctx.lora reads
                    out = self.model(self.input_ids[:bs], self.positions[:bs])
            finally:
                reset_context()
            pool = graph.pool() if pool is None else pool
            self.graphs[(bs, with_lora)] = (graph, out, ctx)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    @torch.inference_mode()
    def capture_greedy_sampler(self) -> None:
        """Per bucket, a second graph: LM head + greedy sampling of the decode graph's hidden states into
        static [bs] tokens and a [3, bs] float64 (token, logprob, ok) block for the one device->host copy,
        about twenty launches and their Python replaced by one replay (LORASERVE_SAMPLER_GRAPHS=0: off). The
        same ops as the eager sampler (sampler.sample with all-greedy metadata), over the bucket's rows."""
        from .sampler import SamplingMetadata, sample

        meta = SamplingMetadata(greedy=None, temperature=None, top_k=None, top_k_max=0, top_p=None, masked=None,
                                generators=[], max_top_logprobs=0, all_greedy=True)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for bs in reversed(self.buckets):
            hidden = self.graphs[(bs, False)][1]
            with torch.cuda.stream(stream):
                sample(self.model.compute_logits(hidden), meta)   # warm-up
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = sample(self.model.compute_logits(hidden), meta)
                packed = torch.stack([out.tokens.double(), out.logprobs.double(), out.ok.double()])
            graphs[bs] = (graph, out, packed)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.sampler_graphs = graphs
        log.info("captured greedy-sampler CUDA graphs for decode batch sizes %s", self.buckets)

    def sample_greedy(self, n: int):
        """After run() of n rows without adapters: replay the bucket's sampler graph. Returns
        (SamplerOutput of the n rows, packed [3, bs] of the whole bucket)."""
        bs = next(b for b in self.buckets if b >= n)
        graph, out, packed = self.sampler_graphs[bs]
        graph.replay()
        views = self._sampler_views.get(n)
        if views is None or views[0] is not out:   # the [:n] views, made once per n (three fewer ops a step)
            views = self._sampler_views[n] = (out, out.__class__(out.tokens[:n], out.logprobs[:n], None, None, out.ok[:n]))
        return views[1], packed

    def can_run(self, n: int) -> bool:
        return bool(self.graphs) and n <= self.max_batch

    def run(self, inp) -> torch.Tensor:
        """inp: step_inputs.StepInputs of a decode step (already on the device). Copies them into the
        static buffers device to device (no host work per row), pads the bucket, replays. Its callers run in
        inference mode (ModelRunner.run, TPModelRunner.run, the TP worker loop): no context of its own here
        (entering one is a few us of host time every step)."""
        n = inp.input_ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        width = inp.block_tables.shape[1]
        # the static buffers' [:n] views, made once per (n, width): a torch call costs 10-40 us on a busy host
        views = self._step_views.get((n, width))
        if views is None:
            if len(self._step_views) > 4096:   # bounded: (batch size, table width) pairs of a long run
                self._step_views.clear()
            views = self._step_views[(n, width)] = (self.ids_positions_slots[:, :n], self.context_lens[:n],
                                                    self.block_tables[:n, :width])
        packed = getattr(inp, "ids_positions_slots", None)   # TP workers' unpacked steps carry none
        if packed is not None:
            views[0].copy_(packed)
        else:
            self.input_ids[:n].copy_(inp.input_ids)
            self.positions[:n].copy_(inp.positions)
            self.slot_mapping[:n].copy_(inp.slot_mapping)
        views[1].copy_(inp.context_lens)
        # steady decode: the tables of the previous build, which the previous replay copied (15 steps in 16)
        build_id = getattr(inp, "build_id", 0)
        if not (getattr(inp, "tables_as_prev", False) and self._last_run == (build_id - 1, n, width)):
            views[2].copy_(inp.block_tables)
        self._last_run = (build_id, n, width) if build_id else (-1, 0, 0)
        if self._real_rows > n:   # rows a larger step wrote become padding again (rows past it already are)
            m = self._real_rows
            self.slot_mapping[n:m].fill_(self.scratch_slot)
            self.context_lens[n:m].fill_(1)
            self.block_tables[n:m, 0].fill_(self.scratch_block)
        self._real_rows = n
        # TP workers' steps carry no host flag: the LoRA graph (exact for rows with slot -1 too)
        with_lora = self.lora_builder is not None and getattr(inp, "has_lora", True)
        if with_lora:
            self.token_slot[:n].copy_(inp.token_slot)
            self.token_slot[n:bs].fill_(-1)
            entry, segments = self._lora_graph(bs, getattr(inp, "num_adapters", None))
            if not self.lora_meta_in_graph:
                self.lora_builder.build(self.token_slot[:bs], max_segments=segments)
            self.lora_manager.slots.wait_for_copies()
        else:
            # a batch with no adapter row replays the graph captured without LoRA kernels (the LoRA
            # variant would be exact too, slot -1 adds nothing, but costs ~0.6 ms per 8B step)
            entry = self.graphs[(bs, False)]
        graph, out, _ = entry
        graph.replay()
        rows = self._out_views.get((n, with_lora))
        if rows is None or rows.data_ptr() != out.data_ptr():
            rows = self._out_views[(n, with_lora)] = out[:n]
        return rows
