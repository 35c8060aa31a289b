"""A small blocking Python client for the registry (used by the CLI and by other services).

    with RegistryClient("127.0.0.1:50052", token="...") as c:
        v = c.push("./my-lora", "sql-lora", base_model="meta-llama/Llama-3.2-1B")
        c.tag("sql-lora", v.version, aliases=["prod"])
        path = c.pull("sql-lora", "prod", "./downloads")   # digest checked before it appears

A `ref` is a version number (int or digits) or an alias; None/"" means "latest". Errors are
grpc.RpcError with the server's status code and message; a download whose bytes do not hash
to the announced digest raises DigestMismatchError and leaves no file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
from tqdm import tqdm

from loraserve.v1 import registry_pb2 as pb
from loraserve.v1 import registry_pb2_grpc as pb_grpc

from .archive import ARTIFACT_SUFFIX, tar_directory

CHUNK_SIZE = 64 << 10
FORMATS = {None: pb.ADAPTER_FORMAT_UNSPECIFIED, "": pb.ADAPTER_FORMAT_UNSPECIFIED, "hf": pb.ADAPTER_FORMAT_HF,
           "nemo": pb.ADAPTER_FORMAT_NEMO}
FORMAT_NAMES = {pb.ADAPTER_FORMAT_HF: "hf", pb.ADAPTER_FORMAT_NEMO: "nemo", pb.ADAPTER_FORMAT_UNSPECIFIED: ""}


class DigestMismatchError(Exception):
    """Downloaded bytes do not match the digest or size the server announced."""


def selector(ref: int | str | None) -> tuple[int, str]:
    """(version, alias) for GetAdapterRequest-like messages."""
    if ref is None or ref == "":
        return 0, ""
    if isinstance(ref, int) or str(ref).isdigit():
        return int(ref), ""
    return 0, str(ref)


def split_ref(text: str) -> tuple[str, str]:
    """'name', 'name:3' or 'name:prod' -> (name, ref)."""
    name, _, ref = text.partition(":")
    return name, ref


def sha256_file(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


class RegistryClient:
    def __init__(self, address: str, token: str | None = None, *, root_certificates: bytes | None = None,
                 tls: bool = False, timeout: float | None = None) -> None:
        options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.RegistryServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        return method(request, metadata=self.metadata, timeout=self.timeout)

    # ---- writes ---------------------------------------------------------------------

    def push(self, path: str | os.PathLike[str], name: str, *, format: str | None = None, base_model: str = "",
             description: str = "", tags: dict[str, str] | None = None, aliases: list[str] | None = None,
             chunk_size: int = CHUNK_SIZE, progress: bool = False,
             exist_ok: bool = False) -> pb.UploadAdapterResponse:
        """Uploads an archive file, or a directory tarred deterministically; returns the response
        (`.adapter` is the new version, `.deduplicated` says the bytes were already stored).

        exist_ok: if these exact bytes already are a version of `name`, return that version
        (`.existing` is True) instead of failing with ALREADY_EXISTS: re-running a push is safe.
        """
        path = Path(path)
        with tempfile.TemporaryDirectory(prefix="loraserve-push-") as tmp:
            if path.is_dir():
                artifact, filename = Path(tmp) / f"{path.name}.tar", f"{path.name}.tar"
                tar_directory(path, artifact)
            else:
                artifact, filename = path, path.name
            digest_hex, size = sha256_file(artifact)
            meta = pb.UploadAdapterMetadata(name=name, format=FORMATS[format], base_model=base_model,
                                            description=description, tags=tags or {}, aliases=aliases or [],
                                            filename=filename, size_bytes=size, digest=f"sha256:{digest_hex}",
                                            exist_ok=exist_ok)

            def requests() -> Iterator[pb.UploadAdapterRequest]:
                yield pb.UploadAdapterRequest(metadata=meta)
                with open(artifact, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"push {name}",
                                                     disable=not progress) as bar:
                    while chunk := f.read(chunk_size):
                        yield pb.UploadAdapterRequest(chunk=chunk)
                        bar.update(len(chunk))

            return self.stub.UploadAdapter(requests(), metadata=self.metadata, timeout=self.timeout)

    def import_adapter(self, source_uri: str, name: str, *, format: str | None = None, base_model: str = "",
                       description: str = "", tags: dict[str, str] | None = None,
                       aliases: list[str] | None = None, exist_ok: bool = False) -> pb.ImportAdapterResponse:
        meta = pb.UploadAdapterMetadata(name=name, format=FORMATS[format], base_model=base_model,
                                        description=description, tags=tags or {}, aliases=aliases or [],
                                        exist_ok=exist_ok)
        return self._call(self.stub.ImportAdapter, pb.ImportAdapterRequest(metadata=meta, source_uri=source_uri))

    def delete(self, name: str, version: int | None = None, *, all_versions: bool = False,
               force: bool = False) -> list[int]:
        req = pb.DeleteAdapterRequest(name=name, version=version or 0, all_versions=all_versions, force=force)
        return list(self._call(self.stub.DeleteAdapter, req).deleted_versions)

    def tag(self, name: str, ref: int | str | None = None, *, set: dict[str, str] | None = None,
            remove: list[str] | None = None, aliases: list[str] | None = None) -> pb.AdapterVersion:
        """Sets/removes key=value tags on a version and points `aliases` at it."""
        version, alias = selector(ref)
        adapter = self._call(self.stub.SetTags, pb.SetTagsRequest(name=name, version=version, alias=alias,
                                                                  set=set or {}, remove=remove or [])).adapter
        for new_alias in aliases or []:
            adapter = self.set_alias(name, new_alias, adapter.version)
        return adapter

    def set_alias(self, name: str, alias: str, version: int) -> pb.AdapterVersion:
        return self._call(self.stub.SetAlias, pb.SetAliasRequest(name=name, alias=alias, version=version)).adapter

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(self.stub.DeleteAlias, pb.DeleteAliasRequest(name=name, alias=alias))

    # ---- reads ----------------------------------------------------------------------

    def get(self, name: str, ref: int | str | None = None) -> pb.AdapterVersion:
        version, alias = selector(ref)
        return self._call(self.stub.GetAdapter, pb.GetAdapterRequest(name=name, version=version, alias=alias)).adapter

    def list(self, *, base_model: str = "", name_prefix: str = "", latest_only: bool = False,
             page_size: int = 100) -> Iterator[pb.AdapterVersion]:
        """Every matching version, following page tokens."""
        token = ""
        while True:
            resp = self._call(self.stub.ListAdapters, pb.ListAdaptersRequest(
                page_size=page_size, page_token=token, base_model=base_model, name_prefix=name_prefix,
                latest_only=latest_only))
            yield from resp.adapters
            token = resp.next_page_token
            if not token:
                return

    def pull(self, name: str, ref: int | str | None = None, dest: str | os.PathLike[str] = ".", *,
             progress: bool = False) -> Path:
        """Downloads one version to `dest` (a file path, or an existing directory to put
        '<name>-v<version><suffix>' in); the file appears only once its sha256 matches."""
        version, alias = selector(ref)
        stream = self.stub.DownloadAdapter(pb.DownloadAdapterRequest(name=name, version=version, alias=alias),
                                           metadata=self.metadata, timeout=self.timeout)
        first = next(stream)
        if first.WhichOneof("payload") != "adapter":
            raise DigestMismatchError("download stream did not start with the adapter metadata")
        adapter = first.adapter
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{adapter.name.replace('/', '__')}-v{adapter.version}{ARTIFACT_SUFFIX[adapter.artifact_type]}"
        part = dest.with_name(dest.name + ".part")
        sha, size = hashlib.sha256(), 0
        try:
            with open(part, "wb") as f, tqdm(total=adapter.size_bytes, unit="B", unit_scale=True,
                                             desc=f"pull {name}", disable=not progress) as bar:
                for msg in stream:
                    f.write(msg.chunk)
                    sha.update(msg.chunk)
                    size += len(msg.chunk)
                    bar.update(len(msg.chunk))
            got = f"sha256:{sha.hexdigest()}"
            if got != adapter.digest or size != adapter.size_bytes:
                raise DigestMismatchError(f"{name} v{adapter.version}: got {size} bytes hashing to {got}, expected "
                                          f"{adapter.size_bytes} bytes with {adapter.digest}")
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        return dest
