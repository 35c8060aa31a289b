"""Start-up warm-up: dummy steps that compile the Triton kernel variants serving can meet, before serving.

Triton compiles a kernel variant per combination of constexprs (the attention's tile shape BLOCK_M from the
step's longest query run, split-KV on/off and the merge's power-of-two split count) and, unless an argument is
marked do_not_specialize, per value class of each integer argument (== 1, multiple of 16, other). A variant
first met by a request compiles inside its step: on the H200 run of issue 11 a 7,759-token prefill step that the
benchmark's warm-up had not met took 1.94 s instead of ~0.13. The decode and mixed-step CUDA graphs compile their
variants when captured; the eager steps (prefill-only steps, steps with adapter rows) compile theirs here:

- prefill-only steps of 1, 3 and 16 prompts whose token count is and is not a multiple of 16 (the count classes,
  for kernels that still specialise on them), long enough for the 64-row tile;
- single prompts short enough for the 16- and 32-row tiles, and a one-token prompt;
- single prompts whose planned split-KV count (unified_attention.plan_num_splits, as the step will plan it)
  covers each power-of-two class of the merge kernel;
- a few tokens over a long cached prefix (a prompt, then the same prompt + 10 tokens: the prefix cache hands the
  second its blocks), for the split classes (16-64 ways) of a short query over a long context, which single
  prompts never plan (chunked continuations, eager mixed steps with adapter rows).

Each step is a set of dummy requests (random token ids, one output token) run through the engine itself, so the
warm-up meets exactly the code path a request takes; their KV blocks are freed and the prefix cache is reset.
CUDA only (on the CPU nothing compiles). LORASERVE_WARMUP=0 skips it; tensor-parallel engines skip it unless
LORASERVE_WARMUP=1 (their workers compile the same variants; the start-up budget of TP runs is tight).
Not covered: the LoRA kernels' variants (they need adapters), eager decode steps above the largest graph bucket.
"""
from __future__ import annotations

import importlib
import logging
import os
import random
import time

log = logging.getLogger(__name__)

_OFF = ("0", "false", "off", "no")


def warmup_wanted(engine) -> bool:
    env = os.environ.get("LORASERVE_WARMUP", "").strip().lower()
    if env in _OFF or engine.device.type != "cuda":
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    return engine.tp is None


def _split_lengths(engine, limit: int) -> list[int]:
    """Single-prompt lengths <= limit, one per (tile shape, split class) the step planner gives them."""
    from loraserve.kernels.unified_attention import launch_config, plan_num_splits

    a = engine.args
    # the step plans with the activations' element size (attention.py: q.element_size()), not the KV cache's
    group, elem = a.num_attention_heads // a.num_key_value_heads, engine.dtype.itemsize
    candidates = sorted({*range(1, 33), *(int(16 * 1.25 ** i) for i in range(40))})
    seen, out = set(), []
    for n in (n for n in candidates if n <= limit):
        splits = plan_num_splits([n], [n], a.num_attention_heads, a.num_key_value_heads, elem, engine.device)
        key = (launch_config(n, group, elem)["BLOCK_M"], 1 if splits <= 1 else 1 << (splits - 1).bit_length())
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


def _prefix_splits(engine, limit: int, covered: set, query: int = 10) -> list[int]:
    """Prefix lengths L (block multiples, L + query <= limit) whose step of `query` new tokens over L + query of
    context plans a split class not in `covered` (from _split_lengths); one L per class."""
    from loraserve.kernels.unified_attention import launch_config, plan_num_splits

    a, bs = engine.args, engine.runner.block_size
    group, elem = a.num_attention_heads // a.num_key_value_heads, engine.dtype.itemsize
    block_m = launch_config(query, group, elem)["BLOCK_M"]
    out = []
    for length in range(4 * bs, limit - query, 4 * bs):
        splits = plan_num_splits([query], [length + query], a.num_attention_heads, a.num_key_value_heads, elem,
                                 engine.device)
        key = (block_m, 1 if splits <= 1 else 1 << (splits - 1).bit_length())
        if key not in covered:
            covered.add(key)
            out.append(length)
    return out


def warmup_steps(engine) -> list[list[int]]:
    """The prompt lengths of each dummy step (one list per step), within the engine's limits."""
    cfg = engine.config
    budget = min(cfg.max_num_tokens, engine.kv_capacity_tokens // 2, engine.max_seq_len - 1)
    steps = [[512], [509], [32] * 16, [31] + [32] * 15, [176] * 3, [175] * 3, [8], [7, 7], [3], [2, 3], [1]]
    try:
        steps += [[n] for n in _split_lengths(engine, budget) if [n] not in steps]
    except Exception:  # noqa: BLE001 - the fixed shapes still warm up
        log.warning("warm-up: could not plan the split-KV shapes", exc_info=True)
    return [s for s in steps if sum(s) <= budget and max(s) < engine.max_seq_len and len(s) <= cfg.max_num_seqs]


def prefix_steps(engine) -> list[int]:
    """Prefix lengths of the short-query-over-long-context steps (see the module docstring); [] without prefix
    caching."""
    if not engine.config.kv_cache_config.enable_block_reuse:
        return []
    budget = min(engine.config.max_num_tokens, engine.kv_capacity_tokens // 2, engine.max_seq_len - 1)
    try:
        a, elem = engine.args, engine.dtype.itemsize
        from loraserve.kernels.unified_attention import launch_config, plan_num_splits

        group = a.num_attention_heads // a.num_key_value_heads
        covered = set()
        for n in _split_lengths(engine, budget):
            splits = plan_num_splits([n], [n], a.num_attention_heads, a.num_key_value_heads, elem, engine.device)
            covered.add((launch_config(n, group, elem)["BLOCK_M"], 1 if splits <= 1 else 1 << (splits - 1).bit_length()))
        return _prefix_splits(engine, budget, covered)
    except Exception:  # noqa: BLE001
        log.warning("warm-up: could not plan the long-context split shapes", exc_info=True)
        return []


def warm_up(engine) -> dict:
    """Run the dummy steps on a fresh engine (nothing else queued). Returns {'steps', 'seconds', 'failed'}."""
    from loraserve.config import SamplingParams

    t0 = time.perf_counter()
    rng = random.Random(0)
    vocab = engine.args.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    steps = warmup_steps(engine)
    # a prefix step: its prompt, then the prompt + 10 tokens (the second computes 10 over the cached prefix)
    steps += [("prefix", n) for n in prefix_steps(engine)]
    done, failed = 0, None
    for k, lens in enumerate(steps):
        prefix = lens[0] == "prefix"
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in ([lens[1]] if prefix else lens)]
        if prefix:
            prompts.append(prompts[0] + [rng.randrange(vocab) for _ in range(10)])
        ids = [f"__warmup__-{k}-{i}" for i in range(len(prompts))]
        try:
            for rid, prompt in zip(ids, prompts):   # a prefix step's two prompts one after the other
                engine.add_request(rid, prompt, params)
                if prefix or rid == ids[-1]:
                    while engine.has_unfinished_requests():
                        engine.step()
            done += 1
        except Exception as exc:  # noqa: BLE001 - a warm-up failure never stops the engine from serving
            failed = f"{type(exc).__name__}: {exc}"
            log.warning("warm-up step %s failed; serving starts without the rest", lens, exc_info=True)
            for rid in ids:
                engine.abort_request(rid, build=False)
            for _ in range(8):   # the step in flight, if any (bounded: a step that keeps failing ends here)
                if not engine.has_unfinished_requests():
                    break
                try:
                    engine.step()
                except Exception:  # noqa: BLE001
                    engine._drop_inflight()
            break
    engine.reset_prefix_cache()
    engine.block_manager.num_reused_blocks = 0     # the prefix steps' reuse is not serving's
    from .models.fp8 import forget_calibrated_kv_scales

    forget_calibrated_kv_scales(engine.model)      # FP8 KV scales: from the first real prefill, not random ids
    seconds = time.perf_counter() - t0
    log.info("warm-up: %d dummy steps (prompt lengths %s) in %.2f s", done,
             [s[1] if s[0] == "prefix" else sum(s) for s in steps[:done]], seconds)
    return {"steps": done, "seconds": seconds, "failed": failed}


def compiled_attention_variants() -> int:
    """Compiled variants of the attention kernels in this process (Triton's per-device caches; 0 without
    Triton): a serving step that raises it compiled inside the step."""
    try:   # the module itself: the package re-exports a function of the same name
        ua = importlib.import_module("loraserve.kernels.unified_attention")
        kernels = (ua._unified_attention_kernel, ua._merge_splits_kernel)
    except (ImportError, AttributeError):
        return 0
    return sum(max(0, num_variants(fn)) for fn in kernels)


def num_variants(kernel) -> int:
    """Compiled variants a @triton.jit kernel holds in this process (-1: unknown, e.g. the interpreter). A
    decorated kernel (heuristics, autotune) wraps the JITFunction in .fn; Triton keeps one dict of compiled
    kernels per device, first in the device_caches entry (the cache of Triton < 3 is a plain dict)."""
    fn = kernel
    while fn is not None and not hasattr(fn, "device_caches") and not isinstance(getattr(fn, "cache", None), dict):
        fn = getattr(fn, "fn", None)
    if fn is None:
        return -1
    caches = getattr(fn, "device_caches", None)
    if caches:
        return sum(len(v[0]) if isinstance(v, tuple) else len(v) for v in caches.values())
    cache = getattr(fn, "cache", None)
    if isinstance(cache, dict) and cache:
        return sum(len(v) for v in cache.values())
    return 0 if caches is not None or cache is not None else -1
