"""FP8 base model (+ FP8 KV cache) vs bf16 (issue 14): decode, prefill, KV blocks, LoRA, quality.

Each engine is built alone (the previous one freed), on a Llama-3-8B-shaped model with random bf16
weights (bench_engine.build_checkpoint); the FP8 engine quantizes it at load. With one engine alive
at a time the runs cannot alternate: each figure is the median of --repeats runs of one engine. Quality: teacher-forced top-1 agreement of
FP8 against bf16 on the embedded default model with its demo adapter `upper`, plus the max logit error.

    python3 benchmarks/bench_fp8.py [--layers 32] [--json benchmarks/results/fp8_h200.json]
    python3 benchmarks/bench_fp8.py --tiny      # CPU smoke run on a tiny random Llama (CI / laptops)

Keys: decode_bs1_speedup, decode_bs64_speedup, prefill_speedup, kv_blocks_ratio (KV blocks each engine got
with the same kv_cache_config, FP8 / bf16; kv_blocks_per_gib_ratio: per byte of cache alone),
lora32_vs_nolora_fp8 (batch 64, 32 rank-16 adapters), top1_agreement_vs_bf16, max_logit_error.
The FP8 KV cache is used where models/fp8.py accepts it on the device (--kv-cache-fp8 auto; the Triton
attention kernels read e4m3 on CUDA). GEMMs of M <= LORASERVE_FP8_GEMV_MAX_M (64) tokens run the FP8 GEMV
kernels (kernels/fp8_gemv.py; tile table from benchmarks/fp8_gemv_sweep.py: weight-only up to 32 tokens, W8A8
dot8 at 33..64), larger ones _scaled_mm (models/fp8.py); projections under 1M weights stay weight-only.
Quality keys: top1_agreement_vs_bf16 (the engine's dispatch), _w8a8 (every GEMM W8A8 where the GPU can: an 8B
prefill's numerics), _w8a16 (every GEMM weight-only: decode's numerics). --lm-head-fp8: LORASERVE_FP8_LM_HEAD=1. Prefill is timed after two untimed prefills of the same shape, on fresh prompts, alike
for both engines.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.fp8_quality import agreement  # noqa: E402  (the quality runs: their own module)

# --also-alt-paths's default: the FP8 decode paths of the 20:55 final (before the fused ones and the new defaults)
PREVIOUS_DECODE_PATHS = ("LORASERVE_FP8_GEMV_HALF=0,LORASERVE_FP8_W8A8=token,LORASERVE_FP8_GATE_UP_SILU=0,"
                         "LORASERVE_FP8_PREQUANT=0,LORASERVE_FP8_DEFER_DOWN_SUM=0,LORASERVE_FP8_QKV_ROPE=0,"
                         "LORASERVE_FP8_DEFER_O=0,LORASERVE_FP8_HEAD_FUSED=0")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def time_prefill(engine, batch: int, prompt_len: int, seed: int) -> float:
    """Prompt tokens/s of `batch` fresh prompts of `prompt_len` tokens (one output token each): two
    untimed prefills of the same shape first (Triton compiles its prefill kernels and the allocator
    settles on the first engine of the process; without them bf16, built first, paid FP8's compiles
    too), then one timed on prompts no earlier run shares a prefix with (seed)."""
    from loraserve import SamplingParams

    def once(tag: str, prompt_seed: int) -> float:
        ids = torch.randint(2, engine.args.vocab_size - 1, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(prompt_seed)).tolist()
        for i, prompt in enumerate(ids):
            engine.add_request(f"fp8-prefill-{tag}-{i}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        _sync(engine)
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        _sync(engine)
        return batch * prompt_len / (time.perf_counter() - t)

    for w in range(2):
        once(f"warm{seed}-{w}", 10_000 + 2 * seed + w)
    return once(f"run{seed}", seed)


def build(path: str, quant: dict | None, kw: dict, lora_cfg=None):
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine

    if torch.cuda.is_available():   # nothing of the previous engine may still hold memory: KV sizing reads it
        gc.collect()
        torch.cuda.empty_cache()
    return LLMEngine(engine_config_from_kwargs(path, quant_config=quant, lora_config=lora_cfg, **kw))


def free(engine) -> None:
    """Drop what an engine holds on the device. The caller must drop its own reference too (`engine = None`
    before the next build: `engine = build(...)` keeps the old engine alive while the new one sizes its KV
    cache, which is how the FP8 engine got a third of bf16's blocks)."""
    runner = getattr(engine, "runner", None)
    if runner is not None and getattr(runner, "graph_runner", None) is not None:
        runner.graph_runner = None   # the CUDA graphs' private memory pool
    del engine, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(engine, a, loras=None) -> dict:
    from benchmarks.bench_dora import time_decode

    out = {}
    for bs in (1, a.batch):
        runs = [time_decode(engine, bs, a.prompt_len, a.steps, loras or [None], seed=10 * r + bs)
                for r in range(a.repeats)]
        out[f"decode_bs{bs}_tok_s"] = statistics.median(runs)
    if not a.decode_only:
        out["prefill_tok_s"] = statistics.median(time_prefill(engine, a.prefill_batch, a.prefill_len, seed=r)
                                                 for r in range(a.repeats))
    for bs in (1, a.batch):   # wall time per decode step, to set against the profile's device time
        out[f"decode_bs{bs}_ms_per_step"] = round(1e3 * bs / out[f"decode_bs{bs}_tok_s"], 3)
    graphs = getattr(engine.runner, "graph_runner", None)   # decode replayed from CUDA graphs, or eager
    out["cuda_graph_buckets"] = sorted({bs for bs, _ in graphs.graphs}) if graphs is not None else None
    out["sampler_graphs"] = graphs is not None and graphs.sampler_graphs is not None
    cache = engine.runner.k_cache
    out["kv_blocks"] = engine.runner.num_blocks
    # what the cache's memory budget holds, before the max_seq_len x max_num_seqs cap (FP8 reaches it at 8B)
    out["kv_blocks_by_memory"] = getattr(engine.runner, "kv_blocks_by_memory", engine.runner.num_blocks)
    out["kv_blocks_per_gib"] = engine.runner.num_blocks / (2 * cache.numel() * cache.element_size() / 2**30)
    out["kv_cache_dtype"] = str(cache.dtype)
    if torch.cuda.is_available():
        out["weights_gib"] = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 2**30
    return out


def fp8_kv_cache_supported(device: torch.device) -> bool:
    """Whether enable_fp8_kv_cache accepts `device` (it refuses CUDA until the Triton attention kernels
    read e4m3): probed on an empty module, so nothing is built."""
    from loraserve.inference.models.fp8 import enable_fp8_kv_cache

    try:
        enable_fp8_kv_cache(torch.nn.Module(), device)
    except NotImplementedError:
        return False
    return True


def fp8_gemv_max_m_setting() -> str:
    from loraserve.inference.models.fp8 import DEFAULT_GEMV_MAX_M, gemv_max_m

    raw = os.environ.get("LORASERVE_FP8_GEMV_MAX_M")
    return f"{gemv_max_m()} ({'LORASERVE_FP8_GEMV_MAX_M' if raw else f'default {DEFAULT_GEMV_MAX_M}'})"


def main() -> int:
    from benchmarks.bench_engine import decode_bench_parser

    ap = decode_bench_parser(repeats=2)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--kv-cache-fp8", choices=["auto", "on", "off"], default="auto",
                    help="FP8 KV cache in the FP8 engine; auto: where models/fp8.py supports it on this device")
    ap.add_argument("--skip-quality", action="store_true", help="no top-1 agreement run (speed figures only)")
    ap.add_argument("--skip-micro", action="store_true", help="no per-GEMM timings (CUDA only)")
    ap.add_argument("--quality-texts", type=int, default=16, help="sampled texts for the top-1 agreement")
    ap.add_argument("--decode-only", action="store_true", help="decode figures only (no prefill, no LoRA run)")
    ap.add_argument("--lm-head-fp8", action="store_true",
                    help="the FP8 engine's LM head in e4m3 too (LORASERVE_FP8_LM_HEAD=1; bf16 by default)")
    ap.add_argument("--also-lm-head-fp8", action="store_true",
                    help="also decode with the FP8 LM head (a third engine): *_speedup_lm_head_fp8 keys")
    ap.add_argument("--profile-until-s", type=float, default=1e9,
                    help="--profile only while the run is younger than this (a time-limited run keeps its figures)")
    ap.add_argument("--precompile-jobs", type=int, default=0,
                    help="compile the FP8 GEMV tiles in this many worker processes while the checkpoint is written")
    ap.add_argument("--quality-only", action="store_true", help="only the top-1 agreement on the default model")
    ap.add_argument("--quality-dispatch-only", action="store_true",
                    help="top-1 agreement of the engine's own dispatch only (not also all-W8A8 / all-weight-only)")
    ap.add_argument("--quality-decode", action="store_true",
                    help="the top-1 run also with the second half of each text through one-token forwards (decode GEMVs; "
                         "the default model's shapes on the fp16-product GEMV, fp8_quality.DEFAULT_MODEL_M1_CONFIGS): "
                         "*_decode keys (--quality-only, or the --quality-parallel child)")
    ap.add_argument("--quality-parallel", action="store_true",
                    help="the top-1 agreement (dispatch only) in a child process while the 8B checkpoint is written")
    ap.add_argument("--quality-wait-s", type=float, default=90,
                    help="--quality-parallel: stop waiting for the child (and kill it) this long after the start")
    ap.add_argument("--engines-in-children", action="store_true",
                    help="each engine (bf16, FP8 + LoRA) in a child process of its own (one 32-layer engine per CUDA "
                         "process: a second one in the same process hit a device-side assert on the H200)")
    ap.add_argument("--phase", choices=["bf16", "fp8"], default=None, help=__import__('argparse').SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=__import__('argparse').SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=256,
                    help="engines' max_batch_size: CUDA-graph buckets up to it (64: 9 buckets, not 13)")
    ap.add_argument("--fp8-only", action="store_true", help="no bf16 engine (no speedups: FP8 figures only)")
    ap.add_argument("--also-alt-paths", action="store_true",
                    help="with --engines-in-children: one more FP8 child, decode only, with --alt-env's switches "
                         "(default: the decode paths before the fused ones, as a same-run A/B): keys *_alt_paths")
    ap.add_argument("--alt-env", default=PREVIOUS_DECODE_PATHS,
                    help="--also-alt-paths: the alt child's LORASERVE_ switches, K=V,K=V")
    ap.add_argument("--profile", nargs="?", const="all", choices=["all", "fp8"], default=None,
                    help="per-kernel device time of decode steps at batch 1 and --batch (fp8: the FP8 engine only)")
    ap.add_argument("--exclude-modules", default=None,
                    help="QuantConfig.exclude_modules, comma-separated patterns (e.g. 'model.layers.0.*')")
    a = ap.parse_args()

    from loraserve import LoraConfig

    from loraserve.inference.models.fp8_head import lm_head_fp8_on

    from benchmarks.fp8_probe import gemm_micro, profile_decode

    from benchmarks.bench_dora import make_adapters, register, time_decode

    if a.lm_head_fp8:   # read at load: only FP8 loads quantize the head (the bf16 engine keeps its own)
        os.environ["LORASERVE_FP8_LM_HEAD"] = "1"
    t0 = time.perf_counter()
    if a.quality_only:   # the default model's top-1 agreement alone (no 8B checkpoint): a run of its own
        on_gpu = torch.cuda.is_available() and not a.tiny
        kw = (dict(dtype="bfloat16", device="cuda", max_batch_size=256, kv_cache_config={"free_gpu_memory_fraction": 0.5})
              if on_gpu else dict(dtype="float32", device="cpu"))   # as the full run's quality engines
        kv_fp8 = fp8_kv_cache_supported(torch.device(kw["device"]))
        quant = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv_fp8 else None, "exclude_modules": None}
        res = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "quant_config": quant,
               "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORASERVE_")}}
        def write(part: dict) -> None:
            res.update(part)
            res["wall_s"] = time.perf_counter() - t0
            print(f"[quality, {res['wall_s']:.0f} s] " + ", ".join(f"{k} {v:.4f}" for k, v in part.items()
                                                                  if k.startswith("top1_agreement_vs")), flush=True)
            if a.json:
                with open(a.json, "w") as fh:
                    json.dump(res, fh, indent=2)

        if a.quality_decode and not os.environ.get("LORASERVE_FP8_GEMV_CONFIGS"):   # read at the first GEMV config
            from benchmarks.fp8_quality import DEFAULT_MODEL_M1_CONFIGS

            cfg_path = os.path.join(tempfile.mkdtemp(prefix="fp8-q-"), "m1_configs.json")
            with open(cfg_path, "w") as fh:
                json.dump(DEFAULT_MODEL_M1_CONFIGS, fh)
            os.environ["LORASERVE_FP8_GEMV_CONFIGS"] = cfg_path
            res["switches"]["LORASERVE_FP8_GEMV_CONFIGS"] = json.dumps(DEFAULT_MODEL_M1_CONFIGS)
        write(agreement(kw, quant, 2 if a.tiny else a.quality_texts, on_result=write,
                        extra_modes=not a.quality_dispatch_only, decode=a.quality_decode))
        print(json.dumps(res, indent=2))
        return 0
    os.environ.setdefault("LORASERVE_WARMUP", "0")   # as bench_engine: the timed runs warm up themselves
    path = a.ckpt or tempfile.mkdtemp(prefix="fp8-bench-")
    quality = qpath = None
    if a.quality_parallel and not a.skip_quality and not a.fp8_only:
        # the default model's top-1 run (small engines) in a child process, beside the 8B checkpoint's write
        import subprocess

        qpath = os.path.join(path, "quality.json")
        quality = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--quality-only", "--quality-dispatch-only",
                                    "--quality-texts", str(a.quality_texts), "--json", qpath] + (["--tiny"] if a.tiny else [])
                                   + (["--quality-decode"] if a.quality_decode else []))
    if a.tiny:
        from tests.inference.conftest import make_random_model

        if not a.ckpt:
            make_random_model(path, "llama")
        a.batch, a.adapters, a.rank, a.prompt_len, a.steps = 8, 4, 8, 16, 4
        a.prefill_len, a.prefill_batch, a.repeats = 64, 2, 1
        kw = dict(dtype="float32", device="cpu")
    else:
        from benchmarks.bench_engine import build_checkpoint

        pre = None
        if a.precompile_jobs > 0:   # the FP8 GEMV tiles into Triton's cache (a cold machine) beside the checkpoint
            import subprocess

            pre = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "fp8_gemv_sweep.py"),
                                    "--precompile-engine", "--jobs", str(a.precompile_jobs), "--budget-s", "60"])
        if not a.ckpt:
            build_checkpoint(path, a.layers)
            print(f"checkpoint built ({time.perf_counter() - t0:.0f} s)", flush=True)
        if pre is not None:   # done before any engine sizes its KV cache from the free memory (the workers hold some)
            try:
                pre.wait(timeout=max(5.0, 75 - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                pre.kill()
                pre.wait()
            print(f"GEMV precompile finished (exit {pre.returncode}, {time.perf_counter() - t0:.0f} s)", flush=True)
        kw = dict(dtype="bfloat16", device="cuda", max_num_tokens=8192, max_batch_size=a.max_batch,
                  kv_cache_config={"free_gpu_memory_fraction": 0.5})
    if quality is not None:   # done before an engine sizes its KV cache from the free memory
        try:
            quality.wait(timeout=max(5.0, a.quality_wait_s - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            quality.kill()
            quality.wait()
        print(f"quality run finished (exit {quality.returncode}, {time.perf_counter() - t0:.0f} s)", flush=True)
    on_gpu = kw["device"] == "cuda"
    kv_fp8 = fp8_kv_cache_supported(torch.device(kw["device"])) if a.kv_cache_fp8 == "auto" else a.kv_cache_fp8 == "on"
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv_fp8 else None,
             "exclude_modules": a.exclude_modules.split(",") if a.exclude_modules else None}
    res: dict = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "layers": a.layers if not a.tiny else 2,
                 "batch": a.batch, "prompt_len": a.prompt_len, "steps": a.steps, "repeats": a.repeats,
                 "quant_config": quant, "fp8_gemv_max_m": fp8_gemv_max_m_setting(),
                 "fp8_gemv_configs": os.environ.get("LORASERVE_FP8_GEMV_CONFIGS") or "built-in table (kernels/fp8_gemv.py)",
                 "lm_head": "fp8 + top-8 bf16 rescoring at <= 4 rows" if lm_head_fp8_on() else "bf16",
                 "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LORASERVE_")}}
    if qpath is not None and os.path.exists(qpath):   # the parallel quality run's figures (--quality-parallel)
        try:
            with open(qpath) as fh:
                res.update({k: v for k, v in json.load(fh).items() if k.startswith(("top1", "max_logit"))})
        except ValueError:
            pass
    lora_cfg = LoraConfig(max_lora_rank=a.rank, max_loras=a.adapters, max_cpu_loras=a.adapters)

    def save(phase: str) -> None:
        """The ratios of what is measured so far, printed and written: a run cut short (a time limit) keeps them."""
        b, f = res.get("bf16"), res.get("fp8")
        if b and f:
            for bs in (1, a.batch):
                res[f"decode_bs{bs}_speedup"] = f[f"decode_bs{bs}_tok_s"] / b[f"decode_bs{bs}_tok_s"]
                if "fp8_lm_head_fp8" in res:
                    res[f"decode_bs{bs}_speedup_lm_head_fp8"] = (res["fp8_lm_head_fp8"][f"decode_bs{bs}_tok_s"]
                                                                 / b[f"decode_bs{bs}_tok_s"])
            if "prefill_tok_s" in f and "prefill_tok_s" in b:
                res["prefill_speedup"] = f["prefill_tok_s"] / b["prefill_tok_s"]
            # blocks each engine got with the same kv_cache_config (FP8 weights leave more memory; an FP8 KV
            # cache halves the bytes per block); kv_blocks_per_gib_ratio: per byte of cache alone
            # by memory (the "KV blocks available at the same memory"): the allocated counts stop at the
            # engines' max_seq_len x max_num_seqs cap (8192 x 64 tokens = 32768 blocks), which FP8 reaches at 8B
            res["kv_blocks_ratio"] = (f.get("kv_blocks_by_memory", f["kv_blocks"])
                                      / b.get("kv_blocks_by_memory", b["kv_blocks"]))
            res["kv_blocks_allocated_ratio"] = f["kv_blocks"] / b["kv_blocks"]
            res["kv_blocks_per_gib_ratio"] = f["kv_blocks_per_gib"] / b["kv_blocks_per_gib"]
        if f and "fp8_lora32_decode_tok_s" in res:
            res["lora32_vs_nolora_fp8"] = res["fp8_lora32_decode_tok_s"] / f[f"decode_bs{a.batch}_tok_s"]
        res["wall_s"] = time.perf_counter() - t0
        keys = [k for k in res if k.endswith(("_speedup", "_ratio", "lora32_vs_nolora_fp8")) or k.startswith("top1_agr")]
        print(f"[{phase}, {res['wall_s']:.0f} s] " + ", ".join(f"{k} {res[k]:.3f}" for k in keys), flush=True)
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as fh:
                json.dump(res, fh, indent=2)

    if on_gpu and not a.skip_micro:
        try:   # diagnostics only: a failure here must not cost the engine figures
            res["gemm_us"] = gemm_micro()
        except Exception as err:   # noqa: BLE001
            res["gemm_us"] = f"failed: {type(err).__name__}: {err}"[:2000]
        print(f"GEMM micro-benchmark done ({time.perf_counter() - t0:.0f} s): {res['gemm_us']}", flush=True)
    if a.engines_in_children and a.phase is None:
        import subprocess

        # fp8_alt: the FP8 engine with --alt-env's switches (by default the decode paths before the fused ones: fp32
        # GEMVs at one token, dot8 at 33..64, no fusions), decode only, in a child of its own: a same-run A/B of the
        # decode figures (keys *_alt_paths), and the figures if the fp8 child fails
        for tag in ([] if a.fp8_only else ["bf16"]) + ["fp8"] + (["fp8_alt"] if a.also_alt_paths else []):
            part_path = os.path.join(tempfile.gettempdir(), f"fp8-bench-{os.getpid()}-{tag}.json")   # not in path
            argv = [arg for arg in sys.argv[1:] if arg not in ("--engines-in-children", "--quality-parallel",
                                                               "--also-alt-paths")]
            if "--alt-env" in argv:
                i = argv.index("--alt-env")
                del argv[i:i + 2]
            env = dict(os.environ)
            if tag == "fp8_alt":
                alt = dict(kv.split("=", 1) for kv in a.alt_env.split(",") if "=" in kv)
                env.update(alt)
                res["alt_paths_env"] = alt
                argv = [arg for arg in argv if arg != "--profile" and arg not in ("all", "fp8")] + ["--decode-only"]
            for opt in ("--json", "--precompile-jobs", "--profile-until-s", "--quality-wait-s"):
                if opt in argv:
                    i = argv.index(opt)
                    del argv[i:i + 2]
            left = max(0.0, a.profile_until_s - (time.perf_counter() - t0))   # the children's clocks start at 0
            child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--skip-quality", "--phase",
                                    "fp8" if tag == "fp8_alt" else tag, "--ckpt", path, "--json", part_path,
                                    "--profile-until-s", str(left)], env=env)
            print(f"{tag} child exit {child.returncode} ({time.perf_counter() - t0:.0f} s)", flush=True)
            try:
                with open(part_path) as fh:
                    part = json.load(fh)
            except (OSError, ValueError):
                continue
            if tag == "fp8_alt":
                res["fp8_alt_paths"] = part.get("fp8")
                b = res.get("bf16")
                if b and part.get("fp8"):
                    for bs in (1, a.batch):
                        res[f"decode_bs{bs}_speedup_alt_paths"] = (part["fp8"][f"decode_bs{bs}_tok_s"]
                                                                    / b[f"decode_bs{bs}_tok_s"])
                if "fp8" not in res and part.get("fp8"):   # the fp8 child failed: the keys from these
                    res["fp8"], res["fp8_paths"] = part["fp8"], "alt (the fp8 child on the default paths failed)"
            else:
                res.update({k: v for k, v in part.items() if k in ("bf16", "fp8", "fp8_lora32_decode_tok_s")})
            save(tag)
        shutil.rmtree(path, ignore_errors=True)
        print(json.dumps(res, indent=2))
        return 0
    if not a.fp8_only and a.phase != "fp8":
        engine = build(path, None, kw, lora_cfg)
        res["bf16"] = measure(engine, a)
        if a.profile == "all" and time.perf_counter() - t0 < a.profile_until_s:
            res["bf16"]["profile_decode"] = {bs: profile_decode(engine, bs, a.prompt_len) for bs in (1, a.batch)}
        free(engine)
        engine = None   # before the next build: the FP8 engine sizes its KV cache from the free memory
        print(f"bf16 done ({time.perf_counter() - t0:.0f} s): "
              f"{ {k: v for k, v in res['bf16'].items() if k != 'profile_decode'} }", flush=True)
        save("bf16")
    if a.phase == "bf16":
        return 0
    engine = build(path, quant, kw, lora_cfg)
    res["fp8"] = measure(engine, a)
    print(f"fp8 done ({time.perf_counter() - t0:.0f} s): "
          f"{ {k: v for k, v in res['fp8'].items() if k != 'profile_decode'} }", flush=True)
    save("fp8")
    if not a.decode_only:
        reqs = register(engine, make_adapters(engine, a.adapters, a.rank, dora=False, seed=1), 1)
        res["fp8_lora32_decode_tok_s"] = statistics.median(
            time_decode(engine, a.batch, a.prompt_len, a.steps, reqs, seed=7 + r) for r in range(a.repeats))
        save("fp8 + 32 LoRA adapters")
    if a.profile and time.perf_counter() - t0 < a.profile_until_s:
        res["fp8"]["profile_decode"] = {bs: profile_decode(engine, bs, a.prompt_len) for bs in (1, a.batch)}
        save("fp8 profile")
    free(engine)
    engine = None
    if a.also_lm_head_fp8 and not a.lm_head_fp8:   # the opt-in FP8 LM head: decode only, a third engine
        os.environ["LORASERVE_FP8_LM_HEAD"] = "1"
        try:
            engine = build(path, quant, kw, lora_cfg)
            runs = {bs: [time_decode(engine, bs, a.prompt_len, a.steps, [None], seed=10 * r + bs)
                         for r in range(a.repeats)] for bs in (1, a.batch)}
            res["fp8_lm_head_fp8"] = {f"decode_bs{bs}_tok_s": statistics.median(v) for bs, v in runs.items()}
            free(engine)
            engine = None
        finally:
            os.environ.pop("LORASERVE_FP8_LM_HEAD", None)
        save("fp8 with the FP8 LM head")
    if not a.ckpt:   # (a child's checkpoint is its parent's to remove: another child may follow)
        shutil.rmtree(path, ignore_errors=True)   # the 8B checkpoint: 16 GB of disk
    if not a.skip_quality and not a.fp8_only and quality is None:
        res.update(agreement({k: v for k, v in kw.items() if k != "max_num_tokens"}, quant,
                             2 if a.tiny else a.quality_texts))
        save("quality")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
