"""Real infrastructure for registry tests: gRPC servers on 127.0.0.1, moto's S3 server over
HTTP, and (when installed) a throwaway PostgreSQL cluster. Fixtures refuse non-loopback
endpoints, so no test can touch a real bucket or database.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig, S3Config
from loraserve.registry.testing import RunningRegistry

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in (LOOPBACK, "localhost"):
        raise RuntimeError(f"test fixtures only talk to loopback services, not {url!r}")


# ---- S3: moto's server over HTTP -------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    endpoint = f"http://{LOOPBACK}:{port}"
    require_loopback(endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str):  # type: ignore[no-untyped-def]
    """A fresh bucket on the moto server; yields (S3Config, boto3 client)."""
    from loraserve.registry.store import make_s3_client

    cfg = S3Config(bucket=f"reg-{uuid.uuid4().hex[:12]}", prefix="adapters/", endpoint_url=s3_endpoint,
                   multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    require_loopback(cfg.endpoint_url or "")
    client = make_s3_client(cfg)
    client.create_bucket(Bucket=cfg.bucket)
    yield cfg, client


# ---- PostgreSQL: a temporary cluster, when the server binaries are installed -----------

class PostgresCluster:
    def __init__(self, bindir: Path, root: Path, user: str | None) -> None:
        self.bindir, self.root, self.user = bindir, root, user
        self.port = free_port()
        self.datadir = root / "data"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run(prefix + list(args), check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses={LOOPBACK} -c fsync=off -c full_page_writes=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-o", opts, "-l",
                  str(self.root / "server.log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass

    def new_database(self) -> str:
        import psycopg2

        name = f"t_{uuid.uuid4().hex[:16]}"
        conn = psycopg2.connect(host=LOOPBACK, port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        url = f"postgresql+psycopg2://postgres@{LOOPBACK}:{self.port}/{name}"
        require_loopback(url)
        return url


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdbs:
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql); PostgreSQL tests skipped")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 not installed")
    user = None
    root = Path(tempfile.mkdtemp(prefix="loraserve-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root: hand the directory to an ordinary user
        import pwd

        for candidate in ("postgres", "nobody"):
            try:
                pw = pwd.getpwnam(candidate)
            except KeyError:
                continue
            user = candidate
            os.chown(root, pw.pw_uid, pw.pw_gid)
            break
        else:
            pytest.skip("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")
    cluster = PostgresCluster(Path(initdbs[-1]).parent, root, user)
    try:
        cluster.start()
    except subprocess.CalledProcessError as exc:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr.decode()[-2000:]} {log[-2000:]}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """None (the default SQLite file in the data dir) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()


# ---- registry servers and adapters ------------------------------------------------------

@pytest.fixture
def start_registry(tmp_path: Path) -> Iterator[Callable[..., RunningRegistry]]:
    """start_registry(**RegistryConfig fields) -> a running server on 127.0.0.1:<free port>."""
    running: list[RunningRegistry] = []

    def start(**fields) -> RunningRegistry:  # type: ignore[no-untyped-def]
        fields.setdefault("data_dir", tmp_path / f"registry{len(running)}")
        reg = RunningRegistry(RegistryConfig(**fields)).start()
        running.append(reg)
        return reg

    yield start
    for reg in running:
        reg.stop()


@pytest.fixture
def registry(start_registry, db_url) -> RunningRegistry:  # type: ignore[no-untyped-def]
    """A registry on SQLite and on PostgreSQL (parametrized), local store."""
    return start_registry(db_url=db_url)


@pytest.fixture
def client(registry: RunningRegistry) -> Iterator[RegistryClient]:
    with RegistryClient(registry.address) as c:
        yield c


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """artifacts(seed, packing="tar", kind="hf", r=4) -> a valid tiny adapter file (cached)."""
    from loraserve.adapters.testing import make_nemo_adapter, make_peft_adapter

    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple, Path] = {}

    def make(seed: int = 0, packing: str = "tar", kind: str = "hf", r: int = 4) -> Path:
        key = (seed, packing, kind, r)
        if key not in cache:
            suffix = {"dir": "", "tar": ".tar", "tar.gz": ".tar.gz", "zip": ".zip"}[packing]
            if kind == "hf":
                path = make_peft_adapter(root / f"hf-{seed}-{r}{suffix}", seed=seed, r=r, packing=packing)
            else:
                path = make_nemo_adapter(root / f"nemo-{seed}-{r}{suffix or '.nemo'}", seed=seed, r=r,
                                         packing=packing if packing != "dir" else "dir")
            cache[key] = path
        return cache[key]

    return make


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
