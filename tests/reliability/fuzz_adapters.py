"""Structure-aware fuzzer for adapter parsing (issue 9): mutates valid PEFT and NeMo adapters
at every layer (packaging, file set, config JSON/YAML, safetensors header, tensor values,
pickles, raw bytes), feeds each through the lora_path parser (load_adapter with the engine's
limits and confinement) and, optionally, a registry upload over a real gRPC stub, and counts
outcomes. A failure is anything but acceptance or a plain AdapterFormatError: a crash (another
exception type), an AdapterFormatError the last-resort net produced (`unforeseen`), a message
over the length cap or with Python exception text, or a registry status other than OK /
INVALID_ARGUMENT / ALREADY_EXISTS.

    python -m tests.reliability.fuzz_adapters            # LORASERVE_FUZZ_CASES (default 300),
    LORASERVE_FUZZ_CASES=10000 make soak                 # LORASERVE_FUZZ_SEED, LORASERVE_FUZZ_UPLOAD_EVERY
"""
from __future__ import annotations

import collections
import io
import json
import os
import random
import struct
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from loraserve.adapters import AdapterFormatError, ArchiveLimits, load_adapter
from loraserve.adapters.errors import MAX_MESSAGE_CHARS
from loraserve.adapters.testing import (TINY_LAYERS, TINY_MODULE_SHAPES, make_nemo_adapter,
                                        make_peft_adapter)
from loraserve.adapters.writer import write_files

Files = dict[str, bytes]
PYTHON_NOISE = ("Traceback", "object is not", "not supported between", "maximum recursion", "unhashable",
                "has no attribute", "referenced before assignment")
LIMITS = ArchiveLimits.for_model(TINY_MODULE_SHAPES, TINY_LAYERS, 64)
_NASTY = [None, True, False, 0, -1, 2 ** 63, -(2 ** 70), 1e308, float("inf"), float("nan"), -0.0, 1e38, 1e-45,
          "", "x" * 5000, "\0", "../../etc/passwd", [], {}, [1, "a", None], {"a": {"b": [None]}},
          "q_proj", ["q_proj", 3], {"q_proj": -4}, "(a+)+$", "[", "all-linear", 4, 8, 64, 65, 0.5]


@dataclass
class Stats:
    cases: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [f"{self.cases} mutated adapters: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))]
        if self.statuses:
            lines.append("registry uploads: " + ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())))
        lines.append(f"failures: {len(self.failures)}")
        lines += [f"  {f}" for f in self.failures[:20]]
        return "\n".join(lines)


def _files_of(path: Path) -> Files:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def seeds(root: Path) -> list[tuple[str, Files]]:
    peft = make_peft_adapter(root / "peft", modules=("q_proj", "v_proj", "down_proj"), r=4, seed=1)
    peft_bin = make_peft_adapter(root / "peft_bin", r=2, seed=2, safetensors=False)
    nemo = make_nemo_adapter(root / "nemo", adapters=("lora_kqv_adapter", "lora_4htoh_adapter"), r=4, seed=3,
                             packing="dir")
    return [("peft", _files_of(peft)), ("peft_bin", _files_of(peft_bin)), ("nemo", _files_of(nemo))]




# ---- mutations: each takes (rng, files) and changes files in place -----------------------------

def _nasty(rng: random.Random, depth: int = 0):  # type: ignore[no-untyped-def]
    if rng.random() < 0.05:
        n = rng.choice([50, 5000, 100_000])
        return json.loads("[" * n + "]" * n) if n <= 500 else ["deep"]  # json can't build deeper; text does
    return rng.choice(_NASTY)


def m_config_field(rng: random.Random, files: Files) -> None:
    for name in files:
        if name.endswith(".json") or name.endswith(".yaml"):
            is_json = name.endswith(".json")
            try:
                cfg = json.loads(files[name]) if is_json else yaml.safe_load(files[name])
            except Exception:
                return
            if not isinstance(cfg, dict):
                return
            target = cfg
            if not is_json and isinstance(cfg.get("peft"), dict) and rng.random() < 0.5:
                target = cfg["peft"].setdefault("lora_tuning", {})
                if not isinstance(target, dict):
                    return
            keys = list(target) + ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                                   "layers_to_transform", "use_rslora", "use_dora", "adapter_dim", "alpha",
                                   "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels"]
            key = rng.choice(keys)
            if rng.random() < 0.2:
                target.pop(key, None)
            else:
                target[key] = _nasty(rng)
            try:
                files[name] = json.dumps(cfg).encode() if is_json else yaml.safe_dump(cfg).encode()
            except (ValueError, TypeError, yaml.YAMLError):
                files[name] = b"{" * rng.randint(1, 100_000)
            return


def m_deep_text(rng: random.Random, files: Files) -> None:
    name = rng.choice(list(files))
    n = rng.choice([1000, 100_000])
    if name.endswith(".json"):
        files[name] = ("[" * n + "]" * n).encode()
    elif name.endswith(".yaml"):
        files[name] = ("[" * n + "]" * n).encode() if rng.random() < 0.5 else ("a:\n" + "  " * 200 + "b: 1\n").encode()
    elif name.endswith(".safetensors"):
        header = ("{\"a\":" + "[" * n + "]" * n + "}").encode()
        files[name] = struct.pack("<Q", len(header)) + header


def m_safetensors_header(rng: random.Random, files: Files) -> None:
    name = next((n for n in files if n.endswith(".safetensors")), None)
    if name is None:
        return
    data = files[name]
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    key = rng.choice([k for k in header if k != "__metadata__"] or ["x"])
    entry = header.setdefault(key, {})
    what = rng.choice(["dtype", "shape", "data_offsets", "delete", "rename", "entry", "metadata"])
    if what == "delete":
        header.pop(key)
    elif what == "rename":
        header[rng.choice(["k" * rng.choice([1, 10_000]), key.replace("lora_A", "lora_B"), key + ".x",
                           key.replace("layers.0", "layers.99999999999"), ""])] = header.pop(key)
    elif what == "entry":
        header[key] = _nasty(rng)
    elif what == "metadata":
        header["__metadata__"] = _nasty(rng)
    elif isinstance(entry, dict):
        choices = {"dtype": ["F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "XYZ", 3, None],
                   "shape": [[], [0], [4], [4, 64, 1], [-1, 4], [2 ** 62, 2 ** 62], ["4", 64], [4.0, 64]],
                   "data_offsets": [["0", "1024"], [0], [5, 1], [-8, 8], [0, 2 ** 64], [0.0, 4.0], None]}[what]
        entry[what] = rng.choice(choices)
    raw = json.dumps(header).encode()
    length = len(raw) + rng.choice([0, 0, 0, 1, -1, 2 ** 40])
    files[name] = struct.pack("<Q", max(length, 0) % 2 ** 64) + raw + body


def m_tensor_values(rng: random.Random, files: Files) -> None:
    from safetensors.torch import load as st_load, save as st_save

    name = next((n for n in files if n.endswith(".safetensors")), None)
    if name is None:
        return
    tensors = st_load(files[name])
    key = rng.choice(list(tensors))
    t = tensors[key]
    choice = rng.choice(["nan", "inf", "huge", "transpose", "rank", "dtype", "1d", "empty"])
    if choice in ("nan", "inf", "huge"):
        t = t.clone()
        t.view(-1)[0] = {"nan": float("nan"), "inf": float("inf"), "huge": 3e38}[choice]
    elif choice == "transpose":
        t = t.T.contiguous()
    elif choice == "rank":
        t = torch.cat([t, t], dim=0).contiguous()
    elif choice == "dtype":
        t = t.to(rng.choice([torch.int32, torch.float64, torch.bfloat16, torch.uint8]))
    elif choice == "1d":
        t = t.flatten()
    else:
        t = t[:0]
    tensors[key] = t
    files[name] = st_save(tensors)


def m_pickle(rng: random.Random, files: Files) -> None:
    name = next((n for n in files if n.endswith((".ckpt", ".bin"))), None)
    if name is None:
        return
    if rng.random() < 0.2 and files[name].startswith(b"PK"):  # same checkpoint, records deflated
        src = zipfile.ZipFile(io.BytesIO(files[name]))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
                dst.writestr(record, src.read(info))
        files[name] = out.getvalue()
        return
    obj = rng.choice([[1, 2], {"a": 1}, {"k": {"nested": torch.ones(2)}}, {1: torch.ones(2, 2)}, torch.ones(3),
                      {"model.decoder.layers.0.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight":
                       torch.ones(4, 64, dtype=torch.int64)}, {"state_dict": [1]}, None])
    buf = io.BytesIO()
    torch.save(obj, buf)
    files[name] = buf.getvalue()


def m_bytes(rng: random.Random, files: Files) -> None:
    name = rng.choice(list(files))
    data = bytearray(files[name])
    op = rng.choice(["flip", "truncate", "extend", "empty"])
    if op == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del data[rng.randrange(len(data) + 1):]
    elif op == "extend":
        data += os.urandom(rng.randint(1, 1000))
    else:
        data.clear()
    files[name] = bytes(data)


def m_file_set(rng: random.Random, files: Files) -> None:
    op = rng.choice(["drop", "extra", "nest", "rename", "dup_weights"])
    names = list(files)
    if op == "drop" and names:
        files.pop(rng.choice(names))
    elif op == "extra":
        files[rng.choice(["README.md", "x" * 200, "sub/adapter_config.json", "model_weights.ckpt",
                          "adapter_model.bin", "mp_rank_01/model_weights.ckpt"])] = os.urandom(64)
    elif op == "nest":
        for name in names:
            files["top/" + name] = files.pop(name)
    elif op == "rename" and names:
        old = rng.choice(names)
        files[old + rng.choice([".bak", "/", "\\x"])] = files.pop(old)
    elif op == "dup_weights" and "adapter_model.safetensors" in files:
        files["adapter_model.bin"] = files["adapter_model.safetensors"]


MUTATIONS = [m_config_field, m_config_field, m_deep_text, m_safetensors_header, m_safetensors_header,
             m_tensor_values, m_pickle, m_bytes, m_file_set]
PACKINGS = ["dir", "tar", "tar.gz", "zip", "nemo"]


def write_case(rng: random.Random, files: Files, dest: Path) -> Path:
    packing = rng.choice(PACKINGS)
    if packing == "dir":
        return write_files(dest, {n.rstrip("/") or "x": d for n, d in files.items()}, "dir")
    path = dest.with_suffix({"tar": ".tar", "tar.gz": ".tar.gz", "zip": ".zip", "nemo": ".nemo"}[packing])
    if packing == "zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz" if packing == "tar.gz" else "w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if rng.random() < 0.05:  # a packaging hazard on top
                hazard = tarfile.TarInfo(rng.choice(["../up", "/abs", "link", "x" * 300]))
                hazard.type = rng.choice([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])
                hazard.linkname = "/etc/passwd"
                tar.addfile(hazard, io.BytesIO(b""))
    if rng.random() < 0.05:
        data = bytearray(path.read_bytes())
        data[rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(data))
    return path


def _judge(stats: Stats, label: str, exc: BaseException | None) -> None:
    if exc is None:
        stats.outcomes["accepted"] += 1
    elif isinstance(exc, AdapterFormatError):
        msg = str(exc)
        if exc.unforeseen:
            stats.outcomes["unforeseen"] += 1
            stats.failures.append(f"{label}: unforeseen: {msg[:200]}")
        elif len(msg) > MAX_MESSAGE_CHARS + 100 or any(n in msg for n in PYTHON_NOISE):
            stats.outcomes["bad_message"] += 1
            stats.failures.append(f"{label}: message: {msg[:200]}")
        else:
            stats.outcomes["format_error"] += 1
    else:
        stats.outcomes["crash"] += 1
        stats.failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")


def run(cases: int, seed: int = 0, upload_every: int = 0, registry_address: str | None = None) -> Stats:
    """Fuzz `cases` mutated adapters; every `upload_every`-th also goes to the registry (0 = none)."""
    import grpc

    rng = random.Random(seed)
    stats = Stats()
    client = None
    if upload_every and registry_address:
        from loraserve.registry.client import RegistryClient
        client = RegistryClient(registry_address)
    with tempfile.TemporaryDirectory(prefix="loraserve-fuzz-") as tmp:
        root = Path(tmp)
        base = seeds(root / "seeds")
        for i in range(cases):
            kind, files = rng.choice(base)
            files = dict(files)
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                mutation = rng.choice(MUTATIONS)
                try:
                    mutation(rng, files)
                except Exception as exc:  # a mutation that does not apply to this seed: say so, go on
                    stats.outcomes[f"skipped_{mutation.__name__}"] += 1
                    del exc
            case_dir = root / f"case{i}"
            case_dir.mkdir()
            try:
                path = write_case(rng, files, case_dir / "adapter")
            except (OSError, ValueError, tarfile.TarError):
                stats.outcomes["unwritable"] += 1
                continue
            stats.cases += 1
            label = f"case {i} ({kind}, seed {seed})"
            try:
                load_adapter(path, limits=LIMITS, confine_to=[os.path.realpath(case_dir)],
                             serving_dtype=torch.bfloat16)
                _judge(stats, label, None)
            except BaseException as exc:  # noqa: BLE001 - counting every outcome is the point
                if isinstance(exc, KeyboardInterrupt):
                    raise
                _judge(stats, label, exc)
            if client is not None and i % upload_every == 0 and path.exists():
                try:
                    client.push(path, f"fuzz-{seed}-{i}")
                    stats.statuses["OK"] += 1
                except grpc.RpcError as err:
                    stats.statuses[err.code().name] += 1
                    if err.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                        stats.failures.append(f"{label}: upload {err.code().name}: {err.details()[:200]}")
            _rmtree(case_dir)
    if client is not None:
        client.close()
    return stats


def _rmtree(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    from loraserve.registry.config import RegistryConfig
    from loraserve.registry.testing import RunningRegistry

    cases = int(os.environ.get("LORASERVE_FUZZ_CASES", "300"))
    seed = int(os.environ.get("LORASERVE_FUZZ_SEED", "0"))
    upload_every = int(os.environ.get("LORASERVE_FUZZ_UPLOAD_EVERY", "1"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loraserve-fuzz-reg-") as tmp, \
            RunningRegistry(RegistryConfig(data_dir=Path(tmp))) as reg:
        stats = run(cases, seed, upload_every, reg.address)
    print(stats.summary())
    print(f"{time.perf_counter() - t0:.1f} s (LORASERVE_FUZZ_CASES={cases} LORASERVE_FUZZ_SEED={seed} "
          f"LORASERVE_FUZZ_UPLOAD_EVERY={upload_every})")
    return 0 if stats.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
