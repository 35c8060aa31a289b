"""The README's non-Python upload recipe (issue 13.8) runs as written: grpcurl streams UploadAdapter
from a shell pipeline into a real registry, and the stored artifact has the file's digest."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.adapters.testing import make_peft_adapter
from loraserve.registry.client import RegistryClient
from loraserve.registry.config import RegistryConfig
from loraserve.registry.testing import RunningRegistry

README = Path(__file__).resolve().parents[2] / "README.md"


def grpcurl() -> str | None:
    return shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


def readme_upload_snippet() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if "RegistryService/UploadAdapter" in b]
    return block


@pytest.mark.skipif(grpcurl() is None or shutil.which("split") is None, reason="grpcurl / coreutils split missing")
def test_readme_grpcurl_upload(tmp_path):
    make_peft_adapter(tmp_path / "my-lora", seed=5, r=64)  # > 1 chunk of 48 KiB once archived
    script = readme_upload_snippet().replace("127.0.0.1:50052", "{ADDRESS}")
    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "reg", auth_token="tok")) as reg:
        env = {"PATH": f"{Path(grpcurl()).parent}:/usr/bin:/bin", "TOKEN": "tok"}
        proc = subprocess.run(["bash", "-eo", "pipefail", "-c", script.replace("{ADDRESS}", reg.address)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        data = (tmp_path / "my-lora.tar.gz").read_bytes()
        assert len(data) > 49152  # the recipe really streamed several chunks
        with RegistryClient(reg.address) as client:
            stored = client.get("my-lora", "")
        assert stored.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert stored.rank == 64 and stored.base_model == "tiny"
