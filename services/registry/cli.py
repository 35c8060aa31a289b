"""`loraserve registry serve|gc` and `loraserve adapter push|ls|show|pull|rm|tag|import`.

Client commands find the registry through --registry (env LORASERVE_REGISTRY, default
127.0.0.1:50052) and send --token (env LORASERVE_REGISTRY_TOKEN) as a bearer token.
An adapter is named `NAME`, `NAME:VERSION` or `NAME:ALIAS` (default: latest).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import grpc

from .config import DEFAULT_ADDRESS, RegistryConfig


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    reg = subparsers.add_parser("registry", help="adapter registry service")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="COMMAND")
    serve = reg_sub.add_parser("serve", help="run the registry gRPC service")
    _server_options(serve)
    serve.add_argument("--address", default=None, help=f"host:port to listen on (default {DEFAULT_ADDRESS})")
    serve.add_argument("--host", default=None, help="bind address (with --port; like `loraserve serve`)")
    serve.add_argument("--port", type=int, default=None, help="port (with --host; default 50052)")
    from loraserve.cli import add_log_format

    add_log_format(serve)
    serve.set_defaults(func=_serve)
    gc = reg_sub.add_parser("gc", help="remove orphan blobs and temp files (the server also does this at start)")
    _server_options(gc)
    gc.add_argument("--min-age", type=float, default=None,
                    help="only remove leftovers older than this many seconds (default: config, 3600)")
    gc.set_defaults(func=_gc)

    ad = subparsers.add_parser("adapter", help="registry client: push, list, pull adapters")
    ad_sub = ad.add_subparsers(dest="adapter_command", metavar="COMMAND")
    push = _client_parser(ad_sub, "push", "upload an adapter dir or archive (.tar, .tar.gz, .zip, .nemo)")
    push.add_argument("path", type=Path, help="PEFT adapter directory, .safetensors/.bin file, archive or .nemo")
    push.add_argument("--name", required=True, help="adapter name; each push of new bytes adds a version")
    _meta_options(push)
    push.set_defaults(func=_push)
    imp = _client_parser(ad_sub, "import", "register an artifact the server reads itself (s3://... or a path)")
    imp.add_argument("source_uri", help="s3://BUCKET/KEY or a path the server may read (--allow-import-*)")
    imp.add_argument("--name", required=True, help="adapter name; each import of new bytes adds a version")
    _meta_options(imp)
    imp.set_defaults(func=_import)
    ls = _client_parser(ad_sub, "ls", "list adapters")
    ls.add_argument("prefix", nargs="?", default="", help="name prefix")
    ls.add_argument("--base-model", default="")
    ls.add_argument("--all-versions", action="store_true", help="every version, not just the latest of each name")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_ls)
    show = _client_parser(ad_sub, "show", "show one version")
    show.add_argument("ref", help="NAME[:VERSION|:ALIAS]")
    show.set_defaults(func=_show)
    pull = _client_parser(ad_sub, "pull", "download one version (digest verified)")
    pull.add_argument("ref", help="NAME[:VERSION|:ALIAS]")
    pull.add_argument("-o", "--output", type=Path, default=Path("."), help="file or existing directory")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pull.set_defaults(func=_pull)
    rm = _client_parser(ad_sub, "rm", "delete a version (NAME:VERSION) or all versions (NAME --all)")
    rm.add_argument("ref", help="NAME:VERSION, or NAME with --all")
    rm.add_argument("--all", action="store_true")
    rm.add_argument("--force", action="store_true", help="also delete versions that aliases point at")
    rm.set_defaults(func=_rm)
    tag = _client_parser(ad_sub, "tag", "set/remove KEY=VALUE tags and aliases of a version")
    tag.add_argument("ref", help="NAME[:VERSION|:ALIAS]")
    tag.add_argument("tags", nargs="*", metavar="KEY=VALUE", help="tags to set (may also follow the options)")
    tag.add_argument("--remove", action="append", default=[], metavar="KEY", help="remove a tag")
    tag.add_argument("--alias", action="append", default=[], help="point this alias at the version")
    tag.add_argument("--remove-alias", action="append", default=[], metavar="ALIAS")
    tag.set_defaults(func=_tag, extra_positionals="tags")  # `tag NAME --alias A key=v`: see loraserve.cli


def _server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file (keys of RegistryConfig, optionally under 'registry:')")
    p.add_argument("--data-dir", type=Path, help="default ./var/registry")
    p.add_argument("--db-url", help="SQLAlchemy URL (default: sqlite file in the data dir)")
    p.add_argument("--store", choices=("local", "s3"),
                   help="where artifacts live: local (a directory under the data dir, default) or s3")
    p.add_argument("--s3-bucket", help="S3 bucket of the artifacts (with --store s3)")
    p.add_argument("--s3-prefix", help="key prefix inside the bucket (with --store s3)")
    p.add_argument("--s3-endpoint-url",
                   help="S3 API endpoint, e.g. http://minio:9000 (default: AWS; credentials from the usual "
                        "AWS_* environment variables or files)")
    p.add_argument("--auth-token-file", type=Path,
                   help="file holding the write token (or env LORASERVE_REGISTRY_TOKEN)")
    p.add_argument("--read-token-file", type=Path, help="file holding a token that reads need")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--max-rank", type=int)
    p.add_argument("--max-artifact-bytes", type=int)
    p.add_argument("--allow-import-dir", action="append", type=Path, default=None)
    p.add_argument("--allow-import-s3", action="append", default=None, metavar="s3://BUCKET[/PREFIX]")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default off)")
    p.add_argument("--blob-port", type=int, help="serve artifact blobs over HTTP with byte ranges on this port "
                   "(signed URLs from GetAdapter; the fast download path of the inference service; default off)")
    p.add_argument("--s3-presign-downloads", action="store_true", default=None,
                   help="with --store s3: hand out presigned S3 URLs of the blobs (the inference service reads S3)")


def _read_token_file(path: Path, flag: str) -> str:
    """The token in `path`; an empty or whitespace-only file is a startup error, never "no auth"."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{flag} {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if not token:
        raise SystemExit(f"{flag} {path} is empty or whitespace only: refusing to start with writes "
                         "unguarded (remove the flag to run without auth)")
    return token


def build_config(args: argparse.Namespace) -> RegistryConfig:
    raw: dict = {}
    if args.config:
        base = RegistryConfig.from_yaml(args.config)
        raw = {f: getattr(base, f) for f in base.__slots__}  # type: ignore[attr-defined]
    s3 = raw.get("s3")
    s3 = {f: getattr(s3, f) for f in s3.__slots__} if s3 is not None else {}
    for flag, key in (("data_dir", "data_dir"), ("db_url", "db_url"), ("store", "store"), ("tls_cert", "tls_cert_file"),
                      ("tls_key", "tls_key_file"), ("max_rank", "max_rank"),
                      ("max_artifact_bytes", "max_artifact_bytes"), ("allow_import_dir", "allowed_import_dirs"),
                      ("allow_import_s3", "allowed_import_s3"), ("metrics_port", "metrics_port"),
                      ("blob_port", "blob_port")):
        if getattr(args, flag) is not None:
            raw[key] = getattr(args, flag)
    for flag, key in (("s3_bucket", "bucket"), ("s3_prefix", "prefix"), ("s3_endpoint_url", "endpoint_url"),
                      ("s3_presign_downloads", "presign_downloads")):
        if getattr(args, flag) is not None:
            s3[key] = getattr(args, flag)
    if args.auth_token_file:
        raw["auth_token"] = _read_token_file(args.auth_token_file, "--auth-token-file")
    elif os.environ.get("LORASERVE_REGISTRY_TOKEN") and not raw.get("auth_token"):
        raw["auth_token"] = os.environ["LORASERVE_REGISTRY_TOKEN"]
    if args.read_token_file:
        raw["read_token"] = _read_token_file(args.read_token_file, "--read-token-file")
    raw["s3"] = s3
    try:
        return RegistryConfig(**raw)
    except ValueError as exc:
        raise SystemExit(f"registry config: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    config = build_config(args)
    address = args.address or DEFAULT_ADDRESS
    if args.host is not None or args.port is not None:
        if args.address:
            raise SystemExit("give either --address or --host/--port, not both")
        default_host, default_port = DEFAULT_ADDRESS.rsplit(":", 1)
        address = f"{args.host or default_host}:{args.port if args.port is not None else default_port}"
    from loraserve.ports import PortInUseError, check_free

    try:  # a taken port is a clear error naming it, before any data is opened
        check_free(address.rsplit(":", 1)[0], config.metrics_port, "registry metrics", "--metrics-port")
        check_free(address.rsplit(":", 1)[0], config.blob_port or 0, "registry blobs", "--blob-port")
        asyncio.run(serve(config, address))
    except PortInUseError as exc:
        print(f"error: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def _gc(args: argparse.Namespace) -> int:
    from .service import RegistryService

    service = RegistryService.open(build_config(args))
    try:
        report = service.gc(args.min_age)
    finally:
        service.close()
    print(f"removed {len(report.removed_blobs)} orphan blobs and {len(report.removed_temp)} temp files; "
          f"kept {report.kept_young} younger ones")
    return 0


def _client_parser(sub: argparse._SubParsersAction, name: str, help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_)
    p.add_argument("--registry", default=os.environ.get("LORASERVE_REGISTRY", DEFAULT_ADDRESS), help="host:port")
    p.add_argument("--token", default=os.environ.get("LORASERVE_REGISTRY_TOKEN"), help="bearer token")
    p.add_argument("--tls", action="store_true", help="use TLS (system roots, or --ca-cert)")
    p.add_argument("--ca-cert", type=Path)
    return p


def _meta_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("hf", "nemo"), help="default: detected")
    p.add_argument("--base-model", default="", help="base model id the adapter was trained on")
    p.add_argument("--description", default="", help="free text shown by `adapter show`")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="set a tag (repeatable)")
    p.add_argument("--alias", action="append", default=[], help="point this alias at the new version (repeatable)")
    p.add_argument("--exist-ok", action="store_true",
                   help="if these bytes already are a version of NAME, report it instead of failing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .client import RegistryClient

    roots = args.ca_cert.read_bytes() if args.ca_cert else None
    return RegistryClient(args.registry, token=args.token, tls=args.tls, root_certificates=roots)


def _kv(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _describe(a) -> dict:  # type: ignore[no-untyped-def]
    from .client import FORMAT_NAMES

    return {"name": a.name, "version": a.version, "aliases": list(a.aliases) + (["latest"] if a.is_latest else []),
            "format": FORMAT_NAMES[a.format], "base_model": a.base_model, "rank": a.rank, "alpha": a.alpha,
            "use_rslora": a.use_rslora, "target_modules": list(a.target_modules), "num_layers": a.num_layers,
            "size_bytes": a.size_bytes, "digest": a.digest, "artifact_type": a.artifact_type,
            "created_at": a.created_at.ToDatetime().isoformat() + "Z", "description": a.description,
            "tags": dict(a.tags)}


def _run(fn):  # type: ignore[no-untyped-def]
    """Client command wrapper: a gRPC error becomes one line on stderr and exit status 1."""
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        except OSError as exc:  # a local file the command reads or writes: one line, not a traceback
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
            return 1
    return wrapper


@_run
def _push(args: argparse.Namespace) -> int:
    if not args.path.exists():
        print(f"error: {args.path}: no such file or directory (give a PEFT adapter directory, a .safetensors/.bin "
              "file, an archive or a .nemo file)", file=sys.stderr)
        return 1
    with _client(args) as c:
        resp = c.push(args.path, args.name, format=args.format, base_model=args.base_model,
                      description=args.description, tags=_kv(args.tag), aliases=args.alias, progress=not args.quiet,
                      exist_ok=args.exist_ok)
    a = resp.adapter
    if resp.existing:
        print(f"unchanged: {a.name}:{a.version} already has these bytes ({a.digest})")
        return 0
    print(f"pushed {a.name}:{a.version} {a.digest} rank={a.rank} alpha={a.alpha:g} "
          f"modules={','.join(a.target_modules)}{' (bytes already stored)' if resp.deduplicated else ''}")
    return 0


@_run
def _import(args: argparse.Namespace) -> int:
    with _client(args) as c:
        resp = c.import_adapter(args.source_uri, args.name, format=args.format, base_model=args.base_model,
                                description=args.description, tags=_kv(args.tag), aliases=args.alias,
                                exist_ok=args.exist_ok)
    print(f"imported {resp.adapter.name}:{resp.adapter.version} {resp.adapter.digest}")
    return 0


@_run
def _ls(args: argparse.Namespace) -> int:
    with _client(args) as c:
        items = list(c.list(name_prefix=args.prefix, base_model=args.base_model, latest_only=not args.all_versions))
    if args.json:
        print(json.dumps([_describe(a) for a in items], indent=2))
        return 0
    print(f"{'NAME':<32} {'VER':>4} {'FORMAT':<6} {'RANK':>4} {'SIZE':>10}  {'ALIASES':<16} BASE MODEL")
    for a in items:
        aliases = ",".join(list(a.aliases) + (["latest"] if a.is_latest else []))
        print(f"{a.name:<32} {a.version:>4} {_describe(a)['format']:<6} {a.rank:>4} {a.size_bytes:>10}  "
              f"{aliases:<16} {a.base_model}")
    return 0


@_run
def _show(args: argparse.Namespace) -> int:
    from .client import split_ref

    name, ref = split_ref(args.ref)
    with _client(args) as c:
        print(json.dumps(_describe(c.get(name, ref)), indent=2))
    return 0


@_run
def _pull(args: argparse.Namespace) -> int:
    from .client import split_ref

    name, ref = split_ref(args.ref)
    with _client(args) as c:
        path = c.pull(name, ref, args.output, progress=not args.quiet)
    print(path)
    return 0


@_run
def _rm(args: argparse.Namespace) -> int:
    from .client import split_ref

    name, ref = split_ref(args.ref)
    if bool(ref) == args.all or (ref and not ref.isdigit()):
        raise SystemExit("give NAME:VERSION, or NAME --all")
    with _client(args) as c:
        versions = c.delete(name, int(ref) if ref else None, all_versions=args.all, force=args.force)
    print(f"deleted {name} versions {', '.join(map(str, versions))}")
    return 0


@_run
def _tag(args: argparse.Namespace) -> int:
    from .client import split_ref

    name, ref = split_ref(args.ref)
    with _client(args) as c:
        a = c.tag(name, ref, set=_kv(args.tags), remove=args.remove, aliases=args.alias)
        for alias in args.remove_alias:
            c.delete_alias(name, alias)
        if args.remove_alias:
            a = c.get(name, a.version)
    print(json.dumps(_describe(a), indent=2))
    return 0
