"""Readers for the deployment files (compose, Dockerfiles, k8s manifests) shared by the tests.

Nothing here knows what the files should say; the tests do. These helpers only parse:
compose variable interpolation, Dockerfile instructions, `--flag value` command lines, and
the option strings the real `loraserve` argparse parser declares.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILES = {"registry": DEPLOY / "Dockerfile.registry", "inference": DEPLOY / "Dockerfile.inference"}
OPTIONS_FILE = DEPLOY / "extra_llm_api_options.yaml"


# ---- docker compose ---------------------------------------------------------------------

def load_compose() -> dict[str, Any]:
    with open(COMPOSE_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?msg}, $$."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        current = env.get(name)
        if op in (":-", ":?") and not current or op in ("-", "?") and current is None:
            if op.endswith("?"):
                raise KeyError(f"${{{name}}} is required: {arg}")
            return arg
        return current or ""
    return _VAR.sub(sub, value)


def service_env(service: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """A compose service's `environment` (map or KEY=VALUE list), interpolated with `env`."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v), env or {}) for k, v in raw.items()}


def command_list(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


# ---- command lines ----------------------------------------------------------------------

def flag_value(args: list[str], flag: str) -> str | None:
    """Value of `--flag=value` or `--flag value` in args (the last one wins, like argparse)."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg[len(flag) + 1:]
    return found


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    """args with every value of `flag` set to `value` (the flag must be there)."""
    out, i, hit = [], 0, False
    while i < len(args):
        arg = args[i]
        if arg == flag:
            out += [flag, value]
            i += 2
            hit = True
            continue
        if arg.startswith(flag + "="):
            out.append(f"{flag}={value}")
            hit = True
        else:
            out.append(arg)
        i += 1
    assert hit, f"{flag} not in {args}"
    return out


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def subcommand_parser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of `loraserve <words...>` (e.g. ["registry", "serve"]); KeyError if absent."""
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def long_flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


# ---- Dockerfiles ------------------------------------------------------------------------

@dataclass
class Instruction:
    stage: int          # index of the FROM stage it belongs to (-1 before the first FROM)
    keyword: str        # upper case: FROM, RUN, COPY, ...
    args: str           # the rest, continuation lines joined


def dockerfile_instructions(path: Path) -> list[Instruction]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.lstrip().startswith("#")]
    logical, buf = [], ""
    for ln in lines:
        if ln.rstrip().endswith("\\"):
            buf += ln.rstrip()[:-1] + " "
            continue
        buf += ln
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    out, stage = [], -1
    for ln in logical:
        keyword, _, rest = ln.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    return json.loads(args)


def copy_sources(inst: Instruction) -> list[str] | None:
    """Source paths of a COPY/ADD from the build context; None for `COPY --from=...`."""
    words = shlex.split(inst.args)
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return None
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


# ---- Kubernetes -------------------------------------------------------------------------

def load_k8s(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_resources() -> list[dict[str, Any]]:
    """Every object the base kustomization lists."""
    kust = load_k8s(K8S / "kustomization.yaml")[0]
    return [doc for name in kust["resources"] for doc in load_k8s(K8S / name)]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
