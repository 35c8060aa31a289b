"""bench_tp's engines, each in a child process of its own (`bench_tp.py --child ...`): a child that fails or hangs
(a TP worker blocked in the rendezvous) is killed with its workers and reported, and no process ever builds a
second 32-layer engine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

BENCH_TP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_tp.py")

SAFE_ENV = {"LORASERVE_TP_FUSED_NORM": "0", "LORASERVE_TP_SAMPLER_GRAPHS": "0", "LORASERVE_TP_LOCAL_ARGMAX": "0",
            "LORASERVE_TP_FUSED_GREEDY": "0", "LORASERVE_TP_FUSED_EMBED": "0", "LORASERVE_ATTN_WIDE_DECODE": "0",
            "LORASERVE_TP_GEMM_PUSH": "0"}


def run_child(a, path: str, tp: int, layers: int, prompt_len: int, steps: int, n_top1: int, n_adapters: int,
              nccl_only: bool = False, lora_child: bool = False) -> dict:
    """One engine's figures from a child process (`--child`); {"_error": ...} if it failed. With --fallback-safe
    a failed TP=2 child runs once more with the opt-in paths off (SAFE_ENV), the reason kept under tp2_fallback."""
    r = _run_child(a, path, tp, layers, prompt_len, steps, n_top1, n_adapters, nccl_only, lora_child)
    # (unset is on for most of them: only an explicit "0" everywhere means there is nothing left to turn off)
    if "_error" in r and tp == 2 and a.fallback_safe and any(os.environ.get(k) != "0" for k in SAFE_ENV):
        print(f"tp2{' lora' if lora_child else ''} child failed ({r['_error']}); again with the opt-ins off", flush=True)
        os.environ.update(SAFE_ENV)   # every later child too
        r = _run_child(a, path, tp, layers, prompt_len, steps, n_top1, n_adapters, nccl_only, lora_child)
        r[f"tp2{'_lora' if lora_child else ''}_fallback"] = "the opt-ins (fused norm, GEMM push, sampler graphs, Triton greedy/embedding, wide attention) off after a failure"
    return r


def _run_child(a, path: str, tp: int, layers: int, prompt_len: int, steps: int, n_top1: int, n_adapters: int,
               nccl_only: bool = False, lora_child: bool = False) -> dict:
    fd, out = tempfile.mkstemp(suffix=".json", prefix=f"tp{tp}-")
    os.close(fd)
    cmd = [sys.executable, BENCH_TP, "--child", str(tp), "--ckpt", path, "--child-json", out,
           "--layers", str(layers), "--prompt-len", str(prompt_len), "--steps", str(steps),
           "--n-top1", str(n_top1), "--n-adapters", str(n_adapters), "--max-batch", str(a.max_batch)]
    cmd += ["--child-trained"] if tp == 0 else []
    cmd += ["--lora-child"] if lora_child else []
    cmd += ["--main-json", a.json] if a.json and tp and not nccl_only else []   # figures published as they come
    cmd += [f for f, on in (("--tiny", a.tiny), ("--tp-eager", a.tp_eager), ("--decode-only", a.decode_only or nccl_only),
                            ("--replay", a.replay)) if on]
    env = dict(os.environ)
    if nccl_only:   # no symmetric memory at all: the fused all-reduce + norm off too
        env.update(LORASERVE_TP_CUSTOM_AR="0", LORASERVE_TP_FUSED_NORM="0")
    if a.profile_dir and not nccl_only:   # profiled decode runs after the timed ones (child_main)
        env["LORASERVE_PROFILE_DIR"] = env["LORASERVE_TP_PROFILE"] = a.profile_dir
    # a session of its own: a child past --child-timeout is killed with its TP workers (a worker blocked in the
    # rendezvous holds the GIL and would not see its parent go)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=a.child_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = f"killed after {a.child_timeout:.0f} s"
    except BaseException:   # the parent stopped (Ctrl-C, timeout's SIGTERM): the engines go with it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    try:
        with open(out) as f:
            r = json.load(f)
    except (OSError, ValueError):
        r = {}
    os.unlink(out)
    if rc != 0:
        r["_error"] = f"exit code {rc}"
    return r
