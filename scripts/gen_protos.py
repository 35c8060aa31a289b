"""Generate the Python gRPC stubs for protos/loraserve/v1/*.proto into services/core/v1/.

They import as `loraserve.v1.<name>_pb2` / `_pb2_grpc`. Run by `make protos` (and so by
`make run` / `make test`); the outputs are git-ignored.
"""
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "services" / "core" / "v1"


def main() -> int:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "loraserve" / "v1").glob("*.proto"))
    if not protos:
        print("no .proto files found", file=sys.stderr)
        return 1
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for f in (pathlib.Path(tmp) / "loraserve" / "v1").iterdir():
            shutil.copy(f, OUT_DIR / f.name)
    (OUT_DIR / "__init__.py").touch()
    print(f"generated stubs for {len(protos)} protos into {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
