"""Harness of the reliability suite: real servers as child processes on loopback, adapters for
the embedded default model, and a raw HTTP/1.1 client (bodies no well-behaved client would send).

The servers run as `python -m loraserve.cli ...` children, so that the suite can read their
RSS, SIGKILL and SIGSTOP them, and tell a crash (the process is gone) from an error reply.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loraserve.adapters.testing import random_pairs
from loraserve.adapters.writer import write_peft_adapter

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models" / "default"
TRAINED_ADAPTERS = ROOT / "models" / "adapters"


class ServerProcess:
    """A loraserve server in a child process; its merged stdout/stderr is kept line by line."""

    def __init__(self, args: list[str], ready: str) -> None:
        cmd = [sys.executable, "-m", "loraserve.cli", "--log-level", "WARNING", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env=env)
        self.ready, self.name = ready, args[0]
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        deadline = time.time() + timeout
        with self._seen:
            while not any(re.search(self.ready, line) for line in self.lines):
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.lines[-40:]))
                self._seen.wait(0.2)
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def find(self, pattern: str) -> re.Match:
        for line in self.lines:
            if m := re.search(pattern, line):
                return m
        raise LookupError(pattern)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def error_lines(self) -> list[str]:
        return [line for line in self.lines if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


# A parent that pays the registry's imports (torch, SQLAlchemy, grpc) once, then forks one server
# per line on its stdin ("LOGFILE\tARG\tARG..."), answering with the child's pid: the SIGKILL
# loop restarts the registry a hundred times in seconds rather than minutes. Each child runs
# `loraserve registry serve` from its start (new DB engine, startup checks, new gRPC server);
# only the module imports are shared.
_ZYGOTE = r"""
import os, signal, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
from loraserve import cli
import loraserve.registry.cli, loraserve.registry.server  # noqa: F401  (the slow imports, once)
for line in sys.stdin:
    log, *args = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os._exit(cli.main(args) or 0)
    print(pid, flush=True)
"""


class ForkedServer:
    """A server forked by a Zygote; the same surface as ServerProcess."""

    def __init__(self, pid: int, log: Path, ready: str, timeout: float = 60) -> None:
        self.pid, self.log = pid, log
        deadline = time.time() + timeout
        while not any(re.search(ready, line) for line in self.lines):
            if not self.alive or time.time() > deadline:
                raise RuntimeError("forked server did not start:\n" + "".join(self.lines[-40:]))
            time.sleep(0.02)

    @property
    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines(keepends=True)
        except FileNotFoundError:
            return []

    find = ServerProcess.find

    @property
    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while self.alive and time.time() < deadline:
            time.sleep(0.01)
        return not self.alive

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self._wait_gone(30)

    def stop(self) -> None:
        if self.alive:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            if not self._wait_gone(30):
                self.kill9()


class Zygote:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env)
        self._n = 0

    def start_registry(self, data_dir: Path, port: int = 0) -> tuple[ForkedServer, str]:
        self._n += 1
        log = data_dir.parent / f"{data_dir.name}-{self._n}.log"
        args = [str(log), "--log-level", "WARNING", "registry", "serve", "--data-dir", str(data_dir),
                "--address", f"127.0.0.1:{port}"]
        self.proc.stdin.write("\t".join(args) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        pid = int(self.proc.stdout.readline())  # type: ignore[union-attr]
        srv = ForkedServer(pid, log, ready=r"listening on 127\.0\.0\.1:\d+")
        return srv, srv.find(r"listening on (127\.0\.0\.1:\d+)").group(1)

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_inference(registry: str, allowed: Path, cache: Path, config: Path) -> ServerProcess:
    """The default model on CPU in float32 (it connects to the registry on first use)."""
    return ServerProcess(["serve", str(DEFAULT_MODEL), "--port", "0", "--openai-port", "0", "--registry", registry,
                          "--allowed-lora-dir", str(allowed), "--adapter-cache-dir", str(cache),
                          "--config", str(config), "--dtype", "float32", "--device", "cpu"],
                         ready=r"ready: model loaded")


def inference_ports(srv: ServerProcess) -> tuple[str, int]:
    """(gRPC address, OpenAI HTTP port) of a started inference server."""
    srv.wait_ready()
    port = int(srv.find(r"listening on [\d.]+:(\d+)").group(1))
    http = int(srv.find(r"OpenAI HTTP on :(\d+)").group(1))
    return f"127.0.0.1:{port}", http


# ---- adapters for the default model --------------------------------------------------------------
def default_module_shapes() -> tuple[dict[str, tuple[int, int]], int]:
    """HF module -> (in_features, out_features) of models/default, and its layer count."""
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return shapes, cfg["num_hidden_layers"]


def make_default_adapter(dest: Path, seed: int, r: int, modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    shapes, layers = default_module_shapes()
    pairs = random_pairs({m: shapes[m] for m in modules}, r, num_layers=layers, seed=seed)
    return write_peft_adapter(dest, pairs, r, alpha=2 * r)


def make_broken_adapters(allowed: Path) -> list[Path]:
    """Adapter dirs a lora_path may name that must be refused with INVALID_ARGUMENT."""
    out = []
    bad_json = make_default_adapter(allowed / "broken-json", seed=90, r=4)
    (bad_json / "adapter_config.json").write_text('{"r": 4, ')
    out.append(bad_json)
    garbage = make_default_adapter(allowed / "garbage-weights", seed=91, r=4)
    for f in garbage.glob("*.safetensors"):
        f.write_bytes(os.urandom(256))
    out.append(garbage)
    wrong_shape = allowed / "wrong-shape"
    pairs = random_pairs({"q_proj": (64, 64)}, 4, num_layers=2, seed=92)  # the tiny test model's shapes
    out.append(write_peft_adapter(wrong_shape, pairs, 4, alpha=8))
    return out


def tar_bytes_of(dir_: Path) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(dir_.iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue()


# ---- raw HTTP/1.1 ------------------------------------------------------------------------------
async def http_request(port: int, method: str, path: str, body: bytes | None = None,
                       timeout: float = 10.0) -> tuple[int | str, bytes]:
    """One request on a fresh connection (Connection: close); reads the whole answer.
    Returns (status, body); status is "client-timeout" when the answer took longer than `timeout`
    (the connection is then closed, which is a client disconnect for the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body or b'')}\r\n\r\n").encode()
        writer.write(head + (body or b""))
        await writer.drain()
        try:
            raw = await asyncio.wait_for(reader.read(-1), timeout)
        except asyncio.TimeoutError:
            return "client-timeout", b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    status_line, _, rest = raw.partition(b"\r\n")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return "no-status-line", raw[:200]
    return int(parts[1]), rest.partition(b"\r\n\r\n")[2]


def sqlite_integrity(db: Path) -> str:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()

