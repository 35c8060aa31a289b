"""Engine decode with LoRA vs without, per LoRA kernel variant (issue 10: lora32_vs_nolora_decode).

Batch 64, 32 distinct rank-16 adapters on all seven projections, Llama-3-8B-shaped layers with random
bf16 weights (bench_engine.build_checkpoint, --layers of them: the ratio is per layer, so a few layers
give the same figure as 32 in seconds). For each variant one engine is built with the variant's
switches set (its CUDA graphs capture them), then decode with LoRA and without is timed on fresh
prompts (bench_engine.run_decode; the prefix cache cannot hit). Variants:
  default      the switches as the environment and the code's defaults set them (PDL on, 3 B blocks ahead)
  stream       the default before 2026-11-30's probe: PDL off, 2 B blocks ahead
  overlap      default + LORASERVE_LORA_OVERLAP=shrink: the shrink on a side stream during the base GEMM;
               seq: default with the overlap off (GEMM, then the LoRA kernels); overlap_carve16/32, seq_carve16:
               with torch's cuBLASLt SM carveout (GEMMs leave 16 / 32 SMs free), for the LoRA and no-LoRA steps alike
  overlap_full default + LORASERVE_LORA_OVERLAP=full: shrink + expand into a delta on the side stream,
               one add after the GEMM (kernels/lora_add.py); overlap_full_nopdl: without PDL
  prev         the default of 2026-11-30 12:20: dot shrink (BGMV off), the hand-rotated expand loop
  bgmv         default with the BGMV shrink on (LORASERVE_LORA_BGMV=1); nopipe: default with the
               hand-rotated expand loop (LORASERVE_LORA_STREAM_SLOTS=0)
  dense        default + LORASERVE_LORA_DENSE=triton (the dense shrink, kernels/lora_shrink_dense.py);
               dense_mm: =mm (one cuBLAS GEMM); dense_full: dense + LORASERVE_LORA_OVERLAP=full; xdense:
               LORASERVE_LORA_DENSE_EXPAND=1 (the dense expand on gate_up); dense_xdense(_full): both (+ overlap)
  pf_at        LORASERVE_LORA_PREFETCH=at (kernels/lora_prefetch.py: the BGMV shrink's A loaded before its
               griddepcontrol.wait, the expand's early trigger); pf_t: =t; nopf: all of it off; b64 / pf_at_b64:
               with the BGMV shrink up to 64 tokens (LORASERVE_LORA_BGMV_MAX_TOKENS=64); overlap_pf_at_b64 /
               overlap_nopf: with LORASERVE_LORA_OVERLAP=shrink too
  prev10       the defaults at the tenth session's start (10af1f8)
  meta_eager   default with the LoRA metadata built before each graph replay (LORASERVE_LORA_META_IN_GRAPH=0,
               the path before 2026-11-30 16:20) instead of inside the decode graph
Prints, per variant: ms per step with and without LoRA, LoRA us per layer, lora32_vs_nolora_decode.

    python3 benchmarks/bench_lora_decode.py [--layers 4] [--variants default,overlap_full,stream] [--steps 32]
        [--prompt-len 512] [--buckets 64]
    python3 benchmarks/bench_lora_decode.py --tiny     # CPU logic check on a tiny random Llama
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

VARIANTS = {"default": {}, "stream": dict(pdl=False, b_ahead=2), "overlap": dict(overlap="shrink"), "seq": dict(overlap=""),
            "overlap_full": dict(overlap="full"), "overlap_full_nopdl": dict(overlap="full", pdl=False),
            "prev": dict(bgmv=False, y_ahead=1, slots=0), "bgmv": dict(bgmv=True),
            "nopipe": dict(slots=0), "meta_eager": dict(meta_in_graph=False),
            "dense": dict(dense="triton"), "dense_mm": dict(dense="mm"),
            "dense_full": dict(dense="triton", overlap="full"), "xdense": dict(dense_expand=True),
            "dense_xdense": dict(dense="triton", dense_expand=True),
            "dense_xdense_full": dict(dense="triton", dense_expand=True, overlap="full"),
            "overlap_carve16": dict(overlap="shrink", carveout=16), "overlap_carve32": dict(overlap="shrink", carveout=32),
            "seq_carve16": dict(overlap="", carveout=16),
            "nopf": dict(prefetch=""), "pf_at": dict(prefetch="at"), "pf_at_b64": dict(prefetch="at", bgmv_max_tokens=64),
            "b64": dict(prefetch="", bgmv_max_tokens=64), "pf_t": dict(prefetch="t"),
            "overlap_pf_at_b64": dict(overlap="shrink", prefetch="at", bgmv_max_tokens=64),
            "overlap_nopf": dict(overlap="shrink", prefetch=""),
            "xbgmv": dict(expand_bgmv=True, xb_max_slices=3),   # the BGMV expand on every projection (default: 1 slice)
            "noxbgmv": dict(expand_bgmv=False), "nopipegu": dict(pipe_min_blocks=0),
            "gkmajor": dict(group_major=True, k_major=True),   # lora_meta.LORA_GROUP_MAJOR / LORA_SHRINK_K_MAJOR
            "noflag": dict(dora_flags=False),   # the DoRA epilogue on every slot (before the per-slot flags)
            "prev9": dict(dora_flags=False, expand_bgmv=False, pipe_min_blocks=0),  # the defaults at 262c58e
            "before": dict(prefetch="", bgmv_max_tokens=32, overlap="", bgmv_wide_block_k=0),  # the defaults before this session (b1789bc)
            # the defaults at the tenth session's start (10af1f8)
            "prev10": dict(stream_one=False, kchunks=1, kchunks_wide=1, maxnreg_wide=0,
                           stream_pps=4, stream_pps_decode=4, stream_one_max_tokens=0, dgrid_any=False,
                           wave_chunks=(1, 1)),
            "pps4": dict(stream_pps_decode=4),   # the default with the decode steps' expand grid as before
            # the defaults at the eleventh session's start (98872c8), its knobs pinned
            "prev11": dict(dgrid_any=False, bgmv_rows=4, kchunks=1, kchunks_wide=1, maxnreg_wide=0, wave_chunks=(1, 1)),
            "dgrid_all": dict(dgrid_any=True),
            # the BGMV shrink's A in chunks (lora_shrink_bgmv.BGMV_KCHUNKS*), + the streaming expand's one dot a block
            "kc4": dict(kchunks=4, kchunks_wide=8, maxnreg_wide=128),
            "kc4_one": dict(kchunks=4, kchunks_wide=8, maxnreg_wide=128, stream_one=True)}
_CARVED = [False]


def set_variant(v: dict, defaults: dict) -> None:
    from loraserve.inference.lora import batch
    import importlib

    from loraserve.kernels import lora_expand_stream, lora_meta

    importlib.import_module("loraserve.kernels.lora_apply").DENSE_MODE = v.get("dense", defaults["dense"])
    importlib.import_module("loraserve.kernels.lora_apply").DENSE_EXPAND = v.get("dense_expand", defaults["dense_expand"])
    batch.OVERLAP = v.get("overlap", defaults["overlap"])
    if v.get("carveout") or _CARVED[0]:  # GEMMs leave SMs free for the side-stream LoRA kernels (lora_layer_overlap)
        from benchmarks.lora_layer_overlap import set_carveout

        print(f"  {set_carveout(v.get('carveout'))}", flush=True)
        _CARVED[0] = bool(v.get("carveout"))
    lora_meta.LORA_PDL = v.get("pdl", defaults["pdl"])
    lora_expand_stream.STREAM_B_AHEAD = v.get("b_ahead", defaults["b_ahead"])
    lora_expand_stream.STREAM_Y_AHEAD = v.get("y_ahead", defaults["y_ahead"])
    lora_meta.LORA_BGMV = v.get("bgmv", defaults["bgmv"])
    lora_meta.LORA_PREFETCH = v.get("prefetch", defaults["prefetch"])
    lora_meta.LORA_BGMV_MAX_TOKENS = v.get("bgmv_max_tokens", defaults["bgmv_max_tokens"])
    from loraserve.kernels import lora_shrink_bgmv

    lora_shrink_bgmv.BGMV_WIDE_BLOCK_K = v.get("bgmv_wide_block_k", defaults["bgmv_wide_block_k"])
    lora_expand_stream.STREAM_SLOTS = v.get("slots", defaults["slots"])
    importlib.import_module("loraserve.kernels.lora_expand").EXPAND_BGMV = v.get("expand_bgmv", defaults["expand_bgmv"])
    importlib.import_module("loraserve.kernels.lora_expand").EXPAND_BGMV_MAX_SLICES = v.get(
        "xb_max_slices", defaults["xb_max_slices"])
    lora_expand_stream.STREAM_PIPE_MIN_BLOCKS = v.get("pipe_min_blocks", defaults["pipe_min_blocks"])
    batch.DORA_FLAGS = v.get("dora_flags", defaults["dora_flags"])
    lora_meta.LORA_GROUP_MAJOR = v.get("group_major", defaults["group_major"])
    lora_meta.LORA_SHRINK_K_MAJOR = v.get("k_major", defaults["k_major"])
    lora_expand_stream.STREAM_ONE_SLICE = v.get("stream_one", defaults["stream_one"])
    lora_expand_stream.STREAM_ONE_SLICE_MAX_TOKENS = v.get("stream_one_max_tokens", defaults["stream_one_max_tokens"])
    lora_expand_stream.STREAM_PROGRAMS_PER_SM = v.get("stream_pps", defaults["stream_pps"])
    lora_expand_stream.STREAM_PROGRAMS_PER_SM_DECODE = v.get("stream_pps_decode", defaults["stream_pps_decode"])
    lora_shrink_bgmv.BGMV_KCHUNKS = v.get("kchunks", defaults["kchunks"])
    lora_shrink_bgmv.BGMV_KCHUNKS_WIDE = v.get("kchunks_wide", defaults["kchunks_wide"])
    lora_shrink_bgmv.BGMV_MAXNREG_WIDE = v.get("maxnreg_wide", defaults["maxnreg_wide"])
    lora_expand_stream.STREAM_PPS_DECODE_ANY = v.get("dgrid_any", defaults["dgrid_any"])
    lora_shrink_bgmv.BGMV_ROWS = v.get("bgmv_rows", defaults["bgmv_rows"])
    lora_shrink_bgmv.BGMV_WAVE_CHUNKS = v.get("wave_chunks", defaults["wave_chunks"])
    # read when an engine's graph runners are built (cuda_graphs / mixed_graphs)
    os.environ["LORASERVE_LORA_META_IN_GRAPH"] = "1" if v.get("meta_in_graph", defaults["meta_in_graph"]) else "0"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--variants", default="default,overlap_full")
    ap.add_argument("--buckets", default=None, help="decode CUDA-graph batch sizes, e.g. 64 (default: the engine's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--checkpoint", default=None, help="a directory: reuse the checkpoint there if it has one "
                    "(same --layers), else build it there (one build for several processes)")
    a = ap.parse_args()
    from benchmarks.bench_engine import Prompts, random_adapters, time_engine_decode
    from loraserve import LoraConfig, LoRARequest
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine
    from loraserve.inference.lora import batch
    from loraserve.kernels import lora_meta

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    from loraserve.kernels import lora_expand_stream

    import importlib

    apply_mod = importlib.import_module("loraserve.kernels.lora_apply")
    defaults = dict(dense=apply_mod.DENSE_MODE, dense_expand=apply_mod.DENSE_EXPAND, overlap=batch.OVERLAP, pdl=lora_meta.LORA_PDL, b_ahead=lora_expand_stream.STREAM_B_AHEAD,
                    y_ahead=lora_expand_stream.STREAM_Y_AHEAD, bgmv=lora_meta.LORA_BGMV,
                    slots=lora_expand_stream.STREAM_SLOTS, prefetch=lora_meta.LORA_PREFETCH,
                    bgmv_max_tokens=lora_meta.LORA_BGMV_MAX_TOKENS,
                    bgmv_wide_block_k=importlib.import_module("loraserve.kernels.lora_shrink_bgmv").BGMV_WIDE_BLOCK_K,
                    meta_in_graph=os.environ.get("LORASERVE_LORA_META_IN_GRAPH", "1") not in ("0", "false", "off", "no"),
                    expand_bgmv=importlib.import_module("loraserve.kernels.lora_expand").EXPAND_BGMV,
                    xb_max_slices=importlib.import_module("loraserve.kernels.lora_expand").EXPAND_BGMV_MAX_SLICES,
                    pipe_min_blocks=lora_expand_stream.STREAM_PIPE_MIN_BLOCKS, dora_flags=batch.DORA_FLAGS,
                    group_major=lora_meta.LORA_GROUP_MAJOR, k_major=lora_meta.LORA_SHRINK_K_MAJOR,
                    stream_one=lora_expand_stream.STREAM_ONE_SLICE, stream_pps=lora_expand_stream.STREAM_PROGRAMS_PER_SM,
                    stream_pps_decode=lora_expand_stream.STREAM_PROGRAMS_PER_SM_DECODE,
                    stream_one_max_tokens=lora_expand_stream.STREAM_ONE_SLICE_MAX_TOKENS,
                    kchunks=importlib.import_module("loraserve.kernels.lora_shrink_bgmv").BGMV_KCHUNKS,
                    kchunks_wide=importlib.import_module("loraserve.kernels.lora_shrink_bgmv").BGMV_KCHUNKS_WIDE,
                    maxnreg_wide=importlib.import_module("loraserve.kernels.lora_shrink_bgmv").BGMV_MAXNREG_WIDE)
    sb = importlib.import_module("loraserve.kernels.lora_shrink_bgmv")
    defaults.update(dgrid_any=lora_expand_stream.STREAM_PPS_DECODE_ANY, bgmv_rows=sb.BGMV_ROWS,
                    wave_chunks=sb.BGMV_WAVE_CHUNKS)
    if a.buckets:  # fewer decode graphs to capture (and LoRA kernel configs to compile): the timed batch
        from loraserve.inference import cuda_graphs

        cuda_graphs.BUCKETS = tuple(int(b) for b in a.buckets.split(","))
    path = a.checkpoint or tempfile.mkdtemp(prefix="lora-decode-")
    t0 = time.perf_counter()
    if a.tiny:
        from tests.inference.conftest import make_random_model

        make_random_model(path, "llama")
        a.batch, a.adapters, a.rank, a.prompt_len, a.steps = min(a.batch, 8), min(a.adapters, 4), 8, 16, 4
        kw = dict(dtype="float32", device="cpu")
        dtype, dev = torch.float32, "cpu"
    else:
        from benchmarks.bench_engine import build_checkpoint

        done = os.path.join(path, f".built_{a.layers}_layers")   # written last: a killed build is redone
        if not os.path.exists(done):
            os.makedirs(path, exist_ok=True)
            build_checkpoint(path, a.layers)
            open(done, "w").close()
        kw = dict(dtype="bfloat16", device="cuda", max_num_tokens=8192, max_batch_size=a.batch,
                  kv_cache_config={"free_gpu_memory_fraction": 0.5})
        dtype, dev = torch.bfloat16, "cuda"
    print(f"checkpoint ({a.layers if not a.tiny else 'tiny'} layers) in {time.perf_counter() - t0:.0f} s", flush=True)
    prompts = Prompts()
    if a.tiny:  # the tiny model's vocabulary is small
        prompts.make = lambda n, length: torch.randint(2, 300, (n, length), generator=prompts.g).tolist()
    res: dict = {"layers": a.layers, "batch": a.batch, "adapters": a.adapters, "rank": a.rank}
    for v in variants:
        set_variant(VARIANTS[v], defaults)
        t = time.perf_counter()
        lora_cfg = LoraConfig(max_lora_rank=a.rank, max_loras=a.adapters, max_cpu_loras=a.adapters)
        engine = LLMEngine(engine_config_from_kwargs(path, lora_config=lora_cfg, **kw))
        lm = engine.lora_manager
        reqs = []
        for i, ad in enumerate(random_adapters(engine.args, a.adapters, a.rank, dtype, device=dev)):
            req = LoRARequest(f"bench-{i}", i + 1, "")
            lm.release(lm.add_adapter(ad, req))
            reqs.append(req)
        setup = time.perf_counter() - t
        runs = {"lora": [], "nolora": []}
        hits = 0
        for rep in range(2):  # alternated, so drift hits both
            for tag, loras in (("lora", reqs), ("nolora", None)):
                r = time_engine_decode(engine, prompts, a.batch, a.prompt_len, a.steps, loras)
                runs[tag].append(r["s_per_step"])
                hits += r["prefix_hits"]
        with_lora, without = min(runs["lora"]), min(runs["nolora"])
        layers = engine.args.num_hidden_layers
        row = dict(ms_per_step_lora=with_lora * 1e3, ms_per_step_nolora=without * 1e3,
                   lora_us_per_layer=(with_lora - without) / layers * 1e6,
                   lora32_vs_nolora_decode=without / with_lora, timed_prefix_cache_hits=hits,
                   overlap=batch.OVERLAP, pdl=lora_meta.LORA_PDL, setup_s=setup)
        res[v] = row
        print(f"{v:12s} step {row['ms_per_step_lora']:.3f} ms with LoRA, {row['ms_per_step_nolora']:.3f} ms without: "
              f"LoRA {row['lora_us_per_layer']:.1f} us per layer, lora32_vs_nolora_decode "
              f"{row['lora32_vs_nolora_decode']:.3f} (overlap={batch.OVERLAP}, pdl={lora_meta.LORA_PDL}; "
              f"prefix hits {hits}; engine + adapters {setup:.0f} s) [{time.perf_counter() - t0:.0f} s]", flush=True)
        del engine, lm, reqs
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    set_variant({}, defaults)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
