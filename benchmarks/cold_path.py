"""Where a cold adapter's time goes (issue 12: <= 100 ms from request to first token, registry on loopback).

The stages of one cold adapter, each timed on the real code path (no copies of it here):

    resolve   registry GetAdapter (what {name, version} means)          AdapterFetcher.fetch
    download  DownloadAdapter stream + sha256 check + file write         AdapterFetcher.fetch
    read      artifact bytes from disk (a tar from the registry)         load_adapter (timings)
    digest    content digest of the artifact                             load_adapter
    parse     safetensors decode, key/shape/finite checks, scale fold    load_adapter
    range     serving-dtype range check                                  load_adapter
    stage     serving dtype, one pinned host buffer (CUDA)               LoRAManager._stage
    place     host work issuing the host->GPU copy into a slot           DeviceTier.place
    h2d       the copy itself, until its event completes                 DeviceSlots.load (side stream)

`cold_stages` runs them without a base model (a LoRAManager over the model's shapes), so the
8B shape (32 layers, rank 16 on all seven modules: an 84 MB PEFT dir) can be measured without
loading 16 GB of weights; bench_churn's end-to-end figure adds the admission wait and the forward.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time

import torch

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA3_8B_ARGS = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=None, max_position_embeddings=8192, tie_word_embeddings=False,
                      attention_bias=False, model_type="llama", torch_dtype="bfloat16", eos_token_id=[1],
                      bos_token_id=0)
STAGES = ("resolve_s", "download_s", "read_s", "digest_s", "parse_s", "verify_wait_s", "range_s", "stage_s", "place_s",
          "h2d_s")
# shown, not summed: part of read_s (the pinned block the file is read into, CUDA)
PARTS = ("pin_alloc_s",)


def write_peft_dir(path: str, shapes: dict[str, tuple[int, int]], num_layers: int, rank: int, seed: int,
                   dtype: torch.dtype = torch.bfloat16, alpha: float | None = None) -> str:
    """A random PEFT adapter dir, rank `rank` on all seven modules (alpha = 2r: a scale to fold).
    Made on the GPU when there is one (one draw per module for all layers: seconds less per adapter)."""
    import json

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    tensors = {}
    for m in ALL_MODULES:
        fan_in, fan_out = shapes[m]
        part = "self_attn" if m[0] in "qkvo" else "mlp"
        a = (torch.randn(num_layers, rank, fan_in, generator=g, device=dev) / fan_in ** 0.5).to(dtype).cpu()
        b = (torch.randn(num_layers, fan_out, rank, generator=g, device=dev) * 0.01).to(dtype).cpu()
        for layer in range(num_layers):
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a[layer], b[layer]
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2.0 * rank,
                   "target_modules": list(ALL_MODULES)}, f)
    return path


def registry_available() -> str | None:
    """None when the registry can run in this process, else why not (a missing package)."""
    try:
        import loraserve.registry.server  # noqa: F401 - sqlalchemy, alembic, grpc health/reflection
        import loraserve.registry.testing  # noqa: F401
        return None
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"


class RegistryProcess:
    """The registry as its own process on loopback (`loraserve registry serve`), as deployed: a
    registry thread in this process would share its GIL with the download it serves."""

    def __init__(self, data_dir: str, address: str | None = None, blob_port: int | None = 0):
        """address: host:port to serve on (a restart on the same port); None: a free port.
        blob_port: its --blob-port (the byte side channel of downloads); 0: a free port; None: off."""
        import socket

        def free_port() -> int:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return sock.getsockname()[1]

        if address is None:
            address = f"127.0.0.1:{free_port()}"
        self.address, self.data_dir, self.proc = address, data_dir, None
        self.blob_port = (blob_port or free_port()) if blob_port is not None else None

    def __enter__(self) -> "RegistryProcess":
        import subprocess
        import sys

        import grpc

        blob = ["--blob-port", str(self.blob_port)] if self.blob_port is not None else []
        self.proc = subprocess.Popen([sys.executable, "-m", "loraserve.cli", "registry", "serve", "--address",
                                      self.address, "--data-dir", self.data_dir, *blob],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            with grpc.insecure_channel(self.address) as ch:
                try:
                    grpc.channel_ready_future(ch).result(timeout=0.5)
                    return self
                except grpc.FutureTimeoutError:
                    pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace")[-800:] if self.proc.poll() is not None else ""
                self.__exit__()
                raise RuntimeError(f"the registry process did not start: {err}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:  # noqa: BLE001
                self.proc.kill()


class LoopThread:
    """An asyncio loop on its own thread, as the service runs one: an overlapped download keeps
    arriving (on the loop) while the caller's thread parses it (LoRAManager.resolve)."""

    def __init__(self):
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-loop", daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def start_registry(data_dir: str, as_process: bool = True):
    """(registry, what it is): on loopback as its own process, or a thread of this one if that
    cannot start (said so); stopped on exit."""
    reg, kind = None, "its own process"
    if as_process:
        try:
            reg = RegistryProcess(data_dir).__enter__()
        except Exception as exc:  # noqa: BLE001 - measured in-process instead, and said so
            print(f"registry process did not start ({exc}); using a registry thread in this process")
    if reg is None:
        from loraserve.registry.config import RegistryConfig
        from loraserve.registry.testing import RunningRegistry

        reg, kind = RunningRegistry(RegistryConfig(data_dir=data_dir)).start(), "a thread of this process"
    try:
        yield reg, kind
    finally:
        reg.__exit__(None, None, None)


def cold_stages(workdir: str, n: int, device: str, dtype: torch.dtype, num_layers: int = 32, rank: int = 16,
                args_overrides: dict | None = None, use_registry: bool = True, registry_process: bool = False,
                watch: bool = False, vary=None) -> dict:
    """Time every stage of n cold adapters (first one discarded as a warm-up of the code paths).
    Returns {stage: median seconds}, the per-adapter rows, the adapter's bytes and the source used.
    watch: each fetch + resolve inside a thread_watch.ThreadWatch (who ran, who held the GIL, gc), printed
    and kept in its row ("watch"). vary: variant specs (vary_context, e.g. ["switch_ms=0.5,gc=off"]): the measured
    adapters cycle through [defaults, *vary] (interleaved: drift hits each alike); each row names its "variant"."""
    from loraserve.config import LoraConfig, LoRARequest, PeftCacheConfig
    from loraserve.inference.lora.manager import LoRAManager
    from loraserve.inference.models.llama import ModelArgs
    from loraserve.inference.sequence import Sequence
    from loraserve.config import SamplingParams

    margs = ModelArgs(**dict(LLAMA3_8B_ARGS, num_hidden_layers=num_layers, **(args_overrides or {})))
    shapes = margs.lora_module_shapes()
    dev = torch.device(device)
    n += 1  # the first is a warm-up (imports, allocator, first-touch)
    paths = [write_peft_dir(os.path.join(workdir, f"stage-{i}"), shapes, num_layers, rank, 31_000 + i)
             for i in range(n)]
    size = sum(os.path.getsize(os.path.join(paths[0], f)) for f in os.listdir(paths[0]))
    why_not = registry_available() if use_registry else "not asked for"
    mgr = LoRAManager(LoraConfig(max_lora_rank=rank, max_loras=1, max_cpu_loras=n),
                      PeftCacheConfig(num_device_module_layer=2 * num_layers * len(ALL_MODULES)), margs, dtype, dev)
    if watch:
        from benchmarks.thread_watch import numa_report
        print("numa: " + numa_report(mgr.arena.base if mgr.arena is not None else None), flush=True)
    rows = []

    def one(i: int, f) -> None:
        """Resolve (parse + stage) adapter i, as fetched (None: from its dir), then time its slot copy."""
        path, digest, data = (f.path, f.digest, f.data) if f is not None else (paths[i], None, None)
        hold = mgr.resolve(LoRARequest(f"stage-{i}", i + 1, path, "hf"), trusted=f is not None, digest=digest,
                           data=data)
        seq = Sequence(f"stage-{i}", [1, 2, 3], SamplingParams(max_tokens=1), lora=hold)
        t0 = time.perf_counter()
        assert mgr.try_acquire(seq), "a slot must be free"
        ev = mgr.slots._pending
        if ev is not None:
            ev.synchronize()
        h2d = time.perf_counter() - t0
        _check_slot(mgr, hold.handle)
        row = dict(hold.handle.timings)
        row["h2d_s"] = h2d - row.get("place_s", 0.0)  # the copy's completion after its host-side issue
        if f is not None:  # (an overlapped download: its time from the handle, beside the parse)
            row.update(resolve_s=f.resolve_s, download_s=max(f.download_s, row.get("download_s", 0.0)))
        rows.append(row)
        mgr.release_slot(seq)
        mgr.release_request(seq)
        with mgr.lock:  # an idle slot for the next one (the device tier holds 2)
            mgr.device_tier.remove(hold.handle)

    kind = None
    if why_not is None:
        from loraserve.inference.adapter_source import AdapterFetcher
        from loraserve.registry.client import RegistryClient

        with start_registry(os.path.join(workdir, "stage-registry"), registry_process) as (reg, kind):
            with RegistryClient(reg.address) as client:
                for i, p in enumerate(paths):
                    client.push(p, f"stage-{i}", base_model="bench", chunk_size=1 << 20)
            # as the service: downloads land in the manager's pinned staging arena (CUDA)
            fetcher = AdapterFetcher(reg.address, os.path.join(workdir, "stage-cache"),
                                     stage_alloc=mgr.staging_alloc)
            loop = LoopThread()
            for i in range(n):  # the registry is idle between fetches, as at no load
                variant = ["", *(vary or [])][(i - 1) % (1 + len(vary or []))] if i else ""
                with (vary_context(variant) if variant else contextlib.nullcontext()), watching(watch) as w:
                    f = loop.run(fetcher.fetch(f"stage-{i}", 1))
                    one(i, f)
                rows[-1]["variant"] = variant
                if w is not None:
                    rows[-1]["watch"] = w.result()
                    print(f"  adapter {i}{' (' + variant + ')' if variant else ''}, ms: " + ", ".join(
                        f"{k.removesuffix('_s')} {rows[-1][k] * 1e3:.1f}" for k in STAGES if rows[-1].get(k, 0) > 5e-5)
                        + "\n" + w.summary(), flush=True)
                loop.run(fetcher.flush())  # its disk copy written before the next (no load)
            loop.run(fetcher.close())
            kind += "; " + blob_use(fetcher, n)
            loop.close()
    else:
        for i in range(n):
            one(i, None)
    mgr.shutdown()
    rows = rows[1:]
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in STAGES}
    for r in rows:  # an overlapped download (verify_wait_s: the parse ran beside it) is not on the critical path
        r["critical_s"] = sum(r.get(k, 0.0) for k in STAGES) - (r.get("download_s", 0.0) if "verify_wait_s" in r else 0.0)
    med["total_s"] = statistics.median(r["critical_s"] for r in rows)
    med["overlapped"] = all("verify_wait_s" in r for r in rows)
    med.update({k: statistics.median(r.get(k, 0.0) for r in rows) for k in PARTS})
    return {"stages": med, "rows": rows, "adapter_dir_bytes": size, "layers": num_layers, "rank": rank,
            "source": f"registry on loopback ({kind})" if why_not is None else f"local PEFT dir (no registry: {why_not})"}


@contextlib.contextmanager
def vary_context(spec: str):
    """Runtime toggles for an A/B of the cold path in one process: "switch_ms=0.5" (sys.setswitchinterval),
    "gc=off" (no collections inside), "gc=freeze" (gc.freeze() first: what exists now is never scanned),
    "omp=1" (torch.set_num_threads(1): no OpenMP workers anywhere), "streams=4" (blob connections),
    "diskcopy=0" (blob_source.DISK_COPY_AFTER_PARSE off: the disk copy written while the bytes arrive),
    "foldland=0" (staged.FOLD_ON_LANDING off: the scale folds on the parser's thread), "hashstep_kb=4096" (bytes
    per recv_into + sha256 step of a blob download: fewer GIL round trips), "spin=1" (a Python thread busy in
    bytecode meanwhile: what a GIL-holding neighbour, e.g. a busy event loop, costs the cold path),
    "dirty_mb=6000" (that much written to a file in the temp dir first and written back (fsync on a thread) during
    the block, as the kernel flushes a freshly written 16 GB checkpoint ~30 s later; the file is removed after)."""
    import gc
    import sys

    from loraserve.inference import blob_fetch

    opts = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    prev_switch, was_enabled = sys.getswitchinterval(), gc.isenabled()
    from loraserve.inference import blob_source

    prev_threads, prev_streams = torch.get_num_threads(), blob_fetch.BLOB_STREAMS
    from loraserve.adapters import staged as staged_mod

    prev_copy, prev_fold = blob_source.DISK_COPY_AFTER_PARSE, staged_mod.FOLD_ON_LANDING
    prev_step = blob_fetch._HASH_STEP
    if "hashstep_kb" in opts:
        blob_fetch._HASH_STEP = int(opts["hashstep_kb"]) << 10
    if "foldland" in opts:
        staged_mod.FOLD_ON_LANDING = opts["foldland"] != "0"
    if "diskcopy" in opts:
        blob_source.DISK_COPY_AFTER_PARSE = opts["diskcopy"] != "0"
    if "omp" in opts:
        torch.set_num_threads(int(opts["omp"]))
    if "streams" in opts:
        blob_fetch.BLOB_STREAMS = int(opts["streams"])
    if "switch_ms" in opts:
        sys.setswitchinterval(float(opts["switch_ms"]) / 1e3)
    if opts.get("gc") == "freeze":
        gc.freeze()
    if opts.get("gc") == "off":
        gc.disable()
    dirty = flusher = None
    spin_stop = None
    if opts.get("spin", "0") != "0":
        import threading

        spin_stop = threading.Event()

        def spin() -> None:
            x = 0
            while not spin_stop.is_set():
                for k in range(2000):
                    x += k * k
        threading.Thread(target=spin, name="spinner", daemon=True).start()
    if "dirty_mb" in opts:
        import tempfile

        fd, dirty = tempfile.mkstemp(prefix="cold-dirty-")
        block = b"\x5a" * (16 << 20)
        for _ in range(max(1, int(opts["dirty_mb"]) // 16)):
            os.write(fd, block)
        import threading

        # written back DURING the block (as the kernel's flusher does ~30 s after a big write): fsync on a thread
        flusher = threading.Thread(target=lambda: (os.fsync(fd), os.close(fd)), name="dirty-flush", daemon=True)
        flusher.start()
    try:
        yield
    finally:
        if spin_stop is not None:
            spin_stop.set()
        if dirty is not None:
            flusher.join(60)
            os.unlink(dirty)
        torch.set_num_threads(prev_threads)
        blob_fetch.BLOB_STREAMS = prev_streams
        blob_source.DISK_COPY_AFTER_PARSE, staged_mod.FOLD_ON_LANDING = prev_copy, prev_fold
        blob_fetch._HASH_STEP = prev_step
        sys.setswitchinterval(prev_switch)
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def watching(on: bool):
    """A thread_watch.ThreadWatch over the block when `on` (else None)."""
    if not on:
        yield None
        return
    from benchmarks.thread_watch import ThreadWatch

    with ThreadWatch() as w:
        yield w


def engine_beside(workdir: str, layers: int, device: str, sync: bool = False):
    """An LLM as bench_churn's cold phase builds it (8B width, `layers` layers on CUDA; the tiny test model on
    CPU), with a few requests run: the process state the cold path meets in the engine process."""
    from loraserve import LLM, LoraConfig, SamplingParams

    model_dir = os.path.join(workdir, "engine-model")
    if device == "cuda":
        from benchmarks.checkpoints import build_checkpoint
        build_checkpoint(model_dir, layers)
    else:
        from tests.inference.conftest import make_random_model
        make_random_model(model_dir, "llama")
    if sync:  # the checkpoint's dirty pages written back now, not during the cold path (--sync)
        t0 = time.perf_counter()
        os.sync()
        print(f"sync after the checkpoint: {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype="bfloat16" if device == "cuda" else "float32", device=device, max_num_seqs=8,
              lora_config=LoraConfig(max_lora_rank=16, max_loras=4), kv_cache_config={"free_gpu_memory_fraction": 0.3})
    for k in range(4):
        llm.generate([[3 + k] * 64], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    print(f"engine beside ({layers} layers, {device}): built and 4 requests in {time.perf_counter() - t0:.1f} s", flush=True)
    return llm


def blob_use(fetcher, n: int) -> str:
    """How the fetcher's n downloads came: over the registry's HTTP blob side channel or gRPC."""
    if fetcher.blob_downloads == 0 and fetcher.blob_fallbacks == 0:
        return "gRPC ranges"
    return (f"HTTP blob side channel: {fetcher.blob_downloads} of {n} downloads"
            + (f", {fetcher.blob_fallbacks} fell back to gRPC" if fetcher.blob_fallbacks else ""))


def _check_slot(mgr, h) -> None:
    """The slot holds the host copy's A and B (first and last (layer, module)): the copy is right."""
    for (layer, module) in (min(h.adapter.weights), max(h.adapter.weights)):
        a, b = h.adapter.weights[(layer, module)]
        proj, s, off = mgr.slots.slice_index[module]
        r = a.shape[0]
        assert torch.equal(mgr.slots.a[proj][layer, h.slot, s, :r].cpu(), a), (layer, module)
        assert torch.equal(mgr.slots.b[proj][layer, h.slot, off:off + b.shape[0], :r].cpu(), b), (layer, module)


def format_stages(result: dict) -> str:
    med = result["stages"]
    parts = [f"{k.removesuffix('_s')} {med[k] * 1e3:.1f}" for k in STAGES if med.get(k)]
    return (f"cold path stages ({result['adapter_dir_bytes'] / 1e6:.0f} MB PEFT dir, {result['layers']} layers, "
            f"rank {result['rank']}, {result['source']}), ms: " + ", ".join(parts)
            + f"; {'critical path (download beside read + parse)' if med.get('overlapped') else 'sum'} "
            + f"{med['total_s'] * 1e3:.1f}"
            + "".join(f" (of which {k.removesuffix('_s')} {med[k] * 1e3:.1f})" for k in PARTS if med.get(k)))


if __name__ == "__main__":
    import argparse
    import sys
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks.common import write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-registry", action="store_true")
    ap.add_argument("--registry-process", action="store_true", help="the registry as its own process (as deployed)")
    ap.add_argument("--watch", action="store_true", help="per fetch + resolve: who ran, who held the GIL, gc "
                    "(benchmarks/thread_watch.py)")
    ap.add_argument("--engine-layers", type=int, default=0,
                    help="first build an engine (8B width, this many layers; tiny on CPU) in this process, as "
                         "bench_churn's cold phase has one: its effect on the same stages")
    ap.add_argument("--sync", action="store_true", help="--engine-layers: os.sync() after writing its checkpoint")
    ap.add_argument("--vary", default="", help="variants (';'-separated) the adapters cycle through after the defaults: "
                    "runtime toggles (vary_context), e.g. "
                    "switch_ms=0.5,gc=off")
    ap.add_argument("--json")
    a = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="cold-path-")
    llm = engine_beside(workdir, a.engine_layers, a.device, a.sync) if a.engine_layers else None
    res = cold_stages(workdir, a.n, a.device, torch.bfloat16, a.layers,
                      use_registry=not a.no_registry, registry_process=a.registry_process, watch=a.watch,
                      vary=[v for v in a.vary.split(";") if v])
    print(format_stages(res) + (f" [an engine of {a.engine_layers} layers in this process]" if llm else ""))
    for r in res["rows"]:
        print(f"  row{' (' + r['variant'] + ')' if r.get('variant') else ''}, ms: " + ", ".join(
            f"{k.removesuffix('_s')} {r[k] * 1e3:.1f}" for k in ("critical_s",) + STAGES if r.get(k, 0) > 5e-5))
    for v in dict.fromkeys(r.get("variant", "") for r in res["rows"]):
        got = [r for r in res["rows"] if r.get("variant", "") == v]
        print(f"  median of {len(got)} ({v or 'defaults'}), ms: critical "
              f"{statistics.median(r['critical_s'] for r in got) * 1e3:.1f}, download "
              f"{statistics.median(r.get('download_s', 0) for r in got) * 1e3:.1f}, parse "
              f"{statistics.median(r.get('parse_s', 0) for r in got) * 1e3:.1f}")
    write_json(a.json, res)
