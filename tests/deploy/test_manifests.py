"""deploy/docker-compose.yml and deploy/extra_llm_api_options.yaml, read as data.

The compose file is checked against the Compose Specification's JSON schema, then for what the
schema cannot see: start order by health, ports and addresses that agree between services,
volumes that exist, flags that the real `loraserve` parser declares, and one bucket name.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from .helpers import (COMPOSE_FILE, DEPLOY, DOCKERFILES, OPTIONS_FILE, command_list, dockerfile_instructions,
                      exec_form, flag_value, host_port, interpolate, load_compose, long_flags, option_strings,
                      service_env, subcommand_parser)

SERVICES = {"minio", "minio-init", "registry", "inference"}
LONG_RUNNING = ("minio", "registry", "inference")
# what each loraserve service runs: the subcommand words before the flags
SUBCOMMANDS = {"registry": ["registry", "serve"], "inference": ["serve"]}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def loraserve_args(service: dict) -> list[str]:
    """The service's command as arguments of `loraserve` (the images' entrypoint)."""
    args = command_list(service["command"])
    return args[1:] if args and args[0] == "loraserve" else args


def parser_or_skip(words: list[str]):  # type: ignore[no-untyped-def]
    from loraserve.cli import build_parser

    try:
        return subcommand_parser(build_parser(), words)
    except (KeyError, StopIteration):
        pytest.skip(f"`loraserve {' '.join(words)}` is not registered in loraserve.cli in this build")


def test_compose_matches_the_compose_spec_schema(compose: dict) -> None:
    schema_mod = pytest.importorskip("check_jsonschema.builtin_schemas",
                                     reason="check-jsonschema (test extra) vendors the compose-spec schema")
    import importlib.resources
    import json

    import jsonschema

    schema = json.loads(importlib.resources.files(schema_mod).joinpath("vendor", "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_stack_has_its_services_and_long_running_ones_have_healthchecks(services: dict) -> None:
    assert set(services) == SERVICES
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} needs a healthcheck"
        assert services[name].get("restart") in ("unless-stopped", "always", "on-failure")
    # a one-shot job: restarting it would loop; it must exit so that the registry can start
    assert services["minio-init"].get("restart") in (None, "no")


def test_start_order_waits_for_health_and_for_the_bucket(services: dict) -> None:
    def condition(service: str, dependency: str) -> str:
        return services[service]["depends_on"][dependency]["condition"]

    assert condition("minio-init", "minio") == "service_healthy"
    assert condition("registry", "minio-init") == "service_completed_successfully"
    assert condition("inference", "registry") == "service_healthy"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_container_commands_parse_with_the_real_cli(services: dict, name: str) -> None:
    args = loraserve_args(services[name])
    words = SUBCOMMANDS[name]
    assert args[:len(words)] == words, f"{name} should run `loraserve {' '.join(words)}`, runs {args}"
    parser = parser_or_skip(words)
    declared = option_strings(parser)
    # exact names: argparse would also accept abbreviations, which break when flags are added
    unknown = [f for f in long_flags(args[len(words):]) if f not in declared]
    assert not unknown, f"{name}: flags {unknown} are not options of `loraserve {' '.join(words)}`"
    from loraserve.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert callable(parsed.func)


def listen_port(service: dict) -> int:
    args = loraserve_args(service)
    address = flag_value(args, "--address")
    return host_port(address)[1] if address else int(flag_value(args, "--port") or 0)


def published(service: dict) -> dict[int, str]:
    """container port -> host binding, from short-syntax `ports` entries."""
    out = {}
    for entry in service.get("ports", []):
        *host, container = str(entry).split(":")
        out[int(container.split("/")[0])] = ":".join(host)
    return out


def test_services_listen_on_all_interfaces_and_publish_their_ports_on_loopback(services: dict) -> None:
    reg_args, inf_args = loraserve_args(services["registry"]), loraserve_args(services["inference"])
    assert host_port(flag_value(reg_args, "--address"))[0] == "0.0.0.0"
    assert flag_value(inf_args, "--host") == "0.0.0.0"
    assert set(published(services["registry"])) == {listen_port(services["registry"])}
    expected = {int(flag_value(inf_args, f)) for f in ("--port", "--openai-port", "--metrics-port")}
    assert set(published(services["inference"])) == expected and len(expected) == 3
    for name in LONG_RUNNING:
        for port, host in published(services[name]).items():
            assert host.startswith("127.0.0.1:"), f"{name}:{port} is published beyond loopback ({host})"


@pytest.mark.parametrize("name", ["registry", "inference"])
def test_healthchecks_ask_grpc_health_on_the_port_the_service_listens_on(services: dict, name: str) -> None:
    test = services[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    script = Path(test[2])
    copied = [i.args.split()[-1] for i in dockerfile_instructions(DOCKERFILES[name]) if i.keyword == "COPY"]
    assert str(script) in copied, f"{script} is not copied into the {name} image"
    assert script.name == "grpc_healthcheck.py" and (DEPLOY / script.name).is_file()
    assert host_port(test[3]) == ("127.0.0.1", listen_port(services[name]))


def test_addresses_between_services_agree(services: dict) -> None:
    reg_args, inf_args = loraserve_args(services["registry"]), loraserve_args(services["inference"])
    assert host_port(flag_value(inf_args, "--registry")) == ("registry", listen_port(services["registry"]))
    endpoint = re.fullmatch(r"http://([\w.-]+):(\d+)", flag_value(reg_args, "--s3-endpoint-url") or "")
    assert endpoint and endpoint.group(1) == "minio"
    minio_port = int(endpoint.group(2))
    minio_cmd = command_list(services["minio"]["command"])
    assert minio_cmd[:2] == ["server", "/data"]
    assert host_port(flag_value(minio_cmd, "--address") or ":9000")[1] == minio_port
    assert minio_port in published(services["minio"])


def test_minio_init_creates_the_bucket_the_registry_uses(services: dict) -> None:
    script = " ".join(command_list(services["minio-init"]["command"]))
    created = re.findall(r"mc mb (?:--ignore-existing |-p )*local/([a-z0-9.-]+)", script)
    alias = re.search(r"mc alias set local (\S+)", script)
    assert created == [flag_value(loraserve_args(services["registry"]), "--s3-bucket")] == ["loraserve-adapters"]
    assert alias and alias.group(1) == "http://minio:9000"
    assert "--ignore-existing" in script, "a second `docker compose up` must not fail on an existing bucket"


def test_registry_credentials_and_token_come_from_the_environment(compose: dict, services: dict) -> None:
    raw = services["registry"]["environment"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LORASERVE_REGISTRY_TOKEN"):
        assert "${" in str(raw[key]), f"{key} must be taken from the environment, not written in the file"
    for env in ({}, {"MINIO_ROOT_USER": "alice", "MINIO_ROOT_PASSWORD": "s3cret-s3cret"}):
        minio, registry = service_env(services["minio"], env), service_env(services["registry"], env)
        assert registry["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
        assert registry["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
        assert service_env(services["minio-init"], env) == minio
    assert len(service_env(services["minio"])["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses shorter ones
    assert service_env(services["registry"], {"LORASERVE_REGISTRY_TOKEN": "t0k"})["LORASERVE_REGISTRY_TOKEN"] == "t0k"


def volume_mounts(service: dict) -> dict[str, str]:
    """container path -> source (named volume or host path), from short-syntax `volumes`."""
    out = {}
    for entry in service.get("volumes", []):
        source, target, *_ = interpolate(str(entry), {}).split(":")  # defaults of ${VAR:-default}
        out[target] = source
    return out


def test_volumes_are_declared_and_mounted_where_the_commands_point(compose: dict, services: dict) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for target, source in volume_mounts(service).items():
            if source.startswith((".", "/")):
                if not source.startswith("../models"):  # the base model is built or downloaded by the user
                    assert (COMPOSE_FILE.parent / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared under `volumes:`"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"
    reg_mounts = volume_mounts(services["registry"])
    assert reg_mounts[flag_value(loraserve_args(services["registry"]), "--data-dir")] == "registry-data"
    inf_args, inf_mounts = loraserve_args(services["inference"]), volume_mounts(services["inference"])
    for flag in ("--model", "--extra_llm_api_options", "--adapter-cache-dir"):
        assert flag_value(inf_args, flag) in inf_mounts, f"inference {flag} is not a mounted path"
    assert inf_mounts[flag_value(inf_args, "--extra_llm_api_options")] == "./extra_llm_api_options.yaml"


def test_named_volume_targets_exist_in_the_image_owned_by_the_service_user(services: dict) -> None:
    # a fresh named volume copies owner and mode from the image's directory: without it a
    # non-root process cannot write its own volume
    for name in ("registry", "inference"):
        text = DOCKERFILES[name].read_text()
        owned = re.findall(r"chown -R 10001:10001 (\S+)", text)
        for target, source in volume_mounts(services[name]).items():
            if not source.startswith((".", "/")):
                assert re.search(rf"mkdir -p [^&]*{re.escape(target)}\b", text), f"{name}: {target} not created"
                assert any(Path(target).is_relative_to(d) for d in owned), f"{name}: {target} not chowned"


def test_inference_reserves_one_nvidia_gpu(services: dict) -> None:
    devices = services["inference"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["registry"], "the registry runs on CPU"


def test_builds_point_at_the_deploy_dockerfiles(services: dict) -> None:
    for name in ("registry", "inference"):
        build = services[name]["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() == DOCKERFILES[name].resolve()
        entrypoint = [i for i in dockerfile_instructions(DOCKERFILES[name]) if i.keyword == "ENTRYPOINT"]
        assert exec_form(entrypoint[-1].args) == ["loraserve"], "commands above are loraserve arguments"


# ---- extra_llm_api_options.yaml ---------------------------------------------------------

def test_extra_llm_api_options_load_into_the_engine_configs() -> None:
    from loraserve.config import (KvCacheConfig, LoraConfig, PeftCacheConfig, engine_config_from_kwargs,
                                  load_extra_llm_api_options)

    data = load_extra_llm_api_options(str(OPTIONS_FILE))
    assert set(data) == {"lora_config", "peft_cache_config", "kv_cache_config"}
    lora = LoraConfig(**data["lora_config"])
    peft = PeftCacheConfig(**data["peft_cache_config"])
    kv = KvCacheConfig(**data["kv_cache_config"])
    assert lora.max_loras <= lora.max_cpu_loras and lora.max_lora_rank == 64
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= lora.hf_target_modules()
    assert peft.host_cache_size == 4 << 30 and 0 < peft.device_cache_percent < 1
    assert 0 < kv.free_gpu_memory_fraction < 1
    engine = engine_config_from_kwargs("/models/base", **data)
    assert engine.lora_config == lora and engine.peft_cache_config == peft


def test_extra_llm_api_options_load_as_the_serve_command_reads_them() -> None:
    serve_config = pytest.importorskip("loraserve.inference.serve_config")
    cfg = serve_config.load_serve_config([str(OPTIONS_FILE)], {})
    assert set(cfg.llm_kwargs) == {"lora_config", "peft_cache_config", "kv_cache_config"}
