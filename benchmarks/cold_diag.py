"""Why is a cold adapter slow on this host? Diagnostics for the cold path (issue 12), in seconds.

The H200 run of 2026-11-30 measured parse 85 ms .. 1.94 s for the same 84 MB adapter (the CPU
CI box: ~30 ms) and a 0.4-0.5 GB/s registry download. This script separates the suspects:

  env       CPU count, affinity, cgroup CPU quota, torch's intra-op threads, GIL switch interval
  parse     load_adapter on the in-memory tar (as the fetcher hands it over): plain buffers vs
            pinned (LORASERVE_PINNED_READ's allocator), with a profile of the slowest run by function
  busy      the same parse while another Python thread spins (a GIL convoy: each torch op
            releases the GIL and waits up to sys.getswitchinterval() to get it back)
  threads1  the same parse with torch.set_num_threads(1) (OpenMP oversubscription)
  download  DownloadAdapter from a registry process on loopback at several chunk sizes: the raw
            stream, and AdapterFetcher.fetch (hash + keep in memory)

    python3 benchmarks/cold_diag.py --layers 32            # GPU host: the 8B shape (84 MB)
    python3 benchmarks/cold_diag.py --layers 2 --quick     # CPU: a check of the flow
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.cold_path import LLAMA3_8B_ARGS, RegistryProcess, write_peft_dir  # noqa: E402


def env_report() -> str:
    quota = "?"
    for p in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            quota = open(p).read().strip()
            break
        except OSError:
            pass
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    omp = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}
    return (f"env: cpu_count {os.cpu_count()}, affinity {aff}, cgroup cpu quota {quota!r}, torch threads "
            f"{torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), switchinterval "
            f"{sys.getswitchinterval() * 1e3:.0f} ms, {omp or 'no OMP env'}, torch {torch.__version__}, "
            f"config {torch.__config__.parallel_info().splitlines()[-1].strip() if hasattr(torch, '__config__') else ''}")


def make_artifact(workdir: str, layers: int) -> tuple[str, str, object, str]:
    from loraserve.adapters.bundle import Chunks, artifact_digest
    from loraserve.adapters.writer import pack_dir
    from loraserve.inference.models.llama import ModelArgs

    margs = ModelArgs(**dict(LLAMA3_8B_ARGS, num_hidden_layers=layers))
    d = write_peft_dir(os.path.join(workdir, "diag"), margs.lora_module_shapes(), layers, 16, 11)
    tar = str(pack_dir(d, os.path.join(workdir, "diag.tar"), "tar"))
    raw = open(tar, "rb").read()
    data = Chunks([raw[i:i + (1 << 20)] for i in range(0, len(raw), 1 << 20)])
    return d, tar, data, artifact_digest(tar)


def parse_once(tar: str, data, digest: str, alloc, profile: bool = False) -> tuple[dict, str]:
    from loraserve.adapters import load_adapter
    from loraserve.inference.lora.host_tier import timed_alloc

    timings: dict = {}
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    load_adapter(tar, serving_dtype=torch.bfloat16, timings=timings, digest=digest, data=data,
                 alloc=timed_alloc(alloc, timings))
    if prof:
        prof.disable()
    timings["total_s"] = time.perf_counter() - t0
    text = ""
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(8)
        lines = s.getvalue().splitlines()
        head = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
        text = "\n".join(ln for ln in lines[head:] if ln.strip())
    return timings, text


def fmt(t: dict) -> str:
    return ", ".join(f"{k.removesuffix('_s')} {v * 1e3:.1f}" for k, v in t.items() if v)


def parse_section(label: str, tar: str, data, digest: str, alloc, reps: int) -> list[dict]:
    rows = [parse_once(tar, data, digest, alloc)[0] for _ in range(reps)]
    print(f"parse [{label}] ms per run: " + " | ".join(fmt(r) for r in rows), flush=True)
    return rows


class Spinner:
    """A Python thread that never blocks (holds the GIL whenever it runs)."""

    def __enter__(self):
        self.stop = False

        def spin():
            x = 0
            while not self.stop:
                x += 1
        self.t = threading.Thread(target=spin, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()


def download_section(workdir: str, d: str, chunks: list[int], reps: int) -> None:
    """Raw stream (no hashing) and AdapterFetcher.fetch at each chunk size; the registry process is
    started with its chunk cap raised to the largest asked for."""
    import grpc

    from loraserve.registry.client import RegistryClient
    from loraserve.v1 import registry_pb2 as pb
    from loraserve.v1 import registry_pb2_grpc

    os.environ["LORASERVE_REGISTRY_MAX_CHUNK"] = str(max(chunks))  # inherited by the registry process
    with RegistryProcess(os.path.join(workdir, "diag-registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(d, "diag", base_model="bench", chunk_size=1 << 20)

        async def raw(chunk: int, extra=()) -> tuple[float, int, int]:
            async with grpc.aio.insecure_channel(reg.address, options=[
                    ("grpc.max_receive_message_length", 16 << 20), *extra]) as ch:
                stub = registry_pb2_grpc.RegistryServiceStub(ch)
                await stub.GetAdapter(pb.GetAdapterRequest(name="diag", version=1))  # connected
                t0, n, msgs = time.perf_counter(), 0, 0
                async for m in stub.DownloadAdapter(pb.DownloadAdapterRequest(name="diag", version=1,
                                                                              chunk_size=chunk)):
                    if m.WhichOneof("payload") == "chunk":
                        n += len(m.chunk)
                        msgs += 1
                return time.perf_counter() - t0, n, msgs

        loop = asyncio.new_event_loop()
        frame, ahead = ("grpc.http2.max_frame_size", (16 << 20) - 1), ("grpc.http2.lookahead_bytes", 64 << 20)
        for chunk in chunks:
            for extra in ([], [frame], [frame, ahead]):
                got = [loop.run_until_complete(raw(chunk, extra)) for _ in range(reps)]
                n, msgs = got[0][1], got[0][2]
                print(f"download raw, chunk {chunk >> 10} KiB ({msgs} messages, {n / 1e6:.0f} MB), client options "
                      f"{[k.split('.')[-1] for k, _ in extra]}: ms " + ", ".join(f"{g[0] * 1e3:.0f}" for g in got)
                      + f"  = {n / min(g[0] for g in got) / 1e9:.2f} GB/s best", flush=True)
        with grpc.insecure_channel(reg.address, options=[("grpc.max_receive_message_length", 16 << 20)]) as ch:
            stub = registry_pb2_grpc.RegistryServiceStub(ch)
            stub.GetAdapter(pb.GetAdapterRequest(name="diag", version=1))
            t0 = time.perf_counter()
            n = sum(len(m.chunk) for m in stub.DownloadAdapter(pb.DownloadAdapterRequest(
                name="diag", version=1, chunk_size=chunks[-1])))
            print(f"download raw, sync (not aio) stub, chunk {chunks[-1] >> 10} KiB: "
                  f"{(time.perf_counter() - t0) * 1e3:.0f} ms ({n / 1e6:.0f} MB)", flush=True)
        from loraserve.inference import adapter_source

        for chunk in chunks:
            adapter_source.DOWNLOAD_CHUNK = chunk
            times = []
            for k in range(reps):
                fetcher = adapter_source.AdapterFetcher(reg.address, os.path.join(workdir, f"diag-cache-{chunk}-{k}"))
                f = loop.run_until_complete(fetcher.fetch("diag", 1))
                times.append((f.resolve_s, f.download_s))
                loop.run_until_complete(fetcher.close())
            print(f"fetch (resolve + download + sha256), chunk {chunk >> 10} KiB: ms "
                  + ", ".join(f"{r * 1e3:.0f}+{dl * 1e3:.0f}" for r, dl in times), flush=True)
        loop.close()


def fetch_sweep(workdir: str, d: str, combos: list[tuple[int, int, str]], reps: int, raw_transport: bool = False
                ) -> list[dict]:
    """AdapterFetcher.fetch (resolve + download + sha256, bytes kept in memory) from a registry process
    on loopback, for each (parallel streams, range bytes); 1 stream = the single DownloadAdapter stream."""
    from loraserve.inference import adapter_source, ranged_download
    from loraserve.registry.client import RegistryClient

    rows = []
    with RegistryProcess(os.path.join(workdir, "sweep-registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(d, "diag", base_model="bench", chunk_size=1 << 20)
        loop = asyncio.new_event_loop()
        for streams, range_bytes, flags in combos:
            raw, whole_hash = "r" in flags, "w" in flags
            ranged_download.DOWNLOAD_STREAMS, ranged_download.RANGE_BYTES = streams, range_bytes
            ranged_download.DOWNLOAD_RAW, adapter_source.RANGE_CHECKS = raw, not whole_hash
            got = []
            for k in range(reps + 1):  # the first: connection set-up and warm-up, not counted
                fetcher = adapter_source.AdapterFetcher(reg.address, os.path.join(workdir, f"sweep-{streams}-{range_bytes}-{flags}-{k}"))
                f = loop.run_until_complete(fetcher.fetch("diag", 1))
                loop.run_until_complete(fetcher.close())
                got.append((f.resolve_s, f.download_s))
            got = got[1:]
            best = min(dl for _, dl in got)
            rows.append(dict(streams=streams, range_mib=range_bytes >> 20, flags=flags, download_s=[dl for _, dl in got],
                             resolve_s=[r for r, _ in got]))
            print(f"fetch {streams} stream(s) x {range_bytes >> 20} MiB ranges{', raw split' if raw else ''}"
                  f"{', whole-artifact hash' if whole_hash else ''}: "
                  f"resolve+download ms "
                  + ", ".join(f"{r * 1e3:.0f}+{dl * 1e3:.0f}" for r, dl in got)
                  + f"  ({os.path.getsize(os.path.join(d, 'adapter_model.safetensors')) / best / 1e9:.2f} GB/s best)",
                  flush=True)
        if raw_transport:
            _raw_transport(loop, reg.address)
        loop.close()
    return rows


def blob_sweep(workdir: str, d: str, streams: list[int], reps: int) -> None:
    """AdapterFetcher.fetch until the bytes verified, from a registry process on loopback: the gRPC ranges
    (LORASERVE_BLOB_HTTP=0) vs the HTTP blob side channel with `streams` connections (blob_fetch.py), landing
    in a pinned arena block on CUDA (as the engine's staging), plain memory on CPU. ms per fetch."""
    from loraserve.adapters.archives import StagedArtifact
    from loraserve.inference import adapter_source, blob_fetch
    from loraserve.registry.client import RegistryClient

    stage_alloc = None
    if torch.cuda.is_available():
        from loraserve.inference.lora.pinned_arena import PinnedArena

        arena = PinnedArena(256 << 20, [])

        def stage_alloc(n: int):
            block = arena.alloc(n)
            return None if block is None else StagedArtifact(block, block, arena.release)
    size = os.path.getsize(os.path.join(d, "adapter_model.safetensors"))
    _hash_rates(size)
    with RegistryProcess(os.path.join(workdir, "blob-registry")) as reg:
        with RegistryClient(reg.address) as client:
            client.push(d, "diag", base_model="bench", chunk_size=1 << 20)
        loop = asyncio.new_event_loop()
        for mode in [0, *streams]:
            blob_fetch.BLOB_HTTP, blob_fetch.BLOB_STREAMS = mode > 0, max(1, mode)
            got = []
            for k in range(reps + 1):  # the first: connection set-up and warm-up, not counted
                fetcher = adapter_source.AdapterFetcher(reg.address, os.path.join(workdir, f"blob-{mode}-{k}"),
                                                        stage_alloc=stage_alloc)
                t0 = time.perf_counter()
                f = loop.run_until_complete(fetcher.fetch("diag", 1))
                if isinstance(f.data, StagedArtifact):
                    loop.run_until_complete(asyncio.to_thread(f.data.wait_verified))
                got.append((f.resolve_s, time.perf_counter() - t0 - f.resolve_s))
                if isinstance(f.data, StagedArtifact):
                    f.data.release()
                loop.run_until_complete(fetcher.close())
            got = got[1:]
            print(f"fetch {'gRPC ranges' if mode == 0 else f'HTTP blob, {mode} connections'}: resolve+download ms "
                  + ", ".join(f"{r * 1e3:.1f}+{dl * 1e3:.1f}" for r, dl in got)
                  + f"  ({size / min(dl for _, dl in got) / 1e9:.2f} GB/s best)", flush=True)
        loop.close()


def resolve_probe(workdir: str, n: int = 30) -> None:
    """Where a cold adapter's resolve goes: GetAdapter(blob_url) round trips to a registry process on loopback
    (one aio channel, each {name, version} asked once, as cold adapters are) vs the registry's own lookup
    (RegistryService.get on the same database, in this process). ms, median and max."""
    import statistics

    import grpc

    from loraserve.registry.client import RegistryClient
    from loraserve.registry.config import RegistryConfig
    from loraserve.registry.service import RegistryService
    from loraserve.v1 import registry_pb2 as pb
    from loraserve.v1 import registry_pb2_grpc

    shapes = {m: (256, 256) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    data = os.path.join(workdir, "resolve-registry")
    with RegistryProcess(data) as reg:
        with RegistryClient(reg.address) as client:
            for i in range(2 * n):
                client.push(write_peft_dir(os.path.join(workdir, f"r{i}"), shapes, 1, 4, i), f"r{i}", base_model="b")

        async def rtts(names: list[str]) -> list[float]:
            async with grpc.aio.insecure_channel(reg.address) as ch:
                stub = registry_pb2_grpc.RegistryServiceStub(ch)
                await stub.GetAdapter(pb.GetAdapterRequest(name="r0", version=1))  # (connect)
                out = []
                for name in names:
                    t0 = time.perf_counter()
                    await stub.GetAdapter(pb.GetAdapterRequest(name=name, version=1, blob_url=True), timeout=10)
                    out.append(time.perf_counter() - t0)
                return out
        first = asyncio.run(rtts([f"r{i}" for i in range(1, n)]))
        again = asyncio.run(rtts([f"r{i}" for i in range(1, n)]))
        service = RegistryService.open(RegistryConfig(data_dir=data))
        local = []
        for i in range(n, 2 * n):
            t0 = time.perf_counter()
            service.get(f"r{i}", 1)
            local.append(time.perf_counter() - t0)
        service.close()
    for label, ts in (("GetAdapter(blob_url) round trip, first ask", first), ("... asked again", again),
                      ("RegistryService.get in this process", local)):
        print(f"{label}: ms median {statistics.median(ts) * 1e3:.2f}, max {max(ts) * 1e3:.2f}", flush=True)


def _hash_rates(size: int) -> None:
    """sha256 of `size` bytes on 1, 4, 8 and 16 threads at once (each its share): the floor of the check."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    data = memoryview(bytearray(os.urandom(1 << 20)) * (size >> 20))
    parts = []
    for n in (1, 4, 8, 16):
        share = -(-len(data) // n)
        with ThreadPoolExecutor(n) as pool:
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                list(pool.map(lambda i: hashlib.sha256(data[i * share:(i + 1) * share]).digest(), range(n)))
                best = min(best, time.perf_counter() - t0)
        parts.append(f"{n} thread(s) {best * 1e3:.1f}")
    print(f"sha256 of {len(data) / 1e6:.0f} MB, ms: " + ", ".join(parts), flush=True)


def _raw_transport(loop, address: str) -> None:
    """The transport alone, no hashing: the artifact as `streams` equal ranges at once, responses decoded
    by protobuf (as the fetcher) or kept as raw bytes (the ceiling without the decode copies)."""
    import grpc

    from loraserve.v1 import registry_pb2 as pb
    from loraserve.v1 import registry_pb2_grpc

    opts = [("grpc.max_receive_message_length", 16 << 20), ("grpc.http2.max_frame_size", (16 << 20) - 1)]

    async def run(raw: bool, streams: int) -> float:
        async with grpc.aio.insecure_channel(address, options=opts) as ch:
            meta = (await registry_pb2_grpc.RegistryServiceStub(ch).GetAdapter(
                pb.GetAdapterRequest(name="diag", version=1))).adapter
            call = ch.unary_stream("/loraserve.v1.RegistryService/DownloadAdapter",
                                   request_serializer=pb.DownloadAdapterRequest.SerializeToString,
                                   response_deserializer=(lambda b: b) if raw else pb.DownloadAdapterResponse.FromString)
            size = meta.size_bytes
            per = -(-size // streams)

            async def one(off: int, n: int) -> None:
                async for _ in call(pb.DownloadAdapterRequest(name="diag", version=1, chunk_size=1 << 20,
                                                              offset=off, length=n)):
                    pass
            t0 = time.perf_counter()
            await asyncio.gather(*[one(o, min(per, size - o)) for o in range(0, size, per)])
            return time.perf_counter() - t0

    for raw in (False, True):
        for streams in (1, 4, 8):
            ts = [loop.run_until_complete(run(raw, streams)) for _ in range(3)]
            print(f"transport only, {'raw bytes' if raw else 'protobuf decode'}, {streams} equal range(s): ms "
                  + ", ".join(f"{t * 1e3:.0f}" for t in ts), flush=True)


def parse_ab(tar: str, digest: str, reps: int) -> None:
    """The engine's parse of a download staged in memory (StagedArtifact, values_verified, one CPU thread
    as LoRAManager._parse) with the scale folds inline vs on 4 threads: ms per run, median."""
    import statistics

    from loraserve.adapters import adapter as adapter_mod
    from loraserve.adapters import load_adapter
    from loraserve.adapters.archives import StagedArtifact
    from loraserve.adapters.threads import one_cpu_thread

    raw = open(tar, "rb").read()
    pin = torch.cuda.is_available()
    buf = torch.empty(len(raw), dtype=torch.uint8, pin_memory=pin)
    for threads in (1, 4, 1, 4):
        adapter_mod._FOLD_THREADS = threads
        got = []
        for _ in range(reps):
            buf.numpy()[:] = memoryview(raw)  # each parse folds in place: fresh bytes each time
            timings: dict = {}
            with one_cpu_thread():
                load_adapter(tar, serving_dtype=torch.bfloat16, timings=timings, digest=digest,
                             data=StagedArtifact(buf), values_verified=True)
            got.append(timings)
        print(f"parse of a staged download (pinned {pin}), fold threads {threads}: ms median read "
              f"{statistics.median(t['read_s'] for t in got) * 1e3:.1f}, parse "
              f"{statistics.median(t['parse_s'] for t in got) * 1e3:.1f} (runs "
              + ", ".join(f"{t['parse_s'] * 1e3:.0f}" for t in got) + ")", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer runs (a check of the flow)")
    ap.add_argument("--no-download", action="store_true")
    ap.add_argument("--fetch-sweep", action="store_true",
                    help="only the fetch sweep over parallel ranged streams (streams x range MiB)")
    ap.add_argument("--combos", default="1x8,2x8,4x8,4x4,8x4,8x2",
                    help="--fetch-sweep: streams x range MiB, comma separated; suffixes: r responses split raw, "
                         "w the whole-artifact hash (no range digests)")
    ap.add_argument("--raw-transport", action="store_true", help="--fetch-sweep: also the transport alone")
    ap.add_argument("--resolve-probe", action="store_true", help="only GetAdapter round trips vs the registry's lookup")
    ap.add_argument("--blob-sweep", default="", metavar="N,N,...",
                    help="only the download: gRPC ranges vs the HTTP blob side channel with N connections")
    ap.add_argument("--parse-ab", action="store_true", help="only the staged parse, folds inline vs threaded")
    a = ap.parse_args()
    if a.parse_ab:
        workdir = tempfile.mkdtemp(prefix="cold-diag-")
        _, tar, data, digest = make_artifact(workdir, a.layers)
        print(f"parse A/B: {len(data) / 1e6:.0f} MB tar ({a.layers} layers)", flush=True)
        parse_ab(tar, digest, a.reps)
        return 0
    if a.resolve_probe:
        resolve_probe(tempfile.mkdtemp(prefix="cold-diag-"))
        return 0
    if a.blob_sweep:
        workdir = tempfile.mkdtemp(prefix="cold-diag-")
        d, _, data, _ = make_artifact(workdir, a.layers)
        print(f"blob sweep: {len(data) / 1e6:.0f} MB tar ({a.layers} layers, rank 16, 7 modules)", flush=True)
        blob_sweep(workdir, d, [int(x) for x in a.blob_sweep.split(",")], 1 if a.quick else a.reps)
        return 0
    if a.fetch_sweep:
        workdir = tempfile.mkdtemp(prefix="cold-diag-")
        d, _, data, _ = make_artifact(workdir, a.layers)
        print(f"fetch sweep: {len(data) / 1e6:.0f} MB tar ({a.layers} layers, rank 16, 7 modules)", flush=True)
        combos = [(int(c.split("x")[0]), int(c.split("x")[1].rstrip("rw")) << 20, c.split("x")[1].lstrip("0123456789"))
                  for c in a.combos.split(",")]
        fetch_sweep(workdir, d, combos, 1 if a.quick else a.reps, raw_transport=a.raw_transport)
        return 0
    reps = 1 if a.quick else a.reps
    print(env_report(), flush=True)
    workdir = tempfile.mkdtemp(prefix="cold-diag-")
    t = time.perf_counter()
    d, tar, data, digest = make_artifact(workdir, a.layers)
    print(f"artifact: {len(data) / 1e6:.0f} MB tar ({a.layers} layers, rank 16, 7 modules)  [{time.perf_counter() - t:.1f} s]")
    from loraserve.inference.lora.host_tier import one_cpu_thread, pinned_bytes

    allocs = [("plain", None)]
    if torch.cuda.is_available():
        from loraserve.inference.lora.pinned_arena import PinnedArena

        t = time.perf_counter()
        arena = PinnedArena(1 << 30, [])
        print(f"PinnedArena of 1 GiB allocated in {(time.perf_counter() - t) * 1e3:.0f} ms", flush=True)

        def from_arena(n: int) -> torch.Tensor:  # each parse gives its block back at once (reused next time)
            block = arena.alloc(n)
            arena.release(block)
            return block
        allocs += [("pinned", pinned_bytes), ("arena", from_arena)]
    last = allocs[-1]
    parse_once(tar, data, digest, None)  # warm-up (imports, first-touch)
    with one_cpu_thread():  # LoRAManager's default first, then torch's threads as they are
        for label, alloc in allocs:
            parse_section(f"{label}, one_cpu_thread ({torch.get_num_threads()} thread)", tar, data, digest, alloc,
                          reps)
    for label, alloc in allocs:
        parse_section(label, tar, data, digest, alloc, reps)
    with one_cpu_thread(), Spinner():
        parse_section(f"{last[0]}, one_cpu_thread, a spinning Python thread", tar, data, digest, last[1], 1)
    print(f"after the block: torch threads {torch.get_num_threads()}")
    if not a.no_download:
        try:
            download_section(workdir, d, [1 << 20, 4 << 20] if not a.quick else [1 << 20], 1 if a.quick else 2)
        except Exception as exc:  # noqa: BLE001 - the parse figures above still stand
            print(f"download section failed: {type(exc).__name__}: {exc}")
    _, text = parse_once(tar, data, digest, last[1], profile=True)
    print(f"profile of one parse [{last[0]}, torch's threads] by own time:\n{text}", flush=True)
    with Spinner():
        parse_section(f"{last[0]}, a spinning Python thread", tar, data, digest, last[1], 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
