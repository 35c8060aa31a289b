"""One steady-state mixed step of bench_churn's resident phase, replayed from the engine's own CUDA graphs.

bench_churn's resident32 load runs nearly every step as a MIXED step: ~63 decode rows (32 adapters of rank 8-64
on q_proj + v_proj, two rows each) + one 256-token prompt chunk, replayed from the mixed-step graph of (Bp 72,
T 352). The closed loop's tok/s mixes that with host work, prefill bursts and the drain; this times the step
itself: the engine's MixedGraphRunner static buffers are filled with such a step (decode contexts of `ctx`
tokens; block tables and KV writes on the scratch block, so no live sequence is touched), then the plain graph
and the LoRA graph of its key are replayed back to back (CUDA events). (LoRA - plain) / layers is what the
adapters add per layer inside the real forward (the qkv GEMM's output in L2, the attention after it), the
figure bench_lora_mixed estimates in isolation.

Variants: module-attribute switches (the kernels' configs are read at each launch), the LoRA graph of the key
recaptured under each, then put back. A "+" joins variants ("pps16+ovl"). "empty": the same LoRA graph with
no adapter row (every tile exits at once): the launches' fixed cost.
"""
from __future__ import annotations

import importlib
import os
import time

import numpy as np
import torch


def _sstream(orig):
    """lora_shrink.shrink_config: the streaming variant's config (16-row rank blocks, grid-aware split: one
    split at the mixed step's 93 tiles, so no torch.sum launch) also for 257..1024 tokens."""
    def config(num_tokens, rank, hidden_in, num_slices=1, block_m=16, num_sms=132, grid_tiles=None, stream=None):
        from loraserve.kernels.lora_meta import stream_enabled

        lora_shrink = importlib.import_module("loraserve.kernels.lora_shrink")   # the module (the package's name is the function)

        if 256 < num_tokens <= 1024 and stream_enabled(stream):
            return lora_shrink._stream_shrink_config(num_tokens, rank, hidden_in, num_slices, block_m, num_sms,
                                                     grid_tiles)
        return orig(num_tokens, rank, hidden_in, num_slices, block_m, num_sms, grid_tiles, stream)
    return config


def _split_cap(cap: int):
    """lora_shrink.shrink_config above 256 tokens with SPLIT_K at most `cap` (8 at the mixed step by default:
    1.4 MB of fp32 partials written, then summed by torch.sum)."""
    def wrap(orig):
        def config(num_tokens, rank, hidden_in, num_slices=1, block_m=16, num_sms=132, grid_tiles=None, stream=None):
            cfg = orig(num_tokens, rank, hidden_in, num_slices, block_m, num_sms, grid_tiles, stream)
            if num_tokens > 256:
                cfg = dict(cfg, SPLIT_K=min(cfg["SPLIT_K"], cap))
            return cfg
        return config
    return wrap


def _shrink_large(**over):
    """lora_shrink.shrink_config above 256 tokens with these keys overridden (BLOCK_N, BLOCK_K, num_warps,
    num_stages): the mixed step's shrink is BLOCK_N 64 x BLOCK_K 128, 4 warps, 3 stages (~60 KB of shared memory a
    program: ~3 programs an SM, so its ~950 programs run in ~2.4 waves)."""
    def wrap(orig):
        def config(num_tokens, rank, hidden_in, num_slices=1, block_m=16, num_sms=132, grid_tiles=None, stream=None):
            cfg = orig(num_tokens, rank, hidden_in, num_slices, block_m, num_sms, grid_tiles, stream)
            return dict(cfg, **over) if num_tokens > 256 else cfg
        return config
    return wrap


def _expand_large(**over):
    """lora_expand_stream.stream_expand_config above 256 tokens with these keys overridden (num_warps, B_AHEAD,
    BLOCK_N: the column groups recomputed for it as the config does)."""
    def wrap(orig):
        def config(num_tokens, n_total, rank, num_slices, block_m, grid_tiles, split_k=1, num_sms=132):
            cfg = orig(num_tokens, n_total, rank, num_slices, block_m, grid_tiles, split_k, num_sms)
            if num_tokens <= 256:
                return cfg
            cfg = dict(cfg, **over)
            if "BLOCK_N" in over:
                es = importlib.import_module(ES)
                bn = over["BLOCK_N"]
                n_blocks = -(-n_total // bn)
                groups = max(1, min(n_blocks, round(es.STREAM_PROGRAMS_PER_SM_LARGE * num_sms / max(1, grid_tiles))))
                per = -(-n_blocks // groups)
                cfg.update(COLS_PER_PROG=per * bn, groups=-(-n_blocks // per))
            return cfg
        return config
    return wrap


ES = "loraserve.kernels.lora_expand_stream"
SH = "loraserve.kernels.lora_shrink"
VARIANTS = {   # name -> {(module, attribute): value, or a wrapper of the attribute's function}
    "default": {},
    "pps4": {(ES, "STREAM_PROGRAMS_PER_SM_LARGE"): 4},   # fewer column groups: fewer re-reads of the partials
    "pps6": {(ES, "STREAM_PROGRAMS_PER_SM_LARGE"): 6},
    "pps12": {(ES, "STREAM_PROGRAMS_PER_SM_LARGE"): 12},
    "pps16": {(ES, "STREAM_PROGRAMS_PER_SM_LARGE"): 16},
    "pps24": {(ES, "STREAM_PROGRAMS_PER_SM_LARGE"): 24},
    "pps32": {(ES, "STREAM_PROGRAMS_PER_SM_LARGE"): 32},
    "ba3": {(ES, "STREAM_B_AHEAD"): 3},                    # 3 B blocks in flight per expand program (2 at rank 64)
    "pipe": {(ES, "STREAM_SLOTS_MAX_TOKENS"): 4096},       # the expand's Triton-pipelined column loop at every T
    "sk4": {("loraserve.kernels.lora_shrink", "shrink_config"): _split_cap(4)},
    "sk1": {("loraserve.kernels.lora_shrink", "shrink_config"): _split_cap(1)},   # no partials, no torch.sum
    # the mixed step's shrink / expand launch configs (above 256 tokens only)
    "ss2": {(SH, "shrink_config"): _shrink_large(num_stages=2)},
    "ss4": {(SH, "shrink_config"): _shrink_large(num_stages=4)},
    "sbk64": {(SH, "shrink_config"): _shrink_large(BLOCK_K=64)},
    "sbk256": {(SH, "shrink_config"): _shrink_large(BLOCK_K=256, num_stages=2)},
    "sbn32": {(SH, "shrink_config"): _shrink_large(BLOCK_N=32)},
    "sw8": {(SH, "shrink_config"): _shrink_large(num_warps=8)},
    "ew8": {(ES, "stream_expand_config"): _expand_large(num_warps=8)},
    "ebn32": {(ES, "stream_expand_config"): _expand_large(BLOCK_N=32)},
    "eba3": {(ES, "stream_expand_config"): _expand_large(B_AHEAD=3)},
    # the "partials" path above 256 tokens (lora_apply.partials_max_tokens): the streaming expand sums the shrink's
    # split-K partials, no torch.sum launch between them; with sk<N> the split capped at N
    "fold": {("env-lora", "LORASERVE_LORA_PARTIALS_MAX_TOKENS"): "1024"},
    # the mixed step as before 2026-12-01: "reduced" (shrink split by the rule, torch.sum, expand)
    "nofold": {("env-lora", "LORASERVE_LORA_PARTIALS_MAX_TOKENS"): "256"},
    "sl4": {("env-lora", "LORASERVE_LORA_SHRINK_SPLIT_LARGE"): "4"},   # the partials path's split cap (default 2)
    "sl8": {("env-lora", "LORASERVE_LORA_SHRINK_SPLIT_LARGE"): "8"},
    # PDL off for EVERY kernel (the model's and LoRA's), the plain graph recaptured too: no kernel launches early,
    # so a profiled kernel's span is its own work, not its wait for the one before (the attribution question)
    "pdloff": {("env", "LORASERVE_PDL"): "0", ("loraserve.kernels.lora_meta", "LORA_PDL"): False},
    "sk2": {("loraserve.kernels.lora_shrink", "shrink_config"): _split_cap(2)},
    "ovl": {("loraserve.inference.lora.batch", "OVERLAP_LARGE"): "shrink"},   # LORASERVE_LORA_OVERLAP_LARGE=shrink
    "ovlfull": {("loraserve.inference.lora.batch", "OVERLAP_LARGE"): "full"},   # shrink + expand into a delta beside
    "sstream": {("loraserve.kernels.lora_shrink", "shrink_config"): _sstream},
    "nopdl": {("loraserve.kernels.lora_meta", "LORA_PDL"): False},          # no programmatic dependent launch
    "pdls256": {("loraserve.kernels.lora_meta", "LORA_PDL_SHRINK_MAX_TOKENS"): 256},   # the switch for nopdl_s
    "nopdl_s": {("loraserve.kernels.lora_shrink", "pdl_launch"): lambda orig: (lambda device: {})},   # shrink only
    "nopdl_e": {(ES, "pdl_launch"): lambda orig: (lambda device: {})},                                # expand only
    "pf": {("loraserve.kernels.lora_meta", "LORA_PREFETCH"): "abt"},   # the lora helper's L2 prefetch (if present)
    # the expand without its early trigger ("t" of LORA_PREFETCH): the kernels after it (rope, attention, launched
    # with PDL) no longer launch while it runs, so their profiled spans stop including their wait for it
    "notrig": {("loraserve.kernels.lora_meta", "LORA_PREFETCH"): "a"},
    # the expand's grid (groups, tiles): programs launched together walk one adapter's B (lora helper's opt-in)
    "gmajor": {("loraserve.kernels.lora_meta", "LORA_GROUP_MAJOR"): True},
    # the DoRA epilogue for every slot (before the lora helper's per-slot flags, 3bb181c)
    "noflags": {("loraserve.inference.lora.batch", "DORA_FLAGS"): False},
    "bm32": {},     # the mixed runner's LoRA metadata builder at 32-row tiles (below)
    "empty": {},    # no adapter row in the step (below)
    # the defaults before this session's resident changes (kernels/PERF_NOTES.md, resident, third pass)
    "old": {(ES, "STREAM_PROGRAMS_PER_SM_LARGE"): 8, ("loraserve.inference.lora.batch", "OVERLAP_LARGE"): ""},
    "seg32": {},    # the grid's segment bound at 32 distinct adapters (the step's), not Bp - 1 = 71 (below)
}


class patched:
    """Apply a variant's attribute switches (all "+"-joined parts), undone on exit."""

    def __init__(self, variant: str, mixed, decode=None):
        self.parts, self.mixed, self.decode = variant.split("+"), mixed, decode
        for p in self.parts:
            if p not in VARIANTS and not (p.startswith("seg") and p[3:].isdigit()):
                raise ValueError(f"unknown variant {p!r}; known: {sorted(VARIANTS)}")
        self.undo: list = []

    def __enter__(self):
        for p in self.parts:
            for (mod_name, attr), val in VARIANTS[p].items():
                if mod_name in ("env", "env-lora"):   # an environment switch read at each launch
                    self.undo.append((os.environ, attr, os.environ.get(attr)))
                    os.environ[attr] = val
                    continue
                mod = importlib.import_module(mod_name)
                if not hasattr(mod, attr):
                    raise AttributeError(f"{mod_name}.{attr} does not exist in this tree")
                orig = getattr(mod, attr)
                self.undo.append((mod, attr, orig))
                setattr(mod, attr, val(orig) if callable(val) and callable(orig) else val)
        for p in self.parts:
            if p.startswith("seg"):   # the LoRA grid bounded by the step's distinct adapters, not Bp - 1
                self.undo.append((self.mixed, "segment_cap", self.mixed.segment_cap))
                self.mixed.segment_cap = int(p[3:])
        if "old" in self.parts:   # no segment buckets in either graph family
            self.undo.append((self.mixed, "seg_buckets", self.mixed.seg_buckets))
            self.mixed.seg_buckets = False
            if self.decode is not None and self.decode.lora_builder is not None:
                self.undo.append((self.decode, "seg_buckets", self.decode.seg_buckets))
                self.decode.seg_buckets = False
        if "bm32" in self.parts:
            self.undo.append((self.mixed.lora_builder, "block_m", self.mixed.lora_builder.block_m))
            self.mixed.lora_builder.block_m = 32
        return self

    def __exit__(self, *exc):
        for obj, attr, orig in reversed(self.undo):
            if obj is os.environ:
                if orig is None:
                    os.environ.pop(attr, None)
                else:
                    os.environ[attr] = orig
            else:
                setattr(obj, attr, orig)
        return False


def fill_step(mixed, seq_slots: list[int], prompt: int, ctx: int, seed: int = 0) -> tuple[int, int, int]:
    """The runner's static buffers <- one mixed step: len(seq_slots) - 1 decode rows (context ctx) and one
    prompt chunk of `prompt` tokens (the last sequence); seq_slots [B]: each sequence's LoRA slot (-1: none).
    KV writes and block tables on the scratch block. Returns the graph key (Bp, T, splits)."""
    from loraserve.inference.mixed_graphs import padded_metadata
    from loraserve.kernels.unified_attention import plan_num_splits

    b = len(seq_slots)
    query_lens = [1] * (b - 1) + [prompt]
    context_lens = [ctx] * (b - 1) + [prompt]
    n = sum(query_lens)
    bp, t = mixed.pick(n, b)
    splits = plan_num_splits(query_lens, context_lens, mixed.num_heads, mixed.num_kv_heads, mixed.elem_bytes,
                             mixed.device)
    g = torch.Generator(device=mixed.device).manual_seed(seed)
    small = torch.from_numpy(padded_metadata(query_lens, n, bp, t)).to(mixed.device)
    mixed.input_ids[:t].copy_(torch.randint(2, 30000, (t,), generator=g, device=mixed.device))
    pos = np.concatenate([np.full(b - 1, ctx - 1), np.arange(prompt), np.zeros(t - n)]).astype(np.int64)
    mixed.positions[:t].copy_(torch.from_numpy(pos))
    mixed.slot_mapping[:t].fill_(mixed.scratch_slot)
    mixed.context_lens[:b].copy_(torch.tensor(context_lens, dtype=torch.int32))
    mixed.context_lens[b:bp].copy_(small[bp + 1:])
    mixed.query_start_loc[:bp + 1].copy_(small[:bp + 1])
    mixed.block_tables[:bp].fill_(mixed.scratch_block)
    if mixed.lora_manager is not None:
        mixed.seq_slot[:b].copy_(torch.tensor(seq_slots, dtype=torch.long))
        mixed.seq_slot[b:bp].fill_(-1)
    return bp, t, splits


def _time(graph, reps: int) -> float:
    """us per replay (after 3 untimed)."""
    for _ in range(3):
        graph.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    e0.record()
    for _ in range(reps):
        graph.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / reps


def profile_replays(lora_graph, plain_graph, reps: int = 5, rows: int = 10) -> dict:
    """Kernels of `reps` replays of each graph under torch.profiler: device us per step by kernel name, the LoRA
    graph minus the plain one (under PDL a kernel's span includes its early launch's wait for the one before)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    res = {}
    for tag, graph in (("lora", lora_graph), ("plain", plain_graph)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                graph.replay()
            torch.cuda.synchronize()
        res[tag] = {e.key: e.self_device_time_total / reps for e in prof.key_averages()
                    if e.device_type == DeviceType.CUDA}
    diff = {k: res["lora"].get(k, 0.0) - res["plain"].get(k, 0.0) for k in {*res["lora"], *res["plain"]}}
    print(f"    profile (us per step): LoRA graph {sum(res['lora'].values()):.0f}, plain {sum(res['plain'].values()):.0f}; "
          "largest differences:")
    for k, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:rows]:
        print(f"      {d:+9.1f}  {k[:90]}")
    return {k: d for k, d in diff.items() if abs(d) > 0.5}


def whole_model(variant: str) -> bool:
    """The variant switches kernels of the plain graph too (an "env" switch such as pdloff's; "env-lora" ones are
    read by the LoRA kernels only): the plain graph is then recaptured under it as well."""
    return any(mod == "env" for p in variant.split("+") for mod, _ in VARIANTS.get(p, {}))


def replay_variants(engine, seq_slots: list[int], variants: list[str], prompt: int = 256, ctx: int = 320,
                    reps: int = 20, rounds: int = 3, profile: bool | list = True, budget_s: float = 1e9) -> dict:
    """Per variant: us per replay of the LoRA graph of this step (recaptured under the variant) and of the plain
    graph beside it (alternating, `rounds` times, minimum kept; the plain graph recaptured too where the variant
    switches the model's own kernels); returns {variant: {...}} and prints a table. profile: True profiles the
    first variant's two graphs (kernel differences), a list those variants."""
    mixed = engine.runner.mixed_graphs
    if mixed is None or mixed.lora_manager is None or engine.device.type != "cuda":
        print("  step replay: needs CUDA and the mixed-step LoRA graphs")
        return {}
    layers = engine.args.num_hidden_layers
    key = fill_step(mixed, seq_slots, prompt, ctx)
    if key not in mixed.graphs:
        mixed._capture(*key, lora=False)
    default_lora = mixed.lora_graphs.pop(key, None)
    out = {}
    print(f"  step replay: {len(seq_slots) - 1} decode rows (context {ctx}) + a {prompt}-token chunk, graph "
          f"(Bp, T, splits) = {key}, {layers} layers; us per step, LoRA - plain per layer:")
    t0 = time.perf_counter()
    for variant in variants:
        if time.perf_counter() - t0 > budget_s:
            print(f"    (budget {budget_s:.0f} s spent: {variant} and later skipped)", flush=True)
            break
        try:
            with patched(variant, mixed):   # (the builder's settings too, for a build outside the graph)
                mixed.lora_graphs.pop(key, None)
                mixed._capture(*key, lora=True)
                entry = mixed.lora_graphs.pop(key)
                plain_graph = mixed.graphs[key][0]
                if whole_model(variant):   # the plain graph under the same switches (the default one put back)
                    keep = mixed.graphs.pop(key)
                    try:
                        mixed._capture(*key, lora=False)
                        plain_graph = mixed.graphs.pop(key)[0]
                    finally:
                        mixed.graphs[key] = keep
                slots = [-1] * len(seq_slots) if "empty" in variant.split("+") else seq_slots
                fill_step(mixed, slots, prompt, ctx)
                if not entry[3]:   # captured without the metadata build: build it once (the step is static)
                    mixed._build_lora_meta(key[0], key[1])
                plain_us, lora_us = [], []
                for r in range(rounds):   # alternating order (plain first in even rounds): drift cancels in the pairs
                    if r % 2 == 0:
                        plain_us.append(_time(plain_graph, reps))
                        lora_us.append(_time(entry[0], reps))
                    else:
                        lora_us.append(_time(entry[0], reps))
                        plain_us.append(_time(plain_graph, reps))
            p, q = min(plain_us), min(lora_us)
            # the median of the rounds' own differences: a clock drift between rounds cancels within each pair
            paired = float(np.median([b - a for a, b in zip(plain_us, lora_us)])) / layers
            out[variant] = dict(plain_us=p, lora_us=q, lora_per_layer_us=(q - p) / layers, ratio=p / q,
                                paired_per_layer_us=paired, rounds_plain_us=plain_us, rounds_lora_us=lora_us)
            if (variant in profile) if isinstance(profile, (list, tuple, set)) else (profile and variant == variants[0]):
                try:
                    print(f"    [{variant}]", end="")
                    out[variant]["kernels"] = profile_replays(entry[0], plain_graph, reps=5)
                except Exception as exc:  # noqa: BLE001 - the timing stands without the breakdown
                    print(f"    profile FAILED: {exc!r}"[:200])
            print(f"    {variant:>16}: plain {p:8.1f}  LoRA {q:8.1f}  +{(q - p) / layers:6.1f} us/layer  "
                  f"(plain / LoRA {p / q:.3f}; paired rounds +{paired:5.1f})", flush=True)
            del entry, plain_graph
        except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or capture is reported, not fatal
            out[variant] = dict(error=repr(exc)[:300])
            print(f"    {variant:>16}: FAILED {exc!r}"[:300], flush=True)
    if default_lora is not None:
        mixed.lora_graphs[key] = default_lora
    else:
        mixed.lora_graphs.pop(key, None)
    return out


def apply_variant(engine, variant: str):
    """Switch the engine to `variant` for what follows (LoRA graphs dropped: recaptured under it); returns the
    patch context to exit later (None for "default"). A seg<N> part means mixed_graphs' segment buckets here
    (LORASERVE_LORA_SEG_BUCKETS: each step's bound from its own adapters), not a fixed cap."""
    mixed = engine.runner.mixed_graphs
    if variant == "default" or mixed is None:
        return None
    ctx = patched(variant, mixed, engine.runner.graph_runner)
    ctx.__enter__()
    if any(p.startswith("seg") for p in variant.split("+")):   # in a loop: the keyed buckets (production path)
        ctx.undo.append((mixed, "seg_buckets", mixed.seg_buckets))
        mixed.segment_cap, mixed.seg_buckets = None, True
        decode = engine.runner.graph_runner
        if decode is not None and decode.lora_builder is not None:   # the decode graphs' (bucket, segments) too
            ctx.undo.append((decode, "seg_buckets", decode.seg_buckets))
            decode.seg_buckets = True
    mixed.lora_graphs.clear()
    return ctx


def _recapture_decode(runner, bs: int, segments: int | None):
    """CudaGraphRunner.capture's LoRA graph of bucket bs again, its grid bounded by `segments` distinct slots
    (None: as captured, min(slots, bs)); returns (graph, out). The runner's own graph stays."""
    from loraserve.inference.context import reset_context, set_context
    from loraserve.inference.lora.batch import LoRABatch

    ctx = runner._context(bs, False)
    ctx.lora = LoRABatch(runner.lora_manager.slots, runner.lora_builder.build(runner.token_slot[:bs],
                                                                              max_segments=segments))
    stream = torch.cuda.Stream(runner.device)
    stream.wait_stream(torch.cuda.current_stream(runner.device))
    set_context(ctx)
    try:
        with torch.inference_mode():
            with torch.cuda.stream(stream):
                runner.model(runner.input_ids[:bs], runner.positions[:bs])
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                runner.lora_builder.build(runner.token_slot[:bs], max_segments=segments)
                out = runner.model(runner.input_ids[:bs], runner.positions[:bs])
    finally:
        reset_context()
    torch.cuda.current_stream(runner.device).wait_stream(stream)
    return graph, out


def replay_decode(engine, seq_slots: list[int], ctx: int = 320, reps: int = 20, segments: tuple = (32,)) -> dict:
    """The decode graphs (cuda_graphs.CudaGraphRunner) of len(seq_slots) rows, with and without the LoRA kernels:
    us per replay (contexts of ctx tokens on the scratch block); then the LoRA graph recaptured with its grid
    bounded by each of `segments` distinct adapters (not min(slots, rows)). The drain at the end of a closed loop
    runs such steps."""
    runner = engine.runner.graph_runner
    n = len(seq_slots)
    if runner is None or runner.lora_builder is None or engine.device.type != "cuda" or not runner.graphs:
        return {}
    bs = next((b for b in runner.buckets if b >= n), None)
    if bs is None or (bs, True) not in runner.graphs:
        return {}
    runner.input_ids[:bs].zero_()
    runner.positions[:n].fill_(ctx - 1)
    runner.slot_mapping[:bs].fill_(runner.scratch_slot)
    runner.context_lens[:n].fill_(ctx)
    runner.context_lens[n:bs].fill_(1)
    runner.block_tables[:bs].fill_(runner.scratch_block)
    runner._real_rows, runner._last_run = bs, (-1, 0, 0)   # the next real step rewrites every row it uses
    runner.token_slot[:n].copy_(torch.tensor(seq_slots, dtype=torch.int32))
    runner.token_slot[n:bs].fill_(-1)
    if not runner.lora_meta_in_graph:
        runner.lora_builder.build(runner.token_slot[:bs])
    plain, lora = [], []
    for _ in range(2):
        plain.append(_time(runner.graphs[(bs, False)][0], reps))
        lora.append(_time(runner.graphs[(bs, True)][0], reps))
    p, q = min(plain), min(lora)
    layers = engine.args.num_hidden_layers
    print(f"  decode graph ({n} rows, bucket {bs}, context {ctx}): plain {p:.1f} us, LoRA {q:.1f} us, "
          f"+{(q - p) / layers:.1f} us/layer (plain / LoRA {p / q:.3f})", flush=True)
    res = dict(rows=n, plain_us=p, lora_us=q, lora_per_layer_us=(q - p) / layers, ratio=p / q)
    for seg in segments:
        try:
            graph, _ = _recapture_decode(runner, bs, seg)
            q2 = min(_time(graph, reps) for _ in range(2))
            res[f"seg{seg}_lora_us"] = q2
            print(f"    LoRA grid bounded by {seg} adapters: {q2:.1f} us, +{(q2 - p) / layers:.1f} us/layer "
                  f"(plain / LoRA {p / q2:.3f})", flush=True)
            del graph
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            print(f"    decode seg{seg}: FAILED {exc!r}"[:300], flush=True)
    return res
