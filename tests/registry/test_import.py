"""ImportAdapter: artifacts the server reads itself, only from where the operator allowed."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import grpc
import pytest

from loraserve.registry.client import RegistryClient


def code_and_message(fn) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_import_from_allowed_dir(start_registry, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    archive = shutil.copy(artifacts(seed=110, packing="tar.gz"), allowed / "a.tar.gz")
    shutil.copytree(artifacts(seed=111, packing="dir"), allowed / "peft-dir")
    outside = tmp_path / "secret"
    outside.mkdir()
    shutil.copy(artifacts(seed=112), outside / "s.tar")
    os.symlink(outside / "s.tar", allowed / "link.tar")  # a link out of the allowed dir

    reg = start_registry(allowed_import_dirs=[allowed])
    with RegistryClient(reg.address) as c:
        a = c.import_adapter(str(archive), "imp", base_model="tiny").adapter
        assert a.digest == "sha256:" + hashlib.sha256(Path(archive).read_bytes()).hexdigest()
        assert a.artifact_type == "tar.gz" and a.base_model == "tiny"
        d = c.import_adapter(f"file://{allowed}/peft-dir", "imp").adapter
        assert d.version == 2 and d.artifact_type == "tar" and list(d.target_modules) == ["q_proj", "v_proj"]

        code, msg = code_and_message(lambda: c.import_adapter(str(outside / "s.tar"), "x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "allowed import directory" in msg
        code, msg = code_and_message(lambda: c.import_adapter(str(allowed / "link.tar"), "x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = code_and_message(lambda: c.import_adapter(f"{allowed}/../secret/s.tar", "x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, msg = code_and_message(lambda: c.import_adapter(str(allowed / "missing.tar"), "x"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in msg
        code, msg = code_and_message(lambda: c.import_adapter("relative/path.tar", "x"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "absolute" in msg
        code, msg = code_and_message(lambda: c.import_adapter("http://example.com/a.tar", "x"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [a.version for a in c.list()] == [1, 2]


def test_import_refused_when_not_configured(start_registry, artifacts) -> None:  # type: ignore[no-untyped-def]
    reg = start_registry()
    with RegistryClient(reg.address) as c:
        code, msg = code_and_message(lambda: c.import_adapter(str(artifacts(seed=113)), "x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "allowed_import_dirs" in msg
        code, msg = code_and_message(lambda: c.import_adapter("s3://bucket/key.tar", "x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "allowed_import_s3" in msg


def test_import_from_s3(start_registry, s3_bucket, artifacts) -> None:  # type: ignore[no-untyped-def]
    cfg, s3 = s3_bucket
    src = artifacts(seed=114, packing="zip")
    s3.put_object(Bucket=cfg.bucket, Key="incoming/team-a/a.zip", Body=src.read_bytes())
    s3.put_object(Bucket=cfg.bucket, Key="private/b.zip", Body=src.read_bytes())
    reg = start_registry(s3=cfg, allowed_import_s3=[f"s3://{cfg.bucket}/incoming"])  # local store, S3 source
    with RegistryClient(reg.address) as c:
        a = c.import_adapter(f"s3://{cfg.bucket}/incoming/team-a/a.zip", "from-s3").adapter
        assert a.digest == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest() and a.artifact_type == "zip"
        code, _ = code_and_message(lambda: c.import_adapter(f"s3://{cfg.bucket}/private/b.zip", "x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = code_and_message(lambda: c.import_adapter(f"s3://{cfg.bucket}/incomingX/b.zip", "x"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, msg = code_and_message(lambda: c.import_adapter(f"s3://{cfg.bucket}/incoming/none.zip", "x"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in msg
