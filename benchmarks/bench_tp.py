"""Tensor parallelism: TP=2 against TP=1 on a Llama-3-8B-shaped model with random bf16 weights (2 GPUs).

  * decode at batch 1 and 64 (tokens/s), TP=2 over TP=1 (issue 15 targets: >= 1.5x and >= 1.6x)
  * decode at batch 64 with 32 distinct rank-16 adapters on every projection vs no LoRA, under TP=2
    (target >= 0.9x)
  * top-1 agreement TP=2 vs TP=1 (bf16, target >= 99%): the greedy next token after each of 256
    random prompts of random lengths (teacher-forced: every comparison starts from the same context),
    next to the bf16 noise floor of the same run: TP=1 against itself with the prompts batched
    differently (top1_agreement_tp1_rebatched; random weights give flat logits, so near-ties flip)

Both run as served by default: CUDA graphs on decode, for TP=2 on every rank with the NCCL
all-reduces inside (--tp-eager: TP=2 without graphs). Every figure is written to the JSON as soon as
it is measured. Writes benchmarks/results/tp_h200x2.json keys decode_bs1_speedup_tp2,
decode_bs64_speedup_tp2, lora32_vs_nolora_tp2, top1_agreement_tp2_vs_tp1.

    python3 benchmarks/bench_tp.py [--layers 32] [--shape 70b] [--tp-eager] [--json out.json]
    python3 benchmarks/bench_tp.py --tiny        # CPU, tiny model, gloo: checks the script runs
    python3 benchmarks/bench_tp.py --decode-only --compare-ar --layers 8   # batch 1/64 only, and TP=2
        # again with NCCL all-reduces only (LORASERVE_TP_CUSTOM_AR=0; default: symmetric memory, tp/allreduce.py)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.tp_children import run_child  # noqa: E402


def make_engine(path: str, device: str, tp: int, tiny: bool, lora: bool, max_batch: int = 256):
    from loraserve import LoraConfig
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine

    kw = dict(dtype="float32" if tiny else "bfloat16", device=device, max_num_tokens=8192, max_batch_size=max_batch,
              tensor_parallel_size=tp)
    if lora:
        kw["lora_config"] = LoraConfig(max_lora_rank=16, max_loras=32, max_cpu_loras=32)
    if device == "cuda":
        kw["kv_cache_config"] = {"free_gpu_memory_fraction": 0.5}
    return LLMEngine(engine_config_from_kwargs(path, **kw))


def close_engine(engine) -> None:
    if hasattr(engine.runner, "shutdown"):
        engine.runner.shutdown()
    if engine.lora_manager is not None:
        engine.lora_manager.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_tok_s(engine, vocab: int, batch: int, prompt_len: int, steps: int, seed: int,
                 loras=None) -> float:
    from benchmarks.bench_engine import run_decode

    g = torch.Generator().manual_seed(seed)   # fresh prompts per run: the prefix cache never hits
    ids = torch.randint(2, vocab, (batch, prompt_len), generator=g).tolist()
    return run_decode(engine, ids, steps, loras, tag=f"d{seed}-{batch}")["tok_s"]


def random_prompts(vocab: int, n: int, max_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(77)
    lens = torch.randint(16, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (L,), generator=g).tolist() for L in lens]


def next_tokens(engine, prompts: list[list[int]], group: int | None = None, tag: str = "top1") -> list[int]:
    """Greedy next token after each prompt: one batch, or `group` prompts at a time in reverse order
    (other batch shapes, so other GEMM tilings and bf16 roundings: the noise floor the TP figure is
    read against)."""
    from loraserve import SamplingParams

    n = len(prompts)
    p = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    order = list(range(n)) if group is None else list(reversed(range(n)))
    group = group or n
    out: dict[str, int] = {}
    for k in range(0, n, group):
        for i in order[k:k + group]:
            engine.add_request(f"{tag}-{i}", prompts[i], p)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids[0]
    return [out[f"{tag}-{i}"] for i in range(n)]


def trained_agreement(device: str, tiny: bool, res: dict) -> None:
    """Top-1 agreement TP=2 vs TP=1 on the embedded default model (trained: its logits are not the
    near-ties of random weights): the greedy next token after 256 prefixes of 16 texts sampled from
    it, next to TP=1's own noise floor (the prefixes batched differently)."""
    from loraserve import SamplingParams
    from loraserve.config import engine_config_from_kwargs
    from loraserve.inference.engine import LLMEngine

    model = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "default")
    kw = dict(dtype="float32" if tiny else "bfloat16", device=device, max_num_tokens=4096)
    if device == "cuda":
        kw["kv_cache_config"] = {"free_gpu_memory_fraction": 0.2}
    tokens = {}
    prefixes: list[list[int]] = []
    for tp in (1, 2):
        engine = LLMEngine(engine_config_from_kwargs(model, tensor_parallel_size=tp, **kw))
        if tp == 1:   # 16 texts sampled from the model, cut at 16 places each
            starts = ["def ", "import os\n\n\nclass ", "    def __init__(self", "for i in range(10):\n"] * 4
            sp = SamplingParams(max_tokens=96, temperature=1.0, seed=0, ignore_eos=True)
            for i, text in enumerate(starts):
                engine.add_request(f"text-{i}", engine.tokenizer.encode(text), sp)
            texts: dict[str, list[int]] = {}
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        texts[o.request_id] = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
            g = torch.Generator().manual_seed(5)
            for ids in texts.values():
                for cut in torch.randint(4, len(ids), (16,), generator=g).tolist():
                    prefixes.append(ids[:cut])
            tokens["floor"] = next_tokens(engine, prefixes, group=7, tag="floor")
        tokens[tp] = next_tokens(engine, prefixes, tag=f"trained{tp}")
        # decode path (graphs, sampler graphs, fused kernels): greedy 32-token continuations of 16 text starts
        heads = [ids[:12] for ids in texts.values()]
        sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        # TP=1 also in groups of 5, last first (other decode buckets, other roundings): the continuations' floor
        for tag, group in ((f"cont{tp}", len(heads)),) + ((("contfloor", 5),) if tp == 1 else ()):
            order = list(range(len(heads))) if group == len(heads) else list(reversed(range(len(heads))))
            conts: dict[str, list[int]] = {}
            for k in range(0, len(heads), group):
                for i in order[k:k + group]:
                    engine.add_request(f"{tag}-{i}", heads[i], sp)
                while engine.has_unfinished_requests():
                    for o in engine.step():
                        if o.finished:
                            conts[o.request_id] = list(o.outputs[0].token_ids)
            tokens[tag] = [conts[f"{tag}-{i}"] for i in range(len(heads))]
        close_engine(engine)
    n = len(prefixes)
    res["top1_agreement_tp2_vs_tp1_trained"] = sum(x == y for x, y in zip(tokens[1], tokens[2])) / n
    res["top1_agreement_tp1_rebatched_trained"] = sum(x == y for x, y in zip(tokens[1], tokens["floor"])) / n
    res["trained_prefixes"] = n
    # per continuation: the tokens equal before the first difference, over its length (1.0: all equal)
    def matched(xs, ys) -> list[float]:
        out = []
        for a, b in zip(xs, ys):
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append(k / max(len(a), 1))
        return out

    for key, other in (("", "cont2"), ("_tp1_rebatched", "contfloor")):
        m = matched(tokens["cont1"], tokens[other])
        res[f"decode_prefix_agreement{key or '_tp2_vs_tp1'}_trained"] = sum(m) / len(m)
        res[f"decode_identical_continuations{key}_trained"] = sum(v == 1.0 for v in m) / len(m)
    print(f"default model: greedy 32-token continuations TP=2 vs TP=1: {res['decode_identical_continuations_trained']:.3f}"
          f" identical, matched prefix {res['decode_prefix_agreement_tp2_vs_tp1_trained']:.3f}; TP=1 rebatched "
          f"(groups of 5): {res['decode_identical_continuations_tp1_rebatched_trained']:.3f} identical, matched prefix "
          f"{res['decode_prefix_agreement_tp1_rebatched_trained']:.3f}", flush=True)
    print(f"default model: top-1 TP=2 vs TP=1 {res['top1_agreement_tp2_vs_tp1_trained']:.4f} "
          f"(TP=1 rebatched {res['top1_agreement_tp1_rebatched_trained']:.4f}, {n} prefixes)", flush=True)


def write(path: str | None, res: dict) -> None:
    if path:   # after every engine: a later hang or crash keeps what was measured
        with open(path, "w") as f:
            json.dump(res, f, indent=2)


def build_checkpoint(path: str, layers: int, tiny: bool, shape: str = "8b") -> None:
    if tiny:
        from tests.inference.conftest import make_random_model

        make_random_model(path, "llama", num_hidden_layers=layers)
        return
    from benchmarks.bench_engine import LLAMA3_8B, LLAMA3_70B
    from benchmarks.bench_engine import build_checkpoint as build_llama

    build_llama(path, layers, LLAMA3_70B if shape == "70b" else LLAMA3_8B)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="default 32 (8B shape), 4 (70B shape), 2 with --tiny")
    ap.add_argument("--shape", choices=("8b", "70b"), default="8b",
                    help="Llama-3 shape; 70b: the per-layer figure (ms per decode step / layers) matters")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny random model, gloo")
    ap.add_argument("--tp-graphs", action="store_true", help="CUDA graphs under TP (the default; kept for scripts)")
    ap.add_argument("--tp-eager", action="store_true", help="TP=2 without CUDA graphs (LORASERVE_TP_CUDA_GRAPHS=0)")
    ap.add_argument("--skip-trained", action="store_true", help="no agreement run on the embedded default model")
    ap.add_argument("--decode-only", action="store_true",
                    help="only decode at batch 1 and 64 (no agreement, no adapters): a quick speed-up check")
    ap.add_argument("--compare-ar", action="store_true",
                    help="TP=2 decode also with NCCL all-reduces only (LORASERVE_TP_CUSTOM_AR=0)")
    ap.add_argument("--replay", action="store_true",
                    help="also time the decode graph alone (every rank replaying back to back, no host in the way)")
    ap.add_argument("--profile-dir", default=None,
                    help="torch.profiler summaries per rank of decode steps (tp/profile.py) into this folder")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only-tp", type=int, choices=(1, 2), default=None, help="run one side only (probes)")
    ap.add_argument("--only-lora", action="store_true", help="only the TP=2 engine with 32 adapters (probes)")
    ap.add_argument("--lora-tp", type=int, choices=(1, 2), default=2, help="the adapters' engine at TP=1 (same figures)")
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds for each engine's child process")
    ap.add_argument("--fallback-safe", action="store_true",
                    help="a failed TP=2 child runs again with the opt-in paths off (LORASERVE_TP_FUSED_NORM etc.)")
    ap.add_argument("--only-trained", action="store_true", help="only the agreement runs on the default model")
    ap.add_argument("--build-only", action="store_true", help="only build the --checkpoint folder")
    ap.add_argument("--max-batch", type=int, default=256, help="engine max_batch_size (decode graph buckets)")
    ap.add_argument("--checkpoint", default=None, help="reuse this checkpoint folder (built there if missing)")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)   # internal: one engine, TP=N
    ap.add_argument("--child-trained", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lora-child", action="store_true", help=argparse.SUPPRESS)   # TP=2 with 32 adapters only
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--main-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-top1", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--n-adapters", type=int, default=32, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not a.child:   # timeout's SIGTERM as an exception: a running engine child (its own session) is killed too
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # read when the TP runner is first imported (below, by the first TP engine)
    os.environ["LORASERVE_TP_CUDA_GRAPHS"] = "0" if a.tp_eager else "1"
    from loraserve.inference.tp.worker import dump_stacks_when_stuck

    dump_stacks_when_stuck(f"child{a.child}" if a.child else "main")   # LORASERVE_DEBUG_STACKS_S (workers inherit it)

    if a.child_trained:
        res = {}
        trained_agreement("cpu" if a.tiny else "cuda", a.tiny, res)
        write(a.child_json, res)
        return 0
    if a.child:
        return child_main(a)
    device = "cpu" if a.tiny else "cuda"
    layers = a.layers or (2 if a.tiny else 4 if a.shape == "70b" else 32)
    prompt_len, steps = a.prompt_len or (16 if a.tiny else 512), a.steps or (4 if a.tiny else 64)
    n_top1, n_adapters = (16, 4) if a.tiny else (256, 32)
    gpus = 1 if a.only_tp == 1 or (a.only_lora and a.lora_tp == 1) else 2   # TP=1 alone: any one GPU
    if not a.tiny and not a.build_only and torch.cuda.device_count() < gpus:
        print(f"bench_tp skipped: it needs {gpus} GPUs, {torch.cuda.device_count()} visible (or --tiny on CPU)",
              file=sys.stderr)
        return 0
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "layers": layers,
                 "shape": "tiny" if a.tiny else a.shape,
                 "prompt_len": prompt_len, "steps": steps, "tp2_cuda_graphs": not a.tp_eager and device == "cuda"}
    if not a.skip_trained:   # first: small engines, and the figure the 99% target is meaningful for
        r = run_child(a, "", 0, 0, 0, 0, 0, 0)   # in a child process too (TP=1 and TP=2 engines of the default model)
        res.update({k: v for k, v in r.items() if not k.startswith("_")})
        if "_error" in r:
            print(f"trained-model agreement child failed: {r['_error']}", flush=True)
        write(a.json, res)
    if a.only_trained:
        return 0
    path = a.checkpoint or tempfile.mkdtemp(prefix="tp-bench-")
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(path, exist_ok=True)
        build_checkpoint(path, layers, a.tiny, a.shape)
    if a.build_only:
        return 0
    runs = {}

    for tp in () if a.only_lora else (1, 2) if a.only_tp is None else (a.only_tp,):
        # each engine in its own process: nothing of one engine (CUDA context, allocator, NCCL, a device-side
        # assert) reaches the next; the child writes its figures to a JSON the parent merges
        r = runs[tp] = run_child(a, path, tp, layers, prompt_len, steps, n_top1, n_adapters)
        res.update({k: v for k, v in r.items() if not k.startswith("_")})
        derive(res, a.json)
        write(a.json, res)
        if "_error" in r:
            print(f"tp{tp} child failed: {r['_error']}", flush=True)
            return 1
    if a.only_tp is not None:
        return 0
    if a.only_lora:
        a.decode_only = False
        runs = {1: {"_top1": []}, 2: {"_top1": []}}
    else:
        res["decode_bs1_speedup_tp2"] = runs[2]["tp2_decode_bs1_tok_s"] / runs[1]["tp1_decode_bs1_tok_s"]
        res["decode_bs64_speedup_tp2"] = runs[2]["tp2_decode_bs64_tok_s"] / runs[1]["tp1_decode_bs64_tok_s"]
        print(f"TP2/TP1 decode: bs1 {res['decode_bs1_speedup_tp2']:.3f}x, bs64 {res['decode_bs64_speedup_tp2']:.3f}x "
              f"(all-reduce: {'symmetric memory' if res.get('tp2_custom_all_reduce') else 'NCCL/gloo'})", flush=True)
        write(a.json, res)
    if not a.decode_only:
        # the adapters on an engine of their own, last: its LoRA graphs (and, on a cold machine, the LoRA kernels'
        # compiles for the shard shapes) never delay the speed-up figures (the 15:03 H200 run lost them that way)
        r = run_child(a, path, a.lora_tp, layers, prompt_len, steps, n_top1, n_adapters, lora_child=True)
        res.update({k: v for k, v in r.items() if not k.startswith("_")})
        derive(res, a.json)
        write(a.json, res)
        if "tp2_decode_bs64_lora_tok_s" in res and "tp2_decode_bs64_nolora_tok_s" in res:
            res["lora32_vs_nolora_tp2"] = res["tp2_decode_bs64_lora_tok_s"] / res["tp2_decode_bs64_nolora_tok_s"]
        if runs[1]["_top1"]:
            same = sum(x == y for x, y in zip(runs[1]["_top1"], runs[2]["_top1"]))
            res["top1_agreement_tp2_vs_tp1"] = same / n_top1
            res["top1_prompts"] = n_top1
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("tp")}, indent=2))
        write(a.json, res)
    if a.compare_ar:   # last: every main figure is written before it
        r = run_child(a, path, 2, layers, prompt_len, steps, n_top1, n_adapters, nccl_only=True)
        for k in ("bs1", "bs64"):
            if f"tp2_decode_{k}_tok_s" in r:
                tok_s = r[f"tp2_decode_{k}_tok_s"]
                res[f"tp2_nccl_decode_{k}_tok_s"] = tok_s
                res[f"decode_{k}_speedup_tp2_nccl"] = tok_s / runs[1][f"tp1_decode_{k}_tok_s"]
                print(f"tp2 NCCL-only decode {k}: {tok_s:.1f} tok/s, {res[f'decode_{k}_speedup_tp2_nccl']:.3f}x TP1",
                      flush=True)
        write(a.json, res)
    return 0


def child_main(a) -> int:
    """One engine (TP=a.child) on the checkpoint a.ckpt: decode at batch 1 and 64, then (unless
    --decode-only) the top-1 tokens and, under TP=2, the 32-adapter decode. Writes a.child_json after
    every figure."""
    from loraserve import LoRARequest

    import logging
    import time

    # rank 0's log lines (the workers configure their own): the start-up phases (tp/startup.py), KV, graphs
    tp, device = a.child, "cpu" if a.tiny else "cuda"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp0/{tp} %(levelname)s %(name)s: %(message)s")
    res: dict = {}
    t0 = time.perf_counter()
    engine = make_engine(a.ckpt, device, tp, a.tiny, lora=a.lora_child, max_batch=a.max_batch)
    start_s = time.perf_counter() - t0
    key = f"tp{tp}{'_lora' if a.lora_child else ''}_startup_s"
    res[key] = start_s
    clock = getattr(getattr(engine, "tp", None), "clock", None)
    if clock is not None:
        res[key[:-2] + "_phases"] = clock.summary()
    custom_ar = getattr(getattr(engine, "tp", None), "custom_ar", None) is not None
    print(f"tp{tp} engine ready in {start_s:.1f} s (all-reduce: {'symmetric memory' if custom_ar else 'NCCL/gloo'})"
          + (f"; rank 0 start-up: {clock.summary()}" if clock is not None else ""), flush=True)
    if tp == 2:   # which paths the engine took (each new one self-checked at start, off on a mismatch)
        res["tp2_custom_all_reduce"] = custom_ar
        res["tp2_fused_norm"] = getattr(engine.tp, "fused_norm", None) is not None
        graphs = getattr(engine.runner, "graph_runner", None)
        res["tp2_sampler_graphs"] = graphs is not None and graphs.sampler_graphs is not None
        res["tp2_sharded_sampler"] = bool(getattr(engine.runner, "sampler_shards", False))
        res["tp2_gemm_push"] = bool(getattr(getattr(engine.tp, "fused_norm", None), "push", False))
        print("tp2 paths: " + ", ".join(f"{k[4:]} {res[k]}" for k in ("tp2_custom_all_reduce", "tp2_fused_norm",
                                                                      "tp2_sampler_graphs", "tp2_sharded_sampler",
                                                                      "tp2_gemm_push")),
              flush=True)
    vocab = engine.args.vocab_size

    def save() -> None:
        write(a.child_json, res)
        publish(a, tp, res)

    def record(k: str, tok_s: float) -> None:
        res[f"tp{tp}_decode_{k}_tok_s"] = tok_s
        batch = 1 if k == "bs1" else 64   # ms per decode step and layer (LM head included)
        res[f"tp{tp}_decode_{k}_ms_per_layer"] = 1e3 * batch / tok_s / a.layers
        print(f"tp{tp} decode {k}: {tok_s:.1f} tok/s, {1e3 * batch / tok_s:.3f} ms/step, "
              f"{res[f'tp{tp}_decode_{k}_ms_per_layer']:.3f} ms/layer", flush=True)
        save()

    prof_dir = os.environ.get("LORASERVE_PROFILE_DIR")
    for k, batch, seed in (("bs1", 1, 10 * tp), ("bs64", 64, 10 * tp + 1)) if not a.lora_child else ():
        record(k, decode_tok_s(engine, vocab, batch, a.prompt_len, a.steps, seed=seed))
        if a.replay and device == "cuda":   # the decode graph alone, back to back (no host in the way)
            ms = replay_ms(engine, batch)
            if ms is not None:
                res[f"tp{tp}_replay_{k}_ms"] = ms
                print(f"tp{tp} decode graph replay {k}: {ms:.3f} ms (layers only, no LM head/sampling)", flush=True)
                save()
        if prof_dir:   # a second, untimed run with 8 decode steps under the profiler on every rank
            profiled_decode(engine, vocab, batch, a.prompt_len, max(a.steps, 24), seed + 100, prof_dir, f"tp{tp}_{k}")
    if a.lora_child:   # TP=2 with 32 distinct rank-16 adapters at batch 64, then the same batch without
        lm, reqs = engine.lora_manager, []
        from benchmarks.bench_engine import random_adapters

        adapters = random_adapters(engine.args, a.n_adapters, 16, engine.dtype, device="cpu", first_digest=1)
        for i, ad in enumerate(adapters):
            req = LoRARequest(f"bench-{i}", i + 1, "")
            lm.release(lm.add_adapter(ad, req))
            reqs.append(req)
        record("bs64_lora", decode_tok_s(engine, vocab, 64, a.prompt_len, a.steps, seed=30, loras=reqs))
        record("bs64_nolora", decode_tok_s(engine, vocab, 64, a.prompt_len, a.steps, seed=31))
    elif not a.decode_only:
        res["_top1"] = next_tokens(engine, random_prompts(vocab, a.n_top1, a.prompt_len))
        if tp == 1:
            floor = next_tokens(engine, random_prompts(vocab, a.n_top1, a.prompt_len), group=7, tag="floor")
            res["top1_agreement_tp1_rebatched"] = sum(x == y for x, y in zip(res["_top1"], floor)) / a.n_top1
        save()
    close_engine(engine)
    return 0


def publish(a, tp: int, res: dict) -> None:
    """A child's figures into the main JSON (--main-json) as soon as they exist, with the issue's keys
    derived from whatever both sides have by then: a run killed later keeps every finished figure."""
    if not a.main_json:
        return
    try:
        with open(a.main_json) as f:
            main = json.load(f)
    except (OSError, ValueError):
        main = {}
    main.update({k: v for k, v in res.items() if not k.startswith("_")})
    if "_top1" in res:   # the top-1 lists beside it (256 ints each)
        write(f"{a.main_json}.top1_tp{tp}", {"top1": res["_top1"]})
    derive(main, a.main_json)
    write(a.main_json, main)


def derive(main: dict, path: str | None) -> None:
    """The issue-15 keys from the figures present in `main` (and the top-1 lists beside `path`)."""
    for k in ("bs1", "bs64"):
        if f"tp1_decode_{k}_tok_s" in main and f"tp2_decode_{k}_tok_s" in main:
            main[f"decode_{k}_speedup_tp2"] = main[f"tp2_decode_{k}_tok_s"] / main[f"tp1_decode_{k}_tok_s"]
    for tp in (1, 2):   # (TP=1: --lora-tp 1, the same adapters' cost without tensor parallelism)
        if f"tp{tp}_decode_bs64_lora_tok_s" in main and f"tp{tp}_decode_bs64_nolora_tok_s" in main:
            main[f"lora32_vs_nolora_tp{tp}"] = (main[f"tp{tp}_decode_bs64_lora_tok_s"]
                                                / main[f"tp{tp}_decode_bs64_nolora_tok_s"])
    try:
        lists = []
        for tp in (1, 2):
            with open(f"{path}.top1_tp{tp}") as f:
                lists.append(json.load(f)["top1"])
        main["top1_agreement_tp2_vs_tp1"] = sum(x == y for x, y in zip(*lists)) / len(lists[0])
        main["top1_prompts"] = len(lists[0])
    except (OSError, ValueError, TypeError, KeyError):
        pass


def replay_ms(engine, batch: int) -> float | None:
    runner = engine.runner
    if getattr(runner, "graph_runner", None) is None:
        return None
    if hasattr(runner, "time_replays"):   # TP: every rank replays at once
        return runner.time_replays(batch, 50)
    from loraserve.inference.tp.worker import time_replays

    return time_replays(runner.graph_runner, batch, 50)


def profiled_decode(engine, vocab: int, batch: int, prompt_len: int, steps: int, seed: int, out_dir: str,
                    tag: str) -> None:
    """Decode with 8 steps after the prefill and warm-up under torch.profiler on every rank (tp/profile.py's
    summary into out_dir/tp_rank{r}_{tag}.txt; TP=1 through a StepProfiler around its runner)."""
    from loraserve.inference.tp.profile import StepProfiler

    runner = engine.runner
    if hasattr(runner, "profile_steps"):   # TP: the driver arms every rank (the workers read the folder from
        runner.profile_steps(12, 8, tag)   # LORASERVE_TP_PROFILE, set for the child: run_child)
        decode_tok_s(engine, vocab, batch, prompt_len, steps, seed=seed)
        return
    os.environ["LORASERVE_TP_PROFILE"] = out_dir
    prof = StepProfiler(0, torch.device("cpu" if engine.device.type == "cpu" else "cuda"))
    prof.arm(12, 8, tag)
    run = runner.run

    def wrapped(*args, **kw):
        prof.begin()
        try:
            return run(*args, **kw)
        finally:
            prof.end()
            prof.waiting()

    runner.run = wrapped
    try:
        decode_tok_s(engine, vocab, batch, prompt_len, steps, seed=seed)
    finally:
        runner.run = run


if __name__ == "__main__":
    sys.exit(main())
