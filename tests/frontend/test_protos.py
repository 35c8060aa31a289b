"""The public protos (issue 13.8): options for Go and Java stubs, a leading comment on every service, RPC,
message and enum (read from protoc's source info), Go stubs where protoc-gen-go is installed, and one
meaning of `logprobs` over gRPC (an int N, as in vLLM and the Python API), old fields still honoured."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from loraserve import LLM, SamplingParams
from loraserve.inference.serve_config import ServeConfig
from loraserve.inference.testing import RunningInference
from loraserve.v1 import inference_pb2 as pb
from loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.inference.conftest import make_random_model

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))


def descriptor_set(tmp_path) -> descriptor_pb2.FileDescriptorSet:
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", "--include_source_info", f"--descriptor_set_out={out}",
            *(str(p.relative_to(ROOT / "protos")) for p in PROTOS)]
    assert protoc.main(args) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_go_and_java_options(tmp_path):
    files = descriptor_set(tmp_path).file
    assert len(files) == len(PROTOS) == 2
    for f in files:
        assert f.options.go_package.endswith(";loraservev1") and "/loraserve/v1" in f.options.go_package, f.name
        assert f.options.java_multiple_files and f.options.java_package == "io.loraserve.v1", f.name


def test_every_service_rpc_message_and_enum_has_a_leading_comment(tmp_path):
    missing = []
    for f in descriptor_set(tmp_path).file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}
        for i, svc in enumerate(f.service):  # FileDescriptorProto: service = 6, ServiceDescriptorProto: method = 2
            missing += [svc.name] * (not comments.get((6, i)))
            missing += [f"{svc.name}.{m.name}" for j, m in enumerate(svc.method) if not comments.get((6, i, 2, j))]
        missing += [m.name for i, m in enumerate(f.message_type) if not comments.get((4, i))]  # message_type = 4
        missing += [e.name for i, e in enumerate(f.enum_type) if not comments.get((5, i))]  # enum_type = 5
    assert not missing, f"no leading comment: {missing}"


def test_go_stubs_generate(tmp_path):
    protoc_bin, plugin = shutil.which("protoc"), shutil.which("protoc-gen-go")
    if not (protoc_bin and plugin):
        pytest.skip("protoc / protoc-gen-go not installed (go_package is checked above)")
    subprocess.run([protoc_bin, f"-I{ROOT / 'protos'}", f"--go_out={tmp_path}", "--go_opt=paths=source_relative",
                    *(str(p.relative_to(ROOT / "protos")) for p in PROTOS)], check=True)
    assert (tmp_path / "loraserve/v1/inference.pb.go").is_file()


def test_buf_lint_when_installed():
    if not shutil.which("buf"):
        pytest.skip("buf not installed (make lint says so too)")
    subprocess.run(["buf", "lint"], cwd=ROOT, check=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lp"))
    make_random_model(path, "llama")
    cfg = ServeConfig(model=path, port=0, registry_address=None,
                      adapter_cache_dir=str(tmp_path_factory.mktemp("c")), llm_kwargs=dict(dtype="float32", device="cpu"))
    with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        yield pb_grpc.InferenceServiceStub(ch), LLM(path, dtype="float32", device="cpu"), srv.address


def grpc_logprobs(stub, **fields):
    sp = pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, **fields)
    chunks = [m.chunk for m in stub.Generate(pb.GenerateRequest(text="The quick", sampling_params=sp), timeout=30)
              if m.WhichOneof("response") == "chunk"]
    return [lp for c in chunks for lp in c.logprobs], [list(t.token_ids) for c in chunks for t in c.top_logprobs]


@pytest.mark.parametrize("fields, n", [({"logprobs": 2}, 2), ({"logprobs": 0}, 0), ({}, None),
                                       ({"legacy_logprobs": True}, 0), ({"top_logprobs": 3}, 3),
                                       ({"logprobs": 1, "top_logprobs": 2}, 2)])
def test_logprobs_is_an_int_n_as_in_vllm(server, fields, n):
    stub, offline, _ = server
    logprobs, tops = grpc_logprobs(stub, **fields)
    ref = offline.generate("The quick", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=n))
    ref = ref.outputs[0]
    if n is None:
        assert logprobs == [] and tops == []
        return
    assert logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert tops == ([list(d) for d in ref.top_logprobs] if n > 0 else [])
    assert all(len(t) == n for t in tops)


def test_generate_cli_logprobs(server, capsys):
    from loraserve.cli import main

    _, offline, address = server
    assert main(["generate", "The quick", "--server", address, "--logprobs", "2", "--max-tokens", "3"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("token ")]
    ref = offline.generate("The quick", SamplingParams(max_tokens=3, temperature=0, logprobs=2)).outputs[0]
    assert [int(line.split()[1]) for line in lines] == ref.token_ids
    assert [float(line.split()[3]) for line in lines] == pytest.approx(ref.logprobs, abs=1e-3)
    assert all(len(line.split("top ")[1].split()) == 2 for line in lines)
