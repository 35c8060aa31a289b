"""The reliability suite of issue 9, against real servers on loopback (the embedded default
model on CPU, a registry on SQLite, real gRPC and HTTP), printing its figures:

    python scripts/soak.py            # `make soak`: the issue's sizes, minutes
    python scripts/soak.py --quick    # seconds; tests/reliability/test_soak.py runs it in `make test`

* fuzz: randomized GenerateRequests and OpenAI HTTP bodies (extreme sampling values, bad token
  ids, empty and huge prompts, bad adapter references, wrong JSON types, NaN/Infinity, garbage);
  counts of each status; no INTERNAL/UNKNOWN/5xx, the server never dies, its RSS stays flat.
* soak: waves of concurrent streams over registry adapters and lora_path adapters, 30% cancelled
  (deadlines of 1-100 ms, cancels before the first chunk, after it, mid-decode); afterwards
  nothing running, waiting, pinned or held, free KV == total, the engine alive and serving.
* faults: the registry SIGSTOPped while serving (no call outlives its deadline; the base model
  and lora_path adapters keep serving), and SIGKILLed mid-upload N times (no half adapter, no
  acknowledged version lost, SQLite intact).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import random
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.adapters.testing import make_peft_adapter
from loraserve.registry.client import RegistryClient
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from loraserve.v1 import registry_pb2 as rpb

from .fuzz_cases import random_generate_request, random_http_call
from .soak_servers import (TRAINED_ADAPTERS, Zygote, free_port, http_request, inference_ports, launch_inference,
                           make_broken_adapters, make_default_adapter, sqlite_integrity)

BAD_GRPC = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "NO_COMPLETE"}


@dataclasses.dataclass
class Sizes:
    fuzz_grpc: int
    fuzz_http: int
    streams: int
    soak_seconds: float          # waves of `streams` until this much time passed (at least one)
    kills: int
    stop_requests: int


SOAK = Sizes(fuzz_grpc=6000, fuzz_http=4000, streams=256, soak_seconds=180, kills=100, stop_requests=48)
QUICK = Sizes(fuzz_grpc=240, fuzz_http=160, streams=24, soak_seconds=0, kills=2, stop_requests=12)


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []   # (section, figure, value)
        self.checks: list[tuple[str, bool, str]] = []

    def figure(self, section: str, name: str, value: object) -> None:
        self.rows.append((section, name, str(value)))
        print(f"  [{section}] {name}: {value}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append((name, bool(ok), detail))
        print(f"  {'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def table(self) -> str:
        w = max(len(n) for _, n, _ in self.rows) if self.rows else 10
        lines = ["", "=" * 100, "loraserve reliability suite: figures", "-" * 100]
        section = None
        for sec, name, value in self.rows:
            if sec != section:
                lines.append(f"{sec}")
                section = sec
            lines.append(f"  {name:<{w}}  {value}")
        lines += ["-" * 100, "checks"]
        lines += [f"  {'PASS' if ok else 'FAIL'}  {name}{'  (' + d + ')' if d and not ok else ''}"
                  for name, ok, d in self.checks]
        passed = sum(ok for _, ok, _ in self.checks)
        lines += ["-" * 100, f"{passed}/{len(self.checks)} checks passed", "=" * 100]
        return "\n".join(lines)


@dataclasses.dataclass
class Stack:
    root: Path
    registry: object
    registry_address: str
    inference: object
    address: str
    http_port: int
    allowed: Path
    registry_names: list[str]
    local_adapters: list[str]
    broken_adapters: list[str]


def build_stack(root: Path, zygote: Zygote) -> Stack:
    allowed = root / "allowed"
    local = [str(make_default_adapter(allowed / f"local-{i}", seed=100 + i, r=(4, 8)[i % 2])) for i in range(3)]
    broken = [str(p) for p in make_broken_adapters(allowed)]
    config = root / "serve.yaml"
    # few host/GPU slots for the adapters in play: the soak churns the tiers, not just the KV cache
    config.write_text("registry_timeout_s: 5\nmax_queue_size: 4096\n"
                      "lora_config:\n  max_lora_rank: 16\n  max_loras: 4\n  max_cpu_loras: 8\n")
    reg_port = free_port()  # known in advance: the inference server loads while the registry fills
    inference = launch_inference(f"127.0.0.1:{reg_port}", allowed, root / "cache", config)
    try:
        registry, reg_addr = zygote.start_registry(root / "registry", reg_port)
        names = []
        with RegistryClient(reg_addr) as client:
            for trained in sorted(TRAINED_ADAPTERS.iterdir()):
                client.push(str(trained), trained.name, base_model="default")
                names.append(trained.name)
            for i in range(6):
                mods = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                        ("gate_proj", "up_proj", "down_proj"))[i % 3]
                client.push(str(make_default_adapter(root / "src" / f"rand-{i}", seed=i, r=(4, 8, 16)[i % 3],
                                                     modules=mods)), f"rand-{i}", base_model="default")
                names.append(f"rand-{i}")
        address, http_port = inference_ports(inference)
    except BaseException:
        inference.stop()
        raise
    return Stack(root, registry, reg_addr, inference, address, http_port, allowed, names, local, broken)


async def stats_when_idle(stub, wait_s: float = 20.0):
    """GetServerStats once nothing is running, waiting, streaming or pinned (or after wait_s)."""
    deadline = time.time() + wait_s
    while True:
        s = await stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10)
        idle = (s.running_requests, s.waiting_requests, s.active_streams, s.device_slots_pinned) == (0, 0, 0, 0)
        if idle or time.time() > deadline:
            return s
        await asyncio.sleep(0.1)


async def check_idle_and_alive(stack: Stack, stub, channel, report: Report, section: str) -> None:
    s = await stats_when_idle(stub)
    loaded = await stub.ListLoadedAdapters(pb.ListLoadedAdaptersRequest(), timeout=10)
    holds = sum(a.active_requests for a in loaded.adapters)
    report.figure(section, "after: running/waiting/streams/pinned/holds",
                  f"{s.running_requests}/{s.waiting_requests}/{s.active_streams}/{s.device_slots_pinned}/{holds}")
    report.figure(section, "after: free KV blocks / total", f"{s.free_kv_blocks}/{s.total_kv_blocks}")
    report.check(f"{section}: nothing left running, waiting, streaming, pinned or held",
                 (s.running_requests, s.waiting_requests, s.active_streams, s.device_slots_pinned, holds) ==
                 (0, 0, 0, 0, 0))
    report.check(f"{section}: free KV == total", s.free_kv_blocks == s.total_kv_blocks,
                 f"{s.free_kv_blocks}/{s.total_kv_blocks}")
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7, 8]), adapter_ref=pb.AdapterRef(
        name=stack.registry_names[0]), sampling_params=pb.SamplingParams(max_tokens=4, ignore_eos=True))
    last = [m async for m in stub.Generate(req, timeout=60)][-1]
    report.check(f"{section}: engine alive (health SERVING, an adapter request completes)",
                 stack.inference.alive and health.status == health_pb2.HealthCheckResponse.SERVING
                 and last.complete.completion_tokens == 4)


# ---- fuzz ---------------------------------------------------------------------------------------
async def run_grpc_call(stub, req: pb.GenerateRequest, timeout: float) -> str:
    try:
        complete = False
        async for msg in stub.Generate(req, timeout=timeout):
            complete = complete or msg.WhichOneof("response") == "complete"
        return "OK" if complete else "NO_COMPLETE"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def fuzz(stack: Stack, stub, sizes: Sizes, report: Report, rng: random.Random) -> None:
    sem = asyncio.Semaphore(32)
    grpc_codes: Counter = Counter()
    http_codes: Counter = Counter()
    samples: dict[str, str] = {}

    async def one_grpc(i: int) -> None:
        req = random_generate_request(rng, stack)
        async with sem:
            code = await run_grpc_call(stub, req, timeout=rng.choice((1.0, 3.0, 3.0)))
        grpc_codes[code] += 1
        if code in BAD_GRPC:
            samples.setdefault(code, str(req)[:400])

    async def one_http(i: int) -> None:
        method, path, body = random_http_call(rng, stack)
        async with sem:
            status, answer = await http_request(stack.http_port, method, path, body, timeout=5.0)
        if status == 200 and b'"server_error"' in answer:
            status = "200+in-stream 5xx"
        http_codes[status] += 1
        if status not in (200, 400, 401, 403, 404, 405, 409, 413, 422, 429, 503, "client-timeout"):
            samples.setdefault(f"http {status}", (body or b"")[:300].decode("utf-8", "replace")
                               + " -> " + answer[:300].decode("utf-8", "replace"))

    rss_before = stack.inference.rss_mb()
    t0 = time.time()
    jobs = [one_grpc(i) for i in range(sizes.fuzz_grpc)] + [one_http(i) for i in range(sizes.fuzz_http)]
    rng.shuffle(jobs)
    await asyncio.gather(*jobs)
    took = time.time() - t0
    rss_after = stack.inference.rss_mb()
    report.figure("fuzz", "gRPC GenerateRequests", f"{sizes.fuzz_grpc} in {took:.0f} s (with HTTP)")
    report.figure("fuzz", "gRPC status codes", dict(sorted(grpc_codes.items(), key=lambda kv: -kv[1])))
    report.figure("fuzz", "HTTP requests", sizes.fuzz_http)
    report.figure("fuzz", "HTTP statuses", dict(sorted(http_codes.items(), key=lambda kv: -kv[1], )))
    report.figure("fuzz", "inference RSS MB before -> after", f"{rss_before:.0f} -> {rss_after:.0f}")
    for k, v in samples.items():
        report.figure("fuzz", f"example {k}", v.replace("\n", " "))
    bad = sum(grpc_codes[c] for c in BAD_GRPC)
    report.check("fuzz: zero INTERNAL/UNKNOWN/DATA_LOSS or unfinished gRPC streams", bad == 0,
                 f"{bad} bad: {dict((c, grpc_codes[c]) for c in BAD_GRPC if grpc_codes[c])}")
    bad_http = sum(n for s, n in http_codes.items() if isinstance(s, str) and s != "client-timeout"
                   or isinstance(s, int) and s >= 500 and s != 503)
    report.check("fuzz: zero HTTP 5xx (but 503) or broken answers", bad_http == 0, f"{bad_http} bad")
    report.check("fuzz: inference process alive", stack.inference.alive)
    report.check("fuzz: RSS roughly flat (growth < 30% + 64 MB)", rss_after <= rss_before * 1.3 + 64,
                 f"{rss_before:.0f} -> {rss_after:.0f} MB")


# ---- soak: concurrent streams, 30% cancelled ------------------------------------------------------
async def soak_stream(stub, stack: Stack, rng: random.Random) -> str:
    kind = rng.random()
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[rng.randrange(2, 4096) for _ in range(rng.randrange(1, 48))]),
                             sampling_params=pb.SamplingParams(max_tokens=rng.randrange(4, 40), ignore_eos=True,
                                                               temperature=rng.choice((0.0, 0.7, 1.0))))
    if kind < 0.6:
        req.adapter_ref.name = rng.choice(stack.registry_names)
    elif kind < 0.85:
        i = rng.randrange(len(stack.local_adapters))
        req.lora_request.CopyFrom(pb.LoraRequest(lora_name=f"local-{i}", lora_int_id=1000 + i,
                                                 lora_path=stack.local_adapters[i]))
    fate = rng.random()
    if fate < 0.7:
        mode, timeout = "complete", 300.0
    else:
        mode = rng.choice(("deadline", "cancel-early", "cancel-after-first", "cancel-mid-decode"))
        timeout = rng.uniform(0.001, 0.1) if mode == "deadline" else 300.0
    call = stub.Generate(req, timeout=timeout)
    chunks = 0
    try:
        if mode == "cancel-early":  # queued / resolving / loading, before any output
            await asyncio.sleep(rng.uniform(0, 0.03))
            call.cancel()
        async for msg in call:
            if msg.WhichOneof("response") == "complete":
                if msg.complete.completion_tokens != req.sampling_params.max_tokens:
                    return "WRONG_LENGTH"
                return "OK"
            chunks += 1
            if mode == "cancel-after-first" or (mode == "cancel-mid-decode" and chunks >= rng.randrange(2, 6)):
                call.cancel()
        return "NO_COMPLETE"
    except asyncio.CancelledError:
        return "CANCELLED"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def soak(stack: Stack, stub, channel, sizes: Sizes, report: Report, rng: random.Random) -> None:
    outcomes: Counter = Counter()
    waves, t0 = 0, time.time()
    rss_before = stack.inference.rss_mb()
    while waves == 0 or time.time() - t0 < sizes.soak_seconds:
        results = await asyncio.gather(*(soak_stream(stub, stack, rng) for _ in range(sizes.streams)))
        outcomes.update(results)
        waves += 1
    took = time.time() - t0
    report.figure("soak", "streams", f"{waves} waves x {sizes.streams} concurrent = {waves * sizes.streams} "
                                     f"in {took:.0f} s")
    report.figure("soak", "outcomes", dict(sorted(outcomes.items(), key=lambda kv: -kv[1])))
    report.figure("soak", "inference RSS MB before -> after", f"{rss_before:.0f} -> {stack.inference.rss_mb():.0f}")
    unexpected = {k: v for k, v in outcomes.items()
                  if k not in ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")}
    report.check("soak: every stream completed whole, was cancelled or hit its deadline", not unexpected,
                 str(unexpected))
    await check_idle_and_alive(stack, stub, channel, report, "soak")


# ---- faults: registry SIGSTOP while serving ------------------------------------------------------
async def registry_stopped(stack: Stack, stub, channel, sizes: Sizes, report: Report, rng: random.Random) -> None:
    async def timed(req: pb.GenerateRequest, deadline: float) -> tuple[str, float, float]:
        t = time.time()
        code = await run_grpc_call(stub, req, deadline)
        return code, time.time() - t, deadline

    def request(kind: str) -> pb.GenerateRequest:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[rng.randrange(2, 4096) for _ in range(8)]),
                                 sampling_params=pb.SamplingParams(max_tokens=4, ignore_eos=True))
        if kind == "registry":
            req.adapter_ref.name = rng.choice(stack.registry_names)
        elif kind == "local":
            req.lora_request.CopyFrom(pb.LoraRequest(lora_name="local-0", lora_int_id=1000,
                                                     lora_path=stack.local_adapters[0]))
        return req

    stack.registry.signal(signal.SIGSTOP)
    try:
        n = sizes.stop_requests
        jobs = [timed(request("registry"), rng.uniform(0.2, 1.5)) for _ in range(n // 2)]
        jobs += [timed(request(k), 30.0) for k in ("base", "local") for _ in range(n // 4)]
        t = time.time()
        http = http_request(stack.http_port, "POST", "/v1/completions", (
            b'{"model": "%s", "prompt": "hi", "max_tokens": 2}' % stack.registry_names[0].encode()), timeout=30)
        results, (http_status, _) = await asyncio.gather(asyncio.gather(*jobs), http)
        http_s = time.time() - t
    finally:
        stack.registry.signal(signal.SIGCONT)
    reg = results[:n // 2]
    others = results[n // 2:]
    overrun = max(elapsed - deadline for _, elapsed, deadline in reg)
    report.figure("faults", "registry SIGSTOP: registry-adapter calls (code: count)",
                  dict(Counter(code for code, _, _ in reg)))
    report.figure("faults", "registry SIGSTOP: worst overrun past the deadline", f"{overrun * 1000:.0f} ms")
    report.figure("faults", "registry SIGSTOP: base-model and lora_path calls",
                  dict(Counter(code for code, _, _ in others)))
    report.figure("faults", "registry SIGSTOP: HTTP call naming a registry adapter",
                  f"{http_status} after {http_s:.1f} s (registry_timeout_s=5)")
    report.check("faults: no call outlives its deadline while the registry is stopped (+0.5 s)", overrun < 0.5,
                 f"{overrun:.2f} s")
    report.check("faults: base model and lora_path adapters serve while the registry is stopped",
                 all(code == "OK" for code, _, _ in others), str(Counter(c for c, _, _ in others)))
    report.check("faults: the HTTP front answers within registry_timeout_s while the registry is stopped",
                 http_s < 5 + 2 and http_status in (200, 503), f"{http_status} in {http_s:.1f} s")
    await check_idle_and_alive(stack, stub, channel, report, "registry SIGSTOP")


# ---- faults: registry SIGKILL mid-upload ------------------------------------------------------------
def upload_kills(root: Path, zygote: Zygote, sizes: Sizes, report: Report, rng: random.Random) -> None:
    data_dir = root / "crash-registry"
    acknowledged: dict[tuple[str, int], str] = {}   # (name, version) -> digest, answered OK to a client
    src = root / "crash-src"
    killed_mid, t0 = Counter(), time.time()

    src.mkdir(parents=True, exist_ok=True)

    def artifact(seed: int) -> Path:  # fresh bytes each time: no deduplication against earlier uploads
        return make_peft_adapter(src / f"{seed}.tar", seed=seed, r=rng.choice((8, 16, 32)), packing="tar")

    def upload(stub, name: str, data: bytes, cut: int | None, release: threading.Event):
        def requests():
            yield rpb.UploadAdapterRequest(metadata=rpb.UploadAdapterMetadata(name=name, filename=f"{name}.tar"))
            for i in range(0, len(data) if cut is None else cut, 16 << 10):
                yield rpb.UploadAdapterRequest(chunk=data[i:i + (16 << 10)])
            if cut is not None:
                release.wait(30)  # hold the stream open: the server is mid-upload when it dies
        return stub.UploadAdapter.future(requests(), timeout=60)

    seed = 10_000
    data_dir.mkdir()
    for k in range(sizes.kills):
        registry, address = zygote.start_registry(data_dir)
        try:
            with RegistryClient(address) as client:
                seed += 1
                a = client.push(artifact(seed), f"ok-{k % 7}").adapter
                acknowledged[(a.name, a.version)] = a.digest
                seed += 1
                data = artifact(seed).read_bytes()
                cut = rng.choice((None, rng.randrange(1, len(data))))  # None: all bytes sent, commit racing the kill
                release = threading.Event()
                fut = upload(client.stub, f"victim-{k % 5}", data, cut, release)
                time.sleep(rng.uniform(0.0, 0.08))
                registry.kill9()
                release.set()
                try:
                    resp = fut.result(timeout=30)
                    acknowledged[(resp.adapter.name, resp.adapter.version)] = resp.adapter.digest
                    killed_mid["after the answer"] += 1
                except grpc.RpcError:
                    killed_mid["mid-upload" if cut is not None else "mid-commit (all bytes sent)"] += 1
        finally:
            registry.stop()
    registry, address = zygote.start_registry(data_dir)
    try:
        with RegistryClient(address) as client:
            listed, token = [], ""
            while True:
                resp = client.stub.ListAdapters(rpb.ListAdaptersRequest(page_size=1000, page_token=token), timeout=30)
                listed += list(resp.adapters)
                token = resp.next_page_token
                if not token:
                    break
            half = 0
            for a in listed:  # every visible version downloads whole and hashes to its digest
                sha = hashlib.sha256()
                for msg in client.stub.DownloadAdapter(rpb.DownloadAdapterRequest(name=a.name, version=a.version),
                                                       timeout=60):
                    if msg.WhichOneof("payload") == "chunk":
                        sha.update(msg.chunk)
                half += "sha256:" + sha.hexdigest() != a.digest
            visible = {(a.name, a.version): a.digest for a in listed}
            lost = [key for key, digest in acknowledged.items() if visible.get(key) != digest]
    finally:
        registry.stop()
    staging = list((data_dir / "artifacts" / "tmp").glob("*")) if (data_dir / "artifacts" / "tmp").exists() else []
    report.figure("faults", "registry SIGKILLs during uploads", f"{sizes.kills} in {time.time() - t0:.0f} s: "
                                                                 f"{dict(killed_mid)}")
    report.figure("faults", "acknowledged versions / visible after restart", f"{len(acknowledged)} / {len(listed)}")
    report.figure("faults", "staging files left (reclaimed by gc)",
                  f"{len(staging)} files, {sum(p.stat().st_size for p in staging) / 1e6:.2f} MB")
    integrity = sqlite_integrity(data_dir / "registry.db")
    report.check("faults: zero half adapters (every visible version downloads whole)", half == 0, f"{half}")
    report.check("faults: zero lost acknowledged versions", not lost, str(lost[:5]))
    report.check("faults: SQLite integrity_check ok after the kills", integrity == "ok", integrity)


def engine_step_failures(lines: list[str]) -> tuple[int, int, Counter]:
    """From the server log: failed engine steps, the requests they took down, and each step's
    exception (the last line of the traceback after "engine step failed; aborting N ...")."""
    steps, victims, causes = 0, 0, Counter()
    for i, line in enumerate(lines):
        if m := re.search(r"engine step failed; aborting (\d+)", line):
            steps += 1
            victims += int(m.group(1))
            for later in lines[i + 1:i + 80]:
                if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit)\b", later):
                    causes[later.strip()[:160]] += 1
                    break
    return steps, victims, causes


# ---- main ---------------------------------------------------------------------------------------------
async def serving_phases(stack: Stack, sizes: Sizes, report: Report, rng: random.Random) -> None:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await fuzz(stack, stub, sizes, report, rng)
        await soak(stack, stub, channel, sizes, report, rng)
        await registry_stopped(stack, stub, channel, sizes, report, rng)


def run(sizes: Sizes, root: Path, seed: int = 0) -> Report:
    report = Report()
    rng = random.Random(seed)
    zygote = Zygote()
    try:
        _run(sizes, root, seed, report, rng, zygote)
    finally:
        zygote.close()
    return report


def _run(sizes: Sizes, root: Path, seed: int, report: Report, rng: random.Random, zygote: Zygote) -> None:
    stack = build_stack(root, zygote)
    try:
        report.figure("setup", "servers", f"inference {stack.address} (HTTP :{stack.http_port}), "
                                          f"registry {stack.registry_address}; adapters: {len(stack.registry_names)} "
                                          f"in the registry, {len(stack.local_adapters)} under --allowed-lora-dir")
        asyncio.run(serving_phases(stack, sizes, report, rng))
        errors = stack.inference.error_lines()
        report.figure("server log", "ERROR/CRITICAL/Traceback lines", len(errors))
        steps, victims, causes = engine_step_failures(stack.inference.lines)
        report.figure("server log", "failed engine steps / requests they failed", f"{steps} / {victims}")
        for cause, n in causes.most_common(8):
            report.figure("server log", f"steps failed x{n} by", cause)
        report.check("inference server never crashed", stack.inference.alive)
    finally:
        stack.inference.stop()
        stack.registry.stop()
    upload_kills(root, zygote, sizes, report, rng)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the short version (seconds), as in make test")
    ap.add_argument("--seed", type=int, default=0)
    for f in dataclasses.fields(Sizes):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(SOAK, f.name)), default=None)
    args = ap.parse_args(argv)
    sizes = dataclasses.replace(QUICK if args.quick else SOAK, **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes) if getattr(args, f.name) is not None})
    print(f"reliability suite: {sizes}", flush=True)
    with tempfile.TemporaryDirectory(prefix="loraserve-soak-") as tmp:
        report = run(sizes, Path(tmp), args.seed)
    print(report.table(), flush=True)
    return 0 if report.ok else 1
