"""CUDA graphs for mixed steps: prompt chunks with decode rows riding along (issue 11).

In the steady state of a serving load nearly every step is mixed (a new request's prompt chunk next to
the running decodes), and eagerly such a step launches every kernel of every layer from Python: on the
8B shape that launch costs about as much host time as the device needs for the step. The attention
kernel (kernels/unified_attention.py) takes its grid from static sizes only (N tokens, B sequences),
so the whole forward of a mixed step can be captured per (B, N) bucket and replayed, as vLLM's full
CUDA graphs for its unified Triton attention do.

Padding: a step of N tokens over B sequences replays the graph of (Bp, T, splits), the smallest buckets with
Bp >= B + 1 and T >= N + (Bp - B). The Bp - B padding sequences take the T - N padding tokens (one each,
the last one the rest), attend over their own tokens only, and write their K/V into the scratch block
(block tables and slots point there); their outputs are dropped. The tile shape is the one of a long
query run (max_query_len = T) and the split-KV count the one the eager step plans from the host lengths
(part of the graph's key). A step with an FP8 KV cache, or more tokens or sequences than the largest bucket
runs eagerly.

LoRA (issue 12): a step with adapter rows replays a second graph family captured with the LoRA kernels
(LORASERVE_MIXED_GRAPH_LORA=0: such steps run eagerly, as before). The kernels' grids depend on T only
(kernels/lora_meta.py), so the graph reads static metadata: per-token slots [T] from the sequences'
slots [Bp] through the static query starts (padding sequences -1: their tokens add nothing), then
LoRAMetaBuilder.build (device ops only, no host sync). Both are captured into the graph (a step copies only
its [B] slots; LORASERVE_LORA_META_IN_GRAPH=0, or a failed capture: they run eagerly before each replay). Eagerly such a step cost ~80 ms
on the 8B shape (H200, 32 layers x 7 projections: host launch time), vs 6.5 ms for the base step's replay.

Graphs are captured when a shape is first seen (an eager forward, then the capture: tens of ms on the 8B
shape; a serving warm-up meets most shapes), at most MAX_GRAPHS, into their own memory pool. On by default
(H200, 32-layer 8B shape, issue 11: mixed-step host launch 11 -> 2.6 ms p50); LORASERVE_MIXED_GRAPHS=0 turns
them off (every mixed step eager).
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from .context import Context, reset_context, set_context

log = logging.getLogger(__name__)

# fine buckets: padding costs real work in a compute-bound step (at most 31 tokens and 7 sequences here)
TOKEN_BUCKETS = tuple(range(32, 1025, 32)) + (1152, 1280, 1536, 1792, 2048)
SEQ_BUCKETS = (2, 4, 8) + tuple(range(16, 1025, 8))
MAX_GRAPHS = 128   # per family (plain, LoRA)
# Capture policy (a capture stalls the step ~50-90 ms on the 8B shape; H200 probe, 16 layers: 21 captures inside
# a 3.3 s measured run cost ~1 s of it): a shape without its own graph replays the smallest larger graph already
# captured, at most COVER_SLACK more tokens (padding compute instead of a stall), until it has been seen
# CAPTURE_AFTER times; it is captured when nothing covers it, or on that sighting (frequent shapes end with
# their own graph). LORASERVE_MIXED_GRAPH_CAPTURE_AFTER=1: every new shape captured at once (no covering).
COVER_SLACK = 0.125
CAPTURE_AFTER = 64


def capture_after() -> int:
    return max(1, int(os.environ.get("LORASERVE_MIXED_GRAPH_CAPTURE_AFTER", str(CAPTURE_AFTER))))


def cover(keys, num_tokens: int, num_seqs: int, splits: int, t_exact: int,
          num_adapters: int | None = None) -> tuple | None:
    """The smallest captured (Bp, T, splits[, segments]) key that can run a step of num_tokens over num_seqs
    sequences (Bp >= B + 1 padding sequences' worth, T >= N + Bp - B: one token per padding sequence) with the
    same split count, at most max(32, T_exact * COVER_SLACK) tokens above the exact bucket T_exact, and (a LoRA
    graph with a segment bound, seg_bucket) room for the step's num_adapters distinct slots; None if none."""
    limit = t_exact + max(32, int(t_exact * COVER_SLACK))
    best = None
    for key in keys:
        bp, t, s = key[:3]
        seg_ok = len(key) == 3 or (num_adapters is not None and key[3] >= num_adapters)
        if s == splits and seg_ok and bp >= num_seqs + 1 and num_tokens + bp - num_seqs <= t <= limit and \
                (best is None or (t, bp, len(key) == 3) < (best[1], best[0], len(best) == 3)):
            best = key
    return best


# LoRA graphs keyed by a bound on the step's distinct adapters too (LORASERVE_LORA_SEG_BUCKETS): the grid is
# cdiv(T, BM) + segments tiles, and the configs that count every grid tile active (the expand's column groups,
# the shrink's split) then size for the adapters the step has, not for Bp - 1 / min(slots, bs). H200 probe
# (2026-11-30 22:02, bench_lora_resident --replay-variants, 8 layers, q+v, 32 adapters of rank 8-64, 8000
# granules; what the adapters add per layer): decode graph of 64 rows 37.2 -> 27.1 us (68 -> 36 tiles; 23.0 ->
# 18.0 at 23:13 with the lora helper's newer kernel defaults);
# mixed step (72, 352) 49.8 -> 48.7 us (93 -> 54 tiles: within the noise). Default "decode".
SEG_BUCKETS = (2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def lora_seg_buckets(family: str = "mixed") -> bool:
    """LORASERVE_LORA_SEG_BUCKETS: 1 / all (mixed-step and decode graphs), mixed, decode (the default), or 0."""
    v = os.environ.get("LORASERVE_LORA_SEG_BUCKETS", "decode").strip().lower()
    return v in ("1", "all", "true", "on", "yes") or v == family


def seg_bucket(num_adapters: int, bp: int) -> int:
    """The LoRA grid's segment bound for a step of num_adapters distinct slots in a graph of Bp sequences: the
    smallest SEG_BUCKETS entry that holds them, at most Bp - 1 (a graph's real sequences)."""
    return min(bp - 1, next((b for b in SEG_BUCKETS if b >= num_adapters), bp - 1))


def mixed_graphs_enabled() -> bool:
    return os.environ.get("LORASERVE_MIXED_GRAPHS", "1").lower() not in ("0", "false", "off", "no", "")


def lora_mixed_graphs_enabled() -> bool:
    """Mixed steps with adapter rows replay LoRA graphs (default); LORASERVE_MIXED_GRAPH_LORA=0: eager."""
    return os.environ.get("LORASERVE_MIXED_GRAPH_LORA", "1").lower() not in ("0", "false", "off", "no", "")


def lora_meta_in_graph() -> bool:
    """The LoRA metadata build is part of the captured graph (default; ~30 fewer host launches a step);
    LORASERVE_LORA_META_IN_GRAPH=0: built eagerly before each replay."""
    return os.environ.get("LORASERVE_LORA_META_IN_GRAPH", "1").lower() not in ("0", "false", "off", "no", "")


def lora_segment_bound() -> bool:
    """The LoRA grids of a graph of Bp sequences count at most Bp - 1 adapter segments (default; a step
    has B <= Bp - 1 real sequences); LORASERVE_LORA_SEG_BOUND=0: min(slots, T) as before, i.e. with
    thousands of slots (rank packing granules, bench_churn's 1000-adapter tier) a 320-token step launched
    ~340 tiles for ~50 used ones and the configs sized for all of them (expand: 2 column groups of 48
    blocks each) left the GPU mostly idle."""
    return os.environ.get("LORASERVE_LORA_SEG_BOUND", "1").lower() not in ("0", "false", "off", "no", "")


def pad_lens(num_tokens: int, num_seqs: int, bp: int, t: int) -> np.ndarray:
    """[Bp - B] query (= context) lengths of the padding sequences: 1 each, the last the rest (>= 1)."""
    lens = np.ones(bp - num_seqs, dtype=np.int32)
    lens[-1] = t - num_tokens - (bp - num_seqs - 1)
    return lens


def padded_metadata(query_lens: list[int], num_tokens: int, bp: int, t: int) -> np.ndarray:
    """int32 [Bp + 1 + Bp - B]: the padded step's query_start_loc, then the padding sequences' context
    lengths (one host->device copy)."""
    b = len(query_lens)
    lens = pad_lens(num_tokens, b, bp, t)
    host = np.empty(2 * bp + 1 - b, dtype=np.int32)
    host[0] = 0
    np.cumsum(np.asarray(query_lens, dtype=np.int32), out=host[1:b + 1])
    host[b + 1:bp + 1] = num_tokens + np.cumsum(lens)
    host[bp + 1:] = lens
    return host


class MixedGraphRunner:
    def __init__(self, model, device: torch.device, max_batch: int, max_tokens: int, max_blocks_per_seq: int,
                 scratch_block: int, block_size: int, num_heads: int, num_kv_heads: int, elem_bytes: int,
                 lora_manager=None):
        self.model, self.device = model, device
        self.seq_buckets = [b for b in SEQ_BUCKETS if b <= max_batch + 8]
        self.token_buckets = [t for t in TOKEN_BUCKETS if t <= max(max_tokens, TOKEN_BUCKETS[0])]
        T, B = self.token_buckets[-1], self.seq_buckets[-1]
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        self.num_heads, self.num_kv_heads, self.elem_bytes = num_heads, num_kv_heads, elem_bytes
        i64 = dict(dtype=torch.long, device=device)
        self.ids_positions_slots = torch.zeros(3, T, **i64)   # one copy per step (step_inputs' first three)
        self.input_ids, self.positions, self.slot_mapping = self.ids_positions_slots.unbind(0)
        self.slot_mapping.fill_(self.scratch_slot)
        self.context_lens = torch.ones(B, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(B + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((B, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (Bp, T, splits)
        # the same keys, captured with the LoRA kernels: (graph, out, its Context: keeps the LoRA workspaces alive)
        self.lora_graphs: dict[tuple[int, int, int], tuple] = {}
        self.pool = None
        self.failed = False
        self.num_replays = 0
        self.num_lora_replays = 0
        self.key_replays: dict[tuple, int] = {}   # (Bp, T, splits, LoRA) -> replays (benchmarks: which shapes ran)
        self.lora_manager = lora_manager if lora_manager is not None and lora_mixed_graphs_enabled() else None
        self.lora_failed = False
        self.use_lora = True   # False: steps with adapter rows run eagerly (benchmarks compare both in one engine)
        if self.lora_manager is not None:
            from loraserve.kernels import LoRAMetaBuilder

            # static LoRA metadata of the largest bucket; a graph of T tokens reads its [:T] views
            self.lora_builder = LoRAMetaBuilder(T, self.lora_manager.num_slots, device)
            self.seq_slot = torch.full((B,), -1, dtype=torch.long, device=device)      # [B] slot per sequence
            self.token_slot = torch.full((T,), -1, dtype=torch.long, device=device)    # [T] slot per token
            self._token_ids = torch.arange(T, dtype=torch.int32, device=device)         # [T] 0..T-1
            self.meta_in_graph = lora_meta_in_graph()
            self.segment_bound = lora_segment_bound()
            self.segment_cap: int | None = None   # a tighter bound on a step's distinct slots (benchmarks only)
            self.seg_buckets = lora_seg_buckets()
        self.capture_after = capture_after()
        self.seen: dict[tuple[int, int, int], int] = {}   # sightings of shapes not captured yet
        self.num_covered = 0                              # steps replayed in a larger graph than their own
        self.capture_s = {False: 0.0, True: 0.0}          # host seconds spent capturing, by family (LoRA or not)

    def pick(self, num_tokens: int, num_seqs: int) -> tuple[int, int] | None:
        """(Bp, T) of a step of num_tokens over num_seqs sequences, or None (eager)."""
        bp = next((b for b in self.seq_buckets if b >= num_seqs + 1), None)
        if bp is None:
            return None
        t = next((t for t in self.token_buckets if t >= num_tokens + bp - num_seqs), None)
        return None if t is None else (bp, t)

    def _build_lora_meta(self, bp: int, t: int, segments: int | None = None):
        """Device ops only (so a graph can capture them): token i gets seq_slot[its sequence] (the number of
        sequence ends <= i in the static query starts; padding sequences' slots are -1), then the builder
        refills its static buffers for T = t (same T as at capture: same grids). Returns the LoRAMeta views."""
        seq_of_token = torch.searchsorted(self.query_start_loc[1:bp + 1], self._token_ids[:t], right=True)  # [t] < bp
        torch.index_select(self.seq_slot, 0, seq_of_token, out=self.token_slot[:t])
        # at most bp - 1 distinct slots: the real sequences (the padding ones are -1)
        bound = bp - 1 if self.segment_bound else None
        if bound is not None and segments:   # a seg_bucket key: the step has at most this many distinct slots
            bound = min(bound, segments)
        if bound is not None and self.segment_cap:
            bound = min(bound, self.segment_cap)
        return self.lora_builder.build(self.token_slot[:t], max_segments=bound)

    def _lora_context(self, bp: int, t: int, segments: int | None = None):
        """The LoRA state a graph of (bp, t[, segments]) captures: the static metadata views (T = t and the
        segment bound fix the grids)."""
        from .lora.batch import LoRABatch

        return LoRABatch(self.lora_manager.slots, self._build_lora_meta(bp, t, segments))

    @torch.inference_mode()
    def _capture(self, bp: int, t: int, splits: int, lora: bool = False, segments: int | None = None) -> None:
        # the static buffers hold a valid all-padding step while capturing (its K/V go to the scratch block)
        lens = pad_lens(0, 0, bp, t)
        self.input_ids[:t].zero_()
        self.positions[:t].zero_()
        self.slot_mapping[:t].fill_(self.scratch_slot)
        self.context_lens[:bp].copy_(torch.from_numpy(lens))
        self.query_start_loc[:bp + 1].copy_(torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)))
        self.block_tables[:bp].fill_(self.scratch_block)
        ctx = Context(slot_mapping=self.slot_mapping[:t], context_lens=self.context_lens[:bp],
                      block_tables=self.block_tables[:bp], decode_only=False,
                      query_start_loc=self.query_start_loc[:bp + 1], max_query_len=t, num_splits=splits)
        in_graph = lora and self.meta_in_graph
        if lora:
            self.seq_slot[:bp].fill_(-1)   # an all-padding step: the kernels' tiles all exit
            ctx.lora = self._lora_context(bp, t, segments)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        set_context(ctx)
        try:
            with torch.cuda.stream(stream):
                self.model(self.input_ids[:t], self.positions[:t])   # warm-up: allocator, any compile
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
                if in_graph:
                    self._build_lora_meta(bp, t, segments)   # refills the same buffers ctx.lora's views read
                out = self.model(self.input_ids[:t], self.positions[:t])
        finally:
            reset_context()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if lora:
            self.lora_graphs[(bp, t, splits) if segments is None else (bp, t, splits, segments)] = \
                (graph, out, ctx, in_graph)
        else:
            self.graphs[(bp, t, splits)] = (graph, out)
        log.debug("captured a mixed-step CUDA graph: %d sequences, %d tokens, %d KV splits, LoRA %s (%d graphs)", bp,
                  t, splits, lora, self.num_graphs)

    @property
    def num_graphs(self) -> int:
        return len(self.graphs) + len(self.lora_graphs)

    @torch.inference_mode()
    def run(self, inp, query_lens: list[int]) -> torch.Tensor | None:
        """inp: step_inputs.StepInputs of a mixed step (on the device); query_lens: [B] tokens per sequence.
        Returns the hidden states [N, hidden], or None when this step runs eagerly."""
        if self.failed:
            return None
        lora = bool(getattr(inp, "has_lora", False))
        if lora and (self.lora_manager is None or self.lora_failed or not self.use_lora):
            return None
        graphs = self.lora_graphs if lora else self.graphs
        n, b = inp.input_ids.shape[0], len(query_lens)
        shape = self.pick(n, b)
        if shape is None:
            return None
        from loraserve.kernels.unified_attention import plan_num_splits

        # the step's split-KV plan, as the eager step would make it (the graph's launch is static)
        splits = plan_num_splits(query_lens, inp.context_lens_list, self.num_heads, self.num_kv_heads,
                                 self.elem_bytes, self.device)
        bp, t = shape
        num_adapters = getattr(inp, "num_adapters", None) if lora else None
        segments = seg_bucket(num_adapters, bp) if num_adapters and self.seg_buckets and self.segment_bound else None
        key = (bp, t, splits) if segments is None or segments >= bp - 1 else (bp, t, splits, segments)
        if key not in graphs:
            seen = self.seen[key + (lora,)] = self.seen.get(key + (lora,), 0) + 1
            alt = cover(graphs, n, b, splits, t, num_adapters) if seen < self.capture_after else None
            if alt is not None:             # a larger captured graph: padding instead of a capture stall
                key, bp, t = alt, alt[0], alt[1]
                self.num_covered += 1
            elif len(graphs) >= MAX_GRAPHS:   # per family: LoRA graphs never crowd out the plain ones
                return None
            else:
                try:
                    t0 = time.perf_counter()
                    try:
                        self._capture(bp, t, splits, lora, segments=key[3] if len(key) > 3 else None)
                        if len(key) > 3 and (bp, t, splits) not in graphs and seen < self.capture_after:
                            # and the shape's general graph (bound Bp - 1): it covers this shape's steps with more
                            # adapters without a capture stall (zipf load after a warm-up over a few adapters)
                            self._capture(bp, t, splits, lora)
                    finally:
                        self.capture_s[lora] += time.perf_counter() - t0
                except Exception:  # noqa: BLE001 - eager mixed steps still work
                    if lora and self.meta_in_graph:   # next time: the metadata built eagerly, outside the graph
                        log.exception("mixed-step LoRA CUDA graph capture with the metadata build inside failed; "
                                      "capturing without it from now on")
                        self.meta_in_graph = False
                    elif lora:   # the LoRA family alone goes eager; steps without adapters keep their graphs
                        log.exception("mixed-step LoRA CUDA graph capture failed; mixed steps with adapters run "
                                      "eagerly from now on")
                        self.lora_failed = True
                    else:
                        log.exception("mixed-step CUDA graph capture failed; mixed steps run eagerly from now on")
                        self.failed = True
                    return None
        small = torch.from_numpy(padded_metadata(query_lens, n, bp, t))
        if self.device.type == "cuda":   # through pinned memory: a pageable copy would wait for the device
            small = small.pin_memory().to(self.device, non_blocking=True)
        width = inp.block_tables.shape[1]
        if inp.ids_positions_slots is not None:
            self.ids_positions_slots[:, :n].copy_(inp.ids_positions_slots)
        else:
            self.input_ids[:n].copy_(inp.input_ids)
            self.positions[:n].copy_(inp.positions)
            self.slot_mapping[:n].copy_(inp.slot_mapping)
        self.ids_positions_slots[:2, n:t].zero_()       # padding tokens: id 0 at position 0
        self.slot_mapping[n:t].fill_(self.scratch_slot)
        self.context_lens[:b].copy_(inp.context_lens)
        self.context_lens[b:bp].copy_(small[bp + 1:])
        self.query_start_loc[:bp + 1].copy_(small[:bp + 1])
        self.block_tables[:b, :width].copy_(inp.block_tables)
        self.block_tables[b:bp].fill_(self.scratch_block)
        if lora:
            self.seq_slot[:b].copy_(inp.token_slot)   # [B] int64, -1: none
            self.seq_slot[b:bp].fill_(-1)             # the padding sequences
            if not graphs[key][3]:                     # captured without the metadata build: build it now
                self._build_lora_meta(bp, t, key[3] if len(key) > 3 else None)
            if self.device.type == "cuda":
                self.lora_manager.slots.wait_for_copies()   # adapters placed this step: their host->GPU copies first
        graph, out = graphs[key][:2]
        graph.replay()
        self.num_replays += 1
        self.num_lora_replays += lora
        self.key_replays[key + (lora,)] = self.key_replays.get(key + (lora,), 0) + 1
        return out[:n]
