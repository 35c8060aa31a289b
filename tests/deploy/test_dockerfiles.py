"""deploy/Dockerfile.registry and deploy/Dockerfile.inference, without a Docker engine.

No image is built here (no engine on the test machines). Instead the tests replay what the
build does with the repository: the build context after .dockerignore, the COPY steps into a
scratch root, `python scripts/gen_protos.py`, then packaging with pip, and check that the
result is the installable `loraserve` with its generated stubs. The rest is read as data.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from .helpers import (DOCKERFILES, ROOT, Instruction, copy_sources, dockerfile_instructions, exec_form,
                      final_stage, flag_value, long_flags, option_strings, subcommand_parser)

GRPC_PORT = {"registry": 50052, "inference": 50051}
CMD_WORDS = {"registry": ["registry", "serve"], "inference": ["serve"]}


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line of .dockerignore, in the matcher's syntax (`**`, `*`, `?`, `!`)."""
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip("/"))
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((not negate, re.compile(regex + r"\Z")))
    return out


def in_build_context(rel_path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent dirs decides."""
    parts = PurePosixPath(rel_path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for exclude, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = exclude
    return not excluded


def build_context_files(source: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> list[str]:
    """The files under `source` (repo-relative) that reach the build context."""
    path = ROOT / source
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    rels = [p.relative_to(ROOT).as_posix() for p in files]
    return [r for r in rels if in_build_context(r, patterns)]


def replay_copies(instructions: list[Instruction], rootfs: Path) -> None:
    """Run the COPY steps from the build context into `rootfs`, honouring WORKDIR and .dockerignore."""
    patterns, workdir = dockerignore_patterns(), "/"
    for inst in instructions:
        if inst.keyword == "WORKDIR":
            workdir = os.path.join(workdir, inst.args)
            continue
        sources = copy_sources(inst) if inst.keyword == "COPY" else None
        if not sources:
            continue
        dest = inst.args.split()[-1]
        dest_abs = rootfs / os.path.join(workdir, dest).lstrip("/")
        for source in sources:
            files = build_context_files(source, patterns)
            assert files, f"COPY {source}: nothing of it is in the build context"
            for rel in files:
                if (ROOT / source).is_dir():
                    target = dest_abs / Path(rel).relative_to(source)
                elif dest.endswith("/") or len(sources) > 1:
                    target = dest_abs / Path(source).name
                else:
                    target = dest_abs
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, target)


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request: pytest.FixtureRequest) -> tuple[str, list[Instruction]]:
    return request.param, dockerfile_instructions(DOCKERFILES[request.param])


def test_copy_sources_exist_and_are_not_dockerignored(image: tuple[str, list[Instruction]]) -> None:
    name, instructions = image
    patterns = dockerignore_patterns()
    copies = [s for i in instructions if i.keyword in ("COPY", "ADD") for s in copy_sources(i) or []]
    assert copies, f"{name}: no COPY from the build context"
    for source in copies:
        assert (ROOT / source).exists(), f"{name}: COPY source {source} does not exist in the repository"
        assert in_build_context(source, patterns), f"{name}: COPY source {source} is excluded by .dockerignore"
    assert not any(i.keyword == "ADD" for i in instructions), "COPY, not ADD (no remote fetches or auto-extract)"


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".git/config", ".venv/bin/python", "var/registry/registry.db", "services/core/__pycache__/x.pyc",
                 "kernels/__pycache__/a.cpython-311.pyc", "services/core/v1/registry_pb2.py", "deploy/.env"):
        assert not in_build_context(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("services/registry/server.py", "protos/loraserve/v1/registry.proto", "pyproject.toml"):
        assert in_build_context(path, patterns)


def test_final_stage_runs_as_a_numeric_non_root_user(image: tuple[str, list[Instruction]]) -> None:
    name, instructions = image
    users = [i.args for i in final_stage(instructions) if i.keyword == "USER"]
    assert users, f"{name}: the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    # numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]}"


def test_ports_healthcheck_and_entrypoint(image: tuple[str, list[Instruction]]) -> None:
    name, instructions = image
    last = final_stage(instructions)
    exposed = {int(p.split("/")[0]) for i in last if i.keyword == "EXPOSE" for p in i.args.split()}
    cmd = exec_form([i for i in last if i.keyword == "CMD"][-1].args)
    assert exec_form([i for i in last if i.keyword == "ENTRYPOINT"][-1].args) == ["loraserve"]
    assert cmd[:len(CMD_WORDS[name])] == CMD_WORDS[name]
    if name == "registry":
        listen = {int(flag_value(cmd, "--address").rsplit(":", 1)[1])}
    else:
        listen = {int(flag_value(cmd, f)) for f in ("--port", "--openai-port", "--metrics-port")}
    assert exposed == listen and GRPC_PORT[name] in exposed
    env = " ".join(i.args for i in last if i.keyword == "ENV")
    assert f"LORASERVE_HEALTH_ADDRESS=127.0.0.1:{GRPC_PORT[name]}" in env
    health = [i.args for i in last if i.keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "--start-period=" in health[0]
    probe = exec_form(health[0].split("CMD", 1)[1].strip())
    copied = [i.args.split()[-1] for i in last if i.keyword == "COPY"]
    assert probe[0] == "python" and probe[1] in copied and probe[1].endswith("grpc_healthcheck.py")


def test_default_command_parses_with_the_real_cli(image: tuple[str, list[Instruction]]) -> None:
    from loraserve.cli import build_parser

    name, instructions = image
    cmd = exec_form([i for i in final_stage(instructions) if i.keyword == "CMD"][-1].args)
    try:
        parser = subcommand_parser(build_parser(), CMD_WORDS[name])
    except (KeyError, StopIteration):
        pytest.skip(f"`loraserve {' '.join(CMD_WORDS[name])}` is not registered in this build")
    unknown = [f for f in long_flags(cmd) if f not in option_strings(parser)]
    assert not unknown, f"{name}: CMD uses undeclared flags {unknown}"
    assert callable(build_parser().parse_args(cmd).func)


def test_base_images(image: tuple[str, list[Instruction]]) -> None:
    name, instructions = image
    text = DOCKERFILES[name].read_text()
    froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    if name == "registry":
        assert re.search(r"ARG PYTHON_VERSION=3\.11\b", text)
        assert set(froms) == {"python:${PYTHON_VERSION}-slim"}
        assert "--index-url https://download.pytorch.org/whl/cpu" in text, "CPU torch, not the CUDA wheels"
        assert re.search(r'"torch==\$\{TORCH_VERSION\}"', text), "torch pinned"
    else:
        base = re.search(r"ARG BASE_IMAGE=(\S+)", text)
        assert base and "cuda" in base.group(1) and froms == ["${BASE_IMAGE}"]
        assert 'pip install ".[triton]"' in text


@pytest.mark.timeout(300)
def test_build_steps_produce_the_installable_package(image: tuple[str, list[Instruction]], tmp_path: Path) -> None:
    """Replay the build stage: COPYs from the ignored-filtered context, gen_protos, pip wheel."""
    name, instructions = image
    rootfs = tmp_path / "rootfs"
    build_stage = [i for i in instructions if i.stage == 0]
    replay_copies(build_stage, rootfs)
    src = rootfs / "src"
    assert not list((src / "services" / "core" / "v1").glob("*_pb2*.py")), "stubs must be generated in the image"
    run = dict(cwd=src, capture_output=True, text=True, timeout=240)
    gen = subprocess.run([sys.executable, "scripts/gen_protos.py"], **run)
    assert gen.returncode == 0, gen.stderr
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), "."], **run)
    assert wheel.returncode == 0, wheel.stdout + wheel.stderr
    (path,) = (tmp_path / "dist").glob("loraserve-*.whl")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in ("loraserve/cli.py", "loraserve/v1/registry_pb2.py", "loraserve/v1/registry_pb2_grpc.py",
                   "loraserve/v1/inference_pb2.py", "loraserve/v1/inference_pb2_grpc.py",
                   "loraserve/registry/server.py", "loraserve/registry/migrations/alembic.ini",
                   "loraserve/inference/server.py", "loraserve/kernels/__init__.py"):
        assert module in names, f"{name} image: {module} missing from the package"
    assert re.search(r"^loraserve = loraserve\.cli:main$", entry_points, re.M)
    # files the runtime stage places at absolute paths (health check script, default options)
    for inst in final_stage(instructions):
        dest = inst.args.split()[-1]
        if inst.keyword == "COPY" and copy_sources(inst) and dest.startswith("/"):
            replay_copies([inst], rootfs)
            assert (rootfs / dest.lstrip("/")).is_file(), dest
